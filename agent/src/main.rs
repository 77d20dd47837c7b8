use std::{io::IsTerminal, path::Path};

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use tokio_util::sync::CancellationToken;
use tollgate_agent::{
    cluster::writer::{AGENT_SELECTOR, REPORT_PORT, StatusWriter},
    config::{Cli, Command, FileConfig, KubernetesArg, RunArgs},
    control::server::{self, Listen, TlsFiles},
    datapath::{self, DatapathOptions},
    export::{
        self,
        config::{ExportSpec, SinkSpec, SinkType},
    },
    heap,
    kubernetes::ApiSource,
    log_level::LogLevel,
    mounts,
    pods::UnknownPodAction,
    policy_files,
    run::{self, RunConfig},
};

fn main() -> anyhow::Result<()> {
    heap::configure_allocator();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Configuration is complete and checked before anything starts.
    let args = match &cli.run.config {
        Some(path) => {
            let file = FileConfig::read(path)?;
            cli.run.with_file(file, &matches)
        }
        None => cli.run,
    };
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A closed log pipe must not stop enforcement reporting (the default
        // reports a failed write with eprintln!, which panics then).
        .log_internal_errors(false);
    let log_level = LogLevel::install(&args.log_level, output)?;
    // Every TLS client and server here uses ring, the one provider built in
    // (no aws-lc-sys build); reqwest needs it installed as the default.
    tokio_rustls::rustls::crypto::ring::default_provider()
        .install_default()
        .expect("no other TLS crypto provider is installed before main");
    match cli.command {
        Some(Command::Cleanup { bpffs_root }) => cleanup(&bpffs_root),
        Some(Command::Verify { bpffs_root, json }) => verify(&bpffs_root, json),
        Some(Command::StatusWriter {
            kubeconfig,
            namespace,
            identity,
        }) => status_writer(kubeconfig, namespace, identity),
        None => {
            let config = run_config(args, log_level)?;
            until_signalled(|shutdown| async move {
                run::run(config, shutdown).await?;
                Ok(())
            })
        }
    }
}

/// Runs `job` on a runtime of its own until it ends; SIGTERM and SIGINT
/// cancel its token. The handlers are installed before the job starts (so
/// before the agent can report ready): a signal right after must drain,
/// not kill.
fn until_signalled<F>(job: impl FnOnce(CancellationToken) -> F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = Signals::install().context("installing signal handlers")?;
        tokio::spawn(signals.cancel_on_signal(shutdown.clone()));
        job(shutdown).await
    })
}

fn run_config(args: RunArgs, log_level: LogLevel) -> anyhow::Result<RunConfig> {
    // Resolved, so that "..", links and relative paths cannot step outside.
    let cgroup = args
        .cgroup
        .map(|path| {
            path.canonicalize()
                .with_context(|| format!("--cgroup {}", path.display()))
        })
        .transpose()?;
    let cgroup2_mount =
        mounts::cgroup2_mount(cgroup.as_deref()).context("finding the cgroup v2 mount")?;
    let cgroup = cgroup.unwrap_or_else(|| cgroup2_mount.clone());
    anyhow::ensure!(
        cgroup.is_dir(),
        "--cgroup {} is not a directory",
        cgroup.display()
    );
    let node = match args.node {
        Some(node) => node,
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    let policies = policy_files::load(&args.policies)?;
    let tls = match (args.tls_cert, args.tls_key, args.tls_client_ca) {
        (Some(cert), Some(key), Some(client_ca)) => Some(TlsFiles {
            cert,
            key,
            client_ca,
        }),
        _ => None,
    };
    let kubernetes = kubernetes_source(args.kubernetes, args.kubeconfig)?;
    anyhow::ensure!(
        kubernetes.is_some() || args.unknown_pod_action == UnknownPodAction::Allow,
        "--unknown-pod-action deny needs the Kubernetes API (--kubernetes in-cluster or kubeconfig): \
         without it no pod would ever become known"
    );
    let mut listen = vec![server::parse_listen(&args.listen, tls).map_err(anyhow::Error::msg)?];
    listen.extend(args.insecure_listen.map(Listen::Insecure));
    Ok(RunConfig {
        datapath: DatapathOptions {
            bpffs_root: args.bpffs_root,
            cgroup,
        },
        cgroup2_mount,
        mode: args.mode.map(Into::into),
        node,
        allowed_report_interval: args.allowed_report_interval,
        allowed_flows: args.allowed_flows,
        log_level,
        policies,
        state_dir: args.state_dir,
        listen,
        metrics_listen: args.metrics_listen,
        kubernetes,
        unknown_pod_action: args.unknown_pod_action,
        cluster_policies: args.cluster_policies,
        pod_label_keys: args.pod_label_keys,
        sinks: sinks(&args.sinks, args.file_export)?,
        dns_resolvers: if args.dns_resolvers.is_empty() {
            default_resolvers()
        } else {
            args.dns_resolvers
        },
        learned_ttl: learned_ttl(args.dns_min_ttl, args.dns_max_ttl)?,
        fqdn_limits: tollgate_agent::names::Limits {
            per_name: args.fqdn_max_addresses_per_name,
            per_endpoint: args.fqdn_max_addresses_per_endpoint,
        },
    })
}

/// Node-local DNS, and the nameservers the host itself uses.
fn default_resolvers() -> Vec<std::net::SocketAddr> {
    let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let mut resolvers = tollgate_agent::config::resolv_conf_nameservers(&resolv_conf);
    resolvers.push(tollgate_agent::config::NODE_LOCAL_DNS);
    resolvers.sort();
    resolvers.dedup();
    resolvers
}

fn learned_ttl(
    min: std::time::Duration,
    max: std::time::Duration,
) -> anyhow::Result<(std::time::Duration, std::time::Duration)> {
    anyhow::ensure!(
        min <= max,
        "--dns-min-ttl ({min:?}) is longer than --dns-max-ttl ({max:?})"
    );
    anyhow::ensure!(
        max.as_secs() <= u64::from(u32::MAX) && min.subsec_nanos() == 0 && max.subsec_nanos() == 0,
        "DNS TTL bounds are whole seconds"
    );
    Ok((min, max))
}

/// The `--sink` flags if any, else the file's sinks, else stdout.
fn sinks(
    flags: &[String],
    file: Option<ExportSpec>,
) -> anyhow::Result<Vec<tollgate_agent::export::config::SinkConfig>> {
    let specs: Vec<SinkSpec> = if flags.is_empty() {
        file.map(|f| f.sinks).unwrap_or_default()
    } else {
        flags
            .iter()
            .map(|yaml| serde_yaml_ng::from_str(yaml).with_context(|| format!("--sink {yaml}")))
            .collect::<anyhow::Result<_>>()?
    };
    let specs = if specs.is_empty() {
        vec![SinkSpec {
            kind: Some(SinkType::Stdout),
            ..Default::default()
        }]
    } else {
        specs
    };
    export::config::validate(&specs)
        .map_err(|problems| anyhow::anyhow!("invalid sinks:\n  {}", problems.join("\n  ")))
}

fn kubernetes_source(
    choice: KubernetesArg,
    kubeconfig: Option<std::path::PathBuf>,
) -> anyhow::Result<Option<ApiSource>> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    let source = match (choice, kubeconfig) {
        (KubernetesArg::Off, _) => None,
        (KubernetesArg::InCluster, _) | (KubernetesArg::Auto, _) if in_cluster => {
            Some(ApiSource::InCluster)
        }
        (KubernetesArg::InCluster, _) => {
            anyhow::bail!(
                "--kubernetes in-cluster: KUBERNETES_SERVICE_HOST is not set (not in a pod?)"
            )
        }
        (KubernetesArg::Auto | KubernetesArg::Kubeconfig, Some(path)) => {
            // Read now, so a bad file stops the start with its reason.
            kube::config::Kubeconfig::read_from(&path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            Some(ApiSource::Kubeconfig(path))
        }
        (KubernetesArg::Kubeconfig, None) => {
            anyhow::bail!("--kubernetes kubeconfig needs --kubeconfig FILE (or KUBECONFIG)")
        }
        (KubernetesArg::Auto, None) => None,
    };
    Ok(source)
}

fn status_writer(
    kubeconfig: Option<std::path::PathBuf>,
    namespace: String,
    identity: Option<String>,
) -> anyhow::Result<()> {
    let source = match kubeconfig {
        Some(path) => ApiSource::Kubeconfig(path),
        None => ApiSource::InCluster,
    };
    let identity = match identity {
        Some(identity) => identity,
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    until_signalled(|shutdown| async move {
        let client = tollgate_agent::kubernetes::client(&source).await?;
        tracing::info!(%identity, %namespace, "status writer starting");
        let writer = StatusWriter {
            client,
            identity,
            namespace,
            agent_selector: AGENT_SELECTOR.into(),
            report_port: REPORT_PORT.into(),
        };
        writer.run(shutdown).await;
        Ok(())
    })
}

fn cleanup(bpffs_root: &Path) -> anyhow::Result<()> {
    for interface in datapath::remove_frame_filters() {
        tracing::info!(%interface, "removed the frame hook's tc filter");
    }
    let removed = datapath::cleanup(bpffs_root)?;
    for path in &removed {
        tracing::info!(path = %path.display(), "removed");
    }
    tracing::info!(pins = removed.len(), "cleanup done");
    Ok(())
}

fn verify(bpffs_root: &Path, json: bool) -> anyhow::Result<()> {
    let checks = datapath::Datapath::verify(bpffs_root)?;
    for check in &checks {
        if json {
            println!("{}", serde_json::to_string(check)?);
        } else {
            println!(
                "{:<22} {:<8} {:>10} {:>10.1} ms {}",
                check.program,
                if check.loaded { "loaded" } else { "REFUSED" },
                check
                    .verified_insns
                    .map_or("-".to_owned(), |n| format!("{n} insns")),
                check.load_ms,
                check.error.as_deref().unwrap_or("")
            );
        }
    }
    let refused: Vec<&str> = checks
        .iter()
        .filter(|c| !c.loaded && datapath::decides(c.program))
        .map(|c| c.program)
        .collect();
    anyhow::ensure!(
        refused.is_empty(),
        "the agent cannot enforce on this kernel: it refuses {}",
        refused.join(", ")
    );
    Ok(())
}

/// SIGTERM and SIGINT, caught from the moment they are installed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn cancel_on_signal(mut self, shutdown: CancellationToken) {
        tokio::select! {
            _ = self.term.recv() => {},
            _ = self.int.recv() => {},
        }
        shutdown.cancel();
    }
}
