//! The control API end to end: tollgatectl against a running agent with
//! real kernel programs, judged by real sockets and flow records.
//!
//! These tests need root and the BPF object: `cargo xtask test` runs them.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
    time::Duration,
};

use tollgate_agent::client::{ClientTls, connect};
use tollgate_proto::v1::{self as api, policy_service_client::PolicyServiceClient};
use tollgate_tests::{
    AgentProcess, TempFile, TestDir, TestEnv, free_port, host_policy, http_get, make_certificates,
    metric_sample as sample,
};

const EPERM: i32 = libc::EPERM;
const WAIT: Duration = Duration::from_secs(5);

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn apply_blocks_observe_audits_delete_releases() {
    let mut env = TestEnv::new("ctlround");
    let host = env.add_host(30, &[8080, 8081]).v4;
    let agent = AgentProcess::start(
        &env,
        &["--mode", "enforce", "--allowed-report-interval", "0"],
    );
    let file = TempFile::new(
        "ctlround.yaml",
        &host_policy("web-only", &env.cgroup.relative, "", host),
    );
    let connect = || {
        env.probe(&["connect", "tcp", &format!("{host}:8081")])
            .result()
    };

    let applied = env.ctl(&["apply", "-f", file.path.to_str().unwrap()]).ok();
    assert_eq!(applied, "web-only created\ngeneration 1\n");
    assert_eq!(connect(), Err(EPERM));
    let record = agent.next_record(WAIT);
    assert_eq!(
        (
            record["verdict"].as_str(),
            record["policy"].as_str(),
            record["rule"].as_str()
        ),
        (Some("denied"), Some("web-only"), Some("default"))
    );

    let modes = env.ctl(&["mode", "--policy", "web-only", "observe"]).ok();
    assert_eq!(modes, "global: enforce\nweb-only: observe\n");
    assert_eq!(connect(), Ok(()));
    let record = agent.next_record(WAIT);
    assert_eq!(
        (record["verdict"].as_str(), record["mode"].as_str()),
        (Some("audit"), Some("observe"))
    );

    let listed: serde_json::Value =
        serde_json::from_str(&env.ctl(&["get", "policies", "-o", "json"]).ok()).unwrap();
    assert_eq!(listed[0]["metadata"]["name"], "web-only");
    assert_eq!(listed[0]["spec"]["egress"][0]["name"], "web");
    assert!(env.ctl(&["get", "policies"]).ok().contains("web-only"));

    assert_eq!(
        env.ctl(&["delete", "web-only"]).ok(),
        "web-only deleted\ngeneration 2\n"
    );
    assert_eq!(connect(), Ok(()));
    let record = agent.next_record(WAIT);
    assert_eq!(
        (record["verdict"].as_str(), record["policy"].as_str()),
        (Some("allowed"), None)
    );

    let status: serde_json::Value =
        serde_json::from_str(&env.ctl(&["status", "-o", "json"]).ok()).unwrap();
    assert_eq!(status["policyGeneration"], 2);
    assert_eq!(status["globalMode"], "enforce");
    assert_eq!(status["counters"]["denied"], 1);
    assert_eq!(status["counters"]["audit"], 1);
    assert_eq!(
        status["programs"].as_array().unwrap().len(),
        tollgate_agent::datapath::PROGRAMS.len()
    );
    assert_eq!(status["maps"][0]["name"], "TG_ENDPOINTS");
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn invalid_requests_are_refused_with_field_paths_and_change_nothing() {
    let mut env = TestEnv::new("ctlbad");
    let host = env.add_host(31, &[8080]).v4;
    let _agent = AgentProcess::start(&env, &["--mode", "enforce"]);
    let good = TempFile::new(
        "ctlbad-good.yaml",
        &host_policy("web-only", &env.cgroup.relative, "", host),
    );
    env.ctl(&["apply", "-f", good.path.to_str().unwrap()]).ok();

    // tollgatectl checks locally first, and reports every problem.
    let bad_yaml =
        host_policy("web-only", &env.cgroup.relative, "loud", host).replace("/32", "/33");
    let bad = TempFile::new("ctlbad-bad.yaml", &bad_yaml);
    let error = env
        .ctl(&["apply", "-f", bad.path.to_str().unwrap()])
        .failed();
    assert!(
        error.contains("spec.mode: \"loud\" is not one of"),
        "{error}"
    );
    assert!(
        error.contains("spec.egress[0].to[0].cidr: \"")
            && error.contains("/33\" is not a valid prefix"),
        "{error}"
    );

    // The agent checks too, whoever the client is.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = runtime.block_on(async {
        let channel = connect(&env.agent_address(), &ClientTls::default())
            .await
            .unwrap();
        let mut policy = tollgate_policy::document::parse_documents(
            "t",
            &host_policy("web-only", &env.cgroup.relative, "", host),
        )
        .unwrap()
        .remove(0)
        .policy;
        policy.spec.as_mut().unwrap().egress[0].ports[0].port = Some(0);
        let request = api::ApplyPoliciesRequest {
            policies: vec![policy],
            ..Default::default()
        };
        PolicyServiceClient::new(channel)
            .apply_policies(request)
            .await
            .unwrap_err()
    });
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status
            .message()
            .contains("spec.egress[0].ports[0].port: 0 is not a port (1-65535)"),
        "{}",
        status.message()
    );

    // Over a datapath limit: 17 port rules on one prefix.
    let ports: Vec<String> = (1..=17).map(|p| format!("{{port: {p}}}")).collect();
    let wide = host_policy("wide", &env.cgroup.relative, "", host)
        .replace("{port: 8080, protocol: TCP}", &ports.join(", "));
    let wide = TempFile::new("ctlbad-wide.yaml", &wide);
    let exhausted = env
        .ctl(&["apply", "-f", wide.path.to_str().unwrap()])
        .failed();
    assert!(
        exhausted.contains("ResourceExhausted") && exhausted.contains("at most 16 per prefix"),
        "{exhausted}"
    );

    let missing = env.ctl(&["delete", "no-such-policy"]).failed();
    assert!(missing.contains("NotFound"), "{missing}");
    // The first policy is still the one in force.
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8081")])
            .result(),
        Err(EPERM)
    );
    assert!(env.ctl(&["get", "policies"]).ok().contains("generation 1"));
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn generation_conflicts_are_refused_and_dry_runs_change_nothing() {
    let mut env = TestEnv::new("ctlgen");
    let host = env.add_host(32, &[8080, 8081]).v4;
    let _agent = AgentProcess::start(&env, &[]);
    let v1 = TempFile::new(
        "ctlgen-1.yaml",
        &host_policy("p", &env.cgroup.relative, "enforce", host),
    );
    let v2 = TempFile::new(
        "ctlgen-2.yaml",
        &host_policy("p", &env.cgroup.relative, "observe", host),
    );

    // From stdin, as in pipelines.
    let mut from_stdin = Command::new(tollgate_tests::workspace_binary("tollgatectl"))
        .args([
            "--agent",
            &env.agent_address(),
            "apply",
            "-f",
            "-",
            "--expected-generation",
            "0",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut from_stdin.stdin.take().unwrap(),
        std::fs::read(&v1.path).unwrap().as_slice(),
    )
    .unwrap();
    let output = from_stdin.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "p created
generation 1
"
    );
    let conflict = env
        .ctl(&[
            "apply",
            "-f",
            v2.path.to_str().unwrap(),
            "--expected-generation",
            "0",
        ])
        .failed();
    assert!(
        conflict.contains("FailedPrecondition") && conflict.contains("generation 1, not 0"),
        "{conflict}"
    );

    let dry = env
        .ctl(&["apply", "-f", v2.path.to_str().unwrap(), "--dry-run"])
        .ok();
    assert_eq!(dry, "p configured (dry run)\ngeneration 1\n");
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8081")])
            .result(),
        Err(EPERM),
        "the dry run changed the rules"
    );
    assert!(
        env.ctl(&[
            "apply",
            "-f",
            v2.path.to_str().unwrap(),
            "--expected-generation",
            "1"
        ])
        .ok()
        .ends_with("generation 2\n")
    );
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8081")])
            .result(),
        Ok(())
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_restarted_agent_enforces_the_saved_set_before_it_is_ready() {
    let mut env = TestEnv::new("ctlsaved");
    let host = env.add_host(33, &[8080, 8081]).v4;
    let mut agent = AgentProcess::start(&env, &["--mode", "enforce"]);
    let file = TempFile::new(
        "ctlsaved.yaml",
        &host_policy("saved", &env.cgroup.relative, "", host),
    );
    env.ctl(&["apply", "-f", file.path.to_str().unwrap()]).ok();
    let (status, log) = agent.terminate();
    assert!(status.success(), "{status:?}: {log:#?}");
    // Take the kernel side away entirely: only the saved state remains.
    // (The exited agent's last references to the links are dropped by the
    // kernel's deferred work, so the detach can trail its exit a little.)
    env.cleanup_pins();
    tollgate_tests::node::until(Ok(()), WAIT, || {
        env.probe(&["connect", "tcp", &format!("{host}:8081")])
            .result()
    });

    let restarted = AgentProcess::start(&env, &[]);
    assert_eq!(
        restarted.startup_lines_with("policies=1"),
        1,
        "{:#?}",
        restarted.startup_log
    );
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8081")])
            .result(),
        Err(EPERM)
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn flows_follow_shows_recent_and_new_decisions() {
    let mut env = TestEnv::new("ctlflows");
    let host = env.add_host(34, &[8080]).v4;
    let _agent = AgentProcess::start(
        &env,
        &["--mode", "enforce", "--allowed-report-interval", "0"],
    );
    let file = TempFile::new(
        "ctlflows.yaml",
        &host_policy("web-only", &env.cgroup.relative, "", host),
    );
    env.ctl(&["apply", "-f", file.path.to_str().unwrap()]).ok();
    let before = env.probe(&["connect", "tcp", &format!("{host}:8081")]);

    let mut follower = Command::new(tollgate_tests::workspace_binary("tollgatectl"))
        .args([
            "--agent",
            &env.agent_address(),
            "flows",
            "--follow",
            "--verdict",
            "denied",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let _follower = scopeguard::guard(follower, |mut child| {
        let _ = child.kill();
        let _ = child.wait();
    });
    let mut lines = BufReader::new(stdout).lines();
    let first: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(
        (first["src"]["pid"].as_u64(), first["verdict"].as_str()),
        (Some(u64::from(before.pid)), Some("denied"))
    );

    // An allowed connection is filtered out; the next denied one arrives.
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:8080")])
            .result(),
        Ok(())
    );
    let after = env.probe(&["connect", "tcp", &format!("{host}:8081")]);
    let second: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(
        (
            second["src"]["pid"].as_u64(),
            second["dst"]["port"].as_u64()
        ),
        (Some(u64::from(after.pid)), Some(8081))
    );
    assert_eq!(
        (second["policy"].as_str(), second["rule"].as_str()),
        (Some("web-only"), Some("default"))
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn mutual_tls_refuses_clients_without_a_valid_certificate() {
    let env = TestEnv::new("ctlmtls");
    let certs = TestDir::new("ctlmtls-certs");
    let rogue = TestDir::new("ctlmtls-rogue");
    make_certificates(&certs.path, "tollgate-test-ca");
    make_certificates(&rogue.path, "someone-else");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let file = |name: &str| certs.path.join(name).display().to_string();
    let _agent = AgentProcess::start(
        &env,
        &[
            "--listen",
            &format!("tcp://127.0.0.1:{port}"),
            "--tls-cert",
            &file("server.pem"),
            "--tls-key",
            &file("server.key"),
            "--tls-client-ca",
            &file("ca.pem"),
        ],
    );
    let agent = format!("https://localhost:{port}");
    let ca = file("ca.pem");

    let ok = env
        .ctl_at(
            &agent,
            &[
                "--ca",
                &ca,
                "--cert",
                &file("client.pem"),
                "--key",
                &file("client.key"),
                "status",
            ],
        )
        .ok();
    assert!(ok.contains("global mode: observe"), "{ok}");

    let anonymous = env.ctl_at(&agent, &["--ca", &ca, "status"]).failed();
    assert!(
        anonymous.contains(
            "Unauthenticated: a client certificate signed by the agent's client CA is required"
        ),
        "{anonymous}"
    );
    let rogue_cert = rogue.path.join("client.pem").display().to_string();
    let rogue_key = rogue.path.join("client.key").display().to_string();
    let stranger = env
        .ctl_at(
            &agent,
            &[
                "--ca",
                &ca,
                "--cert",
                &rogue_cert,
                "--key",
                &rogue_key,
                "status",
            ],
        )
        .failed();
    assert!(!stranger.is_empty());
}

/// A change is answered once its rules are in force, and what only the
/// rules before it used leaves the kernel right after the answer, not at
/// the next change: after each apply the IPv4 rules map soon holds the
/// entries of the set in force and no others.
#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn what_a_change_replaced_leaves_the_kernel_once_it_is_answered() {
    let env = TestEnv::new("ctlremove");
    let _agent = AgentProcess::start(&env, &["--mode", "enforce"]);
    let policy = |prefixes: u8| {
        let rules: String = (0..prefixes)
            .map(|i| format!("  - {{name: r{i}, to: [{{cidr: 10.{i}.0.0/16}}]}}\n"))
            .collect();
        format!(
            "apiVersion: policy.tollgate.dev/v1alpha1\nkind: EgressPolicy\nmetadata:\n  name: ranges\n\
             spec:\n  cgroupSelector:\n    paths: [\"{}\"]\n  egress:\n{rules}",
            env.cgroup.relative
        )
    };
    for prefixes in [3, 5, 2, 4] {
        let file = TempFile::new("ctlremove.yaml", &policy(prefixes));
        env.ctl(&["apply", "-f", file.path.to_str().unwrap()]).ok();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut sets = env.v4_rule_set_ids();
        while sets.len() != usize::from(prefixes) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            sets = env.v4_rule_set_ids();
        }
        sets.dedup();
        assert_eq!(
            (sets.len(), env.v4_rule_set_ids().len()),
            (1, usize::from(prefixes)),
            "after the apply of {prefixes} prefixes, one set of as many entries: {sets:?}"
        );
    }
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn thousands_of_applies_never_leave_a_decision_outside_both_sets() {
    let mut env = TestEnv::new("ctlatomic");
    let host = env.add_host(35, &[8080]).v4;
    let agent = AgentProcess::start(
        &env,
        &["--mode", "enforce", "--allowed-report-interval", "0"],
    );
    // Set A allows by default and denies 8080 ("a-deny"); set B denies by
    // default and allows 8080 ("b-allow"). A decision by "default" would be
    // one that belongs to neither.
    let yaml = |default: &str, action: &str, rule: &str| {
        format!(
            "apiVersion: policy.tollgate.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: flip}}\nspec:\n  cgroupSelector: {{paths: [\"{}\"]}}\n  defaultAction: {default}\n  egress:\n  - {{name: {rule}, action: {action}, to: [{{cidr: {host}/32}}], ports: [{{port: 8080, protocol: TCP}}]}}\n",
            env.cgroup.relative
        )
    };
    let parse = |text: String| {
        tollgate_policy::document::parse_documents("t", &text)
            .unwrap()
            .remove(0)
            .policy
    };
    let sets = [
        parse(yaml("allow", "deny", "a-deny")),
        parse(yaml("deny", "allow", "b-allow")),
    ];

    const APPLIES: usize = 2000;
    const BATCH: &str = "50";
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut client = runtime.block_on(async {
        PolicyServiceClient::new(
            connect(&env.agent_address(), &ClientTls::default())
                .await
                .unwrap(),
        )
    });
    let mut apply = |n: usize| {
        let request = api::ApplyPoliciesRequest {
            policies: vec![sets[n % 2].clone()],
            ..Default::default()
        };
        runtime.block_on(client.apply_policies(request)).unwrap();
    };
    apply(0);
    // The prober runs small batches, pausing between them, for as long as
    // the applies go on; the applies go on until at least three batches ran
    // meanwhile. So the two overlap by construction, without flooding.
    let applying = AtomicBool::new(true);
    let batches = AtomicUsize::new(0);
    let runs = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut n = 1;
            while n <= APPLIES || batches.load(SeqCst) < 3 {
                apply(n);
                n += 1;
            }
            applying.store(false, SeqCst);
        });
        let mut runs = Vec::new();
        while applying.load(SeqCst) {
            runs.push(env.probe(&["--count", BATCH, "connect", "tcp", &format!("{host}:8080")]));
            batches.fetch_add(1, SeqCst);
            std::thread::sleep(Duration::from_millis(10));
        }
        runs
    });

    let mut seen = std::collections::HashMap::new();
    for run in &runs {
        for result in &run.results {
            let record = loop {
                let record = agent.next_record(WAIT);
                if record["src"]["pid"].as_u64() == Some(u64::from(run.pid)) {
                    break record;
                }
            };
            let rule = record["rule"].as_str().unwrap().to_owned();
            let expected = match rule.as_str() {
                "a-deny" => Err(EPERM),
                "b-allow" => Ok(()),
                other => panic!("a decision by {other:?} belongs to neither set: {record}"),
            };
            assert_eq!(*result, expected, "{record}");
            *seen.entry(rule).or_insert(0) += 1;
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "both sets must have decided some connections: {seen:?}"
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn metrics_count_exactly_the_decisions_made_and_readiness_follows_the_programs() {
    let mut env = TestEnv::new("ctlmetrics");
    let host = env.add_host(36, &[8080, 8081]).v4;
    let port = free_port();
    let file = TempFile::new(
        "ctlmetrics.yaml",
        &host_policy("web-only", &env.cgroup.relative, "", host),
    );
    let _agent = AgentProcess::start(
        &env,
        &[
            "--mode",
            "enforce",
            "--policy",
            file.path.to_str().unwrap(),
            "--metrics-listen",
            &format!("127.0.0.1:{port}"),
        ],
    );
    assert_eq!(http_get(port, "/healthz"), (200, "ok\n".into()));
    assert_eq!(http_get(port, "/readyz"), (200, "ready\n".into()));

    let denied = "tollgate_decisions_total{verdict=\"denied\"}";
    let allowed = "tollgate_decisions_total{verdict=\"allowed\"}";
    let records =
        "tollgate_flow_records_total{verdict=\"denied\",policy=\"web-only\",namespace=\"\"}";
    let reported =
        "tollgate_reported_decisions_total{verdict=\"denied\",policy=\"web-only\",namespace=\"\"}";
    let status_calls = "tollgate_grpc_requests_total{method=\"Status\",code=\"Ok\"}";
    let not_found = "tollgate_grpc_requests_total{method=\"DeletePolicies\",code=\"NotFound\"}";
    let (code, before) = http_get(port, "/metrics");
    assert_eq!(code, 200, "{before}");
    assert!(before.contains("tollgate_build_info{version="), "{before}");
    assert!(
        before.contains("tollgate_map_capacity{map=\"TG_ENDPOINTS\"} 16384"),
        "{before}"
    );

    let run = env.probe(&["--count", "7", "connect", "tcp", &format!("{host}:8081")]);
    assert_eq!(run.results, vec![Err(EPERM); 7]);
    assert_eq!(
        env.probe(&["--count", "3", "connect", "tcp", &format!("{host}:8080")])
            .results,
        vec![Ok(()); 3]
    );
    // Records are counted as the agent writes them: wait until it has.
    let deadline = std::time::Instant::now() + WAIT;
    let after = loop {
        let (_, after) = http_get(port, "/metrics");
        if sample(&after, records) >= sample(&before, records) + 7
            || std::time::Instant::now() > deadline
        {
            break after;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        sample(&after, denied) - sample(&before, denied),
        7,
        "{after}"
    );
    assert_eq!(
        sample(&after, allowed) - sample(&before, allowed),
        3,
        "{after}"
    );
    assert_eq!(
        sample(&after, records) - sample(&before, records),
        7,
        "{after}"
    );
    assert_eq!(
        sample(&after, reported) - sample(&before, reported),
        7,
        "{after}"
    );
    assert_eq!(sample(&after, "tollgate_policies{source=\"local\"}"), 1);
    assert_eq!(sample(&after, "tollgate_policies{source=\"cluster\"}"), 0);

    // Control API calls are counted by method and code.
    env.ctl(&["status"]).ok();
    env.ctl(&["delete", "no-such-policy"]).failed();
    let (_, calls) = http_get(port, "/metrics");
    assert_eq!(
        sample(&calls, status_calls) - sample(&after, status_calls),
        1,
        "{calls}"
    );
    assert_eq!(
        sample(&calls, not_found) - sample(&after, not_found),
        1,
        "{calls}"
    );

    // Removing the pins detaches the programs under the running agent.
    env.cleanup_pins();
    let (code, why) = http_get(port, "/readyz");
    assert_eq!(code, 503);
    assert!(
        why.contains("programs not attached: tollgate_connect4"),
        "{why}"
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn the_log_level_changes_while_the_agent_runs() {
    let env = TestEnv::new("ctllog");
    let agent = AgentProcess::start(&env, &[]);
    assert_eq!(env.ctl(&["log-level"]).ok(), "info\n");

    env.ctl(&["log-level", "info,tollgate_agent=debug"]).ok();
    assert_eq!(env.ctl(&["log-level"]).ok(), "info,tollgate_agent=debug\n");
    // Debug lines appear from now on: each control call logs one.
    env.ctl(&["status"]).ok();
    agent.wait_for_log("control API call", WAIT);

    let refused = env.ctl(&["log-level", "tollgate_agent=loud"]).failed();
    assert!(refused.contains("InvalidArgument"), "{refused}");
    assert_eq!(
        env.ctl(&["log-level"]).ok(),
        "info,tollgate_agent=debug\n",
        "a refused filter changes nothing"
    );
}
