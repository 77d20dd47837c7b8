//! Policy files through the agent binary: what they block, what they audit,
//! how flow records name the deciding policy and rule, and what happens to
//! bad input. Hosts without Kubernetes select endpoints by cgroup path.
//!
//! These tests need root and the BPF object: `cargo xtask test` runs them.

use std::time::{Duration, Instant};

use tollgate_tests::{AgentProcess, TempFile, TestEnv, host_policy};

const EPERM: i32 = libc::EPERM;
const WAIT: Duration = Duration::from_secs(5);

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_policy_file_allows_its_rules_denies_the_rest_and_names_both() {
    let mut env = TestEnv::new("polfile");
    let host = env.add_host(20, &[8080, 8081]).v4;
    let file = TempFile::new(
        "polfile.yaml",
        &host_policy("web-only", &env.cgroup.relative, "enforce", host),
    );
    let agent = AgentProcess::start(
        &env,
        &[
            "--policy",
            file.path.to_str().unwrap(),
            "--allowed-report-interval",
            "0",
        ],
    );
    assert_eq!(
        agent.startup_lines_with("policies in force"),
        1,
        "{:#?}",
        agent.startup_log
    );

    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8080")])
            .result(),
        Ok(())
    );
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8081")])
            .result(),
        Err(EPERM)
    );

    let allowed = agent.next_record(WAIT);
    assert_eq!(
        (
            allowed["verdict"].as_str(),
            allowed["policy"].as_str(),
            allowed["rule"].as_str()
        ),
        (Some("allowed"), Some("web-only"), Some("web"))
    );
    let denied = agent.next_record(WAIT);
    assert_eq!(
        (
            denied["verdict"].as_str(),
            denied["policy"].as_str(),
            denied["rule"].as_str()
        ),
        (Some("denied"), Some("web-only"), Some("default"))
    );
    assert_eq!(denied["mode"], "enforce");
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn an_observe_policy_lets_connections_through_and_records_audit() {
    let mut env = TestEnv::new("polobs");
    let host = env.add_host(21, &[8080, 8081]).v4;
    let file = TempFile::new(
        "polobs.yaml",
        &host_policy("web-audit", &env.cgroup.relative, "observe", host),
    );
    // The global mode is enforce; the policy's own mode wins.
    let agent = AgentProcess::start(
        &env,
        &["--mode", "enforce", "--policy", file.path.to_str().unwrap()],
    );

    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8081")])
            .result(),
        Ok(())
    );
    let record = agent.next_record(WAIT);
    assert_eq!(
        (
            record["verdict"].as_str(),
            record["mode"].as_str(),
            record["policy"].as_str()
        ),
        (Some("audit"), Some("observe"), Some("web-audit"))
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn new_cgroups_matching_a_glob_come_under_the_policy() {
    let mut env = TestEnv::new("polglob");
    let host = env.add_host(22, &[8081]).v4;
    let glob = format!("{}/*", env.cgroup.relative);
    let file = TempFile::new("polglob.yaml", &host_policy("late", &glob, "enforce", host));
    let _agent = AgentProcess::start(&env, &["--policy", file.path.to_str().unwrap()]);
    // The test cgroup itself does not match "<it>/*".
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8081")])
            .result(),
        Ok(())
    );

    let late = env.cgroup.child("late");
    let deadline = Instant::now() + Duration::from_secs(5);
    let connect = || {
        env.probe_in(&late, &["connect", "tcp", &format!("{host}:8081")])
            .result()
    };
    while connect() == Ok(()) {
        assert!(
            Instant::now() < deadline,
            "a cgroup made after start was not put under the policy"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(connect(), Err(EPERM));
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn invalid_policy_files_are_refused_with_every_error_and_nothing_changes() {
    let mut env = TestEnv::new("polbad");
    let host = env.add_host(23, &[8080]).v4;
    let good = TempFile::new(
        "polbad-good.yaml",
        &host_policy("good", &env.cgroup.relative, "enforce", host),
    );
    let agent = AgentProcess::start(&env, &["--policy", good.path.to_str().unwrap()]);
    drop(agent);
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8081")])
            .result(),
        Err(EPERM)
    );

    let bad = TempFile::new(
        "polbad-bad.yaml",
        &host_policy("bad", &env.cgroup.relative, "block", host)
            .replace("port: 8080", "port: 80800"),
    );
    let log = AgentProcess::try_start(&env, &["--policy", bad.path.to_str().unwrap()])
        .err()
        .expect("must refuse");
    let log = log.join("\n");
    assert!(
        log.contains("spec.mode: \"block\" is not one of \"enforce\", \"observe\""),
        "{log}"
    );
    assert!(
        log.contains("spec.egress[0].ports[0].port: 80800 is not a port (1-65535)"),
        "{log}"
    );
    // The previous rules are still the ones in force.
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8081")])
            .result(),
        Err(EPERM)
    );
}

/// The protocols the packet hook judges, written in a policy file: ICMP
/// allowed to one host, and what `ANY` with a port does not open.
#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn icmp_rules_in_a_policy_file_and_the_records_of_the_packet_hook() {
    let _ping = tollgate_tests::PingSockets::allow();
    let mut env = TestEnv::new("policmp");
    let host = env.add_host(106, &[]).v4;
    let file = TempFile::new(
        "policmp.yaml",
        &format!(
            "apiVersion: policy.tollgate.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: ping-only
spec:
  cgroupSelector:
    paths: [\"{}\"]
  mode: enforce
  egress:
  - name: ping
    to: [{{cidr: {host}/32}}]
    ports: [{{protocol: icmp}}]
  - name: any-on-a-port
    to: [{{cidr: {host}/32}}]
    ports: [{{port: 9}}]
",
            env.cgroup.relative
        ),
    );
    let agent = AgentProcess::start(
        &env,
        &[
            "--policy",
            file.path.to_str().unwrap(),
            "--allowed-report-interval",
            "0",
        ],
    );
    let mark = tollgate_tests::marker("policmp");
    let catcher = env.hosts[0].catch(&mark);

    assert_eq!(
        env.probe(&["ping", &host.to_string(), &mark]).result(),
        Ok(())
    );
    // A port rule with protocol ANY opens the protocols with ports only.
    assert_eq!(
        env.probe(&["raw", "udp", &format!("{host}:9"), &mark])
            .result(),
        Ok(())
    );
    assert_eq!(
        env.probe(&["raw", "gre", &host.to_string(), &mark])
            .result(),
        Err(EPERM)
    );
    assert_eq!(catcher.caught(WAIT / 10), ["caught 1 0", "caught 17 9"]);

    let records: Vec<_> = (0..3).map(|_| agent.next_record(WAIT)).collect();
    let summary: Vec<_> = records
        .iter()
        .map(|r| {
            (
                r["hook"].as_str().unwrap(),
                r["protocol"].as_str().unwrap(),
                r["verdict"].as_str().unwrap(),
                r["rule"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("packet4", "icmp", "allowed", "ping"),
            ("packet4", "udp", "allowed", "any-on-a-port"),
            ("packet4", "ip-47", "denied", "default"),
        ]
    );
    assert_eq!(records[2]["src"]["pid"], 0);
    assert_eq!(records[2]["policy"], "ping-only");
}
