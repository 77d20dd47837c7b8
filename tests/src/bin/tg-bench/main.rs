//! `tg-bench`: the benchmarks behind `cargo xtask bench`. Needs root and
//! the BPF object. Every comparison runs side by side in one run: each
//! subject is measured in turns with its baseline, so drift of the shared
//! machine hits both.
//!
//! `tg-bench run [--smoke] --out DIR` writes DIR/BENCHMARKS.md and
//! DIR/bench.json; `tg-bench load ...` is the load worker it spawns;
//! `tg-bench packet-hook [--smoke] [--seconds S] [--rounds N] [--out DIR]`
//! runs the packet hook section alone and prints its figures as JSON;
//! `tg-bench frame-hook` (same options) does the same for the frame hook.

mod cluster;
mod control;
mod frame_hook;
mod learned;
mod load;
mod packet_hook;
mod pipeline;
mod report;
mod rules;

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use load::{LoadResult, LoadSpec, Workload};
use report::{Comparison, Report};
use tollgate_tests::{AgentProcess, TempFile, TestCgroup, TestEnv, sh};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        // The receiver in another namespace, serving on an address there.
        ["load", cgroup, netns, workload, seconds, rate, remote @ ..]
            if matches!(remote.len(), 0 | 2) =>
        {
            load::run(&LoadSpec {
                cgroup,
                netns,
                workload: serde_json::from_value(serde_json::Value::from(*workload))
                    .expect("tcp, udp or tcp-stream"),
                seconds: seconds.parse().expect("seconds"),
                rate: rate.parse().expect("rate"),
                remote: match remote {
                    [netns, addr] => Some((*netns, addr.parse().expect("the receiver's address"))),
                    _ => None,
                },
            })
        }
        ["dns-ask", cgroup, resolver, seconds, names] => learned::ask_worker(
            cgroup,
            resolver,
            seconds.parse().expect("seconds"),
            names.parse().expect("names"),
        ),
        ["dns-serve", addr, names] => learned::serve(addr, names.parse().expect("names")),
        // The cluster benchmark alone, at one size: its figures as JSON.
        ["cluster", nodes, changes] => println!(
            "{}",
            serde_json::to_string_pretty(&cluster::measure_at(
                nodes.parse().expect("nodes"),
                changes.parse().expect("changes"),
            ))
            .unwrap()
        ),
        // The packet hook benchmark alone: its figures as JSON (and with
        // --out DIR, a report of it alone). --seconds and --rounds set its
        // turns' length and number.
        // The frame hook benchmark alone, the same way.
        [section @ ("packet-hook" | "frame-hook"), rest @ ..] => {
            let mut plan = Plan::new(rest.contains(&"--smoke"));
            let option = |name: &str| {
                rest.iter()
                    .position(|a| *a == name)
                    .and_then(|i| rest.get(i + 1))
            };
            if let Some(seconds) = option("--seconds") {
                plan.hook_seconds = seconds.parse().expect("--seconds S");
            }
            if let Some(rounds) = option("--rounds") {
                plan.hook_rounds = rounds.parse().expect("--rounds N");
            }
            let frames = *section == "frame-hook";
            let rows = if frames {
                frame_hook::rows(&plan)
            } else {
                packet_hook::rows(&plan)
            };
            println!("{}", serde_json::to_string_pretty(&rows).unwrap());
            // --out DIR: a report of this section alone as well.
            if let Some(out) = option("--out") {
                let mut report = Report::new(plan.smoke);
                for row in rows {
                    if frames {
                        report.frame_hook(row);
                    } else {
                        report.packet_hook(row);
                    }
                }
                std::fs::create_dir_all(out).unwrap();
                report.write(Path::new(out));
            }
        }
        ["dns-rtt", cgroup, resolver, rounds] => {
            learned::rtt(cgroup, resolver, rounds.parse().expect("rounds"))
        }
        ["run", rest @ ..] => {
            let smoke = rest.contains(&"--smoke");
            let out = rest
                .iter()
                .position(|a| *a == "--out")
                .and_then(|i| rest.get(i + 1))
                .map(PathBuf::from)
                .expect("--out DIR");
            run(&Plan::new(smoke), &out);
        }
        _ => {
            eprintln!(
                "usage: tg-bench run [--smoke] --out DIR | tg-bench packet-hook|frame-hook [--smoke] [--seconds S] [--rounds N] [--out DIR]"
            );
            std::process::exit(2);
        }
    }
}

/// How much to measure.
pub struct Plan {
    pub smoke: bool,
    /// Rule counts for the connect comparison.
    pub sizes: Vec<usize>,
    /// Seconds per measurement, and turns per comparison.
    pub seconds: f64,
    pub rounds: usize,
    /// Aimed event rates for the pipeline (0: as fast as the sender goes).
    pub rates: Vec<u64>,
    /// Control path: endpoints, and rules across them.
    pub endpoints: usize,
    pub control_rules: usize,
    pub memory_rules: usize,
    /// Simulated cluster sizes, and policy changes measured at each.
    pub cluster_nodes: Vec<usize>,
    pub cluster_changes: usize,
    /// Packet and frame hooks: seconds per turn, and turns per comparison
    /// (shorter and more than the others: their effect is small beside
    /// the drift of a shared machine, which finer turns follow more
    /// closely).
    pub hook_seconds: f64,
    pub hook_rounds: usize,
}

impl Plan {
    fn new(smoke: bool) -> Self {
        if smoke {
            Self {
                smoke,
                sizes: vec![0, 100],
                seconds: 0.2,
                rounds: 1,
                rates: vec![20_000],
                endpoints: 20,
                control_rules: 200,
                memory_rules: 1_000,
                cluster_nodes: vec![10, 20],
                cluster_changes: 1,
                hook_seconds: 0.1,
                hook_rounds: 2,
            }
        } else {
            Self {
                smoke,
                sizes: vec![0, 100, 10_000, 100_000],
                seconds: 1.0,
                rounds: 5,
                rates: vec![50_000, 100_000, 200_000, 300_000, 0],
                endpoints: 1_000,
                control_rules: 10_000,
                memory_rules: 100_000,
                cluster_nodes: vec![100, 1_000],
                cluster_changes: 5,
                hook_seconds: 0.25,
                hook_rounds: 30,
            }
        }
    }
}

fn run(plan: &Plan, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let mut report = Report::new(plan.smoke);
    connect_costs(plan, &mut report);
    packet_hook::measure(plan, &mut report);
    frame_hook::measure(plan, &mut report);
    learned::learning_rate(plan, &mut report);
    pipeline::measure(plan, &mut report);
    control::measure(plan, &mut report);
    cluster::measure(plan, &mut report);
    report.write(out);
    eprintln!("tg-bench: wrote {}", out.join("BENCHMARKS.md").display());
}

/// A network namespace of the benchmark's own, with loopback up.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: &str) -> Self {
        let name = format!("tgb-{name}-{}", std::process::id());
        sh("ip", &["netns", "add", &name]);
        sh("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Self(name)
    }

    /// Runs `program` inside the namespace, `input` on its stdin.
    pub fn exec(&self, program: &str, args: &[&str], input: &str) {
        use std::io::Write;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, program])
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{program} in {}: {}",
            self.0,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Where a load runs.
#[derive(Clone, Copy)]
pub struct Place<'a> {
    pub cgroup: &'a Path,
    pub netns: &'a Netns,
}

/// A load's receiver in another network namespace than its sender's,
/// serving on `addr` there.
#[derive(Clone, Copy)]
pub struct Remote<'a> {
    pub netns: &'a Netns,
    pub addr: Ipv4Addr,
}

/// One worker run, to a receiver on the namespace's loopback.
pub fn load(place: Place, workload: Workload, seconds: f64, rate: u64) -> LoadResult {
    load_to(place, None, workload, seconds, rate)
}

/// One worker run, to a receiver on the namespace's loopback or `remote`.
pub fn load_to(
    place: Place,
    remote: Option<Remote>,
    workload: Workload,
    seconds: f64,
    rate: u64,
) -> LoadResult {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command.args([
        "load",
        place.cgroup.to_str().unwrap(),
        &place.netns.0,
        workload.name(),
        &seconds.to_string(),
        &rate.to_string(),
    ]);
    if let Some(remote) = remote {
        command.args([&remote.netns.0, &remote.addr.to_string()]);
    }
    let output = command.output().expect("running the load worker");
    assert!(
        output.status.success(),
        "load worker: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the worker's result")
}

/// The subject and its baseline in turns; each side's runs merged.
fn compare(plan: &Plan, baseline: Place, subject: Place, workload: Workload) -> Comparison {
    let mut base = Vec::new();
    let mut with = Vec::new();
    for _ in 0..plan.rounds {
        base.push(load(baseline, workload, plan.seconds, 0));
        with.push(load(subject, workload, plan.seconds, 0));
    }
    Comparison::new(&base, &with)
}

/// Connect and sendto cost: nothing, Tollgate (observe, enforce at each
/// size), nftables sets and iptables chains of the same rules.
fn connect_costs(plan: &Plan, report: &mut Report) {
    let env = TestEnv::new("bench");
    let outside = TestCgroup::new("bench-base");
    let plain = Netns::new("plain");
    let nft = Netns::new("nft");
    let ipt = Netns::new("ipt");
    let glob = env.cgroup.relative.clone();
    let baseline = Place {
        cgroup: &outside.path,
        netns: &plain,
    };
    let tollgate = Place {
        cgroup: &env.cgroup.path,
        netns: &plain,
    };
    let largest = *plan.sizes.iter().max().unwrap();
    let all_prefixes = rules::prefixes(largest.max(100));
    let policy_file = |mode: &str, n: usize| {
        TempFile::new(
            &format!("bench-{mode}-{n}.yaml"),
            &rules::policy("bench", &glob, mode, &all_prefixes[..n]),
        )
    };

    let first = policy_file("observe", 100);
    let agent = AgentProcess::start(&env, &["--policy", first.path.to_str().unwrap()]);
    for workload in [Workload::Tcp, Workload::Udp] {
        eprintln!("tg-bench: {workload:?}: Tollgate observe, 100 rules");
        env.ctl(&["apply", "-f", first.path.to_str().unwrap()]).ok();
        report.connect(
            workload,
            "Tollgate observe",
            100,
            compare(plan, baseline, tollgate, workload),
        );
        for &n in &plan.sizes {
            eprintln!("tg-bench: {workload:?}: Tollgate enforce, {n} rules");
            let file = policy_file("enforce", n);
            env.ctl(&["apply", "-f", file.path.to_str().unwrap()]).ok();
            report.connect(
                workload,
                "Tollgate enforce",
                n,
                compare(plan, baseline, tollgate, workload),
            );
        }
        for &n in &plan.sizes {
            eprintln!("tg-bench: {workload:?}: nftables set, {n} rules");
            nft.exec("nft", &["-f", "-"], "flush ruleset\n");
            nft.exec("nft", &["-f", "-"], &rules::nftables(&all_prefixes[..n]));
            let subject = Place {
                cgroup: &outside.path,
                netns: &nft,
            };
            report.connect(
                workload,
                "nftables set",
                n,
                compare(plan, baseline, subject, workload),
            );
            eprintln!("tg-bench: {workload:?}: iptables chain, {n} rules");
            ipt.exec(
                "iptables-restore",
                &[],
                &rules::iptables(&all_prefixes[..n]),
            );
            let subject = Place {
                cgroup: &outside.path,
                netns: &ipt,
            };
            report.connect(
                workload,
                "iptables chain",
                n,
                compare(plan, baseline, subject, workload),
            );
        }
    }
    drop(agent);

    // Loopback allowed by a name rule, with 1k addresses learned for it.
    let by_name = TempFile::new(
        "bench-by-name.yaml",
        &rules::policy_by_name("bench", &glob, &all_prefixes[..100]),
    );
    let agent = AgentProcess::start(&env, &["--policy", by_name.path.to_str().unwrap()]);
    learned::install(&env, learned::LEARNED_IN_COMPARISON);
    for workload in [Workload::Tcp, Workload::Udp] {
        eprintln!("tg-bench: {workload:?}: Tollgate enforce, 100 rules, loopback by name");
        report.connect(
            workload,
            learned::SUBJECT,
            100,
            compare(plan, baseline, tollgate, workload),
        );
    }
    drop(agent);

    // The kernel's own suppression instead of a per-connection event: what
    // the aggregate mode's events cost.
    let n = plan.sizes[plan.sizes.len().min(3) - 1];
    let file = policy_file("enforce", n);
    let agent = AgentProcess::start(
        &env,
        &[
            "--policy",
            file.path.to_str().unwrap(),
            "--allowed-flows",
            "first",
        ],
    );
    for workload in [Workload::Tcp, Workload::Udp] {
        eprintln!("tg-bench: {workload:?}: Tollgate enforce, --allowed-flows first, {n} rules");
        report.connect(
            workload,
            "Tollgate enforce, allowed-flows first",
            n,
            compare(plan, baseline, tollgate, workload),
        );
    }
    drop(agent);
    env.cleanup_pins();
}
