//! tollgatectl: the command-line client of an agent's control API.
//! Exits non-zero on any failure, with the agent's message on stderr.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use tokio_stream::StreamExt;
use tollgate_advisor::{recording::Recording, replay, suggest};
use tollgate_agent::{
    client::{ClientTls, connect},
    config::parse_duration,
    control::{rule_stats, server},
    policy_files,
};
use tollgate_proto::v1::{
    self as api, agent_service_client::AgentServiceClient, flow_service_client::FlowServiceClient,
    policy_service_client::PolicyServiceClient,
};

#[derive(Parser)]
#[command(name = "tollgatectl", version, about = "Control a Tollgate agent")]
struct Cli {
    /// unix:PATH, https://HOST:PORT (mutual TLS) or http://HOST:PORT (--insecure-listen)
    #[arg(
        long,
        env = "TOLLGATE_AGENT",
        default_value = "unix:/run/tollgate/agent.sock",
        global = true
    )]
    agent: String,
    /// CA certificate (PEM) that the agent's certificate chains to.
    #[arg(long, env = "TOLLGATE_CA", global = true)]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) for https:// agents.
    #[arg(long, env = "TOLLGATE_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Client key (PEM) for https:// agents.
    #[arg(long, env = "TOLLGATE_KEY", global = true)]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or replace policies from a file, a directory, or - (stdin).
    Apply {
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Show what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Refuse unless the agent's policy set is at this generation.
        #[arg(long)]
        expected_generation: Option<u64>,
    },
    /// Delete policies by name ("namespace/name" or "name").
    Delete {
        #[arg(required = true)]
        names: Vec<String>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        expected_generation: Option<u64>,
    },
    /// Show resources.
    Get {
        #[arg(value_enum)]
        what: GetWhat,
        /// rules: only this policy's ("namespace/name" or "name").
        policy: Option<String>,
        /// rules: only those not hit for this long (never hit, or last hit
        /// before), e.g. 90d, 12h: the candidates for pruning.
        #[arg(long, value_name = "DURATION", value_parser = rule_stats::parse_age)]
        unused_for: Option<Duration>,
        /// rules, when the agent does not answer: the pinned counters are
        /// read from here (needs root) ...
        #[arg(long, default_value = tollgate_agent::datapath::DEFAULT_BPFFS_ROOT)]
        bpffs_root: PathBuf,
        /// ... and named by the rules the agent saved here.
        #[arg(long, env = "TOLLGATE_STATE_DIR", default_value = "/var/lib/tollgate")]
        state_dir: PathBuf,
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show the modes, or set the global mode or a policy's.
    Mode {
        /// observe | enforce | inherit (inherit: drop a policy's override)
        mode: Option<String>,
        #[arg(long)]
        policy: Option<String>,
    },
    /// Show recent flow records, and with --follow new ones as they come.
    Flows {
        #[arg(long)]
        follow: bool,
        /// allowed | denied | audit (repeatable)
        #[arg(long)]
        verdict: Vec<String>,
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        pod: Option<String>,
        /// Destination prefix or address.
        #[arg(long)]
        dst: Option<String>,
        /// Destination DNS name: the name the address was learned under.
        #[arg(long)]
        dst_name: Option<String>,
        #[arg(long)]
        policy: Option<String>,
        /// How far back to start, e.g. 30s or 5m.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        since: Duration,
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show the agent's status.
    Status {
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show the agent's log filter, or set it until the agent restarts.
    LogLevel {
        /// RUST_LOG syntax: `debug`, `info,tollgate_agent::pods=debug`, ...
        filter: Option<String>,
    },
    /// Suggest an allow-list per workload (observe mode) from recorded flow
    /// and DNS records; needs no agent with --from-file.
    Suggest {
        #[command(flatten)]
        recording: RecordingArgs,
        /// Distinct names under one parent that make a `*.`/`**.` wildcard
        /// for it; 0 or 1: never.
        #[arg(long, default_value_t = 5)]
        collapse_threshold: usize,
        /// The widest IPv4 prefix addresses are merged into (32: as seen).
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u8).range(0..=32))]
        max_prefix_v4: u8,
        /// The widest IPv6 prefix addresses are merged into (128: as seen).
        #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u8).range(0..=128))]
        max_prefix_v6: u8,
    },
    /// Replay recorded flows with candidate policies (as if enforced) and
    /// report what would change; exits non-zero when a connection that went
    /// through would be denied.
    DryRun {
        /// The candidate policies: files, directories, or - (stdin).
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        #[command(flatten)]
        recording: RecordingArgs,
        /// Beside the agent's policies in force (a candidate replaces the
        /// one of its name) rather than in their place.
        #[arg(long)]
        beside: bool,
    },
    /// Print the CustomResourceDefinitions of EgressPolicy and
    /// ClusterEgressPolicy (multi-document YAML); needs no agent.
    Crds {
        /// Write DIR/egresspolicies.yaml and DIR/clusteregresspolicies.yaml instead.
        #[arg(long, value_name = "DIR")]
        output: Option<PathBuf>,
    },
}

/// Where recorded traffic comes from.
#[derive(clap::Args)]
struct RecordingArgs {
    /// JSON-lines files of the `file` sink (repeatable; rotated ones too).
    /// Without: the agent's recent flows.
    #[arg(long = "from-file", value_name = "FILE")]
    record_files: Vec<PathBuf>,
    /// From the agent: how far back, e.g. 5m.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    since: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum GetWhat {
    Policies,
    /// Each rule's and policy default's hits, counted by the kernel.
    Rules,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Yaml,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let tls = ClientTls {
        ca: cli.ca,
        cert: cli.cert,
        key: cli.key,
    };
    match &cli.command {
        Command::Crds { output } => return crds(output.as_deref()),
        Command::Suggest {
            recording,
            collapse_threshold,
            max_prefix_v4,
            max_prefix_v6,
        } => {
            let recording = read_recording(recording, &cli.agent, &tls).await?;
            let options = suggest::Options {
                collapse_threshold: *collapse_threshold,
                max_prefix_v4: *max_prefix_v4,
                max_prefix_v6: *max_prefix_v6,
            };
            print!(
                "{}",
                suggest::render(&suggest::suggest(&recording, &options))?
            );
            return Ok(());
        }
        Command::DryRun {
            files,
            recording,
            beside,
        } => return dry_run(files, recording, *beside, &cli.agent, &tls).await,
        _ => {}
    }
    // Local input is read once and checked before the agent is contacted.
    let documents = match &cli.command {
        Command::Apply { files, .. } => policy_files::load(files)?,
        _ => Vec::new(),
    };
    if let Command::Get {
        what: GetWhat::Rules,
        policy,
        unused_for,
        bpffs_root,
        state_dir,
        output,
    } = &cli.command
    {
        let request = api::ListRuleStatsRequest {
            policy: policy.clone().unwrap_or_default(),
            unused_for_seconds: unused_for.map_or(0, |d| d.as_secs()),
        };
        let answer = match connect(&cli.agent, &tls).await {
            Ok(channel) => AgentServiceClient::new(channel)
                .list_rule_stats(request.clone())
                .await
                .map(|r| r.into_inner().rules)
                .map_err(|status| (status.code() == tonic::Code::Unavailable, failed(status))),
            Err(error) => Err((true, error.into())),
        };
        let rules = match answer {
            Ok(rules) => rules,
            Err((true, error)) => {
                eprintln!("the agent does not answer ({error}); reading the pinned counters");
                rule_stats::read_pinned(
                    bpffs_root,
                    state_dir,
                    policy.as_deref(),
                    request.unused_for_seconds,
                    unix_now_ns(),
                )
                .map_err(anyhow::Error::msg)?
            }
            Err((false, error)) => return Err(error),
        };
        match output {
            Format::Json => println!("{}", serde_json::to_string_pretty(&rules)?),
            Format::Yaml => print!("{}", serde_yaml_ng::to_string(&rules)?),
            Format::Table => print!("{}", rule_stats::table(&rules, unix_now_ns())),
        }
        return Ok(());
    }
    let channel = connect(&cli.agent, &tls).await?;
    let mut policies = PolicyServiceClient::new(channel.clone())
        .max_decoding_message_size(server::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(server::MAX_MESSAGE_BYTES);
    match cli.command {
        Command::Apply {
            dry_run,
            expected_generation,
            ..
        } => {
            let request = api::ApplyPoliciesRequest {
                policies: documents,
                expected_generation,
                dry_run,
            };
            print_changes(
                &policies
                    .apply_policies(request)
                    .await
                    .map_err(failed)?
                    .into_inner(),
            );
        }
        Command::Delete {
            names,
            dry_run,
            expected_generation,
        } => {
            let request = api::DeletePoliciesRequest {
                names,
                expected_generation,
                dry_run,
            };
            print_changes(
                &policies
                    .delete_policies(request)
                    .await
                    .map_err(failed)?
                    .into_inner(),
            );
        }
        Command::Get {
            what: GetWhat::Rules,
            ..
        } => unreachable!("handled before connecting"),
        Command::Get {
            what: GetWhat::Policies,
            output,
            ..
        } => {
            let list = policies
                .list_policies(api::ListPoliciesRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            match output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&list.policies)?),
                Format::Yaml => {
                    for policy in &list.policies {
                        print!("---\n{}", serde_yaml_ng::to_string(policy)?);
                    }
                }
                Format::Table => {
                    let modes = policies
                        .get_mode(api::GetModeRequest {})
                        .await
                        .map_err(failed)?
                        .into_inner();
                    print!("{}", policy_table(&list, &modes));
                }
            }
        }
        Command::Mode { mode, policy } => {
            let settings = match mode {
                Some(mode) => {
                    let request = api::SetModeRequest {
                        mode,
                        policy: policy.unwrap_or_default(),
                    };
                    policies
                        .set_mode(request)
                        .await
                        .map_err(failed)?
                        .into_inner()
                }
                None => policies
                    .get_mode(api::GetModeRequest {})
                    .await
                    .map_err(failed)?
                    .into_inner(),
            };
            println!("global: {}", settings.global);
            let mut overrides: Vec<_> = settings.policy_overrides.iter().collect();
            overrides.sort();
            for (name, mode) in overrides {
                println!("{name}: {mode}");
            }
        }
        Command::Flows {
            follow,
            verdict,
            namespace,
            pod,
            dst,
            dst_name,
            policy,
            since,
            output,
        } => {
            let filter = api::FlowFilter {
                verdicts: verdict,
                namespace: namespace.unwrap_or_default(),
                pod: pod.unwrap_or_default(),
                destination_cidr: dst.unwrap_or_default(),
                destination_name: dst_name.unwrap_or_default(),
                policy: policy.unwrap_or_default(),
                since_seconds: u32::try_from(since.as_secs()).unwrap_or(u32::MAX),
                follow,
            };
            let mut stream = FlowServiceClient::new(channel)
                .stream_flows(filter)
                .await
                .map_err(failed)?
                .into_inner();
            if output == Format::Table {
                println!(
                    "{:<30} {:<8} {:<8} {:<24} {:<16} {:<28} POLICY/RULE",
                    "TIME", "VERDICT", "PROTO", "SOURCE", "COMM", "DESTINATION"
                );
            }
            while let Some(flow) = stream.next().await {
                let flow = flow.map_err(failed)?;
                match output {
                    Format::Table => println!("{}", flow_row(&flow)),
                    Format::Json => println!("{}", serde_json::to_string(&flow)?),
                    Format::Yaml => print!("---\n{}", serde_yaml_ng::to_string(&flow)?),
                }
            }
        }
        Command::Status { output } => {
            let status = AgentServiceClient::new(channel)
                .status(api::StatusRequest {})
                .await
                .map_err(failed)?
                .into_inner();
            match output {
                Format::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                Format::Yaml => print!("{}", serde_yaml_ng::to_string(&status)?),
                Format::Table => print!("{}", status_text(&status)),
            }
        }
        Command::LogLevel { filter } => {
            let mut client = AgentServiceClient::new(channel);
            let level = match filter {
                Some(filter) => client.set_log_level(api::LogLevel { filter }).await,
                None => client.get_log_level(api::GetLogLevelRequest {}).await,
            };
            println!("{}", level.map_err(failed)?.into_inner().filter);
        }
        Command::Crds { .. } | Command::Suggest { .. } | Command::DryRun { .. } => {
            unreachable!("handled before connecting")
        }
    }
    Ok(())
}

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `tollgatectl crds`: the CRDs on stdout, or one file each in `dir`.
fn crds(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    use tollgate_agent::cluster::crd;

    let definitions = crd::custom_resource_definitions();
    let Some(dir) = dir else {
        let documents: Vec<String> = definitions.iter().map(crd::to_yaml).collect();
        print!("{}", documents.join("---\n"));
        return Ok(());
    };
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for definition in &definitions {
        let (_, file) = crd::FILES
            .iter()
            .find(|(kind, _)| *kind == definition.spec.names.kind)
            .expect("a file for each kind");
        let path = dir.join(file);
        std::fs::write(&path, crd::to_yaml(definition))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The records of the files given, or else the agent's recent flows.
async fn read_recording(
    args: &RecordingArgs,
    agent: &str,
    tls: &ClientTls,
) -> anyhow::Result<Recording> {
    use anyhow::Context;

    let mut recording = Recording::default();
    if args.record_files.is_empty() {
        let filter = api::FlowFilter {
            since_seconds: u32::try_from(args.since.as_secs()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        let flows: Vec<api::Flow> = FlowServiceClient::new(connect(agent, tls).await?)
            .stream_flows(filter)
            .await
            .map_err(failed)?
            .into_inner()
            .collect::<Result<_, _>>()
            .await
            .map_err(failed)?;
        recording.add_api_flows(&flows)?;
    }
    for path in &args.record_files {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        recording
            .read_json_lines(&text)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    if recording.lost > 0 {
        eprintln!(
            "the recording misses {} records the agent reported lost",
            recording.lost
        );
    }
    if recording.unplaced > 0 {
        eprintln!(
            "{} flow records left out: their cgroup was gone when they were made",
            recording.unplaced
        );
    }
    Ok(recording)
}

/// `tollgatectl dry-run`: the report on stdout; an error (exit status 1)
/// when anything that went through would be denied. Without record files
/// the agent replays its recent flows itself (`DryRun`).
async fn dry_run(
    files: &[PathBuf],
    args: &RecordingArgs,
    beside: bool,
    agent: &str,
    tls: &ClientTls,
) -> anyhow::Result<()> {
    let candidates = policy_files::load(files)?;
    let report = if args.record_files.is_empty() {
        let request = api::DryRunRequest {
            policies: candidates,
            beside,
            since_seconds: u32::try_from(args.since.as_secs()).unwrap_or(u32::MAX),
        };
        FlowServiceClient::new(connect(agent, tls).await?)
            .max_encoding_message_size(server::MAX_MESSAGE_BYTES)
            .dry_run(request)
            .await
            .map_err(failed)?
            .into_inner()
    } else {
        let in_force = if beside {
            PolicyServiceClient::new(connect(agent, tls).await?)
                .max_decoding_message_size(server::MAX_MESSAGE_BYTES)
                .list_policies(api::ListPoliciesRequest {})
                .await
                .map_err(failed)?
                .into_inner()
                .policies
        } else {
            Vec::new()
        };
        let policies = replay::candidate_set(&in_force, &candidates).map_err(|errors| {
            anyhow::anyhow!(
                "the candidates and the policies in force do not make a valid set:\n{}",
                tollgate_policy::document::describe(&errors)
            )
        })?;
        let recording = read_recording(args, agent, tls).await?;
        replay::to_api(&replay::replay(&recording, &policies))
    };
    print!("{}", replay::describe(&report));
    let denied = replay::newly_denied(&report);
    if denied > 0 {
        anyhow::bail!("{denied} recorded connections that went through would be denied");
    }
    Ok(())
}

fn failed(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

fn print_changes(changes: &api::PolicyChanges) {
    let suffix = if changes.dry_run { " (dry run)" } else { "" };
    for change in &changes.changes {
        println!("{} {}{suffix}", change.policy, change.change);
    }
    println!("generation {}", changes.generation);
}

/// MODE is the policy's effective mode: an override set with `mode
/// --policy` wins over spec.mode, which wins over the global mode. SOURCE
/// is `local` or `cluster (generation N)`, the resource's generation in force.
fn policy_table(list: &api::ListPoliciesResponse, modes: &api::ModeSettings) -> String {
    let mut out = format!(
        "{:<32} {:<18} {:<8} {:<6} {:<24} {}\n",
        "NAME", "MODE", "DEFAULT", "RULES", "SOURCE", "SELECTS"
    );
    for (i, policy) in list.policies.iter().enumerate() {
        let source = match list.sources.get(i) {
            Some(source) if source.source == "cluster" => {
                format!("cluster (generation {})", source.generation)
            }
            _ => "local".to_owned(),
        };
        let meta = policy.metadata.clone().unwrap_or_default();
        let spec = policy.spec.clone().unwrap_or_default();
        let name = if meta.namespace.is_empty() {
            meta.name
        } else {
            format!("{}/{}", meta.namespace, meta.name)
        };
        let selects = match (&spec.pod_selector, &spec.cgroup_selector) {
            (_, Some(cgroups)) => format!("cgroups {}", cgroups.paths.join(",")),
            (Some(pods), None) => {
                let mut labels: Vec<_> = pods
                    .match_labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                labels.sort();
                format!("pods {}", labels.join(","))
            }
            (None, None) => "pods (namespaces)".into(),
        };
        let mode = match (modes.policy_overrides.get(&name), spec.mode.as_str()) {
            (Some(mode), _) => format!("{mode} (set)"),
            (None, "") => format!("{} (global)", modes.global),
            (None, mode) => mode.to_owned(),
        };
        let default = if spec.default_action.is_empty() {
            "deny"
        } else {
            &spec.default_action
        };
        out.push_str(&format!(
            "{name:<32} {mode:<18} {default:<8} {:<6} {source:<24} {selects}\n",
            spec.egress.len()
        ));
    }
    out.push_str(&format!("generation {}\n", list.generation));
    out
}

fn flow_row(flow: &api::Flow) -> String {
    let src = flow.src.clone().unwrap_or_default();
    let dst = flow.dst.clone().unwrap_or_default();
    let source = src
        .pod
        .map(|p| format!("{}/{p}", src.namespace.unwrap_or_default()))
        .or(src.cgroup)
        .unwrap_or_default();
    let destination = format!("{}:{}", dst.fqdn.unwrap_or(dst.ip), dst.port);
    let policy = flow.policy.clone().unwrap_or_else(|| "-".into());
    format!(
        "{:<30} {:<8} {:<8} {:<24} {:<16} {:<28} {policy}/{}",
        flow.time, flow.verdict, flow.protocol, source, src.comm, destination, flow.rule
    )
}

fn status_text(status: &api::StatusResponse) -> String {
    let counters = status.counters.unwrap_or_default();
    let mut out = format!(
        "version: {}\nkernel: {}\nattached to: {}\nglobal mode: {}\npolicies: {} ({} from the cluster; generation {})\nendpoints: {}\ndatapath generation: {}\n",
        status.version,
        status.kernel,
        status.attach_cgroup,
        status.global_mode,
        status.policies,
        status.cluster_policies,
        status.policy_generation,
        status.endpoints,
        status.datapath_generation
    );
    for program in &status.programs {
        out.push_str(&format!(
            "program {}: {}\n",
            program.name, program.attachment
        ));
    }
    for degraded in &status.degraded {
        out.push_str(&format!(
            "DEGRADED {}: the kernel refused {} ({}); {}\n",
            degraded.feature, degraded.program, degraded.reason, degraded.consequence
        ));
    }
    out.push_str(&format!(
        "decisions: {} allowed ({} not reported again), {} denied, {} audit; {} events lost (ring buffer full)\n",
        counters.allowed, counters.allowed_deduplicated, counters.denied, counters.audit, counters.ringbuf_reserve_failed
    ));
    for map in &status.maps {
        out.push_str(&format!(
            "map {}: {}/{}\n",
            map.name, map.entries, map.capacity
        ));
    }
    out
}
