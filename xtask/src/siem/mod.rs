//! The SIEM content (deploy/siem/) against the records the agent really
//! writes, its golden files (agent/src/export/format/golden/):
//!
//! - every JSON file parses;
//! - Sentinel: the DCR's stream declares exactly the native json record's
//!   top-level fields with their types, its transformation reads only
//!   fields the records have and uses only what DCR transformations allow,
//!   and produces exactly the table's columns; the queries and the analytics
//!   rule compile against the table. Kusto.Language, the parser of Azure
//!   Data Explorer and Log Analytics (npm @kusto/language-service-next,
//!   which scripts/setup.sh installs), run by node, analyzes the KQL;
//! - Splunk: the add-on's .conf files parse (Splunk's syntax, splunk.rs), every
//!   field they read is one the records of their sourcetype have, the CIM
//!   fields and tags of each data model are there, the lookup covers every
//!   verdict;
//! - Elastic: every `tollgate.*` field of the ECS records is mapped
//!   explicitly with a type that takes its values, every explicit mapping
//!   names a field the records have, and the index template applies to the
//!   elasticBulk sink's default data stream with the mappings and the ILM
//!   policy given here.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use serde_json::Value;

mod elastic;
mod sentinel;
mod splunk;

const SIEM: &str = "deploy/siem";
const GOLDEN: &str = "agent/src/export/format/golden";

pub fn check(root: &Path) -> anyhow::Result<()> {
    let siem = root.join(SIEM);
    let json_files = files_with_extension(&siem, "json")?;
    for file in &json_files {
        read_json(file)?;
    }
    let native = read_json_lines(&root.join(GOLDEN).join("json.jsonl"))?;
    let ecs = read_json_lines(&root.join(GOLDEN).join("ecs.jsonl"))?;

    let mut problems = Vec::new();
    problems.extend(prefixed("sentinel", sentinel::check(root, &native)?));
    problems.extend(prefixed("splunk", splunk::check(root, &native)?));
    problems.extend(prefixed("elastic", elastic::check(root, &ecs)?));
    if !problems.is_empty() {
        bail!(
            "the SIEM content does not fit the records:\n  {}",
            problems.join("\n  ")
        );
    }
    println!(
        "siem: {} JSON files parse; Sentinel, Splunk and Elastic content fit the golden records",
        json_files.len()
    );
    Ok(())
}

fn prefixed(what: &str, problems: Vec<String>) -> Vec<String> {
    problems
        .into_iter()
        .map(|p| format!("{what}: {p}"))
        .collect()
}

fn files_with_extension(dir: &Path, extension: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {dir:?}"))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == extension) {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    serde_json::from_str(&text).with_context(|| format!("{path:?} is not JSON"))
}

fn read_json_lines(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path:?}"))?;
    text.lines()
        .map(|line| serde_json::from_str(line).with_context(|| format!("a line of {path:?}")))
        .collect()
}

/// Every leaf of a record by its dotted path, with its JSON values
/// (elements for arrays). `array_marker` is appended to an array's name
/// ("{}" as Splunk names them, "" as Elasticsearch and KQL do).
fn leaves(record: &Value, array_marker: &str) -> BTreeMap<String, Vec<Value>> {
    fn walk(prefix: &str, value: &Value, marker: &str, out: &mut BTreeMap<String, Vec<Value>>) {
        match value {
            Value::Object(fields) => {
                for (name, value) in fields {
                    let path = if prefix.is_empty() {
                        name.clone()
                    } else {
                        format!("{prefix}.{name}")
                    };
                    walk(&path, value, marker, out);
                }
            }
            Value::Array(items) => {
                let path = format!("{prefix}{marker}");
                out.entry(path.clone()).or_default();
                for item in items {
                    walk(&path, item, marker, out);
                }
            }
            _ => out
                .entry(prefix.to_owned())
                .or_default()
                .push(value.clone()),
        }
    }
    let mut out = BTreeMap::new();
    walk("", record, array_marker, &mut out);
    out
}

/// The leaves of all records, merged.
fn all_leaves<'r>(
    records: impl IntoIterator<Item = &'r Value>,
    array_marker: &str,
) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for record in records {
        for (path, values) in leaves(record, array_marker) {
            out.entry(path).or_default().extend(values);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn root() -> PathBuf {
        crate::workspace_root()
    }

    pub(super) fn golden(format: &str) -> Vec<Value> {
        read_json_lines(&root().join(GOLDEN).join(format)).unwrap()
    }

    pub(super) fn has(problems: &[String], needle: &str) -> bool {
        problems.iter().any(|p| p.contains(needle))
    }

    #[test]
    #[ignore = "needs node and Kusto.Language (scripts/setup.sh); cargo xtask test runs it"]
    fn the_siem_content_fits_the_golden_records() {
        check(&root()).unwrap();
    }

    #[test]
    fn a_file_that_is_not_json_is_refused() {
        let dir = root().join("target/siem-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let broken = dir.join("broken.json");
        std::fs::write(&broken, "{\"index_patterns\": [\"logs-tollgate-*\"],}").unwrap();
        assert!(read_json(&broken).is_err());
    }
}
