//! Flow records for gRPC subscribers: a bounded buffer of recent records, so
//! a client can start a little in the past, and a broadcast of new ones.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use tokio::sync::broadcast;
use tollgate_proto::v1::{
    Flow, FlowContainer, FlowDestination, FlowFilter, FlowSource, FlowWorkload,
};

use crate::flow::FlowRecord;

/// How many records, and how old at most, the recent buffer keeps.
const RECENT_RECORDS: usize = 4096;
const RECENT_AGE: Duration = Duration::from_secs(300);
/// Records a slow subscriber may fall behind by before it is told it lagged.
const SUBSCRIBER_BACKLOG: usize = 4096;

/// Records with the time they were published, oldest first.
type Recent = VecDeque<(Instant, Arc<Flow>)>;

/// The publishing side, owned by the task that reads the ring buffer. When
/// it is dropped, every subscriber's stream ends.
pub struct FlowHub {
    recent: Arc<Mutex<Recent>>,
    live: broadcast::Sender<Arc<Flow>>,
}

/// The subscribing side, for the API: it does not keep the stream alive.
#[derive(Clone)]
pub struct FlowSubscriptions {
    recent: Arc<Mutex<Recent>>,
    live: broadcast::WeakSender<Arc<Flow>>,
}

impl Default for FlowHub {
    fn default() -> Self {
        Self {
            recent: Arc::default(),
            live: broadcast::channel(SUBSCRIBER_BACKLOG).0,
        }
    }
}

impl FlowHub {
    pub fn subscriptions(&self) -> FlowSubscriptions {
        FlowSubscriptions {
            recent: self.recent.clone(),
            live: self.live.downgrade(),
        }
    }

    pub fn publish(&self, record: &FlowRecord) {
        let flow = Arc::new(to_api(record));
        let now = Instant::now();
        {
            let mut recent = self.recent.lock().expect("not poisoned");
            while recent.len() >= RECENT_RECORDS
                || recent.front().is_some_and(|(t, _)| now - *t > RECENT_AGE)
            {
                recent.pop_front();
            }
            recent.push_back((now, flow.clone()));
        }
        // No subscriber is not an error.
        let _ = self.live.send(flow);
    }
}

impl FlowSubscriptions {
    /// The kept records of the last `since`, and a receiver of new ones
    /// (subscribed first, so nothing falls between the two); no receiver
    /// once the agent is stopping.
    pub fn subscribe(
        &self,
        since: Duration,
    ) -> (Vec<Arc<Flow>>, Option<broadcast::Receiver<Arc<Flow>>>) {
        let receiver = self.live.upgrade().map(|live| live.subscribe());
        let now = Instant::now();
        let recent = self.recent.lock().expect("not poisoned");
        let past = recent
            .iter()
            .filter(|(t, _)| now - *t <= since)
            .map(|(_, f)| f.clone())
            .collect();
        (past, receiver)
    }
}

/// A checked filter.
pub struct Filter {
    verdicts: Vec<String>,
    namespace: Option<String>,
    pod: Option<String>,
    destination: Option<IpNet>,
    destination_name: Option<String>,
    policy: Option<String>,
}

/// Why a filter cannot be used: the field and what is wrong with it.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidFilter(pub String);

impl Filter {
    pub fn new(filter: &FlowFilter) -> Result<Self, InvalidFilter> {
        for verdict in &filter.verdicts {
            if !["allowed", "denied", "audit"].contains(&verdict.as_str()) {
                return Err(InvalidFilter(format!(
                    "verdicts: {verdict:?} is not one of \"allowed\", \"denied\", \"audit\""
                )));
            }
        }
        let destination = match filter.destination_cidr.as_str() {
            "" => None,
            text => Some(
                text.parse::<IpNet>()
                    .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        InvalidFilter(format!("destinationCidr: {text:?} is not a valid prefix"))
                    })?,
            ),
        };
        let set = |s: &String| (!s.is_empty()).then(|| s.clone());
        Ok(Self {
            verdicts: filter.verdicts.clone(),
            namespace: set(&filter.namespace),
            pod: set(&filter.pod),
            destination,
            destination_name: set(&filter.destination_name)
                .map(|n| n.trim_end_matches('.').to_ascii_lowercase()),
            policy: set(&filter.policy),
        })
    }

    pub fn matches(&self, flow: &Flow) -> bool {
        let src = flow.src.as_ref();
        let dst = flow.dst.as_ref();
        (self.verdicts.is_empty() || self.verdicts.contains(&flow.verdict))
            && self
                .namespace
                .as_ref()
                .is_none_or(|n| src.and_then(|s| s.namespace.as_ref()) == Some(n))
            && self
                .pod
                .as_ref()
                .is_none_or(|p| src.and_then(|s| s.pod.as_ref()) == Some(p))
            && self.destination.is_none_or(|net| {
                dst.and_then(|d| d.ip.parse::<std::net::IpAddr>().ok())
                    .is_some_and(|ip| net.contains(&ip))
            })
            && self
                .destination_name
                .as_ref()
                .is_none_or(|n| dst.and_then(|d| d.fqdn.as_ref()) == Some(n))
            && self.policy.as_ref().is_none_or(|p| {
                flow.policy
                    .as_ref()
                    .is_some_and(|fp| fp.split(',').any(|x| x == p))
            })
    }
}

/// The API form of a flow record: the same fields.
pub fn to_api(record: &FlowRecord) -> Flow {
    Flow {
        time: record.time.clone(),
        seq: record.seq,
        node: record.node.to_owned(),
        verdict: record.verdict.to_owned(),
        mode: record.mode.to_owned(),
        protocol: record.protocol.to_string(),
        hook: record.hook.to_owned(),
        src: Some(FlowSource {
            cgroup_id: record.src.cgroup_id,
            cgroup: record.src.cgroup.map(str::to_owned),
            pid: record.src.pid,
            tid: record.src.tid,
            comm: record.src.comm.to_string(),
            uid: record.src.uid,
            gid: record.src.gid,
            namespace: record.src.namespace.map(str::to_owned),
            pod: record.src.pod.map(str::to_owned),
            pod_uid: record.src.pod_uid.map(str::to_owned),
            identity: record.src.identity.to_owned(),
            container: record.src.container.as_ref().map(|c| FlowContainer {
                name: c.name.map(str::to_owned),
                id: c.id.to_owned(),
            }),
            workload: record.src.workload.map(|w| FlowWorkload {
                kind: w.kind.clone(),
                name: w.name.clone(),
            }),
            labels: record
                .src
                .labels
                .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                .unwrap_or_default(),
        }),
        dst: Some(FlowDestination {
            ip: record.dst.ip.to_string(),
            port: u32::from(record.dst.port),
            fqdn: record.dst.fqdn.map(str::to_owned),
        }),
        policy: record.policy.map(str::to_owned),
        policy_source: record.policy_source.map(str::to_owned),
        rule: record.rule.to_string(),
        rule_id: record.rule_id,
        generation: record.generation,
        socket_cookie: record.socket_cookie,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(verdict: &str, ip: &str, policy: Option<&str>) -> Flow {
        Flow {
            verdict: verdict.into(),
            dst: Some(FlowDestination {
                ip: ip.into(),
                port: 443,
                fqdn: (ip == "10.9.9.9").then(|| "api.example.com".into()),
            }),
            policy: policy.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn filters_combine() {
        let filter = Filter::new(&FlowFilter {
            verdicts: vec!["denied".into(), "audit".into()],
            destination_cidr: "10.0.0.0/8".into(),
            policy: "web".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(filter.matches(&flow("denied", "10.1.2.3", Some("web"))));
        assert!(
            filter.matches(&flow("audit", "10.1.2.3", Some("a,web"))),
            "default owned by several policies"
        );
        assert!(!filter.matches(&flow("allowed", "10.1.2.3", Some("web"))));
        assert!(!filter.matches(&flow("denied", "11.1.2.3", Some("web"))));
        assert!(!filter.matches(&flow("denied", "10.1.2.3", None)));
        let by_pod = Filter::new(&FlowFilter {
            namespace: "prod".into(),
            pod: "payments-1".into(),
            ..Default::default()
        })
        .unwrap();
        let from = |namespace: &str, pod: &str| Flow {
            src: Some(FlowSource {
                namespace: Some(namespace.into()),
                pod: Some(pod.into()),
                ..Default::default()
            }),
            ..flow("denied", "10.1.2.3", Some("web"))
        };
        assert!(by_pod.matches(&from("prod", "payments-1")));
        assert!(!by_pod.matches(&from("dev", "payments-1")));
        assert!(!by_pod.matches(&from("prod", "payments-2")));
        assert!(
            !by_pod.matches(&flow("denied", "10.1.2.3", Some("web"))),
            "a host's record"
        );
    }

    #[test]
    fn bad_filters_say_what_is_wrong() {
        let filter = |f: FlowFilter| Filter::new(&f).err().unwrap();
        let InvalidFilter(err) = filter(FlowFilter {
            verdicts: vec!["blocked".into()],
            ..Default::default()
        });
        assert!(err.starts_with("verdicts: \"blocked\""), "{err}");
        assert_eq!(
            filter(FlowFilter {
                destination_cidr: "10.0.0.0/99".into(),
                ..Default::default()
            }),
            InvalidFilter("destinationCidr: \"10.0.0.0/99\" is not a valid prefix".into())
        );
    }

    #[test]
    fn destination_names_match_the_name_the_address_was_learned_under() {
        let by_name = Filter::new(&FlowFilter {
            destination_name: "API.example.com.".into(),
            ..Default::default()
        })
        .unwrap();
        assert!(by_name.matches(&flow("allowed", "10.9.9.9", None)));
        assert!(!by_name.matches(&flow("allowed", "10.1.2.3", None)));
    }

    #[test]
    fn the_api_flow_has_the_fields_of_the_json_record() {
        use crate::flow::{Container, Destination, Source};
        use crate::pods::directory::Workload;
        let workload = Workload {
            kind: "Deployment".into(),
            name: "payments".into(),
        };
        let labels = tollgate_policy::select::Labels::from([("app".into(), "payments".into())]);
        let record = FlowRecord {
            kind: FlowRecord::KIND,
            time: "2026-11-24T08:00:00.000000001Z".into(),
            seq: 9,
            node: "n",
            verdict: "denied",
            mode: "enforce",
            protocol: "tcp".into(),
            hook: "connect4",
            src: Source {
                cgroup_id: 1,
                cgroup: Some("/a"),
                pid: 2,
                tid: 3,
                comm: "curl".into(),
                uid: 4,
                gid: 5,
                identity: "pod",
                pod_uid: Some("0f5b6e2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b"),
                namespace: Some("prod"),
                pod: Some("payments-1"),
                container: Some(Container {
                    name: Some("app"),
                    id: "abc",
                }),
                workload: Some(&workload),
                labels: Some(&labels),
            },
            dst: Destination {
                ip: "10.0.0.1".parse().unwrap(),
                port: 443,
                fqdn: None,
            },
            policy: Some("p"),
            policy_source: Some("local"),
            rule: "r".into(),
            rule_id: 7,
            generation: 8,
            socket_cookie: 6,
            summary: None,
        };
        let json = serde_json::to_value(&record).unwrap();
        let api = serde_json::to_value(to_api(&record)).unwrap();
        // Same fields, same values; the API spells them in camelCase and
        // adds the Kubernetes and DNS ones.
        fn camel(s: &str) -> String {
            let mut out = String::new();
            let mut upper = false;
            for c in s.chars() {
                if c == '_' {
                    upper = true;
                } else if upper {
                    out.push(c.to_ascii_uppercase());
                    upper = false;
                } else {
                    out.push(c);
                }
            }
            out
        }
        fn check(json: &serde_json::Value, api: &serde_json::Value, path: &str) {
            for (key, value) in json.as_object().unwrap() {
                // The API's message type is the record type.
                if path.is_empty() && key == "type" {
                    assert_eq!(value, "flow");
                    continue;
                }
                let api_value = &api[camel(key)];
                if value.is_object() {
                    check(value, api_value, &format!("{path}.{key}"));
                } else if value.is_number() || value.is_null() {
                    assert_eq!(value, api_value, "{path}.{key}");
                } else {
                    assert_eq!(value.as_str(), api_value.as_str(), "{path}.{key}");
                }
            }
        }
        check(&json, &api, "");
    }
}
