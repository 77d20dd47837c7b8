//! DNS learning: a `cgroup_skb` ingress program sees every packet arriving
//! at an endpoint's sockets. Answers from trusted resolvers are parsed here
//! (`tollgate_common::dns`), and when the question name matches an FQDN
//! pattern, the answer's addresses are installed for that endpoint before
//! the packet is queued to the socket, so before the application can read
//! it. Every answer is also reported to the agent, which learns what the
//! parser leaves to it (TCP, too large, too odd) and names flows.
//!
//! The program never drops a packet: DNS works whatever happens here.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_RB_FORCE_WAKEUP},
    helpers::{
        bpf_ktime_get_ns,
        generated::{
            bpf_get_socket_cookie, bpf_ringbuf_output, bpf_skb_cgroup_id, bpf_skb_load_bytes,
        },
    },
    macros::cgroup_skb,
    programs::SkBuffContext,
};
use tollgate_common::{
    DnsScratch, EndpointKey, FqdnName, LEARNED_SLOTS, LearnedKey, LearnedSlot, LearnedValue,
    ResolverKey, counter,
    dns::{self, MAX_ANSWERS, MAX_LABELS, MESSAGE_MAX},
    dns_flags, endpoint_flags, event_kind, family, protocol,
};

use crate::{
    maps::{
        TG_CONFIG, TG_DNS_SCRATCH, TG_DNS_TRUSTED, TG_ENDPOINTS, TG_EVENTS, TG_FQDN_LEARNED,
        TG_FQDN_NAMES,
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
    inspect(&ctx);
    1
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
fn inspect(ctx: &SkBuffContext) {
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
    let Some(scratch) = TG_DNS_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU value is this program's alone while it runs.
    let scratch = unsafe { &mut *scratch };
    let skb = ctx.as_ptr() as *mut aya_ebpf::bindings::__sk_buff;
    let event = &mut scratch.event;
    event.kind = event_kind::DNS;
    event.flags = 0;
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
        scratch.event.flags = dns_flags::TCP | dns_flags::TCP_SYN | dns_flags::TO_USERSPACE;
        scratch.event.message_len = 0;
        scratch.event.payload_len = 0;
        output(scratch, 0);
        return;
    }
    if segment.protocol == protocol::TCP {
        // A stream: the agent reassembles it and learns.
        count(counter::DNS_TO_USERSPACE);
        scratch.event.flags = dns_flags::TCP | dns_flags::TO_USERSPACE;
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
    if segment.payload_len > MESSAGE_MAX as u32 {
        count(counter::DNS_TO_USERSPACE);
        scratch.event.flags = dns_flags::CLIPPED | dns_flags::TO_USERSPACE;
    } else {
        learn(scratch);
    }
    output(scratch, len);
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
/// network header for cgroup programs). IPv6 extension headers are not
/// walked: such answers are not learned from.
#[inline(always)]
fn segment(ctx: &SkBuffContext) -> Option<Segment> {
    let first: u8 = ctx.load(0).ok()?;
    let (family, protocol, source, transport) = match first >> 4 {
        4 => {
            let ihl = ((first & 0x0f) as u32) * 4;
            let protocol: u8 = ctx.load(9).ok()?;
            let source: [u8; 4] = ctx.load(12).ok()?;
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&source);
            (family::INET, protocol, addr, ihl)
        }
        6 => {
            let protocol: u8 = ctx.load(6).ok()?;
            let source: [u8; 16] = ctx.load(8).ok()?;
            (family::INET6, protocol, source, 40)
        }
        _ => return None,
    };
    let source_port = u16::from_be(ctx.load::<u16>(transport as usize).ok()?);
    let (payload_offset, tcp_seq, tcp_syn) = match protocol {
        protocol::UDP => (transport + 8, 0, false),
        protocol::TCP => {
            let seq = u32::from_be(ctx.load::<u32>(transport as usize + 4).ok()?);
            let data_offset: u8 = ctx.load(transport as usize + 12).ok()?;
            let flags: u8 = ctx.load(transport as usize + 13).ok()?;
            (
                transport + ((data_offset >> 4) as u32) * 4,
                seq,
                flags & TCP_FLAG_SYN != 0,
            )
        }
        _ => return None,
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

/// Parses the answer in the scratch payload and installs its addresses for
/// the receiving endpoint, for every FQDN pattern its question matches.
///
/// Values that would otherwise reach a phase in many verifier states (the
/// payload length, the parsed question, the matched patterns) are stored in
/// the scratch value and read back with volatile loads: the verifier then
/// knows only their types, and checks each phase once instead of once per
/// way through the phases before it.
#[inline(always)]
fn learn(scratch: &mut DnsScratch) {
    // SAFETY: a plain field of the scratch value.
    let len = unsafe { core::ptr::read_volatile(&scratch.event.payload_len) } as usize;
    // Key reads past the name must find zeros (see dns::NAME_BUF). Volatile
    // word stores: a byte-wise memset would cost the verifier 8 times more.
    let words = scratch.name.as_mut_ptr() as *mut u64;
    for i in 0..dns::NAME_BUF / 8 {
        // SAFETY: within the name buffer; BPF stores to map values need no
        // alignment.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    let (header, question) = match dns::question(&scratch.payload, len, &mut scratch.name) {
        Ok(parsed) => parsed,
        Err(e) => return flag_error(scratch, e),
    };
    // The parse leaves the verifier with one state per way through the
    // name; stored and read back, every way continues as one.
    // SAFETY: plain fields of the scratch value.
    let (header, question) = unsafe {
        core::ptr::write_volatile(&mut scratch.header, header);
        core::ptr::write_volatile(&mut scratch.question, question);
        (
            core::ptr::read_volatile(&scratch.header),
            core::ptr::read_volatile(&scratch.question),
        )
    };

    let Some(config) = TG_CONFIG.get_ptr(0) else {
        return;
    };
    // SAFETY: plain read of the config value.
    let generation = unsafe { (*config).generation };
    let endpoint = EndpointKey {
        cgroup_id: scratch.event.cgroup_id,
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
    scratch.event.flags |= dns_flags::ENDPOINT_FQDN;
    if header.rcode != dns::RCODE_NOERROR {
        return;
    }
    match dns::answer_addresses(
        &scratch.payload,
        len,
        &header,
        &question,
        &mut scratch.found,
    ) {
        Ok(0) => return,
        Ok(_) => {}
        Err(e) => return flag_error(scratch, e),
    }
    let matched = matching_patterns(&scratch.name, &question);
    if matched.len == 0 {
        return;
    }
    // SAFETY: plain fields of the scratch value.
    unsafe {
        core::ptr::write_volatile(&mut scratch.patterns, matched.ids);
        core::ptr::write_volatile(&mut scratch.pattern_count, matched.len as u32);
        core::ptr::write_volatile(&mut scratch.event.learned, 0);
    }
    // Each round reads what it needs from the scratch value and the config,
    // so every round starts from the same verifier state.
    for i in 0..MAX_ANSWERS {
        // SAFETY: a plain field of the scratch value.
        let found = unsafe { core::ptr::read_volatile(&scratch.found.count) } as usize;
        if i >= found {
            break;
        }
        install(scratch, i);
    }
    // SAFETY: as above.
    let learned = unsafe { core::ptr::read_volatile(&scratch.event.learned) };
    add(counter::DNS_ADDRESSES_LEARNED, learned as u64);
    if learned != 0 {
        scratch.event.flags |= dns_flags::LEARNED;
    }
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

/// Distinct pattern ids, at most a learned entry's worth.
struct Patterns {
    ids: [u32; LEARNED_SLOTS],
    len: usize,
}

impl Patterns {
    #[inline(always)]
    fn push(&mut self, id: u32) {
        if id == 0 {
            return;
        }
        for i in 0..LEARNED_SLOTS {
            if i < self.len && self.ids[i] == id {
                return;
            }
        }
        if self.len >= LEARNED_SLOTS {
            count(counter::FQDN_SLOTS_FULL);
            return;
        }
        self.ids[self.len] = id;
        self.len += 1;
    }
}

/// The patterns the question name matches: the whole name for exact
/// patterns, the name less its first label for `*.` and `**.`, and the name
/// less two or more labels for `**.`. Each lookup compares a whole name.
#[inline(always)]
fn matching_patterns(name: &[u8; dns::NAME_BUF], question: &dns::Question) -> Patterns {
    let mut patterns = Patterns {
        ids: [0; LEARNED_SLOTS],
        len: 0,
    };
    for label in 0..MAX_LABELS {
        if label >= question.label_count as usize {
            break;
        }
        let offset = question.label_offsets[label] as usize & 0xff;
        // SAFETY: offset <= 255 and the buffer holds NAME_BUF = 512 bytes,
        // so the NAME_KEY = 256 byte key is within it.
        let key = unsafe { &*(name.as_ptr().add(offset) as *const FqdnName) };
        // SAFETY: plain lookup; the value is copied out at once.
        let Some(ids) = (unsafe { TG_FQDN_NAMES.get(key) }) else {
            continue;
        };
        if label == 0 {
            patterns.push(ids.exact);
        } else {
            if label == 1 {
                patterns.push(ids.one_label);
            }
            patterns.push(ids.any_labels);
        }
    }
    patterns
}

/// Installs or refreshes answer address `index` for the receiving endpoint
/// under every matched pattern, counting it in `event.learned`.
#[inline(always)]
fn install(scratch: &mut DnsScratch, index: usize) {
    let Some(config) = TG_CONFIG.get_ptr(0) else {
        return;
    };
    // SAFETY: plain reads of the config value and of scratch fields.
    let (ttl_min, ttl_max, now, pattern_count, patterns) = unsafe {
        (
            (*config).fqdn_ttl_min_s,
            (*config).fqdn_ttl_max_s,
            core::ptr::read_volatile(&scratch.event.ts_ns),
            core::ptr::read_volatile(&scratch.pattern_count) as usize,
            core::ptr::read_volatile(&scratch.patterns),
        )
    };
    let address = &scratch.found.addresses[index & (MAX_ANSWERS - 1)];
    let ttl = dns::learned_ttl(address.ttl, ttl_min, ttl_max);
    let expires_ns = now + ttl as u64 * 1_000_000_000;
    let key = LearnedKey {
        cgroup_id: scratch.event.cgroup_id,
        addr: address.addr,
        family: address.family,
        _pad: [0; 7],
    };
    if let Some(value) = TG_FQDN_LEARNED.get_ptr_mut(&key) {
        for p in 0..LEARNED_SLOTS {
            if p < pattern_count {
                // SAFETY: value pointer of a successful lookup.
                unsafe { refresh(&mut (*value).slots, patterns[p], now, expires_ns) };
            }
        }
    } else {
        let mut value = LearnedValue::default();
        for p in 0..LEARNED_SLOTS {
            if p < pattern_count {
                value.slots[p] = LearnedSlot {
                    pattern_id: patterns[p],
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
            return;
        }
    }
    // SAFETY: a plain field of the scratch value.
    unsafe {
        let learned = core::ptr::read_volatile(&scratch.event.learned);
        core::ptr::write_volatile(&mut scratch.event.learned, learned + 1);
    }
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
