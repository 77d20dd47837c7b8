//! The `tollgate.v1` API, generated from `proto/tollgate/v1`.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/tollgate.v1.rs"));
}
