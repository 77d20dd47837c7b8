//! A simulated Kubernetes node: pods as kubelet lays out their cgroups
//! (both drivers, every QoS class, the runtimes' scopes), with the API
//! objects that describe them, for tests that run the agent against the
//! stand-in API server (`kube`).

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    TestEnv,
    kube::{PodSpec, pod},
};

/// The node the simulated pods run on (the agent's `--node`).
pub const NODE: &str = "test-node";
const WAIT: Duration = Duration::from_secs(5);

/// Where kubelet puts a container's cgroup.
#[derive(Clone, Copy)]
pub enum Layout {
    /// systemd driver: (QoS slice or None for Guaranteed, scope prefix)
    Systemd(Option<&'static str>, &'static str),
    /// cgroupfs driver: QoS directory or None for Guaranteed
    Cgroupfs(Option<&'static str>),
}

/// One pod of the simulated node: its API object and its container's cgroup.
pub struct SimPod {
    pub uid: String,
    pub container_id: String,
    pub object: Value,
    pub cgroup: PathBuf,
}

impl SimPod {
    /// `n` makes the uid and container id unique within the test.
    pub fn new(
        env: &TestEnv,
        n: u8,
        namespace: &str,
        deployment: &str,
        app: &str,
        layout: Layout,
    ) -> Self {
        let uid = format!("{n:08x}-1b2c-4d5e-8f90-123456789abc");
        let container_id = format!("{n:02x}").repeat(32);
        let (scheme, relative) = match layout {
            Layout::Systemd(qos, prefix) => {
                let uid_ = uid.replace('-', "_");
                let pod_slice = match qos {
                    Some(qos) => format!(
                        "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{uid_}.slice"
                    ),
                    None => format!("kubepods.slice/kubepods-pod{uid_}.slice"),
                };
                let scheme = match prefix {
                    "cri-containerd" => "containerd",
                    "crio" => "cri-o",
                    other => other,
                };
                (scheme, format!("{pod_slice}/{prefix}-{container_id}.scope"))
            }
            Layout::Cgroupfs(qos) => {
                let qos = qos.map(|q| format!("{q}/")).unwrap_or_default();
                (
                    "containerd",
                    format!("kubepods/{qos}pod{uid}/{container_id}"),
                )
            }
        };
        let object = pod(&PodSpec {
            namespace,
            deployment,
            uid: &uid,
            labels: &[("app", app)],
            node: NODE,
            containers: &[("app", &format!("{scheme}://{container_id}"))],
        });
        Self {
            uid,
            container_id,
            object,
            cgroup: env.cgroup.path.join(relative),
        }
    }

    pub fn make_cgroup(&self, env: &TestEnv) {
        let relative = self.cgroup.strip_prefix(&env.cgroup.path).unwrap();
        env.cgroup.child(relative.to_str().unwrap());
    }

    /// Until the agent has put the container's cgroup in the datapath: the
    /// moment between a cgroup's mkdir and that is docs/datapath.md's.
    pub fn wait_until_in_datapath(&self, env: &TestEnv) {
        let id = tollgate_agent::cgroups::cgroup_id(&self.cgroup).unwrap();
        let deadline = Instant::now() + WAIT;
        while !env.endpoint_cgroup_ids().contains(&id) {
            assert!(
                Instant::now() < deadline,
                "{} never got an endpoint",
                self.uid
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn connect(&self, env: &TestEnv, host: Ipv4Addr, port: u16) -> Result<(), i32> {
        env.probe_in(&self.cgroup, &["connect", "tcp", &format!("{host}:{port}")])
            .result()
    }

    pub fn relabelled(&self, app: &str) -> Value {
        let mut object = self.object.clone();
        object["metadata"]["labels"]["app"] = app.into();
        object
    }
}

/// Polls `probe` until it returns `want`; how long that took.
pub fn until(
    want: Result<(), i32>,
    limit: Duration,
    mut probe: impl FnMut() -> Result<(), i32>,
) -> Duration {
    let start = Instant::now();
    loop {
        let got = probe();
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "still {got:?}, not {want:?}, after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
