//! OCSF output against the 1.3.0 schema, as far as these events use it:
//! every attribute must exist in its class or object (profile attributes
//! only with the profile declared), have its type, and every required one
//! must be there. Enums are checked against their 1.3.0 values and
//! captions. Sources: schema.ocsf.io/1.3.0 (the classes and objects, and
//! its JSON schema export).

use serde_json::{Map, Value};

use super::{Mistake, fixtures, render};
use crate::export::format::Format;

#[derive(Clone, Copy, Debug)]
enum Type {
    Int,
    Str,
    /// Any JSON object (`unmapped`).
    Json,
    Obj(&'static str),
    Array(&'static Type),
}

/// An attribute: name, type, and the profile that brings it (None: the
/// class or object itself).
type Attr = (&'static str, Type, Option<&'static str>);

struct Def {
    name: &'static str,
    attrs: &'static [&'static [Attr]],
    required: &'static [&'static str],
    /// Required when their profile is declared.
    profile_required: &'static [(&'static str, &'static str)],
}

use Type::*;

const BASE_EVENT: &[Attr] = &[
    ("activity_id", Int, None),
    ("activity_name", Str, None),
    ("category_uid", Int, None),
    ("category_name", Str, None),
    ("class_uid", Int, None),
    ("class_name", Str, None),
    ("count", Int, None),
    ("duration", Int, None),
    ("end_time", Int, None),
    ("message", Str, None),
    ("metadata", Obj("metadata"), None),
    ("raw_data", Str, None),
    ("severity", Str, None),
    ("severity_id", Int, None),
    ("start_time", Int, None),
    ("status", Str, None),
    ("status_code", Str, None),
    ("status_detail", Str, None),
    ("status_id", Int, None),
    ("time", Int, None),
    ("timezone_offset", Int, None),
    ("type_name", Str, None),
    ("type_uid", Int, None),
    ("unmapped", Json, None),
    ("device", Obj("device"), Some("host")),
    ("actor", Obj("actor"), Some("host")),
];
const BASE_REQUIRED: &[&str] = &[
    "activity_id",
    "category_uid",
    "class_uid",
    "metadata",
    "severity_id",
    "time",
    "type_uid",
];
const SECURITY_CONTROL: &[Attr] = &[
    ("action", Str, Some("security_control")),
    ("action_id", Int, Some("security_control")),
    ("disposition", Str, Some("security_control")),
    ("disposition_id", Int, Some("security_control")),
    (
        "firewall_rule",
        Obj("firewall_rule"),
        Some("security_control"),
    ),
    (
        "authorizations",
        Array(&Obj("authorization")),
        Some("security_control"),
    ),
];
const NETWORK: &[Attr] = &[
    ("app_name", Str, None),
    ("connection_info", Obj("network_connection_info"), None),
    ("dst_endpoint", Obj("network_endpoint"), None),
    ("src_endpoint", Obj("network_endpoint"), None),
];

const CLASSES: &[(u64, Def)] = &[
    (
        4001,
        Def {
            name: "network_activity",
            attrs: &[BASE_EVENT, SECURITY_CONTROL, NETWORK],
            required: &["dst_endpoint"],
            profile_required: &[("security_control", "action_id")],
        },
    ),
    (
        4003,
        Def {
            name: "dns_activity",
            attrs: &[
                BASE_EVENT,
                SECURITY_CONTROL,
                NETWORK,
                &[
                    ("answers", Array(&Obj("dns_answer")), None),
                    ("query", Obj("dns_query"), None),
                    ("query_time", Int, None),
                    ("rcode", Str, None),
                    ("rcode_id", Int, None),
                    ("response_time", Int, None),
                ],
            ],
            required: &[],
            profile_required: &[("security_control", "action_id")],
        },
    ),
    (
        1008,
        Def {
            name: "event_log",
            attrs: &[
                BASE_EVENT,
                &[
                    ("log_name", Str, None),
                    ("log_provider", Str, None),
                    ("log_type", Str, None),
                    ("log_type_id", Int, None),
                    ("dst_endpoint", Obj("network_endpoint"), None),
                    ("src_endpoint", Obj("network_endpoint"), None),
                ],
            ],
            required: &[],
            profile_required: &[],
        },
    ),
];

const OBJECTS: &[Def] = &[
    Def {
        name: "metadata",
        attrs: &[&[
            ("correlation_uid", Str, None),
            ("log_name", Str, None),
            ("product", Obj("product"), None),
            ("profiles", Array(&Str), None),
            ("sequence", Int, None),
            ("uid", Str, None),
            ("version", Str, None),
        ]],
        required: &["product", "version"],
        profile_required: &[],
    },
    Def {
        name: "product",
        attrs: &[&[
            ("name", Str, None),
            ("uid", Str, None),
            ("vendor_name", Str, None),
            ("version", Str, None),
        ]],
        required: &["vendor_name"],
        profile_required: &[],
    },
    Def {
        name: "device",
        attrs: &[&[
            ("hostname", Str, None),
            ("ip", Str, None),
            ("name", Str, None),
            ("type", Str, None),
            ("type_id", Int, None),
            ("uid", Str, None),
        ]],
        required: &["type_id"],
        profile_required: &[],
    },
    Def {
        name: "actor",
        attrs: &[&[
            ("process", Obj("process"), None),
            ("user", Obj("user"), None),
        ]],
        required: &[],
        profile_required: &[],
    },
    Def {
        name: "process",
        attrs: &[&[
            ("cmd_line", Str, None),
            ("name", Str, None),
            ("pid", Int, None),
            ("tid", Int, None),
            ("uid", Str, None),
            ("user", Obj("user"), None),
            ("container", Obj("container"), Some("container")),
        ]],
        required: &[],
        profile_required: &[],
    },
    Def {
        name: "user",
        attrs: &[&[("name", Str, None), ("uid", Str, None)]],
        required: &[],
        profile_required: &[],
    },
    Def {
        name: "container",
        attrs: &[&[
            ("name", Str, None),
            ("orchestrator", Str, None),
            ("pod_uuid", Str, None),
            ("runtime", Str, None),
            ("uid", Str, None),
        ]],
        required: &[],
        profile_required: &[],
    },
    Def {
        name: "network_endpoint",
        attrs: &[&[
            ("hostname", Str, None),
            ("ip", Str, None),
            ("name", Str, None),
            ("port", Int, None),
            ("uid", Str, None),
        ]],
        required: &[],
        profile_required: &[],
    },
    Def {
        name: "network_connection_info",
        attrs: &[&[
            ("direction", Str, None),
            ("direction_id", Int, None),
            ("protocol_name", Str, None),
            ("protocol_num", Int, None),
            ("protocol_ver_id", Int, None),
            ("uid", Str, None),
        ]],
        required: &["direction_id"],
        profile_required: &[],
    },
    Def {
        name: "firewall_rule",
        attrs: &[&[
            ("name", Str, None),
            ("uid", Str, None),
            ("category", Str, None),
        ]],
        required: &[],
        profile_required: &[],
    },
    Def {
        name: "authorization",
        attrs: &[&[("decision", Str, None), ("policy", Obj("policy"), None)]],
        required: &[],
        profile_required: &[],
    },
    Def {
        name: "policy",
        attrs: &[&[
            ("desc", Str, None),
            ("group", Obj("group"), None),
            ("name", Str, None),
            ("uid", Str, None),
            ("version", Str, None),
        ]],
        required: &[],
        profile_required: &[],
    },
    Def {
        name: "group",
        attrs: &[&[
            ("desc", Str, None),
            ("domain", Str, None),
            ("name", Str, None),
            ("privileges", Array(&Str), None),
            ("type", Str, None),
            ("uid", Str, None),
        ]],
        required: &[],
        profile_required: &[],
    },
    Def {
        name: "dns_query",
        attrs: &[&[
            ("class", Str, None),
            ("hostname", Str, None),
            ("type", Str, None),
        ]],
        required: &["hostname"],
        profile_required: &[],
    },
    Def {
        name: "dns_answer",
        attrs: &[&[
            ("class", Str, None),
            ("rdata", Str, None),
            ("ttl", Int, None),
            ("type", Str, None),
        ]],
        required: &["rdata"],
        profile_required: &[],
    },
];

/// `(id attribute, caption attribute, (id, caption) pairs)`.
type Enum = (&'static str, &'static str, &'static [(u64, &'static str)]);

/// The enums the events use, with their 1.3.0 captions. Per class for
/// `activity_id`.
const ENUMS: &[Enum] = &[
    (
        "action_id",
        "action",
        &[(0, "Unknown"), (1, "Allowed"), (2, "Denied"), (99, "Other")],
    ),
    (
        "disposition_id",
        "disposition",
        &[
            (0, "Unknown"),
            (1, "Allowed"),
            (2, "Blocked"),
            (3, "Quarantined"),
            (4, "Isolated"),
            (5, "Deleted"),
            (6, "Dropped"),
            (7, "Custom Action"),
            (8, "Approved"),
            (9, "Restored"),
            (10, "Exonerated"),
            (11, "Corrected"),
            (12, "Partially Corrected"),
            (13, "Uncorrected"),
            (14, "Delayed"),
            (15, "Detected"),
            (16, "No Action"),
            (17, "Logged"),
            (18, "Tagged"),
            (19, "Alert"),
            (20, "Count"),
            (21, "Reset"),
            (22, "Captcha"),
            (23, "Challenge"),
            (24, "Access Revoked"),
            (25, "Rejected"),
            (26, "Unauthorized"),
            (27, "Error"),
            (99, "Other"),
        ],
    ),
    (
        "severity_id",
        "severity",
        &[
            (0, "Unknown"),
            (1, "Informational"),
            (2, "Low"),
            (3, "Medium"),
            (4, "High"),
            (5, "Critical"),
            (6, "Fatal"),
            (99, "Other"),
        ],
    ),
    (
        "status_id",
        "status",
        &[
            (0, "Unknown"),
            (1, "Success"),
            (2, "Failure"),
            (99, "Other"),
        ],
    ),
    (
        "direction_id",
        "direction",
        &[
            (0, "Unknown"),
            (1, "Inbound"),
            (2, "Outbound"),
            (3, "Lateral"),
            (99, "Other"),
        ],
    ),
    (
        "rcode_id",
        "rcode",
        &[
            (0, "NoError"),
            (1, "FormError"),
            (2, "ServError"),
            (3, "NXDomain"),
            (4, "NotImp"),
            (5, "Refused"),
            (6, "YXDomain"),
            (7, "YXRRSet"),
            (8, "NXRRSet"),
            (9, "NotAuth"),
            (10, "NotZone"),
            (11, "DSOTYPENI"),
            (16, "BADVERS"),
            (17, "BADKEY"),
            (18, "BADTIME"),
            (19, "BADMODE"),
            (20, "BADNAME"),
            (21, "BADALG"),
            (22, "BADTRUNC"),
            (23, "BADCOOKIE"),
            (24, "Unassigned"),
            (25, "Reserved"),
        ],
    ),
];

const ACTIVITIES: &[(u64, &[(u64, &str)])] = &[
    (
        4001,
        &[
            (0, "Unknown"),
            (1, "Open"),
            (2, "Close"),
            (3, "Reset"),
            (4, "Fail"),
            (5, "Refuse"),
            (6, "Traffic"),
            (7, "Listen"),
        ],
    ),
    (
        4003,
        &[
            (0, "Unknown"),
            (1, "Query"),
            (2, "Response"),
            (6, "Traffic"),
        ],
    ),
    // Event Log Activity; 99 (Other) carries a name of the source's.
    (1008, &[(0, "Unknown")]),
];

/// Enums with only ids in these events.
const ID_ONLY: &[(&str, &[u64])] = &[
    ("protocol_ver_id", &[0, 4, 6, 99]),
    (
        "type_id",
        &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 99],
    ),
];

fn object(name: &str) -> &'static Def {
    OBJECTS
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no object {name} in the test schema"))
}

/// Checks `value` against `def`; `path` names it in failures.
fn check(def: &Def, value: &Map<String, Value>, profiles: &[&str], path: &str) {
    for (key, v) in value {
        let attr = def
            .attrs
            .iter()
            .flat_map(|attrs| attrs.iter())
            .find(|(name, _, _)| name == key)
            .unwrap_or_else(|| panic!("{path}.{key}: not an attribute of {}", def.name));
        if let Some(profile) = attr.2 {
            assert!(
                profiles.contains(&profile),
                "{path}.{key}: profile {profile} is not declared"
            );
        }
        check_type(attr.1, v, profiles, &format!("{path}.{key}"));
    }
    let profile_required = def
        .profile_required
        .iter()
        .filter(|(profile, _)| profiles.contains(profile))
        .map(|(_, attr)| attr);
    for required in def.required.iter().chain(profile_required) {
        assert!(
            value.contains_key(*required),
            "{path}: {required} is required"
        );
    }
    check_enums(value, path);
}

fn check_type(ty: Type, value: &Value, profiles: &[&str], path: &str) {
    match ty {
        Int => assert!(
            value.is_u64() || value.is_i64(),
            "{path}: not an integer: {value}"
        ),
        Str => assert!(value.is_string(), "{path}: not a string: {value}"),
        Json => assert!(value.is_object(), "{path}: not an object: {value}"),
        Obj(name) => {
            let map = value
                .as_object()
                .unwrap_or_else(|| panic!("{path}: not an object: {value}"));
            check(object(name), map, profiles, path);
        }
        Array(item) => {
            let items = value
                .as_array()
                .unwrap_or_else(|| panic!("{path}: not an array: {value}"));
            for (i, item_value) in items.iter().enumerate() {
                check_type(*item, item_value, profiles, &format!("{path}[{i}]"));
            }
        }
    }
}

fn check_enums(value: &Map<String, Value>, path: &str) {
    for (id_key, caption_key, values) in ENUMS {
        if let Some(id) = value.get(*id_key) {
            let id = id.as_u64().unwrap();
            let caption = value.get(*caption_key).and_then(Value::as_str);
            match values.iter().find(|(v, _)| *v == id) {
                Some((_, want)) => assert_eq!(caption, Some(*want), "{path}.{caption_key}"),
                // "Other": the caption is the source's own.
                None => assert!(id == 99 && caption.is_some(), "{path}.{id_key}: {id}"),
            }
        }
    }
    for (key, ids) in ID_ONLY {
        if let Some(id) = value.get(*key) {
            assert!(ids.contains(&id.as_u64().unwrap()), "{path}.{key}: {id}");
        }
    }
}

fn check_event(event: &Value, name: &str) {
    let event = event.as_object().unwrap();
    let class_uid = event["class_uid"].as_u64().unwrap();
    let (_, class) = CLASSES
        .iter()
        .find(|(uid, _)| *uid == class_uid)
        .unwrap_or_else(|| panic!("{name}: class {class_uid} is not one of ours"));
    let metadata = &event["metadata"];
    assert_eq!(metadata["version"], "1.3.0", "{name}");
    let profiles: Vec<&str> = metadata["profiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    check(class, event, &profiles, name);
    for required in BASE_REQUIRED {
        assert!(
            event.contains_key(*required),
            "{name}: {required} is required"
        );
    }
    let activity_id = event["activity_id"].as_u64().unwrap();
    assert_eq!(
        event["type_uid"].as_u64(),
        Some(class_uid * 100 + activity_id),
        "{name}: type_uid"
    );
    assert_eq!(
        event["category_uid"].as_u64(),
        Some(class_uid / 1000),
        "{name}: category_uid"
    );
    let (_, activities) = ACTIVITIES
        .iter()
        .find(|(uid, _)| *uid == class_uid)
        .unwrap();
    let activity_name = event["activity_name"].as_str();
    match activities.iter().find(|(id, _)| *id == activity_id) {
        Some((_, caption)) => assert_eq!(activity_name, Some(*caption), "{name}"),
        None => assert!(activity_id == 99 && activity_name.is_some(), "{name}"),
    }
    assert_eq!(metadata["product"]["name"], "Tollgate", "{name}");
}

#[test]
fn events_fit_the_ocsf_1_3_schema() {
    for (name, fixture) in fixtures::all() {
        let event: Value = serde_json::from_str(&render(Format::Ocsf, &fixture)).unwrap();
        check_event(&event, name);
    }
}

#[test]
fn the_schema_check_catches_mistakes() {
    let (_, fixture) = fixtures::golden().remove(0);
    let good: Value = serde_json::from_str(&render(Format::Ocsf, &fixture)).unwrap();
    let mistakes: [Mistake; 6] = [
        ("an unknown attribute", |e| {
            e["actor"]["process"]["comm"] = "curl".into()
        }),
        ("a missing required attribute", |e| {
            e.as_object_mut().unwrap().remove("dst_endpoint");
        }),
        ("a wrong type", |e| {
            e["actor"]["process"]["user"]["uid"] = 1000.into()
        }),
        ("a caption that does not match", |e| {
            e["disposition"] = "Allowed".into()
        }),
        ("a wrong type_uid", |e| e["type_uid"] = 400106.into()),
        ("an undeclared profile", |e| {
            e["metadata"]["profiles"] = serde_json::json!(["host", "security_control"]);
        }),
    ];
    for (mistake, make) in mistakes {
        let mut event = good.clone();
        make(&mut event);
        let caught = std::panic::catch_unwind(|| check_event(&event, mistake)).is_err();
        assert!(caught, "{mistake} went unnoticed");
    }
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
        check_event(&event, "policy source");
        assert!(event["unmapped"].get("policy_source").is_none(), "mapped");
    }
}
