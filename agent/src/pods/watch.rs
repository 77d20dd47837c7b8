//! The Kubernetes side of pod identity: watches of the pods on this node and
//! of namespaces, turned into `IdentityUpdate`s.

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{Api, Client, runtime::watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::directory::{IdentityUpdate, NamespaceMeta, PodMeta};
use crate::kubernetes::translate;

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
