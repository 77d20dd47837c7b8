//! Generates the API types with protox (a protobuf compiler in Rust): there
//! is no protoc to depend on. Every message also derives serde, with
//! camelCase names, so policy files deserialize into the very same types.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["tollgate/v1/policy.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    prost_build::Config::new()
        .type_attribute(
            ".tollgate.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] \
             #[serde(rename_all = \"camelCase\", default, deny_unknown_fields)]",
        )
        .compile_fds(descriptors)?;
    Ok(())
}
