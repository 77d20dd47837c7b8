//! The agent's main job: put the datapath in place, then turn every decision
//! into a flow record for the sinks until told to stop. Stopping leaves the
//! programs pinned and attached: enforcement outlives the agent.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{sync::mpsc, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tollgate_common::Mode;
use tollgate_proto::v1 as api;
use tracing::{info, warn};

use crate::{
    cgroup_watch::CgroupWatcher,
    cgroups::CgroupPaths,
    cluster::watch::ClusterWatch,
    config::AllowedFlows,
    control::{
        controller::{ControlError, Controller},
        flows::FlowHub,
        server::{self, Listen, ServeError},
        service::Api,
    },
    datapath::{Datapath, DatapathError, DatapathOptions},
    enforce::{EndpointOptions, Enforcer},
    export::{
        aggregate::{Aggregator, CountedFlows},
        config::SinkConfig,
        delivery::{ExportError, Exporter},
    },
    flow::WallClock,
    kubernetes::{self, ApiSource, WatchError},
    log_level::LogLevel,
    names::{LearnedAddresses, Limits, Messages, NameCache},
    pods::{
        UnknownPodAction,
        directory::{IdentityUpdate, PodDirectory},
        watch,
    },
    telemetry::{self, Telemetry},
};

/// Everything the run needs, resolved from flags before the runtime starts.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub datapath: DatapathOptions,
    pub cgroup2_mount: PathBuf,
    pub node: String,
    pub allowed_report_interval: Duration,
    pub allowed_flows: AllowedFlows,
    pub log_level: LogLevel,
    /// The global mode given on the command line (else the saved one).
    pub mode: Option<Mode>,
    /// Policy documents from --policy, applied over the saved set at start.
    pub policies: Vec<api::EgressPolicy>,
    pub state_dir: PathBuf,
    pub listen: Vec<Listen>,
    /// Where to serve /metrics, /healthz and /readyz, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Where pod metadata comes from; None: endpoints are cgroups only.
    pub kubernetes: Option<ApiSource>,
    /// Whether to watch and enforce the cluster's policy resources (with
    /// `kubernetes` only).
    pub cluster_policies: bool,
    pub unknown_pod_action: UnknownPodAction,
    /// Pod label keys that flow records carry.
    pub pod_label_keys: Vec<String>,
    /// Where records go (stdout as JSON lines when none are configured).
    pub sinks: Vec<SinkConfig>,
    /// Resolvers whose answers FQDN rules learn from.
    pub dns_resolvers: Vec<SocketAddr>,
    /// Bounds of a learned address's lifetime (its answer's TTL, clamped).
    pub learned_ttl: (Duration, Duration),
    pub fqdn_limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("reading events: {0}")]
    Events(io::Error),
    #[error("putting the policies in force: {0}")]
    Control(#[from] ControlError),
    #[error("control API: {0}")]
    Serve(#[from] ServeError),
    #[error("metrics: {0}")]
    Metrics(io::Error),
    #[error("the control API stopped: {0}")]
    ServerStopped(String),
    #[error("watching cgroups: {0}")]
    Watch(io::Error),
    #[error(transparent)]
    Kubernetes(#[from] WatchError),
    #[error(transparent)]
    Export(#[from] ExportError),
}

/// How long open control calls may take to finish after a stop.
const SERVER_DRAIN: Duration = Duration::from_secs(5);
/// How long sinks may deliver after a stop; the rest stays spooled.
const EXPORT_DRAIN: Duration = Duration::from_secs(5);
/// How often the kernel's count of events its ring buffer could not take
/// is turned into loss markers.
const LOSS_CHECK: Duration = Duration::from_secs(1);
/// Allowed-flow aggregates held at once (about 200 bytes each); beyond,
/// new flows are reported one by one.
const MAX_OPEN_AGGREGATES: usize = 100_000;

/// How often expired learned addresses are removed and the live ones counted.
const LEARNED_SWEEP: Duration = Duration::from_secs(10);

/// New and removed cgroups are noticed at once through inotify; a full
/// rescan this often catches anything inotify could not report (a queue
/// overflow).
const CGROUP_RESCAN: Duration = Duration::from_secs(30);

const BATCH: usize = 512;

mod publish;
use publish::{FqdnMetrics, KernelCounts, Printer, RecordCounters};

pub async fn run(config: RunConfig, shutdown: CancellationToken) -> Result<(), RunError> {
    let (commands_tx, mut commands) = mpsc::channel(64);
    // Health answers from the start; readiness once everything is in force.
    let telemetry = Telemetry::new(commands_tx.clone(), config.datapath.pin_dir().join("links"));
    let metrics = match config.metrics_listen {
        Some(addr) => {
            let serving = telemetry::serve(addr, telemetry.clone(), shutdown.clone())
                .await
                .map_err(RunError::Metrics)?;
            info!(%addr, "metrics and health listening");
            Some(tokio::spawn(serving))
        }
        None => None,
    };
    let mut datapath = Datapath::open(&config.datapath)?;
    datapath.set_trusted_resolvers(&config.dns_resolvers)?;
    datapath.set_learned_ttl_bounds(config.learned_ttl.0, config.learned_ttl.1)?;
    info!(resolvers = ?config.dns_resolvers, ttl = ?config.learned_ttl, "learning FQDN rules' addresses from DNS answers");
    // In the aggregate mode the kernel counts allowed flows itself
    // (Printer::start_counting) and suppresses no report.
    let aggregate = config.allowed_flows == AllowedFlows::Aggregate
        && !config.allowed_report_interval.is_zero();
    datapath.set_allowed_report_interval(if aggregate {
        Duration::ZERO
    } else {
        config.allowed_report_interval
    })?;
    // The packet hooks judge every packet: whatever the flow mode, the
    // kernel reports each of their flows once per interval, so that a
    // flood of packets does not flood the ring buffer.
    datapath.set_packet_report_interval(config.allowed_report_interval)?;
    let mut reader = datapath
        .take_event_reader()
        .map_err(RunError::Events)?
        .expect("a fresh datapath has its reader");
    for (program, attachment) in datapath.attachments() {
        info!(program, ?attachment, "attached");
    }
    for degraded in datapath.degraded() {
        tracing::error!(
            feature = degraded.feature,
            program = degraded.program,
            reason = %degraded.reason,
            "DEGRADED: this kernel refused a program; enforcing without it: {}",
            degraded.consequence
        );
    }
    telemetry.set_programs(datapath.hook_links(), datapath.degraded());
    // Watching starts before the first walk of the tree, so a cgroup made
    // at any moment after it is reported (queued until the loop runs).
    let mut cgroups = CgroupWatcher::new(&config.cgroup2_mount).map_err(RunError::Watch)?;
    info!(cgroups = cgroups.watched(), "watching cgroups");
    // Pod metadata arrives when the API server answers; nothing waits for it
    // but the node's taint (cluster::taint).
    let (pod_updates_tx, mut pod_updates) = mpsc::channel(256);
    let (identities_listed, identities_known) = tokio::sync::watch::channel(false);
    let mut lists = IdentityLists::default();
    let kubernetes_client = match &config.kubernetes {
        Some(source) => Some(kubernetes::client(source).await?),
        None => None,
    };
    if let Some(client) = &kubernetes_client {
        info!(source = ?config.kubernetes, node = %config.node, "watching pods and namespaces");
        tokio::spawn(watch::watch(
            client.clone(),
            config.node.clone(),
            config.pod_label_keys.clone(),
            pod_updates_tx.clone(),
            shutdown.clone(),
        ));
    }
    // Pods known to the last run stay known until the first list replaces
    // them: a restart does not turn running pods into unknown ones.
    let pods_file = config.state_dir.join("pods.json");
    let pods = match config.kubernetes {
        Some(_) => load_pods(&pods_file),
        None => PodDirectory::default(),
    };
    let mut enforcer = Enforcer::new(
        &config.cgroup2_mount,
        EndpointOptions {
            kubernetes: config.kubernetes.is_some(),
            unknown_pod_action: config.unknown_pod_action,
        },
        pods,
    );
    // Endpoints are selected from what the watcher sees, not a walk each time.
    enforcer.use_cgroup_index(cgroups.index());
    // The saved and given policies are in force before the agent is ready.
    let mut controller = Controller::start(
        &mut datapath,
        &config.state_dir,
        enforcer,
        &config.datapath.cgroup,
        config.policies,
        config.mode,
    )?;
    // Only now, with the rules in this layout's maps, may an older layout's
    // programs stop enforcing.
    datapath.take_over_older_layouts()?;
    info!(
        policies = controller.policy_count(),
        endpoints = controller.enforcer().endpoint_count(),
        generation = datapath.generation(),
        "policies in force"
    );

    // The cluster's policies arrive through the same controller; until the
    // API server answers, the saved set stays in force.
    if let Some(client) = kubernetes_client.filter(|_| config.cluster_policies) {
        info!("watching EgressPolicy and ClusterEgressPolicy resources");
        let (report, reports) = tokio::sync::watch::channel(Default::default());
        telemetry.set_cluster_reports(reports);
        let cluster = ClusterWatch {
            client,
            node: config.node.clone(),
            commands: commands_tx.clone(),
            in_force: controller.cluster_documents(),
            remove_taint: true,
            identities_known,
            report,
        };
        tokio::spawn(cluster.run(shutdown.clone()));
    }

    let (exporter, sink_tasks, sink_stats) =
        Exporter::start(config.sinks.clone(), &config.state_dir, &config.node)?;
    telemetry.set_sinks(sink_stats);
    info!(sinks = ?exporter.sink_names().collect::<Vec<_>>(), "exporting");

    let flows = FlowHub::default();
    let api = Api::new(
        commands_tx,
        flows.subscriptions(),
        config.log_level.clone(),
        telemetry.grpc_calls.clone(),
    );
    let mut servers = JoinSet::new();
    for listen in &config.listen {
        let bound = server::bind(listen).await?;
        info!(?listen, "control API listening");
        servers.spawn(server::serve(bound, api.clone(), shutdown.clone()));
    }
    drop(api);
    info!(
        cgroup = %config.datapath.cgroup.display(),
        pin_dir = %datapath.pin_dir().display(),
        mode = ?datapath.global_mode(),
        generation = datapath.generation(),
        "ready"
    );

    let mut printer = Printer {
        exporter,
        kernel_losses_seen: datapath.counters()?.ringbuf_reserve_failed,
        cgroups: CgroupPaths::new(config.cgroup2_mount.clone()),
        clock: WallClock::now(),
        node: config.node.clone(),
        seq: 0,
        flows,
        record_counters: config.metrics_listen.map(|_| RecordCounters {
            records: telemetry.flow_records.clone(),
            decisions: telemetry.reported_decisions.clone(),
            by_labels: Default::default(),
        }),
        messages: Messages::default(),
        names: NameCache::default(),
        learned: LearnedAddresses::new(config.fqdn_limits),
        ttl_bounds: datapath.learned_ttl_bounds(),
        fqdn_metrics: FqdnMetrics {
            learned_addresses: telemetry.learned_addresses.clone(),
            limit_evictions: telemetry.limit_evictions.clone(),
        },
        aggregator: aggregate.then(|| {
            Aggregator::new(
                config.allowed_report_interval.as_nanos() as u64,
                MAX_OPEN_AGGREGATES,
            )
        }),
        kernel_counts: KernelCounts {
            halves: datapath
                .take_allowed_counts()
                .expect("a fresh datapath has its counting halves"),
            flows: CountedFlows::default(),
            interval: aggregate.then_some(config.allowed_report_interval),
            last_switch: Instant::now(),
        },
        closed: Vec::new(),
    };
    let mut events = Vec::with_capacity(BATCH);
    printer.start_counting(
        &mut reader,
        &mut events,
        controller.enforcer(),
        &mut datapath,
    )?;
    telemetry.set_ready(true);
    let mut rescan = tokio::time::interval(CGROUP_RESCAN);
    let mut loss_check = tokio::time::interval(LOSS_CHECK);
    let mut learned_sweep = tokio::time::interval(LEARNED_SWEEP);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            // A server stops only at shutdown (then it is the usual way out,
            // whichever branch select! looks at first); stopping before is fatal.
            Some(stopped) = servers.join_next() => {
                if shutdown.is_cancelled() {
                    break;
                }
                let reason = match stopped {
                    Ok(Ok(())) => "stopped".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                return Err(RunError::ServerStopped(reason));
            }
            read = reader.read(&mut events, BATCH) => {
                read.map_err(RunError::Events)?;
                printer.print(&events, controller.enforcer(), &mut datapath);
                events.clear();
                // A busy ring buffer is always ready: without a yield, tokio's
                // budget would let this loop publish 128 batches (as many
                // records as a sink's queue holds) before a sink takes any.
                tokio::task::yield_now().await;
            }
            Some(command) = commands.recv() => {
                // A command may switch the rules: the events of the current
                // generation are named first, while its names are surely kept.
                printer.print_available(&mut reader, &mut events, controller.enforcer(), &mut datapath);
                let answered = controller.handle(command, &mut datapath);
                // The answer goes out (the API's task runs on this thread
                // too) before what can wait for it.
                tokio::task::yield_now().await;
                controller.tidy(answered, &mut datapath);
            }
            Some(update) = pod_updates.recv() => {
                // A burst (a relist, a rollout) is put in force once.
                let mut update = Some(update);
                let mut changed = false;
                while let Some(next) = update.take().or_else(|| pod_updates.try_recv().ok()) {
                    lists.saw(&next);
                    changed |= controller.enforcer_mut().update_pods(next);
                }
                if changed {
                    printer.print_available(&mut reader, &mut events, controller.enforcer(), &mut datapath);
                    refresh(&mut controller, &mut datapath);
                    save_pods(&pods_file, controller.enforcer().pods());
                }
                lists.report(&identities_listed);
            }
            changed = cgroups.changed() => {
                changed.map_err(RunError::Watch)?;
                printer.print_available(&mut reader, &mut events, controller.enforcer(), &mut datapath);
                refresh(&mut controller, &mut datapath);
            }
            _ = loss_check.tick() => {
                printer.tick(&mut reader, &mut events, controller.enforcer(), &mut datapath);
            }
            _ = learned_sweep.tick() => printer.sweep_learned(&mut datapath),
            _ = rescan.tick() => {
                cgroups.rewatch();
                printer.print_available(&mut reader, &mut events, controller.enforcer(), &mut datapath);
                refresh(&mut controller, &mut datapath);
            }
        }
    }
    drop(pod_updates_tx);
    telemetry.set_ready(false);
    controller.stop();
    // What the kernel reported before the stop still goes out.
    printer.print_available(
        &mut reader,
        &mut events,
        controller.enforcer(),
        &mut datapath,
    );
    printer.close_all_aggregates(
        &mut reader,
        &mut events,
        controller.enforcer(),
        &mut datapath,
    );
    if let Ok(counters) = datapath.counters() {
        printer.report_kernel_losses(counters.ringbuf_reserve_failed);
    }
    // Follow streams end with the hub, queued requests are answered
    // UNAVAILABLE with the queue; then open calls can finish.
    drop(printer);
    drop(commands);
    sink_tasks.drain(EXPORT_DRAIN).await;
    let drained = tokio::time::timeout(SERVER_DRAIN, async {
        while let Some(served) = servers.join_next().await {
            if let Ok(Err(e)) = served {
                warn!(error = %e, "control API");
            }
        }
    });
    if drained.await.is_err() {
        warn!("control API calls still open after {SERVER_DRAIN:?}; closing them");
        servers.abort_all();
    }
    if let Some(metrics) = metrics {
        match tokio::time::timeout(SERVER_DRAIN, metrics).await {
            Ok(Ok(Err(e))) => warn!(error = %e, "metrics"),
            Err(_) => warn!("metrics server did not stop in time"),
            _ => {}
        }
    }
    match datapath.counters() {
        Ok(counters) => info!(
            ?counters,
            undecodable = reader.undecodable(),
            "stopping; programs stay attached"
        ),
        Err(e) => warn!(error = %e, "stopping; cannot read counters"),
    }
    Ok(())
}

/// Whether pods and namespaces have been listed once and put in force:
/// until then a new pod on the node would be an unknown one.
#[derive(Default)]
struct IdentityLists {
    pods: bool,
    namespaces: bool,
}

impl IdentityLists {
    fn saw(&mut self, update: &IdentityUpdate) {
        match update {
            IdentityUpdate::Pods(_) => self.pods = true,
            IdentityUpdate::Namespaces(_) => self.namespaces = true,
            _ => {}
        }
    }

    fn report(&self, listed: &tokio::sync::watch::Sender<bool>) {
        if self.pods && self.namespaces {
            listed.send_if_modified(|known| !std::mem::replace(known, true));
        }
    }
}

/// Puts the policies in force for the endpoints there are now.
fn refresh(controller: &mut Controller, datapath: &mut Datapath) {
    let enforcer = controller.enforcer_mut();
    match enforcer.refresh(datapath) {
        Ok(Some(generation)) => {
            // Nobody waits for an answer here.
            datapath.remove_out_of_force();
            info!(
                endpoints = enforcer.endpoint_count(),
                generation, "endpoints changed"
            );
        }
        Ok(None) => {}
        // The previous rules stay in force; the next change or rescan retries.
        Err(e) => warn!(error = %e, "cannot put the changed endpoints in force"),
    }
}

/// The saved pod directory; empty (with a warning) if it cannot be read:
/// it is a cache that the first list refills.
fn load_pods(path: &Path) -> PodDirectory {
    let loaded = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| e.to_string()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return PodDirectory::default(),
        Err(e) => Err(e.to_string()),
    };
    match loaded {
        Ok(pods) => {
            let pods: PodDirectory = pods;
            info!(pods = pods.pod_count(), path = %path.display(), "pod metadata of the last run loaded");
            pods
        }
        Err(error) => {
            warn!(%error, path = %path.display(), "cannot read the saved pod metadata; waiting for the API server");
            PodDirectory::default()
        }
    }
}

fn save_pods(path: &Path, pods: &PodDirectory) {
    let json = serde_json::to_vec(pods).expect("pod metadata serializes");
    if let Err(error) = crate::state_file::write_atomic(path, &json) {
        warn!(%error, path = %path.display(), "cannot save pod metadata");
    }
}
