//! Splunk: the add-on deploy/siem/splunk/TA-tollgate.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::Context;
use serde_json::Value;

use super::{SIEM, all_leaves, files_with_extension};

/// A Splunk .conf file: stanzas in order, each with its settings. The
/// syntax (Splunk's "About configuration files"): `[stanza]` headers,
/// `key = value` settings, `#` comment lines, a trailing `\` continuing a
/// value on the next line; settings before the first stanza are in the
/// default stanza, named "". A key or stanza given twice is refused here:
/// Splunk would quietly keep the last.
#[derive(Debug, Default)]
struct Conf {
    stanzas: Vec<(String, Vec<(String, String)>)>,
}

impl Conf {
    fn parse(text: &str) -> Result<Conf, String> {
        let mut conf = Conf::default();
        let mut lines = text.lines().enumerate();
        while let Some((index, line)) = lines.next() {
            let number = index + 1;
            let mut line = line.trim().to_owned();
            while line.ends_with('\\') {
                line.pop();
                let Some((_, next)) = lines.next() else {
                    return Err(format!("line {number}: continued past the end"));
                };
                line = format!("{line}\n{}", next.trim());
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(header) = line.strip_prefix('[') {
                let Some(name) = header.strip_suffix(']') else {
                    return Err(format!("line {number}: a stanza header without ]"));
                };
                if conf.stanzas.iter().any(|(n, _)| n == name) {
                    return Err(format!("line {number}: stanza [{name}] again"));
                }
                conf.stanzas.push((name.to_owned(), Vec::new()));
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(format!("line {number}: neither a stanza nor key = value"));
            };
            let key = key.trim();
            if key.is_empty() || key.contains(char::is_whitespace) {
                return Err(format!("line {number}: bad key {key:?}"));
            }
            if conf.stanzas.is_empty() {
                conf.stanzas.push((String::new(), Vec::new()));
            }
            let (stanza, settings) = conf.stanzas.last_mut().expect("just made");
            if settings.iter().any(|(k, _)| k == key) {
                return Err(format!("line {number}: {key} again in [{stanza}]"));
            }
            settings.push((key.to_owned(), value.trim().to_owned()));
        }
        Ok(conf)
    }

    fn stanza(&self, name: &str) -> Option<&[(String, String)]> {
        self.stanzas
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, settings)| settings.as_slice())
    }
}

fn get<'s>(settings: &'s [(String, String)], key: &str) -> Option<&'s str> {
    settings
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The CIM fields each sourcetype must have (CIM 5 Network Traffic and
/// Network Resolution), and the tags that put its event type in the model.
const CIM: [(&str, &str, &[&str], &[&str]); 2] = [
    (
        "flow",
        "tollgate_flow",
        &[
            "action",
            "app",
            "dest",
            "dest_ip",
            "dest_port",
            "direction",
            "dvc",
            "rule",
            "src",
            "transport",
            "user",
            "vendor_product",
        ],
        &["network", "communicate"],
    ),
    (
        "dns",
        "tollgate_dns",
        &[
            "answer",
            "dest",
            "dest_port",
            "message_type",
            "query",
            "query_type",
            "record_type",
            "reply_code",
            "src",
            "vendor_product",
        ],
        &["network", "resolution", "dns"],
    ),
];
/// The values CIM Network Traffic allows in `action`.
const CIM_ACTIONS: [&str; 3] = ["allowed", "blocked", "teardown"];
const PROPS_KEYS: [&str; 4] = ["KV_MODE", "SHOULD_LINEMERGE", "category", "description"];
const PROPS_CLASSES: [&str; 3] = ["LOOKUP-", "FIELDALIAS-", "EVAL-"];

pub(super) fn check(root: &Path, native: &[Value]) -> anyhow::Result<Vec<String>> {
    let addon = root.join(SIEM).join("splunk/TA-tollgate");
    let mut parsed = BTreeMap::new();
    let mut files = files_with_extension(&addon, "conf")?;
    files.extend(files_with_extension(&addon, "meta")?);
    for path in files {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path:?}"))?;
        let conf = Conf::parse(&text).map_err(|e| anyhow::anyhow!("{path:?}: {e}"))?;
        parsed.insert(path.strip_prefix(&addon)?.display().to_string(), conf);
    }
    let mut confs = BTreeMap::new();
    for name in ["app", "props", "transforms", "eventtypes", "tags"] {
        let conf = parsed
            .remove(&format!("default/{name}.conf"))
            .with_context(|| format!("the add-on has no default/{name}.conf"))?;
        confs.insert(name, conf);
    }
    let mut problems = addon_problems(&confs, native, &|file| {
        std::fs::read_to_string(addon.join("lookups").join(file)).ok()
    });
    let version = workspace_version(root)?;
    let app_version = confs["app"]
        .stanza("launcher")
        .and_then(|s| get(s, "version"));
    if app_version != Some(version.as_str()) {
        problems.push(format!(
            "app.conf [launcher] version is {app_version:?}, the workspace's is {version}"
        ));
    }
    Ok(problems)
}

fn workspace_version(root: &Path) -> anyhow::Result<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    let package = manifest
        .split("[workspace.package]")
        .nth(1)
        .context("Cargo.toml has no [workspace.package]")?;
    package
        .lines()
        .find_map(|line| line.strip_prefix("version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .context("[workspace.package] has no version")
}

/// The add-on against the native records; `lookup` reads a file of
/// lookups/.
fn addon_problems(
    confs: &BTreeMap<&str, Conf>,
    native: &[Value],
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let props = &confs["props"];
    let mut record_types: BTreeSet<&str> = BTreeSet::new();
    for record in native {
        record_types.extend(record["type"].as_str());
    }
    for record_type in &record_types {
        let sourcetype = format!("tollgate:{record_type}");
        let records: Vec<&Value> = native
            .iter()
            .filter(|r| r["type"] == *record_type)
            .collect();
        let fields = all_leaves(records.iter().copied(), "{}");
        let Some(settings) = props.stanza(&sourcetype) else {
            problems.push(format!("props.conf has no [{sourcetype}]"));
            continue;
        };
        if get(settings, "KV_MODE") != Some("json") {
            problems.push(format!("[{sourcetype}] needs KV_MODE = json"));
        }
        let mut available: BTreeSet<String> = fields.keys().cloned().collect();
        // Fields an EVAL or alias would overwrite: the record's own value
        // would no longer be searchable.
        let mut hidden = Vec::new();
        for (key, value) in settings {
            let reads = match PROPS_CLASSES.iter().find(|class| key.starts_with(*class)) {
                Some(&"EVAL-") => {
                    let target = &key["EVAL-".len()..];
                    hidden.extend(fields.contains_key(target).then(|| target.to_owned()));
                    available.insert(target.to_owned());
                    eval_fields(value)
                }
                Some(&"FIELDALIAS-") => field_aliases(value).map(|aliases| {
                    for (_, to) in &aliases {
                        hidden.extend(fields.contains_key(to).then(|| to.clone()));
                        available.insert(to.clone());
                    }
                    aliases.into_iter().map(|(from, _)| from).collect()
                }),
                Some(_) => lookup_problems(confs, value, &fields, lookup, &mut available),
                None if PROPS_KEYS.contains(&key.as_str()) => Ok(Vec::new()),
                None => Err(format!("unknown setting {key}")),
            };
            match reads {
                Ok(reads) => {
                    for field in reads {
                        if !fields.contains_key(&field) {
                            problems.push(format!(
                                "[{sourcetype}] {key} reads {field}, which no {record_type} record has"
                            ));
                        }
                    }
                }
                Err(e) => problems.push(format!("[{sourcetype}] {key}: {e}")),
            }
        }
        for field in hidden {
            problems.push(format!(
                "[{sourcetype}] sets {field}, which hides the {record_type} record's own {field}"
            ));
        }
        for (model_type, eventtype, cim_fields, tags) in CIM {
            if model_type != *record_type {
                continue;
            }
            for field in cim_fields {
                if !available.contains(*field) {
                    problems.push(format!("[{sourcetype}] lacks CIM field {field}"));
                }
            }
            let tagged = confs["tags"].stanza(&format!("eventtype={eventtype}"));
            for tag in tags {
                if tagged.and_then(|s| get(s, tag)) != Some("enabled") {
                    problems.push(format!(
                        "tags.conf: eventtype {eventtype} needs tag {tag} for the CIM"
                    ));
                }
            }
        }
    }
    problems.extend(eventtype_problems(confs, native));
    problems
}

/// The fields an eval expression reads: every field must be single-quoted
/// (the records' names hold dots), so a bare word is a mistake unless it
/// calls a function or is an operator.
fn eval_fields(expression: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = expression.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                while let Some(d) = chars.next() {
                    match d {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '\'' => {
                let field: String = chars.by_ref().take_while(|&d| d != '\'').collect();
                fields.push(field);
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut word = String::from(c);
                while let Some(&d) = chars.peek() {
                    if d.is_alphanumeric() || d == '_' {
                        word.push(d);
                        chars.next();
                    } else {
                        break;
                    }
                }
                let calls = chars.peek() == Some(&'(');
                if !calls && !["AND", "OR", "NOT", "LIKE"].contains(&word.as_str()) {
                    return Err(format!("bare word {word}: quote fields as 'name'"));
                }
            }
            _ => {}
        }
    }
    Ok(fields)
}

/// `from AS to from AS to ...` pairs.
fn field_aliases(value: &str) -> Result<Vec<(String, String)>, String> {
    let words: Vec<&str> = value.split_whitespace().collect();
    if words.is_empty() || !words.len().is_multiple_of(3) {
        return Err("expected <field> AS <alias> ...".into());
    }
    words
        .chunks(3)
        .map(|group| match group {
            [from, "AS" | "ASNEW", to] => Ok(((*from).to_owned(), (*to).to_owned())),
            _ => Err(format!(
                "expected <field> AS <alias>, got {}",
                group.join(" ")
            )),
        })
        .collect()
}

/// `LOOKUP-x = <transform> <input>... OUTPUT <output>...`: the transform
/// must name a lookup file with those columns, and a row for every value
/// the records have in the input, and CIM's values in `action`. Returns
/// the input fields.
fn lookup_problems(
    confs: &BTreeMap<&str, Conf>,
    value: &str,
    fields: &BTreeMap<String, Vec<Value>>,
    lookup: &dyn Fn(&str) -> Option<String>,
    available: &mut BTreeSet<String>,
) -> Result<Vec<String>, String> {
    let words: Vec<&str> = value.split_whitespace().collect();
    let usage = || "expected <lookup> <input>... OUTPUT <output>...".to_owned();
    let output_at = words
        .iter()
        .position(|w| *w == "OUTPUT")
        .filter(|at| *at >= 2 && *at + 1 < words.len())
        .ok_or_else(usage)?;
    let (name, inputs, outputs) = (words[0], &words[1..output_at], &words[output_at + 1..]);
    available.extend(outputs.iter().map(|o| (*o).to_owned()));
    let Some(file) = confs["transforms"]
        .stanza(name)
        .and_then(|s| get(s, "filename"))
    else {
        return Err(format!("transforms.conf has no [{name}] with a filename"));
    };
    let Some(table) = lookup(file) else {
        return Err(format!("lookups/{file} is missing"));
    };
    let mut rows = table
        .lines()
        .map(|line| line.split(',').collect::<Vec<_>>());
    let header = rows.next().unwrap_or_default();
    let rows: Vec<Vec<&str>> = rows.collect();
    for column in inputs.iter().chain(outputs) {
        let Some(at) = header.iter().position(|h| h == column) else {
            return Err(format!("lookups/{file} has no column {column}"));
        };
        if rows.iter().any(|row| row.len() != header.len()) {
            return Err(format!(
                "lookups/{file}: a row without {} columns",
                header.len()
            ));
        }
        if inputs.contains(column) {
            for value in fields.get(*column).into_iter().flatten() {
                let value = value.as_str().unwrap_or_default();
                if !rows.iter().any(|row| row[at] == value) {
                    return Err(format!("lookups/{file} has no row for {column} {value}"));
                }
            }
        }
        if *column == "action"
            && let Some(bad) = rows.iter().find(|r| !CIM_ACTIONS.contains(&r[at]))
        {
            return Err(format!(
                "lookups/{file}: action {} is not one of CIM's {CIM_ACTIONS:?}",
                bad[at]
            ));
        }
    }
    Ok(inputs.iter().map(|i| (*i).to_owned()).collect())
}

/// Each event type searches `sourcetype="tollgate:<type>"` of a record
/// type props.conf knows, and its other `field="value"` terms name fields
/// and values those records have; tags are given to known event types.
fn eventtype_problems(confs: &BTreeMap<&str, Conf>, native: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let eventtypes = &confs["eventtypes"];
    for (name, settings) in &eventtypes.stanzas {
        let Some(search) = get(settings, "search") else {
            problems.push(format!("eventtypes.conf: [{name}] has no search"));
            continue;
        };
        let terms: Vec<(&str, &str)> = search
            .split_whitespace()
            .filter_map(|term| term.split_once('='))
            .map(|(field, value)| (field, value.trim_matches('"')))
            .collect();
        let Some(record_type) = terms
            .iter()
            .find(|(field, _)| *field == "sourcetype")
            .and_then(|(_, sourcetype)| sourcetype.strip_prefix("tollgate:"))
        else {
            problems.push(format!(
                "eventtypes.conf: [{name}] must search one tollgate sourcetype"
            ));
            continue;
        };
        if confs["props"]
            .stanza(&format!("tollgate:{record_type}"))
            .is_none()
        {
            problems.push(format!(
                "eventtypes.conf: [{name}] searches tollgate:{record_type}, which props.conf lacks"
            ));
        }
        let fields = all_leaves(native.iter().filter(|r| r["type"] == record_type), "{}");
        for (field, value) in terms.iter().filter(|(f, _)| *f != "sourcetype") {
            let has = fields
                .get(*field)
                .is_some_and(|values| values.iter().any(|v| v.as_str() == Some(value)));
            if !has {
                problems.push(format!(
                    "eventtypes.conf: [{name}] searches {field}={value}, which no {record_type} record has"
                ));
            }
        }
    }
    for (stanza, _) in &confs["tags"].stanzas {
        let known = stanza
            .strip_prefix("eventtype=")
            .is_some_and(|eventtype| eventtypes.stanza(eventtype).is_some());
        if !known {
            problems.push(format!(
                "tags.conf: [{stanza}] is no event type of eventtypes.conf"
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::siem::tests::{golden, has, root};

    #[test]
    fn conf_files_parse_as_splunk_reads_them() {
        let conf = Conf::parse(
            "# comment\nglobal = 1\n[tollgate:flow]\nKV_MODE = json\nEVAL-a = if(x, \\\n  1, 2)\n\n[eventtype=x]\nnetwork = enabled\n",
        )
        .unwrap();
        assert_eq!(get(conf.stanza("").unwrap(), "global"), Some("1"));
        assert_eq!(
            get(conf.stanza("tollgate:flow").unwrap(), "EVAL-a"),
            Some("if(x, \n1, 2)")
        );
        assert_eq!(
            get(conf.stanza("eventtype=x").unwrap(), "network"),
            Some("enabled")
        );
        for broken in [
            "[a]\nkey = 1\nkey = 2\n",
            "[a]\n[a]\n",
            "[a\nkey = 1\n",
            "[a]\njust words\n",
            "[a]\nbad key = 1\n",
            "[a]\nkey = 1 \\",
        ] {
            assert!(Conf::parse(broken).is_err(), "{broken:?} parsed");
        }
    }

    /// The add-on's problems with `from` replaced by `to` in one file
    /// (a .conf, or the lookup table).
    fn addon_changed(file: &str, from: &str, to: &str) -> Vec<String> {
        let addon = root().join(SIEM).join("splunk/TA-tollgate");
        let mut confs = BTreeMap::new();
        for name in ["app", "props", "transforms", "eventtypes", "tags"] {
            let mut text =
                std::fs::read_to_string(addon.join(format!("default/{name}.conf"))).unwrap();
            if file == name {
                assert!(text.contains(from), "{file} lacks {from}");
                text = text.replace(from, to);
            }
            confs.insert(name, Conf::parse(&text).unwrap());
        }
        let lookup = |name: &str| {
            let text = std::fs::read_to_string(addon.join("lookups").join(name)).ok()?;
            Some(if file == "lookup" {
                text.replace(from, to)
            } else {
                text
            })
        };
        addon_problems(&confs, &golden("json.jsonl"), &lookup)
    }

    #[test]
    fn the_addon_must_read_real_fields_and_give_the_cims() {
        assert_eq!(addon_changed("none", "", ""), Vec::<String>::new());
        let cases = [
            (
                "props",
                "EVAL-app = 'src.comm'",
                "EVAL-app = 'src.command'",
                "reads src.command",
            ),
            (
                "props",
                "EVAL-app = 'src.comm'",
                "EVAL-app = src.comm",
                "bare word src",
            ),
            ("props", "EVAL-app = 'src.comm'", "", "lacks CIM field app"),
            (
                "props",
                "EVAL-app = 'src.comm'",
                "EVAL-protocol = \"ip\"",
                "sets protocol, which hides the flow record's own protocol",
            ),
            (
                "props",
                "query_type AS record_type",
                "query_type AS rcode",
                "sets rcode, which hides the dns record's own rcode",
            ),
            (
                "props",
                "dst.ip AS dest_ip",
                "dst.address AS dest_ip",
                "reads dst.address",
            ),
            (
                "props",
                "dst.ip AS dest_ip",
                "dst.ip dest_ip",
                "expected <field> AS <alias>",
            ),
            (
                "props",
                "resolver.port AS dest_port",
                "resolver.port AS port",
                "[tollgate:dns] lacks CIM field dest_port",
            ),
            (
                "props",
                "KV_MODE = json\nSHOULD_LINEMERGE = false\ncategory = Network & Security\ndescription = Tollgate loss",
                "KV_MODE = auto\nSHOULD_LINEMERGE = false\ncategory = Network & Security\ndescription = Tollgate loss",
                "[tollgate:loss] needs KV_MODE = json",
            ),
            (
                "props",
                "[tollgate:loss]",
                "[tollgate:losses]",
                "no [tollgate:loss]",
            ),
            (
                "props",
                "SHOULD_LINEMERGE = false\ncategory = Network & Security\ndescription = Tollgate DNS",
                "SHOULD_LINEMERG = false\ncategory = Network & Security\ndescription = Tollgate DNS",
                "unknown setting SHOULD_LINEMERG",
            ),
            (
                "props",
                "verdict OUTPUT action",
                "decision OUTPUT action",
                "lookups/tollgate_verdict_actions.csv has no column decision",
            ),
            (
                "transforms",
                "[tollgate_verdict_actions]",
                "[tollgate_verdicts]",
                "transforms.conf has no [tollgate_verdict_actions]",
            ),
            ("lookup", "audit,allowed\n", "", "no row for verdict audit"),
            (
                "lookup",
                "denied,blocked",
                "denied,denied",
                "action denied is not one of CIM's",
            ),
            (
                "tags",
                "communicate = enabled",
                "communicate = disabled",
                "needs tag communicate",
            ),
            (
                "tags",
                "[eventtype=tollgate_dns]",
                "[eventtype=tollgate_dnss]",
                "[eventtype=tollgate_dnss] is no event type",
            ),
            (
                "eventtypes",
                "verdict=\"denied\"",
                "verdict=\"blocked\"",
                "searches verdict=blocked",
            ),
            (
                "eventtypes",
                "search = sourcetype=\"tollgate:loss\"",
                "search = sourcetype=\"tollgate:lost\"",
                "props.conf lacks",
            ),
        ];
        for (file, from, to, expected) in cases {
            let problems = addon_changed(file, from, to);
            assert!(
                has(&problems, expected),
                "{file}: {from:?} -> {to:?}: {problems:?}"
            );
        }
    }
}
