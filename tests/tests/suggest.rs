//! From observe to enforce against the real datapath: the agent observes a
//! workload (names resolved through dnsmasq, addresses connected to
//! directly) and writes its records with a file sink; `tollgatectl
//! suggest` makes a policy of that recording; enforced, the policy lets
//! every recorded connection through and refuses others; and `tollgatectl
//! dry-run` of the policy without one rule reports exactly the
//! connections that rule allowed, with a failing exit status, and the
//! agent's own dry run of its recent flows answers as tollgatectl does
//! from a file of the same flows.
//!
//! These tests need root and the BPF object: `cargo xtask test` runs them.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use tollgate_policy::document::parse_documents;
use tollgate_tests::{AgentProcess, TempFile, TestDir, TestEnv, Zone};

const EPERM: i32 = libc::EPERM;
const HTTPS: u16 = 443;
const WEB: u16 = 8080;
/// Addresses the test's names resolve to, owned by its resolver's host.
const NAME_PREFIX: &str = "10.232.90.0/24";

/// Three siblings under one parent (a wildcard at threshold 3), one name
/// alone, and a name the workload never asks for.
fn zone() -> Zone {
    let address = |last: u8| std::net::IpAddr::V4(Ipv4Addr::new(10, 232, 90, last));
    Zone {
        addresses: vec![
            ("a.svc.test".into(), address(1)),
            ("b.svc.test".into(), address(2)),
            ("c.svc.test".into(), address(3)),
            ("api.other.test".into(), address(10)),
            ("unseen.other.test".into(), address(20)),
        ],
        ttl: 300,
        ..Zone::default()
    }
}

/// What the workload does: resolve and connect to each name, then
/// connect to an address it knows, three times.
fn workload(env: &TestEnv, app: &std::path::Path, resolver: Ipv4Addr, direct: Ipv4Addr) {
    for name in ["a.svc.test", "b.svc.test", "c.svc.test", "api.other.test"] {
        let run = env.probe_in(
            app,
            &[
                "resolve-connect",
                "udp",
                &format!("{resolver}:53"),
                name,
                "A",
                &HTTPS.to_string(),
            ],
        );
        assert_eq!(run.result(), Ok(()), "{name}");
    }
    for _ in 0..3 {
        let run = env.probe_in(app, &["connect", "tcp", &format!("{direct}:{WEB}")]);
        assert_eq!(run.result(), Ok(()));
    }
}

/// The file's records, once it holds `flows` flow records and `answers`
/// DNS records (the file sink delivers from its spool, in a moment).
fn recorded(path: &std::path::Path, flows: usize, answers: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let records: Vec<serde_json::Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let count = |kind: &str| records.iter().filter(|r| r["type"] == kind).count();
        if count("flow") >= flows && count("dns") >= answers {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "{} flow and {} dns records: {records:#?}",
            count("flow"),
            count("dns")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root and the BPF object"]
fn a_suggested_policy_enforced_allows_what_was_recorded_and_nothing_else() {
    let mut env = TestEnv::new("suggest");
    env.add_host(90, &[HTTPS]);
    env.hosts[0].serve_dns(&zone());
    env.hosts[0].own_prefix(NAME_PREFIX);
    let resolver = env.hosts[0].v4;
    let direct = env.add_host(91, &[WEB]).v4;
    let elsewhere = env.add_host(92, &[WEB]).v4;
    let app = env.cgroup.child("app");
    let app_path = format!("{}/app", env.cgroup.relative);
    let dir = TestDir::new("suggest-records");
    let records = dir.path.join("records.jsonl");

    let mut agent = AgentProcess::start(
        &env,
        &[
            "--mode",
            "observe",
            "--dns-resolver",
            &resolver.to_string(),
            "--allowed-report-interval",
            "0",
            "--sink",
            &format!("{{type: file, path: {}}}", records.display()),
        ],
    );
    workload(&env, &app, resolver, direct);
    // Four queries and four connections to names, three to the address.
    let seen = recorded(&records, 11, 4);
    // The recording as it stands: later phases add records to the file.
    let recording_text = std::fs::read_to_string(&records).unwrap();
    let recording = TempFile::new("suggest-recording.jsonl", &recording_text);
    let flows_to = |ip: &str, port: u16| {
        seen.iter()
            .filter(|r| r["type"] == "flow" && r["dst"]["ip"] == ip && r["dst"]["port"] == port)
            .count()
    };
    assert_eq!(flows_to(&direct.to_string(), WEB), 3, "{seen:#?}");

    let suggested = env
        .ctl(&[
            "suggest",
            "--from-file",
            recording.path.to_str().unwrap(),
            "--collapse-threshold",
            "3",
        ])
        .ok();
    let documents = parse_documents("suggested", &suggested).unwrap();
    assert_eq!(documents.len(), 1, "one workload:\n{suggested}");
    let spec = documents[0].policy.spec.clone().unwrap();
    assert_eq!(spec.cgroup_selector.unwrap().paths, [app_path.as_str()]);
    assert_eq!(spec.mode, "observe");
    let rules: Vec<&str> = spec.egress.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        rules,
        [
            "to-api.other.test",
            "to-*.svc.test",
            format!("to-{resolver}/32").as_str(),
            format!("to-{direct}/32").as_str(),
        ],
        "{suggested}"
    );
    assert!(
        suggested.contains("  # 3 connections, first "),
        "the evidence of each rule:\n{suggested}"
    );

    // Without the rule for the direct address, a dry run reports exactly
    // the connections that rule allowed, and fails: the agent's own
    // replay of its recent flows, and later one of the recording.
    let mut without = documents[0].policy.clone();
    let spec = without.spec.as_mut().unwrap();
    spec.egress
        .retain(|rule| rule.name != format!("to-{direct}/32"));
    let candidate = TempFile::new(
        "suggest-candidate.yaml",
        &serde_yaml_ng::to_string(&without).unwrap(),
    );
    let expected = [
        format!("cgroup {app_path}: newly denied"),
        format!(
            "  tcp {direct}:{WEB} x3: was allowed (no policy), would be denied by cgroup-{}-app-egress/default",
            env.cgroup.relative.trim_start_matches('/')
        ),
    ];
    let dry_run_fails = |args: &[&str]| {
        let run = env.ctl(args);
        let stdout = run.stdout.clone();
        let stderr = run.failed();
        assert!(
            stderr.contains("3 recorded connections that went through would be denied"),
            "{stdout}{stderr}"
        );
        let changes: Vec<&str> = stdout.lines().skip(1).collect();
        assert_eq!(changes, expected, "{stdout}");
    };
    // The agent replays its recent flows itself (DryRun) as tollgatectl
    // replays the same flows from a file: those carry no DNS records, so
    // names are known only where the agent put them in dst.fqdn.
    let flows_only = TempFile::new(
        "suggest-flows-only.jsonl",
        &recording_text
            .lines()
            .filter(|line| line.starts_with(r#"{"type":"flow""#))
            .map(|line| format!("{line}\n"))
            .collect::<String>(),
    );
    let by_agent = env.ctl(&["dry-run", "-f", candidate.path.to_str().unwrap()]);
    let from_file = env.ctl(&[
        "dry-run",
        "-f",
        candidate.path.to_str().unwrap(),
        "--from-file",
        flows_only.path.to_str().unwrap(),
    ]);
    assert_eq!(by_agent.stdout, from_file.stdout);
    assert!(
        by_agent
            .stdout
            .starts_with("replayed 11 flow records (11 connections): "),
        "{}",
        by_agent.stdout
    );
    assert!(
        by_agent.stdout.contains(&expected[1]),
        "{}",
        by_agent.stdout
    );
    assert!(!by_agent.success && !from_file.success);
    // And suggest reads the agent's recent flows as it reads them from a file.
    assert_eq!(
        env.ctl(&["suggest", "--collapse-threshold", "3"]).ok(),
        env.ctl(&[
            "suggest",
            "--from-file",
            flows_only.path.to_str().unwrap(),
            "--collapse-threshold",
            "3",
        ])
        .ok()
    );

    // Enforced, the suggestion allows the workload everything it did...
    let enforced = TempFile::new(
        "suggest-enforced.yaml",
        &suggested.replace("mode: observe", "mode: enforce"),
    );
    env.ctl(&["apply", "-f", enforced.path.to_str().unwrap()])
        .ok();
    workload(&env, &app, resolver, direct);
    // ...and nothing else: not another host, not a name it never asked for.
    let other = env.probe_in(&app, &["connect", "tcp", &format!("{elsewhere}:{WEB}")]);
    assert_eq!(other.result(), Err(EPERM));
    let unseen = env.probe_in(
        &app,
        &[
            "resolve-connect",
            "udp",
            &format!("{resolver}:53"),
            "unseen.other.test",
            "A",
            &HTTPS.to_string(),
        ],
    );
    assert_eq!(unseen.result(), Err(EPERM));

    // A dry run of the suggestion as it is changes nothing...
    let unchanged = env.ctl(&[
        "dry-run",
        "-f",
        enforced.path.to_str().unwrap(),
        "--from-file",
        recording.path.to_str().unwrap(),
    ]);
    let report = unchanged.ok();
    assert!(
        report.contains(": 0 would be newly denied, 0 newly allowed"),
        "{report}"
    );

    dry_run_fails(&[
        "dry-run",
        "-f",
        candidate.path.to_str().unwrap(),
        "--from-file",
        recording.path.to_str().unwrap(),
    ]);
    agent.terminate();
}
