//! Elastic Common Schema 8.11, as nested JSON objects: Elastic `_bulk`,
//! Filebeat and Elastic Agent take it as it is. Fields ECS has no name for
//! go under `tollgate.*`, named as in the native records. Absent values are
//! left out.

use std::{net::IpAddr, slice};

use serde::Serialize;

use super::{
    ArrayOf, AsString, LabelList, LossMessage, Severity, Verdict, event_name, label_list,
    loss_reason, put_json, transport_name,
};
use crate::{
    export::record::{DnsAnswer, DnsRecord, LossRecord, Record},
    flow::{FlowRecord, Source},
    pods::directory::Workload,
};
use tollgate_policy::record_protocol;

const ECS_VERSION: &str = "8.11.0";

pub(super) fn write(record: Record, out: &mut Vec<u8>) {
    let base = Base {
        action: event_name(record),
        severity: Severity::of(record).cef(),
    };
    match record {
        Record::Flow(flow) => put_json(&flow_document(flow, base), out),
        Record::Dns(dns) => put_json(&dns_document(dns, base), out),
        Record::Loss(loss) => put_json(&loss_document(loss, base), out),
    }
}

/// What every document takes from the record's kind.
struct Base {
    action: &'static str,
    severity: u8,
}

#[derive(Serialize)]
struct Document<'a, T> {
    #[serde(rename = "@timestamp")]
    timestamp: &'a str,
    ecs: Ecs,
    event: Event<'a>,
    host: Host<'a>,
    observer: Observer,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<AsString<LossMessage<'a>>>,
    #[serde(flatten)]
    source: Option<SourceFields<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination: Option<Destination<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    network: Option<Network<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<Rule<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dns: Option<Dns<'a>>,
    tollgate: T,
}

impl<'a, T> Document<'a, T> {
    /// A document with the fields every record has.
    fn new(time: &'a str, node: &'a str, event: Event<'a>, tollgate: T) -> Self {
        Self {
            timestamp: time,
            ecs: Ecs {
                version: ECS_VERSION,
            },
            event,
            host: Host { name: node },
            observer: Observer {
                product: "Tollgate",
                vendor: "Tollgate",
                kind: "firewall",
                version: env!("CARGO_PKG_VERSION"),
            },
            message: None,
            source: None,
            destination: None,
            network: None,
            rule: None,
            dns: None,
            tollgate,
        }
    }
}

#[derive(Serialize)]
struct Ecs {
    version: &'static str,
}

#[derive(Serialize)]
struct Event<'a> {
    kind: &'static str,
    category: &'static [&'static str],
    #[serde(rename = "type")]
    types: &'static [&'static str],
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'static str>,
    severity: u8,
    dataset: &'static str,
    module: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    start: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end: Option<&'a str>,
}

impl<'a> Event<'a> {
    /// A network event of the `tollgate.<dataset>` dataset.
    fn new(base: Base, dataset: &'static str, types: &'static [&'static str]) -> Self {
        Self {
            kind: "event",
            category: &["network"],
            types,
            action: base.action,
            outcome: None,
            severity: base.severity,
            dataset,
            module: "tollgate",
            sequence: None,
            start: None,
            end: None,
        }
    }
}

#[derive(Serialize)]
struct Host<'a> {
    name: &'a str,
}

#[derive(Serialize)]
struct Observer {
    product: &'static str,
    vendor: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    version: &'static str,
}

/// The endpoint's process, pod and container.
#[derive(Serialize)]
struct SourceFields<'a> {
    process: Process<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    orchestrator: Option<Orchestrator<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<Container<'a>>,
}

/// The record's ids are the task's real ids (`bpf_get_current_uid_gid`
/// reads `current_cred()->uid` and `->gid`), so they are ECS's
/// `real_user`/`real_group`; ECS's `user`/`group` of a process are the
/// effective ids, which the kernel side does not read.
#[derive(Serialize)]
struct Process<'a> {
    pid: u32,
    name: &'a str,
    thread: Id<u32>,
    real_user: Id<AsString<u32>>,
    real_group: Id<AsString<u32>>,
}

#[derive(Serialize)]
struct Id<T> {
    id: T,
}

#[derive(Serialize)]
struct Orchestrator<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    resource: Resource<'a>,
}

#[derive(Serialize)]
struct Resource<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<Parent<'a>>,
    /// As `key:value`, not ECS's `labels` object (`LabelPair`).
    #[serde(skip_serializing_if = "Option::is_none")]
    label: Option<LabelList<'a>>,
}

#[derive(Serialize)]
struct Parent<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
}

#[derive(Serialize)]
struct Container<'a> {
    id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

fn source_fields<'a>(src: &'a Source<'a>) -> SourceFields<'a> {
    SourceFields {
        process: Process {
            pid: src.pid,
            name: &src.comm,
            thread: Id { id: src.tid },
            real_user: Id {
                id: AsString(src.uid),
            },
            real_group: Id {
                id: AsString(src.gid),
            },
        },
        orchestrator: src.pod_uid.map(|pod_uid| Orchestrator {
            kind: "kubernetes",
            namespace: src.namespace,
            resource: Resource {
                kind: "pod",
                name: src.pod,
                id: pod_uid,
                parent: src.workload.map(|workload| Parent {
                    kind: &workload.kind,
                }),
                label: src.labels.map(label_list),
            },
        }),
        container: src.container.as_ref().map(|container| Container {
            id: container.id,
            name: container.name,
        }),
    }
}

#[derive(Serialize)]
struct Destination<'a> {
    ip: IpAddr,
    port: u16,
    /// The name the source resolved the address from, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<&'a str>,
}

#[derive(Serialize)]
struct Network<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    transport: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iana_number: Option<AsString<u8>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol: Option<&'static str>,
    #[serde(rename = "type")]
    kind: &'static str,
    direction: &'static str,
}

fn ip_version(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "ipv4" } else { "ipv6" }
}

#[derive(Serialize)]
struct Rule<'a> {
    name: &'a str,
    id: AsString<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ruleset: Option<&'a str>,
}

/// Tollgate's view of the source, without an ECS name.
#[derive(Serialize)]
struct TollgateSource<'a> {
    cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    identity: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    workload: Option<&'a Workload>,
}

fn tollgate_source<'a>(src: &Source<'a>) -> TollgateSource<'a> {
    TollgateSource {
        cgroup_id: src.cgroup_id,
        cgroup: src.cgroup,
        identity: src.identity,
        workload: src.workload,
    }
}

#[derive(Serialize)]
struct FlowFields<'a> {
    verdict: &'static str,
    mode: &'static str,
    hook: &'static str,
    /// Where `rule.ruleset` came from: ECS's rule fields have no place.
    #[serde(skip_serializing_if = "Option::is_none")]
    policy_source: Option<&'a str>,
    #[serde(flatten)]
    source: TollgateSource<'a>,
    generation: u32,
    socket_cookie: u64,
    /// ECS has no count of events: interval aggregates carry theirs here.
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<SummaryCount>,
}

#[derive(Serialize)]
struct SummaryCount {
    count: u64,
}

fn flow_document<'a>(flow: &'a FlowRecord<'a>, base: Base) -> Document<'a, FlowFields<'a>> {
    // An audit flow went through: ECS's "allowed", and event.action
    // (`flow-audit`) and tollgate.verdict say that policy denies it.
    let (types, outcome): (&'static [&'static str], _) = match Verdict::of(flow) {
        Verdict::Allowed | Verdict::Audit => (&["connection", "allowed"], "success"),
        Verdict::Denied => (&["connection", "denied"], "failure"),
        Verdict::Unknown => (&["connection"], "unknown"),
    };
    let summary = flow.summary.as_ref();
    let mut event = Event::new(base, "tollgate.flow", types);
    event.outcome = Some(outcome);
    event.sequence = Some(flow.seq);
    event.start = summary.map(|s| s.first_time.as_str());
    event.end = summary.map(|s| s.last_time.as_str());
    let fields = FlowFields {
        verdict: flow.verdict,
        mode: flow.mode,
        hook: flow.hook,
        policy_source: flow.policy_source,
        source: tollgate_source(&flow.src),
        generation: flow.generation,
        socket_cookie: flow.socket_cookie,
        summary: summary.map(|s| SummaryCount { count: s.count }),
    };
    let mut document = Document::new(&flow.time, flow.node, event, fields);
    document.source = Some(source_fields(&flow.src));
    document.destination = Some(Destination {
        ip: flow.dst.ip,
        port: flow.dst.port,
        domain: flow.dst.fqdn,
    });
    document.network = Some(Network {
        transport: transport_name(&flow.protocol),
        iana_number: record_protocol::number(&flow.protocol).map(AsString),
        protocol: None,
        kind: ip_version(flow.dst.ip),
        direction: "egress",
    });
    document.rule = Some(Rule {
        name: &flow.rule,
        id: AsString(flow.rule_id),
        ruleset: flow.policy,
    });
    document
}

type Answers<'a, U> = ArrayOf<slice::Iter<'a, DnsAnswer<'a>>, U>;

#[derive(Serialize)]
struct Dns<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    question: Question<'a>,
    response_code: &'a str,
    answers: Answers<'a, Answer<'a>>,
    resolved_ip: Answers<'a, &'a str>,
}

#[derive(Serialize)]
struct Question<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
}

#[derive(Serialize)]
struct Answer<'a> {
    name: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    data: &'a str,
    ttl: u32,
}

#[derive(Serialize)]
struct DnsFields<'a> {
    learned: bool,
    #[serde(flatten)]
    source: TollgateSource<'a>,
}

fn dns_document<'a>(dns: &'a DnsRecord<'a>, base: Base) -> Document<'a, DnsFields<'a>> {
    let mut event = Event::new(base, "tollgate.dns", &["protocol"]);
    event.sequence = Some(dns.seq);
    let fields = DnsFields {
        learned: dns.learned,
        source: tollgate_source(&dns.src),
    };
    let mut document = Document::new(&dns.time, dns.node, event, fields);
    document.source = Some(source_fields(&dns.src));
    // The resolver, as ECS's DNS answer events have the server.
    document.destination = Some(Destination {
        ip: dns.resolver.ip,
        port: dns.resolver.port,
        domain: None,
    });
    document.network = Some(Network {
        transport: None,
        iana_number: None,
        protocol: Some("dns"),
        kind: ip_version(dns.resolver.ip),
        direction: "egress",
    });
    document.dns = Some(Dns {
        kind: "answer",
        question: Question {
            name: &dns.query,
            kind: &dns.query_type,
        },
        response_code: &dns.rcode,
        answers: ArrayOf {
            items: dns.answers.iter(),
            item: |answer| {
                Some(Answer {
                    name: &answer.name,
                    kind: answer.kind,
                    data: &answer.data,
                    ttl: answer.ttl,
                })
            },
        },
        resolved_ip: ArrayOf {
            items: dns.answers.iter(),
            item: |answer| matches!(answer.kind, "A" | "AAAA").then_some(answer.data.as_ref()),
        },
    });
    document
}

#[derive(Serialize)]
struct LossFields<'a> {
    loss: Loss<'a>,
}

#[derive(Serialize)]
struct Loss<'a> {
    count: u64,
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    sink: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seq: Option<u64>,
}

fn loss_document(loss: &LossRecord, base: Base) -> Document<'_, LossFields<'_>> {
    let mut event = Event::new(base, "tollgate.loss", &["info"]);
    event.outcome = Some("failure");
    event.sequence = loss.seq;
    let fields = LossFields {
        loss: Loss {
            count: loss.count,
            reason: loss_reason(loss.reason),
            sink: loss.sink.as_deref(),
            first_seq: loss.first_seq,
            last_seq: loss.last_seq,
        },
    };
    let mut document = Document::new(&loss.time, &loss.node, event, fields);
    document.message = Some(AsString(LossMessage(loss)));
    document
}
