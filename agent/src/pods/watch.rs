//! The Kubernetes side of pod identity: watches of the pods on this node and
//! of namespaces, turned into `IdentityUpdate`s. kube-runtime's watcher
//! relists after `410 Gone` and reconnects (with backoff) after a
//! disconnect; this module only translates its events.

use std::path::PathBuf;

use futures_util::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::directory::{IdentityUpdate, NamespaceMeta, PodMeta};

/// Where the API server is, and how to authenticate to it.
#[derive(Clone, Debug)]
pub enum ApiSource {
    /// The pod's service account (KUBERNETES_SERVICE_HOST and the mounted token).
    InCluster,
    Kubeconfig(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("in-cluster Kubernetes configuration: {0}")]
    InCluster(#[from] kube::config::InClusterError),
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: PathBuf, message: String },
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Reads the credentials; contacts nothing, so a missing API server does
/// not stop the agent from starting.
pub async fn client(source: &ApiSource) -> Result<Client, WatchError> {
    let config = match source {
        ApiSource::InCluster => kube::Config::incluster()?,
        ApiSource::Kubeconfig(path) => {
            let kubeconfig_err = |message: String| WatchError::Kubeconfig {
                path: path.clone(),
                message,
            };
            let kubeconfig =
                Kubeconfig::read_from(path).map_err(|e| kubeconfig_err(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|e| kubeconfig_err(e.to_string()))?
        }
    };
    Ok(Client::try_from(config)?)
}

/// Sends every change to the pods of `node` and to namespaces until
/// `shutdown`, or until the receiver is gone.
pub async fn watch(
    client: Client,
    node: String,
    record_label_keys: Vec<String>,
    updates: mpsc::Sender<IdentityUpdate>,
    shutdown: CancellationToken,
) {
    let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let pods = translate(
        watcher(Api::<Pod>::all(client.clone()), on_node),
        "pods",
        move |pod| PodMeta::from_pod(&pod, &record_label_keys),
        IdentityUpdate::Pods,
        IdentityUpdate::PodApplied,
        |pod| IdentityUpdate::PodDeleted { uid: pod.uid },
    );
    let namespaces = translate(
        watcher(Api::<Namespace>::all(client), watcher::Config::default()),
        "namespaces",
        |namespace| NamespaceMeta::from_namespace(&namespace),
        IdentityUpdate::Namespaces,
        IdentityUpdate::NamespaceApplied,
        |namespace| IdentityUpdate::NamespaceDeleted {
            name: namespace.name,
        },
    );
    let mut both = std::pin::pin!(futures_util::stream::select(pods, namespaces));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            update = both.next() => {
                let Some(update) = update else { return };
                if updates.send(update).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One watcher's events as updates: a list (`Init` .. `InitDone`) becomes
/// one complete update, so nothing is judged on half a list.
fn translate<K, M>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    kind: &'static str,
    convert: impl Fn(K) -> Option<M> + Send + 'static,
    listed: fn(Vec<M>) -> IdentityUpdate,
    applied: fn(M) -> IdentityUpdate,
    deleted: fn(M) -> IdentityUpdate,
) -> impl Stream<Item = IdentityUpdate> + Send
where
    K: Send + 'static,
    M: Send + 'static,
{
    let mut listing: Option<Vec<M>> = None;
    events.default_backoff().filter_map(move |event| {
        let update = match event {
            Ok(watcher::Event::Init) => {
                listing = Some(Vec::new());
                None
            }
            Ok(watcher::Event::InitApply(object)) => {
                if let (Some(list), Some(meta)) = (listing.as_mut(), convert(object)) {
                    list.push(meta);
                }
                None
            }
            Ok(watcher::Event::InitDone) => listing.take().map(|list| {
                info!(kind, objects = list.len(), "listed");
                listed(list)
            }),
            Ok(watcher::Event::Apply(object)) => convert(object).map(applied),
            Ok(watcher::Event::Delete(object)) => convert(object).map(deleted),
            Err(e) => {
                warn!(kind, error = %e, "watch interrupted; resuming");
                None
            }
        };
        std::future::ready(update)
    })
}
