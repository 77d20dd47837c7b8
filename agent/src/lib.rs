//! Tollgate's node agent as a library: the binaries (`tollgate-agent`,
//! `tollgate-ctl`) and the integration tests are thin layers over it.

pub mod cgroup_watch;
pub mod cgroups;
pub mod client;
pub mod cluster;
pub mod config;
pub mod control;
pub mod datapath;
pub mod enforce;
pub mod export;
pub mod flow;
pub mod heap;
pub mod kubernetes;
pub mod log_level;
pub mod mounts;
pub mod names;
pub mod netns;
pub mod pod_links;
pub mod pods;
pub mod policy_files;
pub mod run;
pub mod state_file;
pub mod telemetry;
