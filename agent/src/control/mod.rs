//! The control API: policies and modes in, status and flows out, over gRPC.
//! The services are thin; the work is done by the controller on the task
//! that owns the datapath, and by the pure policy store.

pub mod controller;
pub mod flows;
pub mod persist;
pub mod rule_stats;
pub mod server;
pub mod service;
pub mod store;
