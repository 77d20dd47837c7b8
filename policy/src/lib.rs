//! Tollgate's policy core: documents in, datapath rule sets out. Reading
//! and validating policies, selecting endpoints, compiling to the rule sets
//! the kernel holds, and a reference evaluator that says what "evaluate
//! every rule" answers. Everything here is pure (no BPF, no async runtime,
//! no I/O), so it is unit- and property-tested; the agent, tollgatectl and
//! the CRD schema generator build on it.

pub mod cgroup_glob;
pub mod compile;
pub mod compiled;
pub mod document;
pub mod evaluate;
pub mod fqdn;
pub mod model;
pub mod record_protocol;
pub mod select;
pub mod serialize;
pub mod validate;

#[cfg(test)]
mod tests;
