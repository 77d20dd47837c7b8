//! Per-rule hit counts, counted by the kernel (`TG_RULE_HITS`): exact
//! counts by verdict, last-hit times that move, counts that survive an
//! agent restart and a switch that keeps the rule, a removed rule's slot
//! zeroed, the counters readable while no agent runs, and `--unused-for`.
//!
//! These tests need root and the BPF object: `cargo xtask test` runs them.

use std::net::Ipv4Addr;

use serde_json::Value;
use tollgate_agent::datapath::RuleHitsMap;
use tollgate_tests::{AgentProcess, TempFile, TestEnv};

const EPERM: i32 = libc::EPERM;

/// Policy `hits`: `block` denies 8082, `web` allows 8080 (and `extra`,
/// when given, allows 8083); everything else is denied by the default.
fn policy(cgroup: &str, host: Ipv4Addr, mode: &str, with_block: bool, with_extra: bool) -> String {
    let mut rules = String::new();
    if with_extra {
        rules.push_str(&format!(
            "  - name: extra\n    to: [{{cidr: {host}/32}}]\n    ports: [{{port: 8083, protocol: TCP}}]\n"
        ));
    }
    if with_block {
        rules.push_str(&format!(
            "  - name: block\n    action: deny\n    to: [{{cidr: {host}/32}}]\n    ports: [{{port: 8082, protocol: TCP}}]\n"
        ));
    }
    rules.push_str(&format!(
        "  - name: web\n    to: [{{cidr: {host}/32}}]\n    ports: [{{port: 8080, protocol: TCP}}]\n"
    ));
    format!(
        "apiVersion: policy.tollgate.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: hits
spec:
  cgroupSelector:
    paths: [\"{cgroup}\"]
  mode: {mode}
  egress:
{rules}"
    )
}

/// `tollgatectl get rules hits -o json` (extra args after), by rule name
/// ("" for the default).
fn rules(env: &TestEnv, extra: &[&str]) -> std::collections::BTreeMap<String, Value> {
    let mut args = vec!["get", "rules", "hits", "-o", "json"];
    args.extend_from_slice(extra);
    let out = env.ctl(&args).ok();
    let list: Vec<Value> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    list.into_iter()
        .map(|r| (r["rule"].as_str().unwrap_or("").to_owned(), r))
        .collect()
}

fn counts(rule: &Value) -> (u64, u64, u64) {
    let n = |field: &str| {
        rule[field]
            .as_str()
            .map_or_else(|| rule[field].as_u64().unwrap_or(0), |s| s.parse().unwrap())
    };
    (n("allowed"), n("denied"), n("audit"))
}

fn last_hit(rule: &Value) -> u64 {
    rule["lastHitUnixNanos"].as_str().map_or_else(
        || rule["lastHitUnixNanos"].as_u64().unwrap_or(0),
        |s| s.parse().unwrap(),
    )
}

fn id_of(rule: &Value) -> u32 {
    rule["hitsId"].as_u64().unwrap() as u32
}

fn connect(env: &TestEnv, host: Ipv4Addr, port: u16, times: usize) -> Vec<Result<(), i32>> {
    (0..times)
        .map(|_| {
            env.probe(&["connect", "tcp", &format!("{host}:{port}")])
                .result()
        })
        .collect()
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn rules_count_their_hits_exactly_across_switches_and_restarts() {
    let mut env = TestEnv::new("rulehits");
    let host = env.add_host(117, &[8080, 8081, 8082, 8083]).v4;
    let cgroup = env.cgroup.relative.clone();
    let first = TempFile::new(
        "rulehits-1.yaml",
        &policy(&cgroup, host, "enforce", true, false),
    );
    let mut agent = AgentProcess::start(&env, &["--policy", first.path.to_str().unwrap()]);

    // Never hit yet: zero and "never".
    let before = rules(&env, &[]);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        ["", "block", "web"],
        "{before:#?}"
    );
    assert!(
        before
            .values()
            .all(|r| counts(r) == (0, 0, 0) && last_hit(r) == 0)
    );
    let table = env.ctl(&["get", "rules", "hits"]).ok();
    assert!(table.contains("never"), "{table}");

    assert_eq!(connect(&env, host, 8080, 3), [Ok(()); 3]);
    assert_eq!(connect(&env, host, 8081, 2), [Err(EPERM); 2]);
    assert_eq!(connect(&env, host, 8082, 1), [Err(EPERM)]);
    let hit = rules(&env, &[]);
    assert_eq!(counts(&hit["web"]), (3, 0, 0), "{hit:#?}");
    assert_eq!(counts(&hit["block"]), (0, 1, 0), "{hit:#?}");
    assert_eq!(counts(&hit[""]), (0, 2, 0), "the default: {hit:#?}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let web_last = last_hit(&hit["web"]);
    assert!(
        web_last.abs_diff(now) < 10_000_000_000,
        "last hit {web_last} is not about now ({now})"
    );
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(connect(&env, host, 8080, 1), [Ok(())]);
    let moved = rules(&env, &[]);
    assert_eq!(counts(&moved["web"]), (4, 0, 0));
    assert!(last_hit(&moved["web"]) > web_last, "the last hit moved");

    // A switch that keeps `web` (moved down a place by a new rule) and
    // removes `block`.
    let block_id = id_of(&moved["block"]);
    let second = TempFile::new(
        "rulehits-2.yaml",
        &policy(&cgroup, host, "enforce", false, true),
    );
    env.ctl(&["apply", "-f", second.path.to_str().unwrap()])
        .ok();
    let switched = rules(&env, &[]);
    assert_eq!(
        switched.keys().collect::<Vec<_>>(),
        ["", "extra", "web"],
        "{switched:#?}"
    );
    assert_eq!(
        counts(&switched["web"]),
        (4, 0, 0),
        "kept across the switch"
    );
    assert_eq!(counts(&switched[""]), (0, 2, 0), "the default too");
    assert_eq!(counts(&switched["extra"]), (0, 0, 0));
    let pinned = RuleHitsMap::open_pinned(&env.datapath_options().pin_dir()).unwrap();
    assert_eq!(
        pinned.read([block_id]).unwrap()[&block_id],
        Default::default(),
        "the removed rule's counter is zeroed"
    );

    // Pruning candidates: never hit within a day.
    let unused = rules(&env, &["--unused-for", "1d"]);
    assert_eq!(unused.keys().collect::<Vec<_>>(), ["extra"], "{unused:#?}");

    // While no agent runs, tollgatectl reads the pins, named by the state.
    agent.terminate();
    assert_eq!(connect(&env, host, 8080, 1), [Ok(())], "still enforced");
    let down = env.ctl(&[
        "get",
        "rules",
        "hits",
        "-o",
        "json",
        "--bpffs-root",
        env.bpffs.root().to_str().unwrap(),
        "--state-dir",
        env.state.path.to_str().unwrap(),
    ]);
    assert!(
        down.stderr.contains("reading the pinned counters"),
        "{}",
        down.stderr
    );
    let down: Vec<Value> = serde_json::from_str(&down.ok()).unwrap();
    let web = down.iter().find(|r| r["rule"] == "web").unwrap();
    assert_eq!(counts(web), (5, 0, 0), "counted while the agent was down");

    // A restarted agent (the saved set, no --policy) keeps every count.
    let port = tollgate_tests::free_port();
    let _agent = AgentProcess::start(&env, &["--metrics-listen", &format!("127.0.0.1:{port}")]);
    let restarted = rules(&env, &[]);
    assert_eq!(counts(&restarted["web"]), (5, 0, 0), "{restarted:#?}");
    assert_eq!(counts(&restarted[""]), (0, 2, 0), "{restarted:#?}");
    assert_eq!(id_of(&restarted["web"]), id_of(&moved["web"]));
    let (code, metrics) = tollgate_tests::http_get(port, "/metrics");
    assert_eq!(code, 200, "{metrics}");
    let sample = |name: &str| tollgate_tests::metric_sample(&metrics, name);
    assert_eq!(
        sample(r#"tollgate_rule_hits_total{policy="hits",rule="web",verdict="allowed"}"#),
        5,
        "{metrics}"
    );
    assert_eq!(
        sample(r#"tollgate_rule_hits_total{policy="hits",rule="default",verdict="denied"}"#),
        2
    );
    assert_eq!(
        sample(r#"tollgate_policy_hits_total{policy="hits",verdict="allowed"}"#),
        5
    );
    assert!(
        metrics.contains(r#"tollgate_rule_last_hit_timestamp_seconds{policy="hits",rule="web"}"#)
    );
    assert!(
        !metrics
            .contains(r#"tollgate_rule_last_hit_timestamp_seconds{policy="hits",rule="extra"}"#)
    );

    // Observe mode: the default's denials become audit.
    env.ctl(&["mode", "observe", "--policy", "hits"]).ok();
    assert_eq!(connect(&env, host, 8081, 2), [Ok(()); 2]);
    let audit = rules(&env, &[]);
    assert_eq!(counts(&audit[""]), (0, 2, 2), "{audit:#?}");
}
