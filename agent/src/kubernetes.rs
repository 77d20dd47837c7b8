//! What every watch of the Kubernetes API shares: where the API server is,
//! the client, and the translation of kube-runtime's watcher events into
//! the agent's updates. The watcher relists after `410 Gone` and reconnects
//! (with backoff) after a disconnect; the callers only translate events.

use std::path::PathBuf;

use futures_util::{Stream, StreamExt};
use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt, watcher},
};
use tracing::{info, warn};

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

/// One watcher's events as updates: a list (`Init` .. `InitDone`) becomes
/// one complete update, so nothing is judged on half a list.
pub fn translate<K, M, U>(
    events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    kind: &'static str,
    convert: impl Fn(K) -> Option<M> + Send + 'static,
    listed: fn(Vec<M>) -> U,
    applied: fn(M) -> U,
    deleted: fn(M) -> U,
) -> impl Stream<Item = U> + Send
where
    K: Send + 'static,
    M: Send + 'static,
    U: Send + 'static,
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
