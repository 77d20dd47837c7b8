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
//! - Splunk: the add-on's .conf files parse (Splunk's syntax, below), every
//!   field they read is one the records of their sourcetype have, the CIM
//!   fields and tags of each data model are there, the lookup covers every
//!   verdict;
//! - Elastic: every `tollgate.*` field of the ECS records is mapped
//!   explicitly with a type that takes its values, every explicit mapping
//!   names a field the records have, and the index template applies to the
//!   elasticBulk sink's default data stream with the mappings and the ILM
//!   policy given here.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};
use serde_json::Value;

const SIEM: &str = "deploy/siem";
const GOLDEN: &str = "agent/src/export/format/golden";
/// Where scripts/setup.sh unpacks npm @kusto/language-service-next.
const KUSTO_LIBRARY: &str = "/usr/local/share/kusto-language-service-next-12.4.1";

const TABLE: &str = "Tollgate_CL";
const STREAM: &str = "Custom-Tollgate_CL";
/// The native json fields the golden records leave out: serde skips them
/// when unset (agent/src/export/record.rs), so they are declared from the
/// source instead.
const FIELDS_SKIPPED_WHEN_UNSET: [&str; 2] = ["limit", "refused"];
/// The elasticBulk sink's default index (agent/src/export/config.rs).
const ELASTIC_DEFAULT_INDEX: &str = "logs-tollgate-default";

pub fn check(root: &Path) -> anyhow::Result<()> {
    let siem = root.join(SIEM);
    let json_files = files_with_extension(&siem, "json")?;
    for file in &json_files {
        read_json(file)?;
    }
    let native = read_json_lines(&root.join(GOLDEN).join("json.jsonl"))?;
    let ecs = read_json_lines(&root.join(GOLDEN).join("ecs.jsonl"))?;

    let mut problems = Vec::new();
    problems.extend(prefixed("sentinel", sentinel(root, &native)?));
    problems.extend(prefixed("splunk", splunk(root, &native)?));
    problems.extend(prefixed("elastic", elastic(root, &ecs)?));
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

// ---------------------------------------------------------------- Sentinel

fn sentinel(root: &Path, native: &[Value]) -> anyhow::Result<Vec<String>> {
    let dir = root.join(SIEM).join("sentinel");
    let template = read_json(&dir.join("tollgate-dcr.json"))?;
    let rule_template = read_json(&dir.join("tollgate-analytics-rule.json"))?;
    let mut problems = Vec::new();

    let table = resource(&template, "Microsoft.OperationalInsights/workspaces/tables")?;
    let table_columns = columns(&table["properties"]["schema"]["columns"], "the table")?;
    if table["properties"]["schema"]["name"] != TABLE {
        problems.push(format!("the table must be named {TABLE}"));
    }
    if table_columns.get("TimeGenerated").map(String::as_str) != Some("datetime") {
        problems.push("the table needs a TimeGenerated column of type datetime".into());
    }

    let dcr = resource(&template, "Microsoft.Insights/dataCollectionRules")?;
    let stream = &dcr["properties"]["streamDeclarations"][STREAM]["columns"];
    let stream_columns = columns(stream, "the stream declaration")?;
    problems.extend(stream_problems(&stream_columns, native, root)?);
    let flows = dcr["properties"]["dataFlows"]
        .as_array()
        .context("the DCR has no dataFlows")?;
    let [flow] = flows.as_slice() else {
        bail!("the DCR must have one data flow");
    };
    if flow["streams"] != serde_json::json!([STREAM]) || flow["outputStream"] != STREAM {
        problems.push(format!(
            "the data flow must take {STREAM} and output to {STREAM}"
        ));
    }
    let transform = flow["transformKql"]
        .as_str()
        .context("the data flow has no transformKql")?;
    problems.extend(transform_problems(transform, native));

    let rule = resource(&rule_template, "Microsoft.SecurityInsights/alertRules")?;
    let rule_query = rule["properties"]["query"]
        .as_str()
        .context("the analytics rule has no query")?;

    let mut queries = vec![("transformKql".to_owned(), transform.to_owned())];
    for file in files_with_extension(&dir.join("queries"), "kql")? {
        let name = file.strip_prefix(&dir)?.display().to_string();
        queries.push((name, std::fs::read_to_string(&file)?));
    }
    queries.push(("the analytics rule".into(), rule_query.to_owned()));
    let tables = BTreeMap::from([
        ("source".to_owned(), stream_columns),
        (TABLE.to_owned(), table_columns.clone()),
    ]);
    let analyzed = analyze_kql(root, &tables, &queries)?;
    for result in &analyzed {
        for error in &result.errors {
            problems.push(format!("{}: {error}", result.name));
        }
    }
    let transform_result: BTreeMap<String, String> = analyzed[0].columns.iter().cloned().collect();
    problems.extend(same_columns(&transform_result, &table_columns));
    let rule_result = &analyzed.last().expect("the rule was analyzed").columns;
    problems.extend(rule_problems(rule, rule_result));
    Ok(problems)
}

/// The one resource of this type in an ARM template.
fn resource<'t>(template: &'t Value, kind: &str) -> anyhow::Result<&'t Value> {
    let resources = template["resources"]
        .as_array()
        .context("the template has no resources")?;
    let mut matching = resources.iter().filter(|r| r["type"] == kind);
    match (matching.next(), matching.next()) {
        (Some(resource), None) => Ok(resource),
        _ => bail!("the template must have one {kind}"),
    }
}

/// Columns by name, with their types in Kusto's names (`datetime`, `bool`).
fn columns(columns: &Value, what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for column in columns
        .as_array()
        .with_context(|| format!("{what} has no columns"))?
    {
        let (Some(name), Some(kind)) = (column["name"].as_str(), column["type"].as_str()) else {
            bail!("{what}: a column without name or type: {column}");
        };
        let kind = match kind.to_ascii_lowercase().as_str() {
            "boolean" => "bool".to_owned(),
            other => other.to_owned(),
        };
        if out.insert(name.to_owned(), kind).is_some() {
            bail!("{what}: column {name} is declared twice");
        }
    }
    Ok(out)
}

/// The stream must declare every top-level field of the native records,
/// each with a type that takes the records' values, and nothing else.
fn stream_problems(
    stream: &BTreeMap<String, String>,
    native: &[Value],
    root: &Path,
) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let mut fields: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for record in native {
        for (name, value) in record.as_object().context("a golden record")? {
            fields.entry(name).or_default().push(value);
        }
    }
    let record_source = std::fs::read_to_string(root.join("agent/src/export/record.rs"))?;
    for skipped in FIELDS_SKIPPED_WHEN_UNSET {
        if !record_source.contains(&format!("pub {skipped}:")) {
            problems.push(format!(
                "{skipped} is no longer a field of agent/src/export/record.rs"
            ));
        }
    }
    for (name, values) in &fields {
        match stream.get(*name) {
            None => problems.push(format!(
                "field {name} of the records is not in the stream declaration (Sentinel would drop it)"
            )),
            Some(kind) => {
                for value in values {
                    if !kusto_type_takes(kind, value) {
                        problems.push(format!(
                            "stream column {name} is {kind}, but a record has {value}"
                        ));
                    }
                }
            }
        }
    }
    for name in stream.keys() {
        if !fields.contains_key(name.as_str())
            && !FIELDS_SKIPPED_WHEN_UNSET.contains(&name.as_str())
        {
            problems.push(format!("stream column {name} is no field of the records"));
        }
    }
    Ok(problems)
}

fn kusto_type_takes(kind: &str, value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(_) => kind == "bool",
        Value::Number(n) if n.is_i64() || n.is_u64() => {
            matches!(kind, "long" | "real")
                || (kind == "int" && n.as_i64().is_some_and(|n| i32::try_from(n).is_ok()))
        }
        Value::Number(_) => kind == "real",
        Value::String(_) => matches!(kind, "string" | "datetime"),
        Value::Array(_) | Value::Object(_) => kind == "dynamic",
    }
}

/// What a DCR transformation may use (learn.microsoft.com, "Supported KQL
/// features in Azure Monitor transformations"): a subset, kept to what
/// this one needs and a little more.
const TRANSFORM_OPERATORS: [&str; 6] = [
    "where",
    "extend",
    "project",
    "project-away",
    "project-rename",
    "parse",
];
const TRANSFORM_FUNCTIONS: [&str; 22] = [
    "parse_json",
    "tostring",
    "toint",
    "tolong",
    "toreal",
    "todouble",
    "tobool",
    "todatetime",
    "strcat",
    "strcat_delim",
    "substring",
    "strlen",
    "split",
    "tolower",
    "toupper",
    "extract",
    "iif",
    "case",
    "isnull",
    "isnotnull",
    "pack",
    "array_length",
];

/// A KQL token, as far as these checks need one.
#[derive(Clone, Debug, PartialEq)]
enum Token {
    Word(String),
    Text(String),
    Punct(char),
}

fn kql_tokens(text: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            continue;
        }
        if c == '/' && chars.peek() == Some(&'/') {
            for c in chars.by_ref() {
                if c == '\n' {
                    break;
                }
            }
        } else if c == '"' || c == '\'' {
            let mut literal = String::new();
            while let Some(d) = chars.next() {
                match d {
                    '\\' => literal.extend(chars.next()),
                    d if d == c => break,
                    d => literal.push(d),
                }
            }
            tokens.push(Token::Text(literal));
        } else if c.is_alphanumeric() || c == '_' {
            let mut word = String::from(c);
            while let Some(&d) = chars.peek() {
                // Hyphenated operators: project-away, mv-expand.
                let hyphen = d == '-' && (word == "project" || word == "mv");
                if d.is_alphanumeric() || d == '_' || hyphen {
                    word.push(d);
                    chars.next();
                } else {
                    break;
                }
            }
            tokens.push(Token::Word(word));
        } else {
            tokens.push(Token::Punct(c));
        }
    }
    tokens
}

/// Operators and functions outside what DCR transformations allow, and
/// paths into the records' objects (`Source.workload.kind`, from
/// `Source = parse_json(src)`) that no record has.
fn transform_problems(transform: &str, native: &[Value]) -> Vec<String> {
    let tokens = kql_tokens(transform);
    let mut problems = Vec::new();
    let word = |i: usize| match tokens.get(i) {
        Some(Token::Word(w)) => Some(w.as_str()),
        _ => None,
    };
    let punct = |i: usize, c: char| tokens.get(i) == Some(&Token::Punct(c));
    let mut objects: BTreeMap<&str, &str> = BTreeMap::new();
    for i in 0..tokens.len() {
        if punct(i, '|') {
            match word(i + 1) {
                Some(operator) if TRANSFORM_OPERATORS.contains(&operator) => {}
                other => problems.push(format!(
                    "transformKql: operator {other:?} is not allowed in a DCR transformation"
                )),
            }
        }
        if let Some(function) = word(i)
            && punct(i + 1, '(')
        {
            if !TRANSFORM_FUNCTIONS.contains(&function) {
                problems.push(format!(
                    "transformKql: function {function} is not allowed in a DCR transformation"
                ));
            }
            if function == "parse_json"
                && i >= 2
                && punct(i - 1, '=')
                && let Some(alias) = word(i - 2)
                && let (Some(column), true) = (word(i + 2), punct(i + 3, ')'))
            {
                objects.insert(alias, column);
            }
        }
    }
    let paths = all_leaves(native, "");
    let known = |path: &str| {
        paths
            .keys()
            .any(|p| p == path || p.starts_with(&format!("{path}.")))
    };
    let mut i = 0;
    while i < tokens.len() {
        let Some(column) = word(i).and_then(|w| objects.get(w)) else {
            i += 1;
            continue;
        };
        let mut path = (*column).to_owned();
        let mut j = i + 1;
        loop {
            if punct(j, '.')
                && let Some(segment) = word(j + 1)
            {
                path = format!("{path}.{segment}");
                j += 2;
            } else if punct(j, '.') && punct(j + 1, '[') {
                j += 1;
            } else if punct(j, '[')
                && let Some(Token::Text(segment)) = tokens.get(j + 1)
                && punct(j + 2, ']')
            {
                path = format!("{path}.{segment}");
                j += 3;
            } else {
                break;
            }
        }
        if j > i + 1 && !known(&path) {
            problems.push(format!("transformKql reads {path}, which no record has"));
        }
        i = j;
    }
    problems
}

fn same_columns(
    transform: &BTreeMap<String, String>,
    table: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, kind) in transform {
        match table.get(name) {
            None => problems.push(format!(
                "the transformation outputs {name}, which the table lacks"
            )),
            Some(column) if column != kind => problems.push(format!(
                "the transformation outputs {name} as {kind}, the table has {column}"
            )),
            Some(_) => {}
        }
    }
    for name in table.keys() {
        if !transform.contains_key(name) {
            problems.push(format!(
                "the table's column {name} is not filled by the transformation"
            ));
        }
    }
    problems
}

/// The rule's custom details and entities must name columns its query
/// returns.
fn rule_problems(rule: &Value, result: &[(String, String)]) -> Vec<String> {
    let returned: BTreeSet<&str> = result.iter().map(|(name, _)| name.as_str()).collect();
    let properties = &rule["properties"];
    let mut used = Vec::new();
    if let Some(details) = properties["customDetails"].as_object() {
        used.extend(details.values().filter_map(Value::as_str));
    }
    for entity in properties["entityMappings"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for field in entity["fieldMappings"].as_array().into_iter().flatten() {
            used.extend(field["columnName"].as_str());
        }
    }
    if result.is_empty() {
        return vec!["the analytics rule's query returns no columns".into()];
    }
    used.into_iter()
        .filter(|column| !returned.contains(column))
        .map(|column| {
            format!("the analytics rule uses column {column}, which its query does not return")
        })
        .collect()
}

/// Node's script around Kusto.Language: parses and analyzes each query
/// against the given tables and prints its errors and its result's columns.
const KQL_SCRIPT: &str = r#"
const [libDir, jobPath] = process.argv.slice(2);
require(libDir + "/bridge.js");
require(libDir + "/Kusto.Language.Bridge.js");
const job = JSON.parse(require("fs").readFileSync(jobPath, "utf8"));
const K = Kusto.Language;
const S = K.Symbols;
const types = {
  string: S.ScalarTypes.String, long: S.ScalarTypes.Long, int: S.ScalarTypes.Int,
  real: S.ScalarTypes.Real, bool: S.ScalarTypes.Bool, datetime: S.ScalarTypes.DateTime,
  dynamic: S.ScalarTypes.Dynamic, guid: S.ScalarTypes.Guid,
};
const tables = Object.entries(job.tables).map(([name, columns]) =>
  new S.TableSymbol.$ctor4(name, Object.entries(columns).map(([column, type]) => {
    if (!types[type]) throw new Error(`table ${name}: column ${column} has unknown type ${type}`);
    return new S.ColumnSymbol(column, types[type], null, null, null, null);
  })));
const database = new S.DatabaseSymbol.$ctor1("workspace", tables, false);
const globals = K.GlobalState.Default
  .WithCluster(new S.ClusterSymbol.$ctor1("cluster", [database], false))
  .WithDatabase(database);
const results = job.queries.map(([name, text]) => {
  const code = K.KustoCode.ParseAndAnalyze(text, globals);
  const diagnostics = code.GetDiagnostics();
  const errors = [];
  for (let i = 0; i < diagnostics.Count; i++) {
    const d = diagnostics.getItem(i);
    const before = text.slice(0, d.Start).split("\n");
    errors.push(`line ${before.length} column ${before[before.length - 1].length + 1}: ${d.Severity}: ${d.Message}`);
  }
  const columns = [];
  const result = code.ResultType;
  if (result && result.Columns) {
    for (let i = 0; i < result.Columns.Count; i++) {
      const c = result.Columns.getItem(i);
      columns.push([c.Name, c.Type.Name]);
    }
  }
  return { name, errors, columns };
});
process.stdout.write(JSON.stringify(results));
"#;

#[derive(serde::Deserialize)]
struct KqlResult {
    name: String,
    errors: Vec<String>,
    columns: Vec<(String, String)>,
}

/// Each (name, query) analyzed by Kusto.Language against `tables`, in order.
fn analyze_kql(
    root: &Path,
    tables: &BTreeMap<String, BTreeMap<String, String>>,
    queries: &[(String, String)],
) -> anyhow::Result<Vec<KqlResult>> {
    if !Path::new(KUSTO_LIBRARY)
        .join("Kusto.Language.Bridge.js")
        .exists()
    {
        bail!("{KUSTO_LIBRARY} is missing: scripts/setup.sh installs it");
    }
    let scratch = root.join("target/siem");
    std::fs::create_dir_all(&scratch)?;
    let script = scratch.join("kql-check.js");
    std::fs::write(&script, KQL_SCRIPT)?;
    // Unique per call: tests analyze in parallel.
    let job = scratch.join(format!(
        "kql-job-{}-{:?}.json",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(
        &job,
        serde_json::to_string(&serde_json::json!({"tables": tables, "queries": queries}))?,
    )?;
    let output = Command::new("node")
        .arg(&script)
        .arg(KUSTO_LIBRARY)
        .arg(&job)
        .output()
        .context("running node (scripts/setup.sh installs it)")?;
    std::fs::remove_file(&job)?;
    if !output.status.success() {
        bail!(
            "analyzing KQL with node failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let results: Vec<KqlResult> = serde_json::from_slice(&output.stdout)?;
    if results.len() != queries.len() {
        bail!(
            "node analyzed {} of {} queries",
            results.len(),
            queries.len()
        );
    }
    Ok(results)
}

// ------------------------------------------------------------------ Splunk

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

fn splunk(root: &Path, native: &[Value]) -> anyhow::Result<Vec<String>> {
    let addon = root.join(SIEM).join("splunk/TA-tollgate");
    let mut confs = BTreeMap::new();
    for name in ["app", "props", "transforms", "eventtypes", "tags"] {
        let path = addon.join(format!("default/{name}.conf"));
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path:?}"))?;
        let conf = Conf::parse(&text).map_err(|e| anyhow::anyhow!("{path:?}: {e}"))?;
        confs.insert(name, conf);
    }
    Conf::parse(&std::fs::read_to_string(
        addon.join("metadata/default.meta"),
    )?)
    .map_err(|e| anyhow::anyhow!("metadata/default.meta: {e}"))?;
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
        for (key, value) in settings {
            let reads = match PROPS_CLASSES.iter().find(|class| key.starts_with(*class)) {
                Some(&"EVAL-") => {
                    available.insert(key["EVAL-".len()..].to_owned());
                    eval_fields(value)
                }
                Some(&"FIELDALIAS-") => match field_aliases(value) {
                    Ok(aliases) => {
                        available.extend(aliases.iter().map(|(_, to)| to.clone()));
                        Ok(aliases.into_iter().map(|(from, _)| from).collect())
                    }
                    Err(e) => Err(e),
                },
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

// ----------------------------------------------------------------- Elastic

fn elastic(root: &Path, ecs: &[Value]) -> anyhow::Result<Vec<String>> {
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

    fn root() -> PathBuf {
        crate::workspace_root()
    }

    fn golden(format: &str) -> Vec<Value> {
        read_json_lines(&root().join(GOLDEN).join(format)).unwrap()
    }

    fn sentinel_file(name: &str) -> Value {
        read_json(&root().join(SIEM).join("sentinel").join(name)).unwrap()
    }

    /// The committed template's (stream, transformKql, table columns).
    fn dcr() -> (BTreeMap<String, String>, String, BTreeMap<String, String>) {
        let template = sentinel_file("tollgate-dcr.json");
        let dcr = resource(&template, "Microsoft.Insights/dataCollectionRules").unwrap();
        let stream = columns(
            &dcr["properties"]["streamDeclarations"][STREAM]["columns"],
            "stream",
        )
        .unwrap();
        let transform = dcr["properties"]["dataFlows"][0]["transformKql"]
            .as_str()
            .unwrap()
            .to_owned();
        let table = resource(&template, "Microsoft.OperationalInsights/workspaces/tables").unwrap();
        let table = columns(&table["properties"]["schema"]["columns"], "table").unwrap();
        (stream, transform, table)
    }

    fn has(problems: &[String], needle: &str) -> bool {
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

    #[test]
    fn the_stream_must_declare_each_record_field_with_its_type() {
        let native = golden("json.jsonl");
        let (stream, _, _) = dcr();
        assert_eq!(
            stream_problems(&stream, &native, &root()).unwrap(),
            Vec::<String>::new()
        );

        let mut missing = stream.clone();
        missing.remove("rcode");
        assert!(has(
            &stream_problems(&missing, &native, &root()).unwrap(),
            "field rcode"
        ));
        let mut mistyped = stream.clone();
        mistyped.insert("seq".into(), "string".into());
        assert!(has(
            &stream_problems(&mistyped, &native, &root()).unwrap(),
            "stream column seq is string"
        ));
        let mut narrow = stream.clone();
        narrow.insert("socket_cookie".into(), "bool".into());
        assert!(has(
            &stream_problems(&narrow, &native, &root()).unwrap(),
            "socket_cookie"
        ));
        let mut extra = stream;
        extra.insert("verdicts".into(), "string".into());
        assert!(has(
            &stream_problems(&extra, &native, &root()).unwrap(),
            "stream column verdicts is no field"
        ));
    }

    #[test]
    fn the_transformation_uses_what_dcrs_allow_and_reads_what_records_have() {
        let native = golden("json.jsonl");
        let (_, transform, _) = dcr();
        assert_eq!(
            transform_problems(&transform, &native),
            Vec::<String>::new()
        );

        let summarized = format!("{transform}\n| summarize count() by Node");
        assert!(has(
            &transform_problems(&summarized, &native),
            "operator Some(\"summarize\")"
        ));
        let coalesced = transform.replace(
            "tostring(Source.pod)",
            "coalesce(tostring(Source.pod), \"\")",
        );
        assert!(has(
            &transform_problems(&coalesced, &native),
            "function coalesce"
        ));
        let misnamed = transform.replace("Source.workload.kind", "Source.workload.type");
        assert!(has(
            &transform_problems(&misnamed, &native),
            "reads src.workload.type"
        ));
        let bracketed = transform.replace("Aggregate.['count']", "Aggregate.['total']");
        assert!(has(
            &transform_problems(&bracketed, &native),
            "reads summary.total"
        ));
    }

    #[test]
    fn the_transformation_must_fill_exactly_the_tables_columns() {
        let table = BTreeMap::from([
            ("TimeGenerated".to_owned(), "datetime".to_owned()),
            ("Verdict".to_owned(), "string".to_owned()),
        ]);
        assert!(same_columns(&table, &table).is_empty());
        let mut output = table.clone();
        output.insert("Verdict".into(), "long".into());
        output.insert("Extra".into(), "string".into());
        output.remove("TimeGenerated");
        let problems = same_columns(&output, &table);
        assert!(has(&problems, "outputs Verdict as long"));
        assert!(has(&problems, "outputs Extra"));
        assert!(has(&problems, "column TimeGenerated is not filled"));
    }

    #[test]
    fn the_rule_may_only_use_columns_its_query_returns() {
        let template = sentinel_file("tollgate-analytics-rule.json");
        let rule = resource(&template, "Microsoft.SecurityInsights/alertRules").unwrap();
        let returned = |names: &[&str]| -> Vec<(String, String)> {
            names
                .iter()
                .map(|n| ((*n).to_owned(), "string".to_owned()))
                .collect()
        };
        let all = [
            "Namespace",
            "Workload",
            "Denied",
            "BaselineMean",
            "HostName",
        ];
        assert!(rule_problems(rule, &returned(&all)).is_empty());
        assert!(has(
            &rule_problems(rule, &returned(&all[..4])),
            "column HostName"
        ));
    }

    #[test]
    #[ignore = "needs node and Kusto.Language (scripts/setup.sh); cargo xtask test runs it"]
    fn kusto_refuses_bad_queries_and_types_results() {
        let table = BTreeMap::from([
            ("TimeGenerated".to_owned(), "datetime".to_owned()),
            ("Verdict".to_owned(), "string".to_owned()),
        ]);
        let tables = BTreeMap::from([(TABLE.to_owned(), table)]);
        let queries = [
            ("good", "Tollgate_CL | summarize Denied = countif(Verdict == \"denied\") by bin(TimeGenerated, 1h)"),
            ("unknown column", "Tollgate_CL | where Verdicts == \"denied\""),
            ("syntax", "Tollgate_CL | wher Verdict == \"denied\""),
            ("unknown table", "Tollgate | take 1"),
        ]
        .map(|(name, query)| (name.to_owned(), query.to_owned()));
        let results = analyze_kql(&root(), &tables, &queries).unwrap();
        assert_eq!(results[0].errors, Vec::<String>::new());
        assert_eq!(
            results[0].columns,
            [
                ("TimeGenerated".to_owned(), "datetime".to_owned()),
                ("Denied".to_owned(), "long".to_owned())
            ]
        );
        for result in &results[1..] {
            assert!(!result.errors.is_empty(), "{} passed", result.name);
        }
    }

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
