//! ECS output against the ECS 8.11 fields it uses: every field must be one
//! of them (or a documented `tollgate.*` custom field) with its ECS type,
//! and categorization fields must hold allowed values. Names and types are
//! from the ECS 8.11 field reference (elastic.co/guide/en/ecs/8.11).

use std::net::IpAddr;

use serde_json::Value;

use super::{Mistake, fixtures, render};
use crate::export::format::{Format, parse_rfc3339_nanos};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Type {
    Keyword,
    Long,
    Ip,
    Date,
    Boolean,
    /// An object field whose elements hold the sub-fields listed after it
    /// (`dns.answers`).
    Object,
}

use Type::*;

const ECS_FIELDS: &[(&str, Type)] = &[
    ("@timestamp", Date),
    ("container.id", Keyword),
    ("container.name", Keyword),
    ("destination.domain", Keyword),
    ("destination.ip", Ip),
    ("destination.port", Long),
    ("dns.answers", Object),
    ("dns.answers.data", Keyword),
    ("dns.answers.name", Keyword),
    ("dns.answers.ttl", Long),
    ("dns.answers.type", Keyword),
    ("dns.question.name", Keyword),
    ("dns.question.type", Keyword),
    ("dns.resolved_ip", Ip),
    ("dns.response_code", Keyword),
    ("dns.type", Keyword),
    ("ecs.version", Keyword),
    ("event.action", Keyword),
    ("event.category", Keyword),
    ("event.dataset", Keyword),
    ("event.end", Date),
    ("event.kind", Keyword),
    ("event.module", Keyword),
    ("event.outcome", Keyword),
    ("event.sequence", Long),
    ("event.severity", Long),
    ("event.start", Date),
    ("event.type", Keyword),
    ("host.name", Keyword),
    // match_only_text in ECS: a string in JSON.
    ("message", Keyword),
    ("network.direction", Keyword),
    ("network.iana_number", Keyword),
    ("network.protocol", Keyword),
    ("network.transport", Keyword),
    ("network.type", Keyword),
    ("observer.product", Keyword),
    ("observer.type", Keyword),
    ("observer.vendor", Keyword),
    ("observer.version", Keyword),
    ("orchestrator.namespace", Keyword),
    ("orchestrator.resource.id", Keyword),
    ("orchestrator.resource.label", Keyword),
    ("orchestrator.resource.name", Keyword),
    ("orchestrator.resource.parent.type", Keyword),
    ("orchestrator.resource.type", Keyword),
    ("orchestrator.type", Keyword),
    ("process.group.id", Keyword),
    ("process.name", Keyword),
    ("process.pid", Long),
    ("process.thread.id", Long),
    ("process.user.id", Keyword),
    ("rule.id", Keyword),
    ("rule.name", Keyword),
    ("rule.ruleset", Keyword),
];

/// Tollgate's own fields (docs/export-formats.md).
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

/// ECS's allowed values for the categorization fields and direction.
const ALLOWED_VALUES: &[(&str, &[&str])] = &[
    (
        "event.kind",
        &[
            "alert",
            "asset",
            "enrichment",
            "event",
            "metric",
            "state",
            "pipeline_error",
            "signal",
        ],
    ),
    ("event.category", &["network"]),
    // The types ECS expects with category network.
    (
        "event.type",
        &[
            "access",
            "allowed",
            "connection",
            "denied",
            "end",
            "info",
            "protocol",
            "start",
        ],
    ),
    ("event.outcome", &["failure", "success", "unknown"]),
    (
        "network.direction",
        &[
            "ingress", "egress", "inbound", "outbound", "internal", "external", "unknown",
        ],
    ),
    ("network.type", &["ipv4", "ipv6"]),
];

fn field_type(path: &str) -> Type {
    ECS_FIELDS
        .iter()
        .chain(CUSTOM_FIELDS)
        .find(|(name, _)| *name == path)
        .map(|(_, ty)| *ty)
        .unwrap_or_else(|| panic!("{path}: not an ECS field we use"))
}

/// Checks every leaf of `value`, which sits at `path`.
fn check(path: &str, value: &Value) {
    match value {
        Value::Object(map) if path.is_empty() || field_type_or_object(path) => {
            for (key, v) in map {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                check(&child, v);
            }
        }
        Value::Array(items) => {
            for item in items {
                check(path, item);
            }
        }
        leaf => check_leaf(path, leaf),
    }
}

/// Objects are either declared `Object` fields or plain nesting of
/// dotted names; a declared leaf type must not be an object.
fn field_type_or_object(path: &str) -> bool {
    let declared = ECS_FIELDS
        .iter()
        .chain(CUSTOM_FIELDS)
        .find(|(name, _)| *name == path);
    match declared {
        Some((_, Object)) | None => true,
        Some((_, ty)) => panic!("{path}: an object where ECS has a {ty:?}"),
    }
}

fn check_leaf(path: &str, value: &Value) {
    let ok = match field_type(path) {
        Keyword => value.is_string(),
        Long => value.is_u64() || value.is_i64(),
        Ip => value.as_str().is_some_and(|s| s.parse::<IpAddr>().is_ok()),
        Date => value
            .as_str()
            .is_some_and(|s| parse_rfc3339_nanos(s).is_some()),
        Boolean => value.is_boolean(),
        Object => false,
    };
    assert!(ok, "{path}: {value} is not a {:?}", field_type(path));
    if let Some((_, allowed)) = ALLOWED_VALUES.iter().find(|(name, _)| *name == path) {
        assert!(
            allowed.contains(&value.as_str().unwrap()),
            "{path}: {value} is not an allowed value"
        );
    }
}

fn check_document(document: &Value, name: &str) {
    check("", document);
    assert_eq!(document["ecs"]["version"], "8.11.0", "{name}");
    for required in ["@timestamp", "event", "host", "observer"] {
        assert!(document.get(required).is_some(), "{name}: {required}");
    }
    assert!(
        document["event"]["dataset"]
            .as_str()
            .is_some_and(|d| d.starts_with("tollgate.")),
        "{name}"
    );
}

#[test]
fn documents_use_only_ecs_fields_with_their_types() {
    for (name, fixture) in fixtures::all() {
        let document: Value = serde_json::from_str(&render(Format::Ecs, &fixture)).unwrap();
        check_document(&document, name);
    }
}

#[test]
fn the_field_check_catches_mistakes() {
    let (_, fixture) = fixtures::golden().remove(0);
    let good: Value = serde_json::from_str(&render(Format::Ecs, &fixture)).unwrap();
    let mistakes: [Mistake; 4] = [
        ("an unknown field", |d| d["process"]["comm"] = "curl".into()),
        ("a wrong type", |d| d["destination"]["port"] = "80".into()),
        ("a bad address", |d| {
            d["destination"]["ip"] = "not-an-ip".into()
        }),
        ("a value ECS does not allow", |d| {
            d["event"]["type"] = serde_json::json!(["blocked"])
        }),
    ];
    for (mistake, make) in mistakes {
        let mut document = good.clone();
        make(&mut document);
        let caught = std::panic::catch_unwind(|| check_document(&document, mistake)).is_err();
        assert!(caught, "{mistake} went unnoticed");
    }
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
        check_document(&document, source);
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
