//! HTTP batch sinks: Splunk HEC, the Azure Monitor Logs Ingestion API
//! (DCR-based) and Elasticsearch `_bulk`. Each record is encoded once into
//! the API's per-event form (and spooled so); a batch is those joined in the
//! API's body shape, gzip-compressed.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use flate2::{Compression, write::GzEncoder};
use reqwest::{StatusCode, header};

use super::{RecordMeta, SendError};

/// Which API, and how to authenticate to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpApi {
    /// `url`: the HEC event endpoint (`https://splunk:8088/services/collector/event`).
    SplunkHec { url: String, token_file: PathBuf },
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
    ElasticBulk {
        url: String,
        index: String,
        auth: ElasticAuth,
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
            Self::SplunkHec { .. } => {
                let seconds = meta.unix_seconds();
                let _ = write!(
                    out,
                    "{{\"time\":{seconds:.6},\"host\":{},\"source\":\"tollgate\",\"sourcetype\":\"tollgate:{}\",\"event\":",
                    serde_json::Value::from(meta.node),
                    meta.kind
                );
                push_json_or_string(payload, json, out);
                out.push(b'}');
            }
            Self::AzureLogsIngestion { .. } => push_json_or_string(payload, json, out),
            Self::ElasticBulk { index, .. } => {
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
                        serde_json::Value::from(format!("{}-{instance}-{seq}", meta.node))
                    );
                }
                out.extend_from_slice(b"}}\n");
                push_json_or_string(payload, json, out);
                out.push(b'\n');
            }
        }
    }

    fn body(&self, records: &[Vec<u8>]) -> Vec<u8> {
        let size = records.iter().map(|r| r.len() + 1).sum::<usize>() + 2;
        let mut body = Vec::with_capacity(size);
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
}

fn push_json_or_string(payload: &[u8], json: bool, out: &mut Vec<u8>) {
    if json {
        out.extend_from_slice(payload);
    } else {
        let text = String::from_utf8_lossy(payload);
        let _ = serde_json::to_writer(&mut *out, &text);
    }
}

pub struct HttpSender {
    api: HttpApi,
    client: reqwest::Client,
    gzip: bool,
    cached_token: Option<(String, Instant)>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl HttpSender {
    /// `ca_file`: extra PEM roots (a private CA), added to the system's.
    pub fn new(api: HttpApi, gzip: bool, ca_file: Option<&Path>) -> Result<Self, String> {
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
        Ok(Self {
            api,
            client,
            gzip,
            cached_token: None,
        })
    }

    /// Posts the batch. `Ok(rejected)`: delivered, except `rejected` records
    /// the API refused for good.
    pub async fn send(&mut self, records: &[Vec<u8>]) -> Result<usize, SendError> {
        let body = self.api.body(records);
        let mut request = self.client.post(self.api.url());
        request = match &self.api {
            HttpApi::SplunkHec { token_file, .. } => request
                .header(
                    header::AUTHORIZATION,
                    format!("Splunk {}", read_secret(token_file)?),
                )
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
                .map_err(|e| SendError::retry(format!("compressing: {e}")))?;
            request = request
                .header(header::CONTENT_ENCODING, "gzip")
                .body(compressed);
        } else {
            request = request.body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| SendError::retry(e.to_string()))?;
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

    async fn azure_token(&mut self, auth: &AzureAuth) -> Result<String, SendError> {
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
                    .map_err(|e| SendError::retry(format!("token request: {e}")))?;
                if !response.status().is_success() {
                    return Err(SendError::retry(format!(
                        "token request: {}",
                        response.status()
                    )));
                }
                #[derive(serde::Deserialize)]
                struct TokenResponse {
                    access_token: String,
                    expires_in: u64,
                }
                let token: TokenResponse = response
                    .json()
                    .await
                    .map_err(|e| SendError::retry(format!("token response: {e}")))?;
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
fn read_secret(path: &Path) -> Result<String, SendError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end().to_owned())
        .map_err(|e| SendError::retry(format!("{}: {e}", path.display())))
}

/// What a response means for the batch.
fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &str,
    api: &HttpApi,
    records: usize,
) -> Result<usize, SendError> {
    if status.is_success() {
        return match api {
            HttpApi::ElasticBulk { .. } => elastic_items(body),
            _ => Ok(0),
        };
    }
    let reason = format!("{status}: {}", body.chars().take(300).collect::<String>());
    match status {
        // Busy, overloaded, or credentials being fixed: wait and resend.
        StatusCode::TOO_MANY_REQUESTS
        | StatusCode::REQUEST_TIMEOUT
        | StatusCode::UNAUTHORIZED
        | StatusCode::FORBIDDEN => Err(SendError::Retry {
            after: retry_after,
            reason,
        }),
        s if s.is_server_error() => Err(SendError::Retry {
            after: retry_after,
            reason,
        }),
        // The API will never take this batch.
        _ => Err(SendError::Rejected { records, reason }),
    }
}

/// `_bulk` answers 200 with a status per item: 201 created, 409 already
/// there (a resend), 429 and 5xx retryable (the whole batch is resent; the
/// ids make that safe), anything else a permanent rejection of that item.
fn elastic_items(body: &str) -> Result<usize, SendError> {
    #[derive(serde::Deserialize)]
    struct Bulk {
        errors: bool,
        #[serde(default)]
        items: Vec<serde_json::Map<String, serde_json::Value>>,
    }
    let bulk: Bulk = serde_json::from_str(body)
        .map_err(|e| SendError::retry(format!("unreadable _bulk response: {e}")))?;
    if !bulk.errors {
        return Ok(0);
    }
    let statuses: Vec<u64> = bulk
        .items
        .iter()
        .filter_map(|item| item.values().next()?.get("status")?.as_u64())
        .collect();
    if statuses.iter().any(|&s| s == 429 || s >= 500) {
        return Err(SendError::retry(
            "some _bulk items were refused for now (429/5xx)",
        ));
    }
    Ok(statuses
        .iter()
        .filter(|&&s| !(200..300).contains(&s) && s != 409)
        .count())
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

    #[test]
    fn splunk_events_carry_time_host_and_sourcetype() {
        let api = HttpApi::SplunkHec {
            url: "http://h/services/collector/event".into(),
            token_file: "/t".into(),
        };
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
    fn azure_batches_are_json_arrays_posted_to_the_stream() {
        let api = HttpApi::AzureLogsIngestion {
            endpoint: "https://dce.ingest.monitor.azure.com/".into(),
            dcr_immutable_id: "dcr-0123".into(),
            stream: "Custom-Tollgate_CL".into(),
            auth: AzureAuth::TokenFile("/t".into()),
        };
        let records: Vec<Vec<u8>> = [br#"{"a":1}"#.to_vec(), br#"{"b":2}"#.to_vec()].into();
        assert_eq!(api.body(&records), br#"[{"a":1},{"b":2}]"#);
        assert_eq!(
            api.url(),
            "https://dce.ingest.monitor.azure.com/dataCollectionRules/dcr-0123/streams/Custom-Tollgate_CL?api-version=2023-01-01"
        );
    }

    #[test]
    fn elastic_documents_are_created_with_ids() {
        let api = HttpApi::ElasticBulk {
            url: "http://es:9200".into(),
            index: "logs-tollgate-default".into(),
            auth: ElasticAuth::None,
        };
        let mut out = Vec::new();
        api.encode(&meta(), br#"{"a":1}"#, true, "1700", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"create\":{\"_index\":\"logs-tollgate-default\",\"_id\":\"node-a-1700-7\"}}\n{\"a\":1}\n"
        );
        let created = r#"{"errors":true,"items":[{"create":{"status":201}},{"create":{"status":409}},{"create":{"status":400}}]}"#;
        assert_eq!(elastic_items(created).unwrap(), 1);
        let busy =
            r#"{"errors":true,"items":[{"create":{"status":201}},{"create":{"status":429}}]}"#;
        assert!(matches!(elastic_items(busy), Err(SendError::Retry { .. })));
    }

    #[test]
    fn responses_are_retried_or_rejected() {
        let api = HttpApi::SplunkHec {
            url: "u".into(),
            token_file: "/t".into(),
        };
        let classify = |status: u16, after| {
            classify(StatusCode::from_u16(status).unwrap(), after, "", &api, 3)
        };
        assert_eq!(classify(200, None).unwrap(), 0);
        assert!(matches!(
            classify(429, Some(Duration::from_secs(7))),
            Err(SendError::Retry { after: Some(d), .. }) if d == Duration::from_secs(7)
        ));
        assert!(matches!(
            classify(503, None),
            Err(SendError::Retry { after: None, .. })
        ));
        assert!(matches!(classify(401, None), Err(SendError::Retry { .. })));
        assert!(matches!(
            classify(400, None),
            Err(SendError::Rejected { records: 3, .. })
        ));
        assert!(matches!(
            classify(413, None),
            Err(SendError::Rejected { .. })
        ));
    }
}
