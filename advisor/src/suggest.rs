//! Suggested allow-lists: from what each workload was seen doing, a policy
//! that allows exactly that (as exactly as the options say) and denies the
//! rest, in observe mode, with the evidence for every rule beside it.
//!
//! - Destinations learned from DNS answers become `fqdn` rules; names are
//!   collapsed into `*.parent` or `**.parent` only when at least the
//!   threshold of distinct names under that parent were seen.
//! - Other destinations become CIDR rules, covered by prefixes no wider
//!   than the limits; a prefix never mixes cluster-internal (private,
//!   shared, link-local, loopback) and public addresses.
//! - Ports and protocols are those seen, per destination.
//!
//! Only flows that went through (allowed, audit) are evidence: a denied
//! connection is not what the workload needs to keep working.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use tollgate_common::{MAX_PORT_RULES, protocol};
use tollgate_policy::{
    model::FqdnPattern,
    validate::{API_VERSION, CLUSTER_KIND, KIND},
};
use tollgate_proto::v1 as api;

use crate::recording::{Evidence, Flow, Recording, Workload};

/// Rules a cluster resource may have (docs/policies.md, "Validation").
const CLUSTER_RULE_LIMIT: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Distinct names under one parent that make a wildcard for it; below
    /// 2, names are never collapsed.
    pub collapse_threshold: usize,
    /// The widest IPv4 prefix a merge may make (32: addresses as seen).
    pub max_prefix_v4: u8,
    /// The widest IPv6 prefix a merge may make (128: addresses as seen).
    pub max_prefix_v6: u8,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            collapse_threshold: 5,
            max_prefix_v4: 32,
            max_prefix_v6: 128,
        }
    }
}

/// One workload's suggested policy and the evidence for its rules.
#[derive(Clone, Debug, PartialEq)]
pub struct Suggestion {
    pub workload: Workload,
    pub policy: api::EgressPolicy,
    /// By rule name, in the order of the rules.
    pub evidence: Vec<(String, Evidence)>,
}

/// A workload for which no policy can be written, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub workload: Workload,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Suggestions {
    pub policies: Vec<Suggestion>,
    pub skipped: Vec<Skipped>,
}

/// What one rule's destination is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Destination {
    Name(FqdnPattern),
    Prefix(IpNet),
}

/// Port and protocol as a rule states them: (protocol name, port).
type PortSeen = (&'static str, Option<u16>);

pub fn suggest(recording: &Recording, options: &Options) -> Suggestions {
    let names = recording.learned_names();
    let mut by_workload: BTreeMap<&Workload, Vec<(&Flow, &BTreeSet<&str>)>> = BTreeMap::new();
    for (flow, names) in recording.flows.iter().zip(&names) {
        if flow.verdict.went_through() {
            by_workload
                .entry(&flow.source.workload)
                .or_default()
                .push((flow, names));
        }
    }
    let mut suggestions = Suggestions::default();
    for (workload, flows) in by_workload {
        match workload_policy(workload, &flows, options) {
            Ok(suggestion) => suggestions.policies.push(suggestion),
            Err(reason) => suggestions.skipped.push(Skipped {
                workload: workload.clone(),
                reason,
            }),
        }
    }
    suggestions
}

fn workload_policy(
    workload: &Workload,
    flows: &[(&Flow, &BTreeSet<&str>)],
    options: &Options,
) -> Result<Suggestion, &'static str> {
    let (metadata, selector) = select_workload(workload, flows)?;

    // The name each flow is put under: the agent's own dst.fqdn when it
    // gave one, else the first name its endpoint learned the address from.
    let named: Vec<Option<&str>> = flows
        .iter()
        .map(|(flow, names)| flow.fqdn.as_deref().or(names.first().copied()))
        .collect();
    let seen_names: BTreeSet<String> = named.iter().flatten().map(|n| n.to_string()).collect();
    let patterns = collapse_names(&seen_names, options.collapse_threshold);
    let addresses: BTreeSet<IpAddr> = flows
        .iter()
        .zip(&named)
        .filter(|(_, name)| name.is_none())
        .map(|((flow, _), _)| flow.ip)
        .collect();
    let prefixes = cover_addresses(&addresses, options.max_prefix_v4, options.max_prefix_v6);

    let mut rules: BTreeMap<Destination, (BTreeSet<PortSeen>, Evidence)> = BTreeMap::new();
    for ((flow, _), name) in flows.iter().zip(&named) {
        let destination = match name {
            Some(name) => Destination::Name(
                patterns
                    .iter()
                    .find(|p| p.matches(name))
                    .expect("collapsing covers every name")
                    .clone(),
            ),
            None => Destination::Prefix(
                *prefixes
                    .iter()
                    .find(|p| p.contains(&flow.ip))
                    .expect("the prefixes cover every address"),
            ),
        };
        match rules.get_mut(&destination) {
            Some((ports, evidence)) => {
                ports.insert(port_seen(flow));
                evidence.merge(&flow.evidence);
            }
            None => {
                rules.insert(
                    destination,
                    (BTreeSet::from([port_seen(flow)]), flow.evidence.clone()),
                );
            }
        }
    }

    let mut egress = Vec::new();
    let mut evidence = Vec::new();
    // Names first, then internal prefixes, then public ones.
    let mut ordered: Vec<_> = rules.into_iter().collect();
    ordered.sort_by_key(|(destination, _)| match destination {
        Destination::Name(_) => 0,
        Destination::Prefix(net) if is_internal(net) => 1,
        Destination::Prefix(_) => 2,
    });
    for (destination, (ports, seen)) in ordered {
        let (name, peer) = match destination {
            Destination::Name(pattern) => (
                format!("to-{pattern}"),
                api::EgressPeer {
                    fqdn: pattern.to_string(),
                    ..Default::default()
                },
            ),
            Destination::Prefix(net) => (
                format!("to-{net}"),
                api::EgressPeer {
                    cidr: net.to_string(),
                    ..Default::default()
                },
            ),
        };
        egress.push(api::EgressRule {
            name: name.clone(),
            action: "allow".into(),
            to: vec![peer],
            ports: egress_ports(&ports),
        });
        evidence.push((name, seen));
    }
    let mut spec = api::EgressPolicySpec {
        mode: "observe".into(),
        default_action: "deny".into(),
        egress,
        ..Default::default()
    };
    // A namespace's EgressPolicy for pods; host cgroups need a
    // ClusterEgressPolicy to be a cluster resource (and either kind is a
    // local policy).
    let kind = match selector {
        WorkloadSelector::Pods(labels) => {
            spec.pod_selector = Some(api::LabelSelector {
                match_labels: labels.into_iter().collect(),
                match_expressions: vec![],
            });
            KIND
        }
        WorkloadSelector::Cgroup(path) => {
            spec.cgroup_selector = Some(api::CgroupSelector { paths: vec![path] });
            CLUSTER_KIND
        }
    };
    Ok(Suggestion {
        workload: workload.clone(),
        policy: api::EgressPolicy {
            api_version: API_VERSION.into(),
            kind: kind.into(),
            metadata: Some(metadata),
            spec: Some(spec),
        },
        evidence,
    })
}

enum WorkloadSelector {
    Pods(BTreeMap<String, String>),
    Cgroup(String),
}

/// The policy's name and namespace, and how it selects the workload: a
/// pod workload by the labels every one of its records carries (the
/// agent reports the keys of `--pod-label-keys`), a host by its cgroup.
fn select_workload(
    workload: &Workload,
    flows: &[(&Flow, &BTreeSet<&str>)],
) -> Result<(api::ObjectMeta, WorkloadSelector), &'static str> {
    let (namespace, name) = match workload {
        Workload::Controller {
            namespace,
            kind,
            name,
        } => (namespace, format!("{kind}-{name}")),
        Workload::Pod { namespace, name } => (namespace, format!("pod-{name}")),
        Workload::Cgroup(path) => {
            let metadata = api::ObjectMeta {
                name: policy_name(&format!("cgroup-{path}")),
                ..Default::default()
            };
            return Ok((metadata, WorkloadSelector::Cgroup(path.clone())));
        }
    };
    let mut common = flows[0].0.source.labels.clone();
    for (flow, _) in flows {
        common.retain(|key, value| flow.source.labels.get(key) == Some(value));
    }
    if common.is_empty() {
        return Err("its records carry no pod labels to select it by (--pod-label-keys)");
    }
    let metadata = api::ObjectMeta {
        name: policy_name(&name),
        namespace: namespace.clone(),
        ..Default::default()
    };
    Ok((metadata, WorkloadSelector::Pods(common)))
}

/// A metadata.name: lowercase letters, digits and '-', at most 63.
fn policy_name(text: &str) -> String {
    let mut name = String::new();
    for c in text.chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            name.push(c);
        } else if !name.is_empty() && !name.ends_with('-') {
            name.push('-');
        }
    }
    let name = format!("{}-egress", name.trim_end_matches('-'));
    if name.len() <= 63 {
        return name;
    }
    // Keep the end, where paths and names differ.
    name[name.len() - 63..].trim_start_matches('-').to_string()
}

fn port_seen(flow: &Flow) -> PortSeen {
    match flow.protocol {
        protocol::TCP => ("TCP", Some(flow.port)),
        protocol::UDP => ("UDP", Some(flow.port)),
        protocol::SCTP => ("SCTP", Some(flow.port)),
        protocol::ICMP => ("ICMP", None),
        protocol::ICMPV6 => ("ICMPv6", None),
        // A protocol a rule cannot name: every protocol, to this
        // destination only.
        _ => ("ANY", None),
    }
}

/// The ports seen as a rule's `ports`: consecutive ports of one protocol
/// as one range, which holds no port that was not seen.
fn egress_ports(seen: &BTreeSet<PortSeen>) -> Vec<api::EgressPort> {
    let mut ports: Vec<api::EgressPort> = Vec::new();
    for &(protocol, port) in seen {
        let port = port.map(u32::from);
        if let Some(last) = ports.last_mut()
            && last.protocol == protocol
            && let (Some(next), Some(first)) = (port, last.port)
            && next == last.end_port.unwrap_or(first) + 1
        {
            last.end_port = Some(next);
            continue;
        }
        ports.push(api::EgressPort {
            port,
            end_port: None,
            protocol: protocol.into(),
        });
    }
    ports
}

/// Names as patterns: exact names, and a wildcard for a parent when at
/// least `threshold` distinct names under it were seen: `*.parent` when
/// they are one label below it, `**.parent` when they lie at several
/// depths below it. Deeper parents are tried first, and names a wildcard
/// took do not count for another, so every wildcard stands on `threshold`
/// names of its own. A parent has at least two labels (never `*.com`).
pub fn collapse_names(names: &BTreeSet<String>, threshold: usize) -> Vec<FqdnPattern> {
    let labels = |name: &str| name.split('.').count();
    let mut remaining: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let mut patterns = Vec::new();
    if threshold >= 2 {
        let mut parents: Vec<&str> = names
            .iter()
            .flat_map(|name| name.match_indices('.').map(move |(i, _)| &name[i + 1..]))
            .filter(|parent| labels(parent) >= 2)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        parents.sort_by_key(|parent| std::cmp::Reverse(labels(parent)));
        for parent in parents {
            let suffix = format!(".{parent}");
            let below: Vec<&str> = remaining
                .iter()
                .copied()
                .filter(|name| name.ends_with(&suffix))
                .collect();
            let depths: BTreeSet<usize> = below
                .iter()
                .map(|name| labels(name) - labels(parent))
                .collect();
            let direct: Vec<&str> = below
                .iter()
                .copied()
                .filter(|name| labels(name) == labels(parent) + 1)
                .collect();
            let (pattern, taken) = if below.len() >= threshold && depths.len() >= 2 {
                (FqdnPattern::AnyLabels(parent.to_string()), below)
            } else if direct.len() >= threshold {
                (FqdnPattern::OneLabel(parent.to_string()), direct)
            } else {
                continue;
            };
            for name in taken {
                remaining.remove(name);
            }
            patterns.push(pattern);
        }
    }
    patterns.extend(
        remaining
            .into_iter()
            .map(|name| FqdnPattern::Exact(name.to_string())),
    );
    patterns
}

/// Cluster-internal ranges: private, shared (CGNAT), link-local, loopback,
/// unique-local. Pod, service and node addresses live here.
const INTERNAL: [&str; 9] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "127.0.0.0/8",
    "fc00::/7",
    "fe80::/10",
    "::1/128",
];

fn internal_ranges() -> impl Iterator<Item = IpNet> {
    INTERNAL.iter().map(|r| r.parse().expect("a prefix"))
}

/// Whether a prefix lies in one of the cluster-internal ranges.
pub fn is_internal(net: &IpNet) -> bool {
    internal_ranges().any(|range| range.contains(net))
}

/// Prefixes that cover `addresses` and nothing of the other class: each
/// one as short as the addresses it covers make it, never shorter than
/// the limit of its family, inside one internal range or clear of all of
/// them. With limits 32 and 128, the addresses themselves.
pub fn cover_addresses(addresses: &BTreeSet<IpAddr>, max_v4: u8, max_v6: u8) -> Vec<IpNet> {
    let mut groups: BTreeMap<(bool, bool), Vec<IpAddr>> = BTreeMap::new();
    for &ip in addresses {
        let internal = is_internal(&IpNet::from(ip));
        groups.entry((ip.is_ipv4(), internal)).or_default().push(ip);
    }
    let mut prefixes = Vec::new();
    for ((v4, internal), group) in groups {
        let limit = if v4 { max_v4.min(32) } else { max_v6.min(128) };
        let fits = |net: &IpNet| {
            if internal {
                is_internal(net)
            } else {
                !internal_ranges().any(|range| range.contains(net) || net.contains(&range))
            }
        };
        cover(&group, limit, &fits, &mut prefixes);
    }
    prefixes
}

/// Covers sorted addresses of one family with the prefix they share, or,
/// when that is wider than `limit` or does not fit, each half apart.
fn cover(addresses: &[IpAddr], limit: u8, fits: &dyn Fn(&IpNet) -> bool, out: &mut Vec<IpNet>) {
    let (first, last) = (addresses[0], addresses[addresses.len() - 1]);
    let shared = common_prefix(first, last);
    if shared.prefix_len() >= limit && fits(&shared) {
        out.push(shared);
        return;
    }
    let halves = shared
        .subnets(shared.prefix_len() + 1)
        .expect("a prefix shorter than its family's length has halves")
        .collect::<Vec<_>>();
    let split = addresses.partition_point(|ip| halves[0].contains(ip));
    cover(&addresses[..split], limit, fits, out);
    cover(&addresses[split..], limit, fits, out);
}

/// The longest prefix holding both addresses (of one family).
fn common_prefix(a: IpAddr, b: IpAddr) -> IpNet {
    let length = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (a.to_bits() ^ b.to_bits()).leading_zeros(),
        (IpAddr::V6(a), IpAddr::V6(b)) => (a.to_bits() ^ b.to_bits()).leading_zeros(),
        _ => unreachable!("grouped by family"),
    };
    IpNet::new(a, length as u8)
        .expect("a length within the family's")
        .trunc()
}

/// The suggestions as multi-document YAML, each rule preceded by its
/// evidence as a comment, and a note for every workload left out.
pub fn render(suggestions: &Suggestions) -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for skipped in &suggestions.skipped {
        out.push_str(&format!(
            "# No policy for {}: {}\n",
            skipped.workload, skipped.reason
        ));
    }
    for suggestion in &suggestions.policies {
        let total: u64 = suggestion.evidence.iter().map(|(_, e)| e.count).sum();
        out.push_str(&format!(
            "---\n# {}: {} connections seen, {} rules\n",
            suggestion.workload,
            total,
            suggestion.evidence.len()
        ));
        if suggestion.evidence.len() > CLUSTER_RULE_LIMIT {
            out.push_str(&format!(
                "# More than the {CLUSTER_RULE_LIMIT} rules a cluster resource may have: raise the collapse threshold or the prefix limits, or apply it locally\n"
            ));
        }
        let spec = suggestion.policy.spec.clone().unwrap_or_default();
        for rule in spec
            .egress
            .iter()
            .filter(|r| r.ports.len() > MAX_PORT_RULES)
        {
            out.push_str(&format!(
                "# {} has more than the {MAX_PORT_RULES} port rules a prefix may have: the agent refuses it\n",
                rule.name
            ));
        }
        // YAML's mappings keep the messages' field order.
        let mut document = serde_yaml_ng::to_value(&suggestion.policy)?;
        prune_empty(&mut document);
        let yaml = serde_yaml_ng::to_string(&document)?;
        let mut comments = BTreeMap::new();
        for (rule, evidence) in &suggestion.evidence {
            let key = format!("- name: {}", serde_yaml_ng::to_string(rule)?.trim_end());
            comments.insert(key, describe(evidence));
        }
        for line in yaml.lines() {
            if let Some(comment) = comments.get(line.trim_start()) {
                let indent = &line[..line.len() - line.trim_start().len()];
                out.push_str(&format!("{indent}# {comment}\n"));
            }
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// `12 connections, 2026-11-24T08:11:30Z .. 2026-11-25T09:00:00Z, by curl, wget`
fn describe(evidence: &Evidence) -> String {
    let processes: Vec<String> = evidence
        .processes
        .iter()
        .map(|p| p.chars().filter(|c| !c.is_control()).collect())
        .collect();
    let by = if processes.is_empty() {
        String::new()
    } else {
        format!(", by {}", processes.join(", "))
    };
    format!(
        "{} connections, first {}, last {}{by}",
        evidence.count, evidence.first_seen, evidence.last_seen
    )
}

/// Leaves out what a policy file would not write: empty strings, lists
/// and maps, and nulls.
fn prune_empty(value: &mut serde_yaml_ng::Value) {
    use serde_yaml_ng::Value;
    match value {
        Value::Mapping(map) => {
            for (_, field) in map.iter_mut() {
                prune_empty(field);
            }
            map.retain(|_, field| match field {
                Value::Null => false,
                Value::String(s) => !s.is_empty(),
                Value::Sequence(items) => !items.is_empty(),
                Value::Mapping(fields) => !fields.is_empty(),
                _ => true,
            });
        }
        Value::Sequence(items) => items.iter_mut().for_each(prune_empty),
        _ => {}
    }
}
