//! Microsoft Sentinel: the table, the data collection rule, the queries
//! and the analytics rule of deploy/siem/sentinel.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
};

use anyhow::{Context, bail};
use serde_json::Value;

use super::{SIEM, all_leaves, files_with_extension, read_json};

/// Where scripts/setup.sh unpacks npm @kusto/language-service-next.
const KUSTO_LIBRARY: &str = "/usr/local/share/kusto-language-service-next-12.4.1";
const TABLE: &str = "Tollgate_CL";
const STREAM: &str = "Custom-Tollgate_CL";
/// The native json fields the golden records leave out: serde skips them
/// when unset (agent/src/export/record.rs), so they are declared from the
/// source instead.
const FIELDS_SKIPPED_WHEN_UNSET: [&str; 2] = ["limit", "refused"];

pub(super) fn check(root: &Path, native: &[Value]) -> anyhow::Result<Vec<String>> {
    let dir = root.join(SIEM).join("sentinel");
    let template = read_json(&dir.join("tollgate-dcr.json"))?;
    let rule_template = read_json(&dir.join("tollgate-analytics-rule.json"))?;
    let mut problems = Vec::new();
    for (name, arm) in [
        ("tollgate-dcr.json", &template),
        ("tollgate-analytics-rule.json", &rule_template),
    ] {
        problems.extend(
            expression_problems(arm)
                .into_iter()
                .map(|p| format!("{name}: {p}")),
        );
    }

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
    problems.extend(time_layout_problems(native));

    let rule = resource(&rule_template, "Microsoft.SecurityInsights/alertRules")?;
    let rule_query = rule["properties"]["query"]
        .as_str()
        .context("the analytics rule has no query")?;

    // The transformation sees only its input stream, `source`; the
    // queries only the workspace's table.
    let [transform_result] = analyze_kql(
        root,
        &BTreeMap::from([("source".to_owned(), stream_columns)]),
        &[("transformKql".to_owned(), transform.to_owned())],
    )?
    .try_into()
    .expect("one result per query");
    let mut queries = Vec::new();
    for file in files_with_extension(&dir.join("queries"), "kql")? {
        let name = file.strip_prefix(&dir)?.display().to_string();
        queries.push((name, std::fs::read_to_string(&file)?));
    }
    queries.push(("the analytics rule".into(), rule_query.to_owned()));
    let analyzed = analyze_kql(
        root,
        &BTreeMap::from([(TABLE.to_owned(), table_columns.clone())]),
        &queries,
    )?;
    for result in std::iter::once(&transform_result).chain(&analyzed) {
        for error in &result.errors {
            problems.push(format!("{}: {error}", result.name));
        }
    }
    let transform_columns: BTreeMap<String, String> =
        transform_result.columns.iter().cloned().collect();
    problems.extend(same_columns(&transform_columns, &table_columns));
    let rule_result = &analyzed.last().expect("the rule was analyzed").columns;
    problems.extend(rule_problems(rule, rule_result));
    Ok(problems)
}

/// ARM template expressions (strings in `[...]`; `[[` escapes a literal
/// `[`): balanced parentheses and quotes, and every `parameters('x')` and
/// `variables('x')` declared: mistakes Azure would otherwise only report
/// at deployment.
fn expression_problems(template: &Value) -> Vec<String> {
    fn strings<'v>(value: &'v Value, out: &mut Vec<&'v str>) {
        match value {
            Value::String(s) => out.push(s),
            Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
            Value::Object(fields) => fields.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    strings(template, &mut all);
    let mut problems = Vec::new();
    for text in all {
        let Some(expression) = text.strip_prefix('[').filter(|e| !e.starts_with('[')) else {
            continue;
        };
        let Some(expression) = expression.strip_suffix(']') else {
            problems.push(format!("expression {text:?} does not end with ]"));
            continue;
        };
        // Outside quotes, parentheses must balance; '' is a quote inside one.
        let (mut depth, mut quoted) = (0i32, false);
        for c in expression.chars() {
            match c {
                '\'' => quoted = !quoted,
                '(' if !quoted => depth += 1,
                ')' if !quoted => depth -= 1,
                _ => {}
            }
            if depth < 0 {
                break;
            }
        }
        if depth != 0 || quoted {
            problems.push(format!(
                "expression {text:?} has unbalanced parentheses or quotes"
            ));
        }
        for (function, declared) in [("parameters", "parameters"), ("variables", "variables")] {
            for reference in expression.split(&format!("{function}('")).skip(1) {
                let name = reference.split('\'').next().unwrap_or_default();
                if template[declared].get(name).is_none() {
                    problems.push(format!(
                        "expression {text:?} uses undeclared {function} {name}"
                    ));
                }
            }
        }
    }
    problems
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

/// The record fields the transformation turns into datetimes.
const TIMES: [&str; 3] = ["time", "summary.first_time", "summary.last_time"];

/// The transformation keeps a time's first 27 characters (seven fractional
/// digits: Kusto's datetimes count 100 ns ticks) and appends `Z`, which
/// holds only for the agent's layout, `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`.
fn time_layout_problems(native: &[Value]) -> Vec<String> {
    let leaves = all_leaves(native, "");
    let mut problems = Vec::new();
    for path in TIMES {
        for value in leaves.get(path).into_iter().flatten() {
            let text = value.as_str().unwrap_or_default();
            let fraction = text.get(19..);
            let nine_digits = text.len() == 30
                && fraction.is_some_and(|f| {
                    f.starts_with('.')
                        && f.ends_with('Z')
                        && f.get(1..10)
                            .is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit()))
                });
            if !nine_digits {
                problems.push(format!(
                    "{path} {value} is not RFC 3339 with nine fractional digits, which the transformation cuts to seven"
                ));
            }
        }
    }
    problems
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

#[derive(Debug, serde::Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::siem::tests::{golden, has, root};

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
    fn arm_expressions_must_balance_and_name_declared_parameters() {
        let template = sentinel_file("tollgate-dcr.json");
        assert_eq!(expression_problems(&template), Vec::<String>::new());
        let cases = [
            ("[parameters('workspaceName')", "does not end with ]"),
            (
                "[format('{0}/x', parameters('workspaceName')]",
                "unbalanced",
            ),
            (
                "[format('{0}/x, parameters('workspaceName'))]",
                "unbalanced",
            ),
            (
                "[parameters('workspace')]",
                "undeclared parameters workspace",
            ),
            (
                "[variables('monitoringMetricPublisher')]",
                "undeclared variables",
            ),
        ];
        for (expression, expected) in cases {
            let mut changed = template.clone();
            changed["resources"][0]["name"] = expression.into();
            assert!(
                has(&expression_problems(&changed), expected),
                "{expression}"
            );
        }
        let mut literal = template;
        literal["resources"][0]["name"] = "[[not an expression".into();
        assert_eq!(expression_problems(&literal), Vec::<String>::new());
    }

    #[test]
    fn times_must_have_the_layout_the_transformation_cuts() {
        let mut native = golden("json.jsonl");
        assert_eq!(time_layout_problems(&native), Vec::<String>::new());
        native[0]["time"] = "2026-11-24T08:11:30.808267Z".into();
        assert!(has(
            &time_layout_problems(&native),
            "time \"2026-11-24T08:11:30.808267Z\""
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
            "Destinations",
            "Rules",
            "HostName",
        ];
        assert!(rule_problems(rule, &returned(&all)).is_empty());
        assert!(has(
            &rule_problems(rule, &returned(&all[1..])),
            "column Namespace"
        ));
        assert!(has(
            &rule_problems(rule, &returned(&all[..6])),
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
}
