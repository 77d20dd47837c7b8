//! The decision: endpoint -> rule set -> one longest-prefix lookup -> the
//! first matching port rule, or the endpoint's default.
//!
//! The agent switches rule sets by generation: it writes the new entries into
//! the inactive half of the maps, flips `TG_CONFIG.generation`, then deletes
//! the old half. A decision that read the old generation may therefore see
//! entries vanish under it; it re-reads the generation afterwards and, if the
//! generation moved, decides again against the new one. So every decision is
//! made wholly by one generation, never by a mix or by neither.

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
    // SAFETY: the pointer is to the map value, valid for the whole program.
    // Volatile reads: the generation must be read again after the lookups.
    let generation_ptr = unsafe { core::ptr::addr_of!((*config).generation) };
    let generation = unsafe { core::ptr::read_volatile(generation_ptr) };
    // SAFETY: as above.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };

    let mut decision = evaluate(cgroup_id, generation, &dst);
    let mut generation_used = generation;
    let now_generation = unsafe { core::ptr::read_volatile(generation_ptr) };
    if now_generation != generation {
        report::count(counter::GENERATION_RETRIES);
        decision = evaluate(cgroup_id, now_generation, &dst);
        generation_used = now_generation;
    }

    // SAFETY: plain reads of the config value.
    let (global_mode, interval) =
        unsafe { ((*config).global_mode, (*config).allowed_report_interval_ns) };
    let mode = effective_mode(decision.mode, global_mode);
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
    report::decision(
        ctx,
        &report::Report {
            hook,
            verdict,
            mode,
            flags,
            rule_id: decision.rule_id,
            set_id: decision.set_id,
            generation: generation_used,
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
fn evaluate(cgroup_id: u64, generation: u32, dst: &Destination) -> Decision {
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
    // SAFETY: a value pointer from a successful lookup; the map does not
    // preallocate, so a concurrent delete frees it only after this program.
    let (set_id, default_action, default_mode) = unsafe {
        (
            (*endpoint).set_id,
            (*endpoint).default_action,
            (*endpoint).default_mode,
        )
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
    if let Some(decision) = rules.and_then(|rules| first_match(rules, dst, set_id)) {
        return decision;
    }
    Decision {
        action: default_action,
        mode: default_mode,
        rule_id: RULE_ID_DEFAULT,
        set_id,
        endpoint_known: true,
    }
}

#[inline(always)]
fn first_match(rules: &RuleList, dst: &Destination, set_id: u32) -> Option<Decision> {
    let len = rules.len as usize;
    for i in 0..MAX_PORT_RULES {
        if i >= len {
            break;
        }
        let rule = &rules.rules[i];
        if rule.port_lo <= dst.port
            && dst.port <= rule.port_hi
            && (rule.protocol == 0 || rule.protocol == dst.protocol)
        {
            return Some(Decision {
                action: rule.action,
                mode: rule.mode,
                rule_id: rule.rule_id,
                set_id,
                endpoint_known: true,
            });
        }
    }
    None
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
