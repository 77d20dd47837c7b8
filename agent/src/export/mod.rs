//! Export of flow and DNS records to SIEMs: one record model, formats as
//! pure functions, and sinks that deliver each record in order without
//! holding up the datapath or each other.

pub mod aggregate;
pub mod config;
pub mod delivery;
pub mod format;
pub mod record;
pub mod sinks;
pub mod spool;
