//! The decision: endpoint -> rule set -> one longest-prefix lookup -> the
//! port rules there, in precedence order, or the endpoint's default.
//!
//! The agent switches rule sets by generation: it writes the new entries into
//! the inactive half of the maps, flips `TG_CONFIG.generation`, then deletes
//! the old half. A decision reads the (generation, mode) word, makes its
//! lookups in that generation's half, and reads the word again. Entries of a
//! half are deleted only after the word has moved away from it, so if the two
//! reads agree no lookup can have seen a deletion, and the decision is wholly
//! that generation's. If they differ, it decides again with the new word, up
//! to GENERATION_ATTEMPTS times.

use core::sync::atomic::{Ordering, compiler_fence};

use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id, maps::lpm_trie::Key, programs::SockAddrContext,
};
use tollgate_common::{
    EndpointKey, MAX_PORT_RULES, Mode, RULE_ID_DEFAULT, RuleKeyV4, RuleKeyV6, RuleList, Verdict,
    action, counter, family, flow_flags, policy_mode,
};

use crate::{
    maps::{TG_CONFIG, TG_ENDPOINTS, TG_RULES_V4, TG_RULES_V6},
    report,
};

/// Only a writer that completes this many switches during one decision can
/// exhaust them; that is counted (`GENERATION_UNSTABLE`), not hidden.
const GENERATION_ATTEMPTS: u32 = 4;

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
    let (set_id, default_action, default_mode) = unsafe {
        (
            (*endpoint).set_id,
            (*endpoint).default_action,
            (*endpoint).default_mode,
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
    match rules {
        Some(rules) => decide_by_rules(rules, dst, global_mode, default),
        None => default,
    }
}

/// The port rules of a prefix, denies first (strongest mode first), then
/// allows. An enforced deny decides at once. A deny that only observes
/// decides as `audit` unless nothing allows the connection and the default
/// is an enforced deny: an observing policy never weakens another policy's
/// enforced default.
#[inline(always)]
fn decide_by_rules(
    rules: &RuleList,
    dst: &Destination,
    global_mode: u8,
    default: Decision,
) -> Decision {
    let len = rules.len as usize;
    let mut observed_deny: Option<(u8, u32)> = None;
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
        if rule.action == action::DENY {
            // Later denies are no stronger than the first one.
            if observed_deny.is_some() {
                continue;
            }
            if effective_mode(rule.mode, global_mode) == Mode::Enforce {
                return Decision {
                    action: action::DENY,
                    mode: rule.mode,
                    rule_id: rule.rule_id,
                    ..default
                };
            }
            observed_deny = Some((rule.mode, rule.rule_id));
            continue;
        }
        return match observed_deny {
            Some((mode, rule_id)) => Decision {
                action: action::DENY,
                mode,
                rule_id,
                ..default
            },
            None => Decision {
                action: action::ALLOW,
                mode: rule.mode,
                rule_id: rule.rule_id,
                ..default
            },
        };
    }
    match observed_deny {
        Some(_)
            if default.action == action::DENY
                && effective_mode(default.mode, global_mode) == Mode::Enforce =>
        {
            default
        }
        Some((mode, rule_id)) => Decision {
            action: action::DENY,
            mode,
            rule_id,
            ..default
        },
        None => default,
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
