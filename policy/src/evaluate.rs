//! The reference evaluator: the policy semantics of DESIGN.md written as
//! directly as possible, rule by rule, with no compilation and nothing
//! shared with the compiler. The compiler must give the same answer for
//! every destination (the property test in `policy/tests.rs`).
//!
//! For an endpoint selected by some policies, and a global mode:
//! - a deny blocks (`denied`) when its policy's effective mode is enforce,
//!   and is recorded as `audit` otherwise;
//! - an enforced deny rule that matches decides;
//! - otherwise a matching deny rule that only observes makes it `audit`,
//!   unless no allow rule matches and the default is an enforced deny:
//!   a policy under observation never weakens another's enforcement;
//! - otherwise a matching allow rule allows;
//! - otherwise the default: deny if any selecting policy's default is deny
//!   (enforced if any of those is enforced), allow if all say allow.
//!
//! The rule reported for a deny is the first by (its policy's mode: enforce,
//! inherit, observe; policy key; position); for an allow, the first by
//! (policy key; position).

use std::net::IpAddr;

use super::model::{Action, FqdnPattern, Policy, PolicyMode};

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

/// `policies` are the ones selecting the endpoint (at least one); `global`
/// is observe or enforce; `learned` are the FQDN patterns for which the
/// endpoint learned `ip` from DNS answers (an FQDN peer holds exactly the
/// addresses learned for its pattern).
pub fn evaluate<'a>(
    policies: &[&'a Policy],
    ip: IpAddr,
    port: u16,
    protocol: u8,
    global: PolicyMode,
    learned: &[&FqdnPattern],
) -> Reference<'a> {
    let matching = |action: Action| {
        policies.iter().flat_map(move |&policy| {
            policy
                .rules
                .iter()
                .enumerate()
                .filter(move |(_, rule)| {
                    rule.action == action
                        && (rule.to.is_empty()
                            || rule.to.iter().any(|peer| peer.contains(ip, learned)))
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
    let reporting_order = |mode: PolicyMode| match mode {
        PolicyMode::Enforce => 0,
        PolicyMode::Inherit => 1,
        PolicyMode::Observe => 2,
    };
    let deny_defaults: Vec<&Policy> = policies
        .iter()
        .copied()
        .filter(|p| p.default_action == Action::Deny)
        .collect();
    let default_enforced = deny_defaults.iter().any(|p| enforced(p.mode));
    let first_allow =
        matching(Action::Allow).min_by(|(a, ai), (b, bi)| (&a.key, ai).cmp(&(&b.key, bi)));
    let first_deny = matching(Action::Deny).min_by(|(a, ai), (b, bi)| {
        (reporting_order(a.mode), &a.key, ai).cmp(&(reporting_order(b.mode), &b.key, bi))
    });

    match (first_deny, first_allow) {
        (Some(deny), _) if enforced(deny.0.mode) => Reference {
            outcome: Outcome::Denied,
            rule: Some(deny),
        },
        (Some(_), None) if default_enforced => Reference {
            outcome: Outcome::Denied,
            rule: None,
        },
        (Some(deny), _) => Reference {
            outcome: Outcome::Audit,
            rule: Some(deny),
        },
        (None, Some(allow)) => Reference {
            outcome: Outcome::Allowed,
            rule: Some(allow),
        },
        (None, None) if deny_defaults.is_empty() => Reference {
            outcome: Outcome::Allowed,
            rule: None,
        },
        (None, None) => Reference {
            outcome: if default_enforced {
                Outcome::Denied
            } else {
                Outcome::Audit
            },
            rule: None,
        },
    }
}
