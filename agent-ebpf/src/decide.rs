//! The decision: endpoint -> rule set -> one longest-prefix lookup -> the
//! port rules there, in precedence order, or the endpoint's default. For an
//! endpoint with FQDN rules, the rules of the patterns it learned the
//! destination for (from DNS answers, `dns.rs`) join in by precedence.
//!
//! The agent switches rule sets by generation: it writes changed rule sets
//! under fresh set ids and the endpoints into the inactive half of the
//! endpoints map, flips `TG_CONFIG.generation`, then deletes what only the
//! old generation used. A decision reads the (generation, mode) word, makes
//! its lookups in that generation's half and sets, and reads the word again.
//! What a generation uses is deleted or rewritten only after the word has
//! moved away from it, so if the two reads agree no lookup can have seen a
//! deletion, and the decision is wholly that generation's. If they differ,
//! it decides again with the new word, up to GENERATION_ATTEMPTS times.
//! (One exception: a change that is one entry of a set in force is written
//! over that entry before the flip. The kernel replaces the entry whole, so
//! decisions meet that one write as they would meet the flip.)

use core::sync::atomic::{Ordering, compiler_fence};

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use tollgate_common::{
    DecideScratch, EndpointKey, FqdnRuleKey, LEARNED_SLOTS, LearnedKey, MAX_PORT_RULES, Mode,
    RULE_ID_DEFAULT, RuleKeyV4, RuleKeyV6, RuleList, Verdict, action, capacity, counter,
    endpoint_flags, family, flow_flags, policy_mode,
};

use crate::{
    maps::{
        TG_CONFIG, TG_DECIDE_SCRATCH, TG_ENDPOINTS, TG_FQDN_LEARNED, TG_FQDN_RULES, TG_RULES_V4,
        TG_RULES_V6,
    },
    report,
};

/// Only a writer that flips the generation twice during one decision (two
/// whole switches, each with its syscalls, while one program runs) can
/// exhaust them; that is counted (`GENERATION_UNSTABLE`), not hidden.
/// [`tg_evaluate`] is a global function, verified once however often it is
/// called.
const GENERATION_ATTEMPTS: u32 = 2;

/// Where a connection goes, as the hook saw it.
pub struct Destination {
    /// Family the destination is judged as.
    pub family: u8,
    /// Network-order words; IPv4 in the first.
    pub addr: [u32; 4],
    /// Host order.
    pub port: u16,
    pub protocol: u8,
    pub flags: u8,
}

/// What one generation of the rules says about a connection.
struct Decision {
    action: u8,
    /// [`policy_mode`] of the deciding rule or default.
    mode: u8,
    rule_id: u32,
    set_id: u32,
    /// Slot of `TG_RULE_HITS` it counts in.
    hits_id: u32,
    /// [`flow_flags`] the decision adds.
    flags: u8,
}

/// A decision as the hooks report and enforce it.
pub struct Judgement {
    pub verdict: Verdict,
    pub mode: Mode,
    /// [`flow_flags`]: the destination's and the decision's.
    pub flags: u8,
    pub rule_id: u32,
    pub set_id: u32,
    /// Slot of `TG_RULE_HITS` the decision counts in: its rule id, or the
    /// default's (0, never reported, for a cgroup no policy selects).
    pub hits_id: u32,
    pub generation: u32,
    /// The config's report intervals (0: report every decision).
    pub allowed_report_interval_ns: u64,
    /// The config's [`tollgate_common::allowed_counts`].
    pub allowed_counts: u8,
    pub packet_report_interval_ns: u64,
}

/// Decides a connection or packet of cgroup `cgroup_id` to `dst` by the
/// generation in force.
#[inline(always)]
pub fn judge(cgroup_id: u64, dst: &Destination) -> Judgement {
    let Some(config) = TG_CONFIG.get_ptr(0) else {
        // Unreachable for an array map with one entry.
        return Judgement {
            verdict: Verdict::Allowed,
            mode: Mode::Observe,
            flags: dst.flags,
            rule_id: RULE_ID_DEFAULT,
            set_id: 0,
            hits_id: RULE_ID_DEFAULT,
            generation: 0,
            allowed_report_interval_ns: 0,
            allowed_counts: 0,
            packet_report_interval_ns: 0,
        };
    };
    // SAFETY: the value pointer is valid for the whole program; its first
    // 8 bytes are (generation, global_mode), read as one word.
    let state_word = config as *const u64;
    let mut word = unsafe { core::ptr::read_volatile(state_word) };

    let decision = match claim_slot() {
        Some((slot, scratch)) => {
            // SAFETY (every access to `scratch` here): the claimed slot is
            // this decision's alone until released. The global functions
            // reach it through lookups of their own, so it is used through
            // the raw pointer only, never a reference held across their
            // calls.
            unsafe {
                (*scratch).addr = dst.addr;
                (*scratch).port = dst.port;
                (*scratch).protocol = dst.protocol;
                (*scratch).family = dst.family;
            }
            let mut attempt = 1;
            loop {
                compiler_fence(Ordering::SeqCst);
                tg_evaluate(cgroup_id, word, slot);
                compiler_fence(Ordering::SeqCst);
                // SAFETY: as above.
                let again = unsafe { core::ptr::read_volatile(state_word) };
                if again == word {
                    break;
                }
                if attempt == GENERATION_ATTEMPTS {
                    report::count(counter::GENERATION_UNSTABLE);
                    break;
                }
                report::count(counter::GENERATION_RETRIES);
                word = again;
                attempt += 1;
            }
            // The decision, as tg_evaluate wrote it.
            let decision = unsafe {
                Decision {
                    action: (*scratch).action,
                    mode: (*scratch).mode,
                    rule_id: (*scratch).rule_id,
                    set_id: (*scratch).set_id,
                    hits_id: (*scratch).hits_id,
                    flags: if (*scratch).endpoint_known != 0 {
                        flow_flags::ENDPOINT_KNOWN
                    } else {
                        0
                    },
                }
            };
            release_slot(scratch);
            decision
        }
        None => unjudged(cgroup_id, word),
    };

    let mode = effective_mode(decision.mode, (word >> 32) as u8);
    let verdict = if decision.action == action::DENY {
        match mode {
            Mode::Enforce => Verdict::Denied,
            Mode::Observe => Verdict::Audit,
        }
    } else {
        Verdict::Allowed
    };
    Judgement {
        verdict,
        mode,
        flags: dst.flags | decision.flags,
        rule_id: decision.rule_id,
        set_id: decision.set_id,
        hits_id: decision.hits_id,
        generation: word as u32,
        // SAFETY: plain reads of the config value.
        allowed_report_interval_ns: unsafe { (*config).allowed_report_interval_ns },
        allowed_counts: unsafe { (*config).allowed_counts },
        packet_report_interval_ns: unsafe { (*config).packet_report_interval_ns },
    }
}

/// Claims one of this CPU's decision slots. cgroup programs run with
/// migration disabled but not preemption: on a fully preemptible kernel a
/// task can be preempted in the middle of a decision, and a task that then
/// decides on the same CPU must not write the slot the first one holds.
///
/// A slot's holder count is raised atomically, then read: the slot is this
/// decision's if the count is 1, since any task that raises it later reads
/// 2 or more and moves on, and a holder lowers it only when it is done.
#[inline(always)]
fn claim_slot() -> Option<(u32, *mut DecideScratch)> {
    for slot in 0..capacity::DECIDE_SLOTS {
        let Some(s) = TG_DECIDE_SCRATCH.get_ptr_mut(slot) else {
            continue;
        };
        // SAFETY: the count is a u64 of the map value, only ever changed
        // atomically.
        let busy = unsafe { core::ptr::addr_of_mut!((*s).busy) };
        add_atomic(busy, 1);
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(busy) } == 1 {
            return Some((slot, s));
        }
        add_atomic(busy, u64::MAX); // - 1
    }
    None
}

#[inline(always)]
fn release_slot(s: *mut DecideScratch) {
    // SAFETY: as in claim_slot.
    add_atomic(unsafe { core::ptr::addr_of_mut!((*s).busy) }, u64::MAX); // - 1
}

/// An atomic add whose result is not used: the BPF_XADD instruction, which
/// every kernel has (the forms that return the old value came in 5.12).
#[inline(always)]
pub fn add_atomic(target: *mut u64, value: u64) {
    // SAFETY: `target` points into a map value, aligned for a u64.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            target, value,
        );
    }
}

/// Every decision slot of this CPU is held by a preempted decision: an
/// endpoint that policies select is denied by its default's mode without
/// evaluating its rules (fail closed), and the record says so
/// (`flow_flags::UNJUDGED`); an endpoint no policy selects is not
/// restricted, as always.
#[inline(always)]
fn unjudged(cgroup_id: u64, word: u64) -> Decision {
    let key = EndpointKey {
        cgroup_id,
        half: (word as u32) & 1,
        _pad: 0,
    };
    match TG_ENDPOINTS.get_ptr(key) {
        // SAFETY: a value pointer from a successful lookup.
        Some(endpoint) => unsafe {
            Decision {
                action: action::DENY,
                mode: (*endpoint).default_mode,
                rule_id: RULE_ID_DEFAULT,
                set_id: (*endpoint).set_id,
                hits_id: (*endpoint).default_hits_id,
                flags: flow_flags::ENDPOINT_KNOWN | flow_flags::UNJUDGED,
            }
        },
        None => Decision {
            action: action::ALLOW,
            mode: policy_mode::INHERIT,
            rule_id: RULE_ID_DEFAULT,
            set_id: 0,
            hits_id: RULE_ID_DEFAULT,
            flags: flow_flags::UNJUDGED,
        },
    }
}

/// A policy's mode overrides the global one; an unset global mode observes.
#[inline(always)]
fn effective_mode(rule_mode: u8, global_mode: u8) -> Mode {
    let mode = if rule_mode == policy_mode::INHERIT {
        global_mode
    } else {
        rule_mode
    };
    if mode == policy_mode::ENFORCE {
        Mode::Enforce
    } else {
        Mode::Observe
    }
}

/// The decision's working memory: the slot it claimed.
#[inline(always)]
fn scratch(slot: u32) -> Option<&'static mut DecideScratch> {
    // SAFETY: the claimed slot is this decision's alone; callers hold the
    // reference only where they call no other global function.
    TG_DECIDE_SCRATCH
        .get_ptr_mut(slot)
        .map(|p| unsafe { &mut *p })
}

/// Decides the destination in the scratch value for `cgroup_id` by the
/// generation and global mode in `word`, and writes the decision there.
///
/// Global functions (`no_mangle`, `extern "C"`) are verified once each, on
/// their own, with nothing known of their arguments; the caller continues
/// from one state whatever happened inside. That keeps the verifier's work
/// the sum of the steps rather than their product, which older verifiers
/// (5.10 to 6.8) need: they prune far less than 6.18's. Before 5.12 they
/// take scalars only, hence the scratch value.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tg_evaluate(cgroup_id: u64, word: u64, slot: u32) -> u32 {
    let Some(s) = TG_DECIDE_SCRATCH.get_ptr_mut(slot) else {
        return 0;
    };
    let generation = word as u32;
    let global_mode = (word >> 32) as u8;
    // SAFETY (every access to `s` here): plain places of the per-CPU
    // value, through the raw pointer: the scans called below change it.
    unsafe {
        (*s).global_mode = global_mode;
        (*s).candidates = [NONE; 3];
    }
    let key = EndpointKey {
        cgroup_id,
        half: generation & 1,
        _pad: 0,
    };
    let Some(endpoint) = TG_ENDPOINTS.get_ptr(key) else {
        // No policy selects this cgroup: not restricted.
        unsafe {
            (*s).action = action::ALLOW;
            (*s).mode = policy_mode::INHERIT;
            (*s).rule_id = RULE_ID_DEFAULT;
            (*s).set_id = 0;
            (*s).hits_id = RULE_ID_DEFAULT;
            (*s).endpoint_known = 0;
        }
        return 0;
    };
    // SAFETY: a value pointer from a successful lookup. A concurrent delete
    // can only happen after the generation moved, which the caller sees.
    let (set_id, default_action, default_mode, flags, default_hits_id) = unsafe {
        (
            (*endpoint).set_id,
            (*endpoint).default_action,
            (*endpoint).default_mode,
            (*endpoint).flags,
            (*endpoint).default_hits_id,
        )
    };
    tg_scan_prefix(set_id, slot);
    if flags & endpoint_flags::FQDN_RULES != 0 {
        let (family, addr) = unsafe { ((*s).family, (*s).addr) };
        scan_learned(cgroup_id, set_id, family, &addr, slot);
    }
    // SAFETY: no call while the reference lives.
    let s = unsafe { &mut *s };
    decide(s, default_action, default_mode, default_hits_id);
    s.set_id = set_id;
    s.endpoint_known = 1;
    0
}

/// Adds the port rules of the longest prefix of set `set_id` that holds the
/// destination.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tg_scan_prefix(set_id: u32, slot: u32) -> u32 {
    let Some(s) = scratch(slot) else {
        return 0;
    };
    let rules = if s.family == family::INET {
        let key = Key::new(
            32 + 32,
            RuleKeyV4 {
                set_id_be: set_id.to_be(),
                addr: s.addr[0].to_ne_bytes(),
            },
        );
        TG_RULES_V4.get(&key)
    } else {
        let key = Key::new(
            32 + 128,
            RuleKeyV6 {
                set_id_be: set_id.to_be(),
                addr: v6_bytes(&s.addr),
            },
        );
        TG_RULES_V6.get(&key)
    };
    if let Some(rules) = rules {
        scan(s, rules);
    }
    0
}

/// Adds the port rules of set `set_id` for addresses learned for FQDN
/// pattern `pattern_id`.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tg_scan_fqdn(set_id: u32, pattern_id: u32, slot: u32) -> u32 {
    let Some(s) = scratch(slot) else {
        return 0;
    };
    let key = FqdnRuleKey { set_id, pattern_id };
    // SAFETY: plain lookup; the value lives while the generation does.
    if let Some(rules) = unsafe { TG_FQDN_RULES.get(&key) } {
        scan(s, rules);
    }
    0
}

/// Adds the FQDN rule lists of every pattern the endpoint learned the
/// destination for, while the learned entry lives.
#[inline(always)]
fn scan_learned(cgroup_id: u64, set_id: u32, dst_family: u8, addr: &[u32; 4], decision_slot: u32) {
    let key = LearnedKey {
        cgroup_id,
        addr: if dst_family == family::INET {
            let a = addr[0].to_ne_bytes();
            [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        } else {
            v6_bytes(addr)
        },
        family: dst_family,
        _pad: [0; 7],
    };
    let Some(learned) = TG_FQDN_LEARNED.get_ptr(&key) else {
        return;
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    for slot in 0..LEARNED_SLOTS {
        // SAFETY: value pointer of a successful lookup; a slot the ingress
        // program rewrites concurrently gets its pattern before its expiry,
        // so a torn read can only look expired.
        let (pattern_id, expires_ns) = unsafe {
            (
                core::ptr::read_volatile(&(*learned).slots[slot].pattern_id),
                core::ptr::read_volatile(&(*learned).slots[slot].expires_ns),
            )
        };
        if pattern_id != 0 && expires_ns > now {
            tg_scan_fqdn(set_id, pattern_id, decision_slot);
        }
    }
}

/// No candidate of a kind.
const NONE: u64 = u64::MAX;

/// Candidate kinds, indexes of [`DecideScratch::candidates`].
const ENFORCED_DENY: usize = 0;
const DENY: usize = 1;
const ALLOW: usize = 2;

/// Keeps, of each kind that decides, the first matching rule by `order`.
/// The lists of one decision are each sorted by order (denies first,
/// strongest mode first, then allows), so taking each kind's lowest over
/// all lists decides as walking the merged list would.
///
/// A candidate is one u64, `order << 40 | mode << 32 | rule_id`: keeping
/// the lowest is one comparison. The candidates live in map memory, whose
/// contents the verifier does not track, so every way through a list
/// continues as one state.
#[inline(always)]
fn scan(s: &mut DecideScratch, rules: &RuleList) {
    let len = rules.len as usize;
    let (port, protocol, global_mode) = (s.port, s.protocol, s.global_mode);
    for i in 0..MAX_PORT_RULES {
        if i >= len {
            break;
        }
        let rule = &rules.rules[i];
        let matches = rule.port_lo <= port
            && port <= rule.port_hi
            && (rule.protocol == 0 || rule.protocol == protocol);
        if !matches {
            continue;
        }
        let candidate = (rule.order as u64) << 40 | (rule.mode as u64) << 32 | rule.rule_id as u64;
        if rule.action == action::DENY {
            if effective_mode(rule.mode, global_mode) == Mode::Enforce {
                keep_lowest(&mut s.candidates[ENFORCED_DENY], candidate);
            }
            keep_lowest(&mut s.candidates[DENY], candidate);
        } else {
            // Everything after an allow in a list comes later.
            keep_lowest(&mut s.candidates[ALLOW], candidate);
            break;
        }
    }
}

#[inline(always)]
fn keep_lowest(slot: &mut u64, candidate: u64) {
    if candidate < *slot {
        *slot = candidate;
    }
}

/// An enforced deny decides. A deny that only observes decides as `audit`
/// unless nothing allows the connection and the default is an enforced
/// deny: an observing policy never weakens another policy's enforced
/// default. Writes the decision's action, mode and rule to `s`.
#[inline(always)]
fn decide(s: &mut DecideScratch, default_action: u8, default_mode: u8, default_hits_id: u32) {
    let [enforced_deny, deny, allow] = s.candidates;
    let default_enforces_deny = default_action == action::DENY
        && effective_mode(default_mode, s.global_mode) == Mode::Enforce;
    let (decided_action, deciding) = if enforced_deny != NONE {
        (action::DENY, enforced_deny)
    } else if deny != NONE && !(allow == NONE && default_enforces_deny) {
        (action::DENY, deny)
    } else if deny == NONE && allow != NONE {
        (action::ALLOW, allow)
    } else {
        s.action = default_action;
        s.mode = default_mode;
        s.rule_id = RULE_ID_DEFAULT;
        s.hits_id = default_hits_id;
        return;
    };
    s.action = decided_action;
    s.mode = (deciding >> 32) as u8;
    s.rule_id = deciding as u32;
    s.hits_id = deciding as u32;
}

#[inline(always)]
fn v6_bytes(words: &[u32; 4]) -> [u8; 16] {
    let [a, b, c, d] = [
        words[0].to_ne_bytes(),
        words[1].to_ne_bytes(),
        words[2].to_ne_bytes(),
        words[3].to_ne_bytes(),
    ];
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}
