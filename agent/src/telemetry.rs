//! Prometheus metrics and health endpoints: `/metrics`, `/healthz`, `/readyz`.
//!
//! Kernel-side figures (decisions, losses, map fill) are read from the
//! datapath at each scrape, through the datapath task, so the numbers are
//! the kernel's own. Flow records are counted as they are written.

use std::{
    path::PathBuf,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    cluster::report::{self, Reports},
    control::controller::Command,
    datapath::{Degraded, PROGRAMS},
    export::delivery::{SinkStats, StatsBySink},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `addresses_per_name` or `addresses_per_endpoint`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordLabels {
    pub verdict: String,
    /// The deciding policy; empty when no policy selects the source.
    pub policy: String,
    /// The source pod's namespace; empty for host processes and pods not
    /// known yet.
    pub namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    method: &'static str,
    /// The gRPC status code's name: `Ok`, `InvalidArgument`, ...
    code: String,
}

/// Control API calls by method and status code.
#[derive(Clone, Default)]
pub struct GrpcCalls(Family<GrpcLabels, Counter>);

impl GrpcCalls {
    pub fn count(&self, method: &'static str, code: tonic::Code) {
        let labels = GrpcLabels {
            method,
            code: format!("{code:?}"),
        };
        self.0.get_or_create(&labels).inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
}

/// Rules (and policy defaults) in force up to which each gets series of
/// its own (`tollgate_rule_hits_total`, three verdicts, and
/// `tollgate_rule_last_hit_timestamp_seconds`); above it, only the
/// per-policy sums (`tollgate_policy_hits_total`) are exported, so a
/// large rule set never makes more than about 4,000 series.
pub const RULE_METRICS_MAX: usize = 1_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    policy: String,
    /// The rule's name, or `default`.
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleVerdictLabels {
    policy: String,
    rule: String,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyVerdictLabels {
    policy: String,
    verdict: &'static str,
}

/// The per-rule hit metrics (see [`RULE_METRICS_MAX`]).
fn register_rule_hits(registry: &mut Registry, rules: &[tollgate_proto::v1::RuleStats]) {
    let per_policy = Family::<PolicyVerdictLabels, Counter>::default();
    let per_rule = Family::<RuleVerdictLabels, Counter>::default();
    let last_hit = Family::<RuleLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let each_rule = rules.len() <= RULE_METRICS_MAX;
    for r in rules {
        let rule = if r.rule.is_empty() {
            "default".to_owned()
        } else {
            r.rule.clone()
        };
        for (verdict, value) in [
            ("allowed", r.allowed),
            ("denied", r.denied),
            ("audit", r.audit),
        ] {
            per_policy
                .get_or_create(&PolicyVerdictLabels {
                    policy: r.policy.clone(),
                    verdict,
                })
                .inc_by(value);
            if each_rule {
                per_rule
                    .get_or_create(&RuleVerdictLabels {
                        policy: r.policy.clone(),
                        rule: rule.clone(),
                        verdict,
                    })
                    .inc_by(value);
            }
        }
        if each_rule && r.last_hit_unix_nanos != 0 {
            last_hit
                .get_or_create(&RuleLabels {
                    policy: r.policy.clone(),
                    rule,
                })
                .set(r.last_hit_unix_nanos as f64 / 1e9);
        }
    }
    registry.register(
        "policy_hits",
        "Decisions of each policy's rules and default, counted in the kernel, by verdict",
        per_policy,
    );
    if each_rule {
        registry.register(
            "rule_hits",
            "Decisions of each rule (rule=\"default\": the policy's default), counted in the kernel, by verdict; only while at most 1000 rules are in force",
            per_rule,
        );
        registry.register(
            "rule_last_hit_timestamp_seconds",
            "When each rule (or default) that ever decided last decided (Unix time)",
            last_hit,
        );
    }
}

/// What the datapath attached and what the kernel refused.
struct Programs {
    links: Vec<&'static str>,
    degraded: Vec<String>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeatureLabels {
    feature: String,
    program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabels {
    sink: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// What the HTTP handlers share with the rest of the agent.
#[derive(Clone)]
pub struct Telemetry {
    /// Flow records written, by verdict, policy and namespace.
    pub flow_records: Family<RecordLabels, Counter>,
    /// Connections those records stand for (an aggregate's count).
    pub reported_decisions: Family<RecordLabels, Counter>,
    /// Live learned FQDN addresses, as the last sweep counted them.
    pub learned_addresses: Gauge,
    /// Learned addresses forgotten to keep within a limit, by limit.
    pub limit_evictions: Family<LimitLabels, Counter>,
    pub grpc_calls: GrpcCalls,
    /// The sinks' counters, once the exporter has started.
    sinks: Arc<OnceLock<StatsBySink>>,
    ready: Arc<AtomicBool>,
    /// The hooks attached (by link name), and what the kernel refused, as
    /// readiness names it.
    programs: Arc<OnceLock<Programs>>,
    commands: mpsc::Sender<Command>,
    links_dir: PathBuf,
    /// This node's report on the cluster's policies, once they are watched.
    cluster_reports: Arc<OnceLock<Reports>>,
}

impl Telemetry {
    pub fn new(commands: mpsc::Sender<Command>, links_dir: PathBuf) -> Self {
        Self {
            flow_records: Family::default(),
            reported_decisions: Family::default(),
            learned_addresses: Gauge::default(),
            limit_evictions: Family::default(),
            grpc_calls: GrpcCalls::default(),
            sinks: Arc::default(),
            ready: Arc::default(),
            programs: Arc::default(),
            commands,
            links_dir,
            cluster_reports: Arc::default(),
        }
    }

    pub fn set_cluster_reports(&self, reports: Reports) {
        let _ = self.cluster_reports.set(reports);
    }

    pub fn set_sinks(&self, sinks: StatsBySink) {
        let _ = self.sinks.set(sinks);
    }

    /// Programs attached and the saved policy set in force.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// The hooks the datapath attached, by link name, and the features the
    /// kernel refused the programs of: the agent is ready without them, and
    /// its readiness says what it lacks.
    pub fn set_programs(&self, links: Vec<&'static str>, degraded: &[Degraded]) {
        let _ = self.programs.set(Programs {
            links,
            degraded: degraded
                .iter()
                .map(|d| format!("{} ({} refused)", d.feature, d.program))
                .collect(),
        });
    }

    /// The answer of a ready agent: degraded features are named, since a
    /// node that enforces without them is still ready.
    fn ready_text(&self) -> String {
        match self.programs.get() {
            Some(programs) if !programs.degraded.is_empty() => {
                format!("ready, degraded: {}\n", programs.degraded.join(", "))
            }
            _ => "ready\n".to_owned(),
        }
    }

    /// Why the agent is not ready, if it is not: before it got ready, or
    /// when its programs are no longer pinned (someone ran cleanup).
    fn not_ready(&self) -> Option<String> {
        if !self.ready.load(Ordering::SeqCst) {
            return Some("starting or stopping".into());
        }
        let missing: Vec<&str> = self
            .programs
            .get()
            .map(|p| p.links.as_slice())
            .unwrap_or(&PROGRAMS)
            .iter()
            .copied()
            .filter(|p| !self.links_dir.join(p).exists())
            .collect();
        (!missing.is_empty()).then(|| format!("programs not attached: {}", missing.join(", ")))
    }

    async fn render(&self) -> Result<String, String> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Status(reply))
            .await
            .map_err(|_| "the agent is stopping".to_owned())?;
        let status = answer
            .await
            .map_err(|_| "the agent is stopping".to_owned())?
            .map_err(|e| e.to_string())?;
        let counters = status.counters.unwrap_or_default();

        let mut registry = Registry::with_prefix("tollgate");
        let decisions = Family::<VerdictLabels, Counter>::default();
        for (verdict, value) in [
            ("allowed", counters.allowed),
            ("denied", counters.denied),
            ("audit", counters.audit),
        ] {
            decisions
                .get_or_create(&VerdictLabels { verdict })
                .inc_by(value);
        }
        registry.register(
            "decisions",
            "Connections decided in the kernel, by verdict",
            decisions,
        );
        let counter = |value: u64| {
            let counter = Counter::<u64>::default();
            counter.inc_by(value);
            counter
        };
        registry.register(
            "allowed_not_reported",
            "Allowed decisions not reported because the same flow was reported within the interval",
            counter(counters.allowed_deduplicated),
        );
        registry.register(
            "denied_packets_not_reported",
            "Denied or audit packets (packet hooks) not reported because the same flow was reported within the interval",
            counter(counters.packets_deduplicated),
        );
        registry.register(
            "allowed_counts_full",
            "Allowed decisions of new flows reported one by one because the kernel's counting half was full",
            counter(counters.allowed_counts_full),
        );
        registry.register(
            "ringbuf_reserve_failures",
            "Events lost because the ring buffer was full",
            counter(counters.ringbuf_reserve_failed),
        );
        registry.register(
            "generation_retries",
            "Decisions redone because the rules switched under them",
            counter(counters.generation_retries),
        );
        for (name, help, value) in [
            (
                "dns_answers",
                "DNS answers from trusted resolvers seen by the kernel",
                counters.dns_answers,
            ),
            (
                "dns_addresses_learned",
                "Addresses the kernel installed or refreshed for FQDN rules",
                counters.dns_addresses_learned,
            ),
            (
                "dns_answers_to_agent",
                "DNS answers the kernel left to the agent (TCP, too large, too odd)",
                counters.dns_answers_to_agent,
            ),
            (
                "dns_answers_malformed",
                "DNS answers the kernel found malformed (nothing learned)",
                counters.dns_answers_malformed,
            ),
            (
                "dns_answers_untrusted",
                "DNS answers from port 53 of resolvers that are not trusted (ignored)",
                counters.dns_answers_untrusted,
            ),
            (
                "dns_answers_not_asked",
                "DNS answers to a socket that sent no query with their id and question to that resolver (nothing learned)",
                counters.dns_answers_not_asked,
            ),
            (
                "dns_answers_via_loopback",
                "DNS answers over loopback from a non-loopback resolver to a socket outside the host's network namespace (nothing learned)",
                counters.dns_answers_via_loopback,
            ),
            (
                "dns_queries_foreign_netns",
                "Connects and sends to a trusted resolver from a socket outside its endpoint's network namespace (their answers teach nothing)",
                counters.dns_queries_foreign_netns,
            ),
            (
                "dns_spoofed_dropped",
                "Packets of raw and other packet-hook sockets claiming to come from a trusted resolver (dropped)",
                counters.dns_spoofed_dropped,
            ),
            (
                "fqdn_slots_full",
                "Learned addresses that matched more FQDN patterns than an entry holds",
                counters.fqdn_slots_full,
            ),
        ] {
            registry.register(name, help, counter(value));
        }
        let degraded = Family::<FeatureLabels, Gauge>::default();
        for feature in &status.degraded {
            degraded
                .get_or_create(&FeatureLabels {
                    feature: feature.feature.clone(),
                    program: feature.program.clone(),
                })
                .set(1);
        }
        registry.register(
            "degraded",
            "1 for each feature whose program this kernel refused (the agent enforces without it)",
            degraded,
        );
        registry.register(
            "fqdn_learned_addresses",
            "Addresses endpoints learned from DNS answers that are alive, as of the last sweep",
            self.learned_addresses.clone(),
        );
        registry.register(
            "fqdn_limit_evictions",
            "Learned addresses forgotten to keep an endpoint within a limit, by limit",
            self.limit_evictions.clone(),
        );
        registry.register(
            "flow_records",
            "Flow records written, by verdict, policy and source namespace",
            self.flow_records.clone(),
        );
        registry.register(
            "reported_decisions",
            "Decisions the flow records stand for, by verdict, policy and source namespace",
            self.reported_decisions.clone(),
        );
        registry.register(
            "grpc_requests",
            "Control API calls, by method and status code",
            self.grpc_calls.0.clone(),
        );

        if let Some(sinks) = self.sinks.get() {
            register_sinks(&mut registry, sinks);
        }

        let entries = Family::<MapLabels, Gauge>::default();
        let capacity = Family::<MapLabels, Gauge>::default();
        for map in &status.maps {
            let labels = MapLabels {
                map: map.name.clone(),
            };
            entries.get_or_create(&labels).set(map.entries as i64);
            capacity.get_or_create(&labels).set(map.capacity as i64);
        }
        registry.register("map_entries", "Entries in force in the rule maps", entries);
        registry.register("map_capacity", "Capacity of the rule maps", capacity);
        let gauge = |value: i64| {
            let gauge = Gauge::<i64>::default();
            gauge.set(value);
            gauge
        };
        let policies = Family::<SourceLabels, Gauge>::default();
        let cluster = i64::from(status.cluster_policies);
        for (source, count) in [
            ("local", i64::from(status.policies) - cluster),
            ("cluster", cluster),
        ] {
            policies
                .get_or_create(&SourceLabels {
                    source: source.into(),
                })
                .set(count);
        }
        registry.register(
            "policies",
            "Policies in the applied set, by source: cluster (EgressPolicy and ClusterEgressPolicy resources) or local",
            policies,
        );
        registry.register(
            "endpoints",
            "Endpoints selected by a policy",
            gauge(i64::from(status.endpoints)),
        );
        registry.register(
            "policy_generation",
            "Generation of the applied policy set",
            gauge(status.policy_generation as i64),
        );
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(Command::RuleStats(Default::default(), reply))
            .await
            .is_ok()
            && let Ok(Ok(rules)) = answer.await
        {
            register_rule_hits(&mut registry, &rules.rules);
        }
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The agent's version", build);

        let mut text = String::new();
        encode(&mut text, &registry).map_err(|e| e.to_string())?;
        Ok(text)
    }
}

fn register_sinks(registry: &mut Registry, sinks: &StatsBySink) {
    type Read = fn(&SinkStats) -> &AtomicU64;
    let counters: [(&str, &str, Read); 5] = [
        (
            "export_delivered_records",
            "Records the sink's receiver took",
            |s| &s.delivered,
        ),
        (
            "export_dropped_records",
            "Records lost before the sink's spool (queue or spool full, or an unwritable stdout)",
            |s| &s.dropped,
        ),
        (
            "export_rejected_records",
            "Records the sink's receiver refused for good",
            |s| &s.rejected,
        ),
        (
            "export_truncated_records",
            "Records sent cut to the sink's maxMessageBytes (syslog over UDP)",
            |s| &s.truncated,
        ),
        (
            "export_send_failures",
            "Deliveries that failed and will be retried",
            |s| &s.send_failures,
        ),
    ];
    for (name, help, read) in counters {
        let family = Family::<SinkLabels, Counter>::default();
        for (sink, stats) in sinks {
            let labels = SinkLabels { sink: sink.clone() };
            family
                .get_or_create(&labels)
                .inc_by(read(stats).load(Ordering::Relaxed));
        }
        registry.register(name, help, family);
    }
    let gauges: [(&str, &str, Read); 3] = [
        (
            "export_queued_records",
            "Records in the sink's memory queue",
            |s| &s.queued_records,
        ),
        (
            "export_spooled_records",
            "Records in the sink's disk spool, not yet delivered",
            |s| &s.spooled_records,
        ),
        (
            "export_spooled_bytes",
            "Bytes of the sink's disk spool",
            |s| &s.spooled_bytes,
        ),
    ];
    for (name, help, read) in gauges {
        let family = Family::<SinkLabels, Gauge>::default();
        for (sink, stats) in sinks {
            let labels = SinkLabels { sink: sink.clone() };
            family
                .get_or_create(&labels)
                .set(read(stats).load(Ordering::Relaxed) as i64);
        }
        registry.register(name, help, family);
    }
}

fn router(telemetry: Telemetry) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(t): State<Telemetry>| async move {
                match t.not_ready() {
                    None => (StatusCode::OK, t.ready_text()),
                    Some(why) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("not ready: {why}\n"),
                    ),
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(t): State<Telemetry>| async move {
                match t.render().await {
                    Ok(text) => (
                        [(
                            "content-type",
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                        .into_response(),
                    Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e).into_response(),
                }
            }),
        )
        .route(
            report::PATH,
            get(|State(t): State<Telemetry>| async move {
                report::respond(t.cluster_reports.get())
            }),
        )
        .with_state(telemetry)
}

/// Binds now (so a bad address stops the start), serves until `shutdown`.
pub async fn serve(
    addr: std::net::SocketAddr,
    telemetry: Telemetry,
    shutdown: CancellationToken,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(async move {
        axum::serve(listener, router(telemetry))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    })
}
