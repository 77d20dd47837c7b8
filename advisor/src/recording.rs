//! Recorded traffic: the flow and DNS records of docs/flow-records.md and
//! docs/export.md (native JSON, as the `file` and `stdout` sinks write
//! them), or the `Flow` messages of `StreamFlows`, read into one model.
//!
//! The agent's record types borrow from its pipeline and only serialize;
//! the reading types here take the few fields suggesting and replaying
//! need, and ignore the rest, so records of newer agents still read.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use serde::Deserialize;
use tollgate_policy::{
    record_protocol,
    select::{Identity, Labels},
};
use tollgate_proto::v1 as api;

/// Flows and DNS answers, from one source or several.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recording {
    pub flows: Vec<Flow>,
    pub answers: Vec<Answer>,
    /// Records the agent reported as lost (loss markers' counts): the
    /// recording is missing that many.
    pub lost: u64,
    /// Flows whose source cannot be named as a workload (a host cgroup
    /// already gone when the record was made): left out.
    pub unplaced: u64,
}

/// One flow record: a decision, or an interval's aggregate of allowed ones.
#[derive(Clone, Debug, PartialEq)]
pub struct Flow {
    pub source: Source,
    pub verdict: Verdict,
    /// IP protocol number.
    pub protocol: u8,
    pub ip: IpAddr,
    pub port: u16,
    /// The name the agent says the source resolved `ip` from.
    pub fqdn: Option<String>,
    /// The deciding policy and rule, as recorded.
    pub policy: Option<String>,
    pub rule: String,
    pub evidence: Evidence,
}

/// What the agent knew of the sending endpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Source {
    pub node: String,
    pub cgroup_id: u64,
    /// Below the cgroup2 mount.
    pub cgroup: Option<String>,
    pub kind: SourceKind,
    pub workload: Workload,
    /// The pod's labels the agent was configured to report.
    pub labels: Labels,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceKind {
    Pod,
    UnknownPod,
    Host,
}

/// What a suggested policy is for: a pod's controller (a Deployment,
/// DaemonSet, StatefulSet, Job, ...), a pod without one, or a cgroup.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Workload {
    Controller {
        namespace: String,
        kind: String,
        name: String,
    },
    Pod {
        namespace: String,
        name: String,
    },
    Cgroup(String),
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Controller {
                namespace,
                kind,
                name,
            } => write!(f, "{kind} {namespace}/{name}"),
            Self::Pod { namespace, name } => write!(f, "Pod {namespace}/{name}"),
            Self::Cgroup(path) => write!(f, "cgroup {path}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Allowed,
    Denied,
    Audit,
}

impl Verdict {
    /// Whether the connection went through (an audit is a deny that only
    /// observed).
    pub fn went_through(self) -> bool {
        self != Self::Denied
    }
}

/// How often and when something was seen, and by which processes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evidence {
    pub count: u64,
    /// RFC 3339 with nine fractional digits, UTC: ordered as text.
    pub first_seen: String,
    pub last_seen: String,
    /// Command names.
    pub processes: BTreeSet<String>,
}

impl Evidence {
    pub fn merge(&mut self, other: &Evidence) {
        self.count += other.count;
        if other.first_seen < self.first_seen {
            self.first_seen.clone_from(&other.first_seen);
        }
        if other.last_seen > self.last_seen {
            self.last_seen.clone_from(&other.last_seen);
        }
        self.processes.extend(other.processes.iter().cloned());
    }
}

/// A DNS answer an endpoint received: the question and the addresses at
/// the end of its CNAME chain.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub node: String,
    pub cgroup_id: u64,
    pub query: String,
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ReadError {
    pub line: usize,
    pub message: String,
}

impl Recording {
    /// Adds the records of JSON lines (the native format of the `file` and
    /// `stdout` sinks). Blank lines are skipped; any other line that is not
    /// a record is an error naming it.
    pub fn read_json_lines(&mut self, text: &str) -> Result<(), ReadError> {
        for (index, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let error = |message: String| ReadError {
                line: index + 1,
                message,
            };
            match serde_json::from_str::<Line>(line).map_err(|e| error(e.to_string()))? {
                Line::Flow(flow) => self.add_flow(*flow).map_err(error)?,
                Line::Dns(dns) => self.add_answer(dns),
                Line::Loss(loss) => self.lost += loss.count,
            }
        }
        Ok(())
    }

    /// Adds flows as `StreamFlows` sends them. These carry no interval
    /// count: each stands for one connection.
    pub fn add_api_flows<'a>(
        &mut self,
        flows: impl IntoIterator<Item = &'a api::Flow>,
    ) -> Result<(), ReadError> {
        for (index, flow) in flows.into_iter().enumerate() {
            let src = flow.src.clone().unwrap_or_default();
            let dst = flow.dst.clone().unwrap_or_default();
            let line = FlowLine {
                time: flow.time.clone(),
                node: flow.node.clone(),
                verdict: flow.verdict.clone(),
                protocol: flow.protocol.clone(),
                src: SourceLine {
                    cgroup_id: src.cgroup_id,
                    cgroup: src.cgroup,
                    comm: src.comm,
                    identity: src.identity,
                    namespace: src.namespace,
                    pod: src.pod,
                    workload: src.workload.map(|w| WorkloadLine {
                        kind: w.kind,
                        name: w.name,
                    }),
                    labels: Some(src.labels.into_iter().collect()),
                },
                dst: DestinationLine {
                    ip: dst.ip,
                    port: dst.port,
                    fqdn: dst.fqdn,
                },
                policy: flow.policy.clone(),
                rule: flow.rule.clone(),
                summary: None,
            };
            self.add_flow(line).map_err(|message| ReadError {
                line: index + 1,
                message,
            })?;
        }
        Ok(())
    }

    fn add_flow(&mut self, line: FlowLine) -> Result<(), String> {
        let verdict = match line.verdict.as_str() {
            "allowed" => Verdict::Allowed,
            "denied" => Verdict::Denied,
            "audit" => Verdict::Audit,
            other => return Err(format!("unknown verdict {other:?}")),
        };
        let protocol = record_protocol::number(&line.protocol)
            .ok_or_else(|| format!("unknown protocol {:?}", line.protocol))?;
        let ip = line
            .dst
            .ip
            .parse()
            .map_err(|_| format!("dst.ip {:?} is not an address", line.dst.ip))?;
        let port = u16::try_from(line.dst.port)
            .map_err(|_| format!("dst.port {} is not a port", line.dst.port))?;
        let process = line.src.comm.clone();
        let Some(source) = line.src.into_source(line.node) else {
            self.unplaced += 1;
            return Ok(());
        };
        let (count, first_seen, last_seen) = match line.summary {
            Some(summary) => (summary.count, summary.first_time, summary.last_time),
            None => (1, line.time.clone(), line.time),
        };
        self.flows.push(Flow {
            source,
            verdict,
            protocol,
            ip,
            port,
            fqdn: line.dst.fqdn,
            policy: line.policy,
            rule: line.rule,
            evidence: Evidence {
                count,
                first_seen,
                last_seen,
                // The packet hooks cannot know the sending task.
                processes: BTreeSet::from_iter((!process.is_empty()).then_some(process)),
            },
        });
        Ok(())
    }

    fn add_answer(&mut self, dns: DnsLine) {
        // An answer the kernel refused taught nothing, whatever it says.
        if dns.refused.is_some() || dns.rcode != "NOERROR" {
            return;
        }
        let addresses: Vec<IpAddr> = dns
            .answers
            .iter()
            .filter(|a| a.kind == "A" || a.kind == "AAAA")
            .filter_map(|a| a.data.parse().ok())
            .collect();
        if addresses.is_empty() {
            return;
        }
        self.answers.push(Answer {
            node: dns.node,
            cgroup_id: dns.src.cgroup_id,
            query: dns.query.trim_end_matches('.').to_ascii_lowercase(),
            addresses,
        });
    }

    /// The names each flow's destination was learned under: the flow's own
    /// `dst.fqdn`, and the questions of the DNS answers its endpoint
    /// received that hold the address. In the order of `flows`.
    pub fn learned_names(&self) -> Vec<BTreeSet<&str>> {
        let mut by_endpoint: HashMap<(&str, u64, IpAddr), BTreeSet<&str>> = HashMap::new();
        for answer in &self.answers {
            for &ip in &answer.addresses {
                by_endpoint
                    .entry((&answer.node, answer.cgroup_id, ip))
                    .or_default()
                    .insert(&answer.query);
            }
        }
        self.flows
            .iter()
            .map(|flow| {
                let mut names = by_endpoint
                    .get(&(flow.source.node.as_str(), flow.source.cgroup_id, flow.ip))
                    .cloned()
                    .unwrap_or_default();
                names.extend(flow.fqdn.as_deref());
                names
            })
            .collect()
    }
}

impl Source {
    /// How the policy core's selection sees this endpoint. A pod's
    /// namespace labels are not recorded: the one every namespace has,
    /// `kubernetes.io/metadata.name`, is made from its name.
    pub fn identity<'a>(&'a self, namespace_labels: &'a mut Labels) -> Identity<'a> {
        match (&self.kind, &self.workload) {
            (
                SourceKind::Pod,
                Workload::Controller { namespace, .. } | Workload::Pod { namespace, .. },
            ) => {
                namespace_labels.clear();
                namespace_labels.insert("kubernetes.io/metadata.name".into(), namespace.clone());
                Identity::Pod {
                    namespace,
                    labels: &self.labels,
                    namespace_labels,
                }
            }
            (SourceKind::UnknownPod, _) => Identity::UnknownPod,
            _ => Identity::Host,
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Line {
    Flow(Box<FlowLine>),
    Dns(DnsLine),
    Loss(LossLine),
}

#[derive(Deserialize)]
struct FlowLine {
    time: String,
    node: String,
    verdict: String,
    protocol: String,
    src: SourceLine,
    dst: DestinationLine,
    policy: Option<String>,
    rule: String,
    #[serde(default)]
    summary: Option<SummaryLine>,
}

#[derive(Deserialize)]
struct SourceLine {
    cgroup_id: u64,
    cgroup: Option<String>,
    comm: String,
    identity: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    pod: Option<String>,
    #[serde(default)]
    workload: Option<WorkloadLine>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

impl SourceLine {
    /// None when the source cannot be named: a host cgroup already gone.
    fn into_source(self, node: String) -> Option<Source> {
        let kind = match self.identity.as_str() {
            "pod" => SourceKind::Pod,
            "unknown-pod" => SourceKind::UnknownPod,
            _ => SourceKind::Host,
        };
        let workload = match (kind, self.namespace, self.pod, self.workload) {
            (SourceKind::Pod, Some(namespace), _, Some(workload)) => Workload::Controller {
                namespace,
                kind: workload.kind,
                name: workload.name,
            },
            (SourceKind::Pod, Some(namespace), Some(name), None) => {
                Workload::Pod { namespace, name }
            }
            _ => Workload::Cgroup(self.cgroup.clone()?),
        };
        Some(Source {
            node,
            cgroup_id: self.cgroup_id,
            cgroup: self.cgroup,
            kind,
            workload,
            labels: self.labels.unwrap_or_default(),
        })
    }
}

#[derive(Deserialize)]
struct WorkloadLine {
    kind: String,
    name: String,
}

#[derive(Deserialize)]
struct DestinationLine {
    ip: String,
    port: u32,
    #[serde(default)]
    fqdn: Option<String>,
}

#[derive(Deserialize)]
struct SummaryLine {
    count: u64,
    first_time: String,
    last_time: String,
}

#[derive(Deserialize)]
struct DnsLine {
    node: String,
    src: DnsSourceLine,
    query: String,
    rcode: String,
    #[serde(default)]
    answers: Vec<DnsAnswerLine>,
    #[serde(default)]
    refused: Option<String>,
}

#[derive(Deserialize)]
struct DnsSourceLine {
    cgroup_id: u64,
}

#[derive(Deserialize)]
struct DnsAnswerLine {
    #[serde(rename = "type")]
    kind: String,
    data: String,
}

#[derive(Deserialize)]
struct LossLine {
    count: u64,
}
