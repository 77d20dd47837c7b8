//! The packet hook: a `cgroup_skb` egress program that judges each packet
//! of the sockets the sock_addr hooks do not see: raw sockets of any
//! protocol (hand-made TCP and UDP headers included), ICMP and ICMPv6 echo
//! sockets, SCTP, and anything else that is not a TCP stream or UDP
//! datagram socket. It decides by the packet's own header, with the same
//! rules as the sock_addr hooks ([`decide::judge`]); a denied packet is
//! dropped, and the sending call fails with EPERM where the protocol
//! passes the error up (raw and echo sockets do; SCTP retransmits).
//!
//! TCP and UDP sockets were judged at connect or sendmsg, so their packets
//! leave after two loads and two comparisons; a UDP datagram is first
//! looked at for a DNS query to record (`dns::record_query`: its header's
//! first bytes read in place and four comparisons unless it goes to a
//! resolver port). A packet of
//! the other sockets that claims to come from a trusted resolver is
//! dropped whatever the policy says (`dns::spoofs_resolver`).

use aya_ebpf::{
    EbpfContext,
    helpers::generated::{
        bpf_get_socket_cookie, bpf_get_socket_uid, bpf_sk_fullsock, bpf_skb_cgroup_id,
    },
    macros::cgroup_skb,
    programs::{SkBuffContext, sk_buff::SkBuff},
};
use tollgate_common::{Hook, Verdict, counter, family, protocol};

use crate::{
    decide::{self, Destination},
    dns,
    report::{self, Origin, Sender},
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;

/// IPv6 extension headers walked to find the upper-layer protocol. A
/// packet with more is judged by the last next-header value read, without
/// ports: it matches port-less rules only.
const IPV6_EXTENSION_HEADERS: usize = 6;
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTIONS: u8 = 60;

#[cgroup_skb(egress)]
pub fn tollgate_packet(ctx: SkBuffContext) -> i32 {
    judge_packet(&ctx, true)
}

/// `tollgate_packet` without recording DNS queries, for a kernel that
/// refuses the DNS parser: the packets are judged all the same.
#[cgroup_skb(egress)]
pub fn tollgate_packet_plain(ctx: SkBuffContext) -> i32 {
    judge_packet(&ctx, false)
}

#[inline(always)]
fn judge_packet(ctx: &SkBuffContext, record_queries: bool) -> i32 {
    let skb = ctx.as_ptr() as *mut aya_ebpf::bindings::__sk_buff;
    // SAFETY: `sk` is a context field the verifier allows for cgroup_skb
    // (PTR_TO_SOCK_COMMON_OR_NULL); bpf_sk_fullsock takes it as it is.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return 1;
    }
    // SAFETY: as above.
    let sk = unsafe { bpf_sk_fullsock(sk) };
    if sk.is_null() {
        return 1;
    }
    // SAFETY: fields of a full socket the verifier allows.
    let (sock_type, sock_protocol) = unsafe { ((*sk).type_, (*sk).protocol) };
    if judged_at_sock_addr(sock_type, sock_protocol) {
        if record_queries && sock_protocol == protocol::UDP as u32 {
            dns::record_query(ctx);
        }
        return 1;
    }
    if dns::spoofs_resolver(&ctx.skb, NETWORK_HEADER) {
        report::count(counter::DNS_SPOOFED);
        return 0;
    }
    let Some((hook, dst)) = destination(&ctx.skb, NETWORK_HEADER, Hook::Packet4, Hook::Packet6)
    else {
        // Not an IP packet the kernel could send from an inet socket.
        return 1;
    };
    // SAFETY: a helper without preconditions beyond a valid skb.
    let cgroup_id = unsafe { bpf_skb_cgroup_id(skb) };
    if denies(skb, hook, cgroup_id, &dst) {
        0
    } else {
        1
    }
}

/// Judges a packet or frame of cgroup `cgroup_id` to `dst` and reports it
/// as `hook` with its socket's cookie and owner (0 and the overflow uid
/// for one without a socket); true if it is denied.
#[inline(always)]
pub fn denies(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    hook: Hook,
    cgroup_id: u64,
    dst: &Destination,
) -> bool {
    // SAFETY: helpers without preconditions beyond a valid skb.
    let (socket_cookie, uid) = unsafe {
        (
            bpf_get_socket_cookie(skb as *mut _),
            bpf_get_socket_uid(skb),
        )
    };
    let judgement = decide::judge(cgroup_id, dst);
    let origin = Origin {
        hook,
        cgroup_id,
        socket_cookie,
        sender: Sender::SocketOwner { uid },
    };
    report::decision(&origin, &judgement, dst);
    judgement.verdict == Verdict::Denied
}

/// TCP stream and UDP datagram sockets: every connection and datagram of
/// theirs was judged at connect4/6 or sendmsg4/6 (UDP-Lite is judged here
/// too, which costs its users one decision per packet, not a way out).
#[inline(always)]
fn judged_at_sock_addr(sock_type: u32, sock_protocol: u32) -> bool {
    (sock_type == SOCK_STREAM && sock_protocol == protocol::TCP as u32)
        || (sock_type == SOCK_DGRAM && sock_protocol == protocol::UDP as u32)
}

/// Where the network header starts in a `cgroup_skb` program's packet.
const NETWORK_HEADER: usize = 0;

/// The destination, protocol and port of the IP packet whose header starts
/// at `ip` (0 for cgroup programs, after the link header for tc), and the
/// hook (`v4` or `v6`) that reports it.
#[inline(always)]
pub fn destination(skb: &SkBuff, ip: usize, v4: Hook, v6: Hook) -> Option<(Hook, Destination)> {
    let first: u8 = skb.load(ip).ok()?;
    match first >> 4 {
        4 => {
            let ihl = ((first & 0x0f) as usize) * 4;
            let fragment: u16 = u16::from_be(skb.load(ip + 6).ok()?);
            let ip_protocol: u8 = skb.load(ip + 9).ok()?;
            let daddr: u32 = skb.load(ip + 16).ok()?;
            // Only the first fragment carries the ports.
            let first_fragment = fragment & 0x1fff == 0;
            let port = if first_fragment {
                destination_port(skb, ip_protocol, ip + ihl)
            } else {
                0
            };
            Some((
                v4,
                Destination {
                    family: family::INET,
                    addr: [daddr, 0, 0, 0],
                    port,
                    protocol: ip_protocol,
                    flags: 0,
                },
            ))
        }
        6 => {
            let addr: [u32; 4] = skb.load(ip + 24).ok()?;
            let (ip_protocol, port) = ipv6_upper_layer(skb, ip)?;
            Some((
                v6,
                Destination {
                    family: family::INET6,
                    addr,
                    port,
                    protocol: ip_protocol,
                    flags: 0,
                },
            ))
        }
        _ => None,
    }
}

/// Walks the IPv6 extension headers to the upper-layer protocol and its
/// destination port (0 after a fragment header with a non-zero offset).
#[inline(always)]
fn ipv6_upper_layer(skb: &SkBuff, ip: usize) -> Option<(u8, u16)> {
    let mut next: u8 = skb.load(ip + 6).ok()?;
    let mut offset: usize = ip + 40;
    let mut first_fragment = true;
    for _ in 0..IPV6_EXTENSION_HEADERS {
        let length = match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS => {
                let units: u8 = skb.load(offset + 1).ok()?;
                (units as usize + 1) * 8
            }
            IPV6_AUTH => {
                let units: u8 = skb.load(offset + 1).ok()?;
                (units as usize + 2) * 4
            }
            IPV6_FRAGMENT => {
                let fragment: u16 = u16::from_be(skb.load(offset + 2).ok()?);
                first_fragment = fragment & 0xfff8 == 0;
                8
            }
            _ => {
                let port = if first_fragment {
                    destination_port(skb, next, offset)
                } else {
                    0
                };
                return Some((next, port));
            }
        };
        next = skb.load(offset).ok()?;
        offset += length;
    }
    Some((next, 0))
}

/// The destination port of a protocol with ports; 0 for one without, or
/// for a header cut short.
#[inline(always)]
fn destination_port(skb: &SkBuff, ip_protocol: u8, transport: usize) -> u16 {
    if !protocol::has_ports(ip_protocol) {
        return 0;
    }
    match skb.load::<u16>(transport + 2) {
        Ok(port) => u16::from_be(port),
        Err(_) => 0,
    }
}
