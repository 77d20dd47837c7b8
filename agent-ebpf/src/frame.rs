//! The frame hook: a `tc` ingress program on the node's side of each
//! enforced pod's link (the host end of its veth pair), where every frame
//! the pod's network namespace sends enters the node. The pod cannot skip
//! it: it runs on the receiving side, in the node's namespace.
//!
//! Frames sent by inet sockets carry their socket, and were judged in the
//! pod already (sock_addr hooks, packet hook), so they pass after two
//! loads and a comparison. Every other frame is judged here by its IP
//! header, with the same rules ([`decide::judge`]): frames of packet
//! sockets (`AF_PACKET`, with or without `PACKET_QDISC_BYPASS`) and of
//! AF_XDP sockets, judged as their socket's cgroup; and frames with no
//! socket (packets the pod's namespace forwards, say after a packet
//! socket wrote them to its loopback), judged as the pod
//! ([`TG_POD_LINKS`]). ARP passes, and so do TCP resets and SYN-ACKs
//! without data and without a socket: the pod's kernel sends those for
//! connections others opened to it (an IPv6 reset to a closed port, a
//! SYN-ACK with a SYN cookie). Any other frame that is not IP is
//! judged as IPv4 to 0.0.0.0 with protocol 0, so only a rule that allows
//! every address and protocol lets it through.
//!
//! A denied frame is dropped (the sending call has returned by then, so it
//! cannot fail); in observe mode it goes and is recorded as `audit`, once
//! per flow, verdict and interval, like the packet hook's.

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    helpers::generated::bpf_skb_cgroup_id,
    macros::classifier,
    programs::TcContext,
};
use tollgate_common::{Hook, counter, family};

use crate::{decide::Destination, dns, maps::TG_POD_LINKS, packet, report};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Ethertypes, as `skb->protocol` holds them (network order).
const ETH_P_IP: u32 = 0x0800_u16.to_be() as u32;
const ETH_P_IPV6: u32 = 0x86dd_u16.to_be() as u32;
const ETH_P_ARP: u32 = 0x0806_u16.to_be() as u32;

/// Where the IP header starts: after the Ethernet header, which tc ingress
/// programs see (a VLAN tag was taken off into `skb->vlan_tci` before).
const IP_HEADER: usize = 14;

#[classifier]
pub fn tollgate_frame(ctx: TcContext) -> i32 {
    judge_frame(&ctx)
}

#[inline(always)]
fn judge_frame(ctx: &TcContext) -> i32 {
    let skb = ctx.skb.skb;
    // SAFETY: `sk` is a context field the verifier allows for tc programs
    // (PTR_TO_SOCK_COMMON_OR_NULL); `family` is a field of every socket.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    let sent_by_socket = !sk.is_null();
    if sent_by_socket {
        // SAFETY: as above.
        let socket_family = unsafe { (*sk).family };
        if socket_family == AF_INET || socket_family == AF_INET6 {
            return TC_ACT_UNSPEC;
        }
    }
    // SAFETY: plain context fields.
    let (ethertype, ifindex) = unsafe { ((*skb).protocol, (*skb).ifindex) };
    if ethertype == ETH_P_ARP {
        return TC_ACT_UNSPEC;
    }
    // SAFETY: a helper without preconditions beyond a valid skb; 0 when the
    // frame has no full socket.
    let socket_cgroup = if sent_by_socket {
        unsafe { bpf_skb_cgroup_id(skb) }
    } else {
        0
    };
    let cgroup_id = if socket_cgroup != 0 {
        socket_cgroup
    } else {
        // SAFETY: a plain lookup of a u64 value.
        match unsafe { TG_POD_LINKS.get(&ifindex) } {
            Some(&pod) => pod,
            // Not a pod the agent attached this program for (any more).
            None => return TC_ACT_UNSPEC,
        }
    };

    let is_ip = ethertype == ETH_P_IP || ethertype == ETH_P_IPV6;
    if is_ip && dns::spoofs_resolver(&ctx.skb, IP_HEADER) {
        report::count(counter::DNS_SPOOFED);
        return TC_ACT_SHOT as i32;
    }
    if !sent_by_socket && is_ip && is_tcp_control_segment(ctx, ethertype) {
        return TC_ACT_UNSPEC;
    }
    let (hook, dst) = match is_ip {
        true => packet::destination(&ctx.skb, IP_HEADER, Hook::Frame4, Hook::Frame6),
        false => None,
    }
    .unwrap_or((
        Hook::Frame4,
        // Not IP, or cut short: only what allows everything allows it.
        Destination {
            family: family::INET,
            addr: [0; 4],
            port: 0,
            protocol: 0,
            flags: 0,
        },
    ));
    if packet::denies(skb, hook, cgroup_id, &dst) {
        TC_ACT_SHOT as i32
    } else {
        TC_ACT_UNSPEC
    }
}

/// A TCP segment with RST, or SYN and ACK, and no data, straight after an
/// IP header without options or extension headers: what a pod's kernel
/// sends without a socket in answer to a peer (the header fields are all
/// such a segment carries).
#[inline(always)]
fn is_tcp_control_segment(ctx: &TcContext, ethertype: u32) -> bool {
    const TCP_RST: u8 = 0x04;
    const TCP_SYN_ACK: u8 = 0x12;
    let (ip_protocol, ip_payload, transport) = if ethertype == ETH_P_IP {
        let (Ok(first), Ok(total), Ok(ip_protocol)) = (
            ctx.load::<u8>(IP_HEADER),
            ctx.load::<u16>(IP_HEADER + 2),
            ctx.load::<u8>(IP_HEADER + 9),
        ) else {
            return false;
        };
        if first != 0x45 {
            return false;
        }
        (
            ip_protocol,
            u16::from_be(total).saturating_sub(20),
            IP_HEADER + 20,
        )
    } else {
        let (Ok(payload), Ok(next)) = (
            ctx.load::<u16>(IP_HEADER + 4),
            ctx.load::<u8>(IP_HEADER + 6),
        ) else {
            return false;
        };
        (next, u16::from_be(payload), IP_HEADER + 40)
    };
    if ip_protocol != tollgate_common::protocol::TCP {
        return false;
    }
    let (Ok(offset), Ok(flags)) = (
        ctx.load::<u8>(transport + 12),
        ctx.load::<u8>(transport + 13),
    ) else {
        return false;
    };
    let header = u16::from(offset >> 4) * 4;
    header == ip_payload && (flags & TCP_RST != 0 || flags & 0x3f == TCP_SYN_ACK)
}
