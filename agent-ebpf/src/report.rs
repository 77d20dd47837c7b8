//! Counting and reporting decisions. At the sock_addr hooks, denied and
//! audit decisions are always reported; allowed ones are either counted
//! per flow in the kernel (the aggregate mode: the first of a flow in an
//! interval is reported, the agent reads the counts when the interval
//! ends), or reported at most once per interval per flow, or all reported.
//! A flow is a source cgroup, destination, port, protocol, rule and
//! verdict. At the packet hooks, where a flood is one decision per packet,
//! every verdict is reported once per flow and interval. Every event the
//! ring buffer cannot take is counted.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_ns,
        generated::bpf_get_current_comm,
    },
    maps::HashMap,
};
use tollgate_common::{
    AllowedCount, FlowDedupKey, FlowEvent, Hook, Verdict, allowed_counts, counter, event_kind,
    flow_flags,
};

use crate::{
    decide::{Destination, Judgement, add_atomic},
    maps::{TG_ALLOWED_A, TG_ALLOWED_B, TG_COUNTERS, TG_EVENTS, TG_FLOW_DEDUP, TG_RULE_HITS},
};

/// Unread ring-buffer bytes (about 600 events) from which a submit wakes
/// the agent. Below, the agent's own poll picks events up (every 10 ms), so
/// a busy node pays for one wakeup per batch, not one per connection.
const WAKEUP_THRESHOLD: u64 = 64 << 10;

/// Where a decision came from.
pub struct Origin {
    pub hook: Hook,
    pub cgroup_id: u64,
    pub socket_cookie: u64,
    pub sender: Sender,
}

/// Who sent, as far as the hook can know.
pub enum Sender {
    /// The sock_addr hooks run in the calling task: its ids and name.
    CurrentTask,
    /// A packet or frame hook can run in any context (a retransmission
    /// from a timer, a softirq), so it names no task: the socket owner's
    /// uid only (the overflow uid for a frame without a socket).
    SocketOwner { uid: u32 },
}

impl Origin {
    fn is_packet_hook(&self) -> bool {
        matches!(
            self.hook,
            Hook::Packet4 | Hook::Packet6 | Hook::Frame4 | Hook::Frame6
        )
    }
}

#[inline(always)]
pub fn count(index: u32) {
    add(index, 1);
}

#[inline(always)]
pub fn add(index: u32, n: u64) {
    if let Some(value) = TG_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; programs do not migrate while running.
        unsafe { *value += n };
    }
}

#[inline(always)]
pub fn decision(origin: &Origin, judgement: &Judgement, dst: &Destination) {
    count(match judgement.verdict {
        Verdict::Allowed => counter::ALLOWED,
        Verdict::Denied => counter::DENIED,
        Verdict::Audit => counter::AUDIT,
    });
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    count_rule_hit(judgement, now);

    let mut flags = judgement.flags;
    let counting = !origin.is_packet_hook() && judgement.verdict == Verdict::Allowed;
    if counting && judgement.allowed_counts != allowed_counts::OFF {
        let key = flow_key(origin, judgement, dst, true);
        let (half, in_b) = if judgement.allowed_counts == allowed_counts::IN_B {
            (&TG_ALLOWED_B, flow_flags::COUNTED_IN_B)
        } else {
            (&TG_ALLOWED_A, 0)
        };
        match count_allowed(half, &key, now) {
            Counted::Again => return,
            Counted::First => flags |= flow_flags::COUNTED | in_b,
            Counted::Full => count(counter::ALLOWED_COUNTS_FULL),
        }
    } else {
        let interval_ns = if origin.is_packet_hook() {
            judgement.packet_report_interval_ns
        } else if counting {
            judgement.allowed_report_interval_ns
        } else {
            0
        };
        if interval_ns != 0 && recently_reported(origin, judgement, dst, now, interval_ns) {
            count(if counting {
                counter::ALLOWED_DEDUPLICATED
            } else {
                counter::PACKETS_DEDUPLICATED
            });
            return;
        }
    }

    let Some(mut entry) = TG_EVENTS.reserve::<FlowEvent>(0) else {
        count(counter::RINGBUF_RESERVE_FAILED);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points to a reserved ring buffer record of the right
    // size; every field is written before submit, so no stale bytes leak.
    unsafe {
        (*event).kind = event_kind::FLOW;
        (*event).hook = origin.hook as u8;
        (*event).verdict = judgement.verdict as u8;
        (*event).mode = judgement.mode as u8;
        (*event).family = dst.family;
        (*event).protocol = dst.protocol;
        (*event).flags = flags;
        (*event).dst_port = dst.port;
        (*event).rule_id = judgement.rule_id;
        (*event).set_id = judgement.set_id;
        (*event).generation = judgement.generation;
        (*event).ts_ns = now;
        (*event).cgroup_id = origin.cgroup_id;
        (*event).socket_cookie = origin.socket_cookie;
        let addr = core::ptr::addr_of_mut!((*event).dst_addr) as *mut u32;
        addr.write_unaligned(dst.addr[0]);
        addr.add(1).write_unaligned(dst.addr[1]);
        addr.add(2).write_unaligned(dst.addr[2]);
        addr.add(3).write_unaligned(dst.addr[3]);
        let comm = core::ptr::addr_of_mut!((*event).comm) as *mut core::ffi::c_void;
        match origin.sender {
            Sender::CurrentTask => {
                (*event).pid_tgid = bpf_get_current_pid_tgid();
                (*event).uid_gid = bpf_get_current_uid_gid();
                if bpf_get_current_comm(comm, 16) != 0 {
                    core::ptr::write_bytes(comm as *mut u8, 0, 16);
                }
            }
            Sender::SocketOwner { uid } => {
                (*event).pid_tgid = 0;
                (*event).uid_gid = uid as u64;
                core::ptr::write_bytes(comm as *mut u8, 0, 16);
            }
        }
    }
    entry.submit(batched_wakeup());
}

/// Counts the decision in its rule's (or default's) slot of
/// `TG_RULE_HITS`: one inlined per-CPU array lookup and two stores, with
/// the time the decision already read.
#[inline(always)]
fn count_rule_hit(judgement: &Judgement, now: u64) {
    let Some(hits) = TG_RULE_HITS.get_ptr_mut(judgement.hits_id) else {
        count(counter::RULE_HITS_UNCOUNTED);
        return;
    };
    // SAFETY: per-CPU slot; programs do not migrate while running.
    unsafe {
        match judgement.verdict {
            Verdict::Allowed => (*hits).allowed += 1,
            Verdict::Denied => (*hits).denied += 1,
            Verdict::Audit => (*hits).audit += 1,
        }
        (*hits).last_hit_ns = now;
    }
}

/// The submit flag that wakes the agent only once [`WAKEUP_THRESHOLD`]
/// bytes are unread.
#[inline(always)]
pub fn batched_wakeup() -> u64 {
    let wakeup = if TG_EVENTS.query(BPF_RB_AVAIL_DATA.into()) >= WAKEUP_THRESHOLD {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    wakeup.into()
}

/// What counting an allowed decision in the counting half did.
enum Counted {
    /// Its flow was counted already this interval: one more.
    Again,
    /// It opened its flow's count: to be reported (the agent takes the
    /// flow's details from it).
    First,
    /// The half is full: reported by an event of its own.
    Full,
}

#[inline(always)]
fn count_allowed(
    half: &HashMap<FlowDedupKey, AllowedCount>,
    key: &FlowDedupKey,
    now: u64,
) -> Counted {
    let again = |value: *mut AllowedCount| {
        // SAFETY: value pointer from a successful lookup, aligned; the
        // count is added to atomically (other CPUs may count the same
        // flow), the time stored plainly (a racing store leaves one of two
        // nearly equal times).
        unsafe {
            add_atomic(core::ptr::addr_of_mut!((*value).count), 1);
            (*value).last_ns = now;
        }
        Counted::Again
    };
    if let Some(value) = half.get_ptr_mut(key) {
        return again(value);
    }
    let first = AllowedCount {
        count: 1,
        first_ns: now,
        last_ns: now,
    };
    if half.insert(key, &first, BPF_NOEXIST.into()).is_ok() {
        return Counted::First;
    }
    // Another CPU opened the flow first, or the half is full.
    match half.get_ptr_mut(key) {
        Some(value) => again(value),
        None => Counted::Full,
    }
}

/// A decision's flow; `counted` keys carry its mode, flags and generation.
#[inline(always)]
fn flow_key(
    origin: &Origin,
    judgement: &Judgement,
    dst: &Destination,
    counted: bool,
) -> FlowDedupKey {
    let mut dst_addr = [0u8; 16];
    let [a, b, c, d] = dst.addr;
    dst_addr[0..4].copy_from_slice(&a.to_ne_bytes());
    dst_addr[4..8].copy_from_slice(&b.to_ne_bytes());
    dst_addr[8..12].copy_from_slice(&c.to_ne_bytes());
    dst_addr[12..16].copy_from_slice(&d.to_ne_bytes());
    FlowDedupKey {
        cgroup_id: origin.cgroup_id,
        dst_addr,
        dst_port: dst.port,
        protocol: dst.protocol,
        family: dst.family,
        rule_id: judgement.rule_id,
        hook: origin.hook as u8,
        verdict: judgement.verdict as u8,
        mode: if counted { judgement.mode as u8 } else { 0 },
        flags: if counted { judgement.flags } else { 0 },
        generation: if counted { judgement.generation } else { 0 },
    }
}

/// True if the same flow was reported less than an interval ago;
/// otherwise records `now` as its last report.
#[inline(always)]
fn recently_reported(
    origin: &Origin,
    judgement: &Judgement,
    dst: &Destination,
    now: u64,
    interval_ns: u64,
) -> bool {
    let key = flow_key(origin, judgement, dst, false);
    if let Some(last) = TG_FLOW_DEDUP.get_ptr_mut(key) {
        // SAFETY: value pointer from a successful lookup; a racing update
        // only makes a report more or less likely, never unsafe.
        unsafe {
            if now.wrapping_sub(*last) < interval_ns {
                return true;
            }
            *last = now;
        }
        return false;
    }
    let _ = TG_FLOW_DEDUP.insert(key, now, 0);
    false
}
