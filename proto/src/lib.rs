//! The `tollgate.v1` API, generated from `proto/tollgate/v1`: the messages
//! always, the gRPC clients and servers with the `grpc` feature.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/messages/tollgate.v1.rs"));
    #[cfg(feature = "grpc")]
    include!(concat!(env!("OUT_DIR"), "/grpc/tollgate.v1.rs"));
}
