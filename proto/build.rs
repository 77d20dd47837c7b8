//! Generates the API with protox (a protobuf compiler in Rust: there is no
//! protoc to depend on) and tonic. Every message also derives serde with
//! camelCase names, so policy files deserialize into the very same types and
//! tollgatectl prints any message as YAML or JSON.

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
    let descriptors = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .type_attribute(
            ".tollgate.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] \
             #[serde(rename_all = \"camelCase\", default, deny_unknown_fields)]",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
