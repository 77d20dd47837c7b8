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

use core::sync::atomic::{Ordering, compiler_fence};

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use tollgate_common::{
    EndpointKey, FqdnRuleKey, LEARNED_SLOTS, LearnedKey, MAX_PORT_RULES, Mode, RULE_ID_DEFAULT,
    RuleKeyV4, RuleKeyV6, RuleList, Verdict, action, counter, endpoint_flags, family, flow_flags,
    policy_mode,
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
/// exhaust them; that is counted (`GENERATION_UNSTABLE`), not hidden. The
/// verifier walks every attempt, so each one more costs the agent's start
/// a full verification of `evaluate`.
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
pub struct Decision {
    pub action: u8,
    /// [`policy_mode`] of the deciding rule or default.
    pub mode: u8,
    pub rule_id: u32,
    pub set_id: u32,
    pub endpoint_known: bool,
}

/// Decides, reports and returns the hook's return value.
#[inline(always)]
pub fn run(ctx: &SockAddrContext, hook: tollgate_common::Hook, dst: Destination) -> i32 {
    let Some(config) = TG_CONFIG.get_ptr(0) else {
        return 1; // unreachable for an array map with one entry
    };
    // SAFETY: the value pointer is valid for the whole program; its first
    // 8 bytes are (generation, global_mode), read as one word.
    let state_word = config as *const u64;
    let mut word = unsafe { core::ptr::read_volatile(state_word) };
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };

    let mut decision;
    let mut attempt = 1;
    loop {
        compiler_fence(Ordering::SeqCst);
        decision = evaluate(cgroup_id, word as u32, (word >> 32) as u8, &dst);
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

    let mode = effective_mode(decision.mode, (word >> 32) as u8);
    let verdict = if decision.action == action::DENY {
        match mode {
            Mode::Enforce => Verdict::Denied,
            Mode::Observe => Verdict::Audit,
        }
    } else {
        Verdict::Allowed
    };

    let mut flags = dst.flags;
    if decision.endpoint_known {
        flags |= flow_flags::ENDPOINT_KNOWN;
    }
    // SAFETY: plain read of the config value.
    let interval = unsafe { (*config).allowed_report_interval_ns };
    report::decision(
        ctx,
        &report::Report {
            hook,
            verdict,
            mode,
            flags,
            rule_id: decision.rule_id,
            set_id: decision.set_id,
            generation: word as u32,
            cgroup_id,
            allowed_report_interval_ns: interval,
        },
        &dst,
    );

    if verdict == Verdict::Denied { 0 } else { 1 }
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

#[inline(always)]
fn evaluate(cgroup_id: u64, generation: u32, global_mode: u8, dst: &Destination) -> Decision {
    let key = EndpointKey {
        cgroup_id,
        half: generation & 1,
        _pad: 0,
    };
    let Some(endpoint) = TG_ENDPOINTS.get_ptr(key) else {
        // No policy selects this cgroup: not restricted.
        return Decision {
            action: action::ALLOW,
            mode: policy_mode::INHERIT,
            rule_id: RULE_ID_DEFAULT,
            set_id: 0,
            endpoint_known: false,
        };
    };
    // SAFETY: a value pointer from a successful lookup. A concurrent delete
    // can only happen after the generation moved, which the caller sees.
    let (set_id, default_action, default_mode, endpoint_flags) = unsafe {
        (
            (*endpoint).set_id,
            (*endpoint).default_action,
            (*endpoint).default_mode,
            (*endpoint).flags,
        )
    };
    let default = Decision {
        action: default_action,
        mode: default_mode,
        rule_id: RULE_ID_DEFAULT,
        set_id,
        endpoint_known: true,
    };

    let rules = if dst.family == family::INET {
        let key = Key::new(
            32 + 32,
            RuleKeyV4 {
                set_id_be: set_id.to_be(),
                addr: dst.addr[0].to_ne_bytes(),
            },
        );
        TG_RULES_V4.get(&key)
    } else {
        let key = Key::new(
            32 + 128,
            RuleKeyV6 {
                set_id_be: set_id.to_be(),
                addr: v6_bytes(&dst.addr),
            },
        );
        TG_RULES_V6.get(&key)
    };
    let mut scan = Scan::default();
    if let Some(rules) = rules {
        scan.add(rules, dst, global_mode);
        scan.settle();
    }
    if endpoint_flags & endpoint_flags::FQDN_RULES != 0 {
        scan_learned(&mut scan, cgroup_id, set_id, dst, global_mode);
    }
    scan.decide(default, global_mode)
}

/// Adds the FQDN rule lists of every pattern the endpoint learned the
/// destination for, while the learned entry lives.
#[inline(always)]
fn scan_learned(scan: &mut Scan, cgroup_id: u64, set_id: u32, dst: &Destination, global_mode: u8) {
    let key = LearnedKey {
        cgroup_id,
        addr: if dst.family == family::INET {
            let a = dst.addr[0].to_ne_bytes();
            [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        } else {
            v6_bytes(&dst.addr)
        },
        family: dst.family,
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
        if pattern_id == 0 || expires_ns <= now {
            continue;
        }
        let key = FqdnRuleKey { set_id, pattern_id };
        // SAFETY: plain lookup; the value lives while the generation does.
        if let Some(rules) = unsafe { TG_FQDN_RULES.get(&key) } {
            scan.add(rules, dst, global_mode);
            scan.settle();
        }
    }
}

/// The first matching rule, by `order`, of each kind that decides. The
/// lists of one decision are each sorted by order (denies first, strongest
/// mode first, then allows), so taking each kind's lowest over all lists
/// decides as walking the merged list would.
///
/// A candidate is one u64, `order << 40 | mode << 32 | rule_id`, and
/// `NONE` when there is none: keeping the lowest is one comparison, and the
/// verifier sees plain scalars instead of a flag per kind and rule.
struct Scan {
    enforced_deny: u64,
    deny: u64,
    allow: u64,
}

const NONE: u64 = u64::MAX;

impl Default for Scan {
    fn default() -> Self {
        Self {
            enforced_deny: NONE,
            deny: NONE,
            allow: NONE,
        }
    }
}

impl Scan {
    /// Stores the candidates in per-CPU memory and reads them back: the
    /// verifier then knows nothing of their values, so every way through
    /// the lists scanned so far continues as one state instead of one each.
    #[inline(always)]
    fn settle(&mut self) {
        let Some(slot) = TG_DECIDE_SCRATCH.get_ptr_mut(0) else {
            return;
        };
        // SAFETY: the per-CPU value is this program's alone while it runs.
        unsafe {
            core::ptr::write_volatile(slot, [self.enforced_deny, self.deny, self.allow]);
            [self.enforced_deny, self.deny, self.allow] = core::ptr::read_volatile(slot);
        }
    }

    #[inline(always)]
    fn add(&mut self, rules: &RuleList, dst: &Destination, global_mode: u8) {
        let len = rules.len as usize;
        for i in 0..MAX_PORT_RULES {
            if i >= len {
                break;
            }
            let rule = &rules.rules[i];
            let matches = rule.port_lo <= dst.port
                && dst.port <= rule.port_hi
                && (rule.protocol == 0 || rule.protocol == dst.protocol);
            if !matches {
                continue;
            }
            let candidate =
                (rule.order as u64) << 40 | (rule.mode as u64) << 32 | rule.rule_id as u64;
            if rule.action == action::DENY {
                if effective_mode(rule.mode, global_mode) == Mode::Enforce {
                    self.enforced_deny = self.enforced_deny.min(candidate);
                }
                self.deny = self.deny.min(candidate);
            } else {
                // Everything after an allow in a list comes later.
                self.allow = self.allow.min(candidate);
                break;
            }
        }
    }

    /// An enforced deny decides. A deny that only observes decides as
    /// `audit` unless nothing allows the connection and the default is an
    /// enforced deny: an observing policy never weakens another policy's
    /// enforced default.
    #[inline(always)]
    fn decide(self, default: Decision, global_mode: u8) -> Decision {
        let (action, deciding) = if self.enforced_deny != NONE {
            (action::DENY, self.enforced_deny)
        } else if self.deny != NONE {
            let default_enforces_deny = default.action == action::DENY
                && effective_mode(default.mode, global_mode) == Mode::Enforce;
            if self.allow == NONE && default_enforces_deny {
                return default;
            }
            (action::DENY, self.deny)
        } else if self.allow != NONE {
            (action::ALLOW, self.allow)
        } else {
            return default;
        };
        Decision {
            action,
            mode: (deciding >> 32) as u8,
            rule_id: deciding as u32,
            ..default
        }
    }
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
