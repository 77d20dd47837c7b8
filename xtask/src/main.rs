//! Project tasks: `cargo xtask <build|test|run|lint|bench|fuzz|kernels|image>`.
//!
//! Every task first runs `scripts/setup.sh`, which installs what is missing
//! (nightly rust-src, LLVM 22, bpf-linker, the test peers) and skips what is
//! there, so each works on a fresh machine.

mod chart;
mod image;
mod kernels;
mod siem;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the BPF object, then the agent and the tools.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run the whole test suite, root tests included (needs root and BPF).
    Test {
        /// Extra arguments for the test binaries, e.g. a name filter.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Build, then run the agent (release) with the given arguments.
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Formatting, clippy and the deployment files, as CI checks them.
    Lint,
    /// The benchmarks (release build, needs root): BENCHMARKS.md and
    /// bench.json in the workspace root, or with --smoke a quick check that
    /// they still run, written to target/bench-smoke.
    Bench {
        #[arg(long)]
        smoke: bool,
    },
    /// Fuzz the DNS parser against hickory-proto and the TCP reassembly
    /// (dns/fuzz), each target for this many seconds; installs cargo-fuzz
    /// if missing.
    Fuzz {
        #[arg(default_value_t = 60)]
        seconds: u64,
    },
    /// The agent's image (buildah, from scratch, from the binaries the
    /// tests run) as target/image/tollgate-agent.oci.tar; with --test, run
    /// it under podman as deploy/daemonset.yaml runs it (needs root).
    Image {
        #[arg(long)]
        test: bool,
    },
    /// A core set of the root tests inside Debian's 6.1 and 5.10 kernels
    /// under qemu (needs root); the report goes to target/kernels/report.*.
    Kernels {
        /// Only this kernel, 6.1 or 5.10 (repeatable); both without it.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Extra tests to run besides the core set: each test of
        /// tollgate-tests whose name contains one of these.
        #[arg(last = true)]
        filters: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let root = workspace_root();
    match Cli::parse().task {
        Task::Build { release } => build(&root, release),
        Task::Test { args } => test(&root, &args),
        Task::Run { args } => {
            build(&root, true)?;
            let agent = root.join("target/release/tollgate-agent");
            run(Command::new(agent).args(args))
        }
        Task::Lint => lint(&root),
        Task::Bench { smoke } => bench(&root, smoke),
        Task::Fuzz { seconds } => fuzz(&root, seconds),
        Task::Kernels { kernels, filters } => kernels::kernels(&root, &kernels, &filters),
        Task::Image { test } => {
            build(&root, false)?;
            image::build(&root)?;
            if test {
                image::test(&root)?;
            }
            Ok(())
        }
    }
}

fn fuzz(root: &Path, seconds: u64) -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    }
    for target in ["dns_answer", "tcp_streams"] {
        run(Command::new("cargo")
            .current_dir(root.join("dns/fuzz"))
            .arg(format!("+{}", nightly()))
            .args(["fuzz", "run", target, "--"])
            .arg(format!("-max_total_time={seconds}")))
        .with_context(|| format!("fuzzing {target}"))?;
    }
    Ok(())
}

fn bench(root: &Path, smoke: bool) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the benchmarks load BPF programs and make cgroups and network namespaces: run as root"
        );
    }
    build(root, true)?;
    let out = if smoke {
        root.join("target/bench-smoke")
    } else {
        root.to_owned()
    };
    let mut bench = Command::new(root.join("target/release/tg-bench"));
    bench.arg("run").arg("--out").arg(&out);
    if smoke {
        bench.arg("--smoke");
    }
    // How long the benchmarks themselves take (the build before not
    // counted), so that a change to their plan shows in what it costs.
    let started = std::time::Instant::now();
    run(&mut bench)?;
    let took = started.elapsed().as_secs();
    println!("benchmarks: {} min {} s", took / 60, took % 60);
    Ok(())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_owned()
}

fn setup(root: &Path) -> anyhow::Result<()> {
    run(Command::new("bash").arg(root.join("scripts/setup.sh")))
}

/// Builds agent-ebpf for bpfel-unknown-none with nightly (its
/// .cargo/config.toml sets the target and build-std).
fn build_bpf(root: &Path) -> anyhow::Result<()> {
    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(root.join("agent-ebpf"))
        .arg(format!("+{}", nightly()))
        .args(["build", "--release"]);
    // Variables set by the outer (stable) cargo would leak into the nested
    // nightly build and break it.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
    ] {
        cargo.env_remove(var);
    }
    run(&mut cargo).context("building the BPF programs")
}

/// The nightly toolchain for the BPF build: `nightly` unless
/// TOLLGATE_NIGHTLY names another (the container image pins a dated one).
fn nightly() -> String {
    std::env::var("TOLLGATE_NIGHTLY").unwrap_or_else(|_| "nightly".into())
}

fn build(root: &Path, release: bool) -> anyhow::Result<()> {
    setup(root)?;
    build_bpf(root)?;
    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(root)
        .args(["build", "--workspace", "--bins"]);
    if release {
        cargo.arg("--release");
    }
    run(&mut cargo)
}

fn test(root: &Path, args: &[String]) -> anyhow::Result<()> {
    if !is_root() {
        bail!(
            "the root tests load BPF programs and create cgroups and network namespaces: run as root"
        );
    }
    build(root, false)?;
    // Root tests are #[ignore]d so that a plain `cargo test` runs anywhere;
    // here they run too. Each makes its own cgroup, netns and pins, so they
    // may run in parallel. (--all-targets: there are no doc tests.)
    let mut child = Command::new("cargo")
        .current_dir(root)
        .args([
            "test",
            "--workspace",
            "--all-targets",
            "--",
            "--include-ignored",
            // Needs the image: `cargo xtask image --test` runs it.
            "--skip",
            "the_image_runs_as_the_daemonset_runs_it",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let mut totals = TestTotals::default();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        totals.add(&line);
    }
    let status = child.wait()?;
    println!(
        "tests: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() {
        bail!("cargo test failed: {status}");
    }
    if totals.passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

/// Sums libtest's `test result:` lines over all test binaries.
#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl TestTotals {
    fn add(&mut self, line: &str) {
        let Some(summary) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in summary.split(['.', ';']) {
            let mut words = part.split_whitespace();
            let (Some(count), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match what {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

fn lint(root: &Path) -> anyhow::Result<()> {
    // The manifests against the Kubernetes schemas (offline), the Dockerfile
    // against hadolint. PodMonitor and Kustomization have no schema there.
    // Nor have the policy resources (examples/cluster): cluster::crd's tests
    // check those against the generated CRDs' schemas and CEL rules, and the
    // committed CRDs against the generator.
    let deploy = root.join("deploy");
    run(Command::new("kubernetes-validate")
        .current_dir(&deploy)
        .args([
            "--strict",
            "namespace.yaml",
            "rbac.yaml",
            "configmap.yaml",
            "daemonset.yaml",
            "status-writer.yaml",
            "crds/egresspolicies.yaml",
            "crds/clusteregresspolicies.yaml",
        ]))?;
    run(Command::new("hadolint").arg(deploy.join("Dockerfile")))?;
    chart::check(root)?;
    siem::check(root)?;
    check_policy_core_is_pure(root)?;
    run(Command::new("cargo")
        .current_dir(root)
        .args(["fmt", "--all", "--", "--check"]))?;
    run(Command::new("cargo")
        .current_dir(root.join("agent-ebpf"))
        .arg(format!("+{}", nightly()))
        .args(["fmt", "--", "--check"]))?;
    run(Command::new("cargo").current_dir(root).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
}

/// The pure crates (the policy core, and the advisor built on it) stay free
/// of BPF, the async runtime and the gRPC transport: a dependency that
/// brings one in fails the lint, not a review.
fn check_policy_core_is_pure(root: &Path) -> anyhow::Result<()> {
    for core in ["tollgate-policy", "tollgate-advisor"] {
        check_crate_is_pure(root, core)?;
    }
    Ok(())
}

fn check_crate_is_pure(root: &Path, core: &str) -> anyhow::Result<()> {
    const FORBIDDEN: [&str; 6] = ["aya", "tokio", "tonic", "mio", "hyper", "libc"];
    let output = Command::new("cargo")
        .current_dir(root)
        .args(["tree", "-p", core, "-e", "normal", "--prefix", "none"])
        .output()
        .context("running cargo tree")?;
    if !output.status.success() {
        bail!(
            "cargo tree -p {core} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let tree = String::from_utf8(output.stdout)?;
    let found: Vec<&str> = tree
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| FORBIDDEN.contains(name))
        .collect();
    if !found.is_empty() {
        bail!("{core} must stay pure, but depends on {found:?}");
    }
    Ok(())
}

/// The effective uid, from /proc so xtask needs no libc binding.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}
