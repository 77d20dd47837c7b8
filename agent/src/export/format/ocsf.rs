//! OCSF 1.3.0 (schema.ocsf.io/1.3.0): flows are Network Activity (4001),
//! DNS answers DNS Activity (4003), loss markers Event Log Activity (1008).
//! What OCSF has no attribute for goes under `unmapped`, named as in the
//! native records. Absent values are left out, as OCSF does.

use std::{
    fmt::{self, Display},
    net::{IpAddr, SocketAddr},
    slice,
};

use serde::Serialize;

use super::{
    ArrayOf, AsString, LabelList, LossMessage, Severity, Verdict, event_title, label_list,
    loss_reason, policies_with_sources, put_json, transport_name, unix_millis,
};
use crate::{
    export::record::{DnsAnswer, DnsRecord, LossRecord, Record, RecordUid},
    flow::{FlowRecord, Source},
    pods::directory::Workload,
};
use tollgate_policy::record_protocol;

const OCSF_VERSION: &str = "1.3.0";

pub(super) fn write(record: Record, instance: &str, out: &mut Vec<u8>) {
    let severity = Severity::of(record);
    match record {
        Record::Flow(flow) => put_json(&network_activity(flow, instance, severity), out),
        Record::Dns(dns) => put_json(&dns_activity(dns, instance, severity), out),
        Record::Loss(loss) => put_json(&event_log_activity(loss, instance, severity), out),
    }
}

/// Whether `name` is an OCSF `hostname_t`: dot-separated labels of ASCII
/// letters, digits and inner hyphens (the type's regex). DNS names such as
/// `_dmarc.example.com` or a trailing-dot root are not, and go to string
/// attributes instead.
fn is_hostname(name: &str) -> bool {
    let label_ok = |label: &str| {
        let bytes = label.as_bytes();
        !bytes.is_empty()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            && bytes[0] != b'-'
            && bytes[bytes.len() - 1] != b'-'
    };
    name.split('.').all(label_ok)
}

struct Class {
    uid: u32,
    name: &'static str,
    category_uid: u32,
    category_name: &'static str,
}

const NETWORK_ACTIVITY: Class = Class {
    uid: 4001,
    name: "Network Activity",
    category_uid: 4,
    category_name: "Network Activity",
};
const DNS_ACTIVITY: Class = Class {
    uid: 4003,
    name: "DNS Activity",
    category_uid: 4,
    category_name: "Network Activity",
};
/// Loss markers: the class for "actions pertaining to the event logging
/// service". Records that never reached the SIEM are exactly that, and no
/// network class fits an event about the record stream itself. The marker
/// stays recognisable by product, class, `activity_name` and `unmapped.type`.
const EVENT_LOG_ACTIVITY: Class = Class {
    uid: 1008,
    name: "Event Log Activity",
    category_uid: 1,
    category_name: "System Activity",
};

struct Activity {
    id: u32,
    name: &'static str,
    /// The caption of `type_uid`.
    type_name: &'static str,
}

/// `connect()` (TCP, and connected UDP) opens a connection: the record is
/// the attempt, and action and disposition say whether it got through.
const OPEN: Activity = Activity {
    id: 1,
    name: "Open",
    type_name: "Network Activity: Open",
};
/// `sendmsg()` on an unconnected UDP socket opens nothing: the record
/// reports traffic of a connectionless flow.
const TRAFFIC: Activity = Activity {
    id: 6,
    name: "Traffic",
    type_name: "Network Activity: Traffic",
};
const UNKNOWN_HOOK: Activity = Activity {
    id: 0,
    name: "Unknown",
    type_name: "Network Activity: Unknown",
};
const RESPONSE: Activity = Activity {
    id: 2,
    name: "Response",
    type_name: "DNS Activity: Response",
};
const RECORDS_LOST: Activity = Activity {
    id: 99,
    name: "Records Lost",
    type_name: "Event Log Activity: Other",
};

/// Profiles whose attributes the events use: `host` (device, actor),
/// `security_control` (action, disposition, firewall_rule, authorizations),
/// `container` (process.container).
const FLOW_PROFILES: &[&str] = &["host", "security_control", "container"];
const DNS_PROFILES: &[&str] = &["host", "container"];
const LOSS_PROFILES: &[&str] = &["host"];

/// The attributes every OCSF event has.
#[derive(Serialize)]
struct Base<'a> {
    class_uid: u32,
    class_name: &'static str,
    category_uid: u32,
    category_name: &'static str,
    activity_id: u32,
    activity_name: &'static str,
    type_uid: u32,
    type_name: &'static str,
    time: i64,
    severity_id: u8,
    severity: &'static str,
    message: AsString<Message<'a>>,
    metadata: Metadata<'a>,
    device: Device<'a>,
}

impl<'a> Base<'a> {
    fn new(class: &Class, activity: &Activity, common: Common<'a>, message: Message<'a>) -> Self {
        let (severity_id, severity) = match common.severity {
            Severity::Unknown => (0, "Unknown"),
            Severity::Informational => (1, "Informational"),
            Severity::Low => (2, "Low"),
            Severity::Medium => (3, "Medium"),
        };
        Self {
            class_uid: class.uid,
            class_name: class.name,
            category_uid: class.category_uid,
            category_name: class.category_name,
            activity_id: activity.id,
            activity_name: activity.name,
            type_uid: class.uid * 100 + activity.id,
            type_name: activity.type_name,
            time: unix_millis(common.time),
            severity_id,
            severity,
            message: AsString(message),
            metadata: Metadata {
                version: OCSF_VERSION,
                product: Product {
                    name: "Tollgate",
                    vendor_name: "Tollgate",
                    version: env!("CARGO_PKG_VERSION"),
                },
                profiles: common.profiles,
                sequence: common.seq.and_then(|seq| i32::try_from(seq).ok()),
                uid: common.seq.map(|seq| {
                    AsString(RecordUid {
                        node: common.node,
                        instance: common.instance,
                        seq,
                    })
                }),
            },
            device: Device {
                hostname: Some(common.node).filter(|node| is_hostname(node)),
                name: Some(common.node).filter(|node| !is_hostname(node)),
                // A Kubernetes node (or the Linux host the agent guards).
                type_id: 1,
                kind: "Server",
            },
        }
    }
}

/// The event in a sentence, OCSF's `message`.
enum Message<'a> {
    Flow(&'a FlowRecord<'a>),
    Dns(&'a DnsRecord<'a>),
    Loss(&'a LossRecord),
}

impl Display for Message<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Flow(flow) => {
                let title = event_title(Record::Flow(flow));
                let destination = SocketAddr::new(flow.dst.ip, flow.dst.port);
                write!(f, "{title}: {} to {destination}", flow.protocol)?;
                if let Some(fqdn) = flow.dst.fqdn {
                    write!(f, " ({fqdn})")?;
                }
                write_source(f, &flow.src)?;
                write!(f, ", rule {}", flow.rule)
            }
            Self::Dns(dns) => {
                let title = event_title(Record::Dns(dns));
                write!(
                    f,
                    "{title}: {} {} {}, {} records",
                    dns.query,
                    dns.query_type,
                    dns.rcode,
                    dns.answers.len()
                )?;
                write_source(f, &dns.src)
            }
            Self::Loss(loss) => LossMessage(loss).fmt(f),
        }
    }
}

/// ` from <comm> (pid <pid>)[ in <namespace>/<pod>]`.
fn write_source(f: &mut fmt::Formatter<'_>, src: &Source) -> fmt::Result {
    write!(f, " from {} (pid {})", src.comm, src.pid)?;
    if let (Some(namespace), Some(pod)) = (src.namespace, src.pod) {
        write!(f, " in {namespace}/{pod}")?;
    }
    Ok(())
}

/// What every record gives the base attributes.
struct Common<'a> {
    time: &'a str,
    node: &'a str,
    instance: &'a str,
    seq: Option<u64>,
    severity: Severity,
    profiles: &'static [&'static str],
}

#[derive(Serialize)]
struct Metadata<'a> {
    version: &'static str,
    product: Product,
    profiles: &'static [&'static str],
    /// `seq` while it fits this `integer_t` (32 bits, signed), which a
    /// node's sequence outgrows within days at busy rates; `unmapped.seq`
    /// always has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    sequence: Option<i32>,
    /// Records with a `seq` only: a sink's loss marker has none to be
    /// named by.
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<AsString<RecordUid<'a>>>,
}

#[derive(Serialize)]
struct Product {
    name: &'static str,
    vendor_name: &'static str,
    version: &'static str,
}

/// The node: `hostname` when the name is a `hostname_t`, else `name`.
#[derive(Serialize)]
struct Device<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    hostname: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    type_id: u8,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct Actor<'a> {
    process: Process<'a>,
}

#[derive(Serialize)]
struct Process<'a> {
    pid: u32,
    tid: u32,
    name: &'a str,
    user: User,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<Container<'a>>,
}

#[derive(Serialize)]
struct User {
    uid: AsString<u32>,
}

#[derive(Serialize)]
struct Container<'a> {
    uid: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod_uuid: Option<&'a str>,
    orchestrator: &'static str,
}

fn actor<'a>(src: &'a Source<'a>) -> Actor<'a> {
    Actor {
        process: Process {
            pid: src.pid,
            tid: src.tid,
            name: &src.comm,
            user: User {
                uid: AsString(src.uid),
            },
            container: src.container.as_ref().map(|container| Container {
                uid: container.id,
                name: container.name,
                pod_uuid: src.pod_uid,
                orchestrator: "Kubernetes",
            }),
        },
    }
}

/// The initiator: a pod (`namespace/pod`, its uid) or the node itself. Its
/// address is not known when the kernel decides.
#[derive(Serialize)]
struct SourceEndpoint<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<AsString<PodName<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hostname: Option<&'a str>,
}

struct PodName<'a> {
    namespace: &'a str,
    pod: &'a str,
}

impl std::fmt::Display for PodName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.pod)
    }
}

fn source_endpoint<'a>(src: &Source<'a>, node: &'a str) -> SourceEndpoint<'a> {
    let name = src
        .namespace
        .zip(src.pod)
        .map(|(namespace, pod)| AsString(PodName { namespace, pod }));
    SourceEndpoint {
        name,
        uid: src.pod_uid,
        // A node name that is no hostname_t is still in `device.name`.
        hostname: src
            .pod_uid
            .is_none()
            .then_some(node)
            .filter(|node| is_hostname(node)),
    }
}

#[derive(Serialize)]
struct Endpoint<'a> {
    ip: IpAddr,
    port: u16,
    /// The name the source resolved the address from, when known and a
    /// `hostname_t`.
    #[serde(skip_serializing_if = "Option::is_none")]
    hostname: Option<&'a str>,
    /// That name when it is no `hostname_t` (`_http._tcp.example.com`).
    #[serde(skip_serializing_if = "Option::is_none")]
    domain: Option<&'a str>,
}

impl<'a> Endpoint<'a> {
    fn new(address: SocketAddr, name: Option<&'a str>) -> Self {
        Self {
            ip: address.ip(),
            port: address.port(),
            hostname: name.filter(|name| is_hostname(name)),
            domain: name.filter(|name| !is_hostname(name)),
        }
    }
}

/// OCSF's observables: the values an analyst pivots on, each naming the
/// attribute that holds it.
struct Observables<'a>([Option<Observable<'a>>; 2]);

struct Observable<'a> {
    /// The attribute's path in the event.
    name: &'static str,
    kind: ObservableKind,
    value: ObservableValue<'a>,
}

#[derive(Clone, Copy)]
enum ObservableKind {
    Hostname,
    IpAddress,
}

enum ObservableValue<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

impl<'a> Observable<'a> {
    fn ip(name: &'static str, ip: IpAddr) -> Self {
        Self {
            name,
            kind: ObservableKind::IpAddress,
            value: ObservableValue::Ip(ip),
        }
    }

    /// Only names that are a `hostname_t`, as observables of type Hostname.
    fn hostname(name: &'static str, hostname: Option<&'a str>) -> Option<Self> {
        hostname.filter(|h| is_hostname(h)).map(|hostname| Self {
            name,
            kind: ObservableKind::Hostname,
            value: ObservableValue::Name(hostname),
        })
    }
}

impl Serialize for Observables<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().flatten())
    }
}

impl Serialize for Observable<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let (type_id, caption) = match self.kind {
            ObservableKind::Hostname => (1, "Hostname"),
            ObservableKind::IpAddress => (2, "IP Address"),
        };
        let mut observable = serializer.serialize_struct("Observable", 4)?;
        observable.serialize_field("name", self.name)?;
        observable.serialize_field("type_id", &type_id)?;
        observable.serialize_field("type", caption)?;
        match &self.value {
            ObservableValue::Ip(ip) => observable.serialize_field("value", ip)?,
            ObservableValue::Name(name) => observable.serialize_field("value", name)?,
        }
        observable.end()
    }
}

/// Tollgate's view of the source, without an OCSF place.
#[derive(Serialize)]
struct SourceUnmapped<'a> {
    cgroup_id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    cgroup: Option<&'a str>,
    gid: u32,
    identity: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    workload: Option<&'a Workload>,
    /// As `key:value` strings (`LabelPair`): OCSF 1.3 has no attribute for
    /// a pod's labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    labels: Option<LabelList<'a>>,
}

fn source_unmapped<'a>(src: &Source<'a>) -> SourceUnmapped<'a> {
    SourceUnmapped {
        cgroup_id: src.cgroup_id,
        cgroup: src.cgroup,
        gid: src.gid,
        identity: src.identity,
        namespace: src.namespace,
        pod: src.pod,
        workload: src.workload,
        labels: src.labels.map(label_list),
    }
}

#[derive(Serialize)]
struct NetworkActivity<'a> {
    #[serde(flatten)]
    base: Base<'a>,
    action_id: u8,
    action: &'static str,
    disposition_id: u8,
    disposition: &'static str,
    status_id: u8,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status_detail: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    start_time: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    end_time: Option<i64>,
    actor: Actor<'a>,
    src_endpoint: SourceEndpoint<'a>,
    dst_endpoint: Endpoint<'a>,
    observables: Observables<'a>,
    connection_info: ConnectionInfo<'a>,
    firewall_rule: FirewallRule<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    authorizations: Option<Authorizations<'a>>,
    unmapped: FlowUnmapped<'a>,
}

#[derive(Serialize)]
struct ConnectionInfo<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    protocol_num: Option<u8>,
    protocol_ver_id: u8,
    protocol_ver: &'static str,
    direction_id: u8,
    direction: &'static str,
}

#[derive(Serialize)]
struct FirewallRule<'a> {
    name: &'a str,
    uid: AsString<u32>,
}

/// One authorization per deciding policy (`policy` lists several,
/// comma-separated, for a default decision). `decision` is what the
/// policies decided, before observe mode: an audit flow shows `Denied`
/// here and `Allowed` as its action.
struct Authorizations<'a> {
    policies: &'a str,
    /// The record's `policy_source`.
    sources: Option<&'a str>,
    decision: &'static str,
}

#[derive(Serialize)]
struct Authorization<'a> {
    decision: &'static str,
    policy: Policy<'a>,
}

#[derive(Serialize)]
struct Policy<'a> {
    name: &'a str,
    /// The policy's source (`cluster` or `local`) as its group: OCSF 1.3's
    /// policy object has no source or type of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<Group<'a>>,
}

#[derive(Serialize)]
struct Group<'a> {
    name: &'a str,
}

impl Serialize for Authorizations<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let policies = policies_with_sources(self.policies, self.sources);
        serializer.collect_seq(policies.map(|(name, source)| Authorization {
            decision: self.decision,
            policy: Policy {
                name,
                group: source.map(|name| Group { name }),
            },
        }))
    }
}

/// `seq` whole: `metadata.sequence` holds it only while it fits 32 bits.
#[derive(Serialize)]
struct FlowUnmapped<'a> {
    seq: u64,
    verdict: &'static str,
    mode: &'static str,
    hook: &'static str,
    #[serde(flatten)]
    source: SourceUnmapped<'a>,
    generation: u32,
    socket_cookie: u64,
}

/// How a verdict reads in the security control attributes.
struct Control {
    action: (u8, &'static str),
    disposition: (u8, &'static str),
    status: (u8, &'static str),
    status_code: Option<&'static str>,
    status_detail: Option<&'static str>,
    /// The policies' decision, for `authorizations`.
    decision: &'static str,
}

fn control(verdict: Verdict) -> Control {
    match verdict {
        Verdict::Allowed => Control {
            action: (1, "Allowed"),
            disposition: (1, "Allowed"),
            status: (1, "Success"),
            status_code: None,
            status_detail: None,
            decision: "Allowed",
        },
        Verdict::Denied => Control {
            action: (2, "Denied"),
            disposition: (2, "Blocked"),
            status: (2, "Failure"),
            // What the application's connect() or sendmsg() returned.
            status_code: Some("EPERM"),
            status_detail: None,
            decision: "Denied",
        },
        // The connection went through (action Allowed); the disposition
        // "Detected" is OCSF's "policy violation detected without further
        // action", and the status detail says why nothing was done.
        Verdict::Audit => Control {
            action: (1, "Allowed"),
            disposition: (15, "Detected"),
            status: (1, "Success"),
            status_code: None,
            status_detail: Some("denied by policy, allowed by observe mode"),
            decision: "Denied",
        },
        Verdict::Unknown => Control {
            action: (0, "Unknown"),
            disposition: (0, "Unknown"),
            status: (0, "Unknown"),
            status_code: None,
            status_detail: None,
            decision: "Unknown",
        },
    }
}

fn network_activity<'a>(
    flow: &'a FlowRecord<'a>,
    instance: &'a str,
    severity: Severity,
) -> NetworkActivity<'a> {
    let activity = match flow.hook {
        "connect4" | "connect6" => &OPEN,
        "sendmsg4" | "sendmsg6" | "packet4" | "packet6" | "frame4" | "frame6" => &TRAFFIC,
        _ => &UNKNOWN_HOOK,
    };
    let common = Common {
        time: &flow.time,
        node: flow.node,
        instance,
        seq: Some(flow.seq),
        severity,
        profiles: FLOW_PROFILES,
    };
    let control = control(Verdict::of(flow));
    let summary = flow.summary.as_ref();
    NetworkActivity {
        base: Base::new(&NETWORK_ACTIVITY, activity, common, Message::Flow(flow)),
        action_id: control.action.0,
        action: control.action.1,
        disposition_id: control.disposition.0,
        disposition: control.disposition.1,
        status_id: control.status.0,
        status: control.status.1,
        status_code: control.status_code,
        status_detail: control.status_detail,
        count: summary.map(|s| s.count),
        start_time: summary.map(|s| unix_millis(&s.first_time)),
        end_time: summary.map(|s| unix_millis(&s.last_time)),
        actor: actor(&flow.src),
        src_endpoint: source_endpoint(&flow.src, flow.node),
        dst_endpoint: Endpoint::new(SocketAddr::new(flow.dst.ip, flow.dst.port), flow.dst.fqdn),
        observables: Observables([
            Some(Observable::ip("dst_endpoint.ip", flow.dst.ip)),
            Observable::hostname("dst_endpoint.hostname", flow.dst.fqdn),
        ]),
        connection_info: ConnectionInfo {
            protocol_name: transport_name(&flow.protocol),
            protocol_num: record_protocol::number(&flow.protocol),
            protocol_ver_id: if flow.dst.ip.is_ipv4() { 4 } else { 6 },
            protocol_ver: if flow.dst.ip.is_ipv4() {
                "Internet Protocol version 4 (IPv4)"
            } else {
                "Internet Protocol version 6 (IPv6)"
            },
            direction_id: 2,
            direction: "Outbound",
        },
        firewall_rule: FirewallRule {
            name: &flow.rule,
            uid: AsString(flow.rule_id),
        },
        authorizations: flow.policy.map(|policies| Authorizations {
            policies,
            sources: flow.policy_source,
            decision: control.decision,
        }),
        unmapped: FlowUnmapped {
            seq: flow.seq,
            verdict: flow.verdict,
            mode: flow.mode,
            hook: flow.hook,
            source: source_unmapped(&flow.src),
            generation: flow.generation,
            socket_cookie: flow.socket_cookie,
        },
    }
}

type Answers<'a, U> = ArrayOf<slice::Iter<'a, DnsAnswer<'a>>, U>;

#[derive(Serialize)]
struct DnsActivity<'a> {
    #[serde(flatten)]
    base: Base<'a>,
    actor: Actor<'a>,
    /// The endpoint that asked.
    src_endpoint: SourceEndpoint<'a>,
    /// The resolver that answered.
    dst_endpoint: Endpoint<'a>,
    observables: Observables<'a>,
    /// Only for a name that is a `hostname_t`, which OCSF requires of
    /// `query.hostname`; other names (`_dmarc.example.com`) are in
    /// `unmapped.query`.
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<Query<'a>>,
    answers: Answers<'a, Answer<'a>>,
    rcode_id: u16,
    rcode: &'a str,
    unmapped: DnsUnmapped<'a>,
}

#[derive(Serialize)]
struct Query<'a> {
    hostname: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
}

#[derive(Serialize)]
struct Answer<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    rdata: &'a str,
    ttl: u32,
}

#[derive(Serialize)]
struct DnsUnmapped<'a> {
    /// As for flows (`FlowUnmapped`).
    seq: u64,
    /// The query's name and type when the name is no `hostname_t`.
    #[serde(skip_serializing_if = "Option::is_none")]
    query: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    query_type: Option<&'a str>,
    learned: bool,
    /// OCSF 1.3's answer object has no owner name: the names, in the order
    /// of `answers` (a CNAME chain reads from them).
    answer_names: Answers<'a, &'a str>,
    #[serde(flatten)]
    source: SourceUnmapped<'a>,
}

fn dns_activity<'a>(
    dns: &'a DnsRecord<'a>,
    instance: &'a str,
    severity: Severity,
) -> DnsActivity<'a> {
    let common = Common {
        time: &dns.time,
        node: dns.node,
        instance,
        seq: Some(dns.seq),
        severity,
        profiles: DNS_PROFILES,
    };
    let (rcode_id, rcode) = rcode(&dns.rcode);
    let query_is_hostname = is_hostname(&dns.query);
    let unmapped_query =
        (!query_is_hostname).then_some((dns.query.as_ref(), dns.query_type.as_ref()));
    DnsActivity {
        base: Base::new(&DNS_ACTIVITY, &RESPONSE, common, Message::Dns(dns)),
        actor: actor(&dns.src),
        src_endpoint: source_endpoint(&dns.src, dns.node),
        dst_endpoint: Endpoint::new(SocketAddr::new(dns.resolver.ip, dns.resolver.port), None),
        observables: Observables([
            Some(Observable::ip("dst_endpoint.ip", dns.resolver.ip)),
            Observable::hostname("query.hostname", Some(&dns.query)),
        ]),
        query: query_is_hostname.then_some(Query {
            hostname: &dns.query,
            kind: &dns.query_type,
        }),
        answers: ArrayOf {
            items: dns.answers.iter(),
            item: |answer| {
                Some(Answer {
                    kind: answer.kind,
                    rdata: &answer.data,
                    ttl: answer.ttl,
                })
            },
        },
        rcode_id,
        rcode,
        unmapped: DnsUnmapped {
            seq: dns.seq,
            query: unmapped_query.map(|(name, _)| name),
            query_type: unmapped_query.map(|(_, kind)| kind),
            learned: dns.learned,
            answer_names: ArrayOf {
                items: dns.answers.iter(),
                item: |answer| Some(answer.name.as_ref()),
            },
            source: source_unmapped(&dns.src),
        },
    }
}

/// OCSF's response codes (RFC 6895) by their usual mnemonic, with OCSF's
/// caption. The record spells codes as mnemonics or `RCODE<n>`.
const RCODES: &[(u16, &str, &str)] = &[
    (0, "NOERROR", "NoError"),
    (1, "FORMERR", "FormError"),
    (2, "SERVFAIL", "ServError"),
    (3, "NXDOMAIN", "NXDomain"),
    (4, "NOTIMP", "NotImp"),
    (5, "REFUSED", "Refused"),
    (6, "YXDOMAIN", "YXDomain"),
    (7, "YXRRSET", "YXRRSet"),
    (8, "NXRRSET", "NXRRSet"),
    (9, "NOTAUTH", "NotAuth"),
    (10, "NOTZONE", "NotZone"),
    (11, "DSOTYPENI", "DSOTYPENI"),
    // TSIG's BADSIG shares 16 with EDNS's BADVERS (RFC 6895).
    (16, "BADVERS", "BADSIG_VERS"),
    (16, "BADSIG", "BADSIG_VERS"),
    (17, "BADKEY", "BADKEY"),
    (18, "BADTIME", "BADTIME"),
    (19, "BADMODE", "BADMODE"),
    (20, "BADNAME", "BADNAME"),
    (21, "BADALG", "BADALG"),
    (22, "BADTRUNC", "BADTRUNC"),
    (23, "BADCOOKIE", "BADCOOKIE"),
];

/// `rcode_id` and `rcode` for a record's response code.
fn rcode(name: &str) -> (u16, &str) {
    let number = name
        .strip_prefix("RCODE")
        .and_then(|n| n.parse::<u16>().ok());
    let known = RCODES
        .iter()
        .find(|(id, mnemonic, _)| *mnemonic == name || Some(*id) == number);
    match (known, number) {
        (Some(&(id, _, caption)), _) => (id, caption),
        (None, Some(12..=15 | 24..=3840 | 4096..=65534)) => (24, "Unassigned"),
        (None, Some(3841..=4095 | 65535)) => (25, "Reserved"),
        // Not a code the RFC defines: OCSF's "Other", with the source's name.
        _ => (99, name),
    }
}

#[derive(Serialize)]
struct EventLogActivity<'a> {
    #[serde(flatten)]
    base: Base<'a>,
    status_id: u8,
    status: &'static str,
    /// Why the records were lost, as the record's `reason`.
    status_detail: &'static str,
    /// How many records were lost.
    count: u64,
    log_provider: &'static str,
    /// The sink that lost them.
    #[serde(skip_serializing_if = "Option::is_none")]
    log_name: Option<&'a str>,
    unmapped: LossUnmapped,
}

#[derive(Serialize)]
struct LossUnmapped {
    /// `loss`: marks the event as Tollgate's loss marker.
    #[serde(rename = "type")]
    kind: &'static str,
    /// Kernel losses only; as for flows (`FlowUnmapped`).
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seq: Option<u64>,
}

fn event_log_activity<'a>(
    loss: &'a LossRecord,
    instance: &'a str,
    severity: Severity,
) -> EventLogActivity<'a> {
    let common = Common {
        time: &loss.time,
        node: &loss.node,
        instance,
        seq: loss.seq,
        severity,
        profiles: LOSS_PROFILES,
    };
    EventLogActivity {
        base: Base::new(
            &EVENT_LOG_ACTIVITY,
            &RECORDS_LOST,
            common,
            Message::Loss(loss),
        ),
        status_id: 2,
        status: "Failure",
        status_detail: loss_reason(loss.reason),
        count: loss.count,
        log_provider: "Tollgate",
        log_name: loss.sink.as_deref(),
        unmapped: LossUnmapped {
            kind: LossRecord::KIND,
            seq: loss.seq,
            first_seq: loss.first_seq,
            last_seq: loss.last_seq,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::{is_hostname, rcode};

    #[test]
    fn response_codes_by_mnemonic_and_number() {
        assert_eq!(rcode("NOERROR"), (0, "NoError"));
        assert_eq!(rcode("NXDOMAIN"), (3, "NXDomain"));
        assert_eq!(rcode("RCODE5"), (5, "Refused"));
        assert_eq!(rcode("RCODE13"), (24, "Unassigned"));
        assert_eq!(rcode("RCODE3900"), (25, "Reserved"));
        assert_eq!(rcode("WEIRD"), (99, "WEIRD"));
        // OCSF 1.3.0's caption for 16, whichever meaning the source had.
        assert_eq!(rcode("BADVERS"), (16, "BADSIG_VERS"));
        assert_eq!(rcode("BADSIG"), (16, "BADSIG_VERS"));
        assert_eq!(rcode("RCODE16"), (16, "BADSIG_VERS"));
    }

    #[test]
    fn hostnames_are_what_hostname_t_takes() {
        for name in [
            "api.example.com",
            "API.Example.COM",
            "a",
            "x-1.y2",
            "10.0.0.1",
        ] {
            assert!(is_hostname(name), "{name}");
        }
        for name in [
            "",
            "_dmarc.example.com",
            "_http._tcp.example.com",
            "api.example.com.",
            "-a.example.com",
            "a-.example.com",
            "a..b",
            "bücher.example",
            "Node_1",
        ] {
            assert!(!is_hostname(name), "{name}");
        }
    }
}
