//! The node taint that keeps workloads off a new node until its agent
//! enforces the cluster's policies. The node pool is created with it; the
//! agent removes it once, when the policies are in force, and never adds it.

use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// `NoSchedule`, set on the node pool (`az aks nodepool add --node-taints`).
pub const NOT_READY_TAINT: &str = "tollgate.dev/agent-not-ready";

/// Between attempts while the API server refuses or is away.
const RETRY: Duration = Duration::from_secs(2);

/// Removes the taint from `node`, retrying until it is gone or `shutdown`.
pub async fn remove_until_done(client: Client, node: String, shutdown: CancellationToken) {
    let nodes: Api<Node> = Api::all(client);
    loop {
        match remove(&nodes, &node).await {
            Ok(true) => {
                info!(%node, taint = NOT_READY_TAINT, "removed the node's taint");
                return;
            }
            Ok(false) => return,
            Err(e) => {
                warn!(%node, error = %e, "cannot remove the taint {NOT_READY_TAINT}; retrying")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// Removes the taint if the node has it. The patch tests that the taint is
/// still where it was read, so a concurrent change of the node's taints is
/// never overwritten (the API server refuses it, and the next try reads
/// again). Returns whether there was a taint to remove.
async fn remove(nodes: &Api<Node>, node: &str) -> Result<bool, kube::Error> {
    let current = nodes.get(node).await?;
    let taints = current
        .spec
        .and_then(|spec| spec.taints)
        .unwrap_or_default();
    let Some(index) = taints.iter().position(|t| t.key == NOT_READY_TAINT) else {
        return Ok(false);
    };
    let path = format!("/spec/taints/{index}");
    let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
        {"op": "test", "path": format!("{path}/key"), "value": NOT_READY_TAINT},
        {"op": "remove", "path": path},
    ]))
    .expect("a well-formed JSON patch");
    nodes
        .patch(node, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await?;
    Ok(true)
}
