//! ECS output against ECS's own field set: conformance/ecs-8.11.0.json,
//! the fields of ECS 8.11.0's generated/ecs/ecs_flat.yml (README.md
//! beside it). Every leaf must be an ECS field of that version with a
//! compatible type (or one of our `tollgate.*` fields), arrays only where
//! ECS normalizes to arrays, values within the allowed and expected
//! values ECS lists, event types among those ECS expects for the event's
//! categories, and `labels` (if ever used) flat keyword values.

use std::{collections::BTreeMap, net::IpAddr, sync::LazyLock};

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Mistake, fixtures, render};
use crate::export::format::{Format, parse_rfc3339_nanos};

/// The ECS version whose definitions conformance/ holds, and which the
/// documents must declare.
const ECS_VERSION: &str = "8.11.0";

#[derive(Deserialize)]
struct Field {
    #[serde(rename = "type")]
    kind: String,
    /// ECS normalizes the field to an array.
    #[serde(default)]
    array: bool,
    allowed_values: Option<Vec<String>>,
    expected_values: Option<Vec<String>>,
    /// For `event.category`: the event types each category expects.
    expected_event_types: Option<BTreeMap<String, Vec<String>>>,
}

static FIELDS: LazyLock<BTreeMap<String, Field>> = LazyLock::new(|| {
    serde_json::from_str(include_str!("../conformance/ecs-8.11.0.json"))
        .expect("the field set parses")
});

#[derive(Clone, Copy, Debug, PartialEq)]
enum Type {
    Keyword,
    Long,
    Boolean,
}

use Type::*;

const CUSTOM_FIELDS: &[(&str, Type)] = &[
    ("tollgate.cgroup", Keyword),
    ("tollgate.cgroup_id", Long),
    ("tollgate.generation", Long),
    ("tollgate.hook", Keyword),
    ("tollgate.identity", Keyword),
    ("tollgate.learned", Boolean),
    ("tollgate.loss.count", Long),
    ("tollgate.loss.first_seq", Long),
    ("tollgate.loss.last_seq", Long),
    ("tollgate.loss.reason", Keyword),
    ("tollgate.loss.sink", Keyword),
    ("tollgate.mode", Keyword),
    ("tollgate.policy_source", Keyword),
    ("tollgate.socket_cookie", Long),
    ("tollgate.summary.count", Long),
    ("tollgate.verdict", Keyword),
    ("tollgate.workload.kind", Keyword),
    ("tollgate.workload.name", Keyword),
];

/// Checks a document; returns what is wrong with it.
fn check_document(document: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    walk("", document, &mut errors);
    if document["ecs"]["version"] != ECS_VERSION {
        errors.push(format!("ecs.version is not {ECS_VERSION}"));
    }
    for required in ["@timestamp", "event", "host", "observer"] {
        if document.get(required).is_none() {
            errors.push(format!("{required} is missing"));
        }
    }
    let event = &document["event"];
    let categories = event["category"].as_array().cloned().unwrap_or_default();
    let expected = FIELDS["event.category"]
        .expected_event_types
        .as_ref()
        .expect("ECS lists the event types of each category");
    for kind in event["type"].as_array().into_iter().flatten() {
        let kind = kind.as_str().unwrap_or_default();
        let fits = categories.iter().any(|category| {
            let category = category.as_str().unwrap_or_default();
            expected
                .get(category)
                .is_some_and(|types| types.iter().any(|t| t == kind))
        });
        if !fits {
            errors.push(format!(
                "event.type {kind} is not expected for {categories:?}"
            ));
        }
    }
    errors
}

/// Walks `value`, which sits at `path` (dotted, no array indices).
fn walk(path: &str, value: &Value, errors: &mut Vec<String>) {
    let field = FIELDS.get(path);
    if path == "labels" || path.starts_with("labels.") {
        return check_labels(path, value, errors);
    }
    match value {
        Value::Object(map) => {
            if let Some(field) = field.filter(|f| !matches!(f.kind.as_str(), "object" | "nested")) {
                errors.push(format!("{path}: an object where ECS has a {}", field.kind));
                return;
            }
            for (key, child) in map {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                walk(&child_path, child, errors);
            }
        }
        Value::Array(items) => {
            if !field.is_some_and(|f| f.array) {
                errors.push(format!("{path}: an array where ECS has none"));
            }
            for item in items {
                walk_item(path, item, errors);
            }
        }
        leaf => check_leaf(path, field, leaf, errors),
    }
}

/// An element of an array field: objects (`dns.answers`) hold sub-fields.
fn walk_item(path: &str, item: &Value, errors: &mut Vec<String>) {
    match item {
        Value::Object(_) => walk(path, item, errors),
        Value::Array(_) => errors.push(format!("{path}: an array in an array")),
        leaf => check_leaf(path, FIELDS.get(path), leaf, errors),
    }
}

fn check_leaf(path: &str, field: Option<&Field>, value: &Value, errors: &mut Vec<String>) {
    if path.starts_with("tollgate.") {
        let declared = CUSTOM_FIELDS.iter().find(|(name, _)| *name == path);
        let ok = match declared.map(|(_, kind)| kind) {
            Some(Keyword) => value.is_string(),
            Some(Long) => value.is_i64() || value.is_u64(),
            Some(Boolean) => value.is_boolean(),
            None => {
                errors.push(format!("{path}: not one of our documented fields"));
                return;
            }
        };
        if !ok {
            errors.push(format!(
                "{path}: {value} is not a {:?}",
                declared.unwrap().1
            ));
        }
        return;
    }
    let Some(field) = field else {
        errors.push(format!("{path}: not an ECS {ECS_VERSION} field"));
        return;
    };
    let ok = match field.kind.as_str() {
        "keyword" | "constant_keyword" | "wildcard" | "match_only_text" | "text" => {
            value.is_string()
        }
        "long" => value.is_i64() || value.is_u64(),
        "float" | "scaled_float" => value.is_number(),
        "boolean" => value.is_boolean(),
        "ip" => value.as_str().is_some_and(|s| s.parse::<IpAddr>().is_ok()),
        "date" => value
            .as_str()
            .is_some_and(|s| parse_rfc3339_nanos(s).is_some()),
        other => {
            errors.push(format!("{path}: a leaf where ECS has a {other}"));
            return;
        }
    };
    if !ok {
        errors.push(format!("{path}: {value} is not a {}", field.kind));
        return;
    }
    let listed = field
        .allowed_values
        .as_ref()
        .or(field.expected_values.as_ref());
    if let (Some(listed), Some(text)) = (listed, value.as_str())
        && !listed.iter().any(|v| v == text)
    {
        errors.push(format!("{path}: {text} is not a value ECS lists"));
    }
}

/// ECS's `labels`: flat keyword values, keys without dots ("Field names
/// should not contain dots").
fn check_labels(path: &str, value: &Value, errors: &mut Vec<String>) {
    match (path, value) {
        ("labels", Value::Object(map)) => {
            for (key, label) in map {
                if key.contains('.') {
                    errors.push(format!("labels.{key}: a dot in a label key"));
                }
                if !label.is_string() {
                    errors.push(format!("labels.{key}: not a keyword"));
                }
            }
        }
        _ => errors.push(format!("{path}: labels must be an object of keywords")),
    }
}

fn ecs_document(fixture: &fixtures::Fixture) -> Value {
    serde_json::from_str(&render(Format::Ecs, fixture)).unwrap()
}

#[test]
fn documents_use_only_ecs_fields_with_their_types() {
    for (name, fixture) in fixtures::conformance() {
        let errors = check_document(&ecs_document(&fixture));
        assert!(errors.is_empty(), "{name}: {errors:#?}");
    }
}

#[test]
fn the_field_check_catches_mistakes() {
    let golden = fixtures::golden();
    let good = ecs_document(&golden[0].1);
    assert_eq!(check_document(&good), Vec::<String>::new());
    let mistakes: &[Mistake] = &[
        ("an unknown field", |d| d["process"]["comm"] = "curl".into()),
        ("a field ECS added after 8.11 (8.16)", |d| {
            d["process"]["group"] = json!({"id": "1000"})
        }),
        ("a wrong type", |d| d["destination"]["port"] = "80".into()),
        ("a bad address", |d| {
            d["destination"]["ip"] = "not-an-ip".into()
        }),
        ("an object where ECS has a leaf", |d| {
            d["process"]["name"] = json!({"short": "curl"})
        }),
        ("a value ECS does not allow", |d| {
            d["event"]["type"] = json!(["blocked"])
        }),
        ("an event type the category does not expect", |d| {
            d["event"]["type"] = json!(["creation"])
        }),
        ("a direction ECS does not list", |d| {
            d["network"]["direction"] = "out".into()
        }),
        ("an array where ECS has none", |d| {
            d["process"]["name"] = json!(["curl"])
        }),
        ("a label key with a dot", |d| {
            d["labels"] = json!({"app.kubernetes.io/name": "payments"})
        }),
        ("an undocumented tollgate field", |d| {
            d["tollgate"]["comm"] = "curl".into()
        }),
        ("another ECS version", |d| {
            d["ecs"]["version"] = "8.17.0".into()
        }),
    ];
    for (mistake, make) in mistakes {
        let mut document = good.clone();
        make(&mut document);
        assert!(
            !check_document(&document).is_empty(),
            "{mistake} went unnoticed"
        );
    }
}

#[test]
fn the_records_ids_are_the_real_ids() {
    let document = ecs_document(&fixtures::golden()[1].1);
    assert_eq!(document["process"]["real_user"]["id"], "998");
    assert_eq!(document["process"]["real_group"]["id"], "996");
    assert!(document["process"].get("user").is_none());
    assert!(document["process"].get("group").is_none());
}

#[test]
fn pod_labels_are_key_value_strings() {
    let (_, fixture) = fixtures::golden().remove(0);
    let document: Value = serde_json::from_str(&render(Format::Ecs, &fixture)).unwrap();
    assert_eq!(
        document["orchestrator"]["resource"]["label"],
        serde_json::json!(["app:payments", "app.kubernetes.io/name:payments"])
    );
    assert!(document.get("labels").is_none());
}

#[test]
fn the_policy_source_is_a_tollgate_field_beside_the_ruleset() {
    let document = |fixture: &fixtures::Fixture| -> Value {
        serde_json::from_str(&render(Format::Ecs, fixture)).unwrap()
    };
    for (flow, ruleset, source) in [
        (
            fixtures::denied_pod_flow(),
            "prod/payments-egress",
            "cluster",
        ),
        (
            fixtures::local_policy_flow(),
            "prod/payments-local",
            "local",
        ),
    ] {
        let document = document(&fixtures::Fixture::Flow(flow));
        assert_eq!(check_document(&document), Vec::<String>::new(), "{source}");
        assert_eq!(document["rule"]["ruleset"], ruleset);
        assert_eq!(document["tollgate"]["policy_source"], source);
    }
    let golden = fixtures::golden();
    assert_eq!(
        document(&golden[1].1)["tollgate"]["policy_source"],
        "local,cluster"
    );
    let unattributed = document(&golden[2].1);
    assert!(unattributed["rule"].get("ruleset").is_none());
    assert!(unattributed["tollgate"].get("policy_source").is_none());
}
