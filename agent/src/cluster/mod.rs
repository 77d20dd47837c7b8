//! Cluster-wide policies: the `EgressPolicy` and `ClusterEgressPolicy`
//! resources that every agent watches and puts in force, the status they
//! carry back, and the node taint that keeps workloads off a node until its
//! agent enforces them.

pub mod crd;
pub mod desired;
pub mod lease;
pub mod report;
pub mod resources;
pub mod status;
pub mod taint;
pub mod watch;
pub mod writer;
