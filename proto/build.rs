//! Generates the API with protox (a protobuf compiler in Rust: there is no
//! protoc to depend on) and tonic. Every message also derives serde with
//! camelCase names, so policy files deserialize into the very same types and
//! tollgatectl prints any message as YAML or JSON.
//!
//! The messages and the gRPC services are generated apart: the policy core
//! uses the messages without the `grpc` feature, so it builds without tonic
//! and its async runtime.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "tollgate/v1/policy.proto",
        "tollgate/v1/control.proto",
        "tollgate/v1/flow.proto",
        "tollgate/v1/agent.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptors = protox::compile(protos, ["."])?;

    let messages = out_dir.join("messages");
    std::fs::create_dir_all(&messages)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .out_dir(&messages)
        .type_attribute(
            ".tollgate.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] \
             #[serde(rename_all = \"camelCase\", default, deny_unknown_fields)]",
        )
        .compile_fds(descriptors.clone())?;

    if std::env::var_os("CARGO_FEATURE_GRPC").is_some() {
        let services = out_dir.join("grpc");
        std::fs::create_dir_all(&services)?;
        tonic_prost_build::configure()
            .out_dir(&services)
            // The messages are the ones generated above.
            .extern_path(".tollgate.v1", "crate::v1")
            .compile_fds(descriptors)?;
    }
    Ok(())
}
