//! CEF output read back by a small CEF parser: seven header fields split
//! on unescaped pipes, then `key=value` pairs, with CEF's escapes. Values
//! with pipes, equals signs, backslashes and line breaks must come back
//! unchanged, and every key must be one of CEF's.

use std::collections::BTreeMap;

use super::{fixtures, render};
use crate::export::{format::Format, record::Record};

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

/// The CEF dictionary keys the format may use; custom keys come with their
/// labels.
const STANDARD_KEYS: &[&str] = &[
    "act",
    "app",
    "cat",
    "cnt",
    "deviceDirection",
    "dhost",
    "dpt",
    "dst",
    "dvchost",
    "end",
    "externalId",
    "msg",
    "outcome",
    "proto",
    "reason",
    "rt",
    "spid",
    "sproc",
    "start",
    "suid",
];
const CUSTOM_KEYS: &[&str] = &[
    "cs1",
    "cs2",
    "cs3",
    "cs4",
    "cs5",
    "cs6",
    "cn1",
    "cn2",
    "cn3",
    "c6a3",
    "flexString1",
    "flexString2",
];

fn check_keys(cef: &Cef, name: &str) {
    for key in cef.extension.keys() {
        let custom = key.strip_suffix("Label").unwrap_or(key);
        let known = STANDARD_KEYS.contains(&key.as_str()) || CUSTOM_KEYS.contains(&custom);
        assert!(known, "{name}: {key} is not a CEF key we use");
    }
    for custom in CUSTOM_KEYS {
        assert_eq!(
            cef.extension.contains_key(*custom),
            cef.extension.contains_key(&format!("{custom}Label")),
            "{name}: {custom} and its label go together"
        );
    }
}

#[test]
fn records_parse_back_with_seven_header_fields_and_known_keys() {
    for (name, fixture) in fixtures::all() {
        let cef = parse(&render(Format::Cef, &fixture));
        assert_eq!(cef.header[0], "CEF:0", "{name}");
        assert_eq!(
            &cef.header[1..4],
            ["Tollgate", "tollgate-agent", env!("CARGO_PKG_VERSION")]
        );
        let severity: u8 = cef.header[6].parse().unwrap();
        assert!(severity <= 10, "{name}");
        check_keys(&cef, name);
        assert!(cef.extension.contains_key("rt"), "{name}");
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
fn ipv6_destinations_use_the_custom_ipv6_address() {
    let mut flow = fixtures::denied_pod_flow();
    flow.dst.ip = "2001:db8::1".parse().unwrap();
    let mut out = Vec::new();
    crate::export::format::write(Format::Cef, Record::Flow(&flow), &mut out);
    let cef = parse(std::str::from_utf8(&out).unwrap());
    assert_eq!(cef.extension["c6a3"], "2001:db8::1");
    assert_eq!(cef.extension["c6a3Label"], "Destination IPv6 Address");
    assert!(!cef.extension.contains_key("dst"));
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
