//! A stand-in for the HTTP log APIs (Splunk HEC, Azure Monitor Logs
//! Ingestion, Elasticsearch `_bulk`): it checks each request's wire format
//! the way the API would (path, auth, content type, gzip, body shape),
//! answers as the API does, keeps what it accepted, and can fail or go away
//! on demand.

use std::{
    collections::HashSet,
    io::Read,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
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

#[derive(Default)]
struct Shared {
    behaviour: Option<Behaviour>,
    /// Accepted events, in arrival order (the per-event JSON the API stores).
    events: Vec<Value>,
    /// Requests refused for a wrong wire format, with why.
    malformed: Vec<String>,
    requests: usize,
    elastic_ids: HashSet<String>,
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
    match check(api, &path, &query, &parts.headers, &body) {
        Ok(events) => {
            let mut elastic_items = Vec::new();
            for event in events {
                if api == Api::ElasticBulk {
                    let id = event["_id"].as_str().map(str::to_owned);
                    let fresh = id
                        .as_ref()
                        .is_none_or(|id| shared.elastic_ids.insert(id.clone()));
                    elastic_items.push(json!({"create": {"_index": "logs-tollgate", "_id": id, "status": if fresh { 201 } else { 409 }}}));
                    if fresh {
                        shared.events.push(event["doc"].clone());
                    }
                } else {
                    shared.events.push(event);
                }
            }
            match api {
                Api::SplunkHec => {
                    (StatusCode::OK, r#"{"text":"Success","code":0}"#).into_response()
                }
                Api::AzureLogsIngestion => StatusCode::NO_CONTENT.into_response(),
                Api::ElasticBulk => {
                    let errors = elastic_items.iter().any(|i| i["create"]["status"] != 201);
                    let body = json!({"took": 3, "errors": errors, "items": elastic_items});
                    (
                        StatusCode::OK,
                        [("content-type", "application/json")],
                        body.to_string(),
                    )
                        .into_response()
                }
            }
        }
        Err(why) => {
            shared.malformed.push(why.clone());
            (StatusCode::BAD_REQUEST, why).into_response()
        }
    }
}

/// The API's checks; the events it would store.
fn check(
    api: Api,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Vec<Value>, String> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let body = match header("content-encoding") {
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
    let text = String::from_utf8(body).map_err(|_| "body is not UTF-8".to_string())?;
    match api {
        Api::SplunkHec => {
            if path != "/services/collector/event" {
                return Err(format!("HEC path {path}"));
            }
            if header("authorization") != format!("Splunk {TOKEN}") {
                return Err("HEC needs Authorization: Splunk <token>".into());
            }
            let events: Vec<Value> = serde_json::Deserializer::from_str(&text)
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
            match serde_json::from_str::<Value>(&text) {
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
                    Ok(json!({"_id": create["_id"], "doc": doc}))
                })
                .collect()
        }
    }
}
