//! HTTP batch sinks: Splunk HEC, the Azure Monitor Logs Ingestion API
//! (DCR-based) and Elasticsearch `_bulk`. Each record is encoded once into
//! the API's per-event form (and spooled so); a batch is those joined in the
//! API's body shape, gzip-compressed.

use std::{
    io::Write,
    ops::Range,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use flate2::{Compression, write::GzEncoder};
use reqwest::{StatusCode, header};
use tracing::warn;

use super::{RecordMeta, SendError, Settled};
use crate::export::record::RecordUid;

/// Which API, and how to authenticate to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpApi {
    /// `url`: the HEC event endpoint (`https://splunk:8088/services/collector/event`);
    /// `index`: the index every event names (else the token's default).
    SplunkHec {
        url: String,
        token_file: PathBuf,
        index: Option<String>,
    },
    /// `endpoint`: the data collection endpoint (or the DCR's logs ingestion
    /// endpoint); the stream's records are posted as a JSON array.
    AzureLogsIngestion {
        endpoint: String,
        dcr_immutable_id: String,
        stream: String,
        auth: AzureAuth,
    },
    /// `url`: the cluster (`https://es:9200`); documents are created in
    /// `index` (a data stream or an index) with ids that make a resend a no-op.
    /// `add_timestamp`: the documents' format has no `@timestamp` (all but
    /// ECS), so the record's time is added as one; without it a `logs-*`
    /// data stream stamps the time of indexing, wrong for spooled records.
    ElasticBulk {
        url: String,
        index: String,
        auth: ElasticAuth,
        add_timestamp: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AzureAuth {
    /// A bearer token kept fresh in a file by something else.
    TokenFile(PathBuf),
    /// AKS workload identity: the federated token in
    /// AZURE_FEDERATED_TOKEN_FILE is exchanged for an Entra ID token.
    WorkloadIdentity {
        client_id: String,
        tenant_id: String,
        federated_token_file: PathBuf,
        authority_host: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ElasticAuth {
    None,
    ApiKeyFile(PathBuf),
    Basic {
        username: String,
        password_file: PathBuf,
    },
}

impl HttpApi {
    /// Appends one record in the API's per-event form. `payload` is the
    /// formatted record; `json` says whether it is JSON (else it is
    /// embedded as a string where the API wants JSON).
    pub fn encode(
        &self,
        meta: &RecordMeta,
        payload: &[u8],
        json: bool,
        instance: &str,
        out: &mut Vec<u8>,
    ) {
        match self {
            Self::SplunkHec { index, .. } => {
                let seconds = meta.unix_seconds();
                let _ = write!(
                    out,
                    "{{\"time\":{seconds:.6},\"host\":{},\"source\":\"tollgate\",\"sourcetype\":\"tollgate:{}\",",
                    serde_json::Value::from(meta.node),
                    meta.kind
                );
                if let Some(index) = index {
                    let _ = write!(
                        out,
                        "\"index\":{},",
                        serde_json::Value::from(index.as_str())
                    );
                }
                out.extend_from_slice(b"\"event\":");
                push_json_or_string(payload, json, out);
                out.push(b'}');
            }
            Self::AzureLogsIngestion { .. } => push_json_or_string(payload, json, out),
            Self::ElasticBulk {
                index,
                add_timestamp,
                ..
            } => {
                let _ = write!(
                    out,
                    "{{\"create\":{{\"_index\":{}",
                    serde_json::Value::from(index.as_str())
                );
                if let Some(seq) = meta.seq {
                    // node, agent start and seq name a record once: a resent
                    // batch creates nothing twice (409, counted as delivered).
                    let _ = write!(
                        out,
                        ",\"_id\":{}",
                        serde_json::Value::from(
                            RecordUid {
                                node: meta.node,
                                instance,
                                seq
                            }
                            .to_string()
                        )
                    );
                }
                out.extend_from_slice(b"}}\n");
                match payload.strip_prefix(b"{") {
                    // First, as in ECS documents.
                    Some(fields) if *add_timestamp && json => {
                        let _ = write!(
                            out,
                            "{{\"@timestamp\":{}",
                            serde_json::Value::from(meta.time)
                        );
                        if fields != b"}" {
                            out.push(b',');
                        }
                        out.extend_from_slice(fields);
                    }
                    _ => push_json_or_string(payload, json, out),
                }
                out.push(b'\n');
            }
        }
    }

    fn body(&self, records: &[Vec<u8>]) -> Vec<u8> {
        let mut body = Vec::with_capacity(body_bytes_at_most(records));
        match self {
            Self::SplunkHec { .. } => {
                for record in records {
                    body.extend_from_slice(record);
                    body.push(b'\n');
                }
            }
            Self::AzureLogsIngestion { .. } => {
                body.push(b'[');
                for (i, record) in records.iter().enumerate() {
                    if i > 0 {
                        body.push(b',');
                    }
                    body.extend_from_slice(record);
                }
                body.push(b']');
            }
            Self::ElasticBulk { .. } => records.iter().for_each(|r| body.extend_from_slice(r)),
        }
        body
    }

    fn url(&self) -> String {
        match self {
            Self::SplunkHec { url, .. } => url.clone(),
            Self::AzureLogsIngestion {
                endpoint,
                dcr_immutable_id,
                stream,
                ..
            } => format!(
                "{}/dataCollectionRules/{dcr_immutable_id}/streams/{stream}?api-version=2023-01-01",
                endpoint.trim_end_matches('/')
            ),
            Self::ElasticBulk { url, .. } => format!("{}/_bulk", url.trim_end_matches('/')),
        }
    }

    /// The batch cut into consecutive parts whose bodies the API takes
    /// whole: Azure's stay under its limit; a record too large alone gets
    /// a part of its own (the API refuses it alone).
    fn parts(&self, records: &[Vec<u8>]) -> Vec<Range<usize>> {
        match self {
            Self::AzureLogsIngestion { .. } => cut_by_body_bytes(records, AZURE_BODY_BYTES),
            _ => std::iter::once(0..records.len()).collect(),
        }
    }

    /// HEC's acknowledgement endpoint, beside its event endpoint.
    fn hec_ack_url(url: &str) -> Result<String, String> {
        let mut ack = reqwest::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
        ack.set_path("/services/collector/ack");
        ack.set_query(None);
        Ok(ack.into())
    }
}

/// Azure's Logs Ingestion API takes at most 1 MB per call, "both compressed
/// and uncompressed data" (Azure Monitor service limits): the uncompressed
/// body is what binds. MB read as 10^6 bytes (the smaller reading), and a
/// tenth kept spare.
const AZURE_MAX_BODY_BYTES: usize = 1_000_000;
const AZURE_BODY_BYTES: usize = AZURE_MAX_BODY_BYTES / 10 * 9;

/// A body's size for these records, or a little more: each record with its
/// separator, and Azure's brackets.
fn body_bytes_at_most(records: &[Vec<u8>]) -> usize {
    records.iter().map(|r| r.len() + 1).sum::<usize>() + 2
}

/// Consecutive parts of `records` whose bodies stay within `max_bytes`;
/// a record larger alone is a part of its own.
fn cut_by_body_bytes(records: &[Vec<u8>], max_bytes: usize) -> Vec<Range<usize>> {
    let mut parts = Vec::new();
    let mut start = 0;
    for end in 1..=records.len() {
        if end - start > 1 && body_bytes_at_most(&records[start..end]) > max_bytes {
            parts.push(start..end - 1);
            start = end - 1;
        }
    }
    if start < records.len() {
        parts.push(start..records.len());
    }
    parts
}

fn push_json_or_string(payload: &[u8], json: bool, out: &mut Vec<u8>) {
    if json {
        out.extend_from_slice(payload);
    } else {
        let text = String::from_utf8_lossy(payload);
        let _ = serde_json::to_writer(&mut *out, &text);
    }
}

/// HEC with indexer acknowledgement: the channel this sink's requests
/// name, and where their acknowledgement is asked.
struct HecChannel {
    /// A GUID, new at each start: a channel only groups this run's requests.
    id: String,
    ack_url: String,
}

pub struct HttpSender {
    /// The sink's name, for the log.
    sink: String,
    api: HttpApi,
    client: reqwest::Client,
    gzip: bool,
    cached_token: Option<(String, Instant)>,
    /// Boxed: only HEC sinks have one.
    hec_channel: Option<Box<HecChannel>>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long HEC gets to acknowledge a batch before it is sent again.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
const FIRST_ACK_POLL: Duration = Duration::from_millis(100);
const MAX_ACK_POLL: Duration = Duration::from_secs(2);

impl HttpSender {
    /// `ca_file`: extra PEM roots (a private CA), added to the system's.
    pub fn new(
        sink: &str,
        api: HttpApi,
        gzip: bool,
        ca_file: Option<&Path>,
    ) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("tollgate-agent/", env!("CARGO_PKG_VERSION")));
        if let Some(ca_file) = ca_file {
            let pem = std::fs::read(ca_file).map_err(|e| format!("{}: {e}", ca_file.display()))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{}: {e}", ca_file.display()))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| e.to_string())?;
        let hec_channel = match &api {
            HttpApi::SplunkHec { url, .. } => Some(Box::new(HecChannel {
                // The kernel's random (version 4) UUID.
                id: std::fs::read_to_string("/proc/sys/kernel/random/uuid")
                    .map_err(|e| format!("a channel id for HEC: {e}"))?
                    .trim()
                    .to_owned(),
                ack_url: HttpApi::hec_ack_url(url)?,
            })),
            _ => None,
        };
        Ok(Self {
            sink: sink.to_owned(),
            api,
            client,
            gzip,
            cached_token: None,
            hec_channel,
        })
    }

    /// Posts the batch, in parts when the API wants it smaller.
    /// `Ok(rejected)`: delivered, except `rejected` records the API refused
    /// for good; an error says how much was settled before it.
    pub async fn send(&mut self, records: &[Vec<u8>]) -> Result<usize, SendError> {
        let mut progress = Progress::new(self.api.parts(records));
        while let Some(part) = progress.next_part() {
            let answer = match self.post(&records[part.clone()]).await {
                Answer::Pending { ack_id } => self.acknowledged(ack_id, ACK_TIMEOUT).await,
                answer => answer,
            };
            if let Some(refused) = progress.answered(part, answer)? {
                warn!(
                    sink = self.sink,
                    records = refused.records,
                    reason = refused.reason,
                    "receiver refused records for good"
                );
            }
        }
        Ok(progress.settled.rejected)
    }

    /// One request, and what its response says.
    async fn post(&mut self, records: &[Vec<u8>]) -> Answer {
        let request = match self.request(records).await {
            Ok(request) => request,
            Err(reason) => return Answer::retry(reason),
        };
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Answer::retry(e.to_string()),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = response.text().await.unwrap_or_default();
        classify(status, retry_after, &text, &self.api, records.len())
    }

    async fn request(&mut self, records: &[Vec<u8>]) -> Result<reqwest::RequestBuilder, String> {
        let body = self.api.body(records);
        let mut request = self.client.post(self.api.url());
        request = match &self.api {
            HttpApi::SplunkHec { token_file, .. } => self
                .hec_headers(request, token_file)?
                .header(header::CONTENT_TYPE, "application/json"),
            HttpApi::AzureLogsIngestion { auth, .. } => {
                let token = self.azure_token(&auth.clone()).await?;
                request
                    .bearer_auth(token)
                    .header(header::CONTENT_TYPE, "application/json")
            }
            HttpApi::ElasticBulk { auth, .. } => {
                let request = request.header(header::CONTENT_TYPE, "application/x-ndjson");
                match auth {
                    ElasticAuth::None => request,
                    ElasticAuth::ApiKeyFile(file) => request.header(
                        header::AUTHORIZATION,
                        format!("ApiKey {}", read_secret(file)?),
                    ),
                    ElasticAuth::Basic {
                        username,
                        password_file,
                    } => request.basic_auth(username, Some(read_secret(password_file)?)),
                }
            }
        };
        if self.gzip {
            let mut encoder =
                GzEncoder::new(Vec::with_capacity(body.len() / 4), Compression::fast());
            let compressed = encoder
                .write_all(&body)
                .and_then(|()| encoder.finish())
                .map_err(|e| format!("compressing: {e}"))?;
            Ok(request
                .header(header::CONTENT_ENCODING, "gzip")
                .body(compressed))
        } else {
            Ok(request.body(body))
        }
    }

    /// HEC's token and channel. The channel is always sent: a token with
    /// indexer acknowledgement refuses requests without one (code 10), and
    /// one without ignores it.
    fn hec_headers(
        &self,
        request: reqwest::RequestBuilder,
        token_file: &Path,
    ) -> Result<reqwest::RequestBuilder, String> {
        let mut request = request.header(
            header::AUTHORIZATION,
            format!("Splunk {}", read_secret(token_file)?),
        );
        if let Some(channel) = &self.hec_channel {
            request = request.header("X-Splunk-Request-Channel", &channel.id);
        }
        Ok(request)
    }

    /// Asks HEC until `ack_id` is indexed: taken then; not acknowledged
    /// within `timeout`, the part is sent again (HEC keeps no ids, so what
    /// was indexed but not acknowledged in time comes twice).
    async fn acknowledged(&mut self, ack_id: u64, timeout: Duration) -> Answer {
        let (Some(channel), HttpApi::SplunkHec { token_file, .. }) = (&self.hec_channel, &self.api)
        else {
            return Answer::retry("an acknowledgement id from an API without them");
        };
        let deadline = Instant::now() + timeout;
        let mut wait = FIRST_ACK_POLL;
        let mut last_problem = String::from("not indexed yet");
        loop {
            tokio::time::sleep(wait).await;
            let request = match self.hec_headers(self.client.post(&channel.ack_url), token_file) {
                Ok(request) => request.json(&serde_json::json!({ "acks": [ack_id] })),
                Err(reason) => return Answer::retry(reason),
            };
            match request.send().await {
                Ok(response) if response.status().is_success() => {
                    let text = response.text().await.unwrap_or_default();
                    match acknowledged(&text, ack_id) {
                        Ok(true) => return Answer::Taken { rejected: 0 },
                        Ok(false) => {}
                        Err(why) => last_problem = why,
                    }
                }
                Ok(response) => last_problem = format!("acknowledgement: {}", response.status()),
                Err(e) => last_problem = format!("acknowledgement: {e}"),
            }
            if Instant::now() + wait > deadline {
                return Answer::retry(format!(
                    "HEC did not acknowledge id {ack_id} within {timeout:?} ({last_problem}); sending again"
                ));
            }
            wait = (wait * 2).min(MAX_ACK_POLL);
        }
    }

    async fn azure_token(&mut self, auth: &AzureAuth) -> Result<String, String> {
        match auth {
            AzureAuth::TokenFile(file) => read_secret(file),
            AzureAuth::WorkloadIdentity {
                client_id,
                tenant_id,
                federated_token_file,
                authority_host,
            } => {
                if let Some((token, valid_until)) = &self.cached_token
                    && Instant::now() < *valid_until
                {
                    return Ok(token.clone());
                }
                let assertion = read_secret(federated_token_file)?;
                let url = format!(
                    "{}/{tenant_id}/oauth2/v2.0/token",
                    authority_host.trim_end_matches('/')
                );
                let form = [
                    ("client_id", client_id.as_str()),
                    ("scope", "https://monitor.azure.com//.default"),
                    ("grant_type", "client_credentials"),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.as_str()),
                ];
                let response = self
                    .client
                    .post(url)
                    .form(&form)
                    .send()
                    .await
                    .map_err(|e| format!("token request: {e}"))?;
                if !response.status().is_success() {
                    return Err(format!("token request: {}", response.status()));
                }
                #[derive(serde::Deserialize)]
                struct TokenResponse {
                    access_token: String,
                    expires_in: u64,
                }
                let token: TokenResponse = response
                    .json()
                    .await
                    .map_err(|e| format!("token response: {e}"))?;
                // Renewed five minutes early, so no batch goes out with a token about to expire.
                let valid_for = Duration::from_secs(token.expires_in.saturating_sub(300));
                self.cached_token = Some((token.access_token.clone(), Instant::now() + valid_for));
                Ok(token.access_token)
            }
        }
    }
}

/// A secret file's content, without a trailing newline (read per use, so a
/// rotated secret is picked up).
fn read_secret(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end().to_owned())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// What a response says about the records of one request.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Taken, except `rejected` refused for good (`_bulk` items).
    Taken { rejected: usize },
    /// HEC with indexer acknowledgement: taken once `ack_id` is
    /// acknowledged.
    Pending { ack_id: u64 },
    /// The first `taken` were taken and the one after them is refused for
    /// good (HEC's `invalid-event-number`); the rest go again.
    RefusedOne { taken: usize, reason: String },
    /// The first `taken` were taken and the rest are refused for good.
    Refused { taken: usize, reason: String },
    /// 413: the body is too large; smaller parts may pass.
    TooLarge { reason: String },
    /// Nothing taken now; send again.
    Retry {
        after: Option<Duration>,
        reason: String,
    },
}

impl Answer {
    fn retry(reason: impl Into<String>) -> Self {
        Self::Retry {
            after: None,
            reason: reason.into(),
        }
    }
}

/// Records refused for good by one answer, and why (for the log).
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    records: usize,
    reason: String,
}

/// Where the sending of one batch stands: its settled prefix and the parts
/// still to send, in order.
#[derive(Debug)]
struct Progress {
    settled: Settled,
    /// The next last.
    parts: Vec<Range<usize>>,
}

impl Progress {
    fn new(mut parts: Vec<Range<usize>>) -> Self {
        parts.reverse();
        Self {
            settled: Settled::default(),
            parts,
        }
    }

    fn next_part(&self) -> Option<Range<usize>> {
        self.parts.last().cloned()
    }

    /// Takes `answer` for `part` (the one `next_part` gave): the records it
    /// settles, what must go again. An error says to retry the batch from
    /// what is settled so far.
    fn answered(
        &mut self,
        part: Range<usize>,
        answer: Answer,
    ) -> Result<Option<Refusal>, SendError> {
        let len = part.len();
        let (settled, rejected, refusal) = match answer {
            Answer::Taken { rejected } => (len, rejected, None),
            // `send` awaits the acknowledgement first; unacknowledged, the
            // part goes again.
            Answer::Pending { ack_id } => {
                return Err(SendError {
                    after: None,
                    reason: format!("acknowledgement {ack_id} not awaited"),
                    settled: self.settled,
                });
            }
            Answer::RefusedOne { taken, reason } => {
                self.parts.pop();
                if taken + 1 < len {
                    self.parts.push(part.start + taken + 1..part.end);
                }
                self.settle(taken + 1, 1);
                return Ok(Some(Refusal { records: 1, reason }));
            }
            Answer::Refused { taken, reason } => {
                let refused = len - taken.min(len);
                (
                    len,
                    refused,
                    Some(Refusal {
                        records: refused,
                        reason,
                    }),
                )
            }
            Answer::TooLarge { reason } if len == 1 => (1, 1, Some(Refusal { records: 1, reason })),
            Answer::TooLarge { .. } => {
                // Halves, each sent (and split again) on its own.
                self.parts.pop();
                let middle = part.start + len / 2;
                self.parts.push(middle..part.end);
                self.parts.push(part.start..middle);
                return Ok(None);
            }
            Answer::Retry { after, reason } => {
                return Err(SendError {
                    after,
                    reason,
                    settled: self.settled,
                });
            }
        };
        self.parts.pop();
        self.settle(settled, rejected);
        Ok(refusal)
    }

    fn settle(&mut self, records: usize, rejected: usize) {
        self.settled.records += records;
        self.settled.rejected += rejected;
    }
}

/// What a response means for the records of its request.
fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &str,
    api: &HttpApi,
    records: usize,
) -> Answer {
    let reason = || format!("{status}: {}", body.chars().take(300).collect::<String>());
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        return Answer::TooLarge { reason: reason() };
    }
    match api {
        HttpApi::SplunkHec { .. } => hec_answer(status, retry_after, body, records),
        HttpApi::ElasticBulk { .. } if status.is_success() => elastic_items(body),
        _ => by_status(status, retry_after, reason()),
    }
}

/// HTTP's meaning, for APIs (and answers) without more to say.
fn by_status(status: StatusCode, retry_after: Option<Duration>, reason: String) -> Answer {
    match status {
        s if s.is_success() => Answer::Taken { rejected: 0 },
        // Busy, overloaded, or credentials being fixed: wait and resend.
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::REQUEST_TIMEOUT
        | StatusCode::UNAUTHORIZED
        | StatusCode::FORBIDDEN => Answer::Retry {
            after: retry_after,
            reason,
        },
        s if s.is_server_error() => Answer::Retry {
            after: retry_after,
            reason,
        },
        // The API will never take these records.
        _ => Answer::Refused { taken: 0, reason },
    }
}

/// HEC answers `{"text","code"}`, with `ackId` when the token uses indexer
/// acknowledgement and `invalid-event-number` (from 0) when one event of
/// the batch was refused, those before it being indexed.
fn hec_answer(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &str,
    records: usize,
) -> Answer {
    #[derive(Default, serde::Deserialize)]
    struct Reply {
        code: Option<u64>,
        #[serde(rename = "ackId")]
        ack_id: Option<u64>,
        #[serde(rename = "invalid-event-number")]
        invalid_event: Option<usize>,
    }
    // A proxy's page in front of HEC says what its status says.
    let reply: Reply = serde_json::from_str(body).unwrap_or_default();
    let reason = format!("{status}: {}", body.chars().take(300).collect::<String>());
    if status.is_success() {
        return match reply.ack_id {
            Some(ack_id) => Answer::Pending { ack_id },
            None => Answer::Taken { rejected: 0 },
        };
    }
    let retry = Answer::Retry {
        after: retry_after,
        reason: reason.clone(),
    };
    // Splunk's documented HEC status codes.
    match reply.code {
        // Token disabled (1), missing (2), not authorized (3), invalid (4),
        // query-string auth off (16): credentials can be fixed.
        Some(1..=4 | 16) => retry,
        // Internal error (8), busy (9), unhealthy: queues full or the
        // acknowledgement service away (18-20).
        Some(8 | 9 | 18..=20) => retry,
        // The channel is missing (10) or unknown (11), acknowledgement off
        // (14): the channel is always sent, so the server lost track of it
        // (a restart); the next request makes it anew.
        Some(10 | 11 | 14) => retry,
        // Incorrect index (7): every event names the same one, so none of
        // the rest would pass.
        Some(7) => Answer::Refused {
            taken: reply.invalid_event.unwrap_or(0).min(records),
            reason,
        },
        // Invalid data format (6), event field missing (12) or blank (13),
        // indexed fields (15): that event only.
        Some(6 | 12 | 13 | 15) => match reply.invalid_event {
            Some(taken) if taken < records => Answer::RefusedOne { taken, reason },
            _ => Answer::Refused { taken: 0, reason },
        },
        _ => by_status(status, retry_after, reason),
    }
}

/// Whether HEC's `/services/collector/ack` answer (`{"acks":{"7":true}}`)
/// says `ack_id` is indexed.
fn acknowledged(body: &str, ack_id: u64) -> Result<bool, String> {
    #[derive(serde::Deserialize)]
    struct Acks {
        acks: std::collections::HashMap<String, bool>,
    }
    let acks: Acks = serde_json::from_str(body)
        .map_err(|e| format!("unreadable acknowledgement {body:?}: {e}"))?;
    Ok(acks.acks.get(&ack_id.to_string()).copied().unwrap_or(false))
}

/// `_bulk` answers 200 with a status per item: 201 created, 409 already
/// there (a resend), 429 and 5xx retryable (the whole batch is resent; the
/// ids make that safe), anything else a permanent rejection of that item.
fn elastic_items(body: &str) -> Answer {
    #[derive(serde::Deserialize)]
    struct Bulk {
        errors: bool,
        #[serde(default)]
        items: Vec<serde_json::Map<String, serde_json::Value>>,
    }
    let bulk: Bulk = match serde_json::from_str(body) {
        Ok(bulk) => bulk,
        Err(e) => return Answer::retry(format!("unreadable _bulk response: {e}")),
    };
    if !bulk.errors {
        return Answer::Taken { rejected: 0 };
    }
    let statuses: Vec<u64> = bulk
        .items
        .iter()
        .filter_map(|item| item.values().next()?.get("status")?.as_u64())
        .collect();
    if statuses.iter().any(|&s| s == 429 || s >= 500) {
        return Answer::retry("some _bulk items were refused for now (429/5xx)");
    }
    Answer::Taken {
        rejected: statuses
            .iter()
            .filter(|&&s| !(200..300).contains(&s) && s != 409)
            .count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::sinks::Severity;

    fn meta() -> RecordMeta<'static> {
        RecordMeta {
            kind: "flow",
            time: "2026-11-24T08:00:00.250000000Z",
            unix_nanos: 1_795_507_200_250_000_000,
            node: "node-a",
            severity: Severity::Warning,
            seq: Some(7),
        }
    }

    fn splunk(index: Option<&str>) -> HttpApi {
        HttpApi::SplunkHec {
            url: "http://h/services/collector/event".into(),
            token_file: "/t".into(),
            index: index.map(Into::into),
        }
    }

    fn azure() -> HttpApi {
        HttpApi::AzureLogsIngestion {
            endpoint: "https://dce.ingest.monitor.azure.com/".into(),
            dcr_immutable_id: "dcr-0123".into(),
            stream: "Custom-Tollgate_CL".into(),
            auth: AzureAuth::TokenFile("/t".into()),
        }
    }

    fn elastic(add_timestamp: bool) -> HttpApi {
        HttpApi::ElasticBulk {
            url: "http://es:9200".into(),
            index: "logs-tollgate-default".into(),
            auth: ElasticAuth::None,
            add_timestamp,
        }
    }

    #[test]
    fn splunk_events_carry_time_host_and_sourcetype() {
        let api = splunk(None);
        let mut one = Vec::new();
        api.encode(&meta(), br#"{"a":1}"#, true, "i", &mut one);
        let mut two = Vec::new();
        api.encode(&meta(), b"CEF:0|a\"b", false, "i", &mut two);
        let body = String::from_utf8(api.body(&[one, two])).unwrap();
        assert_eq!(
            body,
            "{\"time\":1795507200.250000,\"host\":\"node-a\",\"source\":\"tollgate\",\"sourcetype\":\"tollgate:flow\",\"event\":{\"a\":1}}\n\
             {\"time\":1795507200.250000,\"host\":\"node-a\",\"source\":\"tollgate\",\"sourcetype\":\"tollgate:flow\",\"event\":\"CEF:0|a\\\"b\"}\n"
        );
    }

    #[test]
    fn splunk_events_name_the_index_when_one_is_set() {
        let mut out = Vec::new();
        splunk(Some("egress")).encode(&meta(), br#"{"a":1}"#, true, "i", &mut out);
        let event: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(event["index"], "egress");
        assert_eq!(event["event"], serde_json::json!({"a": 1}));
    }

    #[test]
    fn azure_batches_are_json_arrays_posted_to_the_stream() {
        let api = azure();
        let records: Vec<Vec<u8>> = [br#"{"a":1}"#.to_vec(), br#"{"b":2}"#.to_vec()].into();
        assert_eq!(api.body(&records), br#"[{"a":1},{"b":2}]"#);
        assert_eq!(
            api.url(),
            "https://dce.ingest.monitor.azure.com/dataCollectionRules/dcr-0123/streams/Custom-Tollgate_CL?api-version=2023-01-01"
        );
    }

    #[test]
    fn azure_batches_are_cut_below_the_size_limit() {
        // 1,000 records of 2,000 bytes: about 2 MB, twice the limit.
        let records = vec![vec![b'x'; 2000]; 1000];
        let parts = azure().parts(&records);
        assert!(parts.len() >= 3, "{parts:?}");
        let mut next = 0;
        for part in &parts {
            assert_eq!(part.start, next, "consecutive, in order");
            next = part.end;
            let body = azure().body(&records[part.clone()]);
            assert!(body.len() <= AZURE_BODY_BYTES && body.len() < AZURE_MAX_BODY_BYTES);
        }
        assert_eq!(next, records.len());
        // A record over the limit goes alone, between the others.
        let records = vec![vec![b'x'; 10], vec![b'y'; 2_000_000], vec![b'z'; 10]];
        assert_eq!(
            cut_by_body_bytes(&records, AZURE_BODY_BYTES),
            [0..1, 1..2, 2..3]
        );
        assert_eq!(splunk(None).parts(&records), whole(3), "only Azure cuts");
        assert!(cut_by_body_bytes(&[], AZURE_BODY_BYTES).is_empty());
    }

    #[test]
    fn elastic_documents_are_created_with_ids() {
        let api = elastic(false);
        let mut out = Vec::new();
        api.encode(&meta(), br#"{"a":1}"#, true, "1700", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"create\":{\"_index\":\"logs-tollgate-default\",\"_id\":\"node-a-1700-7\"}}\n{\"a\":1}\n"
        );
        let created = r#"{"errors":true,"items":[{"create":{"status":201}},{"create":{"status":409}},{"create":{"status":400}}]}"#;
        assert_eq!(elastic_items(created), Answer::Taken { rejected: 1 });
        let busy =
            r#"{"errors":true,"items":[{"create":{"status":201}},{"create":{"status":429}}]}"#;
        assert!(matches!(elastic_items(busy), Answer::Retry { .. }));
    }

    #[test]
    fn elastic_documents_without_a_timestamp_get_the_records_time_first() {
        let mut out = Vec::new();
        elastic(true).encode(&meta(), br#"{"class_uid":4001}"#, true, "1700", &mut out);
        let document = String::from_utf8(out).unwrap();
        let document = document.lines().nth(1).unwrap();
        assert_eq!(
            document,
            r#"{"@timestamp":"2026-11-24T08:00:00.250000000Z","class_uid":4001}"#
        );
        let mut out = Vec::new();
        elastic(true).encode(&meta(), b"{}", true, "1700", &mut out);
        assert!(out.ends_with(b"\n{\"@timestamp\":\"2026-11-24T08:00:00.250000000Z\"}\n"));
    }

    #[test]
    fn responses_are_retried_or_rejected() {
        let classify = |status: u16, after| {
            classify(
                StatusCode::from_u16(status).unwrap(),
                after,
                "",
                &azure(),
                3,
            )
        };
        assert_eq!(classify(204, None), Answer::Taken { rejected: 0 });
        assert!(matches!(
            classify(429, Some(Duration::from_secs(7))),
            Answer::Retry { after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        assert!(matches!(
            classify(503, None),
            Answer::Retry { after: None, .. }
        ));
        assert!(matches!(classify(401, None), Answer::Retry { .. }));
        assert!(matches!(
            classify(400, None),
            Answer::Refused { taken: 0, .. }
        ));
        assert!(matches!(classify(413, None), Answer::TooLarge { .. }));
    }

    #[test]
    fn hec_answers_by_their_code() {
        let hec = |status: u16, body: &str| {
            classify(
                StatusCode::from_u16(status).unwrap(),
                None,
                body,
                &splunk(None),
                5,
            )
        };
        assert_eq!(
            hec(200, r#"{"text":"Success","code":0}"#),
            Answer::Taken { rejected: 0 }
        );
        assert_eq!(
            hec(200, r#"{"text":"Success","code":0,"ackId":12}"#),
            Answer::Pending { ack_id: 12 }
        );
        for (status, code) in [
            (403, 1),
            (401, 2),
            (401, 3),
            (403, 4),
            (500, 8),
            (503, 9),
            (400, 10),
            (400, 11),
            (400, 14),
            (400, 16),
            (503, 18),
        ] {
            let answer = hec(status, &format!(r#"{{"text":"t","code":{code}}}"#));
            assert!(
                matches!(answer, Answer::Retry { .. }),
                "code {code}: {answer:?}"
            );
        }
        assert!(matches!(
            hec(400, r#"{"text":"Incorrect index","code":7}"#),
            Answer::Refused { taken: 0, .. }
        ));
        assert!(matches!(
            hec(
                400,
                r#"{"text":"Invalid data format","code":6,"invalid-event-number":2}"#
            ),
            Answer::RefusedOne { taken: 2, .. }
        ));
        assert!(matches!(
            hec(400, r#"{"text":"Invalid data format","code":6}"#),
            Answer::Refused { taken: 0, .. }
        ));
        assert!(matches!(
            hec(
                400,
                r#"{"text":"Incorrect index","code":7,"invalid-event-number":3}"#
            ),
            Answer::Refused { taken: 3, .. }
        ));
        // A proxy's page: its status says it all.
        assert!(matches!(hec(502, "<html>"), Answer::Retry { .. }));
        assert!(matches!(hec(413, "<html>"), Answer::TooLarge { .. }));
    }

    #[test]
    fn hec_acknowledgements_are_read_per_id() {
        assert_eq!(
            acknowledged(r#"{"acks":{"3":true,"4":false}}"#, 3),
            Ok(true)
        );
        assert_eq!(
            acknowledged(r#"{"acks":{"3":true,"4":false}}"#, 4),
            Ok(false)
        );
        assert_eq!(acknowledged(r#"{"acks":{}}"#, 5), Ok(false));
        assert!(acknowledged(r#"{"text":"ACK is disabled","code":14}"#, 5).is_err());
        assert_eq!(
            HttpApi::hec_ack_url("https://splunk:8088/services/collector/event?x=1").unwrap(),
            "https://splunk:8088/services/collector/ack"
        );
    }

    /// HEC's acknowledgement endpoint on a loopback port: id 7 is indexed
    /// once asked about twice, any other never.
    #[tokio::test]
    async fn an_acknowledgement_is_awaited_and_one_that_never_comes_means_sending_again() {
        use axum::{http::HeaderMap, routing::post};
        let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ack = {
            let asked = asked.clone();
            post(move |headers: HeaderMap, body: String| async move {
                assert!(headers.contains_key("x-splunk-request-channel"));
                assert_eq!(headers["authorization"], "Splunk secret");
                let query: serde_json::Value = serde_json::from_str(&body).unwrap();
                let id = query["acks"][0].as_u64().unwrap();
                let n = asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                axum::Json(serde_json::json!({"acks": {id.to_string(): id == 7 && n >= 1}}))
            })
        };
        // As main does; another test may have done it already.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let app = axum::Router::new().route("/services/collector/ack", ack);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let token_file = std::env::temp_dir().join(format!("hec-token-{}", std::process::id()));
        std::fs::write(&token_file, "secret\n").unwrap();
        let api = HttpApi::SplunkHec {
            url: format!("http://{addr}/services/collector/event"),
            token_file: token_file.clone(),
            index: None,
        };
        let mut sender = HttpSender::new("hec", api, false, None).unwrap();
        let taken = sender.acknowledged(7, Duration::from_secs(10)).await;
        let never = sender.acknowledged(8, Duration::from_millis(500)).await;
        std::fs::remove_file(token_file).unwrap();
        assert_eq!(taken, Answer::Taken { rejected: 0 });
        assert!(
            matches!(&never, Answer::Retry { reason, .. } if reason.contains("did not acknowledge id 8")),
            "{never:?}"
        );
    }

    /// A batch of `len` in one part.
    fn whole(len: usize) -> Vec<Range<usize>> {
        std::iter::once(0..len).collect()
    }

    /// Answers `answers` in turn to the parts `Progress` asks for; what
    /// was asked, and the outcome.
    fn run(
        parts: Vec<Range<usize>>,
        answers: Vec<Answer>,
    ) -> (Vec<Range<usize>>, Result<usize, SendError>) {
        let mut progress = Progress::new(parts);
        let mut asked = Vec::new();
        let mut answers = answers.into_iter();
        while let Some(part) = progress.next_part() {
            asked.push(part.clone());
            let answer = answers.next().expect("an answer for every part");
            if let Err(e) = progress.answered(part, answer) {
                return (asked, Err(e));
            }
        }
        (asked, Ok(progress.settled.rejected))
    }

    fn too_large() -> Answer {
        Answer::TooLarge {
            reason: "413".into(),
        }
    }

    const TAKEN: Answer = Answer::Taken { rejected: 0 };

    #[test]
    fn a_batch_too_large_is_sent_in_halves_and_a_record_too_large_alone_is_rejected() {
        let (asked, outcome) = run(
            vec![0..4, 4..6],
            vec![too_large(), TAKEN, too_large(), too_large(), TAKEN, TAKEN],
        );
        assert_eq!(asked, [0..4, 0..2, 2..4, 2..3, 3..4, 4..6]);
        assert_eq!(outcome, Ok(1), "record 2 alone was too large");
    }

    #[test]
    fn after_an_invalid_event_the_rest_is_sent_again() {
        let refused = |taken| Answer::RefusedOne {
            taken,
            reason: "invalid-event-number".into(),
        };
        let (asked, outcome) = run(whole(10), vec![refused(3), refused(0), TAKEN]);
        assert_eq!(asked, [0..10, 4..10, 5..10]);
        assert_eq!(outcome, Ok(2));
        // The last one refused: nothing left to send.
        let (asked, outcome) = run(whole(3), vec![refused(2)]);
        assert_eq!((asked, outcome), (whole(3), Ok(1)));
    }

    #[test]
    fn a_failure_after_some_parts_keeps_what_they_settled() {
        let (_, outcome) = run(
            vec![0..4, 4..8],
            vec![
                Answer::Taken { rejected: 1 },
                Answer::Retry {
                    after: Some(Duration::from_secs(1)),
                    reason: "busy".into(),
                },
            ],
        );
        assert_eq!(
            outcome,
            Err(SendError {
                after: Some(Duration::from_secs(1)),
                reason: "busy".into(),
                settled: Settled {
                    records: 4,
                    rejected: 1
                },
            })
        );
        let (_, outcome) = run(
            whole(6),
            vec![Answer::Refused {
                taken: 2,
                reason: "Incorrect index".into(),
            }],
        );
        assert_eq!(outcome, Ok(4));
    }
}
