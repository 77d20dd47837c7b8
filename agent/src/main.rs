use std::{io::IsTerminal, path::Path};

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use tollgate_agent::{
    config::{Cli, Command, KubernetesArg, RunArgs},
    control::server::{self, Listen, TlsFiles},
    datapath::{self, DatapathOptions},
    mounts,
    pods::{UnknownPodAction, watch::ApiSource},
    policy_files,
    run::{self, RunConfig},
};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A closed log pipe must not stop enforcement reporting (the default
        // reports a failed write with eprintln!, which panics then).
        .log_internal_errors(false)
        .init();
    match cli.command {
        Some(Command::Cleanup { bpffs_root }) => cleanup(&bpffs_root),
        None => {
            // Configuration is complete and checked before the runtime starts.
            let config = run_config(cli.run)?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(stop_on_signal(shutdown.clone()));
                run::run(config, shutdown).await
            })?;
            Ok(())
        }
    }
}

fn run_config(args: RunArgs) -> anyhow::Result<RunConfig> {
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
        policies,
        state_dir: args.state_dir,
        listen,
        metrics_listen: args.metrics_listen,
        kubernetes,
        unknown_pod_action: args.unknown_pod_action,
        pod_label_keys: args.pod_label_keys,
    })
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

fn cleanup(bpffs_root: &Path) -> anyhow::Result<()> {
    let removed = datapath::cleanup(bpffs_root)?;
    for path in &removed {
        tracing::info!(path = %path.display(), "removed");
    }
    tracing::info!(pins = removed.len(), "cleanup done");
    Ok(())
}

async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    shutdown.cancel();
}
