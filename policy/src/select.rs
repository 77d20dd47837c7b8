//! Which policies select which endpoints. An endpoint is a cgroup: a pod's
//! (selected by `podSelector` and `namespaceSelector` through the pod's
//! labels) or any other (selected by `cgroupSelector.paths`).

use std::collections::BTreeMap;

use super::{
    cgroup_glob,
    model::{LabelRequirement, LabelSelector, PodSelector, Policy},
};

pub type Labels = BTreeMap<String, String>;

/// What the agent knows of the processes in one cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity<'a> {
    /// Not a pod's cgroup, or a node without Kubernetes.
    Host,
    /// A pod whose metadata, and its namespace's, are known.
    Pod {
        namespace: &'a str,
        labels: &'a Labels,
        namespace_labels: &'a Labels,
    },
    /// A pod's cgroup (by kubelet's layout) whose metadata is not known yet.
    UnknownPod,
}

/// A cgroup to decide policies for.
#[derive(Clone, Copy, Debug)]
pub struct Endpoint<'a> {
    pub cgroup_id: u64,
    /// Relative to the cgroup2 mount ("/" is the root).
    pub path: &'a str,
    pub identity: Identity<'a>,
}

/// cgroup id -> indexes of the policies that select it. Unknown pods get
/// `unknown_pod_policy` as well, when there is one (unknownPodAction deny).
/// Endpoints no policy selects are left out.
pub fn select_endpoints<'a>(
    policies: &[Policy],
    endpoints: impl IntoIterator<Item = Endpoint<'a>>,
    unknown_pod_policy: Option<usize>,
) -> BTreeMap<u64, Vec<usize>> {
    let mut selected = BTreeMap::new();
    for endpoint in endpoints {
        let mut selecting: Vec<usize> = policies
            .iter()
            .enumerate()
            .filter(|(_, p)| selects(p, &endpoint))
            .map(|(i, _)| i)
            .collect();
        if endpoint.identity == Identity::UnknownPod {
            selecting.extend(unknown_pod_policy);
        }
        if !selecting.is_empty() {
            selected.insert(endpoint.cgroup_id, selecting);
        }
    }
    selected
}

/// Whether `policy` selects `endpoint` (by its cgroup path or its pod's
/// labels); [`select_endpoints`] of one policy.
pub fn selects(policy: &Policy, endpoint: &Endpoint) -> bool {
    let by_path = policy
        .selector
        .cgroups
        .iter()
        .any(|glob| cgroup_glob::matches(glob, endpoint.path));
    let by_labels = match (&policy.selector.pods, endpoint.identity) {
        (
            Some(pods),
            Identity::Pod {
                namespace,
                labels,
                namespace_labels,
            },
        ) => pods_match(
            pods,
            policy.key.namespace.as_deref(),
            namespace,
            labels,
            namespace_labels,
        ),
        _ => false,
    };
    by_path || by_labels
}

/// NetworkPolicy's rule: without a namespaceSelector a policy selects pods
/// of its own namespace (a policy without a namespace: of every namespace);
/// with one, pods of the namespaces it matches.
fn pods_match(
    selector: &PodSelector,
    policy_namespace: Option<&str>,
    namespace: &str,
    labels: &Labels,
    namespace_labels: &Labels,
) -> bool {
    let in_namespace = match (&selector.namespaces, policy_namespace) {
        (Some(namespaces), _) => namespaces.matches(namespace_labels),
        (None, Some(own)) => own == namespace,
        (None, None) => true,
    };
    in_namespace && selector.pods.matches(labels)
}

impl LabelSelector {
    /// Kubernetes' meaning: every matchLabels pair and every expression must
    /// hold; the empty selector matches everything.
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
            && self.match_expressions.iter().all(|r| r.matches(labels))
    }
}

impl LabelRequirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Self::In { key, values } => labels.get(key).is_some_and(|v| values.contains(v)),
            Self::NotIn { key, values } => labels.get(key).is_none_or(|v| !values.contains(v)),
            Self::Exists { key } => labels.contains_key(key),
            Self::DoesNotExist { key } => !labels.contains_key(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::*;

    fn policy(namespace: Option<&str>, name: &str, selector: Selector) -> Policy {
        Policy {
            key: PolicyKey {
                namespace: namespace.map(Into::into),
                name: name.into(),
            },
            mode: PolicyMode::Inherit,
            default_action: Action::Deny,
            selector,
            rules: std::sync::Arc::from([]),
        }
    }

    fn host_policy(name: &str, globs: &[&str]) -> Policy {
        let selector = Selector {
            pods: None,
            cgroups: globs.iter().map(|g| g.to_string()).collect(),
        };
        policy(None, name, selector)
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn host(cgroup_id: u64, path: &str) -> Endpoint<'_> {
        Endpoint {
            cgroup_id,
            path,
            identity: Identity::Host,
        }
    }

    #[test]
    fn selects_by_glob() {
        let policies = [
            host_policy("a", &["/app/*"]),
            host_policy("b", &["/app/web", "/db"]),
        ];
        let endpoints = [
            host(1, "/"),
            host(2, "/app"),
            host(3, "/app/web"),
            host(4, "/app/api"),
            host(5, "/db"),
        ];
        let selected = select_endpoints(&policies, endpoints, None);
        assert_eq!(
            selected,
            BTreeMap::from([(3, vec![0, 1]), (4, vec![0]), (5, vec![1])])
        );
    }

    #[test]
    fn label_requirements_follow_kubernetes() {
        let pod = labels(&[("app", "payments"), ("tier", "backend")]);
        let req = |r: LabelRequirement| r.matches(&pod);
        let key = |k: &str| k.to_string();
        let values = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(req(LabelRequirement::In {
            key: key("app"),
            values: values(&["web", "payments"])
        }));
        assert!(!req(LabelRequirement::In {
            key: key("app"),
            values: values(&["web"])
        }));
        assert!(!req(LabelRequirement::In {
            key: key("zone"),
            values: values(&["a"])
        }));
        assert!(req(LabelRequirement::NotIn {
            key: key("app"),
            values: values(&["web"])
        }));
        assert!(!req(LabelRequirement::NotIn {
            key: key("app"),
            values: values(&["payments"])
        }));
        // NotIn holds for a pod without the key, as in Kubernetes.
        assert!(req(LabelRequirement::NotIn {
            key: key("zone"),
            values: values(&["a"])
        }));
        assert!(req(LabelRequirement::Exists { key: key("tier") }));
        assert!(!req(LabelRequirement::Exists { key: key("zone") }));
        assert!(req(LabelRequirement::DoesNotExist { key: key("zone") }));
        assert!(!req(LabelRequirement::DoesNotExist { key: key("tier") }));

        let selector = LabelSelector {
            match_labels: BTreeMap::from([(key("app"), key("payments"))]),
            match_expressions: vec![LabelRequirement::Exists { key: key("zone") }],
        };
        assert!(!selector.matches(&pod), "every requirement must hold");
        assert!(LabelSelector::default().matches(&pod));
        assert!(LabelSelector::default().matches(&Labels::new()));
    }

    #[test]
    fn pod_selectors_take_the_policy_namespace_unless_a_namespace_selector_is_given() {
        let app = |v: &str| LabelSelector {
            match_labels: BTreeMap::from([("app".to_string(), v.to_string())]),
            match_expressions: vec![],
        };
        let pods = |pods, namespaces| Selector {
            pods: Some(PodSelector { pods, namespaces }),
            cgroups: vec![],
        };
        let policies = [
            policy(Some("prod"), "own-namespace", pods(app("payments"), None)),
            policy(None, "cluster-wide", pods(app("payments"), None)),
            policy(
                Some("prod"),
                "by-namespace-labels",
                pods(
                    LabelSelector::default(),
                    Some(LabelSelector {
                        match_labels: BTreeMap::from([("env".into(), "staging".into())]),
                        match_expressions: vec![],
                    }),
                ),
            ),
            host_policy("by-path", &["/kubepods.slice/**"]),
        ];
        let payments = labels(&[("app", "payments")]);
        let web = labels(&[("app", "web")]);
        let prod = labels(&[("env", "prod")]);
        let staging = labels(&[("env", "staging")]);
        let pod = |cgroup_id, namespace, labels, namespace_labels| Endpoint {
            cgroup_id,
            path: "/kubepods.slice/x",
            identity: Identity::Pod {
                namespace,
                labels,
                namespace_labels,
            },
        };
        let endpoints = [
            pod(1, "prod", &payments, &prod),
            pod(2, "dev", &payments, &staging),
            pod(3, "prod", &web, &prod),
            Endpoint {
                cgroup_id: 4,
                path: "/kubepods.slice/y",
                identity: Identity::UnknownPod,
            },
            host(5, "/system.slice/sshd.service"),
        ];
        assert_eq!(
            select_endpoints(&policies, endpoints, Some(9)),
            BTreeMap::from([
                (1, vec![0, 1, 3]),
                (2, vec![1, 2, 3]),
                (3, vec![3]),
                (4, vec![3, 9]),
            ])
        );
        assert_eq!(
            select_endpoints(&policies, endpoints, None).get(&4),
            Some(&vec![3]),
            "unknownPodAction allow adds nothing"
        );
    }
}
