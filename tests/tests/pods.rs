//! Pods as endpoints, on a simulated node: kubelet's cgroup trees (both
//! drivers, every QoS class, containerd, CRI-O and Docker scopes) with real
//! processes in them, and a stand-in API server speaking list/watch. The
//! agent learns pods and namespaces from it, selects pods by labels, and
//! names them in flow records.
//!
//! These tests need root and the BPF object: `cargo xtask test` runs them.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use serde_json::Value;
use tollgate_tests::{
    AgentProcess, TempFile, TestEnv,
    kube::{FakeApiServer, namespace},
    node::{Layout, NODE, SimPod, until},
};

const EPERM: i32 = libc::EPERM;
const WAIT: Duration = Duration::from_secs(5);

fn payments_policy(host: Ipv4Addr) -> String {
    format!(
        "apiVersion: policy.tollgate.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: payments-egress
  namespace: prod
spec:
  podSelector:
    matchLabels: {{app: payments}}
  mode: enforce
  egress:
  - name: api
    to: [{{cidr: {host}/32}}]
    ports: [{{port: 8081, protocol: TCP}}]
"
    )
}

fn start_agent(env: &TestEnv, kubeconfig: &TempFile, extra: &[&str]) -> AgentProcess {
    start_agent_under(env, &[], kubeconfig, extra)
}

/// The agent with exactly the capabilities deploy/daemonset.yaml grants.
fn start_agent_as_daemonset(env: &TestEnv, kubeconfig: &TempFile, extra: &[&str]) -> AgentProcess {
    let wrapper = tollgate_tests::with_only_capabilities(&tollgate_tests::daemonset_capabilities());
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    start_agent_under(env, &wrapper, kubeconfig, extra)
}

fn start_agent_under(
    env: &TestEnv,
    wrapper: &[&str],
    kubeconfig: &TempFile,
    extra: &[&str],
) -> AgentProcess {
    let mut args = vec![
        "--kubeconfig",
        kubeconfig.path.to_str().unwrap(),
        "--allowed-report-interval",
        "0",
        "--pod-label-keys",
        "app",
    ];
    args.extend_from_slice(extra);
    let agent = AgentProcess::try_start_under(env, wrapper, &args)
        .unwrap_or_else(|log| panic!("the agent did not get ready; it logged: {log:#?}"));
    // Both lists (pods, namespaces) may come before or after "ready".
    agent.wait_until_logged(
        &["listed kind=\"pods\"", "listed kind=\"namespaces\""],
        WAIT,
    );
    agent
}

/// The next record from `cgroup` to `port` with `verdict` (records of other
/// probes, like those of polling until a change took effect, are skipped).
fn record_from(
    agent: &AgentProcess,
    env: &TestEnv,
    cgroup: &std::path::Path,
    port: u16,
    verdict: &str,
) -> Value {
    let relative = format!(
        "{}/{}",
        env.cgroup.relative,
        cgroup.strip_prefix(&env.cgroup.path).unwrap().display()
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let record = agent.next_record(deadline.saturating_duration_since(Instant::now()));
        if record["src"]["cgroup"] == relative.as_str()
            && record["dst"]["port"] == port
            && record["verdict"] == verdict
        {
            return record;
        }
    }
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_payments_policy_blocks_exactly_the_payments_pods_of_prod() {
    let mut env = TestEnv::new("pods-select");
    let host = env.add_host(40, &[8080, 8081]).v4;
    let api = FakeApiServer::start();
    api.put(namespace("prod", &[("env", "prod")]));
    api.put(namespace("dev", &[("env", "dev")]));
    // Every layout kubelet makes; four payments pods in prod.
    let payments = [
        SimPod::new(
            &env,
            1,
            "prod",
            "payments",
            "payments",
            Layout::Systemd(Some("burstable"), "cri-containerd"),
        ),
        SimPod::new(
            &env,
            2,
            "prod",
            "payments",
            "payments",
            Layout::Systemd(None, "crio"),
        ),
        SimPod::new(
            &env,
            3,
            "prod",
            "payments",
            "payments",
            Layout::Cgroupfs(Some("burstable")),
        ),
        SimPod::new(
            &env,
            4,
            "prod",
            "payments",
            "payments",
            Layout::Cgroupfs(Some("besteffort")),
        ),
    ];
    let others = [
        SimPod::new(
            &env,
            5,
            "prod",
            "web",
            "web",
            Layout::Systemd(Some("besteffort"), "docker"),
        ),
        SimPod::new(
            &env,
            6,
            "dev",
            "payments",
            "payments",
            Layout::Cgroupfs(None),
        ),
    ];
    for sim in payments.iter().chain(&others) {
        sim.make_cgroup(&env);
        api.put(sim.object.clone());
    }
    let host_process = env.cgroup.child("system.slice/cron.service");
    let policy = TempFile::new("pods-select.yaml", &payments_policy(host));
    let kubeconfig = TempFile::new("pods-select.kubeconfig", &api.kubeconfig());
    let agent = start_agent(
        &env,
        &kubeconfig,
        &["--policy", policy.path.to_str().unwrap()],
    );

    until(Err(EPERM), WAIT, || payments[0].connect(&env, host, 8080));
    for sim in &payments {
        assert_eq!(sim.connect(&env, host, 8080), Err(EPERM), "{}", sim.uid);
        assert_eq!(
            sim.connect(&env, host, 8081),
            Ok(()),
            "the policy's allow rule"
        );
    }
    for sim in &others {
        assert_eq!(sim.connect(&env, host, 8080), Ok(()), "{}", sim.uid);
    }
    assert_eq!(
        env.probe_in(&host_process, &["connect", "tcp", &format!("{host}:8080")])
            .result(),
        Ok(()),
        "host processes are not restricted"
    );

    // A pod that starts now: the API server reports it (bound to this node),
    // then kubelet makes its cgroup; its first connect is denied.
    let late = SimPod::new(
        &env,
        7,
        "prod",
        "payments",
        "payments",
        Layout::Systemd(Some("burstable"), "cri-containerd"),
    );
    api.put(late.object.clone());
    late.make_cgroup(&env);
    late.wait_until_in_datapath(&env);
    assert_eq!(late.connect(&env, host, 8080), Err(EPERM));

    // The API server was asked for this node's pods only.
    assert!(
        api.requests()
            .iter()
            .any(|r| r.starts_with("pods?") && r.contains("fieldSelector=spec.nodeName=test-node")),
        "{:#?}",
        api.requests()
    );

    // Records name namespace, pod, container and workload.
    assert_eq!(payments[0].connect(&env, host, 8080), Err(EPERM));
    let denied = record_from(&agent, &env, &payments[0].cgroup, 8080, "denied");
    assert_eq!(denied["policy"], "prod/payments-egress");
    assert_eq!(denied["node"], NODE);
    let src = &denied["src"];
    assert_eq!(src["identity"], "pod");
    assert_eq!(src["namespace"], "prod");
    assert_eq!(src["pod"], payments[0].object["metadata"]["name"]);
    assert_eq!(src["pod_uid"], payments[0].uid.as_str());
    assert_eq!(
        src["container"],
        serde_json::json!({"name": "app", "id": payments[0].container_id})
    );
    assert_eq!(
        src["workload"],
        serde_json::json!({"kind": "Deployment", "name": "payments"})
    );
    assert_eq!(src["labels"], serde_json::json!({"app": "payments"}));

    assert_eq!(others[1].connect(&env, host, 8080), Ok(()));
    let allowed = record_from(&agent, &env, &others[1].cgroup, 8080, "allowed");
    assert_eq!(
        (
            &allowed["verdict"],
            &allowed["policy"],
            &allowed["src"]["namespace"]
        ),
        (&"allowed".into(), &Value::Null, &"dev".into())
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn pod_and_namespace_changes_reach_the_kernel_through_disconnects_and_410() {
    let mut env = TestEnv::new("pods-watch");
    let host = env.add_host(41, &[8080]).v4;
    let api = FakeApiServer::start();
    api.put(namespace("prod", &[("env", "prod")]));
    api.put(namespace("staging", &[("env", "staging")]));
    let web = SimPod::new(
        &env,
        1,
        "prod",
        "web",
        "web",
        Layout::Systemd(Some("burstable"), "cri-containerd"),
    );
    let batch = SimPod::new(
        &env,
        2,
        "staging",
        "batch",
        "batch",
        Layout::Cgroupfs(Some("besteffort")),
    );
    for sim in [&web, &batch] {
        sim.make_cgroup(&env);
        api.put(sim.object.clone());
    }
    // One policy by pod labels, one by namespace labels.
    let policies = TempFile::new(
        "pods-watch.yaml",
        &format!(
            "{}---
apiVersion: policy.tollgate.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: locked-namespaces
spec:
  namespaceSelector:
    matchExpressions: [{{key: lockdown, operator: Exists}}]
  mode: enforce
",
            payments_policy(host)
        ),
    );
    let kubeconfig = TempFile::new("pods-watch.kubeconfig", &api.kubeconfig());
    let agent = start_agent(
        &env,
        &kubeconfig,
        &["--policy", policies.path.to_str().unwrap()],
    );
    until(Ok(()), WAIT, || web.connect(&env, host, 8080));
    assert_eq!(batch.connect(&env, host, 8080), Ok(()));

    // A relabelled pod is under its new policy within a second, and out of it again.
    api.put(web.relabelled("payments"));
    let took = until(Err(EPERM), Duration::from_secs(1), || {
        web.connect(&env, host, 8080)
    });
    println!("relabel to deny took {took:?}");
    api.put(web.object.clone());
    until(Ok(()), Duration::from_secs(1), || {
        web.connect(&env, host, 8080)
    });

    // A relabelled namespace too.
    api.put(namespace(
        "staging",
        &[("env", "staging"), ("lockdown", "true")],
    ));
    until(Err(EPERM), Duration::from_secs(1), || {
        batch.connect(&env, host, 8080)
    });

    // The watch ends (API server restart): it resumes and still follows.
    api.disconnect_watches();
    api.put(web.relabelled("payments"));
    until(Err(EPERM), WAIT, || web.connect(&env, host, 8080));

    // The history is gone (410 Gone on resume): the agent lists again, and
    // what changed meanwhile, a deleted namespace's lockdown, takes effect.
    api.compact();
    api.disconnect_watches();
    api.put(namespace("staging", &[("env", "staging")]));
    until(Ok(()), WAIT, || batch.connect(&env, host, 8080));
    // The agent logged the 410, so a relist (not a replay) brought the change.
    agent.wait_for_log("too old resource version", WAIT);

    // A deleted pod's entries go away with it.
    let web_cgroup = tollgate_agent::cgroups::cgroup_id(&web.cgroup).unwrap();
    assert!(env.endpoint_cgroup_ids().contains(&web_cgroup));
    api.delete(&web.relabelled("payments"));
    let deadline = Instant::now() + Duration::from_secs(1);
    while env.endpoint_cgroup_ids().contains(&web_cgroup) {
        assert!(
            Instant::now() < deadline,
            "the deleted pod's endpoint is still there"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(api.open_watches() >= 2, "the agent still watches");
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn an_unknown_pod_is_denied_until_its_metadata_arrives_then_its_policy_takes_over_also_after_a_restart()
 {
    let mut env = TestEnv::new("pods-unknown");
    let host = env.add_host(42, &[8080, 8081]).v4;
    let api = FakeApiServer::start();
    api.put(namespace("prod", &[]));
    let policy = TempFile::new("pods-unknown.yaml", &payments_policy(host));
    let kubeconfig = TempFile::new("pods-unknown.kubeconfig", &api.kubeconfig());
    let strict = [
        "--policy",
        policy.path.to_str().unwrap(),
        "--unknown-pod-action",
        "deny",
        "--mode",
        "enforce",
    ];
    let mut agent = start_agent(&env, &kubeconfig, &strict);

    // The cgroup appears before the API server has said anything of the pod.
    let payments = SimPod::new(
        &env,
        1,
        "prod",
        "payments",
        "payments",
        Layout::Systemd(Some("burstable"), "cri-containerd"),
    );
    payments.make_cgroup(&env);
    payments.wait_until_in_datapath(&env);
    assert_eq!(payments.connect(&env, host, 8081), Err(EPERM));
    let record = record_from(&agent, &env, &payments.cgroup, 8081, "denied");
    assert_eq!(record["policy"], "tollgate:unknown-pod");
    assert_eq!(record["src"]["identity"], "unknown-pod");
    assert_eq!(record["src"]["pod_uid"], payments.uid.as_str());

    // Then its metadata: its own policy decides (8081 allowed, 8080 not).
    api.put(payments.object.clone());
    until(Ok(()), Duration::from_secs(1), || {
        payments.connect(&env, host, 8081)
    });
    assert_eq!(payments.connect(&env, host, 8080), Err(EPERM));
    let record = record_from(&agent, &env, &payments.cgroup, 8080, "denied");
    assert_eq!(record["policy"], "prod/payments-egress");
    assert_eq!(record["src"]["identity"], "pod");

    // A restart keeps what the last run knew, even with the API server
    // gone: the pod does not fall back to unknown (and denied).
    agent.terminate();
    drop(api);
    let mut args = vec!["--kubeconfig", kubeconfig.path.to_str().unwrap()];
    args.extend_from_slice(&strict);
    let agent = AgentProcess::start(&env, &args);
    assert_eq!(
        agent.startup_lines_with("pod metadata of the last run loaded"),
        1,
        "{:#?}",
        agent.startup_log
    );
    assert_eq!(payments.connect(&env, host, 8081), Ok(()));
    assert_eq!(payments.connect(&env, host, 8080), Err(EPERM));
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn unknown_pod_action_deny_without_kubernetes_is_refused() {
    let env = TestEnv::new("pods-nokube");
    let log = AgentProcess::try_start(
        &env,
        &["--unknown-pod-action", "deny", "--kubernetes", "off"],
    )
    .err()
    .expect("the agent must refuse to start");
    assert!(
        log.iter()
            .any(|l| l.contains("--unknown-pod-action deny needs the Kubernetes API")),
        "{log:#?}"
    );
}

/// Processes of the test, killed and reaped on drop.
struct Processes(Vec<std::process::Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `sleep` in `cgroup`, inside the named network namespace.
/// A process in `cgroup` and `netns` that sleeps as 65535, the user a
/// pod's sandbox (pause) runs as, so the agent needs what the DaemonSet
/// grants it to open its namespace.
///
/// Returns once the process is in the cgroup and the namespace (it joins
/// both on its own, after the spawn): what a test then asks of the agent
/// must not depend on how fast a loaded machine starts a shell.
fn sleeper(cgroup: &std::path::Path, netns: &str) -> std::process::Child {
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {netns} \
             setpriv --reuid 65535 --regid 65535 --clear-groups sleep 60",
            cgroup.display()
        ))
        .spawn()
        .unwrap();
    wait_until_joined(child.id(), cgroup, netns);
    child
}

/// Waits until process `pid` is in `cgroup` and the network namespace
/// `netns`.
fn wait_until_joined(pid: u32, cgroup: &std::path::Path, netns: &str) {
    use std::os::unix::fs::MetadataExt;
    let target = std::fs::metadata(format!("/run/netns/{netns}"))
        .unwrap()
        .ino();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let in_cgroup = std::fs::read_to_string(cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .any(|line| line == pid.to_string());
        let in_netns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|namespace| namespace.ino() == target);
        if in_cgroup && in_netns {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} did not reach its cgroup and namespace"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A payments pod (`n` numbers it) whose sandbox, its first process,
/// sleeps in the network namespace `netns`.
fn pod_with_sandbox(env: &TestEnv, n: u8, netns: &str) -> (SimPod, std::path::PathBuf, Processes) {
    let pod = SimPod::new(
        env,
        n,
        "prod",
        "payments",
        "payments",
        Layout::Systemd(Some("burstable"), "cri-containerd"),
    );
    pod.make_cgroup(env);
    let sandbox = pod
        .cgroup
        .parent()
        .unwrap()
        .join("cri-containerd-sandbox.scope");
    std::fs::create_dir(&sandbox).unwrap();
    let processes = Processes(vec![sleeper(&sandbox, netns)]);
    (pod, sandbox, processes)
}

/// The namespace the kernel is told a pod's DNS queries must come from is
/// its sandbox's, the oldest process of the pod, not one a container made
/// later.
#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_pods_network_namespace_is_its_sandboxs() {
    let mut env = TestEnv::new("pods-netns");
    let host = env.add_host(113, &[]).v4;
    // Two namespaces of the test's own: the pod's, and one a container
    // process makes for itself.
    let pod_ns = tollgate_tests::TestNetns::new("tgn-pod-netns");
    let own_ns = tollgate_tests::TestNetns::new("tgn-own-netns");
    let api = FakeApiServer::start();
    api.put(namespace("prod", &[("env", "prod")]));
    let (pod, sandbox, mut processes) = pod_with_sandbox(&env, 8, &pod_ns.name);
    std::thread::sleep(Duration::from_millis(50));
    processes.0.push(sleeper(&pod.cgroup, &own_ns.name));
    api.put(pod.object.clone());
    let policy = TempFile::new("pods-netns.yaml", &payments_policy(host));
    let kubeconfig = TempFile::new("pods-netns.kubeconfig", &api.kubeconfig());
    let _agent = start_agent_as_daemonset(
        &env,
        &kubeconfig,
        &["--policy", policy.path.to_str().unwrap()],
    );
    pod.wait_until_in_datapath(&env);

    let cookie_of = |name: &str| {
        tollgate_agent::netns::cookie_of(std::fs::File::open(format!("/run/netns/{name}")).unwrap())
            .unwrap()
    };
    let id = tollgate_agent::cgroups::cgroup_id(&pod.cgroup).unwrap();
    let told = env.endpoint_netns();
    assert_eq!(told.get(&id), Some(&cookie_of(&pod_ns.name)), "{told:?}");
    assert_ne!(cookie_of(&pod_ns.name), cookie_of(&own_ns.name));
    drop(processes);
    std::fs::remove_dir(&sandbox).unwrap();
}

/// A pod's packet sockets (AF_PACKET, with or without
/// PACKET_QDISC_BYPASS) put no frame to a denied destination past the
/// node's side of the pod's link, also while the agent is down, until
/// cleanup; the pod's own connections and the kernel's answers for it pass
/// there. In observe mode such a frame goes, and is recorded.
#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_pods_packet_sockets_reach_no_denied_destination() {
    let mut env = TestEnv::new("pods-frames");
    let allowed = env.add_host(115, &[]).v4;
    // The pod's namespace is a test host's: its link's node side (tgh114,
    // 10.231.114.1) is in the root namespace, where the frames are aimed,
    // so that one let through ends in this test's socket.
    let pod_host = env.add_host(114, &[8090]);
    let (pod_ns, pod_v4, pod_v6) = (pod_host.netns.clone(), pod_host.v4, pod_host.v6);
    let node_side = Ipv4Addr::new(10, 231, 114, 1);
    let node_ifindex = std::fs::read_to_string("/sys/class/net/tgh114/ifindex")
        .unwrap()
        .trim()
        .parse::<u32>()
        .unwrap();
    let receiver = std::net::UdpSocket::bind((node_side, 0)).unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let port = receiver.local_addr().unwrap().port();
    let arrived = |marker: &str| {
        let mut buffer = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if let Ok(n) = receiver.recv(&mut buffer)
                && buffer[..n]
                    .windows(marker.len())
                    .any(|w| w == marker.as_bytes())
            {
                return true;
            }
        }
        false
    };

    let api = FakeApiServer::start();
    api.put(namespace("prod", &[("env", "prod")]));
    let (pod, _sandbox, _processes) = pod_with_sandbox(&env, 9, &pod_ns);
    api.put(pod.object.clone());
    let target = format!("{node_side}:{port}");
    let send = |marker: &str, bypass: bool| {
        let mut args = vec!["packet", "tgp114", &target, marker];
        if bypass {
            args.push("--qdisc-bypass");
        }
        env.probe_in_netns(&pod.cgroup, &pod_ns, &args).result()
    };

    // Without the agent, a frame gets there: the test can see one pass.
    assert_eq!(send("tg-frame-before", false), Ok(()));
    assert!(
        arrived("tg-frame-before"),
        "the frame should arrive unjudged"
    );

    let policy = TempFile::new("pods-frames.yaml", &payments_policy(allowed));
    let kubeconfig = TempFile::new("pods-frames.kubeconfig", &api.kubeconfig());
    let mut agent = start_agent_as_daemonset(
        &env,
        &kubeconfig,
        &["--policy", policy.path.to_str().unwrap()],
    );
    pod.wait_until_in_datapath(&env);
    let pod_dir = tollgate_agent::cgroups::cgroup_id(pod.cgroup.parent().unwrap()).unwrap();
    wait_for(
        || env.pod_links().get(&node_ifindex) == Some(&pod_dir),
        || format!("{:?} {:#?}", env.pod_links(), agent.log_so_far()),
    );

    // Sending succeeds (the frame leaves the pod); nothing arrives.
    for (marker, bypass) in [("tg-frame-denied", false), ("tg-frame-bypass", true)] {
        assert_eq!(send(marker, bypass), Ok(()));
        assert!(!arrived(marker), "{marker}: a denied frame arrived");
    }
    let record = record_from(&agent, &env, &pod.cgroup, port, "denied");
    assert_eq!(record["hook"], "frame4", "{record}");
    assert_eq!(record["dst"]["ip"], node_side.to_string(), "{record}");
    assert_eq!(record["protocol"], "udp", "{record}");
    assert_eq!(record["policy"], "prod/payments-egress", "{record}");

    // What the pod's sockets send, and the kernel's resets for it, pass.
    let connect = |addr: std::net::SocketAddr| {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(drop)
    };
    for ip in [std::net::IpAddr::V4(pod_v4), std::net::IpAddr::V6(pod_v6)] {
        assert!(connect((ip, 8090).into()).is_ok(), "{ip}: the pod's server");
        let refused = connect((ip, 8091).into()).unwrap_err();
        assert_eq!(
            refused.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{ip}: the pod's kernel's reset"
        );
    }

    // The hook judges while no agent runs, and cleanup takes it off the
    // link (a tcx link's pin, or the cls_bpf filter before 6.6).
    agent.terminate();
    assert_eq!(send("tg-frame-agentless", true), Ok(()));
    assert!(!arrived("tg-frame-agentless"), "a denied frame arrived");
    env.cleanup_pins();
    assert_eq!(send("tg-frame-cleaned", false), Ok(()));
    assert!(arrived("tg-frame-cleaned"), "the hook is still on the link");

    // Observe mode: the frame goes, as audit.
    let observe = TempFile::new(
        "pods-frames-observe.yaml",
        &payments_policy(allowed).replace("mode: enforce", "mode: observe"),
    );
    let agent = start_agent_as_daemonset(
        &env,
        &kubeconfig,
        &["--policy", observe.path.to_str().unwrap()],
    );
    wait_for(
        || send("tg-frame-observed", false).is_ok() && arrived("tg-frame-observed"),
        || format!("{:#?}", agent.log_so_far()),
    );
    let record = record_from(&agent, &env, &pod.cgroup, port, "audit");
    assert_eq!(record["hook"], "frame4", "{record}");
}

fn wait_for(mut condition: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "not within {WAIT:?}: {}",
            context()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
