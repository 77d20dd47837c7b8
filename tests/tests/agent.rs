//! The agent binary: flow records on stdout, enforcement that outlives the
//! process, adoption of pins on restart, and cleanup.
//!
//! These tests need root and the BPF object: `cargo xtask test` runs them.

use std::{collections::BTreeMap, time::Duration};

use tollgate_agent::datapath::{DatapathError, DatapathOptions, PROGRAMS, raw_bpf};
use tollgate_common::{PIN_LAYOUT_VERSION, map_names};
use tollgate_policy::{
    compiled::{PortRuleSpec, RuleSet, SetRules},
    model::{Action, PolicyMode, PortRange, Protocol},
};
use tollgate_tests::{
    AgentProcess, TempFile, TestEnv, allow_all_connect4, connect4_programs_attached, free_port,
    host_policy, http_get,
};

const EPERM: i32 = libc::EPERM;
const WAIT: Duration = Duration::from_secs(5);

/// Deny `host:port`/TCP for the test's cgroup with rule 77, enforced.
fn deny_port(env: &TestEnv, host: std::net::Ipv4Addr, port: u16) {
    let mut dp = env.open_datapath();
    let rules = RuleSet {
        sets: vec![std::sync::Arc::new(SetRules {
            default_action: Action::Allow,
            default_mode: PolicyMode::Inherit,
            default_hits_id: 0,
            v4: vec![(
                format!("{host}/32").parse().unwrap(),
                vec![PortRuleSpec {
                    ports: PortRange::single(port),
                    protocol: Protocol::Tcp,
                    action: Action::Deny,
                    mode: PolicyMode::Enforce,
                    rule_id: 77,
                    order: 0,
                }],
            )],
            v6: vec![],
            fqdn: vec![],
        })],
        endpoints: BTreeMap::from([(env.cgroup.id, 0)]),
        ..RuleSet::default()
    };
    dp.switch_rules(&rules).unwrap();
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn prints_one_json_flow_record_per_decision() {
    let mut env = TestEnv::new("json");
    let host = env.add_host(10, &[8080]).v4;
    let agent = AgentProcess::start(
        &env,
        &["--mode", "enforce", "--allowed-report-interval", "0"],
    );
    deny_port(&env, host, 8081);

    let allowed = env.probe(&["connect", "tcp", &format!("{host}:8080")]);
    assert_eq!(allowed.result(), Ok(()));
    let denied = env.probe(&["connect", "tcp", &format!("{host}:8081")]);
    assert_eq!(denied.result(), Err(EPERM));

    let first = agent.next_record(WAIT);
    let second = agent.next_record(WAIT);
    assert_eq!(first["verdict"], "allowed");
    assert_eq!(first["rule"], "default");
    assert_eq!(first["src"]["pid"], allowed.pid);
    assert_eq!(second["verdict"], "denied");
    assert_eq!(second["mode"], "enforce");
    assert_eq!(second["protocol"], "tcp");
    assert_eq!(second["hook"], "connect4");
    assert_eq!(second["node"], "test-node");
    assert_eq!(second["src"]["cgroup_id"], env.cgroup.id);
    assert_eq!(second["src"]["cgroup"], env.cgroup.relative);
    assert_eq!(second["src"]["pid"], denied.pid);
    assert_eq!(second["src"]["comm"], "tg-probe");
    assert_eq!(second["src"]["uid"], 0);
    assert_eq!(second["dst"]["ip"], host.to_string());
    assert_eq!(second["dst"]["port"], 8081);
    assert_eq!(second["policy"], serde_json::Value::Null);
    assert_eq!(second["rule"], "rule-77");
    assert_eq!(second["rule_id"], 77);
    assert_eq!(
        second["seq"].as_u64().unwrap(),
        first["seq"].as_u64().unwrap() + 1
    );
    let time = second["time"].as_str().unwrap();
    assert_eq!(time.len(), "2026-11-24T08:00:00.123456789Z".len(), "{time}");
    assert!(time.ends_with('Z'));
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn allowed_flows_are_aggregated_per_interval_and_denials_reported_at_once() {
    let mut env = TestEnv::new("aggregate");
    let host = env.add_host(17, &[8080]).v4;
    let agent = AgentProcess::start(
        &env,
        &["--mode", "enforce", "--allowed-report-interval", "2s"],
    );
    deny_port(&env, host, 8081);
    let connect = |port: u16, count: usize| {
        let run = env.probe(&[
            "--count",
            &count.to_string(),
            "connect",
            "tcp",
            &format!("{host}:{port}"),
        ]);
        assert_eq!(run.results.len(), count);
        run
    };

    let first_allowed = connect(8080, 5);
    assert!(first_allowed.results.iter().all(Result::is_ok));
    let denied = connect(8081, 2);
    assert!(denied.results.iter().all(|r| *r == Err(EPERM)));
    connect(8080, 3);

    // Each denial at once, on its own; the allowed flow's interval is open.
    for _ in 0..2 {
        let record = agent.next_record(WAIT);
        assert_eq!(record["verdict"], "denied");
        assert_eq!(record["summary"], serde_json::Value::Null);
    }
    let aggregate = agent.next_record(WAIT);
    assert_eq!(aggregate["verdict"], "allowed");
    assert_eq!(aggregate["dst"]["port"], 8080);
    assert_eq!(
        aggregate["src"]["pid"], first_allowed.pid,
        "the first connection's"
    );
    let summary = &aggregate["summary"];
    assert_eq!(summary["count"], 8, "{aggregate}");
    assert_eq!(summary["first_time"], aggregate["time"]);
    assert!(summary["last_time"].as_str() > summary["first_time"].as_str());

    // With --allowed-flows first the kernel reports the first connection of
    // the interval only, without a count.
    drop(agent);
    let agent = AgentProcess::start(
        &env,
        &[
            "--allowed-report-interval",
            "1h",
            "--allowed-flows",
            "first",
        ],
    );
    let run = connect(8080, 3);
    let record = agent.next_record(WAIT);
    assert_eq!(record["src"]["pid"], run.pid);
    assert_eq!(record["summary"], serde_json::Value::Null);
    connect(8081, 1);
    assert_eq!(
        agent.next_record(WAIT)["verdict"],
        "denied",
        "no other allowed record"
    );
}

/// Sums the connections that the allowed records to `port` stand for,
/// reading records until none comes for a while; also returns the records.
fn allowed_to(agent: &AgentProcess, port: u16) -> (u64, Vec<serde_json::Value>) {
    let records: Vec<_> = agent
        .records_until_quiet(Duration::from_secs(3))
        .into_iter()
        .filter(|r| r["verdict"] == "allowed" && r["dst"]["port"] == port)
        .collect();
    let count = records
        .iter()
        .map(|r| r["summary"]["count"].as_u64().unwrap_or(1))
        .sum();
    (count, records)
}

/// The aggregate mode counts allowed flows in the kernel: every allowed
/// connection is in exactly one record's count, across intervals, a rule
/// switch, a graceful restart (connections while the agent is away
/// included) and a crash.
#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn kernel_counted_allowed_connections_are_each_reported_once() {
    let mut env = TestEnv::new("counted");
    let host = env.add_host(18, &[8080]).v4;
    let first = TempFile::new(
        "counted-first.yaml",
        &host_policy("counted", &env.cgroup.relative, "enforce", host),
    );
    let second = TempFile::new(
        "counted-second.yaml",
        &format!(
            "{}  - name: other\n    to: [{{cidr: {host}/32}}]\n    ports: [{{port: 9090, protocol: TCP}}]\n",
            host_policy("counted", &env.cgroup.relative, "enforce", host)
        ),
    );
    let args = [
        "--mode",
        "enforce",
        "--allowed-report-interval",
        "1s",
        "--policy",
        first.path.to_str().unwrap(),
    ];
    let connect = |count: usize| {
        let run = env.probe(&[
            "--count",
            &count.to_string(),
            "connect",
            "tcp",
            &format!("{host}:8080"),
        ]);
        assert!(run.results.iter().all(Result::is_ok), "{:?}", run.results);
        run
    };

    let mut agent = AgentProcess::start(&env, &args);
    let opened = connect(20);
    env.ctl(&["apply", "-f", second.path.to_str().unwrap()])
        .ok();
    connect(15);
    std::thread::sleep(Duration::from_millis(1500));
    connect(10);
    agent.terminate();
    let (count, records) = allowed_to(&agent, 8080);
    assert_eq!(count, 45, "{records:#?}");
    assert!(
        records.len() >= 2,
        "the rule switch and the interval close counts: {records:#?}"
    );
    assert_eq!(
        records[0]["src"]["pid"], opened.pid,
        "the first connection's"
    );
    assert!(
        records
            .iter()
            .all(|r| r["rule"] == "web" && r["policy"] == "counted"),
        "{records:#?}"
    );

    // While no agent runs, the kernel counts on; the next agent reports it
    // as it starts.
    let away = connect(5);
    let mut agent = AgentProcess::start(&env, &args);
    let record = agent.next_record(WAIT);
    assert_eq!(record["summary"]["count"], 5, "{record}");
    assert_eq!(
        record["src"]["pid"], away.pid,
        "the first connection while away, named from its event"
    );
    // A crash before the interval closes: the counts stay in the kernel.
    connect(7);
    agent.kill();
    let (crashed, records) = allowed_to(&agent, 8080);
    let mut agent = AgentProcess::start(&env, &args);
    agent.terminate();
    let (after, later) = allowed_to(&agent, 8080);
    assert_eq!(
        crashed + after,
        7,
        "reported before the crash: {records:#?}, after: {later:#?}"
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn enforcement_holds_while_the_agent_is_killed_and_after_it_restarts() {
    let mut env = TestEnv::new("restart");
    let host = env.add_host(11, &[8080]).v4;
    let connect = || env.probe(&["connect", "tcp", &format!("{host}:8080")]);

    let mut agent = AgentProcess::start(
        &env,
        &["--mode", "enforce", "--allowed-report-interval", "0"],
    );
    assert_eq!(
        agent.startup_lines_with("New"),
        PROGRAMS.len(),
        "{:#?}",
        agent.startup_log
    );
    deny_port(&env, host, 8080);
    assert_eq!(connect().result(), Err(EPERM));
    assert_eq!(agent.next_record(WAIT)["verdict"], "denied");

    agent.kill();
    let while_down = connect();
    assert_eq!(
        while_down.result(),
        Err(EPERM),
        "enforcement lapsed while the agent was down"
    );

    let restarted = AgentProcess::start(
        &env,
        &["--mode", "enforce", "--allowed-report-interval", "0"],
    );
    assert_eq!(
        restarted.startup_lines_with("Adopted"),
        PROGRAMS.len(),
        "{:#?}",
        restarted.startup_log
    );
    // The decision made while no agent ran waited in the ring buffer.
    let missed = restarted.next_record(WAIT);
    assert_eq!(
        (missed["verdict"].as_str(), missed["src"]["pid"].as_u64()),
        (Some("denied"), Some(u64::from(while_down.pid)))
    );
    let after = connect();
    assert_eq!(after.result(), Err(EPERM));
    let record = restarted.next_record(WAIT);
    assert_eq!(
        (record["verdict"].as_str(), record["src"]["pid"].as_u64()),
        (Some("denied"), Some(u64::from(after.pid)))
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn sigterm_stops_the_agent_and_leaves_the_programs_attached() {
    let mut env = TestEnv::new("sigterm");
    let host = env.add_host(12, &[8080]).v4;
    let mut agent = AgentProcess::start(&env, &["--mode", "enforce"]);
    deny_port(&env, host, 8080);
    // A client following flows must not keep the agent from stopping.
    let mut follower = std::process::Command::new(tollgate_tests::workspace_binary("tollgatectl"))
        .args([
            "--agent",
            &env.agent_address(),
            "flows",
            "--follow",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let (status, log) = agent.terminate();
    assert!(status.success(), "{status:?}: {log:#?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let follower_status = loop {
        if let Some(status) = follower.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = follower.kill();
            panic!("tollgatectl flows --follow did not end when the agent stopped");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(follower_status.success(), "{follower_status:?}");
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8080")])
            .result(),
        Err(EPERM)
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn cleanup_detaches_and_removes_every_pin() {
    let mut env = TestEnv::new("cleanup");
    let host = env.add_host(13, &[8080]).v4;
    let mut agent = AgentProcess::start(&env, &["--mode", "enforce"]);
    deny_port(&env, host, 8080);
    agent.kill();
    let link_ids: Vec<u32> = std::fs::read_dir(
        env.bpffs
            .root()
            .join(format!("v{PIN_LAYOUT_VERSION}/links")),
    )
    .unwrap()
    .map(|entry| {
        let link = aya::programs::links::PinnedLink::from_pin(entry.unwrap().path()).unwrap();
        aya::programs::links::FdLink::from(link)
            .info()
            .unwrap()
            .id()
    })
    .collect();
    assert_eq!(link_ids.len(), PROGRAMS.len());

    env.cleanup_pins();

    assert!(!env.bpffs.root().exists(), "pins left behind");
    let live: Vec<u32> = aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| l.id())
        .collect();
    assert!(
        link_ids.iter().all(|id| !live.contains(id)),
        "links still attached: {link_ids:?} in {live:?}"
    );
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8080")])
            .result(),
        Ok(()),
        "still blocked after cleanup"
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn adopting_pins_attached_to_another_cgroup_is_refused() {
    let env = TestEnv::new("elsewhere");
    let _attached = env.open_datapath();
    let child = env.cgroup.path.join("child");
    std::fs::create_dir(&child).unwrap();
    scopeguard::defer! { let _ = std::fs::remove_dir(&child); }
    let other = DatapathOptions {
        cgroup: child.clone(),
        ..env.datapath_options()
    };
    let err = tollgate_agent::datapath::Datapath::open(&other)
        .err()
        .expect("adoption must be refused");
    assert!(
        matches!(err, DatapathError::AttachedElsewhere { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("tollgate-agent cleanup"), "{err}");
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn flow_records_name_the_pod_and_container_of_a_kubelet_cgroup() {
    let mut env = TestEnv::new("kubelet");
    let host = env.add_host(14, &[8080]).v4;
    let agent = AgentProcess::start(&env, &["--allowed-report-interval", "0"]);
    let uid = "0f5b6e2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b";
    let id = "3f2c9a8b7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a";
    // A systemd-driver tree, as kubelet makes it, below the test's cgroup.
    let pod_slice = format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
        uid.replace('-', "_")
    );
    let container = env
        .cgroup
        .child(&format!("{pod_slice}/cri-containerd-{id}.scope"));

    assert_eq!(
        env.probe_in(&container, &["connect", "tcp", &format!("{host}:8080")])
            .result(),
        Ok(())
    );
    let record = agent.next_record(WAIT);
    assert_eq!(record["src"]["pod_uid"], uid);
    assert_eq!(record["src"]["container"]["id"], id);
    // Without the Kubernetes API nothing more is known of the pod.
    assert_eq!(record["src"]["identity"], "unknown-pod");
    assert_eq!(record["src"]["container"]["name"], serde_json::Value::Null);
    assert_eq!(
        record["src"]["cgroup"],
        format!(
            "{}/{pod_slice}/cri-containerd-{id}.scope",
            env.cgroup.relative
        )
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn the_daemonsets_capabilities_are_enough_and_each_is_needed() {
    let only = tollgate_tests::with_only_capabilities;
    let mut env = TestEnv::new("caps");
    let host = env.add_host(15, &[8080]).v4;
    for missing in ["+bpf,+perfmon", "+bpf,+net_admin"] {
        let wrapper = only(missing);
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let log = AgentProcess::try_start_under(&env, &wrapper, &[])
            .err()
            .expect("must not start")
            .join("\n");
        assert!(log.contains("BPF_PROG_LOAD"), "{missing}: {log}");
    }
    // Exactly what deploy/daemonset.yaml grants (the pods tests use the
    // same set for what pods' namespaces need).
    let wrapper = only(&tollgate_tests::daemonset_capabilities());
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let _agent = AgentProcess::try_start_under(&env, &wrapper, &["--mode", "enforce"])
        .expect("starts with the DaemonSet's capabilities");
    deny_port(&env, host, 8080);
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8080")])
            .result(),
        Err(EPERM)
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn an_upgrade_style_restart_never_leaves_a_connection_unjudged() {
    let mut env = TestEnv::new("upgrade");
    let host = env.add_host(16, &[8080]).v4;
    let mut old = AgentProcess::start(&env, &["--mode", "enforce"]);
    deny_port(&env, host, 8080);

    // Connections run in batches the whole time one agent stops and the next starts.
    let swapping = std::sync::atomic::AtomicBool::new(true);
    let results = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let mut results = Vec::new();
            while swapping.load(std::sync::atomic::Ordering::SeqCst) {
                results.extend(
                    env.probe(&["--count", "50", "connect", "tcp", &format!("{host}:8080")])
                        .results,
                );
            }
            results
        });
        std::thread::sleep(Duration::from_millis(200));
        let (status, log) = old.terminate();
        assert!(status.success(), "{status:?}: {log:#?}");
        let new = AgentProcess::start(&env, &["--mode", "enforce"]);
        std::thread::sleep(Duration::from_millis(200));
        swapping.store(false, std::sync::atomic::Ordering::SeqCst);
        let results = prober.join().unwrap();
        (results, new)
    });
    let (results, _new) = results;
    assert!(
        results.len() >= 100,
        "only {} connections ran across the swap",
        results.len()
    );
    assert!(
        results.iter().all(|r| *r == Err(EPERM)),
        "a connection got through during the restart"
    );
    // And the kernel judged every one of them: its counter equals the attempts.
    let status: serde_json::Value =
        serde_json::from_str(&env.ctl(&["status", "-o", "json"]).ok()).unwrap();
    assert_eq!(
        status["counters"]["denied"].as_u64(),
        Some(results.len() as u64),
        "{status}"
    );
}

/// The attachment each program reports in `tollgatectl status`.
fn attachments(env: &TestEnv) -> BTreeMap<String, String> {
    let status: serde_json::Value =
        serde_json::from_str(&env.ctl(&["status", "-o", "json"]).ok()).unwrap();
    status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["attachment"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Swaps an allow-all program into a pinned connect4 link, as an older
/// agent version's program.
fn downgrade_connect4(link_pin: &std::path::Path) {
    use std::os::fd::AsFd;
    let link = raw_bpf::open_pinned(link_pin).unwrap();
    raw_bpf::replace_program(link.as_fd(), allow_all_connect4().as_fd()).unwrap();
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn an_upgrade_replaces_changed_programs_in_place_and_takes_over_older_layouts() {
    let mut env = TestEnv::new("replace");
    let host = env.add_host(18, &[8080, 8081]).v4;
    let policy = TempFile::new(
        "replace.yaml",
        &host_policy("web-only", &env.cgroup.relative, "enforce", host),
    );
    let args = ["--policy", policy.path.to_str().unwrap()];
    let denied = || {
        env.probe(&["connect", "tcp", &format!("{host}:8081")])
            .result()
    };
    let root = env.bpffs.root();
    let current = root.join(format!("v{PIN_LAYOUT_VERSION}"));
    let connect4 = "links/tollgate_connect4";

    let mut agent = AgentProcess::start(&env, &args);
    assert_eq!(denied(), Err(EPERM));
    agent.terminate();

    // Same layout, another program behind the link: it is swapped back.
    downgrade_connect4(&current.join(connect4));
    assert_eq!(denied(), Ok(()), "the older program decides now");
    let mut agent = AgentProcess::start(&env, &args);
    assert_eq!(denied(), Err(EPERM));
    let expected = |connect4: &str| -> BTreeMap<String, String> {
        PROGRAMS
            .iter()
            .map(|p| {
                let attachment = if *p == "tollgate_connect4" {
                    connect4
                } else {
                    "adopted"
                };
                (p.to_string(), attachment.to_owned())
            })
            .collect()
    };
    assert_eq!(attachments(&env), expected("replaced"));
    agent.terminate();
    // Unchanged programs are adopted as they are.
    let mut agent = AgentProcess::start(&env, &args);
    assert_eq!(attachments(&env), expected("adopted"));
    agent.terminate();

    // An older layout version: its links keep enforcing (here connect4 with
    // an older program) until this version's maps hold the rules, then
    // take this version's programs, and the older layout is gone.
    let older = root.join(format!("v{}", PIN_LAYOUT_VERSION - 1));
    std::fs::rename(&current, &older).unwrap();
    downgrade_connect4(&older.join(connect4));
    let _agent = AgentProcess::start(&env, &args);
    assert_eq!(denied(), Err(EPERM));
    assert!(!older.exists(), "the older layout's pins are removed");
    assert!(current.join(connect4).exists());
    assert!(
        attachments(&env).values().all(|a| a == "replaced"),
        "{:?}",
        attachments(&env)
    );
    assert_eq!(
        connect4_programs_attached(&env.cgroup.path),
        1,
        "one connect4 program, this version's"
    );
}

/// A kernel that refuses both DNS programs: FQDN learning is gone, but
/// every deciding hook is attached and enforces.
#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn without_any_dns_program_the_agent_still_enforces() {
    let mut env = TestEnv::new("no-dns");
    let host = env.add_host(79, &[8080]).v4;
    env.pin_undersized_map(map_names::DNS_SCRATCH);
    env.pin_undersized_map(map_names::DNS_FORWARD);
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let agent = AgentProcess::start(
        &env,
        &[
            "--mode",
            "enforce",
            "--allowed-report-interval",
            "0",
            "--metrics-listen",
            &metrics,
        ],
    );
    assert_eq!(
        agent.startup_lines_with("DEGRADED"),
        2,
        "{:#?}",
        agent.startup_log
    );
    // Ready: the node enforces, without the hook it has no program for.
    let (code, body) = http_get(port, "/readyz");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("dns-learning (tollgate_dns_forward refused)"),
        "{body}"
    );
    assert_eq!(agent.startup_lines_with("New"), PROGRAMS.len() - 1);
    deny_port(&env, host, 8080);
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8080")])
            .result(),
        Err(EPERM)
    );
    let status = env.ctl(&["status"]).ok();
    assert!(status.contains("DEGRADED dns-learning: "), "{status}");
    drop(agent);
    env.cleanup_pins();
}

/// A kernel that refuses the deciding programs: the agent does not start,
/// and what was in force stays as it was: the same programs behind the same
/// links, still enforcing.
#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_refused_deciding_program_changes_nothing_in_force() {
    let mut env = TestEnv::new("refused");
    let host = env.add_host(80, &[8080]).v4;
    let connect = || env.probe(&["connect", "tcp", &format!("{host}:8080")]);
    let mut agent = AgentProcess::start(&env, &["--mode", "enforce"]);
    deny_port(&env, host, 8080);
    assert_eq!(connect().result(), Err(EPERM));
    let before = linked_program_ids(&env);
    assert_eq!(before.len(), PROGRAMS.len(), "{before:?}");
    agent.kill();

    // Only the deciding programs use the flow dedup map.
    env.pin_undersized_map(map_names::FLOW_DEDUP);
    let log = match AgentProcess::try_start(&env, &["--mode", "enforce"]) {
        Ok(agent) => panic!("the agent started: {:#?}", agent.startup_log),
        Err(log) => log,
    };
    assert!(
        log.iter().any(|line| line.contains("tollgate_connect4")),
        "{log:#?}"
    );
    assert_eq!(linked_program_ids(&env), before);
    assert_eq!(connect().result(), Err(EPERM));
    env.cleanup_pins();
}

/// The id of the program behind each pinned link, by link name.
fn linked_program_ids(env: &TestEnv) -> BTreeMap<String, u32> {
    let links = env
        .bpffs
        .root()
        .join(format!("v{PIN_LAYOUT_VERSION}"))
        .join("links");
    std::fs::read_dir(&links)
        .unwrap()
        .flatten()
        .map(|entry| {
            let pinned = aya::programs::links::PinnedLink::from_pin(entry.path()).unwrap();
            let link = aya::programs::links::FdLink::from(pinned);
            (
                entry.file_name().to_string_lossy().into_owned(),
                link.info().unwrap().program_id(),
            )
        })
        .collect()
}
