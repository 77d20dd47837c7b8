//! The CustomResourceDefinitions of the policy resources, generated from the policy types.
//!
//! `EgressPolicy` (namespaced) and `ClusterEgressPolicy` (cluster-scoped)
//! share one spec, the `tollgate.v1.EgressPolicySpec` message that policy
//! files, the gRPC API and the validator use. Its schema is generated from
//! that Rust type (tollgate-proto's `schema` feature derives
//! `schemars::JsonSchema`, with the fixed values and bounds of
//! proto/build.rs), the status's from [`PolicyStatus`], with the settings
//! and structural transforms kube-derive uses, so nothing here restates a
//! field by hand. Then the CEL rules (`x-kubernetes-validations`) are added
//! where they belong in the generated tree: what the agent's validator
//! checks and a schema cannot say, so that the API server refuses a bad
//! policy when it is applied instead of every agent refusing it later.
//! No rule refuses a policy that the agent accepts as a resource; the tests
//! hold each rule, and the examples, to both.
//!
//! The committed manifests in deploy/crds are this module's output
//! (`tollgatectl crds --output deploy/crds`); a test keeps them equal.

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        CustomResourceColumnDefinition, CustomResourceDefinition, CustomResourceDefinitionNames,
        CustomResourceDefinitionSpec, CustomResourceDefinitionVersion,
        CustomResourceSubresourceStatus, CustomResourceSubresources, CustomResourceValidation,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube_core::{Reason, Rule};
use schemars::JsonSchema;
use serde_json::Value;
use tollgate_proto::v1::EgressPolicySpec;

use super::resources::{ClusterScoped, GROUP, Namespaced, PolicyKind, PolicyStatus, VERSION};

/// The category both kinds are in: `kubectl get tollgate`.
pub const CATEGORY: &str = "tollgate";

/// The files `tollgatectl crds --output DIR` writes, by kind.
pub const FILES: [(&str, &str); 2] = [
    (Namespaced::KIND, "egresspolicies.yaml"),
    (ClusterScoped::KIND, "clusteregresspolicies.yaml"),
];

/// A policy resource as its schema describes it: what kube-derive's
/// `CustomResource` generates for a spec and a status type. `apiVersion`,
/// `kind` and `metadata` are the API server's and stay out of the schema,
/// as kube-derive leaves them out.
#[derive(JsonSchema)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)] // only its schema is used
struct Resource {
    spec: EgressPolicySpec,
    status: Option<PolicyStatus>,
}

/// Both CRDs: `EgressPolicy`, then `ClusterEgressPolicy`.
pub fn custom_resource_definitions() -> Vec<CustomResourceDefinition> {
    vec![
        definition::<Namespaced>(
            &["egp"],
            "Egress policy of pods in its namespace, put in force by the Tollgate agent \
             of every node: the pods that spec.podSelector selects may connect only where \
             its rules allow. Policies of other scopes are ClusterEgressPolicies.",
        ),
        definition::<ClusterScoped>(
            &["cegp"],
            "Cluster-wide egress policy, put in force by the Tollgate agent of every node: \
             pods of any namespace (spec.podSelector, spec.namespaceSelector) and host \
             processes (spec.cgroupSelector) may connect only where its rules allow.",
        ),
    ]
}

/// A CRD as a YAML document, with a header saying where it comes from.
pub fn to_yaml(crd: &CustomResourceDefinition) -> String {
    let body = serde_yaml_ng::to_string(crd).expect("a CRD serializes");
    format!(
        "# Generated from the policy types by `tollgatectl crds` (agent/src/cluster/crd.rs).\n\
         # Do not edit: change the types or the rules there and regenerate.\n{body}"
    )
}

fn definition<K: PolicyKind + Scope>(
    short_names: &[&str],
    description: &str,
) -> CustomResourceDefinition {
    let singular = K::KIND.to_ascii_lowercase();
    let schema = schema::<K>(description);
    CustomResourceDefinition {
        metadata: ObjectMeta {
            name: Some(format!("{}.{GROUP}", K::PLURAL)),
            ..Default::default()
        },
        spec: CustomResourceDefinitionSpec {
            group: GROUP.into(),
            names: CustomResourceDefinitionNames {
                categories: Some(vec![CATEGORY.into()]),
                kind: K::KIND.into(),
                list_kind: None,
                plural: K::PLURAL.into(),
                short_names: Some(short_names.iter().map(|s| s.to_string()).collect()),
                singular: Some(singular),
            },
            scope: K::SCOPE.into(),
            versions: vec![CustomResourceDefinitionVersion {
                additional_printer_columns: Some(printer_columns()),
                name: VERSION.into(),
                schema: Some(CustomResourceValidation {
                    open_api_v3_schema: Some(
                        serde_json::from_value(schema).expect("a valid JSONSchemaProps"),
                    ),
                }),
                served: true,
                storage: true,
                subresources: Some(CustomResourceSubresources {
                    status: Some(CustomResourceSubresourceStatus(serde_json::json!({}))),
                    scale: None,
                }),
                ..Default::default()
            }],
            ..Default::default()
        },
        status: None,
    }
}

/// The CRD `scope` of a kind.
trait Scope {
    const SCOPE: &'static str;
    /// The CEL rules of the kind's spec.
    fn spec_rules() -> Vec<Rule>;
}

impl Scope for Namespaced {
    const SCOPE: &'static str = "Namespaced";

    fn spec_rules() -> Vec<Rule> {
        let other_namespaces = "an EgressPolicy selects pods of its own namespace only; \
             use a ClusterEgressPolicy to select namespaces";
        vec![
            Rule::new("has(self.podSelector)")
                .message("podSelector is required ({} selects every pod of the namespace)")
                .field_path(".podSelector")
                .reason(Reason::FieldValueRequired),
            Rule::new("!has(self.namespaceSelector)")
                .message(other_namespaces)
                .field_path(".namespaceSelector")
                .reason(Reason::FieldValueForbidden),
            Rule::new("!has(self.cgroupSelector)")
                .message(
                    "an EgressPolicy selects pods of its own namespace only; \
                     use a ClusterEgressPolicy to select host cgroups",
                )
                .field_path(".cgroupSelector")
                .reason(Reason::FieldValueForbidden),
        ]
    }
}

impl Scope for ClusterScoped {
    const SCOPE: &'static str = "Cluster";

    fn spec_rules() -> Vec<Rule> {
        vec![
            Rule::new(
                "has(self.podSelector) || has(self.namespaceSelector) || has(self.cgroupSelector)",
            )
            .message("one of podSelector, namespaceSelector and cgroupSelector is required")
            .reason(Reason::FieldValueRequired),
        ]
    }
}

/// `cidr` or `fqdn` set and not empty (proto3: an empty string is unset).
const HAS_CIDR: &str = "(has(self.cidr) && self.cidr != '')";
const HAS_FQDN: &str = "(has(self.fqdn) && self.fqdn != '')";

/// The rules of an `EgressPeer` (`spec.egress[*].to[*]`). The prefix
/// functions are Kubernetes' CIDR library (Kubernetes 1.31 and later).
fn peer_rules() -> Vec<Rule> {
    vec![
        Rule::new(format!("{HAS_CIDR} != {HAS_FQDN}"))
            .message("needs exactly one of cidr and fqdn (use one peer for each)"),
        Rule::new(format!("!{HAS_CIDR} || isCIDR(self.cidr)"))
            .message("cidr must be an IPv4 or IPv6 prefix such as 10.0.0.0/8 or fd00::/8")
            .field_path(".cidr"),
        Rule::new(format!(
            "!has(self.except) || size(self.except) == 0 || {HAS_CIDR}"
        ))
        .message("except needs cidr")
        .field_path(".except")
        .reason(Reason::FieldValueForbidden),
        Rule::new(
            "!has(self.except) || !has(self.cidr) || !isCIDR(self.cidr) || \
             self.except.all(e, isCIDR(e) && cidr(self.cidr).containsCIDR(e) && \
             cidr(e).prefixLength() > cidr(self.cidr).prefixLength())",
        )
        .message("each except must be a prefix inside cidr and longer than it")
        .field_path(".except"),
    ]
}

/// The rules of an `EgressPort` (`spec.egress[*].ports[*]`); the schema
/// also has the ports' minimum and maximum.
fn port_rules() -> Vec<Rule> {
    vec![
        Rule::new(
            "(!has(self.port) || (self.port >= 1 && self.port <= 65535)) && \
             (!has(self.endPort) || (self.endPort >= 1 && self.endPort <= 65535))",
        )
        .message("port and endPort must be within 1-65535"),
        Rule::new("!has(self.endPort) || has(self.port)")
            .message("endPort needs port")
            .field_path(".endPort")
            .reason(Reason::FieldValueForbidden),
        Rule::new("!has(self.endPort) || !has(self.port) || self.endPort >= self.port")
            .message("endPort must not be below port")
            .field_path(".endPort"),
        Rule::new(
            "!has(self.protocol) || !(self.protocol in ['ICMP', 'ICMPv6']) || \
             (!has(self.port) && !has(self.endPort))",
        )
        .message("ICMP and ICMPv6 have no ports; leave port and endPort out")
        .field_path(".port")
        .reason(Reason::FieldValueForbidden),
    ]
}

/// The rule of a `CgroupSelector`: the agent refuses one without a path.
fn cgroup_selector_rules() -> Vec<Rule> {
    vec![
        Rule::new("has(self.paths) && size(self.paths) > 0")
            .message("lists no path")
            .field_path(".paths")
            .reason(Reason::FieldValueRequired),
    ]
}

/// The openAPIV3Schema of kind `K`: generated as kube-derive (and
/// `kube_core::cel::validate_cel_schema`) generates it, then given the
/// kind's title, description and CEL rules.
fn schema<K: PolicyKind + Scope>(description: &str) -> Value {
    let generator = schemars::generate::SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(schemars::transform::AddNullable::default())
        .with_transform(kube_core::schema::StructuralSchemaRewriter)
        .with_transform(kube_core::schema::OptionalEnum)
        .with_transform(kube_core::schema::OptionalIntOrString)
        .into_generator();
    let mut root = generator.into_root_schema_for::<Resource>().to_value();
    let object = root.as_object_mut().expect("an object schema");
    object.insert("title".into(), K::KIND.into());
    object.insert("description".into(), description.into());
    tidy_descriptions(&mut root);

    let spec = node(&mut root, &["spec"]);
    for_spec(spec);
    add_rules(spec, K::spec_rules());
    add_rules(node(spec, &["cgroupSelector"]), cgroup_selector_rules());
    add_rules(node(spec, &["egress", "*", "to", "*"]), peer_rules());
    add_rules(node(spec, &["egress", "*", "ports", "*"]), port_rules());
    root
}

/// Makes the generated spec schema say what the spec's JSON means:
/// - No `default`s (schemars writes each field's zero value, from serde's
///   `default`): in a resource an absent field is absent, and the agent
///   reads it as the zero value anyway. An empty `mode` as a default would
///   not even be one of its values.
/// - No `nullable`: a null field is then pruned by the API server, so that
///   CEL's `has()` agrees with the agent, which reads null as unset.
/// - Unknown fields kept (`x-kubernetes-preserve-unknown-fields` on every
///   object with properties): a structural schema would otherwise drop a
///   misspelt field without a word whenever the client does not ask for
///   strict validation (server-side apply, most tools), and `acton: deny`
///   would become an allow. Kept, it reaches the agents, which refuse the
///   version with the field's path, and the last valid one stays in force.
fn for_spec(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    object.remove("default");
    object.remove("nullable");
    if object.contains_key("properties") {
        object.insert("x-kubernetes-preserve-unknown-fields".into(), true.into());
    }
    for_subschemas(object, for_spec);
}

/// Descriptions as `kubectl explain` shows them best: the lines of a
/// paragraph joined (it wraps them itself), and without the markdown escapes
/// that prost adds to proto comments for rustdoc (`\*\*.example.com`).
fn tidy_descriptions(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::String(description)) = object.get_mut("description") {
        let paragraphs: Vec<String> = description
            .split("\n\n")
            .map(|paragraph| {
                paragraph
                    .lines()
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let mut tidy = String::new();
        let joined = paragraphs.join("\n\n");
        let mut chars = joined.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '\\' && chars.peek().is_some_and(char::is_ascii_punctuation) {
                continue;
            }
            tidy.push(c);
        }
        *description = tidy;
    }
    for_subschemas(object, tidy_descriptions);
}

/// Calls `f` on each schema directly below `object`: its properties, its
/// items and the values of a map.
fn for_subschemas(object: &mut serde_json::Map<String, Value>, f: fn(&mut Value)) {
    if let Some(Value::Object(properties)) = object.get_mut("properties") {
        properties.values_mut().for_each(f);
    }
    for keyword in ["items", "additionalProperties"] {
        if let Some(subschema) = object.get_mut(keyword) {
            f(subschema);
        }
    }
}

/// The schema at `path` below `schema`: property names, and `*` for the
/// items of an array. Panics when there is none: the path is this module's.
fn node<'a>(schema: &'a mut Value, path: &[&str]) -> &'a mut Value {
    path.iter().fold(schema, |schema, step| {
        let next = if *step == "*" {
            schema.get_mut("items")
        } else {
            schema
                .get_mut("properties")
                .and_then(|properties| properties.get_mut(*step))
        };
        next.unwrap_or_else(|| panic!("the generated schema has no {path:?}"))
    })
}

fn add_rules(schema: &mut Value, rules: Vec<Rule>) {
    let object = schema.as_object_mut().expect("an object schema");
    let validations = object
        .entry("x-kubernetes-validations")
        .or_insert_with(|| Value::Array(Vec::new()))
        .as_array_mut()
        .expect("a list of rules");
    validations.extend(
        rules
            .into_iter()
            .map(|rule| serde_json::to_value(rule).expect("a rule serializes")),
    );
}

/// What `kubectl get` shows of a policy.
fn printer_columns() -> Vec<CustomResourceColumnDefinition> {
    let column = |name: &str, type_: &str, json_path: &str, description: &str| {
        CustomResourceColumnDefinition {
            name: name.into(),
            type_: type_.into(),
            json_path: json_path.into(),
            description: Some(description.into()),
            ..Default::default()
        }
    };
    vec![
        column(
            "Mode",
            "string",
            ".spec.mode",
            "enforce or observe; empty: the agents' global mode",
        ),
        column(
            "Default",
            "string",
            ".spec.defaultAction",
            "what a connection that no rule matches gets",
        ),
        column(
            "Rules",
            "integer",
            ".status.rules",
            "egress rules of the version in force",
        ),
        column(
            "Accepted",
            "string",
            ".status.conditions[?(@.type==\"Accepted\")].status",
            "whether the agents accepted the spec",
        ),
        column(
            "Enforced",
            "integer",
            ".status.nodes.enforced",
            "nodes whose kernel has the accepted generation in force",
        ),
        column(
            "Desired",
            "integer",
            ".status.nodes.desired",
            "nodes with a running agent",
        ),
        column(
            "Age",
            "date",
            ".metadata.creationTimestamp",
            "when the policy was created",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use kube_core::cel::Validator;
    use serde_json::json;
    use tollgate_policy::{
        document::parse_documents,
        validate::{validate_all, validate_resource},
    };

    use super::*;

    fn repository() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// The openAPIV3Schema of `kind`, as the API server gets it.
    fn schema_of(kind: &str) -> Value {
        let crd = custom_resource_definitions()
            .into_iter()
            .find(|crd| crd.spec.names.kind == kind)
            .unwrap_or_else(|| panic!("no CRD of kind {kind}"));
        serde_json::to_value(
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .expect("a schema"),
        )
        .unwrap()
    }

    /// The messages of the CEL rules that `object` breaks.
    fn cel_errors(object: &Value) -> Vec<String> {
        let schema = schema_of(object["kind"].as_str().expect("a kind"));
        match Validator::new().validate(&schema, object, None) {
            Ok(()) => Vec::new(),
            Err(errors) => errors
                .into_vec()
                .into_iter()
                .map(|e| format!("{}: {}", e.field_path, e.message))
                .collect(),
        }
    }

    /// What the agent's own validator says of `object`.
    fn agent_errors(object: &Value) -> Vec<String> {
        let documents = parse_documents("object", &object.to_string()).expect("a policy");
        match validate_resource(&documents[0]) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    fn resource(kind: &str, spec: Value) -> Value {
        let mut metadata = json!({"name": "test"});
        if kind == Namespaced::KIND {
            metadata["namespace"] = "prod".into();
        }
        json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": kind,
            "metadata": metadata,
            "spec": spec,
        })
    }

    /// An EgressPolicy with one rule of these peers and ports.
    fn rule(to: Value, ports: Value) -> Value {
        resource(
            Namespaced::KIND,
            json!({"podSelector": {}, "egress": [{"to": to, "ports": ports}]}),
        )
    }

    #[test]
    fn the_committed_crds_are_what_the_generator_makes() {
        let directory = repository().join("deploy/crds");
        for crd in custom_resource_definitions() {
            let (_, file) = FILES
                .iter()
                .find(|(kind, _)| *kind == crd.spec.names.kind)
                .unwrap();
            let committed = std::fs::read_to_string(directory.join(file)).unwrap_or_default();
            assert!(
                committed == to_yaml(&crd),
                "deploy/crds/{file} is not what the types and rules of agent/src/cluster/crd.rs \
                 generate; regenerate it with \
                 `cargo run -p tollgate-agent --bin tollgatectl -- crds --output deploy/crds`"
            );
        }
    }

    #[test]
    fn the_crds_name_their_kinds() {
        let crds = custom_resource_definitions();
        let names: Vec<_> = crds
            .iter()
            .map(|crd| {
                let names = &crd.spec.names;
                (
                    crd.metadata.name.clone().unwrap(),
                    crd.spec.scope.as_str(),
                    names.short_names.clone().unwrap(),
                    names.categories.clone().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            names,
            [
                (
                    "egresspolicies.policy.tollgate.dev".to_string(),
                    "Namespaced",
                    vec!["egp".to_string()],
                    vec!["tollgate".to_string()]
                ),
                (
                    "clusteregresspolicies.policy.tollgate.dev".to_string(),
                    "Cluster",
                    vec!["cegp".to_string()],
                    vec!["tollgate".to_string()]
                ),
            ]
        );
        for crd in &crds {
            let version = &crd.spec.versions[0];
            assert_eq!(
                (version.name.as_str(), version.served, version.storage),
                (VERSION, true, true)
            );
            assert!(version.subresources.as_ref().unwrap().status.is_some());
            let columns: Vec<_> = version
                .additional_printer_columns
                .as_ref()
                .unwrap()
                .iter()
                .map(|c| (c.name.as_str(), c.json_path.as_str()))
                .collect();
            assert_eq!(
                columns,
                [
                    ("Mode", ".spec.mode"),
                    ("Default", ".spec.defaultAction"),
                    ("Rules", ".status.rules"),
                    (
                        "Accepted",
                        ".status.conditions[?(@.type==\"Accepted\")].status"
                    ),
                    ("Enforced", ".status.nodes.enforced"),
                    ("Desired", ".status.nodes.desired"),
                    ("Age", ".metadata.creationTimestamp"),
                ]
            );
        }
    }

    /// Kubernetes refuses a CRD whose schema is not structural: every node
    /// typed, no references, no `anyOf`/`oneOf`/`allOf` that would need
    /// their own rules. Where `kubectl explain` reads, every field has a
    /// description.
    #[test]
    fn the_schemas_are_structural_and_described() {
        fn check(schema: &Value, path: &str, problems: &mut Vec<String>) {
            let object = schema.as_object().expect("a schema object");
            for keyword in [
                "$ref",
                "$defs",
                "definitions",
                "anyOf",
                "oneOf",
                "allOf",
                "not",
            ] {
                if object.contains_key(keyword) {
                    problems.push(format!("{path}: has {keyword}"));
                }
            }
            if !object.contains_key("type") {
                problems.push(format!("{path}: has no type"));
            }
            // Below spec, an object's unknown fields reach the agents.
            if path.contains(".spec")
                && object.contains_key("properties")
                && object.get("x-kubernetes-preserve-unknown-fields") != Some(&Value::Bool(true))
            {
                problems.push(format!("{path}: unknown fields would be pruned"));
            }
            if let Some(Value::Object(properties)) = object.get("properties") {
                for (name, property) in properties {
                    check(property, &format!("{path}.{name}"), problems);
                }
            }
            for keyword in ["items", "additionalProperties"] {
                if let Some(subschema) = object.get(keyword).filter(|s| s.is_object()) {
                    check(subschema, &format!("{path}.<{keyword}>"), problems);
                }
            }
        }
        for kind in [Namespaced::KIND, ClusterScoped::KIND] {
            let schema = schema_of(kind);
            let mut problems = Vec::new();
            check(&schema, kind, &mut problems);
            assert!(problems.is_empty(), "{problems:#?}");
            let spec = &schema["properties"]["spec"];
            let text = spec.to_string();
            assert!(
                !text.contains("\"default\"") && !text.contains("nullable"),
                "{text}"
            );
            assert_eq!(schema["required"], json!(["spec"]));
            let egress = &spec["properties"]["egress"];
            let described = [
                egress,
                &egress["items"],
                &egress["items"]["properties"]["name"],
                &egress["items"]["properties"]["action"],
                &egress["items"]["properties"]["to"],
                &egress["items"]["properties"]["to"]["items"]["properties"]["cidr"],
                &egress["items"]["properties"]["to"]["items"]["properties"]["except"],
                &egress["items"]["properties"]["to"]["items"]["properties"]["fqdn"],
                &egress["items"]["properties"]["ports"],
                &egress["items"]["properties"]["ports"]["items"]["properties"]["port"],
                &egress["items"]["properties"]["ports"]["items"]["properties"]["endPort"],
                &egress["items"]["properties"]["ports"]["items"]["properties"]["protocol"],
            ];
            for field in described {
                let description = field["description"].as_str().unwrap_or_default();
                assert!(
                    description.len() > 10 && !description.contains('\\'),
                    "{kind}: {field:#}"
                );
            }
            assert!(
                egress["items"]["properties"]["to"]["items"]["properties"]["fqdn"]["description"]
                    .as_str()
                    .unwrap()
                    .contains("\"**.example.com\" (one or more labels)")
            );
            assert_eq!(
                spec["properties"]["mode"]["enum"],
                json!(["enforce", "observe"])
            );
            assert_eq!(
                egress["items"]["properties"]["ports"]["items"]["properties"]["protocol"]["enum"],
                json!(["TCP", "UDP", "SCTP", "ICMP", "ICMPv6", "ANY"])
            );
        }
    }

    /// Valid objects pass every CEL rule and the agent's validator alike.
    #[test]
    fn cel_accepts_what_the_agent_accepts() {
        let valid = [
            rule(
                json!([{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "10.2.3.4/32"]},
                       {"cidr": "fd00::/8", "except": ["fd00:1::/32"]},
                       {"fqdn": "**.example.com"}, {"fqdn": "api.example.com", "cidr": ""}]),
                json!([{"port": 443, "protocol": "TCP"}, {"port": 8000, "endPort": 8000},
                       {"port": 1, "endPort": 65535, "protocol": "UDP"}, {"protocol": "ANY"},
                       {"port": 9899, "protocol": "SCTP"}, {"protocol": "ICMP"},
                       {"protocol": "ICMPv6"}]),
            ),
            // Host bits set: read as the network, by CEL's cidr() too.
            rule(
                json!([{"cidr": "10.1.2.3/16", "except": ["10.1.2.0/24"]}]),
                json!([]),
            ),
            rule(json!([]), json!([])),
            resource(
                Namespaced::KIND,
                json!({"podSelector": {"matchLabels": {"app": "a"}}}),
            ),
            resource(ClusterScoped::KIND, json!({"podSelector": {}})),
            resource(ClusterScoped::KIND, json!({"namespaceSelector": {}})),
            resource(
                ClusterScoped::KIND,
                json!({"cgroupSelector": {"paths": ["/a/**"]}}),
            ),
        ];
        for object in valid {
            assert_eq!(cel_errors(&object), Vec::<String>::new(), "{object}");
            assert_eq!(agent_errors(&object), Vec::<String>::new(), "{object}");
        }
    }

    /// Each object breaks one rule: CEL says so with that rule's message,
    /// and the agent refuses it too.
    #[test]
    fn each_cel_rule_refuses_what_it_should() {
        let exactly_one = ": needs exactly one of cidr and fqdn (use one peer for each)";
        let bad_cidr = ".cidr: cidr must be an IPv4 or IPv6 prefix such as 10.0.0.0/8 or fd00::/8";
        let except_inside = ".except: each except must be a prefix inside cidr and longer than it";
        let except_needs_cidr = ".except: except needs cidr";
        let peer = |peer: Value| rule(json!([peer]), json!([]));
        let port = |port: Value| rule(json!([]), json!([port]));
        let cases = [
            (peer(json!({})), exactly_one),
            (peer(json!({"cidr": "", "fqdn": ""})), exactly_one),
            (
                peer(json!({"cidr": "10.0.0.0/8", "fqdn": "a.example.com"})),
                exactly_one,
            ),
            (peer(json!({"cidr": "10.0.0.0/33"})), bad_cidr),
            (peer(json!({"cidr": "10.0.0.0"})), bad_cidr),
            (peer(json!({"cidr": "::ffff:10.0.0.0/104"})), bad_cidr),
            (
                peer(json!({"cidr": "banana", "except": ["10.0.0.0/8"]})),
                bad_cidr,
            ),
            (
                peer(json!({"fqdn": "a.example.com", "except": ["10.0.0.0/8"]})),
                except_needs_cidr,
            ),
            (
                peer(json!({"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]})),
                except_inside,
            ),
            (
                peer(json!({"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]})),
                except_inside,
            ),
            (
                peer(json!({"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "10.0.0.0/7"]})),
                except_inside,
            ),
            (
                peer(json!({"cidr": "10.0.0.0/8", "except": ["fd00::/16"]})),
                except_inside,
            ),
            (
                peer(json!({"cidr": "10.0.0.0/8", "except": ["banana"]})),
                except_inside,
            ),
            (
                port(json!({"port": 0})),
                ": port and endPort must be within 1-65535",
            ),
            (
                port(json!({"port": 70000})),
                ": port and endPort must be within 1-65535",
            ),
            (
                port(json!({"port": 1, "endPort": 65536})),
                ": port and endPort must be within 1-65535",
            ),
            (port(json!({"endPort": 80})), ".endPort: endPort needs port"),
            (
                port(json!({"protocol": "ICMP", "port": 8})),
                ".port: ICMP and ICMPv6 have no ports; leave port and endPort out",
            ),
            (
                port(json!({"port": 90, "endPort": 80})),
                ".endPort: endPort must not be below port",
            ),
            (
                resource(Namespaced::KIND, json!({})),
                ".podSelector: podSelector is required ({} selects every pod of the namespace)",
            ),
            (
                resource(
                    Namespaced::KIND,
                    json!({"podSelector": {}, "namespaceSelector": {}}),
                ),
                ".namespaceSelector: an EgressPolicy selects pods of its own namespace only; \
                 use a ClusterEgressPolicy to select namespaces",
            ),
            (
                resource(
                    Namespaced::KIND,
                    json!({"podSelector": {}, "cgroupSelector": {"paths": ["/a"]}}),
                ),
                ".cgroupSelector: an EgressPolicy selects pods of its own namespace only; \
                 use a ClusterEgressPolicy to select host cgroups",
            ),
            (
                resource(ClusterScoped::KIND, json!({"mode": "observe"})),
                ": one of podSelector, namespaceSelector and cgroupSelector is required",
            ),
            (
                resource(ClusterScoped::KIND, json!({"cgroupSelector": {}})),
                ".paths: lists no path",
            ),
            (
                resource(
                    ClusterScoped::KIND,
                    json!({"cgroupSelector": {"paths": []}}),
                ),
                ".paths: lists no path",
            ),
        ];
        // Every rule of both CRDs has a case.
        fn messages(schema: &Value, found: &mut Vec<String>) {
            match schema {
                Value::Object(object) => {
                    for rule in object
                        .get("x-kubernetes-validations")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        found.push(rule["message"].as_str().unwrap().to_string());
                    }
                    object.values().for_each(|v| messages(v, found));
                }
                Value::Array(items) => items.iter().for_each(|v| messages(v, found)),
                _ => {}
            }
        }
        let mut rules = Vec::new();
        messages(&schema_of(Namespaced::KIND), &mut rules);
        messages(&schema_of(ClusterScoped::KIND), &mut rules);
        assert_eq!(rules.len(), 3 + 1 + 2 * (1 + 4 + 4));
        for message in &rules {
            assert!(
                cases
                    .iter()
                    .any(|(_, expected)| expected.ends_with(message.as_str())),
                "no case for the rule {message:?}"
            );
        }

        for (object, expected) in cases {
            let errors = cel_errors(&object);
            assert_eq!(errors.len(), 1, "{object}: {errors:#?}");
            assert!(errors[0].ends_with(expected), "{object}: {errors:#?}");
            assert_ne!(agent_errors(&object), Vec::<String>::new(), "{object}");
        }
    }

    /// The schema with unknown fields refused, as `kubectl apply` with
    /// strict field validation (the default) refuses them.
    fn strict(schema: &mut Value, root: bool) {
        let Some(object) = schema.as_object_mut() else {
            return;
        };
        if root {
            let properties = object["properties"].as_object_mut().unwrap();
            for field in ["apiVersion", "kind"] {
                properties.insert(field.into(), json!({"type": "string"}));
            }
            properties.insert("metadata".into(), json!({"type": "object"}));
        }
        if object.contains_key("properties") && !object.contains_key("additionalProperties") {
            object.insert("additionalProperties".into(), false.into());
        }
        if let Some(Value::Object(properties)) = object.get_mut("properties") {
            properties.values_mut().for_each(|p| strict(p, false));
        }
        for keyword in ["items", "additionalProperties"] {
            if let Some(subschema) = object.get_mut(keyword) {
                strict(subschema, false);
            }
        }
    }

    /// examples/policies: each is a resource valid for the generated schema
    /// (types, enums, bounds, unknown fields), its CEL rules and the agent,
    /// and of the kind its selectors need (the same files work as local
    /// policies).
    #[test]
    fn the_cluster_examples_are_valid_resources() {
        let mut seen = 0;
        let directory = repository().join("examples/policies");
        for entry in std::fs::read_dir(&directory).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            seen += 1;
            let name = path.file_name().unwrap().to_str().unwrap();
            let text = std::fs::read_to_string(&path).unwrap();
            let object: Value = serde_yaml_ng::from_str(&text).unwrap();
            let kind = object["kind"].as_str().unwrap();

            let mut schema = schema_of(kind);
            strict(&mut schema, true);
            let validator = jsonschema::draft4::new(&schema).expect("a valid JSON schema");
            let errors: Vec<String> = validator
                .iter_errors(&object)
                .map(|e| format!("{}: {e}", e.instance_path()))
                .collect();
            assert!(errors.is_empty(), "{name}: {errors:#?}");
            assert_eq!(cel_errors(&object), Vec::<String>::new(), "{name}");
            let documents = parse_documents(name, &text).unwrap();
            // Valid as a resource, and as a local policy file.
            assert_eq!(validate_resource(&documents[0]).err(), None, "{name}");
            assert_eq!(validate_all(&documents).err(), None, "{name}");

            let spec = &object["spec"];
            let cluster_wide =
                spec.get("namespaceSelector").is_some() || spec.get("cgroupSelector").is_some();
            if cluster_wide {
                assert_eq!(kind, ClusterScoped::KIND, "{name}");
                assert!(object["metadata"].get("namespace").is_none(), "{name}");
            } else {
                assert_eq!(kind, Namespaced::KIND, "{name}");
                assert!(object["metadata"]["namespace"].is_string(), "{name}");
            }
        }
        assert_eq!(seen, 5);
    }

    /// The strict schema check does catch what it is there for.
    #[test]
    fn the_schema_check_refuses_bad_fields() {
        let mut schema = schema_of(Namespaced::KIND);
        strict(&mut schema, true);
        let validator = jsonschema::draft4::new(&schema).unwrap();
        let bad = [
            rule(json!([{"cidr": "10.0.0.0/8", "acton": "deny"}]), json!([])),
            rule(json!([]), json!([{"port": 443, "protocol": "GRE"}])),
            rule(json!([]), json!([{"port": 65536}])),
            rule(json!([{"fqdn": "a".repeat(258)}]), json!([])),
            resource(
                Namespaced::KIND,
                json!({"podSelector": {}, "mode": "block"}),
            ),
        ];
        for object in bad {
            assert!(!validator.is_valid(&object), "{object}");
        }
        assert!(validator.is_valid(&rule(json!([{"cidr": "10.0.0.0/8"}]), json!([]))));
    }
}
