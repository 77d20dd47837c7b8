//! Cluster policies at scale: simulated nodes, each with the agent's real
//! policy watch (`ClusterWatch`) and node report, its controller replaced by
//! the pure policy store (no kernel), against the stand-in API server; one
//! real status writer. Measured: from a resource write to the moment every
//! node has it in force, the time until the status counts them all, and
//! the API requests one change costs, at two cluster sizes.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tollgate_agent::{
    cluster::{
        report,
        watch::ClusterWatch,
        writer::{AGENT_SELECTOR, REPORT_PORT, StatusWriter},
    },
    control::{
        controller::{ClusterApplied, Command, ControlError},
        store::PolicyStore,
    },
    kubernetes::{self, ApiSource},
};
use tollgate_tests::{
    TempFile,
    kube::{FakeApiServer, agent_pod, egress_policy},
};

use crate::{
    Plan,
    report::{ClusterFigures, ClusterRun, Report},
};

const POLICY: &str = "bench-cluster";

pub fn measure(plan: &Plan, report: &mut Report) {
    let runs = plan
        .cluster_nodes
        .iter()
        .map(|&nodes| measure_at(nodes, plan.cluster_changes))
        .collect();
    report.cluster(ClusterFigures { runs });
}

pub fn measure_at(nodes: usize, changes: usize) -> ClusterRun {
    let api = FakeApiServer::start();
    let kubeconfig = TempFile::new("bench-cluster.kubeconfig", &api.kubeconfig());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shutdown = CancellationToken::new();
    let run = runtime.block_on(async {
        let client = kubernetes::client(&ApiSource::Kubeconfig(kubeconfig.path.clone()))
            .await
            .expect("a client of the test server");
        let mut in_force = Vec::new();
        let mut reports = Vec::new();
        for i in 0..nodes {
            let node = format!("node-{i:04}");
            let (generation, receiver) = watch::channel(0);
            in_force.push(receiver);
            let (port, report) = start_node(&client, &node, generation, &shutdown).await;
            reports.push(report);
            api.put(agent_pod(&node, port));
        }
        let writer = StatusWriter {
            client: client.clone(),
            identity: "status-writer-0".into(),
            namespace: "tollgate-system".into(),
            agent_selector: AGENT_SELECTOR.into(),
            report_port: REPORT_PORT.into(),
        };
        tokio::spawn(writer.run(shutdown.clone()));
        // The start (every node's lists and watches) is not a change's cost.
        for report in &mut reports {
            report
                .wait_for(|report| report.synced)
                .await
                .expect("the node runs");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;

        let mut latencies = Vec::new();
        let mut to_status = Vec::new();
        let mut requests: BTreeMap<(String, String), u64> = BTreeMap::new();
        for change in 1..=changes as i64 {
            // Each change waits for the last one's status, so its requests
            // are its own.
            api.reset_request_counts();
            let written = Instant::now();
            api.put(egress_policy(None, POLICY, spec(change)));
            for receiver in &mut in_force {
                receiver
                    .wait_for(|generation| *generation >= change)
                    .await
                    .expect("the node runs");
                latencies.push(written.elapsed());
            }
            wait_for_status(&api, nodes, change).await;
            to_status.push(written.elapsed());
            for (key, count) in api.request_counts() {
                *requests.entry(key).or_default() += count;
            }
        }
        latencies.sort();
        to_status.sort();
        let per_change = |verbs: &[&str], plural: &str| {
            requests
                .iter()
                .filter(|((verb, resource), _)| {
                    verbs.contains(&verb.as_str()) && resource == plural
                })
                .map(|(_, count)| *count)
                .sum::<u64>() as f64
                / changes as f64
        };
        ClusterRun {
            nodes,
            changes,
            in_force_p50: percentile(&latencies, 50),
            in_force_p99: percentile(&latencies, 99),
            in_force_max: *latencies.last().unwrap(),
            status_p50: percentile(&to_status, 50),
            status_max: *to_status.last().unwrap(),
            policy_writes_per_change: per_change(
                &["create", "update", "patch"],
                "clusteregresspolicies",
            ),
            lease_writes_per_change: per_change(&["create", "update"], "leases"),
            other_writes_per_change: requests
                .iter()
                .filter(|((verb, resource), _)| {
                    ["create", "update", "patch", "delete"].contains(&verb.as_str())
                        && !["clusteregresspolicies", "leases"].contains(&resource.as_str())
                })
                .map(|(_, count)| *count)
                .sum::<u64>() as f64
                / changes as f64,
            requests_per_change: requests.values().sum::<u64>() as f64 / changes as f64,
        }
    });
    shutdown.cancel();
    runtime.shutdown_timeout(Duration::from_secs(2));
    run
}

/// A deny-all for host cgroups, made new by `generation` (its rules change
/// with it).
fn spec(generation: i64) -> serde_json::Value {
    json!({
        "cgroupSelector": {"paths": ["/bench-cluster/**"]},
        "mode": "enforce",
        "egress": [{"name": format!("change-{generation}"), "to": [{"cidr": format!("10.{generation}.0.0/16")}]}],
    })
}

/// One simulated node: the real policy watch, a controller that puts sets
/// "in force" in the pure store, and the node's report served over HTTP.
/// Returns the report's port, and the report.
async fn start_node(
    client: &kube::Client,
    node: &str,
    generation: watch::Sender<i64>,
    shutdown: &CancellationToken,
) -> (u16, report::Reports) {
    let (commands, queue) = mpsc::channel(8);
    tokio::spawn(controller(queue, generation));
    let (report, reports) = watch::channel(Arc::default());
    let cluster = ClusterWatch {
        client: client.clone(),
        node: node.into(),
        commands,
        in_force: Vec::new(),
        remove_taint: false,
        identities_known: watch::channel(true).1,
        report,
    };
    tokio::spawn(cluster.run(shutdown.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = reports.clone();
    let app = axum::Router::new().route(
        report::PATH,
        axum::routing::get(move || {
            let reports = served.clone();
            async move { report::respond(Some(&reports)) }
        }),
    );
    let stop = shutdown.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    (port, reports)
}

/// The agent's controller without a kernel: plans and commits in the
/// policy store, as the agent does before and after the kernel switch.
async fn controller(mut queue: mpsc::Receiver<Command>, in_force: watch::Sender<i64>) {
    let mut store = PolicyStore::default();
    while let Some(command) = queue.recv().await {
        let Command::Cluster(desired, reply) = command else {
            continue;
        };
        let applied = store.plan_cluster(desired).map(|(plan, conflicts)| {
            let changes = plan.changes.clone();
            store.commit(plan);
            ClusterApplied {
                generation: store.generation(),
                changes,
                conflicts,
            }
        });
        let generation = store
            .cluster_origins()
            .find(|(key, _)| key.name == POLICY)
            .map_or(0, |(_, origin)| origin.generation);
        in_force.send_replace(generation);
        let _ = reply.send(applied.map_err(ControlError::from));
    }
}

async fn wait_for_status(api: &FakeApiServer, nodes: usize, generation: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = api
            .get("clusteregresspolicies", POLICY)
            .map(|o| o["status"].clone())
            .unwrap_or_default();
        if status["observedGeneration"] == generation && status["nodes"]["enforced"] == nodes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the status never counted {nodes} nodes at generation {generation}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}
