//! The agent's image (`cargo xtask image`), run under podman as
//! deploy/daemonset.yaml runs it: the manifest's host namespaces,
//! capabilities, user, read-only root and mounts, read from the manifest
//! itself. Only the host paths behind the mounts are the test's own (its
//! bpffs, its cgroup, its state and socket directories, its configuration),
//! and the configuration and arguments say what a node without a cluster
//! needs (no Kubernetes API, a policy file, enforce mode).
//!
//! Needs root, podman and the image: `cargo xtask image --test` builds the
//! image and runs this.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Container};
use tollgate_tests::{TestDir, TestEnv};

const EPERM: i32 = libc::EPERM;

/// The DaemonSet as deploy/daemonset.yaml defines it.
fn daemonset() -> DaemonSet {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap())
        .expect("deploy/daemonset.yaml is a DaemonSet")
}

/// podman, on the image's own storage (`cargo xtask image` says where).
fn podman() -> Command {
    let storage = std::env::var("TOLLGATE_IMAGE_STORAGE")
        .expect("TOLLGATE_IMAGE_STORAGE: run this with `cargo xtask image --test`");
    let mut command = Command::new("podman");
    command.args(storage.split_whitespace());
    command
}

fn ok(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The `podman run` options that give a container what the manifest gives
/// the agent's: host network and PID namespaces, the user, the capabilities
/// (all dropped, then the manifest's), no privilege escalation, a
/// read-only root, and each volume mount, from `host_path` of its volume's
/// name (the test's stand-ins for the node's paths), read-only and
/// propagation as the manifest says.
fn daemonset_options(host_path: impl Fn(&str) -> PathBuf) -> (Vec<String>, Container) {
    let pod = daemonset().spec.unwrap().template.spec.unwrap();
    let agent = pod.containers[0].clone();
    let security = agent.security_context.clone().unwrap();
    let mut options = vec!["--runtime".to_owned(), "runc".to_owned()];
    if pod.host_network == Some(true) {
        options.extend(["--network".into(), "host".into()]);
    }
    if pod.host_pid == Some(true) {
        options.extend(["--pid".into(), "host".into()]);
    }
    if let Some(user) = security.run_as_user {
        options.extend(["--user".into(), user.to_string()]);
    }
    if security.read_only_root_filesystem == Some(true) {
        options.push("--read-only".into());
    }
    if security.allow_privilege_escalation == Some(false) {
        options.extend(["--security-opt".into(), "no-new-privileges".into()]);
    }
    let capabilities = security.capabilities.unwrap();
    for dropped in capabilities.drop.unwrap_or_default() {
        options.extend(["--cap-drop".into(), dropped.to_lowercase()]);
    }
    for added in capabilities.add.unwrap_or_default() {
        options.extend(["--cap-add".into(), added.to_lowercase()]);
    }
    for mount in agent.volume_mounts.clone().unwrap_or_default() {
        let mut flags = vec![if mount.read_only == Some(true) {
            "ro"
        } else {
            "rw"
        }];
        if mount.mount_propagation.as_deref() == Some("HostToContainer") {
            flags.push("rslave");
        }
        options.extend([
            "--volume".into(),
            format!(
                "{}:{}:{}",
                host_path(&mount.name).display(),
                mount.mount_path,
                flags.join(",")
            ),
        ]);
    }
    // The sandbox lacks CAP_SYS_RESOURCE (TOOLCHAIN notes): podman's
    // default limits are above what it may set.
    options.extend([
        "--ulimit".into(),
        "nofile=1024:1024".into(),
        "--ulimit".into(),
        "nproc=1024:1024".into(),
    ]);
    (options, agent)
}

/// The image runs as the DaemonSet runs it: it attaches, enforces a policy
/// on a cgroup of the host, keeps enforcing while its container is stopped
/// and after it starts again (adopting its pinned links), and tollgatectl
/// works inside it.
#[test]
#[ignore = "needs root, podman and the image: cargo xtask image --test"]
fn the_image_runs_as_the_daemonset_runs_it() {
    let image = std::env::var("TOLLGATE_IMAGE")
        .expect("TOLLGATE_IMAGE: run this with `cargo xtask image --test`");
    let mut env = TestEnv::new("image");
    let host = env.add_host(116, &[8080, 8081]).v4;
    let workload = env.cgroup.child("workload");
    let socket = TestDir::new("image-socket");
    let config = TestDir::new("image-config");
    // The ConfigMap's file, for a node without a cluster; and a policy.
    std::fs::write(
        config.path.join("tollgate.yaml"),
        "mode: enforce\nkubernetes: off\nexport:\n  sinks:\n  - type: stdout\n",
    )
    .unwrap();
    std::fs::write(
        config.path.join("policy.yaml"),
        format!(
            "apiVersion: policy.tollgate.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: image-test
spec:
  cgroupSelector:
    paths: [\"/workload\"]
  mode: enforce
  egress:
  - name: api
    to: [{{cidr: {host}/32}}]
    ports: [{{port: 8081, protocol: TCP}}]
"
        ),
    )
    .unwrap();
    let bpffs = env.bpffs.mount.clone();
    let cgroup = env.cgroup.path.clone();
    let state = env.state.path.clone();
    let (options, agent) = daemonset_options(|volume| match volume {
        "bpffs" => bpffs.clone(),
        "cgroup" => cgroup.clone(),
        "state" => state.clone(),
        "socket" => socket.path.clone(),
        "config" => config.path.clone(),
        other => panic!("the DaemonSet mounts a volume the test does not stand in for: {other}"),
    });
    // The container's own cgroup goes below one of the test's, not below
    // podman's default parent (libpod_parent), so nothing outlives it.
    let container_parent = tollgate_tests::TestCgroup::new("image-podman");
    let name = format!("tg-image-{}", std::process::id());
    let _container = scopeguard::guard(name.clone(), |name| {
        let _ = podman()
            .args(["rm", "--force", "--time", "0", &name])
            .output();
    });
    let mut run = podman();
    run.args(["run", "--detach", "--name", &name])
        .args(["--cgroup-parent", &container_parent.relative])
        .args(&options)
        .args(
            agent
                .env
                .unwrap_or_default()
                .iter()
                .filter_map(|var| Some(format!("--env={}={}", var.name, var.value.as_ref()?))),
        )
        .args(["--env=NODE_NAME=test-node", &image])
        .args(agent.args.unwrap_or_default())
        .args(["--policy", "/etc/tollgate/policy.yaml"]);
    ok(run.output().unwrap(), "podman run");

    let ctl = |args: &[&str]| {
        podman()
            .args([
                "exec",
                &name,
                "tollgatectl",
                "--agent",
                "unix:/run/tollgate/agent.sock",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let wait_ready = || {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = ctl(&["status"]);
            if status.status.success() {
                return String::from_utf8_lossy(&status.stdout).into_owned();
            }
            if Instant::now() > deadline {
                let logs = podman().args(["logs", &name]).output().unwrap();
                panic!(
                    "the agent in the container did not answer: {}\n{}",
                    String::from_utf8_lossy(&status.stderr),
                    String::from_utf8_lossy(&logs.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let status = wait_ready();
    assert!(status.contains("enforce"), "{status}");
    let connect = |port: u16| {
        env.probe_in(&workload, &["connect", "tcp", &format!("{host}:{port}")])
            .result()
    };
    let until_denied = || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while connect(8080) != Err(EPERM) {
            assert!(Instant::now() < deadline, "the policy never took effect");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    until_denied();
    assert_eq!(connect(8081), Ok(()));
    let policies = ok(ctl(&["get", "policies"]), "tollgatectl get policies");
    assert!(policies.contains("image-test"), "{policies}");

    // Stopped, the pinned programs hold; started again, it adopts them.
    ok(
        podman()
            .args(["stop", "--time", "10", &name])
            .output()
            .unwrap(),
        "podman stop",
    );
    assert_eq!(connect(8080), Err(EPERM), "enforcement lapsed");
    ok(
        podman().args(["start", &name]).output().unwrap(),
        "podman start",
    );
    let status = wait_ready();
    assert!(status.contains("adopted"), "{status}");
    assert_eq!(connect(8080), Err(EPERM));
    assert_eq!(connect(8081), Ok(()));
}
