//! A stand-in for the Kubernetes API server: list, watch, get, create,
//! update, patch and delete of pods, namespaces, nodes, leases and the two
//! Tollgate policy custom resources, with real-format JSON, bearer token
//! auth, resource versions, and on demand the two things a watch must
//! survive: a dropped connection and `410 Gone`.
//!
//! No API server binary can run here; this speaks what kube-rs sends:
//! `GET ?limit=..` lists, then `GET ?watch=true&resourceVersion=N` streams
//! of `{"type": ..., "object": ...}` lines, and the object verbs on
//! `.../{name}` (and `.../{name}/status`).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::UnboundedReceiverStream};

pub const TOKEN: &str = "tollgate-test-token";

/// The API version of [`egress_policy`]'s two kinds.
pub const POLICY_API_VERSION: &str = "policy.tollgate.dev/v1alpha1";

/// A kind the fake serves.
struct Resource {
    /// `v1`, or `group/version`.
    group_version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// Has a `/status` subresource: a client's write to the object itself
    /// leaves the status as it was.
    status_subresource: bool,
    /// A custom resource (with a status subresource): the server counts
    /// `metadata.generation` up on spec changes, and not even the test's
    /// [`FakeApiServer::put`] sets its status.
    custom: bool,
}

const RESOURCES: &[Resource] = &[
    Resource {
        group_version: "v1",
        plural: "pods",
        kind: "Pod",
        namespaced: true,
        status_subresource: true,
        custom: false,
    },
    Resource {
        group_version: "v1",
        plural: "namespaces",
        kind: "Namespace",
        namespaced: false,
        status_subresource: true,
        custom: false,
    },
    Resource {
        group_version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
        status_subresource: true,
        custom: false,
    },
    Resource {
        group_version: "coordination.k8s.io/v1",
        plural: "leases",
        kind: "Lease",
        namespaced: true,
        status_subresource: false,
        custom: false,
    },
    Resource {
        group_version: POLICY_API_VERSION,
        plural: "egresspolicies",
        kind: "EgressPolicy",
        namespaced: true,
        status_subresource: true,
        custom: true,
    },
    Resource {
        group_version: POLICY_API_VERSION,
        plural: "clusteregresspolicies",
        kind: "ClusterEgressPolicy",
        namespaced: false,
        status_subresource: true,
        custom: true,
    },
];

impl Resource {
    fn by_kind(kind: &str) -> Option<&'static Resource> {
        RESOURCES.iter().find(|r| r.kind == kind)
    }

    /// How the API server names it in messages: `leases.coordination.k8s.io`, `nodes`.
    fn qualified(&self) -> String {
        match self.group() {
            "" => self.plural.to_owned(),
            group => format!("{}.{group}", self.plural),
        }
    }

    fn group(&self) -> &'static str {
        self.group_version
            .split_once('/')
            .map_or("", |(group, _)| group)
    }

    /// `ns/name` for namespaced kinds, `name` otherwise.
    fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(namespace) if self.namespaced => format!("{namespace}/{name}"),
            _ => name.to_owned(),
        }
    }
}

#[derive(Default)]
struct Store {
    /// While true, every request gets `503 Service Unavailable`, as from
    /// an API server that is down behind its load balancer.
    down: bool,
    resource_version: u64,
    /// plural -> key (`ns/name` or `name`) -> object
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// Every change, in resource version order.
    history: Vec<Change>,
    /// Watches from a resource version below this get `410 Gone`.
    compacted: u64,
    /// plural -> open watches: an event costs one selector check per watch
    /// of its kind, and one serialization.
    watches: BTreeMap<&'static str, Vec<Watch>>,
    /// The path below the group version and the query string of every
    /// request, for checks on what the client asked.
    requests: Vec<String>,
    /// (verb, plural) -> requests, for load checks.
    request_counts: BTreeMap<(String, String), u64>,
    /// For the uids the server makes.
    uids: u64,
}

/// One change as a watch sees it, at the resource version it made.
struct Change {
    version: u64,
    plural: &'static str,
    /// The object before, with the change's resource version: what a watch
    /// that stops seeing it is told is deleted.
    before: Option<Value>,
    /// The object after; `None` when deleted.
    after: Option<Value>,
}

#[derive(Clone, Copy)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn name(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

impl Change {
    /// What a watch with `selector` is told, as the API server's watch
    /// cache does it: an object that starts matching is ADDED, one that
    /// stops matching is DELETED.
    fn event_for(&self, selector: &Selector) -> Option<(EventType, &Value)> {
        let was = self.before.as_ref().filter(|o| selector.matches(o));
        let is = self.after.as_ref().filter(|o| selector.matches(o));
        match (was, is) {
            (None, Some(after)) => Some((EventType::Added, after)),
            (Some(_), Some(after)) => Some((EventType::Modified, after)),
            (Some(before), None) => Some((EventType::Deleted, before)),
            (None, None) => None,
        }
    }
}

fn event_line(event: EventType, object: &Value) -> Bytes {
    Bytes::from(format!(
        "{{\"type\":\"{}\",\"object\":{object}}}\n",
        event.name()
    ))
}

struct Watch {
    selector: Selector,
    events: mpsc::UnboundedSender<Bytes>,
}

/// Which objects a list or watch is about: a namespace, `fieldSelector`
/// and `labelSelector` terms, all of which must hold.
#[derive(Default)]
struct Selector {
    namespace: Option<String>,
    fields: Vec<FieldTerm>,
    labels: Vec<LabelTerm>,
}

struct FieldTerm {
    /// A JSON pointer into the object.
    pointer: &'static str,
    value: String,
    equal: bool,
}

/// An equality-based label selector term.
enum LabelTerm {
    Equals(String, String),
    /// Also holds when the label is absent, as in Kubernetes.
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

impl Selector {
    fn from_query(target: &Target, query: &BTreeMap<String, String>) -> Result<Self, Refusal> {
        let bad_request =
            |message: String| Refusal::new(StatusCode::BAD_REQUEST, "BadRequest", &message);
        let fields = match query.get("fieldSelector") {
            Some(selector) => field_terms(target.resource, selector).map_err(bad_request)?,
            None => Vec::new(),
        };
        let labels = match query.get("labelSelector") {
            Some(selector) => label_terms(selector).map_err(bad_request)?,
            None => Vec::new(),
        };
        Ok(Selector {
            namespace: target.namespace.clone(),
            fields,
            labels,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        self.namespace
            .as_ref()
            .is_none_or(|namespace| metadata["namespace"] == namespace.as_str())
            && self.fields.iter().all(|term| {
                let value = object.pointer(term.pointer).and_then(Value::as_str);
                (value.unwrap_or("") == term.value) == term.equal
            })
            && self
                .labels
                .iter()
                .all(|term| term.matches(&metadata["labels"]))
    }
}

impl LabelTerm {
    fn matches(&self, labels: &Value) -> bool {
        match self {
            LabelTerm::Equals(key, value) => labels[key.as_str()] == value.as_str(),
            LabelTerm::NotEquals(key, value) => labels[key.as_str()] != value.as_str(),
            LabelTerm::Exists(key) => labels.get(key).is_some(),
            LabelTerm::Absent(key) => labels.get(key).is_none(),
        }
    }
}

/// `key=value`, `key==value`, `key!=value`, comma-separated: the fields the
/// API server indexes for every kind, and a pod's node.
fn field_terms(resource: &Resource, selector: &str) -> Result<Vec<FieldTerm>, String> {
    terms(selector)
        .map(|term| {
            let (key, value, equal) = match term.split_once("!=") {
                Some((key, value)) => (key, value, false),
                None => match term.split_once("==").or_else(|| term.split_once('=')) {
                    Some((key, value)) => (key, value, true),
                    None => return Err(format!("invalid selector: '{selector}'")),
                },
            };
            let pointer = match key.trim() {
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                "spec.nodeName" if resource.plural == "pods" => "/spec/nodeName",
                _ => return Err(format!("field label not supported: {}", key.trim())),
            };
            Ok(FieldTerm {
                pointer,
                value: value.trim().to_owned(),
                equal,
            })
        })
        .collect()
}

/// Equality-based label selectors (`a=b`, `a==b`, `a!=b`, `a`, `!a`),
/// comma-separated; set-based ones (`a in (b,c)`) are refused.
fn label_terms(selector: &str) -> Result<Vec<LabelTerm>, String> {
    if selector.contains(['(', ')', '<', '>']) {
        return Err(format!(
            "set-based label selectors are not supported here: {selector}"
        ));
    }
    terms(selector)
        .map(|term| {
            let owned = |key: &str, value: &str| (key.trim().to_owned(), value.trim().to_owned());
            Ok(if let Some((key, value)) = term.split_once("!=") {
                let (key, value) = owned(key, value);
                LabelTerm::NotEquals(key, value)
            } else if let Some((key, value)) =
                term.split_once("==").or_else(|| term.split_once('='))
            {
                let (key, value) = owned(key, value);
                LabelTerm::Equals(key, value)
            } else if let Some(key) = term.strip_prefix('!') {
                LabelTerm::Absent(key.trim().to_owned())
            } else if term.contains(char::is_whitespace) {
                return Err(format!("unable to parse requirement: {term:?}"));
            } else {
                LabelTerm::Exists(term.to_owned())
            })
        })
        .collect()
}

fn terms(selector: &str) -> impl Iterator<Item = &str> {
    selector.split(',').map(str::trim).filter(|t| !t.is_empty())
}

/// Who writes an object.
#[derive(Clone, Copy, PartialEq)]
enum Writer {
    /// The test, through [`FakeApiServer::put`]: the world outside the
    /// client under test (kubelet, controllers, `kubectl apply`).
    Test,
    /// A client, through the API.
    Api,
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    store: Arc<Mutex<Store>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeApiServer {
    pub fn start() -> Self {
        // Two workers: a benchmark's thousands of watches and its client
        // share this machine's two cores.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let store = Arc::new(Mutex::new(Store::default()));
        // One handler: paths parse by the API conventions, not by a route table.
        let app = Router::new().fallback(handle).with_state(store.clone());
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

    /// Creates or replaces an object of any kind served (by its `kind`):
    /// from [`pod`], [`namespace`], [`node`], [`egress_policy`], or a Lease.
    /// The server sets what it would: resourceVersion, a uid and
    /// creationTimestamp if missing, and for the policy kinds generation;
    /// their status stays as stored (only the status subresource sets it).
    pub fn put(&self, mut object: Value) {
        let mut store = self.store.lock().unwrap();
        let (resource, key) = kind_and_key(&object);
        let stored = store.object(resource, &key).cloned();
        store.admit(resource, stored.as_ref(), &mut object, Writer::Test);
        store.change(resource.plural, key, Some(object));
    }

    pub fn delete(&self, object: &Value) {
        let mut store = self.store.lock().unwrap();
        let (resource, key) = kind_and_key(object);
        assert!(
            store.object(resource, &key).is_some(),
            "deleting an object that is not there"
        );
        store.change(resource.plural, key, None);
    }

    /// The stored object of `kind_plural` (e.g. `egresspolicies`) at `key`
    /// (`ns/name`, or `name` for cluster-scoped kinds).
    pub fn get(&self, kind_plural: &str, key: &str) -> Option<Value> {
        let store = self.store.lock().unwrap();
        store.objects.get(kind_plural)?.get(key).cloned()
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
        // The compaction takes a version of its own, as etcd's does, so
        // the list that follows reports one a watch may start from.
        store.resource_version += 1;
        store.compacted = store.resource_version;
        store.history.clear();
    }

    pub fn open_watches(&self) -> usize {
        let mut store = self.store.lock().unwrap();
        store
            .watches
            .values_mut()
            .map(|watches| {
                watches.retain(|w| !w.events.is_closed());
                watches.len()
            })
            .sum()
    }

    /// Every request as `path?query`, the path below `/api/v1/` or
    /// `/apis/{group}/{version}/` (`pods`, `namespaces/prod/pods`,
    /// `nodes/n1`), the query's keys sorted.
    pub fn requests(&self) -> Vec<String> {
        self.store.lock().unwrap().requests.clone()
    }

    /// Requests by (verb, resource plural); verbs are `list`, `watch`,
    /// `get`, `create`, `update`, `patch` and `delete`, and a subresource's
    /// requests count as its resource's.
    pub fn request_counts(&self) -> BTreeMap<(String, String), u64> {
        self.store.lock().unwrap().request_counts.clone()
    }

    /// Takes the server down (every open watch ends, every request gets
    /// 503) or brings it back with everything it held.
    pub fn set_down(&self, down: bool) {
        let mut store = self.store.lock().unwrap();
        store.down = down;
        if down {
            store.watches.clear();
        }
    }

    pub fn reset_request_counts(&self) {
        self.store.lock().unwrap().request_counts.clear();
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
    fn object(&self, resource: &Resource, key: &str) -> Option<&Value> {
        self.objects.get(resource.plural)?.get(key)
    }

    fn matching<'a>(
        &'a self,
        resource: &Resource,
        selector: &'a Selector,
    ) -> impl Iterator<Item = &'a Value> {
        self.objects
            .get(resource.plural)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(|o| selector.matches(o))
    }

    /// Sets on `object` what the API server sets on a write, given the
    /// `stored` version.
    fn admit(
        &mut self,
        resource: &Resource,
        stored: Option<&Value>,
        object: &mut Value,
        writer: Writer,
    ) {
        object["apiVersion"] = json!(resource.group_version);
        object["kind"] = json!(resource.kind);
        let from_stored = |field: &str| stored.map(|s| s["metadata"][field].clone());
        let given = |object: &Value, field: &str| {
            Some(object["metadata"][field].clone()).filter(|v| !v.is_null())
        };
        // The test may name the uid (a pod's is in its cgroup path); a
        // client cannot.
        let uid = match writer {
            Writer::Test => given(object, "uid").or_else(|| from_stored("uid")),
            Writer::Api => from_stored("uid"),
        };
        let uid = uid.unwrap_or_else(|| {
            self.uids += 1;
            json!(format!("00000000-0000-4000-a000-{:012x}", self.uids))
        });
        let created = from_stored("creationTimestamp")
            .or_else(|| given(object, "creationTimestamp"))
            .unwrap_or_else(|| json!(now()));
        object["metadata"]["uid"] = uid;
        object["metadata"]["creationTimestamp"] = created;
        if resource.custom {
            let generation = stored.map_or(1, |stored| {
                let generation = stored["metadata"]["generation"].as_u64().unwrap_or(1);
                generation + u64::from(stored["spec"] != object["spec"])
            });
            object["metadata"]["generation"] = json!(generation);
        }
        let status_as_stored =
            resource.custom || (resource.status_subresource && writer == Writer::Api);
        if status_as_stored {
            set_status(object, stored.map(|s| s["status"].clone()));
        }
    }

    /// Stores `object` at `key` (`None`: deletes it) at a new resource
    /// version, tells the watches, and returns the object as stored (or as
    /// last stored, when deleted).
    fn change(&mut self, plural: &'static str, key: String, object: Option<Value>) -> Value {
        self.resource_version += 1;
        let version = json!(self.resource_version.to_string());
        let objects = self.objects.entry(plural).or_default();
        let (before, after) = match object {
            Some(mut object) => {
                object["metadata"]["resourceVersion"] = version.clone();
                (objects.insert(key, object.clone()), Some(object))
            }
            None => (objects.remove(&key), None),
        };
        let before = before.map(|mut before| {
            before["metadata"]["resourceVersion"] = version;
            before
        });
        let change = Change {
            version: self.resource_version,
            plural,
            before,
            after,
        };
        self.notify(&change);
        let result = change
            .after
            .clone()
            .or_else(|| change.before.clone())
            .expect("a change of nothing");
        self.history.push(change);
        result
    }

    /// Sends `change` to each watch of its kind that sees it, serializing
    /// each kind of event once.
    fn notify(&mut self, change: &Change) {
        let Some(watches) = self.watches.get_mut(change.plural) else {
            return;
        };
        let mut lines: [Option<Bytes>; 3] = Default::default();
        watches.retain(|watch| match change.event_for(&watch.selector) {
            None => !watch.events.is_closed(),
            Some((event, object)) => {
                let line = lines[event as usize].get_or_insert_with(|| event_line(event, object));
                watch.events.send(line.clone()).is_ok()
            }
        });
    }
}

fn kind_and_key(object: &Value) -> (&'static Resource, String) {
    let kind = object["kind"].as_str();
    let resource = kind
        .and_then(Resource::by_kind)
        .unwrap_or_else(|| panic!("the fake API server has no kind {kind:?}"));
    let metadata = &object["metadata"];
    let namespace = metadata["namespace"].as_str();
    assert!(
        namespace.is_some() || !resource.namespaced,
        "a {kind:?} needs a namespace"
    );
    (
        resource,
        resource.key(namespace, metadata["name"].as_str().unwrap()),
    )
}

/// `status` as the object's status; `None` or null: none.
fn set_status(object: &mut Value, status: Option<Value>) {
    match status.filter(|s| !s.is_null()) {
        Some(status) => object["status"] = status,
        None => {
            if let Some(object) = object.as_object_mut() {
                object.remove("status");
            }
        }
    }
}

/// What a request is about, from its path.
struct Target {
    resource: &'static Resource,
    namespace: Option<String>,
    name: Option<String>,
    /// The `/status` subresource.
    status: bool,
    /// The path below the group version.
    path: String,
}

impl Target {
    /// `/api/v1/[namespaces/{ns}/]{plural}[/{name}[/status]]`, and the
    /// same below `/apis/{group}/{version}/`.
    fn parse(path: &str) -> Option<Target> {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group_version, below) = match segments.as_slice() {
            ["api", version, below @ ..] => ((*version).to_owned(), below),
            ["apis", group, version, below @ ..] => (format!("{group}/{version}"), below),
            _ => return None,
        };
        let (namespace, rest) = match below {
            ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
                (Some((*namespace).to_owned()), rest)
            }
            _ => (None, below),
        };
        let (plural, name, status) = match rest {
            [plural] => (*plural, None, false),
            [plural, name] => (*plural, Some((*name).to_owned()), false),
            [plural, name, "status"] => (*plural, Some((*name).to_owned()), true),
            _ => return None,
        };
        let resource = RESOURCES
            .iter()
            .find(|r| r.group_version == group_version && r.plural == plural)?;
        let misplaced = (namespace.is_some() && !resource.namespaced)
            || (resource.namespaced && name.is_some() && namespace.is_none())
            || (status && !resource.status_subresource);
        (!misplaced).then(|| Target {
            resource,
            namespace,
            name,
            status,
            path: below.join("/"),
        })
    }

    fn key(&self) -> Option<String> {
        let name = self.name.as_deref()?;
        Some(self.resource.key(self.namespace.as_deref(), name))
    }

    fn verb(&self, method: &Method, query: &BTreeMap<String, String>) -> Option<&'static str> {
        let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
        Some(match (method.as_str(), self.name.is_some()) {
            ("GET", true) => "get",
            ("GET", false) if watch => "watch",
            ("GET", false) => "list",
            ("POST", false) if self.namespace.is_some() || !self.resource.namespaced => "create",
            ("PUT", true) => "update",
            ("PATCH", true) => "patch",
            ("DELETE", true) if !self.status => "delete",
            _ => return None,
        })
    }
}

async fn handle(
    State(store): State<Arc<Mutex<Store>>>,
    method: Method,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(target) = Target::parse(uri.path()) else {
        let message = "the server could not find the requested resource";
        return Refusal::new(StatusCode::NOT_FOUND, "NotFound", message).into_response();
    };
    let Some(verb) = target.verb(&method, &query) else {
        let message =
            format!("the server does not allow this method on the requested resource: {method}");
        return Refusal::new(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", &message)
            .into_response();
    };
    let mut store = store.lock().unwrap();
    store.requests.push(format!(
        "{}?{}",
        target.path,
        query
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    ));
    *store
        .request_counts
        .entry((verb.to_owned(), target.resource.plural.to_owned()))
        .or_default() += 1;
    if store.down {
        let message = "the API server is down";
        return Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            message,
        )
        .into_response();
    }
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(&format!("Bearer {TOKEN}"))
    {
        return Refusal::new(StatusCode::UNAUTHORIZED, "Unauthorized", "Unauthorized")
            .into_response();
    }
    let reply = match verb {
        "list" => list(&store, &target, &query),
        "watch" => watch(&mut store, &target, &query),
        "get" => stored(&store, &target).map(|object| object_response(StatusCode::OK, object)),
        "create" => create(&mut store, &target, &body),
        "update" => update(&mut store, &target, &body),
        "patch" => patch(&mut store, &target, &headers, &body),
        _ => delete_object(&mut store, &target),
    };
    reply.unwrap_or_else(IntoResponse::into_response)
}

type Reply = Result<Response, Refusal>;

fn list(store: &Store, target: &Target, query: &BTreeMap<String, String>) -> Reply {
    let selector = Selector::from_query(target, query)?;
    let items: Vec<&Value> = store.matching(target.resource, &selector).collect();
    let body = json!({
        "kind": format!("{}List", target.resource.kind),
        "apiVersion": target.resource.group_version,
        "metadata": {"resourceVersion": store.resource_version.to_string()},
        "items": items,
    });
    Ok(object_response(StatusCode::OK, &body))
}

fn watch(store: &mut Store, target: &Target, query: &BTreeMap<String, String>) -> Reply {
    let selector = Selector::from_query(target, query)?;
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(version) => Some(version.parse::<u64>().map_err(|_| {
            let message = format!("invalid resource version: {version}");
            Refusal::new(StatusCode::BAD_REQUEST, "BadRequest", &message)
        })?),
    };
    let initial_events = query.get("sendInitialEvents").map(String::as_str) == Some("true");
    let (events, receiver) = mpsc::unbounded_channel();
    match from {
        Some(from) if from < store.compacted && !initial_events => {
            let gone = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {from} ({})", store.compacted),
                "reason": "Expired", "code": 410}});
            let _ = events.send(Bytes::from(format!("{gone}\n")));
        }
        Some(from) if !initial_events => {
            let start = store.history.partition_point(|c| c.version <= from);
            for change in &store.history[start..] {
                if change.plural == target.resource.plural
                    && let Some((event, object)) = change.event_for(&selector)
                {
                    let _ = events.send(event_line(event, object));
                }
            }
            store.add_watch(target, selector, events);
        }
        // No version (or a streaming list): the current state as ADDED events.
        _ => {
            for object in store.matching(target.resource, &selector) {
                let _ = events.send(event_line(EventType::Added, object));
            }
            if initial_events {
                let _ = events.send(initial_events_end(store, target.resource));
            }
            store.add_watch(target, selector, events);
        }
    }
    let lines = UnboundedReceiverStream::new(receiver).map(Ok::<_, Infallible>);
    Ok((
        StatusCode::OK,
        [("content-type", "application/json")],
        Body::from_stream(lines),
    )
        .into_response())
}

impl Store {
    fn add_watch(
        &mut self,
        target: &Target,
        selector: Selector,
        events: mpsc::UnboundedSender<Bytes>,
    ) {
        self.watches
            .entry(target.resource.plural)
            .or_default()
            .push(Watch { selector, events });
    }
}

/// The bookmark that ends a streaming list's initial events.
fn initial_events_end(store: &Store, resource: &Resource) -> Bytes {
    let bookmark = json!({"type": "BOOKMARK", "object": {
        "kind": resource.kind, "apiVersion": resource.group_version,
        "metadata": {"resourceVersion": store.resource_version.to_string(),
            "annotations": {"k8s.io/initial-events-end": "true"}}}});
    Bytes::from(format!("{bookmark}\n"))
}

fn create(store: &mut Store, target: &Target, body: &[u8]) -> Reply {
    let mut object = parse_object(body)?;
    let resource = target.resource;
    let name = object["metadata"]["name"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| {
            let message = format!(
                "{} is invalid: metadata.name: Required value: name is required",
                resource.kind
            );
            Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &message)
        })?;
    check_namespace(&mut object, target)?;
    let key = resource.key(target.namespace.as_deref(), &name);
    if store.object(resource, &key).is_some() {
        let message = format!("{} \"{name}\" already exists", resource.qualified());
        let code = StatusCode::CONFLICT;
        return Err(Refusal::about(
            code,
            "AlreadyExists",
            resource,
            &name,
            &message,
        ));
    }
    // The server's to set.
    if let Some(metadata) = object["metadata"].as_object_mut() {
        for field in ["uid", "resourceVersion", "generation", "creationTimestamp"] {
            metadata.remove(field);
        }
    }
    store.admit(resource, None, &mut object, Writer::Api);
    let object = store.change(resource.plural, key, Some(object));
    Ok(object_response(StatusCode::CREATED, &object))
}

/// PUT: a write only from a client that read the current version, when it
/// says which one it read (how leader election stays safe).
fn update(store: &mut Store, target: &Target, body: &[u8]) -> Reply {
    let mut object = parse_object(body)?;
    let stored = stored(store, target)?.clone();
    let name = target.name.as_deref().unwrap_or_default();
    if object["metadata"]["name"]
        .as_str()
        .is_some_and(|n| n != name)
    {
        let message = format!(
            "the name of the object ({}) does not match the name on the URL ({name})",
            object["metadata"]["name"]
        );
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            &message,
        ));
    }
    check_namespace(&mut object, target)?;
    let read = object["metadata"]["resourceVersion"]
        .as_str()
        .filter(|v| !v.is_empty());
    if read.is_some_and(|read| stored["metadata"]["resourceVersion"] != read) {
        return Err(Refusal::conflict(target.resource, name));
    }
    object["metadata"]["name"] = json!(name);
    let object = if target.status {
        with_status(&stored, &object)
    } else {
        store.admit(target.resource, Some(&stored), &mut object, Writer::Api);
        object
    };
    let object = store.change(target.resource.plural, target.key().unwrap(), Some(object));
    Ok(object_response(StatusCode::OK, &object))
}

/// PATCH with a JSON merge patch (RFC 7386) or a JSON patch (RFC 6902);
/// through `/status`, of the status only.
fn patch(store: &mut Store, target: &Target, headers: &HeaderMap, body: &[u8]) -> Reply {
    let stored = stored(store, target)?.clone();
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()))?;
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or_default()
        .trim();
    let mut patched = stored.clone();
    let applied = match content_type {
        "application/merge-patch+json" => {
            merge_patch(&mut patched, &patch);
            Ok(())
        }
        "application/json-patch+json" => json_patch(&mut patched, &patch),
        other => {
            let message = format!(
                "the body of the request was in an unknown format ({other}) - accepted media types \
                 include: application/json-patch+json, application/merge-patch+json"
            );
            let code = StatusCode::UNSUPPORTED_MEDIA_TYPE;
            return Err(Refusal::new(code, "UnsupportedMediaType", &message));
        }
    };
    let applied = applied.and_then(|()| {
        well_formed(&patched)
            .then_some(())
            .ok_or_else(|| "the patched object is not an object with object metadata".to_owned())
    });
    applied
        .map_err(|message| Refusal::new(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", &message))?;
    let name = target.name.as_deref().unwrap_or_default();
    let object = if target.status {
        with_status(&stored, &patched)
    } else {
        // A resourceVersion in the patch is a precondition.
        if patched["metadata"]["resourceVersion"] != stored["metadata"]["resourceVersion"] {
            return Err(Refusal::conflict(target.resource, name));
        }
        patched["metadata"]["name"] = json!(name);
        if let Some(namespace) = &target.namespace {
            patched["metadata"]["namespace"] = json!(namespace);
        }
        store.admit(target.resource, Some(&stored), &mut patched, Writer::Api);
        patched
    };
    let object = store.change(target.resource.plural, target.key().unwrap(), Some(object));
    Ok(object_response(StatusCode::OK, &object))
}

fn delete_object(store: &mut Store, target: &Target) -> Reply {
    stored(store, target)?;
    let object = store.change(target.resource.plural, target.key().unwrap(), None);
    Ok(object_response(StatusCode::OK, &object))
}

/// The object a request names, or its `404`.
fn stored<'a>(store: &'a Store, target: &Target) -> Result<&'a Value, Refusal> {
    let name = target.name.as_deref().unwrap_or_default();
    target
        .key()
        .and_then(|key| store.object(target.resource, &key))
        .ok_or_else(|| {
            let message = format!("{} \"{name}\" not found", target.resource.qualified());
            let code = StatusCode::NOT_FOUND;
            Refusal::about(code, "NotFound", target.resource, name, &message)
        })
}

/// `stored`, with the status of `source`: a write through `/status`.
fn with_status(stored: &Value, source: &Value) -> Value {
    let mut object = stored.clone();
    set_status(&mut object, source.get("status").cloned());
    object
}

fn parse_object(body: &[u8]) -> Result<Value, Refusal> {
    let bad_request = |message: &str| Refusal::new(StatusCode::BAD_REQUEST, "BadRequest", message);
    match serde_json::from_slice::<Value>(body) {
        Ok(object) if well_formed(&object) => Ok(object),
        Ok(_) => Err(bad_request(
            "the body is not an object with object metadata",
        )),
        Err(e) => Err(bad_request(&e.to_string())),
    }
}

/// An object whose metadata the server can set fields of.
fn well_formed(object: &Value) -> bool {
    object.is_object() && (object["metadata"].is_object() || object["metadata"].is_null())
}

/// The body's namespace must be the path's, which it defaults to.
fn check_namespace(object: &mut Value, target: &Target) -> Result<(), Refusal> {
    let Some(namespace) = &target.namespace else {
        return Ok(());
    };
    match object["metadata"]["namespace"].as_str() {
        Some(given) if given != namespace => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => {
            object["metadata"]["namespace"] = json!(namespace);
            Ok(())
        }
    }
}

/// RFC 7386: objects merge key by key, null removes, anything else
/// (lists too) replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().unwrap();
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// RFC 6902, on `document`; on an error it may be half done, so callers
/// patch a copy.
fn json_patch(document: &mut Value, operations: &Value) -> Result<(), String> {
    let operations = operations
        .as_array()
        .ok_or("a JSON patch is an array of operations")?;
    for operation in operations {
        let op = operation["op"].as_str().unwrap_or_default();
        let path = operation["path"]
            .as_str()
            .ok_or_else(|| format!("operation has no path: {operation}"))?;
        let value = || {
            operation
                .get("value")
                .cloned()
                .ok_or_else(|| format!("{op} operation has no value: {operation}"))
        };
        let from = || {
            operation["from"]
                .as_str()
                .ok_or_else(|| format!("{op} operation has no from: {operation}"))
        };
        match op {
            "add" => add(document, path, value()?)?,
            "remove" => {
                remove(document, path)?;
            }
            "replace" => {
                *document.pointer_mut(path).ok_or_else(|| {
                    format!("replace operation does not apply: doc is missing key: {path}")
                })? = value()?;
            }
            "move" => {
                let moved = remove(document, from()?)?;
                add(document, path, moved)?;
            }
            "copy" => {
                let from = from()?;
                let copied = document.pointer(from).cloned().ok_or_else(|| {
                    format!("copy operation does not apply: doc is missing from path: {from}")
                })?;
                add(document, path, copied)?;
            }
            "test" => {
                if document.pointer(path) != Some(&value()?) {
                    return Err(format!("testing value {path} failed: test failed"));
                }
            }
            other => return Err(format!("unexpected kind: {other:?}")),
        }
    }
    Ok(())
}

fn add(document: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *document = value;
        return Ok(());
    }
    let (container, token) = parent(document, path)?;
    match container {
        Value::Object(map) => {
            map.insert(token, value);
        }
        Value::Array(items) => {
            let index = if token == "-" {
                Some(items.len())
            } else {
                array_index(&token).filter(|i| *i <= items.len())
            };
            let index = index.ok_or_else(|| {
                format!("add operation does not apply: index out of bounds: {path}")
            })?;
            items.insert(index, value);
        }
        _ => {
            return Err(format!(
                "add operation does not apply: {path} is not in an object or array"
            ));
        }
    }
    Ok(())
}

fn remove(document: &mut Value, path: &str) -> Result<Value, String> {
    let (container, token) = parent(document, path)?;
    let removed = match container {
        Value::Object(map) => map.remove(&token),
        Value::Array(items) => array_index(&token)
            .filter(|i| *i < items.len())
            .map(|i| items.remove(i)),
        _ => None,
    };
    removed.ok_or_else(|| format!("remove operation does not apply: doc is missing path: {path}"))
}

/// The object or array a JSON pointer's last token is in, and that token.
fn parent<'a>(document: &'a mut Value, path: &str) -> Result<(&'a mut Value, String), String> {
    let (parent, token) = path
        .rsplit_once('/')
        .ok_or_else(|| format!("invalid JSON pointer: {path:?}"))?;
    let container = document
        .pointer_mut(parent)
        .ok_or_else(|| format!("doc is missing path: {path}"))?;
    Ok((container, token.replace("~1", "/").replace("~0", "~")))
}

/// RFC 6901: decimal, no leading zeros.
fn array_index(token: &str) -> Option<usize> {
    let canonical = token == "0" || !token.starts_with(['0', '+']);
    canonical.then(|| token.parse().ok()).flatten()
}

fn object_response(code: StatusCode, object: &Value) -> Response {
    (
        code,
        [("content-type", "application/json")],
        object.to_string(),
    )
        .into_response()
}

/// A failed request: the Status body the API server sends, code included.
struct Refusal(Value);

impl Refusal {
    fn new(code: StatusCode, reason: &str, message: &str) -> Self {
        Refusal(
            json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16()}),
        )
    }

    /// About one object, with the `details` the API server gives.
    fn about(
        code: StatusCode,
        reason: &str,
        resource: &Resource,
        name: &str,
        message: &str,
    ) -> Self {
        let mut refusal = Refusal::new(code, reason, message);
        refusal.0["details"] =
            json!({"name": name, "group": resource.group(), "kind": resource.plural});
        refusal
    }

    fn conflict(resource: &Resource, name: &str) -> Self {
        let message = format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            resource.qualified()
        );
        Refusal::about(StatusCode::CONFLICT, "Conflict", resource, name, &message)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let code = self.0["code"].as_u64().and_then(|c| u16::try_from(c).ok());
        let code = code.and_then(|c| StatusCode::from_u16(c).ok()).unwrap();
        object_response(code, &self.0)
    }
}

/// The time now as the API server writes timestamps (RFC 3339, UTC, seconds).
fn now() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (days, time) = ((seconds / 86_400) as i64, seconds % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        time / 3600,
        time % 3600 / 60,
        time % 60
    )
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

/// A node as the API server shows a ready one, with `taints` as (key, effect).
pub fn node(name: &str, taints: &[(&str, &str)]) -> Value {
    let mut spec = json!({"podCIDR": "10.244.0.0/24", "podCIDRs": ["10.244.0.0/24"]});
    // The API server leaves out an empty list.
    if !taints.is_empty() {
        let taints: Vec<Value> = taints
            .iter()
            .map(|(key, effect)| json!({"key": key, "effect": effect}))
            .collect();
        spec["taints"] = json!(taints);
    }
    let heartbeat = "2026-11-24T08:00:00Z";
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "creationTimestamp": "2026-11-24T07:00:00Z",
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "beta.kubernetes.io/os": "linux",
                "beta.kubernetes.io/arch": "amd64"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true"}},
        "spec": spec,
        "status": {
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": heartbeat, "lastTransitionTime": heartbeat}],
            "capacity": {"cpu": "2", "memory": "4026512Ki", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "3924112Ki", "pods": "110"},
            "nodeInfo": {"architecture": "amd64", "bootID": "3f1c2b9e-5d4a-4c1e-9b7a-2e6f8d0c1a43",
                "containerRuntimeVersion": "containerd://2.1.4", "kernelVersion": "6.12.0",
                "kubeProxyVersion": "", "kubeletVersion": "v1.33.4",
                "machineID": "8c6f0e4a1b2d4e7f9a3c5b7d9e1f2a4c", "operatingSystem": "linux",
                "osImage": "Ubuntu 24.04.3 LTS", "systemUUID": "8c6f0e4a-1b2d-4e7f-9a3c-5b7d9e1f2a4c"}}})
}

/// A running agent pod of the DaemonSet on `node` (label
/// `app.kubernetes.io/name=tollgate-agent`, namespace `tollgate-system`),
/// serving its metrics and report at 127.0.0.1:`metrics_port`, as the
/// status writer finds agents.
pub fn agent_pod(node: &str, metrics_port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("tollgate-agent-{node}"), "namespace": "tollgate-system",
            "labels": {"app.kubernetes.io/name": "tollgate-agent"}},
        "spec": {"nodeName": node, "hostNetwork": true, "containers": [{"name": "agent",
            "image": "tollgate-agent:test",
            "ports": [{"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": "127.0.0.1", "hostIP": "127.0.0.1"}})
}

/// An EgressPolicy in `namespace`, or with `None` a ClusterEgressPolicy,
/// as `kubectl apply` would send it (the server adds the rest).
pub fn egress_policy(namespace: Option<&str>, name: &str, spec: Value) -> Value {
    let (kind, metadata) = match namespace {
        Some(namespace) => (
            "EgressPolicy",
            json!({"name": name, "namespace": namespace}),
        ),
        None => ("ClusterEgressPolicy", json!({"name": name})),
    };
    json!({"apiVersion": POLICY_API_VERSION, "kind": kind, "metadata": metadata, "spec": spec})
}

#[cfg(test)]
mod tests {
    use std::{future::Future, time::Duration};

    use futures_util::{
        Stream, StreamExt as _,
        future::{join_all, try_join_all},
    };
    use k8s_openapi::{
        api::{
            coordination::v1::{Lease, LeaseSpec},
            core::v1::{Node, Pod},
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };
    use kube::{
        Api, Client,
        api::{
            ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
            PostParams, WatchEvent, WatchParams,
        },
        config::{KubeConfigOptions, Kubeconfig},
        runtime::{WatchStreamExt, watcher},
    };
    use serde_json::{Value, json};

    use super::{FakeApiServer, PodSpec, TOKEN, egress_policy, node, pod};

    type Events<K> =
        std::pin::Pin<Box<dyn Stream<Item = watcher::Result<watcher::Event<K>>> + Send>>;

    fn run<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future)
    }

    /// A client as the agent makes one from its kubeconfig.
    async fn client_from(kubeconfig: &str) -> Client {
        let kubeconfig = Kubeconfig::from_yaml(kubeconfig).unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .unwrap();
        Client::try_from(config).unwrap()
    }

    async fn client(api: &FakeApiServer) -> Client {
        client_from(&api.kubeconfig()).await
    }

    /// `EgressPolicy` or `ClusterEgressPolicy`, with no Rust type for it.
    fn policies(client: Client, kind: &str, namespace: Option<&str>) -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("policy.tollgate.dev", "v1alpha1", kind);
        let resource = ApiResource::from_gvk(&gvk);
        match namespace {
            Some(namespace) => Api::namespaced_with(client, namespace, &resource),
            None => Api::all_with(client, &resource),
        }
    }

    fn watch<K>(api: Api<K>, config: watcher::Config) -> Events<K>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    {
        watcher(api, config).default_backoff().boxed()
    }

    fn watch_policies(client: Client, kind: &str) -> Events<DynamicObject> {
        let api = policies(client, kind, None);
        watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed()
    }

    async fn next_result<K>(events: &mut Events<K>) -> watcher::Result<watcher::Event<K>> {
        tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("no watch event in 10 s")
            .expect("the watch stream ended")
    }

    /// The next event; errors (the watcher retries) are passed over.
    async fn next<K>(events: &mut Events<K>) -> watcher::Event<K> {
        loop {
            if let Ok(event) = next_result(events).await {
                return event;
            }
        }
    }

    /// The names a (re)list brings, from its `Init` to its `InitDone`.
    async fn listed<K: kube::Resource>(events: &mut Events<K>) -> Vec<String> {
        assert!(matches!(next(events).await, watcher::Event::Init));
        let mut names = Vec::new();
        loop {
            match next(events).await {
                watcher::Event::InitApply(object) => {
                    names.push(object.meta().name.clone().unwrap())
                }
                watcher::Event::InitDone => return names,
                _ => panic!("not part of a list"),
            }
        }
    }

    async fn applied<K>(events: &mut Events<K>) -> K {
        match next(events).await {
            watcher::Event::Apply(object) => object,
            _ => panic!("expected an Apply event"),
        }
    }

    async fn deleted<K>(events: &mut Events<K>) -> K {
        match next(events).await {
            watcher::Event::Delete(object) => object,
            _ => panic!("expected a Delete event"),
        }
    }

    /// (code, reason) of an API error.
    fn refusal<T: std::fmt::Debug>(result: kube::Result<T>) -> (u16, String) {
        match result {
            Err(kube::Error::Api(status)) => (status.code, status.reason),
            other => panic!("expected an API error, got {other:?}"),
        }
    }

    fn named(object: &DynamicObject) -> (&str, Option<i64>) {
        (
            object.metadata.name.as_deref().unwrap(),
            object.metadata.generation,
        )
    }

    #[test]
    fn policy_changes_reach_a_watcher() {
        let api = FakeApiServer::start();
        let allow = json!({"egress": [{"to": ["10.0.0.53/32"], "ports": [53]}]});
        api.put(egress_policy(Some("prod"), "allow-dns", allow.clone()));
        api.put(egress_policy(None, "baseline", json!({"egress": []})));
        run(async {
            let client = client(&api).await;
            let mut namespaced = watch_policies(client.clone(), "EgressPolicy");
            let mut cluster = watch_policies(client.clone(), "ClusterEgressPolicy");
            assert_eq!(listed(&mut namespaced).await, ["allow-dns"]);
            assert_eq!(listed(&mut cluster).await, ["baseline"]);
            let first_uid =
                api.get("egresspolicies", "prod/allow-dns").unwrap()["metadata"]["uid"].clone();

            // An update keeps the uid and counts the generation up.
            api.put(egress_policy(
                Some("prod"),
                "allow-dns",
                json!({"egress": []}),
            ));
            let updated = applied(&mut namespaced).await;
            assert_eq!(named(&updated), ("allow-dns", Some(2)));
            assert_eq!(updated.metadata.namespace.as_deref(), Some("prod"));
            assert_eq!(json!(updated.metadata.uid), first_uid);
            assert!(updated.metadata.creation_timestamp.is_some());

            // A status write is a modification too.
            let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
            policies(client.clone(), "EgressPolicy", Some("prod"))
                .patch_status("allow-dns", &PatchParams::default(), &Patch::Merge(&ready))
                .await
                .unwrap();
            assert_eq!(
                applied(&mut namespaced).await.data["status"],
                ready["status"]
            );

            // Deleted, then made again: a new object, with a new uid.
            api.delete(&egress_policy(Some("prod"), "allow-dns", json!({})));
            assert_eq!(named(&deleted(&mut namespaced).await).0, "allow-dns");
            api.put(egress_policy(Some("prod"), "allow-dns", allow.clone()));
            let again = applied(&mut namespaced).await;
            assert_eq!(named(&again), ("allow-dns", Some(1)));
            assert_ne!(json!(again.metadata.uid), first_uid);
            assert!(again.data.get("status").is_none(), "{:?}", again.data);

            // Made through the API, in another namespace.
            let staging = policies(client.clone(), "EgressPolicy", Some("staging"));
            let object =
                serde_json::from_value(egress_policy(Some("staging"), "open", allow.clone()));
            staging
                .create(&PostParams::default(), &object.unwrap())
                .await
                .unwrap();
            let created = applied(&mut namespaced).await;
            assert_eq!(named(&created), ("open", Some(1)));
            assert_eq!(created.metadata.namespace.as_deref(), Some("staging"));
            staging.delete("open", &Default::default()).await.unwrap();
            assert_eq!(named(&deleted(&mut namespaced).await).0, "open");

            // The cluster-scoped kind, likewise.
            api.put(egress_policy(None, "baseline", allow.clone()));
            assert_eq!(named(&applied(&mut cluster).await), ("baseline", Some(2)));
            api.delete(&egress_policy(None, "baseline", json!({})));
            assert_eq!(named(&deleted(&mut cluster).await).0, "baseline");
        });
    }

    #[test]
    fn generation_counts_spec_changes_and_status_has_its_subresource() {
        let api = FakeApiServer::start();
        let spec = json!({"egress": [{"to": ["10.0.0.0/8"]}]});
        let stored = |key: &str| api.get("egresspolicies", key).unwrap();
        api.put(egress_policy(Some("prod"), "p", spec.clone()));
        assert_eq!(stored("prod/p")["metadata"]["generation"], 1);

        // Metadata only: a new version, the same generation.
        let mut labelled = egress_policy(Some("prod"), "p", spec.clone());
        labelled["metadata"]["labels"] = json!({"team": "payments"});
        let before = stored("prod/p")["metadata"]["resourceVersion"].clone();
        api.put(labelled);
        assert_eq!(stored("prod/p")["metadata"]["generation"], 1);
        assert_ne!(stored("prod/p")["metadata"]["resourceVersion"], before);

        run(async {
            let client = client(&api).await;
            let prod = policies(client.clone(), "EgressPolicy", Some("prod"));
            let params = PatchParams::default();

            // A status merge patch changes the status only.
            let status = json!({"status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True"}]},
                "spec": {"egress": []}, "metadata": {"labels": {"team": "other"}}});
            let patched = prod
                .patch_status("p", &params, &Patch::Merge(&status))
                .await
                .unwrap();
            assert_eq!(patched.data["spec"], spec);
            assert_eq!(patched.data["status"], status["status"]);
            assert_eq!(patched.metadata.generation, Some(1));
            assert_eq!(patched.metadata.labels.unwrap()["team"], "payments");
            assert_ne!(json!(patched.metadata.resource_version), before);

            // RFC 7386: null removes a key, the others stay.
            let unset = json!({"status": {"observedGeneration": null}});
            let patched = prod
                .patch_status("p", &params, &Patch::Merge(&unset))
                .await
                .unwrap();
            assert_eq!(
                patched.data["status"],
                json!({"conditions": [{"type": "Ready", "status": "True"}]})
            );
            assert_eq!(
                prod.get_status("p").await.unwrap().data["status"],
                patched.data["status"]
            );

            // A spec change through replace counts; the status in the body does not.
            let mut object = prod.get("p").await.unwrap();
            object.data["spec"] = json!({"egress": []});
            object.data["status"] = json!({"forged": true});
            let replaced = prod
                .replace("p", &PostParams::default(), &object)
                .await
                .unwrap();
            assert_eq!(replaced.metadata.generation, Some(2));
            assert_eq!(replaced.data["status"], patched.data["status"]);

            // A merge patch of metadata on the object: no new generation.
            let label = json!({"metadata": {"labels": {"tier": "gold"}}});
            let relabelled = prod
                .patch("p", &params, &Patch::Merge(&label))
                .await
                .unwrap();
            assert_eq!(relabelled.metadata.generation, Some(2));
            let spec_patch = json!({"spec": {"egress": [{"to": ["0.0.0.0/0"]}]}});
            let respecced = prod
                .patch("p", &params, &Patch::Merge(&spec_patch))
                .await
                .unwrap();
            assert_eq!(respecced.metadata.generation, Some(3));

            // The test's own writes keep the status too.
            api.put(egress_policy(Some("prod"), "p", spec.clone()));
            assert_eq!(stored("prod/p")["status"], patched.data["status"]);
            assert_eq!(stored("prod/p")["metadata"]["generation"], 4);

            // Absent: 404.
            let absent = prod
                .patch_status("absent", &params, &Patch::Merge(&status))
                .await;
            assert_eq!(refusal(absent), (404, "NotFound".into()));
            assert_eq!(refusal(prod.get("absent").await), (404, "NotFound".into()));

            // The cluster-scoped kind has the subresource too.
            api.put(egress_policy(None, "base", spec.clone()));
            let cluster = policies(client, "ClusterEgressPolicy", None);
            let patched = cluster
                .patch_status("base", &params, &Patch::Merge(&status))
                .await
                .unwrap();
            assert_eq!(
                (patched.data["spec"].clone(), patched.metadata.generation),
                (spec.clone(), Some(1))
            );
            assert_eq!(
                api.get("clusteregresspolicies", "base").unwrap()["status"],
                status["status"]
            );
        });
    }

    #[test]
    fn node_taints_change_by_json_patch_with_a_test() {
        let api = FakeApiServer::start();
        api.put(node(
            "n1",
            &[
                ("tollgate.dev/agent-not-ready", "NoExecute"),
                ("node.kubernetes.io/unschedulable", "NoSchedule"),
            ],
        ));
        run(async {
            let nodes: Api<Node> = Api::all(client(&api).await);
            let read = nodes.get("n1").await.unwrap();
            let taint_keys = |node: &Node| -> Vec<String> {
                let taints = node
                    .spec
                    .as_ref()
                    .unwrap()
                    .taints
                    .clone()
                    .unwrap_or_default();
                taints.into_iter().map(|t| t.key).collect()
            };
            assert_eq!(taint_keys(&read).len(), 2);
            let addresses = read.status.as_ref().unwrap().addresses.clone().unwrap();
            assert_eq!(
                (addresses[0].type_.as_str(), addresses[0].address.as_str()),
                ("InternalIP", "127.0.0.1")
            );

            // Remove the agent's taint only if it is still where it was read.
            let untaint = || -> Patch<()> {
                Patch::Json(
                    serde_json::from_value(json!([
                        {"op": "test", "path": "/spec/taints/0/key", "value": "tollgate.dev/agent-not-ready"},
                        {"op": "remove", "path": "/spec/taints/0"}]))
                    .unwrap(),
                )
            };
            let params = PatchParams::default();
            let patched = nodes.patch("n1", &params, &untaint()).await.unwrap();
            assert_eq!(taint_keys(&patched), ["node.kubernetes.io/unschedulable"]);
            assert!(
                patched.status.unwrap().node_info.is_some(),
                "the status stays"
            );

            // Again: the test fails, and nothing changes.
            let version = patched.metadata.resource_version.clone();
            assert_eq!(
                refusal(nodes.patch("n1", &params, &untaint()).await),
                (422, "Invalid".into())
            );
            assert_eq!(
                nodes.get("n1").await.unwrap().metadata.resource_version,
                version
            );

            // add, replace; then a merge patch replaces the list whole.
            let add: Patch<()> = Patch::Json(
                serde_json::from_value(json!([
                    {"op": "add", "path": "/spec/taints/-", "value": {"key": "a", "effect": "NoSchedule"}},
                    {"op": "replace", "path": "/spec/taints/0/effect", "value": "PreferNoSchedule"}]))
                .unwrap(),
            );
            let patched = nodes.patch("n1", &params, &add).await.unwrap();
            assert_eq!(
                taint_keys(&patched),
                ["node.kubernetes.io/unschedulable", "a"]
            );
            let taints = json!({"spec": {"taints": [{"key": "b", "effect": "NoExecute"}]}});
            let patched = nodes
                .patch("n1", &params, &Patch::Merge(&taints))
                .await
                .unwrap();
            assert_eq!(taint_keys(&patched), ["b"]);
            assert_eq!(
                api.get("nodes", "n1").unwrap()["spec"]["taints"],
                taints["spec"]["taints"]
            );

            // A patch that would leave no metadata to set is refused, and harms nothing.
            let broken = json!({"metadata": "gone"});
            let refused = nodes.patch("n1", &params, &Patch::Merge(&broken)).await;
            assert_eq!(refusal(refused), (422, "Invalid".into()));
            assert!(nodes.get("n1").await.is_ok());

            // Listed and watched like namespaces.
            let mut events = watch(nodes.clone(), watcher::Config::default());
            assert_eq!(listed(&mut events).await, ["n1"]);
            api.put(node("n2", &[]));
            assert_eq!(
                applied(&mut events).await.metadata.name.as_deref(),
                Some("n2")
            );
            assert_eq!(refusal(nodes.get("n3").await), (404, "NotFound".into()));
        });
    }

    #[test]
    fn a_lease_is_replaced_only_from_its_current_version() {
        let api = FakeApiServer::start();
        run(async {
            let leases: Api<Lease> = Api::namespaced(client(&api).await, "tollgate-system");
            assert_eq!(
                refusal(leases.get("tollgate-leader").await),
                (404, "NotFound".into())
            );
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some("tollgate-leader".into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some("agent-a".into()),
                    lease_duration_seconds: Some(15),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            let created = leases.create(&PostParams::default(), &lease).await.unwrap();
            assert_eq!(
                created.metadata.namespace.as_deref(),
                Some("tollgate-system")
            );
            assert!(created.metadata.uid.is_some() && created.metadata.resource_version.is_some());
            let again = leases.create(&PostParams::default(), &lease).await;
            assert_eq!(refusal(again), (409, "AlreadyExists".into()));

            // The holder renews from what it read.
            let mut renewed = created.clone();
            renewed.spec.as_mut().unwrap().lease_transitions = Some(1);
            let renewed = leases
                .replace("tollgate-leader", &PostParams::default(), &renewed)
                .await
                .unwrap();
            assert_ne!(
                renewed.metadata.resource_version,
                created.metadata.resource_version
            );

            // Another agent, acting on the first read, loses.
            let mut stale = created.clone();
            stale.spec.as_mut().unwrap().holder_identity = Some("agent-b".into());
            let taken = leases
                .replace("tollgate-leader", &PostParams::default(), &stale)
                .await;
            assert_eq!(refusal(taken), (409, "Conflict".into()));
            let held = leases.get("tollgate-leader").await.unwrap();
            assert_eq!(
                held.spec.unwrap().holder_identity.as_deref(),
                Some("agent-a")
            );
            assert_eq!(
                api.get("leases", "tollgate-system/tollgate-leader")
                    .unwrap()["spec"]["leaseTransitions"],
                1
            );
        });
    }

    #[test]
    fn pods_are_listed_and_watched_by_label_selector() {
        let api = FakeApiServer::start();
        let web = |namespace: &'static str, uid: &'static str, tier: &'static str| {
            pod(&PodSpec {
                namespace,
                deployment: "web",
                uid,
                labels: Box::leak(Box::new([("app", "web"), ("tier", tier)])),
                node: "n1",
                containers: &[("app", "containerd://0123")],
            })
        };
        api.put(web("prod", "00000001-aaaa-4000-8000-000000000001", "front"));
        api.put(web("prod", "00000002-aaaa-4000-8000-000000000002", "back"));
        api.put(web(
            "staging",
            "00000003-aaaa-4000-8000-000000000003",
            "front",
        ));
        let name = |pod: &Pod| pod.metadata.name.clone().unwrap();
        run(async {
            let prod: Api<Pod> = Api::namespaced(client(&api).await, "prod");
            let front = ListParams::default().labels("app=web,tier=front");
            let pods = prod.list(&front).await.unwrap();
            assert_eq!(
                pods.items.iter().map(name).collect::<Vec<_>>(),
                ["web-5d8f7c6b9-00001"]
            );
            let not_back = ListParams::default().labels("tier!=back,app");
            assert_eq!(prod.list(&not_back).await.unwrap().items.len(), 1);
            let set_based = ListParams::default().labels("tier in (front,back)");
            assert_eq!(
                refusal(prod.list(&set_based).await),
                (400, "BadRequest".into())
            );

            let mut events = watch(
                prod.clone(),
                watcher::Config::default().labels("app=web,tier=front"),
            );
            assert_eq!(listed(&mut events).await, ["web-5d8f7c6b9-00001"]);
            // Another namespace, or another tier: not seen.
            api.put(web(
                "staging",
                "00000004-aaaa-4000-8000-000000000004",
                "front",
            ));
            api.put(web("prod", "00000005-aaaa-4000-8000-000000000005", "back"));
            api.put(web("prod", "00000006-aaaa-4000-8000-000000000006", "front"));
            assert_eq!(name(&applied(&mut events).await), "web-5d8f7c6b9-00006");
            // No longer matching: gone, as far as this watch is concerned.
            api.put(web("prod", "00000001-aaaa-4000-8000-000000000001", "back"));
            assert_eq!(name(&deleted(&mut events).await), "web-5d8f7c6b9-00001");
            api.put(web("prod", "00000001-aaaa-4000-8000-000000000001", "front"));
            assert_eq!(name(&applied(&mut events).await), "web-5d8f7c6b9-00001");
        });
        // The agent's selector, all namespaces: a pod on another node is not seen.
        run(async {
            let pods: Api<Pod> = Api::all(client(&api).await);
            let on_n1 = watcher::Config::default().fields("spec.nodeName=n1");
            let mut events = watch(pods.clone(), on_n1);
            assert_eq!(listed(&mut events).await.len(), 6);
            let mut elsewhere = web("prod", "00000007-aaaa-4000-8000-000000000007", "front");
            elsewhere["spec"]["nodeName"] = json!("n2");
            api.put(elsewhere);
            api.put(web("prod", "00000008-aaaa-4000-8000-000000000008", "front"));
            assert_eq!(name(&applied(&mut events).await), "web-5d8f7c6b9-00008");
            let by_host = ListParams::default().fields("status.hostIP=10.0.0.1");
            assert_eq!(
                refusal(pods.list(&by_host).await),
                (400, "BadRequest".into())
            );
        });
        let requests = api.requests();
        assert!(
            requests
                .iter()
                .any(|r| r.starts_with("namespaces/prod/pods?")
                    && r.contains("labelSelector=app=web,tier=front")
                    && r.contains("watch=true")),
            "{requests:#?}"
        );
    }

    #[test]
    fn gone_relists_the_policy_kinds() {
        let api = FakeApiServer::start();
        api.put(egress_policy(Some("prod"), "a", json!({})));
        api.put(egress_policy(None, "c", json!({})));
        run(async {
            let client = client(&api).await;
            let mut namespaced = watch_policies(client.clone(), "EgressPolicy");
            let mut cluster = watch_policies(client, "ClusterEgressPolicy");
            assert_eq!(listed(&mut namespaced).await, ["a"]);
            assert_eq!(listed(&mut cluster).await, ["c"]);
            api.reset_request_counts();

            api.compact();
            api.disconnect_watches();
            api.put(egress_policy(Some("prod"), "b", json!({})));
            api.put(egress_policy(None, "d", json!({})));
            for (events, expected) in [(&mut namespaced, ["a", "b"]), (&mut cluster, ["c", "d"])] {
                // The resumed watch is told 410, and the watcher lists again.
                match next_result(events).await {
                    Err(watcher::Error::WatchError(status)) => assert_eq!(status.code, 410),
                    other => panic!("expected 410 Gone, got {other:?}"),
                }
                assert_eq!(listed(events).await, expected);
            }
            // And watches on from there.
            api.put(egress_policy(Some("prod"), "e", json!({})));
            assert_eq!(named(&applied(&mut namespaced).await).0, "e");
            api.put(egress_policy(None, "f", json!({})));
            assert_eq!(named(&applied(&mut cluster).await).0, "f");
        });
        let counts = api.request_counts();
        for plural in ["egresspolicies", "clusteregresspolicies"] {
            assert_eq!(counts[&("list".into(), plural.into())], 1, "{counts:?}");
            assert!(counts[&("watch".into(), plural.into())] >= 2, "{counts:?}");
        }
    }

    #[test]
    fn every_route_wants_the_token_and_requests_are_counted() {
        let api = FakeApiServer::start();
        api.put(node("n1", &[]));
        api.put(egress_policy(Some("prod"), "p", json!({})));
        run(async {
            let wrong = client_from(&api.kubeconfig().replace(TOKEN, "not-the-token")).await;
            let unauthorized = (401, "Unauthorized".to_string());
            assert_eq!(
                refusal(Api::<Node>::all(wrong.clone()).get("n1").await),
                unauthorized
            );
            let leases = Api::<Lease>::namespaced(wrong.clone(), "default");
            assert_eq!(refusal(leases.get("l").await), unauthorized);
            let prod = policies(wrong.clone(), "EgressPolicy", Some("prod"));
            assert_eq!(
                refusal(prod.list(&ListParams::default()).await),
                unauthorized
            );
            let status = Patch::Merge(json!({"status": {}}));
            assert_eq!(
                refusal(
                    prod.patch_status("p", &PatchParams::default(), &status)
                        .await
                ),
                unauthorized
            );

            api.reset_request_counts();
            let client = client(&api).await;
            let nodes = Api::<Node>::all(client.clone());
            nodes.list(&ListParams::default()).await.unwrap();
            nodes.get("n1").await.unwrap();
            nodes.get("n1").await.unwrap();
            let prod = policies(client.clone(), "EgressPolicy", Some("prod"));
            prod.patch_status("p", &PatchParams::default(), &status)
                .await
                .unwrap();
            let mut events = prod
                .watch(&WatchParams::default(), "0")
                .await
                .unwrap()
                .boxed();
            assert!(matches!(
                events.next().await,
                Some(Ok(WatchEvent::Added(_)))
            ));
        });
        let counted = |verb: &str, plural: &str| (verb.to_owned(), plural.to_owned());
        let expected = [
            (counted("get", "nodes"), 2),
            (counted("list", "nodes"), 1),
            (counted("patch", "egresspolicies"), 1),
            (counted("watch", "egresspolicies"), 1),
        ];
        assert_eq!(api.request_counts(), expected.into_iter().collect());
        let requests = api.requests();
        assert!(requests.contains(&"nodes/n1?".to_string()), "{requests:#?}");
        assert!(
            requests.contains(&"namespaces/prod/egresspolicies/p/status?".to_string()),
            "{requests:#?}"
        );
    }

    type RawEvents =
        std::pin::Pin<Box<dyn Stream<Item = kube::Result<WatchEvent<DynamicObject>>> + Send>>;

    /// The `spec.round` of the next object a raw watch sees.
    async fn round_seen(events: &mut RawEvents) -> Value {
        let event = tokio::time::timeout(Duration::from_secs(30), events.next()).await;
        match event.expect("no event in 30 s") {
            Some(Ok(WatchEvent::Added(object) | WatchEvent::Modified(object))) => {
                object.data["spec"]["round"].clone()
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The scale of the benchmark: a thousand agents, each watching both
    /// policy kinds, all told of each change.
    #[test]
    fn two_thousand_watches_each_see_every_change() {
        const AGENTS: usize = 1000;
        let api = FakeApiServer::start();
        run(async {
            let client = client(&api).await;
            let open = |kind: &'static str| {
                let api = policies(client.clone(), kind, None);
                async move {
                    api.watch(&WatchParams::default(), "0")
                        .await
                        .map(|events| events.boxed())
                }
            };
            let mut namespaced = try_join_all((0..AGENTS).map(|_| open("EgressPolicy")))
                .await
                .unwrap();
            let mut cluster = try_join_all((0..AGENTS).map(|_| open("ClusterEgressPolicy")))
                .await
                .unwrap();
            assert_eq!(api.open_watches(), 2 * AGENTS);

            for round in 0..3 {
                api.put(egress_policy(Some("prod"), "p", json!({"round": round})));
                api.put(egress_policy(None, "c", json!({"round": round})));
                let rounds: Vec<Value> = join_all(
                    namespaced
                        .iter_mut()
                        .chain(cluster.iter_mut())
                        .map(round_seen),
                )
                .await;
                assert!(rounds.iter().all(|r| *r == round), "round {round}");
            }
        });
    }
}
