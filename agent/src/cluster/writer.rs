//! The status writer (`tollgate-agent status-writer`, a Deployment of its
//! own): while it holds the lease, it reads every agent's report and writes
//! one status per policy, only when it changed. The agents write nothing.
//! API writes per policy change are one per policy, whatever the number of
//! nodes; the reads of the reports go to the agents, not the API server.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream};
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::watcher,
};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tollgate_policy::model::PolicyKey;
use tracing::{debug, info, warn};

use super::{
    desired::{ClusterPolicies, Resource},
    lease::Lease,
    report::{self, NodeReport},
    resources::{ClusterScoped, Namespaced, PolicyKind, PolicyResource, PolicyStatus},
    status::{NodeOutcome, policy_status},
    watch::{Change, changes, take},
};
use crate::kubernetes::translate;

/// The lease's name, in the agents' namespace.
pub const LEASE: &str = "tollgate-policy-status";
/// How long a holder that stopped renewing keeps the lease.
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW: Duration = Duration::from_secs(5);
/// How often the reports are read when nothing changed (new nodes, agents
/// that came back), and while a rollout is still going on.
const REREAD: Duration = Duration::from_secs(10);
const REREAD_ROLLING_OUT: Duration = Duration::from_secs(1);
/// Reports read at once, and how long one may take.
const CONCURRENT_READS: usize = 64;
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The agents' pods, as deploy/daemonset.yaml labels them, and the name of
/// their port that serves metrics and the node's report.
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=tollgate-agent";
pub const REPORT_PORT: &str = "metrics";

pub struct StatusWriter {
    pub client: Client,
    /// Its name as the lease holder (its pod's).
    pub identity: String,
    /// The agents' namespace and the label selector of their pods.
    pub namespace: String,
    pub agent_selector: String,
    /// The name of the agents' container port that serves the report.
    pub report_port: String,
}

/// An agent pod: its node, and where its report is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agent {
    pub node: String,
    pub address: Option<SocketAddr>,
}

impl StatusWriter {
    /// Competes for the lease until `shutdown`; writes statuses while it
    /// holds it.
    pub async fn run(self, shutdown: CancellationToken) {
        let lease = Lease::new(
            self.client.clone(),
            &self.namespace,
            LEASE,
            &self.identity,
            LEASE_DURATION,
        );
        loop {
            match lease.acquire_or_renew().await {
                Ok(true) => {
                    info!(
                        lease = LEASE,
                        "writing the status of the cluster's policies"
                    );
                    self.hold(&lease, &shutdown).await;
                    info!(lease = LEASE, "no longer writing policy status");
                }
                Ok(false) => {}
                Err(e) => debug!(error = %e, "status lease"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RENEW) => {}
            }
        }
    }

    /// Writes statuses until the lease is lost or `shutdown`.
    async fn hold(&self, lease: &Lease, shutdown: &CancellationToken) {
        let mut changes = std::pin::pin!(stream::select(
            changes::<Namespaced>(Api::all(self.client.clone())),
            changes::<ClusterScoped>(Api::all(self.client.clone())),
        ));
        let mut agents = std::pin::pin!(agent_changes(
            Api::namespaced(self.client.clone(), &self.namespace),
            &self.agent_selector,
            self.report_port.clone(),
        ));
        let http = reqwest::Client::builder()
            .timeout(READ_TIMEOUT)
            .build()
            .expect("an HTTP client without TLS settings");
        let mut state = WriterState::default();
        let mut renewed = Instant::now();
        let mut renew = tokio::time::interval(RENEW);
        renew.tick().await;
        let mut reread = tokio::time::interval(REREAD_ROLLING_OUT);
        let mut since_read = Duration::ZERO;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = renew.tick() => {
                    if !renew_lease(lease, &mut renewed).await {
                        return;
                    }
                }
                Some(change) = changes.next() => {
                    state.take(change);
                    state.dirty = true;
                }
                Some(change) = agents.next() => {
                    state.take_agents(change);
                    state.dirty = true;
                }
                _ = reread.tick() => {
                    since_read += REREAD_ROLLING_OUT;
                    // Nothing is judged on half a picture: both kinds and
                    // the agent pods listed first (else every policy would
                    // read "no agents" at each takeover).
                    if state.listed.len() < 3
                        || !(state.dirty || state.rolling_out || since_read >= REREAD)
                    {
                        continue;
                    }
                    since_read = Duration::ZERO;
                    state.dirty = false;
                    let nodes = read_reports(&http, &state.agents).await;
                    match self.write(&mut state, &nodes, lease, &mut renewed).await {
                        Some(rolling_out) => state.rolling_out = rolling_out,
                        None => return,
                    }
                }
            }
        }
    }

    /// Writes each status that changed; returns whether a rollout is still
    /// going on, or None when the lease was lost (a read of many reports
    /// may outlast a renewal: it is renewed before a write when due).
    async fn write(
        &self,
        state: &mut WriterState,
        nodes: &[NodeOutcome],
        lease: &Lease,
        renewed: &mut Instant,
    ) -> Option<bool> {
        let now = Timestamp::now().to_string();
        let mut rolling_out = false;
        for ((kind, key), resource) in &mut state.resources {
            let acceptance = state
                .policies
                .acceptance(key, &resource.uid, resource.generation);
            let status = policy_status(
                kind,
                key.namespace.as_deref(),
                &key.name,
                &acceptance,
                nodes,
                resource.status.as_ref(),
                &now,
            );
            // Failures and refusals are not a rollout: read at the slow pace.
            rolling_out |= status
                .conditions
                .iter()
                .any(|c| c.type_ == "Enforced" && c.reason == "RollingOut");
            if resource.status.as_ref() == Some(&status) {
                continue;
            }
            if renewed.elapsed() >= RENEW && !renew_lease(lease, renewed).await {
                return None;
            }
            match patch_status(&self.client, kind, key, &status).await {
                Ok(()) => resource.status = Some(status),
                Err(e) => warn!(policy = %key, error = %e, "cannot write the policy's status"),
            }
        }
        Some(rolling_out)
    }
}

/// Renews the lease; whether it is still held.
async fn renew_lease(lease: &Lease, renewed: &mut Instant) -> bool {
    match lease.acquire_or_renew().await {
        Ok(true) => {
            *renewed = Instant::now();
            true
        }
        Ok(false) => false,
        Err(e) => {
            warn!(error = %e, "cannot renew the status lease; stopping status writes");
            false
        }
    }
}

#[derive(Default)]
struct WriterState {
    policies: ClusterPolicies,
    /// By kind and key, with the status they carry (as written).
    resources: BTreeMap<(&'static str, PolicyKey), Resource>,
    /// By pod name.
    agents: BTreeMap<String, Agent>,
    /// The kinds listed so far, and "agent pods".
    listed: BTreeSet<&'static str>,
    dirty: bool,
    rolling_out: bool,
}

impl WriterState {
    fn take(&mut self, change: Change) {
        match &change {
            Change::Listed(kind, listed) => {
                self.resources.retain(|(k, _), _| k != kind);
                for resource in listed {
                    self.resources
                        .insert((kind, resource.key.clone()), resource.clone());
                }
            }
            Change::Applied(resource) => {
                self.resources
                    .insert((resource.kind, resource.key.clone()), resource.clone());
            }
            Change::Deleted(kind, key) => {
                self.resources.remove(&(*kind, key.clone()));
            }
        }
        // The same bookkeeping as the agents' watch: it notes the kinds listed.
        take(&mut self.policies, &mut self.listed, change);
    }

    fn take_agents(&mut self, change: AgentChange) {
        match change {
            AgentChange::Listed(agents) => {
                self.listed.insert("agent pods");
                self.agents = agents.into_iter().collect();
            }
            AgentChange::Applied((pod, agent)) => {
                self.agents.insert(pod, agent);
            }
            AgentChange::Deleted((pod, _)) => {
                self.agents.remove(&pod);
            }
        }
    }
}

enum AgentChange {
    Listed(Vec<(String, Agent)>),
    Applied((String, Agent)),
    Deleted((String, Agent)),
}

fn agent_changes(
    pods: Api<Pod>,
    selector: &str,
    port_name: String,
) -> impl futures_util::Stream<Item = AgentChange> + Send {
    translate(
        watcher(pods, watcher::Config::default().labels(selector)),
        "agent pods",
        move |pod: Pod| agent_of(&pod, &port_name),
        AgentChange::Listed,
        AgentChange::Applied,
        AgentChange::Deleted,
    )
}

/// An agent pod's node and report address (none until it runs with an
/// IP). A pod that has ended is no agent: its IP may be another pod's now.
fn agent_of(pod: &Pod, port_name: &str) -> Option<(String, Agent)> {
    let name = pod.metadata.name.clone()?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let running = phase == Some("Running");
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    let port = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(port_name))
        .and_then(|p| u16::try_from(p.container_port).ok());
    let ip: Option<IpAddr> = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .and_then(|ip| ip.parse().ok());
    let address = ip
        .zip(port)
        .filter(|_| running)
        .map(|(ip, port)| SocketAddr::new(ip, port));
    Some((name, Agent { node, address }))
}

/// Every agent's report, read `CONCURRENT_READS` at a time.
pub async fn read_reports(
    http: &reqwest::Client,
    agents: &BTreeMap<String, Agent>,
) -> Vec<NodeOutcome> {
    stream::iter(agents.values().cloned())
        .map(|agent| async move {
            let Some(address) = agent.address else {
                return NodeOutcome::Unreachable {
                    node: agent.node,
                    why: "the agent pod has no address yet".into(),
                };
            };
            let url = format!("http://{address}{}", report::PATH);
            let read = async {
                http.get(&url)
                    .send()
                    .await?
                    .error_for_status()?
                    .json::<NodeReport>()
                    .await
            };
            match read.await {
                // The pod's node is the one that counts, not what the
                // answer claims.
                Ok(report) if report.node == agent.node => NodeOutcome::Report(report),
                Ok(report) => NodeOutcome::Unreachable {
                    why: format!("{address} answered as node {:?}", report.node),
                    node: agent.node,
                },
                Err(e) => NodeOutcome::Unreachable {
                    node: agent.node,
                    why: e.to_string(),
                },
            }
        })
        .buffer_unordered(CONCURRENT_READS)
        .collect()
        .await
}

async fn patch_status(
    client: &Client,
    kind: &str,
    key: &PolicyKey,
    status: &PolicyStatus,
) -> Result<(), kube::Error> {
    let patch = Patch::Merge(json!({ "status": status }));
    let params = PatchParams::default();
    if kind == ClusterScoped::KIND {
        let api: Api<PolicyResource<ClusterScoped>> = Api::all(client.clone());
        api.patch_status(&key.name, &params, &patch).await?;
    } else {
        let namespace = key.namespace.as_deref().unwrap_or_default();
        let api: Api<PolicyResource<Namespaced>> = Api::namespaced(client.clone(), namespace);
        api.patch_status(&key.name, &params, &patch).await?;
    }
    Ok(())
}
