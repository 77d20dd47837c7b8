//! Format tests: golden files, and a schema check per format.
//!
//! The golden files hold every golden fixture (`fixtures::golden`) in one
//! format, one record per line. After an intended change, rewrite them
//! from the code and review the diff:
//! `UPDATE_GOLDEN=1 cargo test -p tollgate-agent --lib export::format`.
//! The agent's version stands there as `@VERSION@`, so that a release
//! does not change them.

mod cef;
mod ecs;
mod fixtures;
mod ocsf;

use std::{env, fs, path::Path};

use super::{Format, policies_with_sources, unix_millis, write};

const GOLDEN: &[(Format, &str, &str)] = &[
    (
        Format::Json,
        "json.jsonl",
        include_str!("../golden/json.jsonl"),
    ),
    (
        Format::Ocsf,
        "ocsf.jsonl",
        include_str!("../golden/ocsf.jsonl"),
    ),
    (
        Format::Ecs,
        "ecs.jsonl",
        include_str!("../golden/ecs.jsonl"),
    ),
    (Format::Cef, "cef.txt", include_str!("../golden/cef.txt")),
];

const VERSION: &str = env!("CARGO_PKG_VERSION");
const VERSION_PLACEHOLDER: &str = "@VERSION@";

/// A named change to a good document that a schema check must catch.
type Mistake = (&'static str, fn(&mut serde_json::Value));

/// One rendered record.
fn render(format: Format, fixture: &fixtures::Fixture) -> String {
    let mut out = Vec::new();
    write(format, fixture.record(), fixtures::INSTANCE, &mut out);
    String::from_utf8(out).expect("formats write UTF-8")
}

#[test]
fn formats_match_the_golden_files() {
    let fixtures = fixtures::golden();
    for (name, fixture) in &fixtures {
        // Else the placeholder would stand for record data too.
        let json = render(Format::Json, fixture);
        assert!(!json.contains(VERSION), "{name}: holds the agent's version");
    }
    for &(format, file, golden) in GOLDEN {
        let lines: Vec<String> = fixtures
            .iter()
            .map(|(_, fixture)| render(format, fixture))
            .collect();
        if env::var_os("UPDATE_GOLDEN").is_some() {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("src/export/format/golden")
                .join(file);
            let text = lines.join("\n").replace(VERSION, VERSION_PLACEHOLDER) + "\n";
            fs::write(&path, text).unwrap();
            continue;
        }
        let golden = golden.replace(VERSION_PLACEHOLDER, VERSION);
        let golden: Vec<&str> = golden.lines().collect();
        assert_eq!(
            golden.len(),
            fixtures.len(),
            "{file}: one line per golden fixture"
        );
        for ((name, _), (line, want)) in fixtures.iter().zip(lines.iter().zip(golden)) {
            assert_eq!(line, want, "{file}, {name}: differs from the golden file");
        }
    }
}

#[test]
fn every_record_is_one_line_without_a_newline() {
    for (name, fixture) in fixtures::conformance() {
        for format in [Format::Json, Format::Ocsf, Format::Ecs, Format::Cef] {
            let line = render(format, &fixture);
            assert!(!line.is_empty(), "{format:?}, {name}");
            assert!(!line.contains(['\n', '\r']), "{format:?}, {name}: {line}");
        }
    }
}

#[test]
fn write_appends() {
    let (_, fixture) = fixtures::golden().remove(0);
    let mut out = b"before|".to_vec();
    write(Format::Json, fixture.record(), fixtures::INSTANCE, &mut out);
    assert!(out.starts_with(b"before|{\"type\":\"flow\""));
}

#[test]
fn json_is_the_record_as_serde_writes_it() {
    let flow = fixtures::denied_pod_flow();
    let mut out = Vec::new();
    write(
        Format::Json,
        crate::export::record::Record::Flow(&flow),
        fixtures::INSTANCE,
        &mut out,
    );
    assert_eq!(out, serde_json::to_vec(&flow).unwrap());
}

#[test]
fn destination_names_map_in_every_format_and_are_left_out_when_null() {
    use serde_json::Value;
    let mut named = fixtures::denied_pod_flow();
    named.dst.fqdn = Some("myregistry.azurecr.io");
    let unnamed = fixtures::denied_pod_flow();
    for (flow, want) in [(named, Some("myregistry.azurecr.io")), (unnamed, None)] {
        let fixture = fixtures::Fixture::Flow(flow);
        let json: Value = serde_json::from_str(&render(Format::Json, &fixture)).unwrap();
        assert_eq!(json["dst"]["fqdn"], serde_json::json!(want), "json");
        let ocsf: Value = serde_json::from_str(&render(Format::Ocsf, &fixture)).unwrap();
        assert_eq!(
            ocsf["dst_endpoint"].get("hostname").and_then(Value::as_str),
            want,
            "ocsf"
        );
        let ecs: Value = serde_json::from_str(&render(Format::Ecs, &fixture)).unwrap();
        assert_eq!(
            ecs["destination"].get("domain").and_then(Value::as_str),
            want,
            "ecs"
        );
        let cef = render(Format::Cef, &fixture);
        match want {
            Some(name) => assert!(cef.contains(&format!(" dhost={name} ")), "cef: {cef}"),
            None => assert!(!cef.contains("dhost="), "cef: {cef}"),
        }
    }
}

#[test]
fn json_gives_the_policy_source_beside_the_policy() {
    use serde_json::{Value, json};
    let golden = fixtures::golden();
    let cases = [
        (fixtures::denied_pod_flow(), json!("cluster")),
        (fixtures::local_policy_flow(), json!("local")),
    ];
    for (flow, want) in cases {
        let fixture = fixtures::Fixture::Flow(flow);
        let json: Value = serde_json::from_str(&render(Format::Json, &fixture)).unwrap();
        assert_eq!(json["policy_source"], want);
    }
    // A default of a local and a cluster policy; no policy at all.
    for (index, policy, want) in [
        (
            1,
            json!("host-allow-list,node-baseline"),
            json!("local,cluster"),
        ),
        (2, Value::Null, Value::Null),
    ] {
        let json: Value = serde_json::from_str(&render(Format::Json, &golden[index].1)).unwrap();
        assert_eq!((&json["policy"], &json["policy_source"]), (&policy, &want));
        let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
        assert!(
            keys.contains(&&"policy_source".to_string()),
            "always present"
        );
    }
}

#[test]
fn policy_sources_pair_with_policies() {
    let pairs = |policy, source| policies_with_sources(policy, source).collect::<Vec<_>>();
    assert_eq!(pairs("a", Some("cluster")), [("a", Some("cluster"))]);
    assert_eq!(
        pairs("a,b", Some("local")),
        [("a", Some("local")), ("b", Some("local"))],
        "one value for all"
    );
    assert_eq!(
        pairs("a,b,c", Some("local,cluster,local")),
        [
            ("a", Some("local")),
            ("b", Some("cluster")),
            ("c", Some("local"))
        ]
    );
    assert_eq!(pairs("a,b", None), [("a", None), ("b", None)]);
}

#[test]
fn formats_are_named_in_lowercase() {
    use clap::ValueEnum;
    for (name, format) in [
        ("json", Format::Json),
        ("ocsf", Format::Ocsf),
        ("ecs", Format::Ecs),
        ("cef", Format::Cef),
    ] {
        assert_eq!(
            serde_json::from_str::<Format>(&format!("\"{name}\"")).unwrap(),
            format
        );
        assert_eq!(Format::from_str(name, false).unwrap(), format);
    }
}

#[test]
fn record_times_become_epoch_milliseconds() {
    assert_eq!(
        unix_millis("2026-11-24T08:11:30.808267752Z"),
        1_795_507_890_808
    );
    assert_eq!(unix_millis("1970-01-01T00:00:00.000999999Z"), 0);
    assert_eq!(
        unix_millis("2024-02-29T23:59:59.999000000Z"),
        1_709_251_199_999
    );
    // Not what rfc3339_nanos writes: the epoch, not a panic.
    for bad in [
        "",
        "2026-11-24T08:11:30Z",
        "2026-13-24T08:11:30.808267752Z",
        "2026-11-24T08:11:30.8082677é2Z",
        "+026-11-24T08:11:30.808267752Z",
    ] {
        assert_eq!(unix_millis(bad), 0, "{bad}");
    }
}

#[test]
fn record_times_round_trip_through_rfc3339_nanos() {
    for nanos in [0i128, 1_500_000_000_123_456_789, 1_795_421_490_808_267_752] {
        let text = crate::flow::rfc3339_nanos(nanos);
        assert_eq!(i128::from(unix_millis(&text)), nanos / 1_000_000, "{text}");
    }
}

#[test]
fn loss_reasons_are_spelled_as_the_json_record_spells_them() {
    for reason in fixtures::LOSS_REASONS {
        assert_eq!(
            serde_json::to_value(reason).unwrap(),
            super::loss_reason(reason)
        );
    }
}
