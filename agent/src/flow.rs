//! Flow records: what a kernel decision event becomes for people and SIEMs.
//! Pure functions only; the schema is documented in docs/flow-records.md.

use std::{
    borrow::Cow,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::Serialize;

use crate::export::record::Summary;
use crate::pods::{
    directory::{PodMeta, Workload},
    kubelet::PodCgroup,
};
use tollgate_common::{FlowEvent, Hook, Mode, RULE_ID_DEFAULT, Verdict, event_kind, family};
use tollgate_policy::{record_protocol, select::Labels};

/// Decodes one ring buffer record; `None` for anything that is not a
/// complete flow event.
pub fn decode_event(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: length checked; FlowEvent is plain old data, any bytes are valid.
    let event = unsafe { bytes.as_ptr().cast::<FlowEvent>().read_unaligned() };
    (event.kind == event_kind::FLOW).then_some(event)
}

#[derive(Debug, Serialize, PartialEq)]
pub struct FlowRecord<'a> {
    /// Always `flow` (docs/export.md has the other record types).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// RFC 3339, UTC, nanoseconds.
    pub time: String,
    /// Per-node sequence number, from 1.
    pub seq: u64,
    pub node: &'a str,
    pub verdict: &'static str,
    pub mode: &'static str,
    pub protocol: Cow<'static, str>,
    pub hook: &'static str,
    pub src: Source<'a>,
    pub dst: Destination<'a>,
    /// The policy that decided (for a default decision, every policy that
    /// owns it, comma-separated), or null when no policy selects the source.
    pub policy: Option<&'a str>,
    /// Where `policy` came from: `cluster` (an EgressPolicy or
    /// ClusterEgressPolicy resource) or `local` (the control API or
    /// --policy); null exactly when `policy` is. For a default owned by
    /// policies of both sources, one per policy, comma-separated in the
    /// order of `policy`.
    pub policy_source: Option<&'a str>,
    /// The rule that decided: its name, `rule-<id>` when its name is not
    /// known to this agent, or `default` when no rule matched.
    pub rule: Cow<'a, str>,
    pub rule_id: u32,
    pub generation: u32,
    pub socket_cookie: u64,
    /// Only on interval aggregates of allowed flows: how many connections
    /// this record stands for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,
}

impl FlowRecord<'_> {
    pub const KIND: &'static str = "flow";
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Source<'a> {
    pub cgroup_id: u64,
    /// Path below the cgroup2 mount, or null if the cgroup is already gone.
    pub cgroup: Option<&'a str>,
    pub pid: u32,
    pub tid: u32,
    pub comm: Cow<'a, str>,
    pub uid: u32,
    pub gid: u32,
    /// `pod` (a pod's cgroup, its metadata known), `unknown-pod` (a pod's
    /// cgroup by kubelet's layout, metadata not known) or `host`.
    pub identity: &'static str,
    /// The pod whose cgroup this is (kubelet's layout), else null.
    pub pod_uid: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub pod: Option<&'a str>,
    /// The container whose cgroup this is, else null.
    pub container: Option<Container<'a>>,
    pub workload: Option<&'a Workload>,
    /// The pod's labels whose keys are in --pod-label-keys, else null.
    pub labels: Option<&'a Labels>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Container<'a> {
    /// Null until the API server has reported the container's id.
    pub name: Option<&'a str>,
    pub id: &'a str,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Destination<'a> {
    pub ip: IpAddr,
    pub port: u16,
    /// The name the source endpoint resolved this address from (lowercase,
    /// no trailing dot), or null when not known. Always serialized, so the
    /// record's shape does not depend on it.
    pub fqdn: Option<&'a str>,
}

/// Where a policy in the agent's set came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicySource {
    /// Applied over the control API (tollgatectl) or with --policy; also
    /// the agent's own unknown-pod policy.
    Local,
    /// An EgressPolicy or ClusterEgressPolicy resource the agent watches.
    Cluster,
}

impl PolicySource {
    /// As records spell it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Cluster => "cluster",
        }
    }
}

/// The policy and rule that made a decision, as the enforcer names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attribution<'a> {
    /// The deciding policy; for a default decision, every policy that owns
    /// it, comma-separated.
    pub policy: &'a str,
    /// The rule's name; None when the default decided.
    pub rule: Option<&'a str>,
    /// [`PolicySource`] of `policy`: one value when its policies agree,
    /// else one per policy, comma-separated in the same order.
    pub source: &'a str,
}

/// What the agent adds to an event.
pub struct Enrichment<'a> {
    pub seq: u64,
    pub node: &'a str,
    pub cgroup: Option<&'a str>,
    pub pod: Option<&'a PodCgroup>,
    /// What the Kubernetes API says about that pod, if anything yet.
    pub pod_meta: Option<&'a PodMeta>,
    pub clock: WallClock,
    /// The deciding policy, its source and rule; None when the decision is
    /// not attributed to any (no policy selects the source, or its
    /// generation's names are not known).
    pub attribution: Option<Attribution<'a>>,
    /// The name the source resolved the destination from (lowercase, no
    /// trailing dot), if its DNS answers are known.
    pub dst_fqdn: Option<&'a str>,
}

impl<'a> FlowRecord<'a> {
    pub fn new(event: &'a FlowEvent, enrichment: Enrichment<'a>) -> Self {
        let dst_ip = if event.family == family::INET6 {
            IpAddr::V6(Ipv6Addr::from(event.dst_addr))
        } else {
            let [a, b, c, d, ..] = event.dst_addr;
            IpAddr::V4(Ipv4Addr::new(a, b, c, d))
        };
        let comm_len = event
            .comm
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(event.comm.len());
        let attribution = enrichment.attribution;
        let rule_name = attribution.and_then(|a| a.rule);
        let rule = match rule_name {
            _ if event.rule_id == RULE_ID_DEFAULT => Cow::Borrowed("default"),
            Some(name) => Cow::Borrowed(name),
            None => Cow::Owned(format!("rule-{}", event.rule_id)),
        };
        Self {
            kind: Self::KIND,
            time: rfc3339_nanos(enrichment.clock.unix_nanos(event.ts_ns)),
            seq: enrichment.seq,
            node: enrichment.node,
            verdict: verdict_name(event.verdict),
            mode: match Mode::from_u8(event.mode) {
                Some(Mode::Enforce) => "enforce",
                _ => "observe",
            },
            protocol: record_protocol::name(event.protocol),
            hook: hook_name(event.hook),
            src: Source {
                pid: (event.pid_tgid >> 32) as u32,
                tid: event.pid_tgid as u32,
                comm: String::from_utf8_lossy(&event.comm[..comm_len]),
                uid: event.uid_gid as u32,
                gid: (event.uid_gid >> 32) as u32,
                ..Source::endpoint(event.cgroup_id, &enrichment)
            },
            dst: Destination {
                ip: dst_ip,
                port: event.dst_port,
                fqdn: enrichment.dst_fqdn,
            },
            policy: attribution.map(|a| a.policy),
            policy_source: attribution.map(|a| a.source),
            rule,
            rule_id: event.rule_id,
            generation: event.generation,
            socket_cookie: event.socket_cookie,
            summary: None,
        }
    }
}

impl<'a> Source<'a> {
    /// The endpoint (cgroup, pod, container) as `enrichment` knows it, with
    /// no process: what a record made outside any process's context (a DNS
    /// answer arriving) can say.
    pub fn endpoint(cgroup_id: u64, enrichment: &Enrichment<'a>) -> Self {
        Source {
            cgroup_id,
            cgroup: enrichment.cgroup,
            pid: 0,
            tid: 0,
            comm: Cow::Borrowed(""),
            uid: 0,
            gid: 0,
            identity: match (enrichment.pod, enrichment.pod_meta) {
                (Some(_), Some(_)) => "pod",
                (Some(_), None) => "unknown-pod",
                (None, _) => "host",
            },
            pod_uid: enrichment.pod.map(|p| p.pod_uid.as_str()),
            namespace: enrichment.pod_meta.map(|m| m.namespace.as_str()),
            pod: enrichment.pod_meta.map(|m| m.name.as_str()),
            container: enrichment
                .pod
                .and_then(|p| p.container.as_ref())
                .map(|c| Container {
                    name: enrichment.pod_meta.and_then(|m| m.container_name(&c.id)),
                    id: &c.id,
                }),
            workload: enrichment.pod_meta.and_then(|m| m.workload.as_ref()),
            labels: enrichment
                .pod_meta
                .map(|m| &m.record_labels)
                .filter(|l| !l.is_empty()),
        }
    }
}

fn verdict_name(verdict: u8) -> &'static str {
    match Verdict::from_u8(verdict) {
        Some(Verdict::Allowed) => "allowed",
        Some(Verdict::Denied) => "denied",
        Some(Verdict::Audit) => "audit",
        None => "unknown",
    }
}

fn hook_name(hook: u8) -> &'static str {
    match Hook::from_u8(hook) {
        Some(Hook::Connect4) => "connect4",
        Some(Hook::Connect6) => "connect6",
        Some(Hook::Sendmsg4) => "sendmsg4",
        Some(Hook::Sendmsg6) => "sendmsg6",
        Some(Hook::Packet4) => "packet4",
        Some(Hook::Packet6) => "packet6",
        Some(Hook::Frame4) => "frame4",
        Some(Hook::Frame6) => "frame6",
        None => "unknown",
    }
}

/// Converts the kernel's CLOCK_MONOTONIC timestamps to wall-clock time, by
/// the offset between the two clocks taken once at start.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    realtime_minus_monotonic_ns: i128,
}

fn clock_ns(clock: nix::time::ClockId) -> i128 {
    let t = nix::time::clock_gettime(clock).expect("clock_gettime cannot fail for this clock");
    i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec())
}

/// Now on the kernel's event clock (CLOCK_MONOTONIC, as bpf_ktime_get_ns).
pub fn monotonic_ns() -> u64 {
    clock_ns(nix::time::ClockId::CLOCK_MONOTONIC) as u64
}

impl WallClock {
    pub fn now() -> Self {
        let monotonic = clock_ns(nix::time::ClockId::CLOCK_MONOTONIC);
        let realtime = clock_ns(nix::time::ClockId::CLOCK_REALTIME);
        Self {
            realtime_minus_monotonic_ns: realtime - monotonic,
        }
    }

    pub const fn with_offset(realtime_minus_monotonic_ns: i128) -> Self {
        Self {
            realtime_minus_monotonic_ns,
        }
    }

    pub fn unix_nanos(&self, monotonic_ns: u64) -> i128 {
        i128::from(monotonic_ns) + self.realtime_minus_monotonic_ns
    }
}

/// `2026-11-24T08:00:00.123456789Z`: always nine fractional digits.
pub fn rfc3339_nanos(unix_nanos: i128) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(unix_nanos)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_common::protocol;

    fn event() -> FlowEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"curl");
        FlowEvent {
            kind: event_kind::FLOW,
            hook: Hook::Connect4 as u8,
            verdict: Verdict::Denied as u8,
            mode: Mode::Enforce as u8,
            family: family::INET,
            protocol: protocol::TCP,
            flags: tollgate_common::flow_flags::ENDPOINT_KNOWN,
            dst_port: 443,
            rule_id: 7,
            set_id: 0,
            generation: 3,
            ts_ns: 1_000,
            cgroup_id: 99,
            pid_tgid: (1234u64 << 32) | 1235,
            uid_gid: (20u64 << 32) | 10,
            socket_cookie: 5,
            dst_addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            comm,
        }
    }

    fn bytes_of(event: &FlowEvent) -> Vec<u8> {
        // SAFETY: FlowEvent is repr(C) plain old data.
        unsafe {
            std::slice::from_raw_parts(
                (event as *const FlowEvent).cast::<u8>(),
                size_of::<FlowEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_only_complete_flow_events() {
        let e = event();
        let bytes = bytes_of(&e);
        assert_eq!(decode_event(&bytes), Some(e));
        assert_eq!(decode_event(&bytes[..bytes.len() - 1]), None);
        let mut other = e;
        other.kind = 99;
        assert_eq!(decode_event(&bytes_of(&other)), None);
    }

    #[test]
    fn record_has_the_documented_shape() {
        let e = event();
        let record = FlowRecord::new(
            &e,
            Enrichment {
                seq: 1,
                node: "node-a",
                cgroup: Some("/tgtest"),
                pod: None,
                pod_meta: None,
                clock: WallClock::with_offset(1_700_000_000_000_000_000),
                attribution: None,
                dst_fqdn: None,
            },
        );
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "type": "flow",
                "time": "2023-11-14T22:13:20.000001000Z",
                "seq": 1,
                "node": "node-a",
                "verdict": "denied",
                "mode": "enforce",
                "protocol": "tcp",
                "hook": "connect4",
                "src": {"cgroup_id": 99, "cgroup": "/tgtest", "pid": 1234, "tid": 1235, "comm": "curl", "uid": 10, "gid": 20,
                    "identity": "host", "pod_uid": null, "namespace": null, "pod": null,
                    "container": null, "workload": null, "labels": null},
                "dst": {"ip": "10.0.0.1", "port": 443, "fqdn": null},
                "policy": null,
                "policy_source": null,
                "rule": "rule-7",
                "rule_id": 7,
                "generation": 3,
                "socket_cookie": 5
            })
        );
    }

    #[test]
    fn pod_records_name_namespace_pod_container_and_workload() {
        use crate::pods::{
            directory::{ContainerMeta, PodMeta, Workload},
            kubelet,
        };
        let id = "0123456789abcdef".repeat(4);
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod6a1c3f0e_1b2c_4d5e_8f90_123456789abc.slice/cri-containerd-{id}.scope"
        );
        let pod = kubelet::parse(&path).unwrap();
        let meta = PodMeta {
            uid: pod.pod_uid.clone(),
            namespace: "prod".into(),
            name: "payments-7d9c6b5f4-x2x8q".into(),
            labels: Labels::from([
                ("app".into(), "payments".into()),
                ("team".into(), "x".into()),
            ]),
            record_labels: Labels::from([("app".into(), "payments".into())]),
            workload: Some(Workload {
                kind: "Deployment".into(),
                name: "payments".into(),
            }),
            containers: vec![ContainerMeta {
                name: "app".into(),
                id: id.clone(),
            }],
        };
        let e = event();
        let record = |pod_meta| {
            let record = FlowRecord::new(
                &e,
                Enrichment {
                    seq: 1,
                    node: "node-a",
                    cgroup: Some(&path),
                    pod: Some(&pod),
                    pod_meta,
                    clock: WallClock::with_offset(0),
                    attribution: None,
                    dst_fqdn: None,
                },
            );
            serde_json::to_value(&record).unwrap()["src"].take()
        };
        let known = record(Some(&meta));
        assert_eq!(known["identity"], "pod");
        assert_eq!(known["pod_uid"], "6a1c3f0e-1b2c-4d5e-8f90-123456789abc");
        assert_eq!(
            (&known["namespace"], &known["pod"]),
            (&"prod".into(), &"payments-7d9c6b5f4-x2x8q".into())
        );
        assert_eq!(
            known["container"],
            serde_json::json!({"name": "app", "id": id})
        );
        assert_eq!(
            known["workload"],
            serde_json::json!({"kind": "Deployment", "name": "payments"})
        );
        assert_eq!(known["labels"], serde_json::json!({"app": "payments"}));

        let unknown = record(None);
        assert_eq!(unknown["identity"], "unknown-pod");
        assert_eq!(unknown["pod_uid"], "6a1c3f0e-1b2c-4d5e-8f90-123456789abc");
        assert_eq!(
            unknown["container"],
            serde_json::json!({"name": null, "id": id})
        );
        assert_eq!(
            (&unknown["namespace"], &unknown["labels"]),
            (&serde_json::Value::Null, &serde_json::Value::Null)
        );
    }

    #[test]
    fn ipv6_destinations_and_defaults() {
        let mut e = event();
        e.family = family::INET6;
        e.dst_addr = "fd00::1".parse::<Ipv6Addr>().unwrap().octets();
        e.rule_id = RULE_ID_DEFAULT;
        e.verdict = Verdict::Audit as u8;
        e.protocol = 1;
        let record = FlowRecord::new(
            &e,
            Enrichment {
                seq: 2,
                node: "n",
                cgroup: None,
                pod: None,
                pod_meta: None,
                clock: WallClock::with_offset(0),
                attribution: Some(Attribution {
                    policy: "prod/p",
                    rule: None,
                    source: "local",
                }),
                dst_fqdn: None,
            },
        );
        assert_eq!(record.dst.ip, "fd00::1".parse::<IpAddr>().unwrap());
        assert_eq!(record.rule, "default");
        assert_eq!(record.policy, Some("prod/p"));
        assert_eq!(record.policy_source, Some("local"));
        assert_eq!(record.verdict, "audit");
        assert_eq!(record.protocol, "icmp");
    }

    #[test]
    fn named_rules_and_policies() {
        let e = event();
        let enrichment = Enrichment {
            seq: 3,
            node: "n",
            cgroup: None,
            pod: None,
            pod_meta: None,
            clock: WallClock::with_offset(0),
            attribution: Some(Attribution {
                policy: "prod/payments",
                rule: Some("dns"),
                source: "cluster",
            }),
            dst_fqdn: None,
        };
        let record = FlowRecord::new(&e, enrichment);
        assert_eq!(
            (record.policy, record.rule.as_ref(), record.policy_source),
            (Some("prod/payments"), "dns", Some("cluster"))
        );
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(
            (&json["policy"], &json["policy_source"]),
            (&"prod/payments".into(), &"cluster".into())
        );
    }

    #[test]
    fn destination_names_come_from_the_enrichment() {
        let e = event();
        let enrichment = Enrichment {
            seq: 4,
            node: "n",
            cgroup: None,
            pod: None,
            pod_meta: None,
            clock: WallClock::with_offset(0),
            attribution: None,
            dst_fqdn: Some("myregistry.azurecr.io"),
        };
        let record = FlowRecord::new(&e, enrichment);
        assert_eq!(record.dst.fqdn, Some("myregistry.azurecr.io"));
        assert_eq!(
            serde_json::to_value(&record).unwrap()["dst"],
            serde_json::json!({"ip": "10.0.0.1", "port": 443, "fqdn": "myregistry.azurecr.io"})
        );
    }

    #[test]
    fn timestamps_always_have_nine_digits() {
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_nanos(1_500_000_000_123_456_789),
            "2017-07-14T02:40:00.123456789Z"
        );
    }
}
