//! CEF output read back by a small CEF parser: seven header fields split
//! on unescaped pipes, then `key=value` pairs, with CEF's escapes. Values
//! with pipes, equals signs, backslashes and line breaks must come back
//! unchanged, and every key must be one of CEF's.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    sync::LazyLock,
};

use serde::Deserialize;

use super::{fixtures, render};
use crate::export::{
    format::{Format, unix_millis},
    record::Record,
};

/// A parsed CEF line: the header fields and the extension.
struct Cef {
    header: Vec<String>,
    extension: BTreeMap<String, String>,
}

fn parse(line: &str) -> Cef {
    let rest = line.strip_prefix("CEF:").expect("starts with CEF:");
    let mut header = vec![String::from("CEF:")];
    let mut chars = rest.chars();
    while header.len() <= 7 {
        let field = header.last_mut().unwrap();
        match chars.next().expect("seven header fields") {
            '\\' => match chars.next() {
                Some(c @ ('\\' | '|')) => field.push(c),
                other => panic!("bad header escape \\{other:?}"),
            },
            '|' => header.push(String::new()),
            c => field.push(c),
        }
    }
    let extension_text = header.pop().unwrap() + chars.as_str();
    Cef {
        header,
        extension: parse_extension(&extension_text),
    }
}

/// Splits at unescaped `=`: the key is the word before it, the value runs
/// to the space before the next key.
fn parse_extension(text: &str) -> BTreeMap<String, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut equals = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 1,
            '=' => equals.push(i),
            _ => {}
        }
        i += 1;
    }
    let key_start = |at: usize| {
        chars[..at]
            .iter()
            .rposition(|&c| c == ' ')
            .map_or(0, |space| space + 1)
    };
    let mut pairs = BTreeMap::new();
    for (n, &at) in equals.iter().enumerate() {
        let key: String = chars[key_start(at)..at].iter().collect();
        assert!(
            !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric()),
            "bad key {key:?} in {text}"
        );
        let end = equals
            .get(n + 1)
            .map_or(chars.len(), |&next| key_start(next) - 1);
        let value = unescape(&chars[at + 1..end]);
        assert!(pairs.insert(key.clone(), value).is_none(), "{key} twice");
    }
    pairs
}

fn unescape(value: &[char]) -> String {
    let mut out = String::new();
    let mut chars = value.iter();
    while let Some(&c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('=') => out.push('='),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            other => panic!("bad extension escape \\{other:?}"),
        }
    }
    out
}

/// One key of CEF's dictionary (conformance/cef-keys.json).
#[derive(Deserialize)]
struct Key {
    #[serde(rename = "type")]
    kind: String,
    /// The longest value, in characters, for strings.
    length: Option<usize>,
    /// The column of Sentinel's CommonSecurityLog the key lands in, and
    /// that column's type.
    sentinel_column: String,
    sentinel_type: String,
    /// Custom keys: the longest label.
    label_length: Option<usize>,
}

#[derive(Deserialize)]
struct Dictionary {
    keys: BTreeMap<String, Key>,
    custom_keys: BTreeMap<String, Key>,
}

static DICTIONARY: LazyLock<Dictionary> = LazyLock::new(|| {
    serde_json::from_str(include_str!("../conformance/cef-keys.json"))
        .expect("the dictionary parses")
});

/// Checks a parsed record's extension against CEF's dictionary and the
/// columns Sentinel puts each key in; returns what is wrong.
fn check_extension(cef: &Cef) -> Vec<String> {
    let mut errors = Vec::new();
    for (key, value) in &cef.extension {
        if value.is_empty() {
            errors.push(format!("{key}: empty value"));
        }
        if let Some(custom) = key.strip_suffix("Label") {
            match DICTIONARY.custom_keys.get(custom) {
                Some(definition) => {
                    if !cef.extension.contains_key(custom) {
                        errors.push(format!("{key} without {custom}"));
                    }
                    let max = definition.label_length.unwrap_or(1023);
                    if value.chars().count() > max {
                        errors.push(format!("{key}: longer than {max}"));
                    }
                }
                None => errors.push(format!("{key}: not a custom key's label")),
            }
            continue;
        }
        let definition = match (DICTIONARY.keys.get(key), DICTIONARY.custom_keys.get(key)) {
            (Some(definition), _) => definition,
            (None, Some(definition)) => {
                if !cef.extension.contains_key(&format!("{key}Label")) {
                    errors.push(format!("{key} without its label"));
                }
                definition
            }
            (None, None) => {
                errors.push(format!("{key}: not a key of CEF's dictionary"));
                continue;
            }
        };
        let fits_cef = match definition.kind.as_str() {
            "String" => definition
                .length
                .is_none_or(|max| value.chars().count() <= max),
            "Integer" => value.parse::<i32>().is_ok(),
            "Long" => value.parse::<i64>().is_ok(),
            "Floating Point" => value.parse::<f64>().is_ok(),
            // Revision 25 and later: IPv4 or IPv6.
            "IP Address" => value.parse::<IpAddr>().is_ok(),
            "IPv6 Address" => value.parse::<Ipv6Addr>().is_ok(),
            // We write milliseconds since the epoch, one of its two forms.
            "Time Stamp" => value.parse::<i64>().is_ok_and(|ms| ms >= 0),
            other => {
                errors.push(format!("{key}: type {other} not checked here"));
                continue;
            }
        };
        if !fits_cef {
            errors.push(format!("{key}: {value:?} is not a {}", definition.kind));
        }
        let fits_sentinel = match definition.sentinel_type.as_str() {
            "int" => value.parse::<i32>().is_ok(),
            "long" => value.parse::<i64>().is_ok(),
            "real" => value.parse::<f64>().is_ok(),
            "datetime" => value.parse::<i64>().is_ok(),
            _ => true,
        };
        if !fits_sentinel {
            errors.push(format!(
                "{key}: {value:?} does not fit Sentinel's {} ({})",
                definition.sentinel_column, definition.sentinel_type
            ));
        }
    }
    errors
}

/// Checks a whole line: the header, then the extension.
fn check_line(line: &str) -> Vec<String> {
    let Ok(cef) = std::panic::catch_unwind(|| parse(line)) else {
        return vec![format!("does not parse: {line}")];
    };
    let mut errors = check_extension(&cef);
    if cef.header[0] != "CEF:0" {
        errors.push(format!("version {}", cef.header[0]));
    }
    if cef.header[1..4] != ["Tollgate", "tollgate-agent", env!("CARGO_PKG_VERSION")] {
        errors.push(format!("device {:?}", &cef.header[1..4]));
    }
    if !cef.header[6]
        .parse::<u8>()
        .is_ok_and(|severity| severity <= 10)
    {
        errors.push(format!("severity {}", cef.header[6]));
    }
    if line.contains(['\n', '\r']) {
        errors.push("a raw line break".into());
    }
    errors
}

#[test]
fn records_fit_the_cef_dictionary_and_sentinels_columns() {
    for (name, fixture) in fixtures::conformance() {
        let line = render(Format::Cef, &fixture);
        let errors = check_line(&line);
        assert!(errors.is_empty(), "{name}: {errors:#?}\n{line}");
        assert!(parse(&line).extension.contains_key("rt"), "{name}");
    }
}

#[test]
fn the_dictionary_check_catches_mistakes() {
    let golden = render(Format::Cef, &fixtures::golden()[0].1);
    assert_eq!(check_line(&golden), Vec::<String>::new());
    let mistakes: &[(&str, &str, &str)] = &[
        ("a key not in the dictionary", " act=", " action="),
        ("an empty value", " cs2=deny-imds", " cs2="),
        ("a custom key without its label", "cs1Label=Policy ", ""),
        ("a label without its key", " cs2=deny-imds", ""),
        ("a port that is no integer", "dpt=80", "dpt=http"),
        ("an address that is none", "dst=169.254.169.254", "dst=imds"),
        (
            "a count past Sentinel's int column",
            "act=denied",
            "act=denied cnt=5000000000",
        ),
        (
            "a value past its length",
            "act=denied",
            "act=denied-by-a-policy-whose-name-goes-on-and-on-for-no-reason-at-all",
        ),
        ("an unescaped line break", "act=denied", "act=den\nied"),
        ("a bad header escape", "Egress denied", "Egress\\ denied"),
        ("another CEF version", "CEF:0|", "CEF:1|"),
    ];
    for (mistake, from, to) in mistakes {
        assert!(
            golden.contains(from),
            "{mistake}: {from} is not in {golden}"
        );
        let line = golden.replacen(from, to, 1);
        assert!(
            !check_line(&line).is_empty(),
            "{mistake} went unnoticed: {line}"
        );
    }
}

#[test]
fn special_characters_round_trip() {
    let nasty = "a|b=c\\d\ne\rf \\=g |";
    let mut flow = fixtures::denied_pod_flow();
    flow.src.comm = nasty.into();
    flow.src.pod = Some("pod=x|y\\z\r\n");
    flow.src.namespace = Some("ns with spaces=");
    flow.src.cgroup = Some("/a=b/c\\d");
    flow.policy = Some("p|q");
    flow.rule = "r\\1=".into();
    flow.dst.fqdn = Some("a=b\\c.example");
    let line = render(Format::Cef, &fixtures::Fixture::Flow(flow));
    let cef = parse(&line);
    let ext = &cef.extension;
    assert_eq!(ext["sproc"], nasty);
    assert_eq!(ext["cs4"], "pod=x|y\\z\r\n");
    assert_eq!(ext["cs3"], "ns with spaces=");
    assert_eq!(ext["cs5"], "/a=b/c\\d");
    assert_eq!(ext["cs1"], "p|q");
    assert_eq!(ext["cs2"], "r\\1=");
    assert_eq!(ext["dhost"], "a=b\\c.example");
    assert_eq!(ext["cs4Label"], "Pod");
    assert_eq!(cef.header[4], "flow-denied");
}

#[test]
fn ipv6_destinations_are_in_dst() {
    let mut flow = fixtures::denied_pod_flow();
    flow.dst.ip = "2001:db8::1".parse().unwrap();
    let cef = parse(&render(Format::Cef, &fixtures::Fixture::Flow(flow)));
    assert_eq!(cef.extension["dst"], "2001:db8::1");
    assert!(!cef.extension.contains_key("c6a3"));
}

#[test]
fn the_sequence_number_is_a_64_bit_custom_number_not_external_id() {
    let mut flow = fixtures::denied_pod_flow();
    flow.seq = 5_000_000_000;
    let cef = parse(&render(Format::Cef, &fixtures::Fixture::Flow(flow)));
    assert_eq!(cef.extension["cn2Label"], "Seq");
    assert_eq!(cef.extension["cn2"], "5000000000");
    assert!(!cef.extension.contains_key("externalId"));
}

#[test]
fn every_record_has_its_event_time_as_start() {
    for (name, fixture) in fixtures::conformance() {
        let cef = parse(&render(Format::Cef, &fixture));
        let time = match fixture.record() {
            Record::Flow(flow) => flow
                .summary
                .as_ref()
                .map_or(&flow.time, |summary| &summary.first_time),
            Record::Dns(dns) => &dns.time,
            Record::Loss(loss) => &loss.time,
        };
        let want = unix_millis(time).to_string();
        assert_eq!(cef.extension.get("start"), Some(&want), "{name}");
    }
}

#[test]
fn empty_values_leave_their_key_and_label_out() {
    let (_, nxdomain) = fixtures::odd().remove(1);
    let cef = parse(&render(Format::Cef, &nxdomain));
    assert!(!cef.extension.contains_key("cs2"), "no answers");
    assert!(!cef.extension.contains_key("cs2Label"));
    let mut flow = fixtures::denied_pod_flow();
    flow.src.comm = "".into();
    flow.rule = "".into();
    let cef = parse(&render(Format::Cef, &fixtures::Fixture::Flow(flow)));
    assert!(!cef.extension.contains_key("sproc"));
    assert!(!cef.extension.contains_key("cs2Label"));
}

#[test]
fn long_values_are_cut_to_the_dictionarys_length_between_characters() {
    let mut flow = fixtures::denied_pod_flow();
    flow.src.comm = "ü=".repeat(600).into();
    let cef = parse(&render(Format::Cef, &fixtures::Fixture::Flow(flow)));
    let want: String = "ü=".repeat(600).chars().take(1023).collect();
    assert_eq!(cef.extension["sproc"], want);
}

#[test]
fn severity_orders_denied_over_audit_over_allowed() {
    let severity = |verdict| {
        let mut flow = fixtures::denied_pod_flow();
        flow.verdict = verdict;
        let cef = parse(&render(Format::Cef, &fixtures::Fixture::Flow(flow)));
        cef.header[6].parse::<u8>().unwrap()
    };
    assert!(severity("denied") > severity("audit"));
    assert!(severity("audit") > severity("allowed"));
}

#[test]
fn cn3_counts_the_cluster_policies_among_cs1() {
    let extension = |fixture: &fixtures::Fixture| parse(&render(Format::Cef, fixture)).extension;
    for (flow, policy, count) in [
        (fixtures::denied_pod_flow(), "prod/payments-egress", "1"),
        (fixtures::local_policy_flow(), "prod/payments-local", "0"),
    ] {
        let ext = extension(&fixtures::Fixture::Flow(flow));
        assert_eq!(ext["cs1"], policy);
        assert_eq!(ext["cn3Label"], "Cluster Policies");
        assert_eq!(ext["cn3"], count, "{policy}");
    }
    let golden = fixtures::golden();
    let mixed = extension(&golden[1].1);
    assert_eq!(
        (mixed["cs1"].as_str(), mixed["cn3"].as_str()),
        ("host-allow-list,node-baseline", "1"),
        "a default of a local and a cluster policy"
    );
    let unattributed = extension(&golden[2].1);
    assert!(!unattributed.contains_key("cs1"));
    assert!(!unattributed.contains_key("cn3"));
    assert!(!unattributed.contains_key("cn3Label"));
}
