//! The agent's command line, read and checked before the runtime starts.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
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
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
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
    /// at most once per this interval; 0 reports every connection. Denied and
    /// audit decisions are always reported.
    #[arg(long, env = "TOLLGATE_ALLOWED_REPORT_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub allowed_report_interval: Duration,
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
    /// Pod label keys that flow records carry, comma-separated.
    #[arg(
        long,
        env = "TOLLGATE_POD_LABEL_KEYS",
        value_delimiter = ',',
        default_value = "app,app.kubernetes.io/name"
    )]
    pub pod_label_keys: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KubernetesArg {
    Auto,
    InCluster,
    Kubeconfig,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
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

    #[test]
    fn rejects_unknown_modes() {
        let err = Cli::try_parse_from(["tollgate-agent", "--mode", "block"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("possible values: observe, enforce"),
            "{err}"
        );
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
