//! Policies: documents in, datapath rule sets out. Everything here is pure
//! (no BPF, no I/O), so it is unit- and property-tested.

pub mod cgroup_glob;
pub mod compile;
pub mod document;
pub mod evaluate;
pub mod fqdn;
pub mod model;
pub mod select;
pub mod validate;

#[cfg(test)]
mod tests;
