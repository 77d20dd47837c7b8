//! Generates the API with protox (a protobuf compiler in Rust: there is no
//! protoc to depend on) and tonic. Every message also derives serde with
//! camelCase names, so policy files deserialize into the very same types and
//! tollgatectl prints any message as YAML or JSON.
//!
//! The messages and the gRPC services are generated apart: the policy core
//! uses the messages without the `grpc` feature, so it builds without tonic
//! and its async runtime.
//!
//! With the `schema` feature, the policy spec messages also derive
//! `schemars::JsonSchema`: the agent generates its CustomResourceDefinitions
//! from them (agent/src/cluster/crd.rs). The derive is behind `cfg_attr`, so
//! the generated code is the same either way and the policy core, which uses
//! these messages without features, does not build schemars. Serde's
//! attributes (camelCase, default) shape the schema as they shape the JSON;
//! the proto comments become its descriptions (`kubectl explain`).

use std::path::PathBuf;

/// The messages of a policy's `spec`, which the CRDs' schemas are made of.
const SCHEMA_MESSAGES: [&str; 7] = [
    "EgressPolicySpec",
    "LabelSelector",
    "LabelSelectorRequirement",
    "CgroupSelector",
    "EgressRule",
    "EgressPeer",
    "EgressPort",
];

/// What the schema says beyond the field's type (the JSON Schema keywords
/// of schemars' attributes):
/// - The values of the strings with a fixed set of them: those that
///   policy/src/validate.rs accepts, as written in the docs (the validator
///   also takes "tcp" for "TCP"). No "": in a resource an absent field is
///   absent.
/// - Bounds the validator already has: a prefix is never longer than 64
///   characters, a name pattern than 257 ("**.", 253 and a trailing dot),
///   a port is 1-65535, and at most 16 port rules apply to a prefix, so the
///   agent refuses a rule with more `ports`.
/// - Bounds on the lists that the CRDs' CEL rules iterate in, which keep
///   the rules' estimated cost within the API server's budget (it
///   multiplies a rule's cost by how many times it can run: 64 rules of 64
///   peers, each with at most 16 `except`).
const SCHEMA_FIELDS: [(&str, &str); 13] = [
    (
        "EgressPolicySpec.mode",
        r#"extend("enum" = ["enforce", "observe"])"#,
    ),
    (
        "EgressPolicySpec.default_action",
        r#"extend("enum" = ["deny", "allow"])"#,
    ),
    ("EgressPolicySpec.egress", "length(max = 64)"),
    (
        "LabelSelectorRequirement.operator",
        r#"extend("enum" = ["In", "NotIn", "Exists", "DoesNotExist"])"#,
    ),
    ("EgressRule.action", r#"extend("enum" = ["allow", "deny"])"#),
    ("EgressRule.to", "length(max = 64)"),
    ("EgressRule.ports", "length(max = 16)"),
    ("EgressPeer.cidr", "length(max = 64)"),
    (
        "EgressPeer.except",
        "length(max = 16), inner(length(max = 64))",
    ),
    ("EgressPeer.fqdn", "length(max = 257)"),
    ("EgressPort.port", "range(min = 1, max = 65535)"),
    ("EgressPort.end_port", "range(min = 1, max = 65535)"),
    (
        "EgressPort.protocol",
        r#"extend("enum" = ["TCP", "UDP", "SCTP", "ICMP", "ICMPv6", "ANY"])"#,
    ),
];

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
    let mut messages_config = tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .out_dir(&messages)
        .type_attribute(
            ".tollgate.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] \
             #[serde(rename_all = \"camelCase\", default, deny_unknown_fields)]",
        );
    for message in SCHEMA_MESSAGES {
        messages_config = messages_config.type_attribute(
            format!(".tollgate.v1.{message}"),
            "#[cfg_attr(feature = \"schema\", derive(schemars::JsonSchema))]",
        );
    }
    for (field, schema) in SCHEMA_FIELDS {
        messages_config = messages_config.field_attribute(
            format!(".tollgate.v1.{field}"),
            format!("#[cfg_attr(feature = \"schema\", schemars({schema}))]"),
        );
    }
    messages_config.compile_fds(descriptors.clone())?;

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
