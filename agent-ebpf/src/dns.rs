//! DNS learning: a `cgroup_skb` ingress program sees every packet arriving
//! at an endpoint's sockets. Answers from trusted resolvers are parsed here
//! (`tollgate_common::dns`), and when the question name matches an FQDN
//! pattern, the answer's addresses are installed for that endpoint before
//! the packet is queued to the socket, so before the application can read
//! it. Every answer is also reported to the agent, which learns what the
//! parser leaves to it (TCP, too large, too odd) and names flows.
//! `tollgate_dns_forward` is the same program without the parser, for a
//! kernel that refuses the parser: the agent then learns from every answer.
//!
//! An answer teaches only if it answers a query that the receiving socket
//! really sent: the sock_addr hooks note the sockets of endpoints with FQDN
//! rules that talk to a trusted resolver from their endpoint's network
//! namespace (`note_resolver_socket`), the packet hook records the
//! questions those sockets send (`record_query`), and an answer must come
//! from that resolver to that socket with the query's id and question,
//! within `QUERY_WINDOW_NS`. An answer over loopback from a resolver that
//! is not a loopback address counts only for a socket of the host's
//! network namespace (node-local DNS on a host-network endpoint).
//!
//! The programs never drop a packet: DNS works whatever happens here.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_RB_FORCE_WAKEUP},
    helpers::{
        bpf_ktime_get_ns,
        generated::{
            bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ringbuf_output, bpf_skb_cgroup_id,
            bpf_skb_load_bytes,
        },
    },
    macros::cgroup_skb,
    maps::PerCpuArray,
    programs::{SkBuffContext, SockAddrContext, sk_buff::SkBuff},
};
use tollgate_common::{
    DNS_PORTS, DnsScratch, EndpointKey, FqdnName, LEARNED_SLOTS, LearnedKey, LearnedSlot,
    LearnedValue, QUERY_WINDOW_NS, QueryKey, ResolverKey, counter,
    dns::{self, MAX_ANSWERS, MAX_LABELS, MESSAGE_MAX},
    dns_flags, endpoint_flags, event_kind, family, protocol,
};

use crate::{
    decide::Destination,
    maps::{
        TG_CONFIG, TG_DNS_FORWARD, TG_DNS_QUERIES, TG_DNS_QUERY_SCRATCH, TG_DNS_SCRATCH,
        TG_DNS_SOCKETS, TG_DNS_TRUSTED, TG_ENDPOINT_NETNS, TG_ENDPOINTS, TG_EVENTS,
        TG_FQDN_LEARNED, TG_FQDN_NAMES,
    },
    report::{add, batched_wakeup, count},
};

const DNS_PORT: u16 = 53;
/// A TCP segment larger than one copy (a receive offload can merge many)
/// goes out in up to this many events.
const TCP_CHUNKS: u32 = 16;

/// SYN in the TCP header's flags byte.
const TCP_FLAG_SYN: u8 = 0x02;
const EVENT_HEADER: u64 = core::mem::size_of::<tollgate_common::DnsEvent>() as u64;

#[cgroup_skb(ingress)]
pub fn tollgate_dns_ingress(ctx: SkBuffContext) -> i32 {
    inspect(&ctx, &TG_DNS_SCRATCH, Learner::Kernel);
    1
}

/// The agent's fallback where a kernel refuses `tollgate_dns_ingress`:
/// hands every answer from a trusted resolver to the agent unparsed, and
/// the agent learns from it. It has a scratch value of its own, so that it
/// shares no map with the program it stands in for but the ring buffer.
#[cgroup_skb(ingress)]
pub fn tollgate_dns_forward(ctx: SkBuffContext) -> i32 {
    inspect(&ctx, &TG_DNS_FORWARD, Learner::Agent);
    1
}

/// Who parses UDP answers and installs their addresses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Learner {
    Kernel,
    Agent,
}

/// Where a packet came from and where its payload is.
struct Segment {
    family: u8,
    protocol: u8,
    /// Network order.
    source: [u8; 16],
    source_port: u16,
    payload_offset: u32,
    payload_len: u32,
    tcp_seq: u32,
    /// A TCP SYN: where the resolver's stream starts.
    tcp_syn: bool,
}

#[inline(always)]
fn inspect(ctx: &SkBuffContext, scratch_map: &PerCpuArray<DnsScratch>, learner: Learner) {
    let Some(segment) = segment(ctx) else {
        return;
    };
    let resolver = ResolverKey {
        addr: segment.source,
        port: segment.source_port,
        family: segment.family,
        _pad: 0,
    };
    if TG_DNS_TRUSTED.get_ptr(&resolver).is_none() {
        if segment.source_port == DNS_PORT {
            count(counter::DNS_UNTRUSTED);
        }
        return;
    }
    let Some(scratch_ptr) = scratch_map.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU value is this program's alone while it runs. The
    // learning steps reach it through lookups of their own, so no reference
    // to it is held across their calls (`learn` takes the pointer).
    let scratch = unsafe { &mut *scratch_ptr };
    let skb = ctx.as_ptr() as *mut aya_ebpf::bindings::__sk_buff;
    let event = &mut scratch.event;
    event.kind = event_kind::DNS;
    event.flags = refusal(ctx, &segment, &resolver);
    // SAFETY: helpers without preconditions beyond a valid skb.
    unsafe {
        event.ts_ns = bpf_ktime_get_ns();
        event.cgroup_id = bpf_skb_cgroup_id(skb);
        event.socket_cookie = bpf_get_socket_cookie(skb as *mut _);
    }
    event.resolver_addr = segment.source;
    event.resolver_port = segment.source_port;
    event.family = segment.family;
    event.protocol = segment.protocol;
    event.tcp_seq = segment.tcp_seq;
    event.message_len = segment.payload_len.min(u16::MAX as u32) as u16;
    event.learned = 0;
    event._pad = 0;

    if segment.protocol == protocol::TCP && segment.tcp_syn {
        // The agent frames only streams it saw start: read from anywhere
        // else, bytes the peer chose could pass for an answer.
        scratch.event.flags |= dns_flags::TCP | dns_flags::TCP_SYN | dns_flags::TO_USERSPACE;
        scratch.event.message_len = 0;
        scratch.event.payload_len = 0;
        output(scratch, 0);
        return;
    }
    if segment.protocol == protocol::TCP {
        // A stream: the agent reassembles it and learns.
        count(counter::DNS_TO_USERSPACE);
        scratch.event.flags |= dns_flags::TCP | dns_flags::TO_USERSPACE;
        for chunk in 0..TCP_CHUNKS {
            let done = chunk * MESSAGE_MAX as u32;
            if done >= segment.payload_len {
                break;
            }
            scratch.event.tcp_seq = segment.tcp_seq.wrapping_add(done);
            let len = (segment.payload_len - done).min(MESSAGE_MAX as u32);
            if !copy_payload(skb, scratch, segment.payload_offset + done, len) {
                return;
            }
            output(scratch, len);
        }
        return;
    }

    count(counter::DNS_ANSWERS);
    let len = segment.payload_len.min(MESSAGE_MAX as u32);
    if !copy_payload(skb, scratch, segment.payload_offset, len) {
        return;
    }
    if scratch.event.flags & REFUSED == 0 && queries_recorded() && !query_was_sent(scratch) {
        scratch.event.flags |= dns_flags::NOT_ASKED;
    }
    if scratch.event.flags & REFUSED != 0 {
        count(if scratch.event.flags & dns_flags::VIA_LOOPBACK != 0 {
            counter::DNS_VIA_LOOPBACK
        } else {
            counter::DNS_NOT_ASKED
        });
    } else if segment.payload_len > MESSAGE_MAX as u32 {
        count(counter::DNS_TO_USERSPACE);
        scratch.event.flags |= dns_flags::CLIPPED | dns_flags::TO_USERSPACE;
    } else if learner == Learner::Agent {
        count(counter::DNS_TO_USERSPACE);
        scratch.event.flags |= dns_flags::TO_USERSPACE;
    } else {
        learn(scratch_ptr);
    }
    // SAFETY: as above; the learning steps have returned.
    output(unsafe { &*scratch_ptr }, len);
}

/// Whether the packet hook records queries (`Config::queries_recorded`):
/// without it, answers are tied to their socket only.
#[inline(always)]
fn queries_recorded() -> bool {
    TG_CONFIG
        .get_ptr(0)
        // SAFETY: plain read of the config value.
        .is_some_and(|config| unsafe { (*config).queries_recorded } != 0)
}

/// The flags that refuse an answer, whatever it says.
const REFUSED: u16 = dns_flags::NOT_ASKED | dns_flags::VIA_LOOPBACK;

/// The loopback device's index, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// [`dns_flags::NOT_ASKED`] when the receiving socket never asked a
/// trusted resolver from its endpoint's network namespace;
/// [`dns_flags::VIA_LOOPBACK`] when the answer came over loopback from a
/// resolver that is not a loopback address, to a socket outside the host's
/// network namespace; else 0.
#[inline(always)]
fn refusal(ctx: &SkBuffContext, segment: &Segment, resolver: &ResolverKey) -> u16 {
    let skb = ctx.as_ptr() as *mut aya_ebpf::bindings::__sk_buff;
    // SAFETY: helper without preconditions beyond a valid skb.
    let cookie = unsafe { bpf_get_socket_cookie(skb as *mut _) };
    // SAFETY: a plain lookup; the value is copied out at once.
    let Some(socket_netns) = (unsafe { TG_DNS_SOCKETS.get(&cookie) }).copied() else {
        return dns_flags::NOT_ASKED;
    };
    // SAFETY: a context field the verifier allows for cgroup_skb.
    let ingress_ifindex = unsafe { (*skb).ingress_ifindex };
    if ingress_ifindex == LOOPBACK_IFINDEX && !is_loopback(segment.family, &resolver.addr) {
        let host_netns = TG_CONFIG
            .get_ptr(0)
            // SAFETY: plain read of the config value.
            .map_or(0, |config| unsafe { (*config).host_netns_cookie });
        if host_netns == 0 || socket_netns != host_netns {
            return dns_flags::VIA_LOOPBACK;
        }
    }
    0
}

#[inline(always)]
fn is_loopback(family: u8, addr: &[u8; 16]) -> bool {
    if family == family::INET {
        addr[0] == 127
    } else {
        addr[..15].iter().all(|b| *b == 0) && addr[15] == 1
    }
}

/// Whether the socket sent a query with this UDP answer's id to its
/// resolver within the window (the question is compared where the answer
/// is parsed: `tg_dns_match_query`, or by the agent).
#[inline(always)]
fn query_was_sent(scratch: &DnsScratch) -> bool {
    let id = u16::from_be_bytes([scratch.payload[0], scratch.payload[1]]);
    let key = QueryKey {
        socket_cookie: scratch.event.socket_cookie,
        id,
        _pad: [0; 6],
    };
    // SAFETY: a plain lookup of a value read in place, then dropped.
    match unsafe { TG_DNS_QUERIES.get(&key) } {
        Some(query) => {
            query.resolver.addr == scratch.event.resolver_addr
                && query.resolver.port == scratch.event.resolver_port
                && query.resolver.family == scratch.event.family
                && scratch.event.ts_ns.wrapping_sub(query.sent_ns) < QUERY_WINDOW_NS
        }
        None => false,
    }
}

/// Copies `len` (1..=MESSAGE_MAX) payload bytes into the scratch payload.
#[inline(always)]
fn copy_payload(
    skb: *mut aya_ebpf::bindings::__sk_buff,
    scratch: &mut DnsScratch,
    offset: u32,
    len: u32,
) -> bool {
    if len == 0 || len > MESSAGE_MAX as u32 {
        return false;
    }
    let len = bounded_len(len);
    scratch.event.payload_len = len as u16;
    // SAFETY: the destination holds MESSAGE_MAX bytes and len is within it.
    let copied = unsafe {
        bpf_skb_load_bytes(
            skb as *const _,
            offset,
            scratch.payload.as_mut_ptr() as *mut _,
            len,
        )
    };
    copied == 0
}

/// `len` (1..=MESSAGE_MAX) unchanged, in a form whose bounds the verifier
/// sees whatever register the compiler keeps it in. The compiler knows the
/// mask changes nothing and would drop it; `black_box` keeps it.
#[inline(always)]
fn bounded_len(len: u32) -> u32 {
    ((core::hint::black_box(len).wrapping_sub(1)) & (MESSAGE_MAX as u32 - 1)) + 1
}

#[inline(always)]
fn output(scratch: &DnsScratch, payload_len: u32) {
    let size = match payload_len {
        0 => EVENT_HEADER,
        len => EVENT_HEADER + bounded_len(len) as u64,
    };
    // An answer only the agent can learn from wakes it at once; the rest
    // (names for flow records, DNS records) waits for the batch, like flows.
    let wakeup = if scratch.event.flags & dns_flags::TO_USERSPACE != 0 {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        batched_wakeup()
    };
    // SAFETY: the event header and the payload are contiguous in the
    // scratch value (asserted in tollgate_common) and `size` is within it.
    let result = unsafe {
        bpf_ringbuf_output(
            core::ptr::addr_of!(TG_EVENTS) as *mut _,
            scratch as *const DnsScratch as *mut _,
            size,
            wakeup,
        )
    };
    if result != 0 {
        count(counter::RINGBUF_RESERVE_FAILED);
    }
}

/// The IP and UDP/TCP headers of an ingress packet (`skb->data` is the
/// network header for cgroup programs), or `None` for a packet no resolver
/// could have sent. IPv6 extension headers are not walked: such answers
/// are not learned from.
///
/// The program runs on every packet an endpoint receives, so it reads the
/// source port before anything else and leaves at once unless the port is
/// 53 (counted when untrusted) or a trusted resolver's: the agent writes
/// every trusted resolver's port to `Config::dns_ports` before it trusts
/// the resolver.
#[inline(always)]
fn segment(ctx: &SkBuffContext) -> Option<Segment> {
    let (family, protocol, transport, source_port) = transport_port(ctx, 0)?;
    if protocol != protocol::UDP && protocol != protocol::TCP {
        return None;
    }
    if source_port != DNS_PORT && !is_dns_port(&dns_ports()?, source_port) {
        return None;
    }
    let mut source = [0u8; 16];
    if family == family::INET {
        let v4: [u8; 4] = ctx.load(12).ok()?;
        source[..4].copy_from_slice(&v4);
    } else {
        source = ctx.load(8).ok()?;
    }
    let (payload_offset, tcp_seq, tcp_syn) = if protocol == protocol::UDP {
        (transport + 8, 0, false)
    } else {
        let seq = u32::from_be(ctx.load::<u32>(transport as usize + 4).ok()?);
        let data_offset: u8 = ctx.load(transport as usize + 12).ok()?;
        let flags: u8 = ctx.load(transport as usize + 13).ok()?;
        (
            transport + ((data_offset >> 4) as u32) * 4,
            seq,
            flags & TCP_FLAG_SYN != 0,
        )
    };
    let payload_len = ctx.len().checked_sub(payload_offset)?;
    if payload_len == 0 && !tcp_syn {
        return None;
    }
    Some(Segment {
        family,
        protocol,
        source,
        source_port,
        payload_offset,
        payload_len,
        tcp_seq,
        tcp_syn,
    })
}

/// The family, IP protocol and transport header offset of an IP packet,
/// with the port at `port_at` in its transport header (0: the source port,
/// 2: the destination port), in host order.
///
/// These programs run on every packet an endpoint sends or receives, and
/// most leave after this. So where the headers are in the packet's linear
/// part at fixed offsets (IPv6, or IPv4 without options), they are read in
/// place after one bounds check, instead of a `skb_load_bytes` call each.
#[inline(always)]
fn transport_port(ctx: &SkBuffContext, port_at: usize) -> Option<(u8, u8, u32, u16)> {
    if let Some(ip) = linear::<{ IPV4_HEADER + 4 }>(ctx) {
        // Each family's reads are written out with constant offsets: the
        // verifier follows a bounds check to reads at known offsets only.
        // SAFETY (each read): inside the checked window; `port_at` is 0 or 2.
        let first = unsafe { *ip };
        if first == 0x45 {
            let protocol = unsafe { *ip.add(9) };
            let port = unsafe { ip.add(IPV4_HEADER + port_at).cast::<u16>().read_unaligned() };
            return Some((
                family::INET,
                protocol,
                IPV4_HEADER as u32,
                u16::from_be(port),
            ));
        }
        if first >> 4 == 6
            && let Some(ip) = linear::<{ IPV6_HEADER + 4 }>(ctx)
        {
            let protocol = unsafe { *ip.add(6) };
            let port = unsafe { ip.add(IPV6_HEADER + port_at).cast::<u16>().read_unaligned() };
            return Some((
                family::INET6,
                protocol,
                IPV6_HEADER as u32,
                u16::from_be(port),
            ));
        }
    }
    let first: u8 = ctx.load(0).ok()?;
    let (family, protocol_at, transport) = match first >> 4 {
        4 => (family::INET, 9, ((first & 0x0f) as u32) * 4),
        6 => (family::INET6, 6, IPV6_HEADER as u32),
        _ => return None,
    };
    let protocol = ctx.load(protocol_at).ok()?;
    let port = ctx.load::<u16>(transport as usize + port_at).ok()?;
    Some((family, protocol, transport, u16::from_be(port)))
}

const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;

/// The network header, if the packet's linear part holds its first `LEN`
/// bytes. `LEN` is a constant so that the verifier can follow the check.
#[inline(always)]
fn linear<const LEN: usize>(ctx: &SkBuffContext) -> Option<*const u8> {
    let skb = ctx.skb.skb;
    // SAFETY: `data` and `data_end` are context fields the verifier allows
    // cgroup_skb programs to read.
    let (start, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    if start + LEN > end {
        return None;
    }
    Some(start as *const u8)
}

/// The trusted resolvers' ports (`Config::dns_ports`).
#[inline(always)]
fn dns_ports() -> Option<[u16; DNS_PORTS]> {
    let config = TG_CONFIG.get_ptr(0)?;
    // SAFETY: plain read of the config value.
    Some(unsafe { (*config).dns_ports })
}

/// What a learning step tells its caller.
const STOP: u32 = 0;
const GO_ON: u32 = 1;

/// Which scratch value a parsing step works on: the ingress program's
/// (answers) or the packet hook's (queries, `record_query`). Each program
/// reaches only its own map, so a kernel that refuses one map's use
/// (or the parser in one program) leaves the other program as it is.
const INGRESS: u32 = 0;
const EGRESS: u32 = 1;

/// A scratch value, for the global functions below, which older kernels
/// (before 5.12) let take scalars only.
#[inline(always)]
fn scratch(which: u32) -> Option<&'static mut DnsScratch> {
    // SAFETY (both): the per-CPU value is its program's alone while it runs.
    if which == EGRESS {
        TG_DNS_QUERY_SCRATCH
            .get_ptr_mut(0)
            .map(|p| unsafe { &mut *p })
    } else {
        TG_DNS_SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
    }
}

/// Parses the answer in the scratch payload and installs its addresses for
/// the receiving endpoint, for every FQDN pattern its question matches.
///
/// Each step is a global function (`no_mangle`, `extern "C"`): the
/// verifier checks it once, on its own, knowing nothing of its arguments,
/// and the caller goes on from one state whatever happened inside. The
/// work is then the sum of the steps instead of their product, which the
/// older verifiers of 5.10 to 6.8 need, and each step's stack frame is its
/// own (kernels before 6.9 round every frame of a call chain up to 32
/// bytes and refuse a chain over 512).
#[inline(always)]
fn learn(scratch: *mut DnsScratch) {
    if tg_dns_question() == STOP || tg_dns_question_end() == STOP {
        return;
    }
    if queries_recorded() && tg_dns_match_query() == STOP {
        count(counter::DNS_NOT_ASKED);
        return;
    }
    let Some(config) = TG_CONFIG.get_ptr(0) else {
        return;
    };
    // SAFETY (every access to `scratch` here): plain places of the scratch
    // value, reached through the raw pointer, so the compiler assumes the
    // steps' calls may change them, as they do.
    // SAFETY: plain read of the config value.
    let generation = unsafe { (*config).generation };
    let endpoint = EndpointKey {
        cgroup_id: unsafe { (*scratch).event.cgroup_id },
        half: generation & 1,
        _pad: 0,
    };
    let Some(endpoint) = TG_ENDPOINTS.get_ptr(&endpoint) else {
        return;
    };
    // SAFETY: value pointer of a successful lookup.
    if unsafe { (*endpoint).flags } & endpoint_flags::FQDN_RULES == 0 {
        return;
    }
    unsafe { (*scratch).event.flags |= dns_flags::ENDPOINT_FQDN };
    if unsafe { (*scratch).header.rcode } != dns::RCODE_NOERROR {
        return;
    }
    if answers(scratch) == STOP {
        return;
    }
    unsafe { (*scratch).pattern_count = 0 };
    for label in 0..MAX_LABELS as u32 {
        if tg_dns_match_label(label) == STOP {
            break;
        }
    }
    if unsafe { (*scratch).pattern_count } == 0 {
        return;
    }
    unsafe { (*scratch).event.learned = 0 };
    for index in 0..MAX_ANSWERS as u32 {
        if tg_dns_install(index) == STOP {
            break;
        }
    }
    let learned = unsafe { (*scratch).event.learned };
    add(counter::DNS_ADDRESSES_LEARNED, learned as u64);
    if learned != 0 {
        unsafe { (*scratch).event.flags |= dns_flags::LEARNED };
    }
}

/// Runs a parsing step on the scratch value and its payload's length:
/// GO_ON if it succeeds, STOP with the error flagged if it fails.
#[inline(always)]
fn parse_step(
    which: u32,
    step: impl FnOnce(&mut DnsScratch, usize) -> Result<(), dns::Error>,
) -> u32 {
    let Some(s) = scratch(which) else {
        return STOP;
    };
    let len = s.event.payload_len as usize;
    match step(s, len) {
        Ok(()) => GO_ON,
        Err(e) => {
            // A query that cannot be read is not recorded; nothing to count.
            if which == INGRESS {
                flag_error(s, e);
            }
            STOP
        }
    }
}

/// Reads the header and question name of the answer in the scratch
/// payload into the scratch value, the name lowercased as a lookup key.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tg_dns_question() -> u32 {
    question(INGRESS, dns::Message::Answer)
}

/// [`tg_dns_question`] for the query in the packet hook's scratch value.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tg_dns_query_question() -> u32 {
    question(EGRESS, dns::Message::Query)
}

#[inline(always)]
fn question(which: u32, kind: dns::Message) -> u32 {
    parse_step(which, |s, len| {
        // Key reads past the name must find zeros (see dns::NAME_BUF).
        // Word stores: a byte-wise memset would cost the verifier 8 times
        // more.
        let words = s.name.as_mut_ptr() as *mut u64;
        for i in 0..dns::NAME_BUF / 8 {
            // SAFETY: within the name buffer; BPF stores to map values need
            // no alignment.
            unsafe { core::ptr::write_volatile(words.add(i), 0) };
        }
        s.question = dns::Question::default();
        s.header = dns::question_name(&s.payload, len, &mut s.name, &mut s.question, kind)?;
        Ok(())
    })
}

/// Completes the question in the scratch value: zeros after the name, its
/// type and class (`dns::finish_question`).
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tg_dns_question_end() -> u32 {
    parse_step(INGRESS, |s, len| {
        dns::finish_question(&s.payload, len, &mut s.name, &mut s.question)
    })
}

/// [`tg_dns_question_end`] for the query in the packet hook's scratch value.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tg_dns_query_question_end() -> u32 {
    parse_step(EGRESS, |s, len| {
        dns::finish_question(&s.payload, len, &mut s.name, &mut s.question)
    })
}

/// GO_ON if the socket sent this answer's question, with its id, to its
/// resolver within the window: the query is then used up, so no second
/// answer, forged or repeated, teaches from it. STOP, flagged
/// [`dns_flags::NOT_ASKED`], if not.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tg_dns_match_query() -> u32 {
    let Some(s) = scratch(INGRESS) else {
        return STOP;
    };
    let key = QueryKey {
        socket_cookie: s.event.socket_cookie,
        id: s.header.id,
        _pad: [0; 6],
    };
    let Some(query) = TG_DNS_QUERIES.get_ptr(&key) else {
        s.event.flags |= dns_flags::NOT_ASKED;
        return STOP;
    };
    // SAFETY: value pointer of a successful lookup; a concurrent rewrite
    // (the same socket asking again with the same id) can only make the
    // comparison fail.
    let asked = unsafe { &*query };
    let mut same = asked.qtype == s.question.qtype
        && asked.qclass == s.question.qclass
        && asked.resolver.addr == s.event.resolver_addr
        && asked.resolver.port == s.event.resolver_port
        && asked.resolver.family == s.event.family
        && s.event.ts_ns.wrapping_sub(asked.sent_ns) < QUERY_WINDOW_NS;
    // Whole names, a word at a time: both are zero-padded wire form.
    let asked_name = asked.name.wire.as_ptr() as *const u64;
    let answered_name = s.name.as_ptr() as *const u64;
    for word in 0..dns::NAME_KEY / 8 {
        // SAFETY: within both names (NAME_KEY bytes; NAME_BUF for ours).
        let (a, b) = unsafe {
            (
                asked_name.add(word).read_unaligned(),
                answered_name.add(word).read_unaligned(),
            )
        };
        same &= a == b;
    }
    if !same {
        s.event.flags |= dns_flags::NOT_ASKED;
        return STOP;
    }
    let _ = TG_DNS_QUERIES.remove(&key);
    GO_ON
}

/// Reads the addresses of the answer section into the scratch value, one
/// record per step; STOP if there are none or the answer cannot be learned
/// from.
#[inline(always)]
fn answers(scratch: *mut DnsScratch) -> u32 {
    // SAFETY: plain places of the scratch value, through the raw pointer:
    // the steps change it.
    unsafe { dns::start_answers(&(*scratch).question, &mut (*scratch).found) };
    for i in 0..MAX_ANSWERS as u32 {
        if i >= unsafe { (*scratch).header.answer_count } as u32 {
            break;
        }
        if tg_dns_answer_record() == STOP {
            return STOP;
        }
    }
    if unsafe { (*scratch).found.count } == 0 {
        STOP
    } else {
        GO_ON
    }
}

/// Reads the answer record at the scratch value's cursor
/// (`dns::answer_record`); STOP if the answer cannot be learned from.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tg_dns_answer_record() -> u32 {
    parse_step(INGRESS, |s, len| {
        dns::answer_record(&s.payload, len, &mut s.found)
    })
}

#[inline(always)]
fn flag_error(scratch: &mut DnsScratch, error: dns::Error) {
    match error {
        dns::Error::NotAnAnswer => {}
        dns::Error::Malformed => {
            count(counter::DNS_MALFORMED);
            scratch.event.flags |= dns_flags::MALFORMED;
        }
        dns::Error::Unsupported(_) => {
            count(counter::DNS_TO_USERSPACE);
            scratch.event.flags |= dns_flags::TO_USERSPACE;
        }
    }
}

/// Adds the patterns that the question name matches from its label `label`
/// on: the whole name (label 0) for exact patterns, the name less its first
/// label for `*.` and `**.`, and less two or more labels for `**.`. Each
/// lookup compares a whole name. STOP past the last label.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tg_dns_match_label(label: u32) -> u32 {
    let Some(s) = scratch(INGRESS) else {
        return STOP;
    };
    if label >= s.question.label_count as u32 {
        return STOP;
    }
    let offset = s.question.label_offsets[label as usize & (MAX_LABELS - 1)] as usize & 0xff;
    // SAFETY: offset <= 255 and the buffer holds NAME_BUF = 512 bytes, so
    // the NAME_KEY = 256 byte key is within it.
    let key = unsafe { &*(s.name.as_ptr().add(offset) as *const FqdnName) };
    // SAFETY: plain lookup; the value is copied out at once.
    let Some(ids) = (unsafe { TG_FQDN_NAMES.get(key) }).copied() else {
        return GO_ON;
    };
    if label == 0 {
        push_pattern(s, ids.exact);
    } else {
        if label == 1 {
            push_pattern(s, ids.one_label);
        }
        push_pattern(s, ids.any_labels);
    }
    GO_ON
}

/// Adds a pattern id to the scratch value's distinct patterns, at most a
/// learned entry's worth.
#[inline(always)]
fn push_pattern(s: &mut DnsScratch, id: u32) {
    if id == 0 {
        return;
    }
    let len = s.pattern_count as usize;
    for i in 0..LEARNED_SLOTS {
        if i < len && s.patterns[i] == id {
            return;
        }
    }
    if len >= LEARNED_SLOTS {
        count(counter::FQDN_SLOTS_FULL);
        return;
    }
    s.patterns[len] = id;
    s.pattern_count += 1;
}

/// Installs or refreshes answer address `index` for the receiving endpoint
/// under every matched pattern, counting it in `event.learned`. STOP past
/// the last address.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tg_dns_install(index: u32) -> u32 {
    let Some(s) = scratch(INGRESS) else {
        return STOP;
    };
    if index >= s.found.count {
        return STOP;
    }
    let Some(config) = TG_CONFIG.get_ptr(0) else {
        return STOP;
    };
    // SAFETY: plain reads of the config value.
    let (ttl_min, ttl_max) = unsafe { ((*config).fqdn_ttl_min_s, (*config).fqdn_ttl_max_s) };
    let now = s.event.ts_ns;
    let pattern_count = s.pattern_count as usize;
    let address = &s.found.addresses[index as usize & (MAX_ANSWERS - 1)];
    let ttl = dns::learned_ttl(address.ttl, ttl_min, ttl_max);
    let expires_ns = now + ttl as u64 * 1_000_000_000;
    let key = LearnedKey {
        cgroup_id: s.event.cgroup_id,
        addr: address.addr,
        family: address.family,
        _pad: [0; 7],
    };
    if let Some(value) = TG_FQDN_LEARNED.get_ptr_mut(&key) {
        for p in 0..LEARNED_SLOTS {
            if p < pattern_count {
                // SAFETY: value pointer of a successful lookup.
                unsafe { refresh(&mut (*value).slots, s.patterns[p], now, expires_ns) };
            }
        }
    } else {
        let mut value = LearnedValue::default();
        for p in 0..LEARNED_SLOTS {
            if p < pattern_count {
                value.slots[p] = LearnedSlot {
                    pattern_id: s.patterns[p],
                    _pad: 0,
                    expires_ns,
                };
            }
        }
        if TG_FQDN_LEARNED
            .insert(&key, &value, BPF_ANY as u64)
            .is_err()
        {
            count(counter::FQDN_LEARN_FAILED);
            return GO_ON;
        }
    }
    s.event.learned += 1;
    GO_ON
}

/// Extends the pattern's slot, or takes a free or expired one. A reused
/// slot gets its pattern before its expiry: a connect reading it halfway
/// sees an expired slot, never an old pattern with a new lifetime.
#[inline(always)]
fn refresh(slots: &mut [LearnedSlot; LEARNED_SLOTS], pattern_id: u32, now: u64, expires_ns: u64) {
    for s in 0..LEARNED_SLOTS {
        if slots[s].pattern_id == pattern_id {
            if slots[s].expires_ns < expires_ns {
                slots[s].expires_ns = expires_ns;
            }
            return;
        }
    }
    for s in 0..LEARNED_SLOTS {
        if slots[s].pattern_id == 0 || slots[s].expires_ns <= now {
            // SAFETY: plain stores into the map value, in this order.
            unsafe {
                core::ptr::write_volatile(&mut slots[s].pattern_id, pattern_id);
                core::ptr::write_volatile(&mut slots[s].expires_ns, expires_ns);
            }
            return;
        }
    }
    count(counter::FQDN_SLOTS_FULL);
}

/// Notes a socket of cgroup `cgroup_id` that a sock_addr hook lets connect
/// or send to `dst`, if `dst` is a trusted resolver: its queries will be
/// recorded and their answers may teach. Not if the socket lives outside
/// the endpoint's network namespace (when the agent knows it): a process
/// that makes a namespace of its own, with the resolver's address in it,
/// must not be able to answer itself.
#[inline(always)]
pub fn note_resolver_socket(ctx: &SockAddrContext, cgroup_id: u64, dst: &Destination) {
    let Some(config) = TG_CONFIG.get_ptr(0) else {
        return;
    };
    // SAFETY: plain read of the config value.
    if !is_dns_port(unsafe { &(*config).dns_ports }, dst.port) {
        return;
    }
    let resolver = ResolverKey {
        addr: address_bytes(dst.family, &dst.addr),
        port: dst.port,
        family: dst.family,
        _pad: 0,
    };
    if TG_DNS_TRUSTED.get_ptr(&resolver).is_none() {
        return;
    }
    // SAFETY: helpers without preconditions beyond a valid context.
    let (cookie, netns) = unsafe {
        (
            bpf_get_socket_cookie(ctx.as_ptr()),
            bpf_get_netns_cookie(ctx.as_ptr()),
        )
    };
    // SAFETY: a plain lookup; the value is copied out at once.
    if let Some(expected) = (unsafe { TG_ENDPOINT_NETNS.get(&cgroup_id) }).copied()
        && expected != netns
    {
        count(counter::DNS_FOREIGN_NETNS);
        let _ = TG_DNS_SOCKETS.remove(&cookie);
        return;
    }
    let _ = TG_DNS_SOCKETS.insert(&cookie, &netns, BPF_ANY as u64);
}

/// Records the question of a DNS query that a noted socket sends to a
/// trusted resolver (the packet hook calls it for each datagram of a UDP
/// socket; all but datagrams to a resolver port leave once their port is
/// read, `transport_port`).
#[inline(always)]
pub fn record_query(ctx: &SkBuffContext) {
    let Some((family, _, transport, port)) = transport_port(ctx, 2) else {
        return;
    };
    if !dns_ports().is_some_and(|ports| is_dns_port(&ports, port)) {
        return;
    }
    let mut addr = [0u8; 16];
    if family == family::INET {
        let Ok(daddr) = ctx.load::<[u8; 4]>(16) else {
            return;
        };
        addr[..4].copy_from_slice(&daddr);
    } else {
        let Ok(daddr) = ctx.load::<[u8; 16]>(24) else {
            return;
        };
        addr = daddr;
    }
    let skb = ctx.as_ptr() as *mut aya_ebpf::bindings::__sk_buff;
    // SAFETY: helper without preconditions beyond a valid skb.
    let cookie = unsafe { bpf_get_socket_cookie(skb as *mut _) };
    if TG_DNS_SOCKETS.get_ptr(&cookie).is_none() {
        return;
    }
    let resolver = ResolverKey {
        addr,
        port,
        family,
        _pad: 0,
    };
    if TG_DNS_TRUSTED.get_ptr(&resolver).is_none() {
        return;
    }
    let Some(s) = scratch(EGRESS) else {
        return;
    };
    let Some(len) = ctx.len().checked_sub(transport + 8) else {
        return;
    };
    if !copy_payload(skb, s, transport + 8, len.min(MESSAGE_MAX as u32)) {
        return;
    }
    s.query_key = QueryKey {
        socket_cookie: cookie,
        id: 0,
        _pad: [0; 6],
    };
    s.query.resolver = resolver;
    // SAFETY: helper without preconditions.
    s.query.sent_ns = unsafe { bpf_ktime_get_ns() };
    if tg_dns_query_question() == STOP || tg_dns_query_question_end() == STOP {
        return;
    }
    tg_dns_record_query();
}

/// Stores the query read into the packet hook's scratch value.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tg_dns_record_query() -> u32 {
    let Some(s) = scratch(EGRESS) else {
        return STOP;
    };
    let from = s.name.as_ptr() as *const u64;
    let to = s.query.name.wire.as_mut_ptr() as *mut u64;
    for word in 0..dns::NAME_KEY / 8 {
        // SAFETY: within both names (NAME_KEY bytes; NAME_BUF for ours).
        unsafe {
            to.add(word)
                .write_unaligned(from.add(word).read_unaligned())
        };
    }
    s.query.qtype = s.question.qtype;
    s.query.qclass = s.question.qclass;
    s.query_key.id = s.header.id;
    let _ = TG_DNS_QUERIES.insert(&s.query_key, &s.query, BPF_ANY as u64);
    GO_ON
}

/// Whether the IP packet whose header starts at `ip` claims to come from a
/// trusted resolver (UDP or TCP from its address and port): raw and packet
/// sockets could otherwise answer a query of another socket in the
/// resolver's name.
#[inline(always)]
pub fn spoofs_resolver(skb: &SkBuff, ip: usize) -> bool {
    let Ok(first) = skb.load::<u8>(ip) else {
        return false;
    };
    let (family, ip_protocol, transport, addr) = match first >> 4 {
        4 => {
            let (Ok(ip_protocol), Ok(saddr)) =
                (skb.load::<u8>(ip + 9), skb.load::<[u8; 4]>(ip + 12))
            else {
                return false;
            };
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&saddr);
            (
                family::INET,
                ip_protocol,
                ((first & 0x0f) as usize) * 4,
                addr,
            )
        }
        6 => {
            let (Ok(ip_protocol), Ok(addr)) =
                (skb.load::<u8>(ip + 6), skb.load::<[u8; 16]>(ip + 8))
            else {
                return false;
            };
            (family::INET6, ip_protocol, 40, addr)
        }
        _ => return false,
    };
    if ip_protocol != protocol::UDP && ip_protocol != protocol::TCP {
        return false;
    }
    let Ok(port) = skb.load::<u16>(ip + transport) else {
        return false;
    };
    let port = u16::from_be(port);
    if !dns_ports().is_some_and(|ports| is_dns_port(&ports, port)) {
        return false;
    }
    let resolver = ResolverKey {
        addr,
        port,
        family,
        _pad: 0,
    };
    TG_DNS_TRUSTED.get_ptr(&resolver).is_some()
}

#[inline(always)]
fn is_dns_port(ports: &[u16; DNS_PORTS], port: u16) -> bool {
    port != 0 && (ports[0] == port || ports[1] == port || ports[2] == port || ports[3] == port)
}

/// Network-order words as the bytes of a map key; IPv4 in the first four.
#[inline(always)]
fn address_bytes(dst_family: u8, words: &[u32; 4]) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&words[0].to_ne_bytes());
    if dst_family == family::INET6 {
        bytes[4..8].copy_from_slice(&words[1].to_ne_bytes());
        bytes[8..12].copy_from_slice(&words[2].to_ne_bytes());
        bytes[12..16].copy_from_slice(&words[3].to_ne_bytes());
    }
    bytes
}
