//! Every agent watches both policy kinds and puts the cluster's set in force
//! through the controller, the one writer of the kernel maps: the same
//! validation, compile and atomic switch as a local apply. Once both kinds
//! are listed and in force, the node's taint goes.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use futures_util::{FutureExt, StreamExt};
use kube::{Api, Client, runtime::watcher};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tollgate_policy::model::PolicyKey;
use tracing::{error, info, warn};

use super::{
    desired::{ClusterPolicies, Resource, key_of},
    report::NodeReport,
    resources::{ClusterScoped, Namespaced, PolicyKind, PolicyResource},
    taint,
};
use crate::{
    control::{
        controller::Command,
        store::{ClusterDocument, Conflict},
    },
    kubernetes::translate,
};

/// A change to one kind of policy resource.
#[derive(Debug)]
pub(super) enum Change {
    Listed(&'static str, Vec<Resource>),
    Applied(Resource),
    Deleted(&'static str, PolicyKey),
}

pub struct ClusterWatch {
    pub client: Client,
    pub node: String,
    /// The controller's queue.
    pub commands: mpsc::Sender<Command>,
    /// The cluster policies the node had in force at start (its saved set).
    pub in_force: Vec<ClusterDocument>,
    /// Whether to remove the node's not-ready taint once in force.
    pub remove_taint: bool,
    /// Becomes true once the node's pods and namespaces are listed and in
    /// force: the taint stays until then too, or a pod scheduled at once
    /// would be an unknown one.
    pub identities_known: watch::Receiver<bool>,
    /// Where the node's report goes (served at /cluster-policies).
    pub report: watch::Sender<Arc<NodeReport>>,
}

/// What the kernel has of the cluster's policies, and why not the newest
/// where it does not.
#[derive(Default)]
struct NodeState {
    /// The cluster's policies in the kernel, as last put in force.
    documents: Vec<ClusterDocument>,
    in_force: BTreeMap<PolicyKey, i64>,
    errors: BTreeMap<PolicyKey, String>,
    /// Cluster policies that local ones of the same name keep out.
    conflicts: usize,
}

impl NodeState {
    fn in_force(&mut self, documents: Vec<ClusterDocument>, conflicts: Vec<Conflict>) {
        self.in_force = generations(&documents);
        self.documents = documents;
        self.conflicts = conflicts.len();
        for conflict in conflicts {
            self.in_force.remove(&conflict.policy);
            self.errors.insert(
                conflict.policy,
                "a local policy of the same name is in force on this node".into(),
            );
        }
    }
}

/// After a set could not be put in force, how long until the next try.
const RETRY: Duration = Duration::from_secs(10);

impl ClusterWatch {
    /// Runs until `shutdown`, or until the controller is gone.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut changes = std::pin::pin!(futures_util::stream::select(
            changes::<Namespaced>(Api::all(self.client.clone())),
            changes::<ClusterScoped>(Api::all(self.client.clone())),
        ));
        let restored = std::mem::take(&mut self.in_force);
        let mut node = NodeState {
            in_force: generations(&restored),
            documents: restored.clone(),
            errors: BTreeMap::new(),
            conflicts: 0,
        };
        let mut policies = ClusterPolicies::restored(restored);
        let mut listed = BTreeSet::new();
        let mut logged = BTreeSet::new();
        let mut taint_pending = self.remove_taint;
        let mut synced = false;
        let mut failing = false;
        let mut retry = tokio::time::interval(RETRY);
        self.publish(&policies, synced, &node);
        loop {
            let changed = tokio::select! {
                () = shutdown.cancelled() => return,
                _ = retry.tick(), if failing => true,
                change = changes.next() => {
                    let Some(change) = change else { return };
                    // A burst (a relist, a kubectl apply of many) is put in
                    // force once.
                    let mut changed = take(&mut policies, &mut listed, change);
                    while let Some(Some(change)) = changes.next().now_or_never() {
                        changed |= take(&mut policies, &mut listed, change);
                    }
                    changed
                }
            };
            log_rejections(&policies, &mut logged);
            let all_listed = listed.len() == 2;
            if !changed && (synced || !all_listed) {
                self.publish(&policies, synced, &node);
                continue;
            }
            let Some(complete) = self.put_in_force(policies.desired(), &mut node).await else {
                return;
            };
            // Tried again until all is in force: a local policy that keeps a
            // cluster one out may be deleted at any time (tollgatectl).
            let was_failing = failing;
            failing = !complete || node.conflicts > 0;
            if failing && !was_failing {
                retry.reset();
            }
            synced |= complete && all_listed;
            self.publish(&policies, synced, &node);
            if complete && all_listed && taint_pending {
                taint_pending = false;
                let (client, node, shutdown) =
                    (self.client.clone(), self.node.clone(), shutdown.clone());
                let mut identities_known = self.identities_known.clone();
                tokio::spawn(async move {
                    let known = tokio::select! {
                        () = shutdown.cancelled() => false,
                        known = identities_known.wait_for(|known| *known) => known.is_ok(),
                    };
                    if known {
                        taint::remove_until_done(client, node, shutdown).await;
                    }
                });
            }
        }
    }

    /// Puts `desired` in force. If the whole set cannot be (a policy that
    /// validates but does not compile with the others, a full map), the
    /// policies in force stay, and each changed one is added on its own:
    /// one policy that cannot be put in force holds no other back, and
    /// keeps its version in force. Returns whether all of `desired` is in
    /// force, or None when the controller is gone (the agent stops).
    async fn put_in_force(
        &self,
        desired: Vec<ClusterDocument>,
        node: &mut NodeState,
    ) -> Option<bool> {
        node.errors.clear();
        match put_in_force(&self.commands, desired.clone()).await? {
            Ok(conflicts) => {
                node.in_force(desired, conflicts);
                return Some(true);
            }
            Err(why) => warn!(error = %why, "putting the cluster's policies in force one by one"),
        }
        let wanted: BTreeSet<PolicyKey> = desired.iter().map(key_of).collect();
        let mut set: Vec<ClusterDocument> = node
            .documents
            .iter()
            .filter(|d| wanted.contains(&key_of(d)))
            .cloned()
            .collect();
        let changed: Vec<ClusterDocument> = desired
            .into_iter()
            .filter(|d| !node.documents.contains(d))
            .collect();
        let mut conflicts = match put_in_force(&self.commands, set.clone()).await? {
            Ok(conflicts) => conflicts,
            Err(why) => {
                // Not even what is in force, less the deleted: keep all.
                for document in &changed {
                    node.errors.insert(key_of(document), why.clone());
                }
                return Some(false);
            }
        };
        let mut complete = true;
        for document in changed {
            let key = key_of(&document);
            let mut trial: Vec<ClusterDocument> =
                set.iter().filter(|d| key_of(d) != key).cloned().collect();
            trial.push(document);
            match put_in_force(&self.commands, trial.clone()).await? {
                Ok(now) => {
                    set = trial;
                    conflicts = now;
                }
                Err(why) => {
                    complete = false;
                    node.errors.insert(key, why);
                }
            }
        }
        let errors = std::mem::take(&mut node.errors);
        node.in_force(set, conflicts);
        node.errors.extend(errors);
        Some(complete)
    }
}

impl ClusterWatch {
    fn publish(&self, policies: &ClusterPolicies, synced: bool, node: &NodeState) {
        let report = policies.report(&self.node, synced, &node.in_force, &node.errors);
        self.report.send_if_modified(|current| {
            let changed = **current != report;
            if changed {
                *current = Arc::new(report);
            }
            changed
        });
    }
}

fn generations(documents: &[ClusterDocument]) -> BTreeMap<PolicyKey, i64> {
    documents
        .iter()
        .map(|d| (key_of(d), d.origin.generation))
        .collect()
}

/// One kind's watch events as changes.
pub(super) fn changes<K: PolicyKind>(
    api: Api<PolicyResource<K>>,
) -> impl futures_util::Stream<Item = Change> + Send
where
    PolicyResource<K>: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    translate(
        watcher(api, watcher::Config::default()),
        K::PLURAL,
        |resource: PolicyResource<K>| Some(Resource::from(resource)),
        |resources| Change::Listed(K::KIND, resources),
        Change::Applied,
        |resource| Change::Deleted(K::KIND, resource.key),
    )
}

/// Takes one change; returns whether what the node should enforce changed.
pub(super) fn take(
    policies: &mut ClusterPolicies,
    listed: &mut BTreeSet<&'static str>,
    change: Change,
) -> bool {
    match change {
        Change::Listed(kind, resources) => {
            listed.insert(kind);
            policies.relist(kind, resources)
        }
        Change::Applied(resource) => policies.apply(resource),
        Change::Deleted(kind, key) => policies.delete(kind, &key),
    }
}

/// Sends the set to the controller and waits until it is in force. Returns
/// the conflicts, or why it could not be put in force, or None when the
/// controller is gone (the agent stops).
async fn put_in_force(
    commands: &mpsc::Sender<Command>,
    desired: Vec<ClusterDocument>,
) -> Option<Result<Vec<Conflict>, String>> {
    let (reply, answer) = oneshot::channel();
    commands.send(Command::Cluster(desired, reply)).await.ok()?;
    match answer.await.ok()? {
        Ok(applied) => {
            for conflict in &applied.conflicts {
                warn!(
                    policy = %conflict.policy,
                    kind = conflict.origin.kind,
                    uid = conflict.origin.uid,
                    "a local policy of this name is in force; the cluster's is not put in force on this node until the local one is deleted (tollgatectl delete)"
                );
            }
            let changed: Vec<String> = applied
                .changes
                .iter()
                .filter(|c| c.change != "unchanged")
                .map(|c| format!("{} {}", c.policy, c.change))
                .collect();
            if !changed.is_empty() {
                info!(generation = applied.generation, changes = ?changed, "cluster policies in force");
            }
            Some(Ok(applied.conflicts))
        }
        Err(e) => {
            error!(error = %e, "cannot put the cluster policies in force; the previous set stays");
            Some(Err(e.to_string()))
        }
    }
}

/// Logs each refused version once.
fn log_rejections(policies: &ClusterPolicies, logged: &mut BTreeSet<(PolicyKey, i64)>) {
    for (key, rejection, kept) in policies.rejections() {
        if logged.insert((key.clone(), rejection.generation)) {
            warn!(
                policy = %key,
                generation = rejection.generation,
                in_force = ?kept,
                "refused an invalid version of a cluster policy; the last valid one stays in force:\n{}",
                rejection.message()
            );
        }
    }
}
