//! From observe to enforce: what recorded traffic says about policies.
//! `recording` reads flow and DNS records (the file sink's JSON lines, or
//! the agent's recent flows over gRPC) into a typed model; `suggest` turns
//! one into an allow-list per workload; `replay` runs one through the
//! reference evaluator with candidate policies and says what would change.
//! Everything here is pure (no I/O): tollgatectl and the agent read and
//! print, this crate decides.

pub mod recording;
pub mod replay;
pub mod suggest;

#[cfg(test)]
mod tests;
