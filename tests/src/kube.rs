//! A stand-in for the Kubernetes API server: the list and watch protocol of
//! `/api/v1/pods` and `/api/v1/namespaces` with real-format JSON, bearer
//! token auth, resource versions, and on demand the two things a watch
//! must survive: a dropped connection and `410 Gone`.
//!
//! No API server binary can run here; this speaks what kube-rs's watcher
//! sends: `GET ?limit=..` lists, then `GET ?watch=true&resourceVersion=N`
//! streams of `{"type": ..., "object": ...}` lines.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    Router,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::UnboundedReceiverStream};

pub const TOKEN: &str = "tollgate-test-token";

#[derive(Default)]
struct Store {
    resource_version: u64,
    /// kind ("pods" | "namespaces") -> key -> object
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// Every change: (resource version, kind, type, object).
    history: Vec<(u64, &'static str, &'static str, Value)>,
    /// Watches from a resource version below this get `410 Gone`.
    compacted: u64,
    watches: Vec<Watch>,
    /// The query string of every request, for checks on what the client asked.
    requests: Vec<String>,
}

struct Watch {
    kind: &'static str,
    node: Option<String>,
    events: mpsc::UnboundedSender<Value>,
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeApiServer {
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(Mutex::new(Store::default()));
        let app = Router::new()
            .route("/api/v1/{kind}", get(list_or_watch))
            .with_state(store.clone());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move { axum::serve(listener, app).await });
        Self {
            addr,
            store,
            runtime: Some(runtime),
        }
    }

    /// A kubeconfig that points at this server with a bearer token.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: \"http://{}\"}}\n\
             users:\n- name: agent\n  user: {{token: {TOKEN}}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: agent}}\n\
             current-context: fake\n",
            self.addr
        )
    }

    /// Creates or replaces a pod or namespace (`object` from [`pod`] or [`namespace`]).
    pub fn put(&self, object: Value) {
        let mut store = self.store.lock().unwrap();
        let (kind, key) = kind_and_key(&object);
        let exists = store
            .objects
            .get(kind)
            .is_some_and(|objects| objects.contains_key(&key));
        store.change(kind, key, if exists { "MODIFIED" } else { "ADDED" }, object);
    }

    pub fn delete(&self, object: &Value) {
        let mut store = self.store.lock().unwrap();
        let (kind, key) = kind_and_key(object);
        let removed = store
            .objects
            .get_mut(kind)
            .and_then(|objects| objects.remove(&key))
            .expect("deleting an object that is not there");
        store.change(kind, key, "DELETED", removed);
    }

    /// Ends every open watch, as a restarted API server or a broken
    /// connection would.
    pub fn disconnect_watches(&self) {
        self.store.lock().unwrap().watches.clear();
    }

    /// Forgets the history: a watch resuming from any earlier resource
    /// version gets `410 Gone` and must list again.
    pub fn compact(&self) {
        let mut store = self.store.lock().unwrap();
        store.compacted = store.resource_version + 1;
        store.history.clear();
    }

    pub fn open_watches(&self) -> usize {
        let mut store = self.store.lock().unwrap();
        store.watches.retain(|w| !w.events.is_closed());
        store.watches.len()
    }

    pub fn requests(&self) -> Vec<String> {
        self.store.lock().unwrap().requests.clone()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.disconnect_watches();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Store {
    fn change(
        &mut self,
        kind: &'static str,
        key: String,
        kind_of_change: &'static str,
        mut object: Value,
    ) {
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        if kind_of_change != "DELETED" {
            self.objects
                .entry(kind)
                .or_default()
                .insert(key, object.clone());
        }
        let event = json!({"type": kind_of_change, "object": object});
        self.watches.retain(|w| {
            w.kind != kind
                || !on_node(&object, w.node.as_deref())
                || w.events.send(event.clone()).is_ok()
        });
        self.history
            .push((self.resource_version, kind, kind_of_change, object));
    }
}

fn kind_and_key(object: &Value) -> (&'static str, String) {
    let name = object["metadata"]["name"].as_str().unwrap();
    match object["kind"].as_str() {
        Some("Pod") => (
            "pods",
            format!(
                "{}/{name}",
                object["metadata"]["namespace"].as_str().unwrap()
            ),
        ),
        Some("Namespace") => ("namespaces", name.to_owned()),
        other => panic!("the fake API server has no kind {other:?}"),
    }
}

fn on_node(object: &Value, node: Option<&str>) -> bool {
    node.is_none_or(|node| object["spec"]["nodeName"] == node)
}

async fn list_or_watch(
    State(store): State<Arc<Mutex<Store>>>,
    Path(kind): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let kind: &'static str = match kind.as_str() {
        "pods" => "pods",
        "namespaces" => "namespaces",
        _ => return status(StatusCode::NOT_FOUND, "NotFound", "no such resource"),
    };
    let mut store = store.lock().unwrap();
    store.requests.push(format!(
        "{kind}?{}",
        query
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    ));
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {TOKEN}"))
    {
        return status(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized");
    }
    let node = match query.get("fieldSelector").map(String::as_str) {
        None | Some("") => None,
        Some(selector) => match selector.strip_prefix("spec.nodeName=") {
            Some(node) if kind == "pods" => Some(node.to_owned()),
            _ => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("field label not supported: {selector}"),
                );
            }
        },
    };
    if query.get("watch").map(String::as_str) != Some("true") {
        let items: Vec<Value> = store
            .objects
            .get(kind)
            .into_iter()
            .flat_map(|objects| objects.values())
            .filter(|o| on_node(o, node.as_deref()))
            .cloned()
            .collect();
        let list_kind = if kind == "pods" {
            "PodList"
        } else {
            "NamespaceList"
        };
        let body = json!({
            "kind": list_kind, "apiVersion": "v1",
            "metadata": {"resourceVersion": store.resource_version.to_string()},
            "items": items,
        });
        return (
            StatusCode::OK,
            [("content-type", "application/json")],
            body.to_string(),
        )
            .into_response();
    }

    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (events, receiver) = mpsc::unbounded_channel();
    if from < store.compacted {
        let gone = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", store.compacted),
            "reason": "Expired", "code": 410}});
        let _ = events.send(gone);
        drop(events);
    } else {
        for (_, _, kind_of_change, object) in store
            .history
            .iter()
            .filter(|(v, k, _, o)| *v > from && *k == kind && on_node(o, node.as_deref()))
        {
            let _ = events.send(json!({"type": kind_of_change, "object": object}));
        }
        store.watches.push(Watch { kind, node, events });
    }
    let lines = UnboundedReceiverStream::new(receiver)
        .map(|event| Ok::<_, Infallible>(format!("{event}\n")));
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        Body::from_stream(lines),
    )
        .into_response()
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16()});
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

pub fn namespace(name: &str, labels: &[(&str, &str)]) -> Value {
    let mut labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    // The API server sets this on every namespace.
    labels.insert("kubernetes.io/metadata.name".into(), json!(name));
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": format!("00000000-0000-4000-8000-{:012x}", name.len()), "labels": labels},
        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
}

/// A pod of a Deployment (through its ReplicaSet), as the API server shows
/// a running one.
pub struct PodSpec<'a> {
    pub namespace: &'a str,
    pub deployment: &'a str,
    pub uid: &'a str,
    pub labels: &'a [(&'a str, &'a str)],
    pub node: &'a str,
    /// (container name, runtime-scheme id, e.g. `containerd://<id>`)
    pub containers: &'a [(&'a str, &'a str)],
}

pub fn pod(spec: &PodSpec) -> Value {
    let hash = "5d8f7c6b9";
    let mut labels: serde_json::Map<String, Value> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    labels.insert("pod-template-hash".into(), json!(hash));
    // Five characters, like the ReplicaSet controller's suffix; unique per uid here.
    let name = format!("{}-{hash}-{}", spec.deployment, &spec.uid[3..8]);
    let containers: Vec<Value> = spec
        .containers
        .iter()
        .map(|(name, _)| json!({"name": name, "image": "registry.example/app:1", "imagePullPolicy": "IfNotPresent"}))
        .collect();
    let statuses: Vec<Value> = spec
        .containers
        .iter()
        .map(|(name, id)| json!({"name": name, "image": "registry.example/app:1",
            "imageID": "registry.example/app@sha256:0", "containerID": id, "ready": true,
            "restartCount": 0, "started": true, "state": {"running": {"startedAt": "2026-11-24T08:00:00Z"}}}))
        .collect();
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": spec.namespace, "uid": spec.uid, "labels": labels,
            "creationTimestamp": "2026-11-24T08:00:00Z",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": format!("{}-{hash}", spec.deployment), "uid": "11111111-2222-4333-8444-555555555555",
                "controller": true, "blockOwnerDeletion": true}]},
        "spec": {"nodeName": spec.node, "containers": containers, "restartPolicy": "Always"},
        "status": {"phase": "Running", "podIP": "10.244.0.7", "containerStatuses": statuses}})
}
