//! The reference evaluator: the policy semantics of DESIGN.md written as
//! directly as possible, rule by rule, with no compilation. The compiler must
//! give the same answer for every destination (see the property test in
//! `policy/tests.rs`).
//!
//! - An endpoint selected by policies is denied unless a rule allows it, or
//!   allowed by default if every selecting policy says `defaultAction: allow`.
//! - A matching deny rule wins over every allow rule.
//! - Of several matching deny rules, the one whose policy mode is strongest
//!   (enforce, inherit, observe), then the first by policy key and rule
//!   position, is reported; of several allows, the first by key and position.
//! - A deny blocks when its policy's effective mode is enforce; a default
//!   deny blocks when any default-deny policy's effective mode is enforce.

use std::net::IpAddr;

use super::{
    compile::mode_rank,
    model::{Action, Policy, PolicyMode},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Allowed,
    Denied,
    Audit,
}

/// The decision for one destination, and which rule made it (None: default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reference<'a> {
    pub outcome: Outcome,
    pub rule: Option<(&'a Policy, usize)>,
}

/// `policies` are the ones selecting the endpoint (at least one).
pub fn evaluate<'a>(
    policies: &[&'a Policy],
    ip: IpAddr,
    port: u16,
    protocol: u8,
    global: PolicyMode,
) -> Reference<'a> {
    let matching = |action: Action| {
        policies.iter().flat_map(move |&policy| {
            policy
                .rules
                .iter()
                .enumerate()
                .filter(move |(_, rule)| {
                    rule.action == action
                        && (rule.to.is_empty() || rule.to.iter().any(|peer| peer.contains(ip)))
                        && (rule.ports.is_empty()
                            || rule.ports.iter().any(|spec| spec.matches(port, protocol)))
                })
                .map(move |(index, _)| (policy, index))
        })
    };
    let enforced = |mode: PolicyMode| match mode {
        PolicyMode::Inherit => global == PolicyMode::Enforce,
        mode => mode == PolicyMode::Enforce,
    };
    let deny_outcome = |enforce: bool| {
        if enforce {
            Outcome::Denied
        } else {
            Outcome::Audit
        }
    };

    if let Some((policy, index)) = matching(Action::Deny).min_by(|(a, ai), (b, bi)| {
        (mode_rank(a.mode), &a.key, ai).cmp(&(mode_rank(b.mode), &b.key, bi))
    }) {
        return Reference {
            outcome: deny_outcome(enforced(policy.mode)),
            rule: Some((policy, index)),
        };
    }
    if let Some(first) =
        matching(Action::Allow).min_by(|(a, ai), (b, bi)| (&a.key, ai).cmp(&(&b.key, bi)))
    {
        return Reference {
            outcome: Outcome::Allowed,
            rule: Some(first),
        };
    }
    let deny_defaults: Vec<&&Policy> = policies
        .iter()
        .filter(|p| p.default_action == Action::Deny)
        .collect();
    let outcome = if deny_defaults.is_empty() {
        Outcome::Allowed
    } else {
        deny_outcome(deny_defaults.iter().any(|p| enforced(p.mode)))
    };
    Reference {
        outcome,
        rule: None,
    }
}
