//! The event pipeline: every unconnected UDP send from the benchmark's
//! cgroup is an audit decision (observe mode, deny-all policy), so each is
//! an event through the ring buffer, decoding, enrichment, formatting and
//! a JSON-lines file sink. Sent at given rates; counted at the end: records
//! written, ring-buffer losses and sink drops, and the agent's CPU time.

use std::time::{Duration, Instant};

use tollgate_tests::{AgentProcess, TempFile, TestDir, TestEnv, free_port, http_get};

use crate::{
    Netns, Place, Plan, load,
    load::Workload,
    report::{PipelineRun, Report},
};

/// What the agent has done so far, from its metrics and /proc.
struct Sample {
    records: u64,
    kernel_losses: u64,
    sink_drops: u64,
    cpu_seconds: f64,
}

fn sum(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn sample(port: u16, pid: u32) -> Sample {
    let (_, metrics) = http_get(port, "/metrics");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th of the line.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Sample {
        records: sum(&metrics, "tollgate_flow_records_total{verdict=\"audit\""),
        kernel_losses: sum(&metrics, "tollgate_ringbuf_reserve_failures_total"),
        sink_drops: sum(&metrics, "tollgate_export_dropped_records_total"),
        cpu_seconds: ticks as f64 / ticks_per_second,
    }
}

pub fn measure(plan: &Plan, report: &mut Report) {
    let env = TestEnv::new("bench-pipeline");
    let netns = Netns::new("pipeline");
    let sink_dir = TestDir::new("bench-sink");
    let policy = TempFile::new(
        "bench-pipeline.yaml",
        &format!(
            "apiVersion: policy.tollgate.dev/v1alpha1\nkind: EgressPolicy\nmetadata:\n  name: deny-all\n\
             spec:\n  cgroupSelector:\n    paths: [\"{}\"]\n  mode: observe\n  egress:\n\
             \x20\x20- {{name: documentation-only, to: [{{cidr: 192.0.2.0/24}}]}}\n",
            env.cgroup.relative
        ),
    );
    let port = free_port();
    let sink = format!(
        "{{name: bench, type: file, path: {}, maxFileBytes: 268435456, maxFiles: 1}}",
        sink_dir.path.join("flows.jsonl").display()
    );
    let agent = AgentProcess::start(
        &env,
        &[
            "--policy",
            policy.path.to_str().unwrap(),
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
            "--sink",
            &sink,
        ],
    );
    let pid = agent.pid();
    let place = Place {
        cgroup: &env.cgroup.path,
        netns: &netns,
    };
    for &rate in &plan.rates {
        eprintln!("tg-bench: pipeline at {rate} events/s (0: as fast as possible)");
        let before = sample(port, pid);
        let sent = load(place, Workload::Udp, plan.seconds * 2.0, rate);
        // The agent finishes what the kernel handed it; then count.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut after = sample(port, pid);
        while after.records + after.kernel_losses < before.records + before.kernel_losses + sent.ops
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(50));
            after = sample(port, pid);
        }
        report.pipeline(PipelineRun {
            aimed_rate: rate,
            sent: sent.ops,
            seconds: sent.seconds,
            records: after.records - before.records,
            kernel_losses: after.kernel_losses - before.kernel_losses,
            sink_drops: after.sink_drops - before.sink_drops,
            agent_cpu_seconds: after.cpu_seconds - before.cpu_seconds,
        });
    }
    drop(agent);
    env.cleanup_pins();
}
