//! Replaying a recording through the reference evaluator
//! (`tollgate_policy::evaluate`) with candidate policies: which of the
//! recorded flows would they block that went through, and which would
//! they let through that were denied.
//!
//! A flow "was" what happened to it: allowed and audit went through,
//! denied did not. It "would be" what the candidates decide as if every
//! one of them were enforced, since the question is what enforcing them
//! would break: an audit from them counts as denied.
//!
//! An FQDN peer holds the addresses learned for its pattern, so a flow's
//! destination is in one when a name it was learned under (`dst.fqdn`, or
//! a recorded DNS answer its endpoint received) matches the pattern.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use tollgate_policy::{
    document::{DocumentRef, FieldError, SourcedPolicy},
    evaluate::{Outcome, evaluate},
    model::{Action, Peer, Policy, PolicyMode},
    record_protocol,
    select::{Endpoint, Labels, select_endpoints},
    validate::validate_all,
};
use tollgate_proto::v1 as api;

use crate::recording::{Recording, Workload};

/// Whether a connection goes through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Effect {
    Allowed,
    Denied,
}

/// A decision and who made it: the policy (for a default, every policy
/// that owns it, comma-separated; none when no policy selects the flow's
/// source) and the rule's name, or `default`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Decision {
    pub effect: Effect,
    pub policy: Option<String>,
    pub rule: String,
}

/// Recorded flows of one workload to one destination that the candidates
/// decide otherwise, with how many connections they stand for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Change {
    pub workload: Workload,
    pub protocol: u8,
    pub ip: IpAddr,
    pub port: u16,
    /// The names the destination was learned under, comma-separated.
    pub names: Option<String>,
    pub was: Decision,
    pub would_be: Decision,
    pub count: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Went through; the candidates would block them.
    pub newly_denied: Vec<Change>,
    /// Were denied; the candidates would let them through.
    pub newly_allowed: Vec<Change>,
    /// Flow records replayed, and the connections they stand for.
    pub flows: u64,
    pub connections: u64,
}

/// The candidates' decision for each flow of `recording`, in order, with
/// `policies` as the node's whole set.
pub fn decisions(recording: &Recording, policies: &[Policy]) -> Vec<Decision> {
    let mut namespace_labels = Labels::new();
    recording
        .flows
        .iter()
        .zip(recording.learned_names())
        .map(|(flow, names)| {
            let endpoint = Endpoint {
                cgroup_id: flow.source.cgroup_id,
                path: flow.source.cgroup.as_deref().unwrap_or_default(),
                identity: flow.source.identity(&mut namespace_labels),
            };
            let selecting: Vec<&Policy> = select_endpoints(policies, [endpoint], None)
                .into_values()
                .next()
                .unwrap_or_default()
                .into_iter()
                .map(|index| &policies[index])
                .collect();
            decide(&selecting, flow.ip, flow.port, flow.protocol, &names)
        })
        .collect()
}

/// Replays every flow of `recording` with `policies` as the node's whole
/// set, and reports the flows decided otherwise than recorded.
pub fn replay(recording: &Recording, policies: &[Policy]) -> Report {
    let names = recording.learned_names();
    let mut changes: BTreeMap<(bool, Change), u64> = BTreeMap::new();
    let mut report = Report::default();
    let flows = recording.flows.iter().zip(&names);
    for ((flow, names), would_be) in flows.zip(decisions(recording, policies)) {
        report.flows += 1;
        report.connections += flow.evidence.count;
        let was = Decision {
            effect: if flow.verdict.went_through() {
                Effect::Allowed
            } else {
                Effect::Denied
            },
            policy: flow.policy.clone(),
            rule: flow.rule.clone(),
        };
        if was.effect == would_be.effect {
            continue;
        }
        let change = Change {
            workload: flow.source.workload.clone(),
            protocol: flow.protocol,
            ip: flow.ip,
            port: flow.port,
            names: (!names.is_empty()).then(|| names.iter().copied().collect::<Vec<_>>().join(",")),
            was,
            would_be,
            count: 0,
        };
        let newly_denied = change.would_be.effect == Effect::Denied;
        *changes.entry((newly_denied, change)).or_default() += flow.evidence.count;
    }
    for ((newly_denied, mut change), count) in changes {
        change.count = count;
        if newly_denied {
            report.newly_denied.push(change);
        } else {
            report.newly_allowed.push(change);
        }
    }
    report
}

/// The candidates' decision for one flow, as if each were enforced.
fn decide(
    selecting: &[&Policy],
    ip: IpAddr,
    port: u16,
    protocol: u8,
    names: &BTreeSet<&str>,
) -> Decision {
    if selecting.is_empty() {
        return Decision {
            effect: Effect::Allowed,
            policy: None,
            rule: "default".into(),
        };
    }
    let learned: Vec<_> = selecting
        .iter()
        .flat_map(|policy| policy.rules.iter())
        .flat_map(|rule| rule.to.iter())
        .filter_map(|peer| match peer {
            Peer::Fqdn(pattern) if names.iter().any(|name| pattern.matches(name)) => Some(pattern),
            _ => None,
        })
        .collect();
    let reference = evaluate(selecting, ip, port, protocol, PolicyMode::Enforce, &learned);
    let effect = match reference.outcome {
        Outcome::Allowed => Effect::Allowed,
        Outcome::Denied | Outcome::Audit => Effect::Denied,
    };
    let (policy, rule) = match reference.rule {
        Some((policy, index)) => (policy.key.to_string(), policy.rules[index].name.to_string()),
        None => {
            let owners: Vec<String> = selecting
                .iter()
                .filter(|p| effect == Effect::Allowed || p.default_action == Action::Deny)
                .map(|p| p.key.to_string())
                .collect();
            (owners.join(","), "default".into())
        }
    };
    Decision {
        effect,
        policy: Some(policy),
        rule,
    }
}

/// The report as the API gives it (`FlowService.DryRun`).
pub fn to_api(report: &Report) -> api::DryRunReport {
    let decision = |decision: &Decision| api::FlowDecision {
        effect: match decision.effect {
            Effect::Allowed => "allowed".into(),
            Effect::Denied => "denied".into(),
        },
        policy: decision.policy.clone(),
        rule: decision.rule.clone(),
    };
    let changes = |changes: &[Change]| {
        changes
            .iter()
            .map(|change| api::FlowChange {
                workload: change.workload.to_string(),
                protocol: record_protocol::name(change.protocol).into_owned(),
                ip: change.ip.to_string(),
                port: change.port.into(),
                names: change.names.clone(),
                was: Some(decision(&change.was)),
                would_be: Some(decision(&change.would_be)),
                count: change.count,
            })
            .collect()
    };
    api::DryRunReport {
        flows: report.flows,
        connections: report.connections,
        newly_denied: changes(&report.newly_denied),
        newly_allowed: changes(&report.newly_allowed),
    }
}

/// The connections that went through and would be denied.
pub fn newly_denied(report: &api::DryRunReport) -> u64 {
    report.newly_denied.iter().map(|c| c.count).sum()
}

/// The report as text: per workload, each change with its count, the
/// decision recorded and the one the candidates would make.
pub fn describe(report: &api::DryRunReport) -> String {
    let mut out = format!(
        "replayed {} flow records ({} connections): {} would be newly denied, {} newly allowed\n",
        report.flows,
        report.connections,
        newly_denied(report),
        report.newly_allowed.iter().map(|c| c.count).sum::<u64>(),
    );
    for (heading, changes) in [
        ("newly denied", &report.newly_denied),
        ("newly allowed", &report.newly_allowed),
    ] {
        let mut by_workload: BTreeMap<&str, Vec<&api::FlowChange>> = BTreeMap::new();
        for change in changes {
            by_workload
                .entry(&change.workload)
                .or_default()
                .push(change);
        }
        for (workload, changes) in by_workload {
            out.push_str(&format!("{workload}: {heading}\n"));
            for change in changes {
                out.push_str(&format!(
                    "  {} {} x{}: was {}, would be {}\n",
                    change.protocol,
                    destination(change),
                    change.count,
                    decision(change.was.as_ref()),
                    decision(change.would_be.as_ref()),
                ));
            }
        }
    }
    out
}

fn destination(change: &api::FlowChange) -> String {
    let address = if change.ip.contains(':') {
        format!("[{}]:{}", change.ip, change.port)
    } else {
        format!("{}:{}", change.ip, change.port)
    };
    match &change.names {
        Some(names) => format!("{address} ({names})"),
        None => address,
    }
}

fn decision(decision: Option<&api::FlowDecision>) -> String {
    let decision = decision.cloned().unwrap_or_default();
    match &decision.policy {
        Some(policy) => format!("{} by {policy}/{}", decision.effect, decision.rule),
        None => format!("{} (no policy)", decision.effect),
    }
}

/// The policy set to replay with: the candidates in place of the policies
/// in force (`in_force` empty), or beside them, each candidate replacing
/// the policy of its name. Validated as one set, as the agent would.
pub fn candidate_set(
    in_force: &[api::EgressPolicy],
    candidates: &[api::EgressPolicy],
) -> Result<Vec<Policy>, Vec<FieldError>> {
    let key = |policy: &api::EgressPolicy| {
        policy
            .metadata
            .as_ref()
            .map(|m| (m.namespace.clone(), m.name.clone()))
    };
    let replaced: BTreeSet<_> = candidates.iter().map(key).collect();
    let sourced = |source: &str, documents: Vec<&api::EgressPolicy>| {
        documents
            .into_iter()
            .enumerate()
            .map(|(index, policy)| SourcedPolicy {
                document: DocumentRef {
                    source: source.to_string(),
                    index: index + 1,
                },
                policy: policy.clone(),
            })
            .collect::<Vec<_>>()
    };
    let mut documents = sourced(
        "in force",
        in_force
            .iter()
            .filter(|policy| !replaced.contains(&key(policy)))
            .collect(),
    );
    documents.extend(sourced("candidates", candidates.iter().collect()));
    validate_all(&documents)
}
