//! Validation: API messages in, typed policies out, or every problem at once,
//! each naming its field and the bad value.

use std::collections::{BTreeMap, HashMap};

use ipnet::IpNet;
use tollgate_proto::v1 as api;

use super::{
    document::{FieldError, SourcedPolicy},
    model::*,
};

pub const API_VERSION: &str = "policy.tollgate.dev/v1alpha1";
/// A policy of one namespace's pods; without a namespace (in files and
/// over gRPC only), a host policy.
pub const KIND: &str = "EgressPolicy";
/// A cluster-wide policy: pods of any namespace, and host cgroups.
pub const CLUSTER_KIND: &str = "ClusterEgressPolicy";

/// Validates a whole policy set: each policy, and that no two share a name.
pub fn validate_all(sourced: &[SourcedPolicy]) -> Result<Vec<Policy>, Vec<FieldError>> {
    let mut policies = Vec::new();
    let mut errors = Vec::new();
    let mut seen: HashMap<PolicyKey, usize> = HashMap::new();
    for item in sourced {
        let mut problems = Problems::default();
        let policy = validate(&item.policy, &mut problems);
        if let Some(policy) = &policy
            && let Some(first) = seen.insert(policy.key.clone(), item.document.index)
        {
            problems.push(
                "metadata.name",
                format!("{} is defined twice (also document {first})", policy.key),
            );
        }
        errors.extend(problems.0.into_iter().map(|(path, message)| FieldError {
            document: item.document.clone(),
            path,
            message,
        }));
        policies.extend(policy);
    }
    if errors.is_empty() {
        Ok(policies)
    } else {
        Err(errors)
    }
}

#[derive(Default)]
struct Problems(Vec<(String, String)>);

/// Where a field is, spelled out only when a problem names it: a policy of
/// thousands of rules is validated without formatting a path per rule,
/// peer and port.
#[derive(Clone, Copy)]
enum FieldPath<'a> {
    Root(&'a str),
    Field(&'a FieldPath<'a>, &'a str),
    Item(&'a FieldPath<'a>, &'a str, usize),
}

impl<'a> FieldPath<'a> {
    fn field(&'a self, name: &'a str) -> Self {
        Self::Field(self, name)
    }

    fn item(&'a self, name: &'a str, index: usize) -> Self {
        Self::Item(self, name, index)
    }
}

impl std::fmt::Display for FieldPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Root(name) => f.write_str(name),
            Self::Field(parent, name) => write!(f, "{parent}.{name}"),
            Self::Item(parent, name, index) => write!(f, "{parent}.{name}[{index}]"),
        }
    }
}

impl From<FieldPath<'_>> for String {
    fn from(path: FieldPath<'_>) -> Self {
        path.to_string()
    }
}

impl Problems {
    fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push((path.into(), message.into()));
    }
}

/// Validates one policy; `None` when anything is wrong (all of it in `problems`).
fn validate(policy: &api::EgressPolicy, problems: &mut Problems) -> Option<Policy> {
    let before = problems.0.len();
    if policy.api_version != API_VERSION {
        problems.push(
            "apiVersion",
            format!(
                "{:?} is not supported; use {API_VERSION:?}",
                policy.api_version
            ),
        );
    }
    if policy.kind != KIND && policy.kind != CLUSTER_KIND {
        problems.push(
            "kind",
            format!(
                "{:?} is not supported; use {KIND:?} or {CLUSTER_KIND:?}",
                policy.kind
            ),
        );
    }
    let key = validate_metadata(policy.metadata.as_ref(), problems);
    let Some(spec) = &policy.spec else {
        problems.push("spec", "is required");
        return None;
    };
    if policy.kind == CLUSTER_KIND && !namespace_of(policy).is_empty() {
        problems.push(
            "metadata.namespace",
            format!(
                "{:?}: a {CLUSTER_KIND} belongs to no namespace",
                namespace_of(policy)
            ),
        );
    }

    let mode = match spec.mode.as_str() {
        "" => PolicyMode::Inherit,
        "enforce" => PolicyMode::Enforce,
        "observe" => PolicyMode::Observe,
        other => {
            problems.push(
                "spec.mode",
                format!("{other:?} is not one of \"enforce\", \"observe\""),
            );
            PolicyMode::Inherit
        }
    };
    let default_action = match spec.default_action.as_str() {
        "" | "deny" => Action::Deny,
        "allow" => Action::Allow,
        other => {
            problems.push(
                "spec.defaultAction",
                format!("{other:?} is not one of \"deny\", \"allow\""),
            );
            Action::Deny
        }
    };
    let selector = validate_selector(spec, problems);
    let rules = spec
        .egress
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            validate_rule(
                rule,
                &FieldPath::Root("spec").item("egress", i),
                i,
                problems,
            )
        })
        .collect();

    (problems.0.len() == before).then(|| Policy {
        key: key.expect("no problems means a key"),
        mode,
        default_action,
        selector,
        rules,
    })
}

fn validate_metadata(
    metadata: Option<&api::ObjectMeta>,
    problems: &mut Problems,
) -> Option<PolicyKey> {
    let Some(metadata) = metadata else {
        problems.push("metadata", "is required (metadata.name at least)");
        return None;
    };
    let mut ok = true;
    if metadata.name.is_empty() {
        problems.push("metadata.name", "is required");
        ok = false;
    } else if !is_dns_subdomain(&metadata.name) {
        problems.push(
            "metadata.name",
            format!(
                "{:?} must be lowercase letters, digits, '-' and '.', at most 253 characters",
                metadata.name
            ),
        );
        ok = false;
    }
    if !metadata.namespace.is_empty() && !is_dns_label(&metadata.namespace) {
        problems.push(
            "metadata.namespace",
            format!(
                "{:?} must be lowercase letters, digits and '-', at most 63 characters",
                metadata.namespace
            ),
        );
        ok = false;
    }
    ok.then(|| PolicyKey {
        namespace: (!metadata.namespace.is_empty()).then(|| metadata.namespace.clone()),
        name: metadata.name.clone(),
    })
}

fn namespace_of(policy: &api::EgressPolicy) -> &str {
    policy
        .metadata
        .as_ref()
        .map_or("", |metadata| metadata.namespace.as_str())
}

/// Validates a policy resource of the cluster API: as [`validate_all`], and
/// a namespace's `EgressPolicy` may select pods of that namespace only, so
/// that whoever may write policies in one namespace cannot restrict the
/// egress of other namespaces or of the host. Local policies (files, the
/// gRPC API: root on the node) keep selecting more.
pub fn validate_resource(sourced: &SourcedPolicy) -> Result<Policy, Vec<FieldError>> {
    let validated = validate_all(std::slice::from_ref(sourced));
    let mut errors = Vec::new();
    let policy = &sourced.policy;
    let namespace = namespace_of(policy);
    if policy.kind == KIND && !namespace.is_empty() {
        let spec = policy.spec.clone().unwrap_or_default();
        let use_cluster = format!(
            "an {KIND} selects pods of its own namespace ({namespace}) only; use a {CLUSTER_KIND}"
        );
        for (path, set) in [
            ("spec.namespaceSelector", spec.namespace_selector.is_some()),
            ("spec.cgroupSelector", spec.cgroup_selector.is_some()),
        ] {
            if set {
                errors.push(FieldError {
                    document: sourced.document.clone(),
                    path: path.into(),
                    message: use_cluster.clone(),
                });
            }
        }
    }
    match validated {
        Ok(mut policies) if errors.is_empty() => Ok(policies.remove(0)),
        Ok(_) => Err(errors),
        Err(mut problems) => {
            problems.extend(errors);
            Err(problems)
        }
    }
}

fn validate_selector(spec: &api::EgressPolicySpec, problems: &mut Problems) -> Selector {
    let pods =
        (spec.pod_selector.is_some() || spec.namespace_selector.is_some()).then(|| PodSelector {
            pods: spec
                .pod_selector
                .as_ref()
                .map(|s| validate_label_selector(s, "spec.podSelector", problems))
                .unwrap_or_default(),
            namespaces: spec
                .namespace_selector
                .as_ref()
                .map(|s| validate_label_selector(s, "spec.namespaceSelector", problems)),
        });
    let cgroups = spec
        .cgroup_selector
        .as_ref()
        .map(|s| s.paths.clone())
        .unwrap_or_default();
    for (i, path) in cgroups.iter().enumerate() {
        if let Err(why) = super::cgroup_glob::check(path) {
            problems.push(
                format!("spec.cgroupSelector.paths[{i}]"),
                format!("{path:?} {why}"),
            );
        }
    }
    if pods.is_none() && spec.cgroup_selector.is_none() {
        problems.push(
            "spec",
            "one of podSelector, namespaceSelector or cgroupSelector is required",
        );
    } else if spec.cgroup_selector.is_some() && cgroups.is_empty() {
        problems.push("spec.cgroupSelector.paths", "lists no path");
    }
    Selector { pods, cgroups }
}

fn validate_label_selector(
    selector: &api::LabelSelector,
    path: &str,
    problems: &mut Problems,
) -> LabelSelector {
    for (key, value) in &selector.match_labels {
        check_label(key, value, &format!("{path}.matchLabels"), problems);
    }
    let match_expressions = selector
        .match_expressions
        .iter()
        .enumerate()
        .filter_map(|(i, expression)| {
            let path = format!("{path}.matchExpressions[{i}]");
            if expression.key.is_empty() {
                problems.push(format!("{path}.key"), "is required");
            }
            let key = expression.key.clone();
            let values = expression.values.clone();
            let needs_values = matches!(expression.operator.as_str(), "In" | "NotIn");
            if needs_values && values.is_empty() {
                problems.push(format!("{path}.values"), format!("operator {} needs at least one value", expression.operator));
            }
            if !needs_values && !values.is_empty() && matches!(expression.operator.as_str(), "Exists" | "DoesNotExist") {
                problems.push(format!("{path}.values"), format!("operator {} takes no values", expression.operator));
            }
            match expression.operator.as_str() {
                "In" => Some(LabelRequirement::In { key, values }),
                "NotIn" => Some(LabelRequirement::NotIn { key, values }),
                "Exists" => Some(LabelRequirement::Exists { key }),
                "DoesNotExist" => Some(LabelRequirement::DoesNotExist { key }),
                other => {
                    problems.push(
                        format!("{path}.operator"),
                        format!("{other:?} is not one of \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\""),
                    );
                    None
                }
            }
        })
        .collect();
    LabelSelector {
        match_labels: selector
            .match_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        match_expressions,
    }
}

fn check_label(key: &str, value: &str, path: &str, problems: &mut Problems) {
    let name = key.rsplit('/').next().unwrap_or(key);
    if name.is_empty()
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        problems.push(
            format!("{path}.{key}"),
            format!("{key:?} is not a valid label key"),
        );
    }
    if value.len() > 63
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        problems.push(
            format!("{path}.{key}"),
            format!("{value:?} is not a valid label value"),
        );
    }
}

fn validate_rule(
    rule: &api::EgressRule,
    path: &FieldPath<'_>,
    index: usize,
    problems: &mut Problems,
) -> Rule {
    let action = match rule.action.as_str() {
        "" | "allow" => Action::Allow,
        "deny" => Action::Deny,
        other => {
            problems.push(
                path.field("action"),
                format!("{other:?} is not one of \"allow\", \"deny\""),
            );
            Action::Allow
        }
    };
    // Kept for as long as the policy is in force, one per rule: lists
    // longer than a rule holds inline are trimmed (a filter_map collects
    // into a capacity of at least four).
    let mut to: SmallVec<[Peer; 1]> = rule
        .to
        .iter()
        .enumerate()
        .filter_map(|(i, peer)| validate_peer(peer, &path.item("to", i), problems))
        .collect();
    to.shrink_to_fit();
    let mut ports: SmallVec<[PortSpec; 2]> = rule
        .ports
        .iter()
        .enumerate()
        .filter_map(|(i, port)| validate_port(port, &path.item("ports", i), problems))
        .collect();
    ports.shrink_to_fit();
    let name = if rule.name.is_empty() {
        format!("egress[{index}]").into()
    } else {
        rule.name.as_str().into()
    };
    Rule {
        name,
        action,
        to,
        ports,
    }
}

fn validate_peer(
    peer: &api::EgressPeer,
    path: &FieldPath<'_>,
    problems: &mut Problems,
) -> Option<Peer> {
    match (peer.cidr.is_empty(), peer.fqdn.is_empty()) {
        (true, true) => {
            problems.push(*path, "needs cidr or fqdn");
            None
        }
        (false, false) => {
            problems.push(*path, "has both cidr and fqdn; use one peer for each");
            None
        }
        (false, true) => {
            let net = parse_prefix(&peer.cidr, &path.field("cidr"), problems)?;
            let except = peer
                .except
                .iter()
                .enumerate()
                .filter_map(|(i, text)| {
                    let path = path.item("except", i);
                    let except = parse_prefix(text, &path, problems)?;
                    if !net.contains(&except) || except.prefix_len() <= net.prefix_len() {
                        problems.push(
                            path,
                            format!("{text:?} is not a prefix strictly inside {}", peer.cidr),
                        );
                        return None;
                    }
                    Some(except)
                })
                .collect();
            Some(Peer::Cidr { net, except })
        }
        // An except would be silently meaningless on a name: refused, as
        // the CRD's CEL rule refuses it at admission.
        (true, false) if !peer.except.is_empty() => {
            problems.push(path.field("except"), "applies to a cidr peer only");
            None
        }
        (true, false) => match super::fqdn::parse_pattern(&peer.fqdn) {
            Ok(pattern) => Some(Peer::Fqdn(pattern)),
            Err(why) => {
                problems.push(path.field("fqdn"), format!("{:?} {why}", peer.fqdn));
                None
            }
        },
    }
}

/// A prefix, with any host bits cleared ("10.1.2.3/16" is 10.1.0.0/16).
fn parse_prefix(text: &str, path: &FieldPath<'_>, problems: &mut Problems) -> Option<IpNet> {
    match text.parse::<IpNet>() {
        Ok(IpNet::V6(net))
            if net.prefix_len() >= 96 && net.network().to_ipv4_mapped().is_some() =>
        {
            problems.push(*path, format!("{text:?} is IPv4-mapped; such destinations are judged as IPv4, so write the IPv4 prefix"));
            None
        }
        Ok(net) => Some(net.trunc()),
        Err(_) => {
            problems.push(*path, format!("{text:?} is not a valid prefix"));
            None
        }
    }
}

fn validate_port(
    port: &api::EgressPort,
    path: &FieldPath<'_>,
    problems: &mut Problems,
) -> Option<PortSpec> {
    let protocol = match port.protocol.to_ascii_uppercase().as_str() {
        "" | "ANY" => Protocol::Any,
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        "ICMP" => Protocol::Icmp,
        "ICMPV6" => Protocol::Icmpv6,
        _ => {
            problems.push(
                path.field("protocol"),
                format!(
                    "{:?} is not one of \"TCP\", \"UDP\", \"SCTP\", \"ICMP\", \"ICMPv6\", \"ANY\"",
                    port.protocol
                ),
            );
            return None;
        }
    };
    if !protocol.has_ports() && (port.port.is_some() || port.end_port.is_some()) {
        problems.push(
            path.field("port"),
            format!("{} has no ports; leave port and endPort out", port.protocol),
        );
        return None;
    }
    let check = |value: u32, field: &str, problems: &mut Problems| -> Option<u16> {
        match u16::try_from(value) {
            Ok(v) if v != 0 => Some(v),
            _ => {
                problems.push(
                    path.field(field),
                    format!("{value} is not a port (1-65535)"),
                );
                None
            }
        }
    };
    let ports = match (port.port, port.end_port) {
        (None, None) => PortRange::ANY,
        (None, Some(_)) => {
            problems.push(path.field("endPort"), "needs port");
            return None;
        }
        (Some(first), None) => PortRange::single(check(first, "port", problems)?),
        (Some(first), Some(last)) => {
            let (first, last) = (
                check(first, "port", problems)?,
                check(last, "endPort", problems)?,
            );
            if last < first {
                problems.push(
                    path.field("endPort"),
                    format!("{last} is below port {first}"),
                );
                return None;
            }
            PortRange { first, last }
        }
    };
    Some(PortSpec { ports, protocol })
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::parse_documents;

    fn errors_of(yaml: &str) -> Vec<String> {
        let docs = parse_documents("t.yaml", yaml).expect("parses");
        validate_all(&docs)
            .expect_err("must be invalid")
            .into_iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect()
    }

    const HEAD: &str = "apiVersion: policy.tollgate.dev/v1alpha1\nkind: EgressPolicy\n";

    #[test]
    fn a_full_policy_validates() {
        let yaml = format!(
            "{HEAD}metadata: {{name: payments, namespace: prod}}\nspec:\n  podSelector: {{matchLabels: {{app: payments}}}}\n  mode: observe\n  egress:\n  - name: dns\n    to: [{{cidr: 10.0.0.10/32}}]\n    ports: [{{port: 53, protocol: UDP}}, {{port: 53, protocol: TCP}}]\n  - action: deny\n    to: [{{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}, {{fqdn: '*.Example.com.'}}]\n    ports: [{{port: 8000, endPort: 9000}}]\n"
        );
        let policies = validate_all(&parse_documents("t.yaml", &yaml).unwrap()).unwrap();
        let p = &policies[0];
        assert_eq!(p.key.to_string(), "prod/payments");
        assert_eq!(
            (p.mode, p.default_action),
            (PolicyMode::Observe, Action::Deny)
        );
        assert_eq!(
            p.selector.pods.as_ref().unwrap().pods.match_labels["app"],
            "payments"
        );
        assert_eq!(&*p.rules[0].name, "dns");
        assert_eq!(&*p.rules[1].name, "egress[1]");
        assert_eq!(p.rules[1].action, Action::Deny);
        assert_eq!(
            p.rules[1].to[..],
            [
                Peer::Cidr {
                    net: "10.0.0.0/8".parse().unwrap(),
                    except: ["10.1.0.0/16".parse().unwrap()].into()
                },
                Peer::Fqdn(FqdnPattern::OneLabel("example.com".into()))
            ]
        );
        assert_eq!(
            p.rules[1].ports[..],
            [PortSpec {
                ports: PortRange {
                    first: 8000,
                    last: 9000
                },
                protocol: Protocol::Any
            }]
        );
    }

    #[test]
    fn every_error_is_reported_with_its_path_and_value() {
        let yaml = format!(
            "{HEAD}metadata: {{name: Bad_Name}}\nspec:\n  cgroupSelector: {{paths: [relative]}}\n  mode: block\n  egress:\n  - action: permit\n    to: [{{cidr: 10.0.0.0/33}}, {{cidr: 10.0.0.0/8, except: [192.168.0.0/16]}}, {{}}, {{cidr: '::ffff:10.0.0.0/104'}}, {{fqdn: a.example, except: [10.0.0.0/8]}}]\n    ports: [{{port: 70000}}, {{port: 90, endPort: 80}}, {{endPort: 5}}, {{port: 1, protocol: GRE}}, {{port: 8, protocol: ICMP}}]\n"
        );
        let errors = errors_of(&yaml);
        let expected = [
            "metadata.name: \"Bad_Name\" must be lowercase letters, digits, '-' and '.', at most 253 characters",
            "spec.mode: \"block\" is not one of \"enforce\", \"observe\"",
            "spec.cgroupSelector.paths[0]: \"relative\" must start with '/'",
            "spec.egress[0].action: \"permit\" is not one of \"allow\", \"deny\"",
            "spec.egress[0].to[0].cidr: \"10.0.0.0/33\" is not a valid prefix",
            "spec.egress[0].to[1].except[0]: \"192.168.0.0/16\" is not a prefix strictly inside 10.0.0.0/8",
            "spec.egress[0].to[2]: needs cidr or fqdn",
            "spec.egress[0].to[3].cidr: \"::ffff:10.0.0.0/104\" is IPv4-mapped; such destinations are judged as IPv4, so write the IPv4 prefix",
            "spec.egress[0].to[4].except: applies to a cidr peer only",
            "spec.egress[0].ports[0].port: 70000 is not a port (1-65535)",
            "spec.egress[0].ports[1].endPort: 80 is below port 90",
            "spec.egress[0].ports[2].endPort: needs port",
            "spec.egress[0].ports[3].protocol: \"GRE\" is not one of \"TCP\", \"UDP\", \"SCTP\", \"ICMP\", \"ICMPv6\", \"ANY\"",
            "spec.egress[0].ports[4].port: ICMP has no ports; leave port and endPort out",
        ];
        assert_eq!(errors, expected);
    }

    #[test]
    fn documents_need_their_header_a_selector_and_unique_names() {
        let errors = errors_of("metadata: {name: a}\nspec: {}\n");
        assert_eq!(
            errors,
            [
                "apiVersion: \"\" is not supported; use \"policy.tollgate.dev/v1alpha1\"",
                "kind: \"\" is not supported; use \"EgressPolicy\" or \"ClusterEgressPolicy\"",
                "spec: one of podSelector, namespaceSelector or cgroupSelector is required",
            ]
        );
        let twice = format!(
            "{HEAD}metadata: {{name: a}}\nspec: {{podSelector: {{}}}}\n---\n{HEAD}metadata: {{name: a}}\nspec: {{podSelector: {{}}}}\n"
        );
        assert_eq!(
            errors_of(&twice),
            ["metadata.name: a is defined twice (also document 1)"]
        );
    }

    #[test]
    fn label_selector_expressions() {
        let yaml = format!(
            "{HEAD}metadata: {{name: a}}\nspec:\n  podSelector:\n    matchExpressions:\n    - {{key: tier, operator: In}}\n    - {{key: tier, operator: Exists, values: [x]}}\n    - {{key: tier, operator: Near, values: [x]}}\n"
        );
        assert_eq!(
            errors_of(&yaml),
            [
                "spec.podSelector.matchExpressions[0].values: operator In needs at least one value",
                "spec.podSelector.matchExpressions[1].values: operator Exists takes no values",
                "spec.podSelector.matchExpressions[2].operator: \"Near\" is not one of \"In\", \"NotIn\", \"Exists\", \"DoesNotExist\"",
            ]
        );
    }

    #[test]
    fn a_namespace_policy_selects_its_own_pods_and_a_cluster_policy_has_no_namespace() {
        let namespaced = format!(
            "{HEAD}metadata: {{name: a, namespace: team}}\nspec:\n  namespaceSelector: {{}}\n  cgroupSelector: {{paths: [/x]}}\n"
        );
        let docs = parse_documents("t.yaml", &namespaced).expect("parses");
        // As a local policy (root on the node) it may; as a resource, not.
        assert!(validate_all(&docs).is_ok());
        let errors: Vec<String> = validate_resource(&docs[0])
            .expect_err("a resource may not")
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect();
        assert_eq!(
            errors,
            [
                "spec.namespaceSelector: an EgressPolicy selects pods of its own namespace (team) only; use a ClusterEgressPolicy",
                "spec.cgroupSelector: an EgressPolicy selects pods of its own namespace (team) only; use a ClusterEgressPolicy",
            ]
        );
        let cluster = "apiVersion: policy.tollgate.dev/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {name: a, namespace: team}\nspec: {podSelector: {}}\n";
        assert_eq!(
            errors_of(cluster),
            ["metadata.namespace: \"team\": a ClusterEgressPolicy belongs to no namespace"]
        );
        let cluster_wide = "apiVersion: policy.tollgate.dev/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {name: a}\nspec:\n  namespaceSelector: {}\n  cgroupSelector: {paths: [/x]}\n";
        let docs = parse_documents("t.yaml", cluster_wide).expect("parses");
        assert_eq!(validate_all(&docs).map(|p| p.len()), Ok(1));
    }
}
