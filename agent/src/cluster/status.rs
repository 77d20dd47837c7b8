//! A policy's status from the nodes' reports. Pure: the status writer
//! gathers the reports and writes what this computes.

use super::{
    report::NodeReport,
    resources::{Condition, NodeCounts, NodeFailure, PolicyStatus},
};

/// Nodes listed by name in `status.nodes.failed`; the count says the rest.
pub const MAX_FAILED_LISTED: usize = 20;

/// One node, as the status writer reached it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeOutcome {
    Report(NodeReport),
    Unreachable { node: String, why: String },
}

/// What the agents' validation says of a resource's newest generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Acceptance {
    /// The resource's uid: a node's report counts for this resource only,
    /// not for one deleted before it with the same name.
    pub uid: String,
    /// The resource's `metadata.generation`.
    pub generation: i64,
    /// The generation that should be in force (the newest valid one).
    pub valid_generation: Option<i64>,
    /// Egress rules of that version.
    pub rules: Option<u32>,
    /// Why the newest generation was refused, as the CLI prints it.
    pub refused: Option<String>,
}

/// The status of the policy `kind` `namespace`/`name`.
pub fn policy_status(
    kind: &str,
    namespace: Option<&str>,
    name: &str,
    acceptance: &Acceptance,
    nodes: &[NodeOutcome],
    previous: Option<&PolicyStatus>,
    now: &str,
) -> PolicyStatus {
    let target = acceptance.valid_generation;
    let mut enforced = 0u32;
    let mut failed = Vec::new();
    for outcome in nodes {
        match outcome {
            NodeOutcome::Unreachable { node, why } => failed.push(NodeFailure {
                node: node.clone(),
                reason: format!("agent unreachable: {why}"),
            }),
            NodeOutcome::Report(report) => {
                let policy = report
                    .policy(kind, namespace, name)
                    .filter(|p| p.uid == acceptance.uid);
                if target.is_some() && policy.and_then(|p| p.in_force) == target {
                    enforced += 1;
                } else if let Some(error) = policy.and_then(|p| p.error.clone())
                    && acceptance.refused.is_none()
                {
                    failed.push(NodeFailure {
                        node: report.node.clone(),
                        reason: error,
                    });
                }
            }
        }
    }
    let desired = nodes.len() as u32;
    let failures = failed.len();
    failed.sort_by(|a, b| a.node.cmp(&b.node));
    failed.truncate(MAX_FAILED_LISTED);

    let accepted = match &acceptance.refused {
        None => condition("Accepted", "True", "Valid", String::new()),
        Some(errors) => {
            let kept = match target {
                Some(generation) => format!("generation {generation} stays in force"),
                None => "no version of it is in force".into(),
            };
            condition(
                "Accepted",
                "False",
                "Invalid",
                format!(
                    "generation {} is invalid; {kept}:\n{errors}",
                    acceptance.generation
                ),
            )
        }
    };
    let enforced_condition = match target {
        None => condition(
            "Enforced",
            "False",
            "NotAccepted",
            "no valid version to enforce".into(),
        ),
        Some(_) if desired == 0 => condition(
            "Enforced",
            "Unknown",
            "NoAgents",
            "no agent is running".into(),
        ),
        Some(generation) if enforced == desired => condition(
            "Enforced",
            "True",
            "AllNodes",
            format!("generation {generation} is in force on all {desired} nodes"),
        ),
        Some(generation) if failures > 0 => condition(
            "Enforced",
            "False",
            "NodeFailures",
            format!(
                "generation {generation} is in force on {enforced} of {desired} nodes; {failures} failed"
            ),
        ),
        Some(generation) => condition(
            "Enforced",
            "False",
            "RollingOut",
            format!("generation {generation} is in force on {enforced} of {desired} nodes"),
        ),
    };
    let conditions = [accepted, enforced_condition]
        .into_iter()
        .map(|mut c| {
            c.observed_generation = Some(acceptance.generation);
            // The time of the last change of status, not of every write.
            c.last_transition_time = previous
                .and_then(|p| p.conditions.iter().find(|old| old.type_ == c.type_))
                .filter(|old| old.status == c.status)
                .map_or_else(|| now.to_owned(), |old| old.last_transition_time.clone());
            c
        })
        .collect();
    PolicyStatus {
        observed_generation: Some(acceptance.generation),
        rules: acceptance.rules,
        conditions,
        nodes: Some(NodeCounts {
            desired,
            enforced,
            failed,
        }),
    }
}

fn condition(type_: &str, status: &str, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::report::PolicyReport;

    fn report(node: &str, in_force: Option<i64>, error: Option<&str>) -> NodeOutcome {
        NodeOutcome::Report(NodeReport {
            node: node.into(),
            synced: true,
            policies: vec![PolicyReport {
                kind: "EgressPolicy".into(),
                namespace: Some("team".into()),
                name: "a".into(),
                uid: "u1".into(),
                observed_generation: 3,
                in_force,
                error: error.map(Into::into),
            }],
        })
    }

    fn status(
        acceptance: &Acceptance,
        nodes: &[NodeOutcome],
        previous: Option<&PolicyStatus>,
    ) -> PolicyStatus {
        policy_status(
            "EgressPolicy",
            Some("team"),
            "a",
            acceptance,
            nodes,
            previous,
            "2026-12-03T10:00:00Z",
        )
    }

    fn summary(status: &PolicyStatus) -> Vec<(String, String, String)> {
        status
            .conditions
            .iter()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect()
    }

    fn valid() -> Acceptance {
        Acceptance {
            uid: "u1".into(),
            generation: 3,
            valid_generation: Some(3),
            rules: Some(2),
            refused: None,
        }
    }

    #[test]
    fn a_report_of_a_deleted_namesake_does_not_count() {
        let made_again = Acceptance {
            uid: "u2".into(),
            ..valid()
        };
        let status = status(&made_again, &[report("n1", Some(3), None)], None);
        assert_eq!(status.nodes.unwrap().enforced, 0);
    }

    #[test]
    fn counts_the_nodes_that_enforce_the_accepted_generation() {
        let nodes = [
            report("n1", Some(3), None),
            report("n2", Some(2), None),
            NodeOutcome::Unreachable {
                node: "n3".into(),
                why: "connection refused".into(),
            },
            report(
                "n4",
                Some(2),
                Some("map TG_RULES_V4 holds at most 8 entries"),
            ),
        ];
        let status = status(&valid(), &nodes, None);
        let counts = status.nodes.clone().unwrap();
        assert_eq!((counts.desired, counts.enforced), (4, 1));
        assert_eq!(
            counts.failed,
            [
                NodeFailure {
                    node: "n3".into(),
                    reason: "agent unreachable: connection refused".into()
                },
                NodeFailure {
                    node: "n4".into(),
                    reason: "map TG_RULES_V4 holds at most 8 entries".into()
                },
            ]
        );
        assert_eq!(
            summary(&status),
            [
                ("Accepted".into(), "True".into(), "Valid".into()),
                ("Enforced".into(), "False".into(), "NodeFailures".into())
            ]
        );
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.rules, Some(2));
    }

    #[test]
    fn a_refused_generation_says_why_and_what_stays_in_force() {
        let refused = Acceptance {
            uid: "u1".into(),
            generation: 4,
            valid_generation: Some(3),
            rules: Some(2),
            refused: Some(
                "spec.egress[0].to[0].cidr: \"10.0.0.0/33\" is not a valid prefix".into(),
            ),
        };
        let status = status(
            &refused,
            &[report("n1", Some(3), Some("generation 4 is invalid: ..."))],
            None,
        );
        assert_eq!(
            summary(&status),
            [
                ("Accepted".into(), "False".into(), "Invalid".into()),
                ("Enforced".into(), "True".into(), "AllNodes".into())
            ]
        );
        assert_eq!(
            status.conditions[0].message,
            "generation 4 is invalid; generation 3 stays in force:\nspec.egress[0].to[0].cidr: \"10.0.0.0/33\" is not a valid prefix"
        );
        // The refusal is the resource's, not the node's.
        assert!(status.nodes.unwrap().failed.is_empty());
    }

    #[test]
    fn transition_times_move_only_when_a_condition_changes() {
        let rolling = status(
            &valid(),
            &[report("n1", Some(3), None), report("n2", None, None)],
            None,
        );
        assert_eq!(summary(&rolling)[1].2, "RollingOut");
        let later = policy_status(
            "EgressPolicy",
            Some("team"),
            "a",
            &valid(),
            &[report("n1", Some(3), None), report("n2", Some(3), None)],
            Some(&rolling),
            "2026-12-03T10:05:00Z",
        );
        assert_eq!(
            later.conditions[0].last_transition_time,
            "2026-12-03T10:00:00Z"
        );
        assert_eq!(
            later.conditions[1].last_transition_time,
            "2026-12-03T10:05:00Z"
        );
        assert_eq!(summary(&later)[1].1, "True");
    }

    #[test]
    fn failed_nodes_are_listed_up_to_a_bound_and_counted_in_full() {
        let nodes: Vec<_> = (0..50)
            .map(|i| report(&format!("n{i:02}"), None, Some("compile failed")))
            .collect();
        let status = status(&valid(), &nodes, None);
        assert_eq!(
            status.nodes.as_ref().unwrap().failed.len(),
            MAX_FAILED_LISTED
        );
        assert!(
            status.conditions[1]
                .message
                .ends_with("on 0 of 50 nodes; 50 failed")
        );
    }
}
