//! `tg-bench`: the benchmarks behind `cargo xtask bench`. Needs root and
//! the BPF object. Every comparison runs side by side in one run: each
//! subject is measured in turns with its baseline, so drift of the shared
//! machine hits both.
//!
//! `tg-bench run [--smoke] --out DIR` writes DIR/BENCHMARKS.md and
//! DIR/bench.json; `tg-bench load ...` is the load worker it spawns;
//! `tg-bench packet-hook [--smoke] [--seconds S] [--rounds N] [--out DIR]`
//! runs the packet hook section alone and prints its figures as JSON;
//! `tg-bench frame-hook` (same options) does the same for the frame hook;
//! `tg-bench connect [--smoke] [--seconds S] [--rounds N] [--sizes N,N]
//! [--out DIR]` the connect and sendto comparisons; `tg-bench control
//! [--smoke] [--agent-log FILTER] [--out DIR]` the control path (applies, a one-rule change,
//! starts, memory at scale).

mod bpf_stats;
mod cluster;
mod connect;
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
use report::Report;
use tollgate_tests::sh;

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
            let option = |name: &str| option(rest, name);
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
        // The connect and sendto comparisons alone: their rows as JSON
        // (and with --out DIR, a report of them alone, beside the run
        // before in DIR). --seconds and --rounds set the turns' length
        // and number, --sizes the rule counts (comma-separated).
        ["connect", rest @ ..] => {
            let mut plan = Plan::new(rest.contains(&"--smoke"));
            let option = |name: &str| option(rest, name);
            if let Some(seconds) = option("--seconds") {
                plan.connect_seconds = seconds.parse().expect("--seconds S");
            }
            if let Some(rounds) = option("--rounds") {
                plan.connect_rounds = rounds.parse().expect("--rounds N");
            }
            if let Some(sizes) = option("--sizes") {
                plan.sizes = sizes
                    .split(',')
                    .map(|n| n.parse().expect("--sizes N,N,..."))
                    .collect();
            }
            let mut report = Report::new(plan.smoke);
            connect::measure(&plan, &mut report);
            println!("{}", serde_json::to_string_pretty(&report.connect).unwrap());
            if let Some(out) = option("--out") {
                std::fs::create_dir_all(out).unwrap();
                report.write(Path::new(out));
            }
        }
        // The control path alone: its figures as JSON (and with --out
        // DIR, a report of it alone, beside the run before in DIR).
        // --agent-log FILTER: the agent logs at that level (`debug` gives
        // each apply's steps and their times), and its lines up to the end
        // of the one-rule changes go to stderr.
        ["control", rest @ ..] => {
            let mut plan = Plan::new(rest.contains(&"--smoke"));
            plan.agent_log = option(rest, "--agent-log").map(str::to_owned);
            let mut report = Report::new(plan.smoke);
            control::measure(&plan, &mut report);
            println!("{}", serde_json::to_string_pretty(&report.control).unwrap());
            if let Some(out) = option(rest, "--out") {
                std::fs::create_dir_all(out).unwrap();
                report.write(Path::new(out));
            }
        }
        ["dns-rtt", cgroup, resolver, rounds] => {
            learned::rtt(cgroup, resolver, rounds.parse().expect("rounds"))
        }
        ["run", rest @ ..] => {
            let smoke = rest.contains(&"--smoke");
            let out = option(rest, "--out").map(PathBuf::from).expect("--out DIR");
            run(&Plan::new(smoke), &out);
        }
        _ => {
            eprintln!(
                "usage: tg-bench run [--smoke] --out DIR | tg-bench packet-hook|frame-hook [--smoke] [--seconds S] [--rounds N] [--out DIR] | tg-bench connect [--smoke] [--seconds S] [--rounds N] [--sizes N,N,...] [--out DIR] | tg-bench control [--smoke] [--agent-log FILTER] [--out DIR]"
            );
            std::process::exit(2);
        }
    }
}

/// The word after `name` in `args`, if `name` is there.
fn option<'a>(args: &[&'a str], name: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| *a == name)
        .and_then(|i| args.get(i + 1))
        .copied()
}

/// A section of the benchmarks: what it measures, into the report.
type Section = fn(&Plan, &mut Report);

/// How much to measure.
pub struct Plan {
    pub smoke: bool,
    /// Rule counts for the connect comparison.
    pub sizes: Vec<usize>,
    /// Seconds per measurement (and per turn with the kernel's statistics
    /// on), and turns per comparison of DNS latency.
    pub seconds: f64,
    pub rounds: usize,
    /// Connect and sendto comparisons: seconds per turn, and rounds of a
    /// turn of each side per row.
    pub connect_seconds: f64,
    pub connect_rounds: usize,
    /// Aimed event rates for the pipeline (0: as fast as the sender goes).
    pub rates: Vec<u64>,
    /// Control path: endpoints, and rules across them.
    pub endpoints: usize,
    pub control_rules: usize,
    pub memory_rules: usize,
    /// The agent's log filter in the control path, when its lines are
    /// wanted.
    pub agent_log: Option<String>,
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
                connect_seconds: 0.1,
                connect_rounds: 2,
                rates: vec![20_000],
                endpoints: 20,
                control_rules: 200,
                memory_rules: 1_000,
                agent_log: None,
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
                connect_seconds: 0.25,
                connect_rounds: 30,
                rates: vec![50_000, 100_000, 200_000, 300_000, 0],
                endpoints: 1_000,
                control_rules: 10_000,
                memory_rules: 100_000,
                agent_log: None,
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
    let sections: [(&str, Section); 7] = [
        ("connect and sendto", connect::measure),
        ("packet hook", packet_hook::measure),
        ("frame hook", frame_hook::measure),
        ("DNS learning", learned::learning_rate),
        ("event pipeline", pipeline::measure),
        ("control path", control::measure),
        ("cluster", cluster::measure),
    ];
    for (name, measure) in sections {
        let started = std::time::Instant::now();
        measure(plan, &mut report);
        eprintln!(
            "tg-bench: {name} took {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
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
