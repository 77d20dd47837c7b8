//! OCSF output against the OCSF 1.3.0 schema itself: the classes, objects,
//! dictionary types and enums of conformance/ocsf-1.3.0.json, compiled
//! from the schema's v1.3.0 tag (conformance/README.md). Every attribute
//! must exist in its class or object (profile attributes only with their
//! profile declared) and hold its type, regexes, lengths and ranges
//! included; required attributes must be present; enum ids must be the
//! schema's with its captions (99 "Other" takes the source's caption);
//! observables must point at the value they name.

use std::{collections::BTreeMap, sync::LazyLock};

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Mistake, fixtures, render};
use crate::export::format::Format;

#[derive(Deserialize)]
struct Schema {
    version: String,
    classes: BTreeMap<String, Class>,
    objects: BTreeMap<String, Object>,
    types: BTreeMap<String, DataType>,
}

#[derive(Deserialize)]
struct Class {
    uid: u64,
    caption: String,
    category_uid: u64,
    attributes: Attributes,
}

#[derive(Deserialize)]
struct Object {
    attributes: Attributes,
}

type Attributes = BTreeMap<String, Attribute>;

#[derive(Deserialize)]
struct Attribute {
    #[serde(rename = "type")]
    kind: String,
    requirement: String,
    #[serde(default)]
    is_array: bool,
    profile: Option<String>,
    /// The attribute holding an enum id's caption.
    sibling: Option<String>,
    #[serde(rename = "enum")]
    values: Option<BTreeMap<String, String>>,
}

/// A dictionary type: a base type and the constraints it adds.
#[derive(Deserialize)]
struct DataType {
    #[serde(rename = "type")]
    base: Option<String>,
    regex: Option<String>,
    max_len: Option<usize>,
    range: Option<[i64; 2]>,
}

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    serde_json::from_str(include_str!("../conformance/ocsf-1.3.0.json")).expect("the schema parses")
});

/// The dictionary types' regexes, compiled once (ECMA regexes, as the
/// schema writes them).
static PATTERNS: LazyLock<BTreeMap<&'static str, jsonschema::Validator>> = LazyLock::new(|| {
    SCHEMA
        .types
        .iter()
        .filter_map(|(name, data_type)| {
            let regex = data_type.regex.as_ref()?;
            let validator = jsonschema::validator_for(&json!({"pattern": regex}))
                .unwrap_or_else(|e| panic!("{name}'s regex: {e}"));
            Some((name.as_str(), validator))
        })
        .collect()
});

/// Checks one event; returns what is wrong with it, nothing if it fits.
fn check_event(event: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let Some(event) = event.as_object() else {
        return vec!["not an object".into()];
    };
    let class_uid = event.get("class_uid").and_then(Value::as_u64);
    let Some(class) = SCHEMA.classes.values().find(|c| Some(c.uid) == class_uid) else {
        return vec![format!("class_uid {class_uid:?} is not a class we check")];
    };
    let metadata = &event["metadata"];
    if metadata["version"] != SCHEMA.version.as_str() {
        errors.push(format!("metadata.version is not {}", SCHEMA.version));
    }
    let profiles: Vec<&str> = metadata["profiles"]
        .as_array()
        .map(|p| p.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    check_attributes(&class.attributes, event, &profiles, "", &mut errors);
    let activity_id = event
        .get("activity_id")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    if event.get("type_uid").and_then(Value::as_u64) != Some(class.uid * 100 + activity_id) {
        errors.push("type_uid is not class_uid * 100 + activity_id".into());
    }
    if event.get("category_uid").and_then(Value::as_u64) != Some(class.category_uid) {
        errors.push(format!("category_uid is not {}", class.category_uid));
    }
    if event.get("class_name").and_then(Value::as_str) != Some(&class.caption) {
        errors.push(format!("class_name is not {}", class.caption));
    }
    let activity = class.attributes["activity_id"]
        .values
        .as_ref()
        .and_then(|values| values.get(&activity_id.to_string()));
    if let Some(activity) = activity {
        let type_name = format!("{}: {activity}", class.caption);
        if event.get("type_name").and_then(Value::as_str) != Some(&type_name) {
            errors.push(format!("type_name is not {type_name}"));
        }
    }
    check_observables(class, event, &mut errors);
    errors
}

fn check_attributes(
    attributes: &Attributes,
    value: &Map<String, Value>,
    profiles: &[&str],
    path: &str,
    errors: &mut Vec<String>,
) {
    for (key, v) in value {
        let here = if path.is_empty() {
            key.clone()
        } else {
            format!("{path}.{key}")
        };
        let Some(attribute) = attributes.get(key) else {
            errors.push(format!("{here}: no such attribute"));
            continue;
        };
        if let Some(profile) = &attribute.profile
            && !profiles.contains(&profile.as_str())
        {
            errors.push(format!("{here}: profile {profile} is not declared"));
        }
        match (attribute.is_array, v) {
            (true, Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    check_value(attribute, item, profiles, &format!("{here}[{i}]"), errors);
                }
            }
            (true, _) => errors.push(format!("{here}: not an array")),
            (false, _) => check_value(attribute, v, profiles, &here, errors),
        }
    }
    for (name, attribute) in attributes {
        let in_force = attribute
            .profile
            .as_ref()
            .is_none_or(|profile| profiles.contains(&profile.as_str()));
        if attribute.requirement == "required" && in_force && !value.contains_key(name) {
            errors.push(format!("{path}: {name} is required"));
        }
        if let (Some(values), Some(id)) = (&attribute.values, value.get(name)) {
            check_enum(name, attribute, values, id, value, path, errors);
        }
    }
}

fn check_enum(
    name: &str,
    attribute: &Attribute,
    values: &BTreeMap<String, String>,
    id: &Value,
    value: &Map<String, Value>,
    path: &str,
    errors: &mut Vec<String>,
) {
    let id_text = id.to_string();
    let Some(caption) = values.get(&id_text) else {
        errors.push(format!("{path}.{name}: {id_text} is not in the enum"));
        return;
    };
    let Some(sibling) = &attribute.sibling else {
        return;
    };
    match value.get(sibling).and_then(Value::as_str) {
        // "Other": the source's own caption.
        Some(given) if id_text == "99" => {
            if given.is_empty() {
                errors.push(format!("{path}.{sibling}: empty"));
            }
        }
        Some(given) if given == caption => {}
        // The caption is the id's; without it, consumers look it up.
        None if id_text != "99" => {}
        given => errors.push(format!(
            "{path}.{sibling}: {given:?}, not {name} {id_text}'s caption {caption:?}"
        )),
    }
}

fn check_value(
    attribute: &Attribute,
    value: &Value,
    profiles: &[&str],
    path: &str,
    errors: &mut Vec<String>,
) {
    // OCSF's `object` (`unmapped`) is any object.
    let object = SCHEMA
        .objects
        .get(&attribute.kind)
        .filter(|_| attribute.kind != "object");
    if let Some(object) = object {
        match value.as_object() {
            Some(map) => check_attributes(&object.attributes, map, profiles, path, errors),
            None => errors.push(format!("{path}: not a {} object", attribute.kind)),
        }
        return;
    }
    check_type(&attribute.kind, value, path, errors);
}

/// Checks `value` against a dictionary type and every type it derives from.
fn check_type(kind: &str, value: &Value, path: &str, errors: &mut Vec<String>) {
    let ok = match kind {
        "string_t" => value.is_string(),
        "integer_t" => value.as_i64().is_some_and(|n| i32::try_from(n).is_ok()),
        "long_t" => value.is_i64() || value.is_u64(),
        "float_t" => value.is_number(),
        "boolean_t" => value.is_boolean(),
        "json_t" => true,
        // `unmapped`: any object.
        "object" => value.is_object(),
        derived => {
            let Some(data_type) = SCHEMA.types.get(derived) else {
                errors.push(format!("{path}: unknown type {derived}"));
                return;
            };
            check_type(
                data_type.base.as_deref().unwrap_or("string_t"),
                value,
                path,
                errors,
            );
            if let (Some(pattern), Some(text)) = (PATTERNS.get(derived), value.as_str())
                && !pattern.is_valid(&Value::from(text))
            {
                errors.push(format!("{path}: {text:?} is not a {derived}"));
            }
            if let (Some(max), Some(text)) = (data_type.max_len, value.as_str())
                && text.chars().count() > max
            {
                errors.push(format!("{path}: longer than {derived}'s {max}"));
            }
            if let (Some([low, high]), Some(n)) = (data_type.range, value.as_i64())
                && !(low..=high).contains(&n)
            {
                errors.push(format!("{path}: {n} is outside {derived}'s range"));
            }
            return;
        }
    };
    if !ok {
        errors.push(format!("{path}: {value} is not a {kind}"));
    }
}

/// The attribute a dotted path (`dst_endpoint.ip`) names in `class`.
fn attribute_at<'s>(class: &'s Class, path: &str) -> Option<&'s Attribute> {
    let mut attributes = &class.attributes;
    let mut names = path.split('.').peekable();
    while let Some(name) = names.next() {
        let attribute = attributes.get(name)?;
        if names.peek().is_none() {
            return Some(attribute);
        }
        attributes = &SCHEMA.objects.get(&attribute.kind)?.attributes;
    }
    None
}

/// Each observable names an attribute of the event by its path; that
/// attribute must hold the observable's value and have the type its
/// `type_id` stands for.
fn check_observables(class: &Class, event: &Map<String, Value>, errors: &mut Vec<String>) {
    let Some(observables) = event.get("observables").and_then(Value::as_array) else {
        return;
    };
    for observable in observables {
        let name = observable["name"].as_str().unwrap_or_default();
        let pointer = format!("/{}", name.replace('.', "/"));
        let held = Value::Object(event.clone()).pointer(&pointer).cloned();
        if held.as_ref() != Some(&observable["value"]) {
            errors.push(format!("observable {name}: the event holds {held:?} there"));
        }
        let want_type = match observable["type_id"].as_u64() {
            Some(1) => "hostname_t",
            Some(2) => "ip_t",
            other => {
                errors.push(format!(
                    "observable {name}: type_id {other:?} not checked here"
                ));
                continue;
            }
        };
        match attribute_at(class, name) {
            Some(attribute) if attribute.kind == want_type => {}
            _ => errors.push(format!("observable {name}: not a {want_type} attribute")),
        }
    }
}

fn ocsf_event(fixture: &fixtures::Fixture) -> Value {
    serde_json::from_str(&render(Format::Ocsf, fixture)).unwrap()
}

#[test]
fn events_fit_the_ocsf_1_3_0_schema() {
    for (name, fixture) in fixtures::conformance() {
        let errors = check_event(&ocsf_event(&fixture));
        assert!(errors.is_empty(), "{name}: {errors:#?}");
    }
}

#[test]
fn the_schema_check_catches_mistakes() {
    let golden = fixtures::golden();
    let flow = ocsf_event(&golden[0].1);
    let dns = ocsf_event(&golden[3].1);
    let flow_mistakes: &[Mistake] = &[
        ("an unknown attribute", |e| {
            e["actor"]["process"]["comm"] = "curl".into()
        }),
        ("a missing required attribute", |e| {
            e.as_object_mut().unwrap().remove("dst_endpoint");
        }),
        ("a missing required object attribute", |e| {
            e["metadata"].as_object_mut().unwrap().remove("product");
        }),
        ("a wrong type", |e| {
            e["actor"]["process"]["user"]["uid"] = 1000.into()
        }),
        ("a port out of range", |e| {
            e["dst_endpoint"]["port"] = 70000.into()
        }),
        ("an address that is no ip_t", |e| {
            e["dst_endpoint"]["ip"] = "not-an-ip".into()
        }),
        ("a name that is no hostname_t", |e| {
            e["dst_endpoint"]["hostname"] = "_http._tcp.example.com".into()
        }),
        ("a caption that does not match", |e| {
            e["disposition"] = "Allowed".into()
        }),
        ("an id not in the enum", |e| e["disposition_id"] = 42.into()),
        ("a wrong type_uid", |e| e["type_uid"] = 400106.into()),
        ("a wrong type_name", |e| {
            e["type_name"] = "Network Activity: Traffic".into()
        }),
        ("an undeclared profile", |e| {
            e["metadata"]["profiles"] = json!(["host", "security_control"]);
        }),
        ("an observable pointing elsewhere", |e| {
            e["observables"][0]["value"] = "192.0.2.1".into()
        }),
        ("an observable of the wrong type", |e| {
            e["observables"][0]["type_id"] = 1.into();
            e["observables"][0]["type"] = "Hostname".into();
        }),
        ("another OCSF version", |e| {
            e["metadata"]["version"] = "1.4.0".into()
        }),
    ];
    let dns_mistakes: &[Mistake] = &[
        ("the rcode caption 16 had before 1.3.0", |e| {
            e["rcode_id"] = 16.into();
            e["rcode"] = "BADVERS".into();
        }),
        ("a query name that is no hostname_t", |e| {
            e["query"]["hostname"] = "_dmarc.example.com".into()
        }),
        ("a query without its required hostname", |e| {
            e["query"].as_object_mut().unwrap().remove("hostname");
        }),
    ];
    for (good, mistakes) in [(&flow, flow_mistakes), (&dns, dns_mistakes)] {
        assert_eq!(check_event(good), Vec::<String>::new());
        for (mistake, make) in mistakes {
            let mut event = good.clone();
            make(&mut event);
            assert!(!check_event(&event).is_empty(), "{mistake} went unnoticed");
        }
    }
}

#[test]
fn names_that_are_no_hostnames_go_where_the_schema_takes_any_string() {
    let mut flow = fixtures::denied_pod_flow();
    flow.dst.fqdn = Some("_http._tcp.example.com");
    let event = ocsf_event(&fixtures::Fixture::Flow(flow));
    assert_eq!(event["dst_endpoint"]["domain"], "_http._tcp.example.com");
    assert!(event["dst_endpoint"].get("hostname").is_none());

    let mut dns = match fixtures::golden().remove(3).1 {
        fixtures::Fixture::Dns(dns) => dns,
        _ => unreachable!(),
    };
    dns.query = "_dmarc.example.com".into();
    dns.query_type = "TXT".into();
    let event = ocsf_event(&fixtures::Fixture::Dns(dns));
    assert!(event.get("query").is_none());
    assert_eq!(event["unmapped"]["query"], "_dmarc.example.com");
    assert_eq!(event["unmapped"]["query_type"], "TXT");
}

#[test]
fn record_uids_are_node_instance_and_seq() {
    let golden = fixtures::golden();
    let flow = ocsf_event(&golden[0].1);
    assert_eq!(
        flow["metadata"]["uid"],
        format!("aks-nodepool1-0-{}-41", fixtures::INSTANCE)
    );
    // Rendered again (a resend), the same.
    assert_eq!(
        ocsf_event(&golden[0].1)["metadata"]["uid"],
        flow["metadata"]["uid"]
    );
    // A sink's loss marker has no seq, so no uid.
    assert!(ocsf_event(&golden[4].1)["metadata"].get("uid").is_none());
}

#[test]
fn metadata_sequence_holds_seq_only_while_it_fits_an_integer_t() {
    let event = ocsf_event(&fixtures::Fixture::Flow(fixtures::denied_pod_flow()));
    assert_eq!(event["metadata"]["sequence"], 41);
    assert_eq!(event["unmapped"]["seq"], 41);
    let mut flow = fixtures::denied_pod_flow();
    flow.seq = 5_000_000_000;
    let event = ocsf_event(&fixtures::Fixture::Flow(flow));
    assert!(event["metadata"].get("sequence").is_none());
    assert_eq!(event["unmapped"]["seq"], 5_000_000_000u64);
    assert_eq!(
        event["metadata"]["uid"],
        format!("aks-nodepool1-0-{}-5000000000", fixtures::INSTANCE)
    );
}

#[test]
fn pod_labels_are_key_value_strings() {
    let event = ocsf_event(&fixtures::golden()[0].1);
    assert_eq!(
        event["unmapped"]["labels"],
        json!(["app:payments", "app.kubernetes.io/name:payments"])
    );
}

#[test]
fn every_event_has_a_message() {
    for (name, fixture) in fixtures::conformance() {
        let event = ocsf_event(&fixture);
        assert!(
            event["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}"
        );
    }
    let event = ocsf_event(&fixtures::golden()[0].1);
    assert_eq!(
        event["message"],
        "Egress denied: tcp to 169.254.169.254:80 from curl (pid 8268) in prod/payments-7d9c6b5f4-x2x8q, rule deny-imds"
    );
}

#[test]
fn verdicts_map_to_action_and_disposition() {
    for (verdict, action, disposition, decision) in [
        ("allowed", 1, 1, "Allowed"),
        ("denied", 2, 2, "Denied"),
        ("audit", 1, 15, "Denied"),
    ] {
        let mut flow = fixtures::denied_pod_flow();
        flow.verdict = verdict;
        let rendered = render(Format::Ocsf, &fixtures::Fixture::Flow(flow));
        let event: Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(event["action_id"], action, "{verdict}");
        assert_eq!(event["disposition_id"], disposition, "{verdict}");
        assert_eq!(
            event["authorizations"][0]["decision"], decision,
            "{verdict}"
        );
    }
}

#[test]
fn each_policy_has_its_source_as_its_group() {
    use serde_json::json;
    let event = |fixture: &fixtures::Fixture| -> Value {
        serde_json::from_str(&render(Format::Ocsf, fixture)).unwrap()
    };
    let policies = |event: &Value| -> Vec<(Value, Value)> {
        event["authorizations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| (a["policy"]["name"].clone(), a["policy"]["group"].clone()))
            .collect()
    };
    let cluster = event(&fixtures::Fixture::Flow(fixtures::denied_pod_flow()));
    assert_eq!(
        policies(&cluster),
        [(json!("prod/payments-egress"), json!({"name": "cluster"}))]
    );
    let local = event(&fixtures::Fixture::Flow(fixtures::local_policy_flow()));
    assert_eq!(
        policies(&local),
        [(json!("prod/payments-local"), json!({"name": "local"}))]
    );
    let golden = fixtures::golden();
    assert_eq!(
        policies(&event(&golden[1].1)),
        [
            (json!("host-allow-list"), json!({"name": "local"})),
            (json!("node-baseline"), json!({"name": "cluster"})),
        ],
        "a default of a local and a cluster policy"
    );
    let unattributed = event(&golden[2].1);
    assert!(unattributed.get("authorizations").is_none());
    for event in [cluster, local] {
        assert_eq!(check_event(&event), Vec::<String>::new());
        assert!(event["unmapped"].get("policy_source").is_none(), "mapped");
    }
}
