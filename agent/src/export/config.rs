//! Sink configuration: the `export` section of the configuration file, and
//! `--sink` flags (one sink each, in the same YAML form). Checked whole at
//! start; every problem names its field.

use std::{net::IpAddr, path::PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use super::{
    format::Format,
    sinks::{
        http::{AzureAuth, ElasticAuth, HttpApi},
        syslog::{SyslogAddress, SyslogFraming, SyslogProtocol},
    },
};

/// rsyslog's default `maxMessageSize`, which Sentinel's CEF forwarder and
/// most receivers keep: larger datagrams would be cut there anyway.
const DEFAULT_UDP_MESSAGE_BYTES: usize = 8192;
/// RFC 5426's least every IPv4 receiver must take, to the largest UDP
/// payload over IPv4.
const UDP_MESSAGE_BYTES: std::ops::RangeInclusive<usize> = 480..=65507;

/// `export:` in the configuration file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExportSpec {
    #[serde(default)]
    pub sinks: Vec<SinkSpec>,
}

/// One sink as written: every field of every type, checked by `validate`
/// for the sink's `type`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SinkSpec {
    pub name: Option<String>,
    #[serde(rename = "type")]
    pub kind: Option<SinkType>,
    pub format: Option<Format>,
    pub filter: Option<FilterSpec>,
    /// Bytes of disk the sink may hold while its receiver is away.
    pub spool_bytes: Option<u64>,
    pub batch_records: Option<usize>,
    // file
    pub path: Option<PathBuf>,
    pub max_file_bytes: Option<u64>,
    pub max_files: Option<u32>,
    // syslog
    pub address: Option<String>,
    pub facility: Option<u8>,
    pub framing: Option<SyslogFraming>,
    pub max_message_bytes: Option<usize>,
    // syslog tls, http
    pub ca_file: Option<PathBuf>,
    // http
    pub url: Option<String>,
    pub token_file: Option<PathBuf>,
    pub gzip: Option<bool>,
    pub endpoint: Option<String>,
    pub dcr_immutable_id: Option<String>,
    pub stream: Option<String>,
    pub workload_identity: Option<bool>,
    pub index: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum SinkType {
    Stdout,
    File,
    Syslog,
    SplunkHec,
    AzureLogsIngestion,
    ElasticBulk,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FilterSpec {
    #[serde(default)]
    pub verdicts: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Destination prefixes (or addresses).
    #[serde(default)]
    pub destinations: Vec<String>,
}

/// A checked sink.
#[derive(Clone, Debug, PartialEq)]
pub struct SinkConfig {
    pub name: String,
    pub format: Format,
    pub filter: SinkFilter,
    /// 0 for stdout: it has no spool.
    pub spool_bytes: u64,
    pub batch_records: usize,
    pub target: Target,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Stdout,
    File {
        path: PathBuf,
        max_file_bytes: u64,
        max_files: u32,
    },
    Syslog {
        address: SyslogAddress,
        facility: u8,
        /// TCP and TLS.
        framing: SyslogFraming,
        /// UDP.
        max_message_bytes: Option<usize>,
        ca_file: Option<PathBuf>,
    },
    Http {
        api: HttpApi,
        gzip: bool,
        ca_file: Option<PathBuf>,
    },
}

/// Which records a sink takes. Loss markers always pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SinkFilter {
    pub verdicts: Vec<String>,
    pub namespaces: Vec<String>,
    pub destinations: Vec<IpNet>,
}

impl SinkFilter {
    /// For a flow (`verdict` set) or DNS record (`verdict` None).
    pub fn passes(
        &self,
        verdict: Option<&str>,
        namespace: Option<&str>,
        destination: IpAddr,
    ) -> bool {
        (self.verdicts.is_empty() || verdict.is_none_or(|v| self.verdicts.iter().any(|x| x == v)))
            && (self.namespaces.is_empty()
                || namespace.is_some_and(|n| self.namespaces.iter().any(|x| x == n)))
            && (self.destinations.is_empty()
                || self
                    .destinations
                    .iter()
                    .any(|net| net.contains(&destination)))
    }
}

const DEFAULT_SPOOL_BYTES: u64 = 256 << 20;
const DEFAULT_BATCH_RECORDS: usize = 500;
/// What Azure's Logs Ingestion API takes per call (1 MB) leaves room for
/// about this many records of the usual size; HEC and _bulk take more.
const AZURE_BATCH_RECORDS: usize = 1000;

/// Checks every sink; all problems at once, each `sinks[i].field: why`.
pub fn validate(specs: &[SinkSpec]) -> Result<Vec<SinkConfig>, Vec<String>> {
    let mut found = Vec::new();
    let mut sinks = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (index, spec) in specs.iter().enumerate() {
        let mut problems = Problems {
            index,
            found: &mut found,
        };
        let Some(sink) = validate_one(spec, &mut problems) else {
            continue;
        };
        if !names.insert(sink.name.clone()) {
            problems.add(
                "name",
                format!(
                    "{:?} is used twice (each sink needs its own name: it names its spool)",
                    sink.name
                ),
            );
        }
        sinks.push(sink);
    }
    if found.is_empty() {
        Ok(sinks)
    } else {
        Err(found)
    }
}

/// The problems of one sink, each named by its field.
struct Problems<'a> {
    index: usize,
    found: &'a mut Vec<String>,
}

impl Problems<'_> {
    fn add(&mut self, field: &str, why: impl std::fmt::Display) {
        self.found
            .push(format!("sinks[{}].{field}: {why}", self.index));
    }

    /// The value of a field the sink's type needs.
    fn required<T: Clone>(&mut self, value: &Option<T>, field: &str, kind: SinkType) -> Option<T> {
        if value.is_none() {
            self.add(field, format!("is required for type {kind:?}"));
        }
        value.clone()
    }
}

fn validate_one(spec: &SinkSpec, problems: &mut Problems) -> Option<SinkConfig> {
    let Some(kind) = spec.kind else {
        problems.add(
            "type",
            "is required: stdout, file, syslog, splunkHec, azureLogsIngestion or elasticBulk",
        );
        return None;
    };
    for field in inapplicable_fields(spec, kind) {
        problems.add(field, format!("does not apply to type {kind:?}"));
    }
    let name = spec
        .name
        .clone()
        .unwrap_or_else(|| default_name(kind).into());
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        problems.add(
            "name",
            format!(
                "{name:?}: use lowercase letters, digits and '-' (it names the spool directory)"
            ),
        );
    }
    let format = spec.format.unwrap_or(match kind {
        SinkType::Syslog => Format::Cef,
        SinkType::ElasticBulk => Format::Ecs,
        _ => Format::Json,
    });
    match (kind, format) {
        (SinkType::AzureLogsIngestion, Format::Cef) => problems.add(
            "format",
            format!("{kind:?} takes JSON documents: json, ocsf or ecs"),
        ),
        // A `logs-*` data stream maps fields as they first come: the native
        // JSON's label keys (`app`, `app.kubernetes.io/name`) make a field
        // both a value and an object, and such documents are refused.
        (SinkType::ElasticBulk, Format::Cef | Format::Json) => problems.add(
            "format",
            format!(
                "{kind:?} takes ecs or ocsf, which index cleanly into a logs-* data stream \
                 (json's dotted label keys conflict there)"
            ),
        ),
        _ => {}
    }
    let filter = spec
        .filter
        .as_ref()
        .map(|filter| validate_filter(filter, problems))
        .unwrap_or_default();
    if spec.batch_records == Some(0) {
        problems.add("batchRecords", "must be at least 1");
    }
    let target = validate_target(spec, kind, format, problems)?;
    Some(SinkConfig {
        name,
        format,
        filter,
        spool_bytes: match kind {
            SinkType::Stdout => 0,
            _ => spec.spool_bytes.unwrap_or(DEFAULT_SPOOL_BYTES),
        },
        batch_records: spec.batch_records.unwrap_or(match kind {
            SinkType::AzureLogsIngestion => AZURE_BATCH_RECORDS,
            _ => DEFAULT_BATCH_RECORDS,
        }),
        target,
    })
}

fn default_name(kind: SinkType) -> &'static str {
    match kind {
        SinkType::Stdout => "stdout",
        SinkType::File => "file",
        SinkType::Syslog => "syslog",
        SinkType::SplunkHec => "splunk",
        SinkType::AzureLogsIngestion => "azure",
        SinkType::ElasticBulk => "elastic",
    }
}

fn validate_target(
    spec: &SinkSpec,
    kind: SinkType,
    format: Format,
    problems: &mut Problems,
) -> Option<Target> {
    match kind {
        SinkType::Stdout => Some(Target::Stdout),
        SinkType::File => {
            let path = problems.required(&spec.path, "path", kind)?;
            Some(Target::File {
                path,
                max_file_bytes: spec.max_file_bytes.unwrap_or(100 << 20),
                max_files: spec.max_files.unwrap_or(5),
            })
        }
        SinkType::Syslog => {
            let address = problems.required(&spec.address, "address", kind)?;
            let address = address
                .parse::<SyslogAddress>()
                .map_err(|why| problems.add("address", why))
                .ok()?;
            if address.protocol == SyslogProtocol::Tls {
                problems.required(&spec.ca_file, "caFile", kind);
            }
            let udp = address.protocol == SyslogProtocol::Udp;
            if udp && spec.framing.is_some() {
                problems.add("framing", "applies to tcp:// and tls:// only");
            }
            if !udp && spec.max_message_bytes.is_some() {
                problems.add(
                    "maxMessageBytes",
                    "applies to udp:// only (streams carry messages whole)",
                );
            }
            let max_message_bytes = udp.then(|| {
                let max = spec.max_message_bytes.unwrap_or(DEFAULT_UDP_MESSAGE_BYTES);
                if !UDP_MESSAGE_BYTES.contains(&max) {
                    problems.add(
                        "maxMessageBytes",
                        format_args!(
                            "{max} is outside {}..={} (RFC 5426's least, a UDP datagram's most)",
                            UDP_MESSAGE_BYTES.start(),
                            UDP_MESSAGE_BYTES.end()
                        ),
                    );
                }
                max
            });
            Some(Target::Syslog {
                address,
                facility: spec.facility.unwrap_or(16),
                framing: spec.framing.unwrap_or_default(),
                max_message_bytes,
                ca_file: spec.ca_file.clone(),
            })
        }
        SinkType::SplunkHec => {
            let url = problems.required(&spec.url, "url", kind);
            let token_file = problems.required(&spec.token_file, "tokenFile", kind);
            if let Some(Err(why)) = spec.index.as_deref().map(check_splunk_index) {
                problems.add("index", why);
            }
            Some(http(
                spec,
                HttpApi::SplunkHec {
                    url: url?,
                    token_file: token_file?,
                    index: spec.index.clone(),
                },
            ))
        }
        SinkType::AzureLogsIngestion => {
            let auth = match (&spec.token_file, spec.workload_identity.unwrap_or(false)) {
                (Some(file), false) => Some(AzureAuth::TokenFile(file.clone())),
                (None, true) => workload_identity(problems),
                (Some(_), true) => {
                    problems.add(
                        "workloadIdentity",
                        "give tokenFile or workloadIdentity, not both",
                    );
                    None
                }
                (None, false) => {
                    problems.add(
                        "tokenFile",
                        format!("is required for type {kind:?} (or workloadIdentity: true)"),
                    );
                    None
                }
            };
            let endpoint = problems.required(&spec.endpoint, "endpoint", kind);
            let dcr_immutable_id =
                problems.required(&spec.dcr_immutable_id, "dcrImmutableId", kind);
            let stream = problems.required(&spec.stream, "stream", kind);
            Some(http(
                spec,
                HttpApi::AzureLogsIngestion {
                    endpoint: endpoint?,
                    dcr_immutable_id: dcr_immutable_id?,
                    stream: stream?,
                    auth: auth?,
                },
            ))
        }
        SinkType::ElasticBulk => {
            let auth = match (&spec.api_key_file, &spec.username, &spec.password_file) {
                (Some(file), None, None) => Some(ElasticAuth::ApiKeyFile(file.clone())),
                (None, Some(username), Some(password_file)) => Some(ElasticAuth::Basic {
                    username: username.clone(),
                    password_file: password_file.clone(),
                }),
                (None, None, None) => Some(ElasticAuth::None),
                _ => {
                    problems.add(
                        "apiKeyFile",
                        "give apiKeyFile, or username and passwordFile",
                    );
                    None
                }
            };
            let url = problems.required(&spec.url, "url", kind);
            Some(http(
                spec,
                HttpApi::ElasticBulk {
                    url: url?,
                    index: spec
                        .index
                        .clone()
                        .unwrap_or_else(|| "logs-tollgate-default".into()),
                    auth: auth?,
                    // ECS documents carry their own.
                    add_timestamp: format != Format::Ecs,
                },
            ))
        }
    }
}

/// Splunk's rule for index names: lowercase letters, digits, `_` and `-`,
/// not starting with `_` or `-` (those are Splunk's own), and not
/// containing `kvstore`.
fn check_splunk_index(index: &str) -> Result<(), String> {
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-';
    if index.is_empty()
        || !index.bytes().all(allowed)
        || index.starts_with(['_', '-'])
        || index.contains("kvstore")
    {
        return Err(format!(
            "{index:?}: Splunk index names are lowercase letters, digits, '_' and '-', \
             not starting with '_' or '-', without \"kvstore\""
        ));
    }
    Ok(())
}

fn http(spec: &SinkSpec, api: HttpApi) -> Target {
    Target::Http {
        api,
        gzip: spec.gzip.unwrap_or(true),
        ca_file: spec.ca_file.clone(),
    }
}

/// AKS workload identity's environment, as its webhook injects it.
fn workload_identity(problems: &mut Problems) -> Option<AzureAuth> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (
        var("AZURE_CLIENT_ID"),
        var("AZURE_TENANT_ID"),
        var("AZURE_FEDERATED_TOKEN_FILE"),
    ) {
        (Some(client_id), Some(tenant_id), Some(file)) => Some(AzureAuth::WorkloadIdentity {
            client_id,
            tenant_id,
            federated_token_file: file.into(),
            authority_host: var("AZURE_AUTHORITY_HOST")
                .unwrap_or_else(|| "https://login.microsoftonline.com/".into()),
        }),
        _ => {
            problems.add(
                "workloadIdentity",
                "AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_FEDERATED_TOKEN_FILE are not all set \
                 (is the pod labelled azure.workload.identity/use: \"true\"?)",
            );
            None
        }
    }
}

fn validate_filter(spec: &FilterSpec, problems: &mut Problems) -> SinkFilter {
    for (i, verdict) in spec.verdicts.iter().enumerate() {
        if !["allowed", "denied", "audit"].contains(&verdict.as_str()) {
            problems.add(
                &format!("filter.verdicts[{i}]"),
                format!("{verdict:?} is not allowed, denied or audit"),
            );
        }
    }
    let destinations = spec
        .destinations
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    problems.add(
                        &format!("filter.destinations[{i}]"),
                        format!("{text:?} is not a prefix or address"),
                    )
                })
                .ok()
        })
        .collect();
    SinkFilter {
        verdicts: spec.verdicts.clone(),
        namespaces: spec.namespaces.clone(),
        destinations,
    }
}

/// The fields given that the sink's type does not use.
fn inapplicable_fields(spec: &SinkSpec, kind: SinkType) -> Vec<&'static str> {
    let given = [
        ("path", spec.path.is_some(), &[SinkType::File][..]),
        (
            "maxFileBytes",
            spec.max_file_bytes.is_some(),
            &[SinkType::File],
        ),
        ("maxFiles", spec.max_files.is_some(), &[SinkType::File]),
        ("address", spec.address.is_some(), &[SinkType::Syslog]),
        ("facility", spec.facility.is_some(), &[SinkType::Syslog]),
        ("framing", spec.framing.is_some(), &[SinkType::Syslog]),
        (
            "maxMessageBytes",
            spec.max_message_bytes.is_some(),
            &[SinkType::Syslog],
        ),
        (
            "caFile",
            spec.ca_file.is_some(),
            &[
                SinkType::Syslog,
                SinkType::SplunkHec,
                SinkType::AzureLogsIngestion,
                SinkType::ElasticBulk,
            ],
        ),
        (
            "url",
            spec.url.is_some(),
            &[SinkType::SplunkHec, SinkType::ElasticBulk],
        ),
        (
            "tokenFile",
            spec.token_file.is_some(),
            &[SinkType::SplunkHec, SinkType::AzureLogsIngestion],
        ),
        (
            "gzip",
            spec.gzip.is_some(),
            &[
                SinkType::SplunkHec,
                SinkType::AzureLogsIngestion,
                SinkType::ElasticBulk,
            ],
        ),
        (
            "endpoint",
            spec.endpoint.is_some(),
            &[SinkType::AzureLogsIngestion],
        ),
        (
            "dcrImmutableId",
            spec.dcr_immutable_id.is_some(),
            &[SinkType::AzureLogsIngestion],
        ),
        (
            "stream",
            spec.stream.is_some(),
            &[SinkType::AzureLogsIngestion],
        ),
        (
            "workloadIdentity",
            spec.workload_identity.is_some(),
            &[SinkType::AzureLogsIngestion],
        ),
        (
            "index",
            spec.index.is_some(),
            &[SinkType::SplunkHec, SinkType::ElasticBulk],
        ),
        (
            "apiKeyFile",
            spec.api_key_file.is_some(),
            &[SinkType::ElasticBulk],
        ),
        (
            "username",
            spec.username.is_some(),
            &[SinkType::ElasticBulk],
        ),
        (
            "passwordFile",
            spec.password_file.is_some(),
            &[SinkType::ElasticBulk],
        ),
        (
            "spoolBytes",
            spec.spool_bytes.is_some(),
            &[
                SinkType::File,
                SinkType::Syslog,
                SinkType::SplunkHec,
                SinkType::AzureLogsIngestion,
                SinkType::ElasticBulk,
            ],
        ),
    ];
    given
        .into_iter()
        .filter(|(_, set, types)| *set && !types.contains(&kind))
        .map(|(field, _, _)| field)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(yaml: &str) -> Vec<SinkSpec> {
        serde_yaml_ng::from_str::<ExportSpec>(yaml).unwrap().sinks
    }

    #[test]
    fn sinks_get_defaults_by_type() {
        let sinks = validate(&specs(
            "sinks:\n- {type: stdout}\n- {type: syslog, address: 'tcp://siem:514'}\n- {type: elasticBulk, url: 'https://es:9200', apiKeyFile: /k}\n",
        ))
        .unwrap();
        assert_eq!(sinks[0].name, "stdout");
        assert_eq!((sinks[0].format, sinks[0].spool_bytes), (Format::Json, 0));
        assert_eq!(
            (sinks[1].name.as_str(), sinks[1].format),
            ("syslog", Format::Cef)
        );
        assert!(matches!(
            &sinks[1].target,
            Target::Syslog { facility: 16, .. }
        ));
        assert_eq!(sinks[2].format, Format::Ecs);
        assert!(matches!(
            &sinks[2].target,
            Target::Http { api: HttpApi::ElasticBulk { index, .. }, gzip: true, .. } if index == "logs-tollgate-default"
        ));
    }

    #[test]
    fn every_problem_is_named() {
        let problems = validate(&specs(
            "sinks:\n- {type: syslog, address: 'tls://siem:6514', path: /x}\n- {type: azureLogsIngestion, format: cef, tokenFile: /t}\n\
             - {name: Bad_Name, type: file, path: /f, filter: {verdicts: [blocked], destinations: [10.0.0.0/33]}}\n- {type: stdout}\n- {type: stdout}\n- {format: json}\n",
        ))
        .unwrap_err();
        assert_eq!(
            problems,
            [
                "sinks[0].path: does not apply to type Syslog",
                "sinks[0].caFile: is required for type Syslog",
                "sinks[1].format: AzureLogsIngestion takes JSON documents: json, ocsf or ecs",
                "sinks[1].endpoint: is required for type AzureLogsIngestion",
                "sinks[1].dcrImmutableId: is required for type AzureLogsIngestion",
                "sinks[1].stream: is required for type AzureLogsIngestion",
                "sinks[2].name: \"Bad_Name\": use lowercase letters, digits and '-' (it names the spool directory)",
                "sinks[2].filter.verdicts[0]: \"blocked\" is not allowed, denied or audit",
                "sinks[2].filter.destinations[0]: \"10.0.0.0/33\" is not a prefix or address",
                "sinks[4].name: \"stdout\" is used twice (each sink needs its own name: it names its spool)",
                "sinks[5].type: is required: stdout, file, syslog, splunkHec, azureLogsIngestion or elasticBulk",
            ]
        );
    }

    #[test]
    fn syslog_framing_and_udp_message_size() {
        let sinks = validate(&specs(
            "sinks:\n- {name: a, type: syslog, address: 'udp://siem:514'}\n\
             - {name: b, type: syslog, address: 'udp://siem:514', maxMessageBytes: 2048}\n\
             - {name: c, type: syslog, address: 'tcp://siem:514', framing: newline}\n\
             - {name: d, type: syslog, address: 'tcp://siem:514'}\n",
        ))
        .unwrap();
        let syslog = |i: usize| match &sinks[i].target {
            Target::Syslog {
                framing,
                max_message_bytes,
                ..
            } => (*framing, *max_message_bytes),
            other => panic!("{other:?}"),
        };
        assert_eq!(syslog(0), (SyslogFraming::OctetCounting, Some(8192)));
        assert_eq!(syslog(1).1, Some(2048));
        assert_eq!(syslog(2), (SyslogFraming::Newline, None));
        assert_eq!(syslog(3), (SyslogFraming::OctetCounting, None));
        let problems = validate(&specs(
            "sinks:\n- {name: a, type: syslog, address: 'udp://siem:514', framing: newline, maxMessageBytes: 100}\n\
             - {name: b, type: syslog, address: 'tls://siem:6514', caFile: /ca, maxMessageBytes: 2048}\n\
             - {name: c, type: file, path: /f, framing: newline}\n",
        ))
        .unwrap_err();
        assert_eq!(
            problems,
            [
                "sinks[0].framing: applies to tcp:// and tls:// only",
                "sinks[0].maxMessageBytes: 100 is outside 480..=65507 (RFC 5426's least, a UDP datagram's most)",
                "sinks[1].maxMessageBytes: applies to udp:// only (streams carry messages whole)",
                "sinks[2].framing: does not apply to type File",
            ]
        );
    }

    #[test]
    fn splunk_index_names_follow_splunks_rule() {
        let sinks = validate(&specs(
            "sinks:\n- {type: splunkHec, url: 'https://s:8088/services/collector/event', tokenFile: /t, index: tollgate_egress-1}\n",
        ))
        .unwrap();
        assert!(matches!(
            &sinks[0].target,
            Target::Http { api: HttpApi::SplunkHec { index: Some(index), .. }, .. } if index == "tollgate_egress-1"
        ));
        let problems = validate(&specs(
            "sinks:\n- {name: a, type: splunkHec, url: u, tokenFile: /t, index: Egress}\n\
             - {name: b, type: splunkHec, url: u, tokenFile: /t, index: _internal}\n\
             - {name: c, type: splunkHec, url: u, tokenFile: /t, index: -x}\n\
             - {name: d, type: splunkHec, url: u, tokenFile: /t, index: my.index}\n\
             - {name: e, type: splunkHec, url: u, tokenFile: /t, index: kvstore1}\n\
             - {name: f, type: azureLogsIngestion, endpoint: e, dcrImmutableId: d, stream: s, tokenFile: /t, index: x}\n",
        ))
        .unwrap_err();
        let rule = "Splunk index names are lowercase letters, digits, '_' and '-', not starting with '_' or '-', without \"kvstore\"";
        assert_eq!(
            problems,
            [
                format!("sinks[0].index: \"Egress\": {rule}"),
                format!("sinks[1].index: \"_internal\": {rule}"),
                format!("sinks[2].index: \"-x\": {rule}"),
                format!("sinks[3].index: \"my.index\": {rule}"),
                format!("sinks[4].index: \"kvstore1\": {rule}"),
                "sinks[5].index: does not apply to type AzureLogsIngestion".into(),
            ]
        );
    }

    #[test]
    fn elastic_takes_the_formats_that_index_cleanly_and_stamps_those_without_a_timestamp() {
        let problems = validate(&specs(
            "sinks:\n- {name: a, type: elasticBulk, url: u, format: json}\n- {name: b, type: elasticBulk, url: u, format: cef}\n",
        ))
        .unwrap_err();
        let why = "ElasticBulk takes ecs or ocsf, which index cleanly into a logs-* data stream (json's dotted label keys conflict there)";
        assert_eq!(
            problems,
            [
                format!("sinks[0].format: {why}"),
                format!("sinks[1].format: {why}")
            ]
        );
        let sinks = validate(&specs(
            "sinks:\n- {name: a, type: elasticBulk, url: u}\n- {name: b, type: elasticBulk, url: u, format: ocsf}\n",
        ))
        .unwrap();
        let add_timestamp = |sink: &SinkConfig| match &sink.target {
            Target::Http {
                api: HttpApi::ElasticBulk { add_timestamp, .. },
                ..
            } => *add_timestamp,
            other => panic!("{other:?}"),
        };
        assert!(!add_timestamp(&sinks[0]), "ECS documents carry @timestamp");
        assert!(add_timestamp(&sinks[1]));
    }

    #[test]
    fn filters() {
        let filter = SinkFilter {
            verdicts: vec!["denied".into(), "audit".into()],
            namespaces: vec!["prod".into()],
            destinations: vec!["10.0.0.0/8".parse().unwrap()],
        };
        let ip = |s: &str| s.parse().unwrap();
        assert!(filter.passes(Some("denied"), Some("prod"), ip("10.1.2.3")));
        assert!(!filter.passes(Some("allowed"), Some("prod"), ip("10.1.2.3")));
        assert!(!filter.passes(Some("denied"), None, ip("10.1.2.3")));
        assert!(!filter.passes(Some("denied"), Some("prod"), ip("192.168.1.1")));
        assert!(
            filter.passes(None, Some("prod"), ip("10.0.0.10")),
            "DNS records have no verdict"
        );
        assert!(SinkFilter::default().passes(Some("allowed"), None, ip("::1")));
    }
}
