//! What one node has of the cluster's policies: the generation of each in
//! force, and why not where it is not. Every agent serves its report at
//! `GET /cluster-policies` on its metrics port; the status writer reads the
//! reports of all agents and writes one status per policy, so the API
//! server sees no write per node (docs/aks.md, "Status").

use std::sync::Arc;

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The path every agent serves its report at.
pub const PATH: &str = "/cluster-policies";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub node: String,
    /// Whether both kinds have been listed and the set put in force since
    /// the agent started: until then, the node enforces its saved set.
    pub synced: bool,
    pub policies: Vec<PolicyReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyReport {
    /// `EgressPolicy` or `ClusterEgressPolicy`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
    /// The newest generation the node has seen.
    pub observed_generation: i64,
    /// The generation in the node's kernel, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_force: Option<i64>,
    /// Why the newest version is not in force on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl NodeReport {
    pub fn policy(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<&PolicyReport> {
        self.policies
            .iter()
            .find(|p| p.kind == kind && p.namespace.as_deref() == namespace && p.name == name)
    }
}

/// The report's latest version, shared between the watch that makes it and
/// the HTTP server that serves it.
pub type Reports = watch::Receiver<Arc<NodeReport>>;

/// The answer to `GET /cluster-policies`: the latest report, or 404 where
/// cluster policies are not watched.
pub fn respond(reports: Option<&Reports>) -> Response {
    match reports {
        Some(reports) => axum::Json(NodeReport::clone(&reports.borrow())).into_response(),
        None => (StatusCode::NOT_FOUND, "cluster policies are not watched\n").into_response(),
    }
}
