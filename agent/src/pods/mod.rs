//! Pods as endpoints: which cgroups belong to which pod and container, and
//! what the Kubernetes API says about those pods.

pub mod directory;
pub mod kubelet;
pub mod watch;

/// What a process in a pod's cgroup may do while the pod's metadata is not
/// known yet (the cgroup can appear before the API server's word on it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownPodAction {
    /// Not restricted until a policy selects the pod.
    #[default]
    Allow,
    /// Denied (in enforce mode; audited in observe mode) until the metadata arrives.
    Deny,
}
