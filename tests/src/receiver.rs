//! A stand-in for the HTTP log APIs (Splunk HEC, Azure Monitor Logs
//! Ingestion, Elasticsearch `_bulk`): it checks each request's wire format
//! the way the API would (path, auth, content type, gzip, body shape),
//! answers as the API does, keeps what it accepted, and can fail or go away
//! on demand. As the real APIs document: HEC can use indexer
//! acknowledgement (a channel per request, `ackId`s acknowledged at
//! `/services/collector/ack`) and refuse single events
//! (`invalid-event-number`); Logs Ingestion refuses bodies over 1 MB (413);
//! `_bulk` maps fields dynamically, as in a `logs-*` data stream, and
//! refuses documents that conflict with the mapping.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Read,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Request, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::oneshot;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    SplunkHec,
    AzureLogsIngestion,
    ElasticBulk,
}

pub const TOKEN: &str = "tollgate-receiver-token";

/// How the receiver answers now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Accept,
    /// Every request gets this status (with `Retry-After: 1` for 429 and 503).
    Fail(u16),
}

/// Logs Ingestion's limit per call: 1 MB, compressed or not.
pub const AZURE_MAX_BODY_BYTES: usize = 1_000_000;

/// HEC's indexer acknowledgement, on for the token.
#[derive(Default)]
struct HecAck {
    /// Polls an id is answered `false` before it is acknowledged.
    polls_before_ack: usize,
    next_id: u64,
    /// (channel, ack id): polls left before it is acknowledged.
    pending: HashMap<(String, u64), usize>,
}

/// A field's type in an Elasticsearch mapping, as dynamic mapping sets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FieldType {
    Object,
    Text,
    Number,
    Bool,
}

#[derive(Default)]
struct Shared {
    behaviour: Option<Behaviour>,
    /// Accepted events, in arrival order (the per-event JSON the API stores).
    events: Vec<Value>,
    /// `_bulk`: the index of each of `events`.
    elastic_indexes: Vec<String>,
    /// Requests refused for a wrong wire format, with why.
    malformed: Vec<String>,
    /// Events or documents the API refused, with why.
    refused: Vec<String>,
    requests: usize,
    /// `_bulk`: (index, id) of every document created: ids are per index.
    elastic_ids: HashSet<(String, String)>,
    /// `_bulk`: per index, every field's type by its dotted path.
    elastic_mappings: HashMap<String, BTreeMap<String, FieldType>>,
    hec_ack: Option<HecAck>,
    /// HEC: events whose record `seq` it refuses as invalid (code 6).
    hec_invalid_seqs: HashSet<u64>,
    /// Logs Ingestion: the largest body taken.
    max_body_bytes: usize,
    /// Logs Ingestion: requests refused with 413.
    too_large: usize,
}

pub struct Receiver {
    pub api: Api,
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
    runtime: tokio::runtime::Runtime,
    stop: Option<oneshot::Sender<()>>,
}

impl Receiver {
    pub fn start(api: Api) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let shared = Arc::new(Mutex::new(Shared {
            behaviour: Some(Behaviour::Accept),
            max_body_bytes: AZURE_MAX_BODY_BYTES,
            ..Default::default()
        }));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let mut receiver = Self {
            api,
            addr,
            shared,
            runtime,
            stop: None,
        };
        receiver.serve(listener);
        receiver
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let app = Router::new()
            .fallback(handle)
            .with_state((self.api, self.shared.clone()));
        let (stop, stopped) = oneshot::channel();
        self.runtime.spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        self.stop = Some(stop);
    }

    /// The URL a sink is configured with.
    pub fn url(&self) -> String {
        match self.api {
            Api::SplunkHec => format!("http://{}/services/collector/event", self.addr),
            Api::AzureLogsIngestion | Api::ElasticBulk => format!("http://{}", self.addr),
        }
    }

    pub fn set(&self, behaviour: Behaviour) {
        self.shared.lock().unwrap().behaviour = Some(behaviour);
    }

    /// HEC: the token uses indexer acknowledgement; each id is acknowledged
    /// after it was polled `polls_before_ack` times.
    pub fn require_ack(&self, polls_before_ack: usize) {
        self.shared.lock().unwrap().hec_ack = Some(HecAck {
            polls_before_ack,
            ..Default::default()
        });
    }

    /// HEC: refuses the events of these record `seq`s as invalid, every time.
    pub fn refuse_seqs(&self, seqs: impl IntoIterator<Item = u64>) {
        self.shared.lock().unwrap().hec_invalid_seqs.extend(seqs);
    }

    /// Logs Ingestion: refuses (413) bodies larger than this.
    pub fn limit_body(&self, bytes: usize) {
        self.shared.lock().unwrap().max_body_bytes = bytes;
    }

    /// Logs Ingestion: how many requests were refused as too large.
    pub fn too_large(&self) -> usize {
        self.shared.lock().unwrap().too_large
    }

    /// `_bulk`: the documents created in `index`, in order.
    pub fn documents(&self, index: &str) -> Vec<Value> {
        let shared = self.shared.lock().unwrap();
        shared
            .events
            .iter()
            .zip(&shared.elastic_indexes)
            .filter(|(_, i)| *i == index)
            .map(|(doc, _)| doc.clone())
            .collect()
    }

    /// Events or documents the API refused, with why.
    pub fn refused(&self) -> Vec<String> {
        self.shared.lock().unwrap().refused.clone()
    }

    /// Stops listening: connections are refused until `come_back`.
    pub fn go_away(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Until the port is really closed.
        while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn come_back(&mut self) {
        let listener = self
            .runtime
            .block_on(tokio::net::TcpListener::bind(self.addr))
            .expect("the receiver's port is free again");
        self.serve(listener);
    }

    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().unwrap().events.clone()
    }

    pub fn malformed(&self) -> Vec<String> {
        self.shared.lock().unwrap().malformed.clone()
    }

    pub fn requests(&self) -> usize {
        self.shared.lock().unwrap().requests
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn handle(
    State((api, shared)): State<(Api, Arc<Mutex<Shared>>)>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 << 20)
        .await
        .unwrap_or_default();
    let mut shared = shared.lock().unwrap();
    shared.requests += 1;
    match shared.behaviour {
        Some(Behaviour::Fail(code)) => {
            let status = StatusCode::from_u16(code).unwrap();
            return if code == 429 || code == 503 {
                (status, [("retry-after", "1")], "busy").into_response()
            } else {
                (status, "failing on purpose").into_response()
            };
        }
        Some(Behaviour::Accept) | None => {}
    }
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let text = match decoded(&parts.headers, &body) {
        Ok(text) => text,
        Err(why) => return malformed(&mut shared, why),
    };
    if api == Api::AzureLogsIngestion
        && (body.len() > shared.max_body_bytes || text.len() > shared.max_body_bytes)
    {
        shared.too_large += 1;
        let message = format!(
            "The request body is {} bytes ({} sent), over the limit of {}",
            text.len(),
            body.len(),
            shared.max_body_bytes
        );
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(json!({"error": {"code": "ContentLengthLimitExceeded", "message": message}})),
        )
            .into_response();
    }
    let channel = parts
        .headers
        .get("x-splunk-request-channel")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if api == Api::SplunkHec && shared.hec_ack.is_some() {
        let Some(channel) = channel.clone() else {
            shared
                .malformed
                .push("HEC with acknowledgement needs X-Splunk-Request-Channel".into());
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({"text": "Data channel is missing", "code": 10})),
            )
                .into_response();
        };
        if path == "/services/collector/ack" {
            return hec_acks(&mut shared, &parts.headers, &channel, &text);
        }
    }
    match check(api, &path, &query, &parts.headers, &text) {
        Ok(events) => match api {
            Api::SplunkHec => hec_index(&mut shared, events, channel),
            Api::AzureLogsIngestion => {
                shared.events.extend(events);
                StatusCode::NO_CONTENT.into_response()
            }
            Api::ElasticBulk => {
                let items: Vec<Value> = events
                    .into_iter()
                    .map(|event| elastic_create(&mut shared, event))
                    .collect();
                let errors = items.iter().any(|i| i["create"]["status"] != 201);
                let body = json!({"took": 3, "errors": errors, "items": items});
                (StatusCode::OK, Json(body)).into_response()
            }
        },
        Err(why) => malformed(&mut shared, why),
    }
}

fn malformed(shared: &mut Shared, why: String) -> Response {
    shared.malformed.push(why.clone());
    (StatusCode::BAD_REQUEST, why).into_response()
}

/// The body as sent, gunzipped when it says so.
fn decoded(headers: &HeaderMap, body: &Bytes) -> Result<String, String> {
    let body = match header(headers, "content-encoding") {
        "gzip" => {
            let mut text = Vec::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_end(&mut text)
                .map_err(|e| format!("Content-Encoding gzip, but: {e}"))?;
            text
        }
        "" => body.to_vec(),
        other => return Err(format!("unsupported Content-Encoding {other}")),
    };
    String::from_utf8(body).map_err(|_| "body is not UTF-8".to_string())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// HEC indexes the events up to the first invalid one (HEC's 400 names it,
/// from 0); with acknowledgement, a success carries an `ackId`.
fn hec_index(shared: &mut Shared, events: Vec<Value>, channel: Option<String>) -> Response {
    let invalid = events.iter().position(|event| {
        event["seq"]
            .as_u64()
            .is_some_and(|seq| shared.hec_invalid_seqs.contains(&seq))
    });
    let valid = invalid.unwrap_or(events.len());
    let mut events = events;
    if let Some(n) = invalid {
        shared
            .refused
            .push(format!("HEC invalid event {n}: {}", events[n]));
    }
    events.truncate(valid);
    shared.events.extend(events);
    if let Some(n) = invalid {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"text": "Invalid data format", "code": 6, "invalid-event-number": n})),
        )
            .into_response();
    }
    match (&mut shared.hec_ack, channel) {
        (Some(ack), Some(channel)) => {
            let id = ack.next_id;
            ack.next_id += 1;
            ack.pending.insert((channel, id), ack.polls_before_ack);
            Json(json!({"text": "Success", "code": 0, "ackId": id})).into_response()
        }
        _ => Json(json!({"text": "Success", "code": 0})).into_response(),
    }
}

/// `/services/collector/ack`: `{"acks":[ids]}` answered `{"acks":{"id":bool}}`
/// for the ids of this channel.
fn hec_acks(shared: &mut Shared, headers: &HeaderMap, channel: &str, text: &str) -> Response {
    if header(headers, "authorization") != format!("Splunk {TOKEN}") {
        return malformed(shared, "HEC ack needs Authorization: Splunk <token>".into());
    }
    let Some(ids) = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|query| query["acks"].as_array().cloned())
    else {
        return malformed(
            shared,
            format!("HEC ack query is not {{\"acks\":[ids]}}: {text}"),
        );
    };
    let ack = shared.hec_ack.as_mut().expect("acknowledgement is on");
    let mut acks = serde_json::Map::new();
    for id in ids.iter().filter_map(Value::as_u64) {
        let key = (channel.to_owned(), id);
        let done = match ack.pending.get_mut(&key) {
            Some(0) => {
                ack.pending.remove(&key);
                true
            }
            Some(polls_left) => {
                *polls_left -= 1;
                false
            }
            // Unknown, or acknowledged and asked again: HEC says false.
            None => false,
        };
        acks.insert(id.to_string(), json!(done));
    }
    Json(json!({ "acks": acks })).into_response()
}

/// One `create` item, as a `logs-*` data stream takes it: an id seen before
/// is a conflict (409); a document is refused (400) when its fields
/// conflict with the index's dynamic mapping or among themselves; without
/// `@timestamp` it gets the time of indexing (what logs@default-pipeline
/// does).
fn elastic_create(shared: &mut Shared, event: Value) -> Value {
    let index = event["_index"].as_str().unwrap_or_default().to_owned();
    let id = event["_id"].as_str().map(str::to_owned);
    let item = |status: u16, error: Option<Value>| {
        let mut item = json!({"_index": index, "_id": id, "status": status});
        if let Some(error) = error {
            item["error"] = error;
        }
        json!({ "create": item })
    };
    if id
        .as_ref()
        .is_some_and(|id| shared.elastic_ids.contains(&(index.clone(), id.clone())))
    {
        let reason = "version conflict, document already exists";
        return item(
            409,
            Some(json!({"type": "version_conflict_engine_exception", "reason": reason})),
        );
    }
    let mut doc = event["doc"].clone();
    let mapping = shared.elastic_mappings.entry(index.clone()).or_default();
    let fields = match document_fields(&doc)
        .and_then(|fields| fields_conflict(mapping, &fields).map_or(Ok(fields), Err))
    {
        Ok(fields) => fields,
        Err(reason) => {
            shared.refused.push(format!("{index}: {reason}: {doc}"));
            return item(
                400,
                Some(json!({"type": "document_parsing_exception", "reason": reason})),
            );
        }
    };
    mapping.extend(fields);
    if doc.get("@timestamp").is_none() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        doc["@timestamp"] = json!(tollgate_agent::flow::rfc3339_nanos(now));
    }
    if let Some(id) = &id {
        shared.elastic_ids.insert((index.clone(), id.clone()));
    }
    shared.events.push(doc);
    let created = item(201, None);
    shared.elastic_indexes.push(index);
    created
}

/// The fields a document maps, by dotted path, as dynamic mapping sees
/// them: a key with dots is a path of objects (`app.kubernetes.io/name`
/// is `app` → `kubernetes` → `io/name`), an array maps as its elements.
/// Err when one path is two types in the document.
fn document_fields(doc: &Value) -> Result<BTreeMap<String, FieldType>, String> {
    fn note(
        fields: &mut BTreeMap<String, FieldType>,
        path: &str,
        kind: FieldType,
    ) -> Result<(), String> {
        match fields.insert(path.to_owned(), kind) {
            Some(before) if before != kind => Err(format!(
                "[{path}] is {before:?} and {kind:?} in one document"
            )),
            _ => Ok(()),
        }
    }
    fn map(
        fields: &mut BTreeMap<String, FieldType>,
        path: &str,
        value: &Value,
    ) -> Result<(), String> {
        match value {
            Value::Null => Ok(()),
            Value::Bool(_) => note(fields, path, FieldType::Bool),
            Value::Number(_) => note(fields, path, FieldType::Number),
            Value::String(_) => note(fields, path, FieldType::Text),
            Value::Array(items) => items.iter().try_for_each(|item| map(fields, path, item)),
            Value::Object(object) => {
                if !path.is_empty() {
                    note(fields, path, FieldType::Object)?;
                }
                for (key, item) in object {
                    let mut inner = path.to_owned();
                    for segment in key.split('.') {
                        if !inner.is_empty() {
                            note(fields, &inner, FieldType::Object)?;
                            inner.push('.');
                        }
                        inner.push_str(segment);
                    }
                    map(fields, &inner, item)?;
                }
                Ok(())
            }
        }
    }
    let mut fields = BTreeMap::new();
    map(&mut fields, "", doc)?;
    Ok(fields)
}

/// Why `fields` cannot go into an index mapped as `mapping`, if they cannot.
fn fields_conflict(
    mapping: &BTreeMap<String, FieldType>,
    fields: &BTreeMap<String, FieldType>,
) -> Option<String> {
    fields.iter().find_map(|(path, kind)| {
        mapping
            .get(path)
            .filter(|mapped| *mapped != kind)
            .map(|mapped| format!("[{path}] is mapped as {mapped:?}, the document has {kind:?}"))
    })
}

/// The API's checks; the events it would store.
fn check(
    api: Api,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    text: &str,
) -> Result<Vec<Value>, String> {
    let header = |name: &str| header(headers, name);
    match api {
        Api::SplunkHec => {
            if path != "/services/collector/event" {
                return Err(format!("HEC path {path}"));
            }
            if header("authorization") != format!("Splunk {TOKEN}") {
                return Err("HEC needs Authorization: Splunk <token>".into());
            }
            let events: Vec<Value> = serde_json::Deserializer::from_str(text)
                .into_iter::<Value>()
                .collect::<Result<_, _>>()
                .map_err(|e| format!("HEC body is not JSON events: {e}"))?;
            for event in &events {
                if !(event["time"].is_number()
                    && event["host"].is_string()
                    && event["sourcetype"].is_string()
                    && !event["event"].is_null())
                {
                    return Err(format!(
                        "HEC event without time, host, sourcetype or event: {event}"
                    ));
                }
            }
            Ok(events.into_iter().map(|e| e["event"].clone()).collect())
        }
        Api::AzureLogsIngestion => {
            let Some(rest) = path.strip_prefix("/dataCollectionRules/") else {
                return Err(format!("Logs Ingestion path {path}"));
            };
            if !rest.contains("/streams/Custom-") || query != "api-version=2023-01-01" {
                return Err(format!("Logs Ingestion path {path}?{query}"));
            }
            if header("authorization") != format!("Bearer {TOKEN}") {
                return Err("Logs Ingestion needs Authorization: Bearer <token>".into());
            }
            if !header("content-type").starts_with("application/json") {
                return Err("Logs Ingestion needs Content-Type: application/json".into());
            }
            match serde_json::from_str::<Value>(text) {
                Ok(Value::Array(rows)) if rows.iter().all(Value::is_object) => Ok(rows),
                _ => Err("Logs Ingestion body must be a JSON array of objects".into()),
            }
        }
        Api::ElasticBulk => {
            if path != "/_bulk" {
                return Err(format!("_bulk path {path}"));
            }
            if header("authorization") != format!("ApiKey {TOKEN}") {
                return Err("_bulk needs Authorization: ApiKey <key>".into());
            }
            if header("content-type") != "application/x-ndjson" {
                return Err("_bulk needs Content-Type: application/x-ndjson".into());
            }
            if !text.ends_with('\n') {
                return Err("_bulk body must end with a newline".into());
            }
            let lines: Vec<&str> = text.lines().collect();
            if !lines.len().is_multiple_of(2) {
                return Err("_bulk body must be action/document pairs".into());
            }
            lines
                .chunks(2)
                .map(|pair| {
                    let action: Value = serde_json::from_str(pair[0]).map_err(|e| e.to_string())?;
                    let doc: Value = serde_json::from_str(pair[1]).map_err(|e| e.to_string())?;
                    let create = action.get("create").ok_or("_bulk action must be create")?;
                    if !create["_index"].is_string() {
                        return Err("_bulk create needs _index".to_string());
                    }
                    Ok(json!({"_index": create["_index"], "_id": create["_id"], "doc": doc}))
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_mapping_expands_dotted_keys_and_refuses_conflicts() {
        let fields = document_fields(&json!({"a": {"b.c": 1, "d": [true]}, "e": ["x", null]}));
        let fields = fields.unwrap();
        assert_eq!(fields["a.b"], FieldType::Object);
        assert_eq!(fields["a.b.c"], FieldType::Number);
        assert_eq!(fields["a.d"], FieldType::Bool);
        assert_eq!(fields["e"], FieldType::Text);
        // A pod's labels as keys: `app` is a value and an object.
        let labels = json!({"labels": {"app": "web", "app.kubernetes.io/name": "web"}});
        assert!(document_fields(&labels).is_err());
        let mapping = document_fields(&json!({"n": 1, "o": {"p": "q"}})).unwrap();
        let conflict = |doc: Value| fields_conflict(&mapping, &document_fields(&doc).unwrap());
        assert_eq!(conflict(json!({"n": 2, "o.p": "r"})), None);
        assert!(conflict(json!({"n": "1"})).is_some());
        assert!(conflict(json!({"n": {"x": 1}})).is_some());
        assert!(conflict(json!({"o": "flat"})).is_some());
    }
}
