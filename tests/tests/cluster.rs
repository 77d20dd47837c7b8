//! Cluster-wide policies on simulated nodes: EgressPolicy and
//! ClusterEgressPolicy resources made, changed and deleted through the
//! stand-in API server reach the kernel with no per-node step; a bad change
//! opens nothing; the status counts the nodes that enforce; a new node
//! enforces before its taint goes; the watches survive what the API server
//! does to them.
//!
//! These tests need root and the BPF object: `cargo xtask test` runs them.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tollgate_tests::{
    AgentProcess, TempFile, TestEnv, agent_binary, free_port, http_get,
    kube::{FakeApiServer, agent_pod, egress_policy, namespace, node},
    node::{Layout, NODE, SimPod, until},
};

const EPERM: i32 = libc::EPERM;
const WAIT: Duration = Duration::from_secs(10);
const TAINT: &str = "tollgate.dev/agent-not-ready";

/// Starts an agent of `api`'s cluster, with its report on a metrics port,
/// and waits until it has listed both policy kinds.
fn start_agent(env: &TestEnv, kubeconfig: &TempFile, extra: &[&str]) -> (AgentProcess, u16) {
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let mut args = vec![
        "--kubeconfig",
        kubeconfig.path.to_str().unwrap(),
        "--allowed-report-interval",
        "0",
        "--metrics-listen",
        &metrics,
    ];
    args.extend_from_slice(extra);
    let agent = AgentProcess::start(env, &args);
    agent.wait_until_logged(
        &[
            "listed kind=\"egresspolicies\"",
            "listed kind=\"clusteregresspolicies\"",
        ],
        WAIT,
    );
    (agent, metrics_port)
}

/// `tollgate-agent status-writer` for `api`'s cluster, as its Deployment
/// runs it; killed on drop.
struct StatusWriter(std::process::Child);

impl StatusWriter {
    fn start(kubeconfig: &TempFile) -> Self {
        let child = std::process::Command::new(agent_binary())
            .args(["status-writer", "--kubeconfig"])
            .arg(&kubeconfig.path)
            .args(["--namespace", "tollgate-system", "--identity", "writer-0"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting the status writer");
        Self(child)
    }
}

impl Drop for StatusWriter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A web pod in prod on the simulated node, its cgroup made.
fn web_pod(env: &TestEnv, api: &FakeApiServer) -> SimPod {
    api.put(namespace("prod", &[]));
    let web = SimPod::new(
        env,
        1,
        "prod",
        "web",
        "web",
        Layout::Systemd(Some("burstable"), "cri-containerd"),
    );
    web.make_cgroup(env);
    api.put(web.object.clone());
    web
}

/// A simulated node whose agent watches the cluster, with a web pod in prod
/// that reached `host` until the cluster locked prod down. Fields drop in
/// order: the agent before the cgroups and hosts it uses.
struct LockedDown {
    agent: AgentProcess,
    metrics_port: u16,
    web: SimPod,
    host: Ipv4Addr,
    lockdown: Value,
    _kubeconfig: TempFile,
    api: FakeApiServer,
    env: TestEnv,
}

fn locked_down(name: &str, host_index: u8, ports: &[u16]) -> LockedDown {
    let mut env = TestEnv::new(name);
    let host = env.add_host(host_index, ports).v4;
    let api = FakeApiServer::start();
    let web = web_pod(&env, &api);
    let kubeconfig = TempFile::new(&format!("{name}.kubeconfig"), &api.kubeconfig());
    let (agent, metrics_port) = start_agent(&env, &kubeconfig, &[]);
    until(Ok(()), WAIT, || web.connect(&env, host, ports[0]));
    let lockdown = prod_lockdown();
    api.put(lockdown.clone());
    until(Err(EPERM), WAIT, || web.connect(&env, host, ports[0]));
    LockedDown {
        agent,
        metrics_port,
        web,
        host,
        lockdown,
        _kubeconfig: kubeconfig,
        api,
        env,
    }
}

/// Denies every egress of prod's pods.
fn prod_lockdown() -> Value {
    egress_policy(
        None,
        "prod-lockdown",
        json!({
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prod"}},
            "mode": "enforce",
        }),
    )
}

/// prod/web-egress: web pods may reach `host` on `port` only.
fn web_egress(host: Ipv4Addr, cidr_suffix: &str, port: u16) -> Value {
    egress_policy(
        Some("prod"),
        "web-egress",
        json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "mode": "enforce",
            "egress": [{"name": "api", "to": [{"cidr": format!("{host}{cidr_suffix}")}],
                "ports": [{"port": port, "protocol": "TCP"}]}],
        }),
    )
}

/// Waits until the stored resource's status satisfies `done`; returns it.
fn status_until(
    api: &FakeApiServer,
    plural: &str,
    key: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = api
            .get(plural, key)
            .map(|object| object["status"].clone())
            .unwrap_or_default();
        if done(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{plural} {key}: no status with {what}; last: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn condition<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|all| all.iter().find(|c| c["type"] == kind))
        .unwrap_or(&Value::Null)
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_cluster_policy_from_the_api_blocks_a_pod_until_it_is_deleted() {
    // Bound in this order, they drop in the reverse: the agent first.
    let LockedDown {
        env,
        api,
        lockdown,
        host,
        web,
        agent,
        ..
    } = locked_down("cluster-enforce", 41, &[8080]);
    // Records say where the deciding policy came from.
    let deadline = Instant::now() + WAIT;
    let denied = loop {
        let record = agent.next_record(deadline.saturating_duration_since(Instant::now()));
        if record["verdict"] == "denied" && record["policy"] == "prod-lockdown" {
            break record;
        }
    };
    assert_eq!(denied["policy_source"], "cluster", "{denied}");
    let table = env.ctl(&["get", "policies"]).ok();
    let line = table
        .lines()
        .find(|l| l.starts_with("prod-lockdown"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains("cluster (generation 1)"), "{table}");

    // A local policy may not replace the cluster's of the same name.
    let local = TempFile::new(
        "cluster-enforce-local.yaml",
        "apiVersion: policy.tollgate.dev/v1alpha1\nkind: ClusterEgressPolicy\nmetadata: {name: prod-lockdown}\nspec: {namespaceSelector: {}, defaultAction: allow}\n",
    );
    let refused = env
        .ctl(&["apply", "-f", local.path.to_str().unwrap()])
        .failed();
    assert!(
        refused.contains("prod-lockdown is the cluster's ClusterEgressPolicy"),
        "{refused}"
    );
    assert_eq!(web.connect(&env, host, 8080), Err(EPERM));

    api.delete(&lockdown);
    until(Ok(()), WAIT, || web.connect(&env, host, 8080));
    assert!(!env.ctl(&["get", "policies"]).ok().contains("prod-lockdown"));

    // The other way round: a local policy holds the name first. The
    // cluster's waits, and takes over once the local one is deleted.
    env.ctl(&["apply", "-f", local.path.to_str().unwrap()]).ok();
    api.put(lockdown.clone());
    agent.wait_for_log("a local policy of this name is in force", WAIT);
    assert_eq!(web.connect(&env, host, 8080), Ok(()));
    env.ctl(&["delete", "prod-lockdown"]).ok();
    until(Err(EPERM), Duration::from_secs(15), || {
        web.connect(&env, host, 8080)
    });
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_bad_edit_keeps_the_last_valid_version_in_force_and_the_status_says_why() {
    let mut env = TestEnv::new("cluster-bad-edit");
    let host = env.add_host(42, &[8080, 8081]).v4;
    let api = FakeApiServer::start();
    let web = web_pod(&env, &api);
    let kubeconfig = TempFile::new("cluster-bad-edit.kubeconfig", &api.kubeconfig());
    let (agent, metrics_port) = start_agent(&env, &kubeconfig, &[]);
    api.put(agent_pod(NODE, metrics_port));
    let _writer = StatusWriter::start(&kubeconfig);

    api.put(web_egress(host, "/32", 8080));
    until(Err(EPERM), WAIT, || web.connect(&env, host, 8081));
    assert_eq!(web.connect(&env, host, 8080), Ok(()));
    let status = status_until(
        &api,
        "egresspolicies",
        "prod/web-egress",
        "1 of 1 enforced",
        |s| s["nodes"]["enforced"] == 1 && condition(s, "Enforced")["status"] == "True",
    );
    assert_eq!(condition(&status, "Accepted")["status"], "True");
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["rules"], 1);

    // Generation 2 opens 8081, with a prefix that is no prefix.
    api.put(web_egress(host, "/33", 8081));
    agent.wait_for_log("refused an invalid version", WAIT);
    let status = status_until(
        &api,
        "egresspolicies",
        "prod/web-egress",
        "Accepted False",
        |s| condition(s, "Accepted")["status"] == "False",
    );
    let message = condition(&status, "Accepted")["message"].as_str().unwrap();
    assert!(
        message.contains("generation 2 is invalid; generation 1 stays in force")
            && message.contains(&format!(
                "spec.egress[0].to[0].cidr: \"{host}/33\" is not a valid prefix"
            )),
        "{message}"
    );
    assert_eq!(status["observedGeneration"], 2);
    assert_eq!(status["nodes"]["enforced"], 1, "{status:#}");
    assert_eq!(web.connect(&env, host, 8081), Err(EPERM));
    assert_eq!(web.connect(&env, host, 8080), Ok(()));

    // A namespace's policy may not reach beyond its namespace: refused,
    // and nothing it says is in force.
    api.put(egress_policy(
        Some("prod"),
        "reach-out",
        json!({"podSelector": {}, "namespaceSelector": {}, "egress": [{}]}),
    ));
    let status = status_until(
        &api,
        "egresspolicies",
        "prod/reach-out",
        "Accepted False",
        |s| condition(s, "Accepted")["status"] == "False",
    );
    assert_eq!(condition(&status, "Enforced")["reason"], "NotAccepted");
    assert_eq!(web.connect(&env, host, 8081), Err(EPERM));

    // Fixed: generation 3 is in force.
    api.put(web_egress(host, "/32", 8081));
    until(Ok(()), WAIT, || web.connect(&env, host, 8081));
    assert_eq!(web.connect(&env, host, 8080), Err(EPERM));
    status_until(
        &api,
        "egresspolicies",
        "prod/web-egress",
        "generation 3 enforced",
        |s| {
            s["observedGeneration"] == 3
                && condition(s, "Accepted")["status"] == "True"
                && condition(s, "Enforced")["status"] == "True"
        },
    );

    // Deleted: the pod is selected by nothing and may go anywhere.
    api.delete(&api.get("egresspolicies", "prod/web-egress").unwrap());
    until(Ok(()), WAIT, || web.connect(&env, host, 8080));
    assert_eq!(web.connect(&env, host, 8081), Ok(()));
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_policy_that_cannot_be_put_in_force_holds_no_other_back() {
    let LockedDown {
        env,
        api,
        lockdown,
        host,
        web,
        metrics_port,
        agent,
        ..
    } = locked_down("cluster-compile", 46, &[8080]);

    // Valid, but 18 port rules on one prefix: more than a prefix holds.
    let ports = |from: u16| -> Vec<Value> {
        (from..from + 9)
            .map(|port| json!({"port": port, "protocol": "TCP"}))
            .collect()
    };
    let to = json!([{"cidr": format!("{host}/32")}]);
    api.put(egress_policy(
        Some("prod"),
        "too-many-ports",
        json!({"podSelector": {}, "egress": [
            {"to": to, "ports": ports(9000)},
            {"to": to, "ports": ports(9100)},
        ]}),
    ));
    agent.wait_for_log("one by one", WAIT);
    // The rest goes on: the lockdown's delete reaches the kernel.
    api.delete(&lockdown);
    until(Ok(()), WAIT, || web.connect(&env, host, 8080));
    let (_, body) = http_get(metrics_port, "/cluster-policies");
    let report: Value = serde_json::from_str(&body).unwrap();
    let refused = report["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "too-many-ports")
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(refused["inForce"], Value::Null, "{report:#}");
    assert!(
        refused["error"].as_str().unwrap().contains("port rules"),
        "{report:#}"
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn watches_survive_disconnects_410_and_an_api_server_that_is_away() {
    let LockedDown {
        env,
        _kubeconfig: kubeconfig,
        api,
        lockdown,
        host,
        web,
        agent,
        ..
    } = locked_down("cluster-outage", 43, &[8080]);

    // A dropped watch resumes and sees the delete.
    api.disconnect_watches();
    api.delete(&lockdown);
    until(Ok(()), WAIT, || web.connect(&env, host, 8080));

    // After 410 Gone the watch lists again and sees the create.
    api.compact();
    api.disconnect_watches();
    api.put(lockdown.clone());
    agent.wait_for_log("listed kind=\"clusteregresspolicies\"", WAIT);
    until(Err(EPERM), WAIT, || web.connect(&env, host, 8080));
    drop(agent);

    // Restarted while the API server is away: the saved set is in force
    // before the agent is ready.
    api.set_down(true);
    let agent = AgentProcess::start(&env, &["--kubeconfig", kubeconfig.path.to_str().unwrap()]);
    assert_eq!(web.connect(&env, host, 8080), Err(EPERM));
    // Deleted while the agent could not see it: gone once the API is back.
    api.delete(&lockdown);
    assert_eq!(
        web.connect(&env, host, 8080),
        Err(EPERM),
        "nothing changes while the API is away"
    );
    api.set_down(false);
    // The watches retry with a jittered backoff (0.8 s doubling, capped at
    // 30 s, plus up to as much again) while it is away.
    let deadline = Instant::now() + Duration::from_secs(60);
    while web.connect(&env, host, 8080) != Ok(()) {
        assert!(
            Instant::now() < deadline,
            "still blocked a minute after the API came back; the agent logged: {:#?}",
            agent.log_so_far()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(agent);
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn two_nodes_converge_and_a_new_node_enforces_before_its_taint_goes() {
    let mut envs = [TestEnv::new("cluster-two-a"), TestEnv::new("cluster-two-b")];
    let host = envs[0].add_host(44, &[8080]).v4;
    let host_b = envs[1].add_host(45, &[8080]).v4;
    let api = FakeApiServer::start();
    api.put(node("node-a", &[]));
    api.put(node(
        "node-b",
        &[(TAINT, "NoSchedule"), ("example.com/other", "NoExecute")],
    ));
    // Both test cgroups, as host processes: a policy every node enforces.
    let pid = std::process::id();
    let policy = egress_policy(
        None,
        "hosts-locked",
        json!({"cgroupSelector": {"paths": [format!("/tgtest-cluster-two-*-{pid}")]}, "mode": "enforce"}),
    );
    api.put(policy.clone());
    let kubeconfig = TempFile::new("cluster-two.kubeconfig", &api.kubeconfig());
    let connect = |env: &TestEnv, host: Ipv4Addr| {
        env.probe(&["connect", "tcp", &format!("{host}:8080")])
            .result()
    };

    let (_agent_a, port_a) = start_agent(&envs[0], &kubeconfig, &["--node", "node-a"]);
    api.put(agent_pod("node-a", port_a));
    let _writer = StatusWriter::start(&kubeconfig);
    until(Err(EPERM), WAIT, || connect(&envs[0], host));
    assert_eq!(connect(&envs[1], host_b), Ok(()), "no agent on node b yet");

    // Node b joins: its taint goes only once the policy is in force there.
    let (agent_b, port_b) = start_agent(&envs[1], &kubeconfig, &["--node", "node-b"]);
    api.put(agent_pod("node-b", port_b));
    let deadline = Instant::now() + WAIT;
    loop {
        let taints = api.get("nodes", "node-b").unwrap()["spec"]["taints"].clone();
        let tainted = taints
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["key"] == TAINT));
        if !tainted {
            assert_eq!(
                taints,
                json!([{"key": "example.com/other", "effect": "NoExecute"}])
            );
            break;
        }
        assert!(Instant::now() < deadline, "node-b is still tainted");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        connect(&envs[1], host_b),
        Err(EPERM),
        "the taint went before the policy was in force"
    );
    agent_b.wait_for_log("removed the node's taint", WAIT);
    let log = agent_b.log_read();
    let line = |what: &dyn Fn(&String) -> bool| log.iter().position(what);
    let in_force = line(&|l| l.contains("cluster policies in force") && l.contains("hosts-locked"));
    let untainted = line(&|l| l.contains("removed the node's taint"));
    assert!(
        in_force.is_some() && in_force < untainted,
        "the taint went before the policy was in force: {log:#?}"
    );
    // Node a had no taint and keeps none.
    assert_eq!(
        api.get("nodes", "node-a").unwrap()["spec"]["taints"],
        Value::Null
    );

    let status = status_until(
        &api,
        "clusteregresspolicies",
        "hosts-locked",
        "2 of 2 enforced",
        |s| s["nodes"]["desired"] == 2 && s["nodes"]["enforced"] == 2,
    );
    assert_eq!(
        condition(&status, "Enforced")["status"],
        "True",
        "{status:#}"
    );
    let lease = api
        .get("leases", "tollgate-system/tollgate-policy-status")
        .unwrap();
    assert_eq!(
        lease["spec"]["holderIdentity"], "writer-0",
        "the agents write no status"
    );
    envs[1].ctl(&["status"]).ok();
}
