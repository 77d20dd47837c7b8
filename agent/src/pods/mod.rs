//! Pods as endpoints: which cgroups belong to which pod and container.

pub mod kubelet;
