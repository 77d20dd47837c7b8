//! Records the format tests render: the golden ones, and odd ones that
//! only the schema checks see.

use std::{borrow::Cow, net::IpAddr, sync::LazyLock};

use crate::{
    export::record::{DnsAnswer, DnsRecord, DnsResolver, LossReason, LossRecord, Record, Summary},
    flow::{Container, Destination, FlowRecord, Source},
    pods::directory::Workload,
};
use tollgate_policy::select::Labels;

const NODE: &str = "aks-nodepool1-0";
/// Every reason a loss marker may give.
pub const LOSS_REASONS: [LossReason; 6] = [
    LossReason::KernelRingbuf,
    LossReason::QueueFull,
    LossReason::SpoolFull,
    LossReason::SpoolDamaged,
    LossReason::WriteFailed,
    LossReason::Rejected,
];

/// The agent run the records come from (`export::delivery` names it by
/// its start time in nanoseconds).
pub const INSTANCE: &str = "1795420800000000000";
const POD_UID: &str = "0f5b6e2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b";
const CONTAINER_ID: &str = "3f2c9d1e8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d";

static WORKLOAD: LazyLock<Workload> = LazyLock::new(|| Workload {
    kind: "Deployment".into(),
    name: "payments".into(),
});

static LABELS: LazyLock<Labels> = LazyLock::new(|| {
    Labels::from([
        ("app".into(), "payments".into()),
        ("app.kubernetes.io/name".into(), "payments".into()),
    ])
});

/// A record of any kind, owned by the test.
pub enum Fixture {
    Flow(FlowRecord<'static>),
    Dns(DnsRecord<'static>),
    Loss(LossRecord),
}

impl Fixture {
    pub fn record(&self) -> Record<'_, 'static> {
        match self {
            Self::Flow(flow) => Record::Flow(flow),
            Self::Dns(dns) => Record::Dns(dns),
            Self::Loss(loss) => Record::Loss(loss),
        }
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// The payments pod of namespace prod, its container `app`.
pub fn pod_source() -> Source<'static> {
    Source {
        cgroup_id: 272,
        cgroup: Some(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f5b6e2a_1c3d_4e5f_8a9b_0c1d2e3f4a5b.slice/cri-containerd-3f2c9d1e8b7a6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d.scope",
        ),
        pid: 8268,
        tid: 8270,
        comm: Cow::Borrowed("curl"),
        uid: 1000,
        gid: 1000,
        identity: "pod",
        pod_uid: Some(POD_UID),
        namespace: Some("prod"),
        pod: Some("payments-7d9c6b5f4-x2x8q"),
        container: Some(Container {
            name: Some("app"),
            id: CONTAINER_ID,
        }),
        workload: Some(&WORKLOAD),
        labels: Some(&LABELS),
    }
}

pub fn host_source() -> Source<'static> {
    Source {
        cgroup_id: 1042,
        cgroup: Some("/system.slice/chronyd.service"),
        pid: 611,
        tid: 611,
        comm: Cow::Borrowed("chronyd"),
        uid: 998,
        gid: 996,
        identity: "host",
        pod_uid: None,
        namespace: None,
        pod: None,
        container: None,
        workload: None,
        labels: None,
    }
}

/// A pod of this node whose metadata has not arrived.
fn unknown_pod_source() -> Source<'static> {
    Source {
        cgroup_id: 301,
        cgroup: Some(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod7c4d2a10_5e6f_4a7b_9c8d_1e2f3a4b5c6d.slice/cri-containerd-9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b.scope",
        ),
        pid: 4321,
        tid: 4399,
        comm: Cow::Borrowed("java"),
        uid: 0,
        gid: 0,
        identity: "unknown-pod",
        pod_uid: Some("7c4d2a10-5e6f-4a7b-9c8d-1e2f3a4b5c6d"),
        namespace: None,
        pod: None,
        container: Some(Container {
            name: None,
            id: "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b",
        }),
        workload: None,
        labels: None,
    }
}

pub fn denied_pod_flow() -> FlowRecord<'static> {
    FlowRecord {
        kind: FlowRecord::KIND,
        time: "2026-11-24T08:11:30.808267752Z".into(),
        seq: 41,
        node: NODE,
        verdict: "denied",
        mode: "enforce",
        protocol: Cow::Borrowed("tcp"),
        hook: "connect4",
        src: pod_source(),
        dst: Destination {
            ip: ip("169.254.169.254"),
            port: 80,
            // Reached by address: no name.
            fqdn: None,
        },
        // An EgressPolicy resource of namespace prod.
        policy: Some("prod/payments-egress"),
        policy_source: Some("cluster"),
        rule: Cow::Borrowed("deny-imds"),
        rule_id: 12,
        generation: 3,
        socket_cookie: 10,
        summary: None,
    }
}

/// The golden records, named, in the order of the golden files' lines.
pub fn golden() -> Vec<(&'static str, Fixture)> {
    vec![
        (
            "denied enforce flow from a pod",
            Fixture::Flow(denied_pod_flow()),
        ),
        (
            "audit flow from a host process to IPv6",
            Fixture::Flow(FlowRecord {
                kind: FlowRecord::KIND,
                time: "2026-11-24T08:12:01.000000500Z".into(),
                seq: 42,
                node: NODE,
                verdict: "audit",
                mode: "observe",
                protocol: Cow::Borrowed("udp"),
                hook: "sendmsg6",
                src: host_source(),
                dst: Destination {
                    ip: ip("2001:db8::123"),
                    port: 123,
                    fqdn: None,
                },
                // A default decision: every policy that owns it, one from
                // --policy, one a ClusterEgressPolicy.
                policy: Some("host-allow-list,node-baseline"),
                policy_source: Some("local,cluster"),
                rule: Cow::Borrowed("default"),
                rule_id: 0,
                generation: 3,
                socket_cookie: 20,
                summary: None,
            }),
        ),
        (
            "allowed summary from an unknown pod to a named destination",
            Fixture::Flow(FlowRecord {
                kind: FlowRecord::KIND,
                time: "2026-11-24T08:19:50.100000000Z".into(),
                seq: 57,
                node: NODE,
                verdict: "allowed",
                mode: "observe",
                protocol: Cow::Borrowed("tcp"),
                // IPv4-mapped destination of an IPv6 socket, judged as IPv4.
                hook: "connect6",
                src: unknown_pod_source(),
                dst: Destination {
                    // A registry's private endpoint, by the name the pod
                    // resolved.
                    ip: ip("10.224.0.50"),
                    port: 443,
                    fqdn: Some("myregistry.azurecr.io"),
                },
                policy: None,
                policy_source: None,
                rule: Cow::Borrowed("default"),
                rule_id: 0,
                generation: 3,
                socket_cookie: 30,
                summary: Some(Summary {
                    count: 42,
                    first_time: "2026-11-24T08:19:50.100000000Z".into(),
                    last_time: "2026-11-24T08:19:59.900000000Z".into(),
                }),
            }),
        ),
        (
            "DNS answer with CNAME, A and AAAA",
            Fixture::Dns(DnsRecord {
                kind: DnsRecord::KIND,
                time: "2026-11-24T08:11:29.500000000Z".into(),
                seq: 40,
                node: NODE,
                src: pod_source(),
                resolver: DnsResolver {
                    ip: ip("10.0.0.10"),
                    port: 53,
                },
                query: Cow::Borrowed("api.example.com"),
                query_type: Cow::Borrowed("A"),
                rcode: Cow::Borrowed("NOERROR"),
                answers: vec![
                    DnsAnswer {
                        name: Cow::Borrowed("api.example.com"),
                        kind: "CNAME",
                        data: Cow::Borrowed("edge.example.net"),
                        ttl: 300,
                    },
                    DnsAnswer {
                        name: Cow::Borrowed("edge.example.net"),
                        kind: "A",
                        data: Cow::Borrowed("192.0.2.10"),
                        ttl: 60,
                    },
                    DnsAnswer {
                        name: Cow::Borrowed("edge.example.net"),
                        kind: "AAAA",
                        data: Cow::Borrowed("2001:db8::10"),
                        ttl: 60,
                    },
                ],
                learned: true,
                limit: None,
                refused: None,
            }),
        ),
        (
            "loss marker of a sink",
            Fixture::Loss(LossRecord {
                kind: LossRecord::KIND,
                time: "2026-11-24T08:30:00.000000000Z".into(),
                seq: None,
                node: NODE.into(),
                count: 128,
                reason: LossReason::SpoolFull,
                sink: Some("siem-http".into()),
                first_seq: Some(1001),
                last_seq: Some(1128),
            }),
        ),
    ]
}

/// Records outside the golden set that every format must still render
/// within its schema: what the kernel or the pipeline may also produce.
pub fn odd() -> Vec<(&'static str, Fixture)> {
    let mut unknown = denied_pod_flow();
    unknown.verdict = "unknown";
    unknown.hook = "unknown";
    unknown.protocol = Cow::Owned("ip-1".into());
    unknown.policy = None;
    unknown.policy_source = None;
    let mut nxdomain = DnsRecord {
        rcode: Cow::Borrowed("NXDOMAIN"),
        answers: Vec::new(),
        learned: false,
        limit: None,
        refused: None,
        resolver: DnsResolver {
            ip: ip("fd00::53"),
            port: 53,
        },
        query_type: Cow::Borrowed("TYPE65"),
        ..match golden().remove(3).1 {
            Fixture::Dns(dns) => dns,
            _ => unreachable!("the fourth golden record is the DNS answer"),
        }
    };
    nxdomain.src = host_source();
    vec![
        (
            "flow with an unknown verdict, hook and protocol",
            Fixture::Flow(unknown),
        ),
        (
            "NXDOMAIN answer from an IPv6 resolver",
            Fixture::Dns(nxdomain),
        ),
        (
            "kernel loss",
            Fixture::Loss(LossRecord {
                kind: LossRecord::KIND,
                time: "2026-11-24T08:31:00.000000000Z".into(),
                seq: Some(2000),
                node: NODE.into(),
                count: 7,
                reason: LossReason::KernelRingbuf,
                sink: None,
                first_seq: None,
                last_seq: None,
            }),
        ),
    ]
}

/// The denied pod flow, decided by a rule of a local policy.
pub fn local_policy_flow() -> FlowRecord<'static> {
    FlowRecord {
        policy: Some("prod/payments-local"),
        policy_source: Some("local"),
        ..denied_pod_flow()
    }
}

/// Golden and odd records together.
pub fn all() -> Vec<(&'static str, Fixture)> {
    let mut all = golden();
    all.extend(odd());
    all
}

/// A default decision owned by so many policies that `policy` outgrows
/// CEF's longest string.
static MANY_POLICIES: LazyLock<String> = LazyLock::new(|| {
    (0..400)
        .map(|n| format!("team-{n}/egress-baseline"))
        .collect::<Vec<_>>()
        .join(",")
});

fn dns_answer(name: &str, kind: &'static str, data: &str) -> DnsAnswer<'static> {
    DnsAnswer {
        name: Cow::Owned(name.into()),
        kind,
        data: Cow::Owned(data.into()),
        ttl: 30,
    }
}

fn dns_record(query: &str, query_type: &str, rcode: &str) -> DnsRecord<'static> {
    DnsRecord {
        query: Cow::Owned(query.into()),
        query_type: Cow::Owned(query_type.into()),
        rcode: Cow::Owned(rcode.into()),
        answers: Vec::new(),
        ..match golden().remove(3).1 {
            Fixture::Dns(dns) => dns,
            _ => unreachable!("the fourth golden record is the DNS answer"),
        }
    }
}

fn kernel_or_sink_loss(reason: LossReason, sink: Option<&str>) -> LossRecord {
    LossRecord {
        kind: LossRecord::KIND,
        time: "2026-11-24T08:31:00.000000000Z".into(),
        seq: sink.is_none().then_some(4_000_000_000),
        node: NODE.into(),
        count: 3,
        reason,
        sink: sink.map(Into::into),
        first_seq: sink.map(|_| 5_000_000_000),
        last_seq: sink.map(|_| 5_000_000_002),
    }
}

/// Records with awkward values that only the conformance checks see:
/// names that are no hostnames, upper case, IPv6, long and non-ASCII
/// text, sequence numbers past 32 bits, every response code, empty
/// answers, loss markers of every reason.
pub fn awkward() -> Vec<(String, Fixture)> {
    let mut records = Vec::new();
    let mut flow = |name: &str, change: &dyn Fn(&mut FlowRecord<'static>)| {
        let mut record = denied_pod_flow();
        change(&mut record);
        records.push((format!("flow: {name}"), Fixture::Flow(record)));
    };
    flow("SRV-style name", &|f| {
        f.dst.fqdn = Some("_http._tcp.example.com");
    });
    flow("upper-case name", &|f| f.dst.fqdn = Some("API.Example.COM"));
    flow("name with a trailing dot", &|f| {
        f.dst.fqdn = Some("api.example.com.")
    });
    flow("IPv6 with a name", &|f| {
        f.dst.ip = ip("2001:db8:1::443");
        f.dst.fqdn = Some("v6.example.com");
    });
    flow("long non-ASCII process name", &|f| {
        f.src.comm = Cow::Owned("prozeß-ünïcødé-€".repeat(100));
    });
    flow("packet hook without a task", &|f| {
        f.hook = "packet4";
        f.src.comm = Cow::Borrowed("");
        f.src.pid = 0;
        f.src.tid = 0;
    });
    flow("seq past 32 bits", &|f| f.seq = 5_000_000_000);
    flow("empty rule and policy names", &|f| {
        f.rule = Cow::Borrowed("");
        f.policy = Some("");
    });
    flow("a default of many policies", &|f| {
        f.policy = Some(MANY_POLICIES.as_str());
        f.policy_source = Some("cluster");
    });
    flow("node name that is no hostname", &|f| {
        f.node = "Node_1";
        f.src = host_source();
    });
    flow("IPv6 ICMP", &|f| {
        f.dst.ip = ip("fe80::1");
        f.protocol = Cow::Borrowed("ip-58");
    });
    let mut dns = |name: String, record: DnsRecord<'static>| {
        records.push((format!("dns: {name}"), Fixture::Dns(record)));
    };
    for rcode in (0..=25u16).chain([3840, 3841, 4095, 4096, 65535]) {
        dns(
            format!("RCODE{rcode}"),
            dns_record("api.example.com", "A", &format!("RCODE{rcode}")),
        );
    }
    for mnemonic in ["BADVERS", "BADSIG", "NOTAUTH", "DSOTYPENI", "SOMETHING"] {
        dns(
            mnemonic.into(),
            dns_record("api.example.com", "A", mnemonic),
        );
    }
    dns(
        "DMARC TXT name".into(),
        dns_record("_dmarc.example.com", "TXT", "NOERROR"),
    );
    dns(
        "SRV name from an IPv6 resolver".into(),
        DnsRecord {
            resolver: DnsResolver {
                ip: ip("fd00::53"),
                port: 53,
            },
            ..dns_record("_http._tcp.example.com", "SRV", "NXDOMAIN")
        },
    );
    dns("root name".into(), dns_record("", "NS", "NOERROR"));
    dns(
        "upper-case name, empty answer".into(),
        dns_record("API.EXAMPLE.COM", "AAAA", "NOERROR"),
    );
    dns(
        "a thousand answers".into(),
        DnsRecord {
            answers: (0..1000)
                .map(|n| dns_answer("many.example.com", "A", &format!("192.0.2.{}", n % 250)))
                .collect(),
            seq: 6_000_000_000,
            ..dns_record("many.example.com", "A", "NOERROR")
        },
    );
    for reason in LOSS_REASONS {
        let sink = (reason != LossReason::KernelRingbuf).then_some("siem-http");
        records.push((
            format!("loss: {}", super::super::loss_reason(reason)),
            Fixture::Loss(kernel_or_sink_loss(reason, sink)),
        ));
    }
    records.push((
        "loss: sink without a range".into(),
        Fixture::Loss(LossRecord {
            first_seq: None,
            last_seq: None,
            ..kernel_or_sink_loss(LossReason::WriteFailed, Some("siem-syslog"))
        }),
    ));
    records
}

/// Every record the conformance checks read: golden, odd and awkward.
pub fn conformance() -> Vec<(String, Fixture)> {
    let mut records: Vec<(String, Fixture)> = all()
        .into_iter()
        .map(|(name, fixture)| (name.to_string(), fixture))
        .collect();
    records.extend(awkward());
    records
}
