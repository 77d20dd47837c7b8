//! The agent's configuration: a YAML file (`--config`), environment
//! variables and flags, read and checked before the runtime starts. A flag
//! wins over its environment variable, which wins over the file, which wins
//! over the default.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgMatches, Parser, Subcommand, ValueEnum, parser::ValueSource};
use serde::Deserialize;
use tollgate_common::Mode;

use crate::{datapath::DEFAULT_BPFFS_ROOT, pods::UnknownPodAction};

#[derive(Debug, Parser)]
#[command(
    name = "tollgate-agent",
    version,
    about = "Tollgate egress control agent",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Detach the programs and remove every pin this agent made.
    Cleanup {
        /// Parent of the versioned pin directory.
        #[arg(long, env = "TOLLGATE_BPFFS_ROOT", default_value = DEFAULT_BPFFS_ROOT)]
        bpffs_root: PathBuf,
    },
    /// Load every program into this kernel's verifier without attaching
    /// anything, and report how each fared (exit status 1 if a program
    /// that the agent cannot run without is refused).
    Verify {
        /// Where the maps of the check are pinned for the moment (removed
        /// after).
        #[arg(long, env = "TOLLGATE_BPFFS_ROOT", default_value = DEFAULT_BPFFS_ROOT)]
        bpffs_root: PathBuf,
        /// One JSON object per program instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write the status of the cluster's policies: while this process holds
    /// the Lease `tollgate-policy-status`, read every agent's report and
    /// patch each policy's status when it changed. Runs as a Deployment of
    /// its own (deploy/status-writer.yaml), not in the agents.
    StatusWriter {
        /// kubeconfig file (outside a cluster); in a pod, its service
        /// account is used.
        #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
        /// The agents' namespace: where their pods and the lease are.
        #[arg(long, env = "POD_NAMESPACE", default_value = "tollgate-system")]
        namespace: String,
        /// This writer's name as the lease's holder (the pod's name; the
        /// host name when unset).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
    },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// YAML configuration file: every setting below, by its camelCase name
    /// (docs/configuration.md); flags and environment variables override it.
    #[arg(long, env = "TOLLGATE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log filter, in RUST_LOG syntax (`info`, `warn,tollgate_agent=debug`);
    /// `tollgatectl log-level` changes it while the agent runs.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    pub log_level: String,
    /// observe: denials are recorded as `audit` and go through; enforce: they
    /// fail with EPERM [default: the saved mode, else observe]
    #[arg(long, env = "TOLLGATE_MODE", value_enum)]
    pub mode: Option<ModeArg>,
    /// cgroup v2 directory to attach to [default: the cgroup2 mount, i.e. every process]
    #[arg(long, env = "TOLLGATE_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// Parent of the versioned pin directory (on bpffs; mounted if missing).
    #[arg(long, env = "TOLLGATE_BPFFS_ROOT", default_value = DEFAULT_BPFFS_ROOT)]
    pub bpffs_root: PathBuf,
    /// Policy file or directory (its *.yaml, *.yml, *.json); repeatable.
    /// Without any, the rules already in the datapath stay as they are.
    #[arg(long = "policy", value_name = "FILE|DIR")]
    pub policies: Vec<PathBuf>,
    /// Where the applied policy set and modes are saved, and restored from at start.
    #[arg(long, env = "TOLLGATE_STATE_DIR", default_value = "/var/lib/tollgate")]
    pub state_dir: PathBuf,
    /// Control API address: unix:PATH (mode 0600) or tcp://ADDR (mutual TLS).
    #[arg(
        long,
        env = "TOLLGATE_LISTEN",
        default_value = "unix:/run/tollgate/agent.sock"
    )]
    pub listen: String,
    /// Server certificate (PEM) for tcp:// listening.
    #[arg(long, env = "TOLLGATE_TLS_CERT", requires_all = ["tls_key", "tls_client_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Server key (PEM) for tcp:// listening.
    #[arg(long, env = "TOLLGATE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to.
    #[arg(long, env = "TOLLGATE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Also serve the API on plain TCP without authentication: local development only.
    #[arg(long, value_name = "ADDR")]
    pub insecure_listen: Option<std::net::SocketAddr>,
    /// Serve Prometheus /metrics, /healthz and /readyz on this address.
    #[arg(long, env = "TOLLGATE_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Node name in flow records [default: the host name]
    #[arg(long, env = "NODE_NAME")]
    pub node: Option<String>,
    /// Report an allowed flow (same cgroup, destination, port, protocol, rule)
    /// once per this interval; 0 reports every connection. Denied and audit
    /// decisions are always reported one by one.
    #[arg(long, env = "TOLLGATE_ALLOWED_REPORT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub allowed_report_interval: Duration,
    /// How an allowed flow's interval is reported. aggregate: one record at
    /// its end, counting its connections (the kernel hands every allowed
    /// connection to the agent). first: its first connection only, the rest
    /// suppressed in the kernel (fewer events, no counts).
    #[arg(long, env = "TOLLGATE_ALLOWED_FLOWS", value_enum, default_value_t = AllowedFlows::Aggregate)]
    pub allowed_flows: AllowedFlows,
    /// Where pod metadata comes from. auto: in-cluster when
    /// KUBERNETES_SERVICE_HOST is set, else --kubeconfig if given, else off
    /// (endpoints are cgroups, selected by path).
    #[arg(long, env = "TOLLGATE_KUBERNETES", value_enum, default_value_t = KubernetesArg::Auto)]
    pub kubernetes: KubernetesArg,
    /// kubeconfig file for the Kubernetes API (outside a cluster).
    #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// What processes in a pod's cgroup may do until the pod's metadata is
    /// known: allow (not restricted) or deny (strict clusters).
    #[arg(long, env = "TOLLGATE_UNKNOWN_POD_ACTION", value_enum, default_value_t = UnknownPodAction::Allow)]
    pub unknown_pod_action: UnknownPodAction,
    /// With the Kubernetes API: watch the EgressPolicy and
    /// ClusterEgressPolicy resources and enforce them beside the local
    /// policies, and remove the node's tollgate.dev/agent-not-ready taint
    /// once they are in force.
    #[arg(long, env = "TOLLGATE_CLUSTER_POLICIES", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub cluster_policies: bool,
    /// A sink for flow records, as YAML (`{type: syslog, address:
    /// "tls://siem:6514", caFile: /etc/ca.pem}`); repeatable; replaces the
    /// configuration file's sinks. None anywhere: JSON lines on stdout.
    #[arg(long = "sink", value_name = "YAML")]
    pub sinks: Vec<String>,
    /// The configuration file's `export` section.
    #[arg(skip)]
    pub file_export: Option<crate::export::config::ExportSpec>,
    /// Pod label keys that flow records carry, comma-separated.
    #[arg(
        long,
        env = "TOLLGATE_POD_LABEL_KEYS",
        value_delimiter = ',',
        default_value = "app,app.kubernetes.io/name"
    )]
    pub pod_label_keys: Vec<String>,
    /// A resolver whose DNS answers FQDN rules learn from, as IP or
    /// IP:PORT (port 53 if none); repeatable [default: the nameservers of
    /// /etc/resolv.conf and node-local DNS, 169.254.20.10]
    #[arg(long = "dns-resolver", env = "TOLLGATE_DNS_RESOLVERS", value_delimiter = ',', value_name = "ADDR", value_parser = parse_resolver)]
    pub dns_resolvers: Vec<SocketAddr>,
    /// The shortest a learned address lives, whatever its answer's TTL says
    /// (applications cache answers longer than their TTL).
    #[arg(long, env = "TOLLGATE_DNS_MIN_TTL", default_value = "300s", value_parser = parse_duration)]
    pub dns_min_ttl: Duration,
    /// The longest a learned address lives.
    #[arg(long, env = "TOLLGATE_DNS_MAX_TTL", default_value = "24h", value_parser = parse_duration)]
    pub dns_max_ttl: Duration,
    /// Addresses an endpoint may hold learned from answers for one name;
    /// beyond, those expiring first are forgotten.
    #[arg(
        long,
        env = "TOLLGATE_FQDN_MAX_ADDRESSES_PER_NAME",
        default_value_t = 128
    )]
    pub fqdn_max_addresses_per_name: usize,
    /// Learned addresses an endpoint may hold in all.
    #[arg(
        long,
        env = "TOLLGATE_FQDN_MAX_ADDRESSES_PER_ENDPOINT",
        default_value_t = 2048
    )]
    pub fqdn_max_addresses_per_endpoint: usize,
}

/// Node-local DNS's usual address (the NodeLocal DNSCache add-on).
pub const NODE_LOCAL_DNS: SocketAddr = SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 20, 10)),
    53,
);

/// The `nameserver` addresses of a resolv.conf, on port 53.
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// `IP` (port 53) or `IP:PORT` (`[IPv6]:PORT`).
pub fn parse_resolver(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(ip) = text.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    text.parse::<SocketAddr>()
        .map_err(|_| format!("{text:?} is not IP or IP:PORT"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AllowedFlows {
    Aggregate,
    First,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KubernetesArg {
    Auto,
    InCluster,
    Kubeconfig,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeArg {
    Observe,
    Enforce,
}

impl From<ModeArg> for Mode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::Observe => Mode::Observe,
            ModeArg::Enforce => Mode::Enforce,
        }
    }
}

/// The configuration file: the run settings, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FileConfig {
    mode: Option<ModeArg>,
    cgroup: Option<PathBuf>,
    bpffs_root: Option<PathBuf>,
    policies: Option<Vec<PathBuf>>,
    state_dir: Option<PathBuf>,
    listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    insecure_listen: Option<SocketAddr>,
    metrics_listen: Option<SocketAddr>,
    node: Option<String>,
    #[serde(default, deserialize_with = "duration")]
    allowed_report_interval: Option<Duration>,
    allowed_flows: Option<AllowedFlows>,
    log_level: Option<String>,
    kubernetes: Option<KubernetesArg>,
    kubeconfig: Option<PathBuf>,
    unknown_pod_action: Option<crate::pods::UnknownPodAction>,
    cluster_policies: Option<bool>,
    pod_label_keys: Option<Vec<String>>,
    #[serde(default, deserialize_with = "resolvers")]
    dns_resolvers: Option<Vec<SocketAddr>>,
    #[serde(default, deserialize_with = "duration")]
    dns_min_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    dns_max_ttl: Option<Duration>,
    fqdn_max_addresses_per_name: Option<usize>,
    fqdn_max_addresses_per_endpoint: Option<usize>,
    export: Option<crate::export::config::ExportSpec>,
}

fn resolvers<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<SocketAddr>>, D::Error> {
    let texts = Vec::<String>::deserialize(d)?;
    texts
        .iter()
        .map(|t| parse_resolver(t))
        .collect::<Result<_, _>>()
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {field}{message}")]
    Invalid {
        path: PathBuf,
        /// `field: `, or empty when the problem is not one field's.
        field: String,
        message: String,
    },
}

impl FileConfig {
    pub fn read(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    fn parse(path: &std::path::Path, text: &str) -> Result<Self, ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: if field.is_empty() {
                field
            } else {
                format!("{field}: ")
            },
            message,
        };
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| invalid(String::new(), e.to_string()))?;
        if value.is_null() {
            return Ok(Self::default());
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            invalid(
                tollgate_policy::document::field_path(e.path()),
                e.into_inner().to_string(),
            )
        })
    }
}

impl RunArgs {
    /// Fills in from `file` every setting that neither a flag nor an
    /// environment variable gave (`matches` says which did).
    pub fn with_file(mut self, file: FileConfig, matches: &ArgMatches) -> Self {
        let given = |id: &str| {
            matches!(
                matches.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        macro_rules! fill {
            ($($field:ident),* $(,)?) => {$(
                if !given(stringify!($field)) {
                    if let Some(value) = file.$field {
                        self.$field = value.into();
                    }
                }
            )*};
        }
        fill!(
            mode,
            cgroup,
            bpffs_root,
            policies,
            state_dir,
            listen,
            tls_cert,
            tls_key,
            tls_client_ca,
            insecure_listen,
            metrics_listen,
            node,
            allowed_report_interval,
            allowed_flows,
            log_level,
            kubernetes,
            kubeconfig,
            unknown_pod_action,
            cluster_policies,
            pod_label_keys,
            dns_resolvers,
            dns_min_ttl,
            dns_max_ttl,
            fqdn_max_addresses_per_name,
            fqdn_max_addresses_per_endpoint,
        );
        self.file_export = file.export;
        self
    }
}

/// `0`, or a whole number with a unit: `ms`, `s`, `m`, `h` (`250ms`, `10s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 10s or 250ms"))?;
    let millis = match unit {
        "ms" => number,
        "s" => number.saturating_mul(1_000),
        "m" => number.saturating_mul(60_000),
        "h" => number.saturating_mul(3_600_000),
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ));
        }
    };
    Ok(Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn resolvers_parse_with_and_without_ports() {
        assert_eq!(
            parse_resolver("10.0.0.10"),
            Ok("10.0.0.10:53".parse().unwrap())
        );
        assert_eq!(
            parse_resolver("10.0.0.10:5353"),
            Ok("10.0.0.10:5353".parse().unwrap())
        );
        assert_eq!(
            parse_resolver("fd00::a"),
            Ok("[fd00::a]:53".parse().unwrap())
        );
        assert!(parse_resolver("dns.example").is_err());
        assert_eq!(
            resolv_conf_nameservers(
                "# x\nnameserver 10.0.0.10\nsearch a\nnameserver fd00::1\nnameserver bogus\n"
            ),
            vec![
                "10.0.0.10:53".parse().unwrap(),
                "[fd00::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("10").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s").unwrap_err().contains("not a duration"));
        assert!(parse_duration("1.5s").is_err());
    }

    #[test]
    fn defaults_observe_everything() {
        let cli = Cli::try_parse_from(["tollgate-agent"]).unwrap();
        assert!(cli.command.is_none());
        assert_eq!(cli.run.mode, None);
        assert_eq!(cli.run.listen, "unix:/run/tollgate/agent.sock");
        assert_eq!(cli.run.cgroup, None);
        assert_eq!(cli.run.allowed_report_interval, Duration::from_secs(10));
        assert_eq!(cli.run.kubernetes, KubernetesArg::Auto);
        assert_eq!(cli.run.unknown_pod_action, UnknownPodAction::Allow);
        assert_eq!(cli.run.pod_label_keys, ["app", "app.kubernetes.io/name"]);
    }

    /// deploy/configmap.yaml's file, read as the agent reads it at start.
    #[test]
    fn the_deployed_configuration_is_valid() {
        let configmap: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(include_str!("../../deploy/configmap.yaml")).unwrap();
        let text = configmap["data"]["tollgate.yaml"]
            .as_str()
            .expect("the ConfigMap holds tollgate.yaml");
        let file = FileConfig::parse(Path::new("deploy/configmap.yaml"), text)
            .unwrap_or_else(|e| panic!("{e}"));
        let export = file.export.as_ref().expect("the file configures sinks");
        let sinks = crate::export::config::validate(&export.sinks).unwrap();
        assert_eq!(sinks.len(), 1);
        let run = with_file(&["tollgate-agent"], text);
        assert_eq!(run.mode, Some(ModeArg::Observe));
        assert_eq!(run.kubernetes, KubernetesArg::InCluster);
        assert_eq!(run.allowed_flows, AllowedFlows::Aggregate);
    }

    #[test]
    fn rejects_unknown_modes() {
        let err = Cli::try_parse_from(["tollgate-agent", "--mode", "block"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("possible values: observe, enforce"),
            "{err}"
        );
    }

    fn with_file(args: &[&str], yaml: &str) -> RunArgs {
        use clap::{CommandFactory, FromArgMatches};
        let matches = Cli::command().try_get_matches_from(args).unwrap();
        let cli = Cli::from_arg_matches(&matches).unwrap();
        let file = FileConfig::parse(Path::new("tollgate.yaml"), yaml).unwrap();
        cli.run.with_file(file, &matches)
    }

    #[test]
    fn the_file_fills_what_flags_did_not_give() {
        let yaml = "mode: enforce\nallowedReportInterval: 1m\nlisten: tcp://127.0.0.1:7000\n\
                    unknownPodAction: deny\nkubernetes: in-cluster\npodLabelKeys: [team]\npolicies: [/etc/p]\n";
        let run = with_file(&["tollgate-agent"], yaml);
        assert_eq!(run.mode, Some(ModeArg::Enforce));
        assert_eq!(run.allowed_report_interval, Duration::from_secs(60));
        assert_eq!(run.listen, "tcp://127.0.0.1:7000");
        assert_eq!(run.unknown_pod_action, UnknownPodAction::Deny);
        assert_eq!(run.kubernetes, KubernetesArg::InCluster);
        assert_eq!(run.pod_label_keys, ["team"]);
        assert_eq!(run.policies, [PathBuf::from("/etc/p")]);
        // Defaults stay where the file says nothing.
        assert_eq!(run.state_dir, PathBuf::from("/var/lib/tollgate"));

        let run = with_file(
            &[
                "tollgate-agent",
                "--mode",
                "observe",
                "--allowed-report-interval",
                "5s",
            ],
            yaml,
        );
        assert_eq!(run.mode, Some(ModeArg::Observe), "a flag wins");
        assert_eq!(run.allowed_report_interval, Duration::from_secs(5));
        assert_eq!(run.listen, "tcp://127.0.0.1:7000");
    }

    #[test]
    fn a_bad_file_says_where() {
        let err = |yaml: &str| {
            FileConfig::parse(Path::new("tollgate.yaml"), yaml)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("mode: block\n"),
            "tollgate.yaml: mode: unknown variant `block`, expected `observe` or `enforce`"
        );
        assert_eq!(
            err("allowedReportInterval: 10x\n"),
            "tollgate.yaml: allowedReportInterval: \"10x\": unknown unit \"x\" (use ms, s, m or h)"
        );
        assert_eq!(
            err("allowedReportInterval: 10\n"),
            "tollgate.yaml: allowedReportInterval: invalid type: integer `10`, expected a string"
        );
        assert!(
            err("moed: enforce\n")
                .starts_with("tollgate.yaml: moed: unknown field `moed`, expected one of `mode`"),
            "{}",
            err("moed: enforce\n")
        );
        assert!(err("metricsListen: nowhere\n").starts_with("tollgate.yaml: metricsListen: "));
        assert!(FileConfig::parse(Path::new("empty.yaml"), "").is_ok());
    }

    #[test]
    fn cleanup_takes_its_own_arguments() {
        let cli =
            Cli::try_parse_from(["tollgate-agent", "cleanup", "--bpffs-root", "/sys/fs/bpf/x"])
                .unwrap();
        assert!(
            matches!(cli.command, Some(Command::Cleanup { bpffs_root }) if bpffs_root == Path::new("/sys/fs/bpf/x"))
        );
    }
}
