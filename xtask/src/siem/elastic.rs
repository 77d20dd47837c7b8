//! Elastic: the index template, component templates and ILM policy of
//! deploy/siem/elastic.

use std::{collections::BTreeMap, path::Path};

use anyhow::bail;
use serde_json::Value;

use super::{SIEM, all_leaves, files_with_extension, prefixed, read_json};

/// The elasticBulk sink's default index (agent/src/export/config.rs).
const ELASTIC_DEFAULT_INDEX: &str = "logs-tollgate-default";

pub(super) fn check(root: &Path, ecs: &[Value]) -> anyhow::Result<Vec<String>> {
    let dir = root.join(SIEM).join("elastic");
    let stem = |path: &Path| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut components = BTreeMap::new();
    for file in files_with_extension(&dir.join("_component_template"), "json")? {
        components.insert(stem(&file), read_json(&file)?);
    }
    let policies: BTreeMap<String, Value> = files_with_extension(&dir.join("_ilm/policy"), "json")?
        .iter()
        .map(|file| Ok((stem(file), read_json(file)?)))
        .collect::<anyhow::Result<_>>()?;
    let templates = files_with_extension(&dir.join("_index_template"), "json")?;
    let [template] = templates.as_slice() else {
        bail!("elastic/_index_template must hold one index template");
    };
    let config = std::fs::read_to_string(root.join("agent/src/export/config.rs"))?;
    if !config.contains(&format!("\"{ELASTIC_DEFAULT_INDEX}\"")) {
        bail!("agent/src/export/config.rs no longer defaults the index to {ELASTIC_DEFAULT_INDEX}");
    }
    let mut problems = template_problems(&read_json(template)?, &components, &policies);
    for (name, component) in &components {
        problems.extend(prefixed(name, mapping_problems(component, ecs)));
    }
    Ok(problems)
}

/// The index template takes the sink's default data stream, builds on
/// ecs@mappings and every component here, and names an ILM policy here
/// that rolls over and deletes.
fn template_problems<'t>(
    template: &'t Value,
    components: &BTreeMap<String, Value>,
    policies: &BTreeMap<String, Value>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let strings = |list: &'t Value| -> Vec<&'t str> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect()
    };
    let patterns = strings(&template["index_patterns"]);
    if !patterns
        .iter()
        .any(|p| glob_matches(p, ELASTIC_DEFAULT_INDEX))
    {
        problems.push(format!(
            "index_patterns {patterns:?} do not take the sink's default {ELASTIC_DEFAULT_INDEX}"
        ));
    }
    if !template["data_stream"].is_object() {
        problems.push(
            "the index template needs data_stream: {} (the sink writes a data stream)".into(),
        );
    }
    // The built-in logs template (logs-*-*) has priority 100.
    if template["priority"].as_u64().is_none_or(|p| p <= 100) {
        problems.push(
            "the index template's priority must be above the built-in logs template's 100".into(),
        );
    }
    let composed = strings(&template["composed_of"]);
    for needed in components
        .keys()
        .map(String::as_str)
        .chain(["ecs@mappings"])
    {
        if !composed.contains(&needed) {
            problems.push(format!("the index template is not composed of {needed}"));
        }
    }
    let policy = template["template"]["settings"]["index.lifecycle.name"].as_str();
    match policy.and_then(|name| policies.get(name)) {
        None => problems.push(format!(
            "index.lifecycle.name {policy:?} is no policy of elastic/_ilm/policy"
        )),
        Some(policy) => {
            let phases = &policy["policy"]["phases"];
            if !phases["hot"]["actions"]["rollover"].is_object() {
                problems.push("the ILM policy must roll over in the hot phase".into());
            }
            if !phases["delete"]["actions"]["delete"].is_object() {
                problems.push("the ILM policy must have a delete phase".into());
            }
        }
    }
    problems
}

fn glob_matches(pattern: &str, name: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == name,
        Some((head, rest)) => {
            let Some(tail) = name.strip_prefix(head) else {
                return false;
            };
            (0..=tail.len()).any(|at| tail.is_char_boundary(at) && glob_matches(rest, &tail[at..]))
        }
    }
}

/// Explicit mappings by dotted path, with their types.
fn mapped_fields(properties: &Value, prefix: &str, out: &mut BTreeMap<String, String>) {
    for (name, mapping) in properties.as_object().into_iter().flatten() {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        if let Some(kind) = mapping["type"].as_str() {
            out.insert(path.clone(), kind.to_owned());
        }
        mapped_fields(&mapping["properties"], &path, out);
    }
}

/// Every `tollgate.*` leaf of the ECS records must be mapped explicitly
/// with a type that takes all its values; every explicit mapping must name
/// a leaf the records have.
fn mapping_problems(component: &Value, ecs: &[Value]) -> Vec<String> {
    let mut mapped = BTreeMap::new();
    mapped_fields(
        &component["template"]["mappings"]["properties"],
        "",
        &mut mapped,
    );
    let leaves = all_leaves(ecs, "");
    let mut problems = Vec::new();
    for (path, values) in &leaves {
        let kind = mapped.get(path);
        if path.starts_with("tollgate.") && kind.is_none() {
            problems.push(format!("{path} is not mapped explicitly"));
        }
        for value in values {
            if let Some(kind) = kind
                && !elastic_type_takes(kind, value)
            {
                problems.push(format!(
                    "{path} is mapped as {kind}, but a record has {value}"
                ));
            }
        }
    }
    for path in mapped.keys() {
        if !leaves.contains_key(path) {
            problems.push(format!("{path} is mapped, but no record has it"));
        }
    }
    problems
}

fn elastic_type_takes(kind: &str, value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(_) => kind == "boolean",
        Value::Number(n) if n.is_u64() => {
            matches!(kind, "unsigned_long" | "keyword" | "double")
                || (kind == "long" && n.as_i64().is_some())
        }
        Value::Number(n) if n.is_i64() => matches!(kind, "long" | "keyword" | "double"),
        Value::Number(_) => matches!(kind, "double" | "float" | "scaled_float"),
        Value::String(s) => match kind {
            "keyword" | "constant_keyword" | "wildcard" | "text" | "match_only_text" => true,
            "ip" => s.parse::<std::net::IpAddr>().is_ok(),
            // RFC 3339 with up to nine fractional digits, as the records write it.
            "date" | "date_nanos" => is_rfc3339(s),
            _ => false,
        },
        Value::Array(_) | Value::Object(_) => false,
    }
}

fn is_rfc3339(s: &str) -> bool {
    let bytes = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        bytes
            .get(range)
            .is_some_and(|b| b.iter().all(u8::is_ascii_digit))
    };
    let fraction = s.get(19..).unwrap_or_default();
    let fraction_ok = match fraction.strip_suffix('Z') {
        Some("") => true,
        Some(f) => f
            .strip_prefix('.')
            .is_some_and(|d| (1..=9).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    };
    digits(0..4)
        && s.get(4..5) == Some("-")
        && digits(5..7)
        && s.get(7..8) == Some("-")
        && digits(8..10)
        && s.get(10..11) == Some("T")
        && digits(11..13)
        && digits(14..16)
        && digits(17..19)
        && fraction_ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::siem::tests::{golden, has, root};

    fn elastic_json(path: &str) -> Value {
        read_json(&root().join(SIEM).join("elastic").join(path)).unwrap()
    }

    #[test]
    fn every_tollgate_field_is_mapped_with_a_type_that_takes_it() {
        let ecs = golden("ecs.jsonl");
        let component = elastic_json("_component_template/tollgate@mappings.json");
        assert_eq!(mapping_problems(&component, &ecs), Vec::<String>::new());

        // The problems once the mapping of tollgate.<field> is `mapping`
        // (null: none).
        let with = |field: &str, mapping: Value| {
            let mut changed = component.clone();
            let fields = changed
                .pointer_mut("/template/mappings/properties/tollgate/properties")
                .and_then(Value::as_object_mut)
                .unwrap();
            match mapping {
                Value::Null => fields.remove(field),
                mapping => fields.insert(field.to_owned(), mapping),
            };
            mapping_problems(&changed, &ecs)
        };
        let typed = |kind: &str| serde_json::json!({ "type": kind });
        let cases = [
            ("hook", Value::Null, "tollgate.hook is not mapped"),
            (
                "learned",
                typed("long"),
                "tollgate.learned is mapped as long",
            ),
            ("cgroup", typed("ip"), "tollgate.cgroup is mapped as ip"),
            (
                "verdicts",
                typed("keyword"),
                "tollgate.verdicts is mapped, but no record has it",
            ),
        ];
        for (field, mapping, expected) in cases {
            assert!(has(&with(field, mapping), expected), "{expected}");
        }
    }

    #[test]
    fn the_index_template_takes_the_sinks_stream_with_its_parts() {
        let template = elastic_json("_index_template/logs-tollgate.json");
        let components = BTreeMap::from([(
            "tollgate@mappings".to_owned(),
            elastic_json("_component_template/tollgate@mappings.json"),
        )]);
        let policies = BTreeMap::from([(
            "tollgate-logs".to_owned(),
            elastic_json("_ilm/policy/tollgate-logs.json"),
        )]);
        assert_eq!(
            template_problems(&template, &components, &policies),
            Vec::<String>::new()
        );

        let changed = |pointer: &str, value: Value| {
            let mut changed = template.clone();
            *changed.pointer_mut(pointer).unwrap() = value;
            template_problems(&changed, &components, &policies)
        };
        assert!(has(
            &changed("/index_patterns", serde_json::json!(["logs-tollgate"])),
            "do not take"
        ));
        assert!(has(&changed("/data_stream", Value::Null), "data_stream"));
        assert!(has(&changed("/priority", 100.into()), "priority"));
        assert!(has(
            &changed("/composed_of", serde_json::json!(["ecs@mappings"])),
            "not composed of tollgate@mappings"
        ));
        assert!(has(
            &changed("/template/settings/index.lifecycle.name", "logs".into()),
            "no policy"
        ));
        let mut no_delete = policies.clone();
        no_delete.get_mut("tollgate-logs").unwrap()["policy"]["phases"]
            .as_object_mut()
            .unwrap()
            .remove("delete");
        assert!(has(
            &template_problems(&template, &components, &no_delete),
            "delete phase"
        ));
    }

    #[test]
    fn values_match_elastic_types_as_elasticsearch_parses_them() {
        assert!(glob_matches("logs-tollgate-*", "logs-tollgate-default"));
        assert!(!glob_matches("logs-tollgate-*", "logs-other-default"));
        assert!(glob_matches("logs-*-*", "logs-tollgate-default"));
        assert!(is_rfc3339("2026-11-24T08:11:30.808267752Z"));
        assert!(is_rfc3339("2026-11-24T08:11:30Z"));
        assert!(!is_rfc3339("2026-11-24 08:11:30Z"));
        assert!(!is_rfc3339("2026-11-24T08:11:30.8082677521Z"));
        assert!(elastic_type_takes("unsigned_long", &u64::MAX.into()));
        assert!(!elastic_type_takes("long", &u64::MAX.into()));
        assert!(elastic_type_takes("ip", &"2001:db8::1".into()));
        assert!(!elastic_type_takes("ip", &"payments".into()));
    }
}
