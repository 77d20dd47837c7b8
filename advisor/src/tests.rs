//! Suggesting and replaying, checked against the reference evaluator: a
//! suggested policy allows everything it was made from, wildcards and
//! prefixes stay within their options, and a dry run of a policy without
//! one of its rules reports exactly what that rule allowed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
};

use ipnet::IpNet;
use proptest::prelude::*;
use tollgate_policy::{
    document::parse_documents,
    model::FqdnPattern,
    validate::{validate_all, validate_resource},
};

use crate::{
    recording::{Answer, Evidence, Flow, Recording, Source, SourceKind, Verdict, Workload},
    replay::{Effect, candidate_set, decisions, replay},
    suggest::{Options, collapse_names, cover_addresses, is_internal, render, suggest},
};

const LABELS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const PARENTS: [&str; 4] = [
    "svc.example.com",
    "example.com",
    "x.example.org",
    "b.example.com",
];

fn names() -> impl Strategy<Value = String> {
    (
        proptest::sample::select(&LABELS[..]),
        proptest::option::of(proptest::sample::select(&LABELS[..])),
        proptest::sample::select(&PARENTS[..]),
    )
        .prop_map(|(first, second, parent)| match second {
            Some(second) => format!("{first}.{second}.{parent}"),
            None => format!("{first}.{parent}"),
        })
}

fn addresses() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u8..4, any::<u8>()).prop_map(|(c, d)| IpAddr::from([10, 231, c, d])),
        (0u8..4, any::<u8>()).prop_map(|(c, d)| IpAddr::from([172, 31, c, d])),
        (0u8..4, any::<u8>()).prop_map(|(c, d)| IpAddr::from([20, 50, c, d])),
        (0u8..4, any::<u8>()).prop_map(|(c, d)| IpAddr::from([172, 15, 255, c.wrapping_add(d)])),
        any::<u16>().prop_map(|low| IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, low])),
        any::<u16>().prop_map(|low| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, low])),
    ]
}

fn workloads() -> impl Strategy<Value = (Workload, SourceKind, u64)> {
    proptest::sample::select(vec![
        (Workload::Cgroup("/tgtest/app".into()), SourceKind::Host, 1),
        (
            Workload::Cgroup("/tgtest/batch".into()),
            SourceKind::Host,
            2,
        ),
        (
            Workload::Controller {
                namespace: "prod".into(),
                kind: "Deployment".into(),
                name: "payments".into(),
            },
            SourceKind::Pod,
            3,
        ),
    ])
}

/// One recorded connection: from a workload, to an address (learned under
/// a name, told by dst.fqdn or only by a DNS answer, or not), port and
/// protocol.
#[derive(Clone, Debug)]
struct Seen {
    workload: (Workload, SourceKind, u64),
    ip: IpAddr,
    name: Option<(String, bool)>,
    protocol: u8,
    port: u16,
}

fn seen() -> impl Strategy<Value = Seen> {
    (
        workloads(),
        addresses(),
        proptest::option::of((names(), any::<bool>())),
        proptest::sample::select(vec![6u8, 17, 1, 47]),
        proptest::sample::select(vec![53u16, 443, 8080]),
    )
        .prop_map(|(workload, ip, name, protocol, port)| Seen {
            workload,
            ip,
            name,
            protocol,
            port,
        })
}

fn recording(seen: &[Seen]) -> Recording {
    let mut recording = Recording::default();
    for (i, s) in seen.iter().enumerate() {
        let (workload, kind, cgroup_id) = s.workload.clone();
        let cgroup = match &workload {
            Workload::Cgroup(path) => path.clone(),
            _ => format!("/kubepods.slice/pod-{cgroup_id}"),
        };
        let labels = match kind {
            SourceKind::Pod => BTreeMap::from([("app".to_string(), "payments".to_string())]),
            _ => BTreeMap::new(),
        };
        let fqdn = match &s.name {
            Some((name, told)) => {
                recording.answers.push(Answer {
                    node: "n".into(),
                    cgroup_id,
                    query: name.clone(),
                    addresses: vec![s.ip],
                });
                told.then(|| name.clone())
            }
            None => None,
        };
        let port = if matches!(s.protocol, 6 | 17) {
            s.port
        } else {
            0
        };
        recording.flows.push(Flow {
            source: Source {
                node: "n".into(),
                cgroup_id,
                cgroup: Some(cgroup),
                kind,
                workload,
                labels,
            },
            verdict: Verdict::Allowed,
            protocol: s.protocol,
            ip: s.ip,
            port,
            fqdn,
            policy: None,
            rule: "default".into(),
            evidence: Evidence {
                count: 1 + i as u64 % 3,
                first_seen: format!("2026-12-03T10:00:{:02}.000000000Z", i % 60),
                last_seen: format!("2026-12-03T11:00:{:02}.000000000Z", i % 60),
                processes: BTreeSet::from(["curl".to_string()]),
            },
        });
    }
    recording
}

/// The rendered suggestions, read back and validated as a policy file.
fn suggested_policies(
    recording: &Recording,
    options: &Options,
) -> (String, Vec<tollgate_policy::model::Policy>) {
    let text = render(&suggest(recording, options)).unwrap();
    let documents = parse_documents("suggested.yaml", &text).unwrap();
    let policies = validate_all(&documents).unwrap_or_else(|errors| {
        panic!("{}\n{text}", tollgate_policy::document::describe(&errors))
    });
    for document in &documents {
        if let Err(errors) = validate_resource(document) {
            panic!(
                "not a cluster resource: {}\n{text}",
                tollgate_policy::document::describe(&errors)
            );
        }
    }
    (text, policies)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_suggested_policy_allows_everything_it_was_made_from(
        seen in proptest::collection::vec(seen(), 1..40),
        threshold in 0usize..5,
        max_v4 in 16u8..=32,
        max_v6 in 100u8..=128,
    ) {
        let recording = recording(&seen);
        let options = Options { collapse_threshold: threshold, max_prefix_v4: max_v4, max_prefix_v6: max_v6 };
        let (text, policies) = suggested_policies(&recording, &options);
        let report = replay(&recording, &policies);
        prop_assert!(report.newly_denied.is_empty(), "{:?}\n{text}", report.newly_denied);
        prop_assert!(policies.iter().all(|p| p.mode == tollgate_policy::model::PolicyMode::Observe));

        // And nothing else: a connection to an address none of the
        // workload's flows went to, under no name, is denied.
        let mut other = recording.clone();
        for flow in &mut other.flows {
            flow.ip = IpAddr::from([192, 0, 2, 1]);
            flow.fqdn = None;
        }
        other.answers.clear();
        let outside = replay(&other, &policies);
        let allowed_anyway: Vec<_> = other.flows.iter().filter(|flow| {
            !outside.newly_denied.iter().any(|c| c.workload == flow.source.workload)
        }).collect();
        prop_assert!(allowed_anyway.is_empty(), "{allowed_anyway:?}\n{text}");
    }

    #[test]
    fn collapsing_stays_within_its_threshold(
        names in proptest::collection::btree_set(names(), 1..30),
        threshold in 0usize..6,
    ) {
        let patterns = collapse_names(&names, threshold);
        for name in &names {
            prop_assert!(patterns.iter().any(|p| p.matches(name)), "{name} uncovered by {patterns:?}");
        }
        for pattern in &patterns {
            let matched = names.iter().filter(|name| pattern.matches(name)).count();
            match pattern {
                FqdnPattern::Exact(_) => prop_assert_eq!(matched, 1),
                wildcard => {
                    prop_assert!(threshold >= 2, "{wildcard} without collapsing");
                    prop_assert!(matched >= threshold, "{wildcard} stands on {matched} names");
                    prop_assert!(wildcard.name().split('.').count() >= 2, "{wildcard}");
                }
            }
        }
    }

    #[test]
    fn merged_prefixes_stay_within_their_limits(
        addresses in proptest::collection::btree_set(addresses(), 1..60),
        max_v4 in 0u8..=32,
        max_v6 in 0u8..=128,
    ) {
        let prefixes = cover_addresses(&addresses, max_v4, max_v6);
        for ip in &addresses {
            prop_assert_eq!(prefixes.iter().filter(|p| p.contains(ip)).count(), 1, "{} in {:?}", ip, prefixes);
        }
        for prefix in &prefixes {
            let limit = if matches!(prefix, IpNet::V4(_)) { max_v4 } else { max_v6 };
            prop_assert!(prefix.prefix_len() >= limit, "{prefix} wider than /{limit}");
            prop_assert!(addresses.iter().any(|ip| prefix.contains(ip)), "{prefix} covers nothing seen");
            let internal: BTreeSet<bool> = addresses.iter()
                .filter(|ip| prefix.contains(*ip))
                .map(|ip| is_internal(&IpNet::from(*ip)))
                .collect();
            prop_assert_eq!(internal.len(), 1, "{} mixes internal and public", prefix);
            if !is_internal(prefix) {
                prop_assert!(!["10.0.0.0/8", "172.16.0.0/12", "fc00::/7"].iter()
                    .any(|r| prefix.contains(&r.parse::<IpNet>().unwrap())), "{prefix} holds an internal range");
            }
        }
    }

    /// A candidate without one of the suggested rules reports exactly the
    /// flows that rule decided and no other rule allows, as newly denied
    /// by the default; every other decision stays as it was. (A flow to an
    /// address learned under two names is allowed by either name's rule.)
    #[test]
    fn dropping_a_rule_reports_exactly_what_it_alone_allowed(
        seen in proptest::collection::vec(seen(), 1..30),
        pick in any::<prop::sample::Index>(),
    ) {
        let recording = recording(&seen);
        let (_, policies) = suggested_policies(&recording, &Options::default());
        let with_rules: Vec<usize> = (0..policies.len()).filter(|&i| !policies[i].rules.is_empty()).collect();
        let index = with_rules[pick.index(with_rules.len())];
        let rules = &policies[index].rules;
        let dropped = pick.index(rules.len());
        let mut candidate = policies.clone();
        candidate[index].rules = rules.iter().enumerate().filter(|(i, _)| *i != dropped).map(|(_, r)| r.clone()).collect();
        let report = replay(&recording, &candidate);
        prop_assert!(replay(&recording, &policies).newly_denied.is_empty());
        prop_assert!(report.newly_allowed.is_empty());

        let key = policies[index].key.to_string();
        let (mut decided_by_rule, mut denied_without) = (0, 0);
        let before = decisions(&recording, &policies);
        let after = decisions(&recording, &candidate);
        for ((flow, before), after) in recording.flows.iter().zip(before).zip(after) {
            if before.policy.as_deref() != Some(key.as_str()) || *before.rule != *rules[dropped].name {
                prop_assert_eq!(before, after);
                continue;
            }
            decided_by_rule += flow.evidence.count;
            if after.effect == Effect::Denied {
                prop_assert_eq!(&after.rule, "default");
                denied_without += flow.evidence.count;
            } else {
                prop_assert_ne!(after.rule.as_str(), &*rules[dropped].name);
            }
        }
        prop_assert!(decided_by_rule > 0, "a suggested rule is made of what it allows");
        prop_assert_eq!(report.newly_denied.iter().map(|c| c.count).sum::<u64>(), denied_without);
        for change in &report.newly_denied {
            prop_assert_eq!(change.was.effect, Effect::Allowed);
            prop_assert_eq!(&change.would_be.rule, "default");
        }
    }
}

#[test]
fn reads_the_records_of_the_file_sink() {
    let text = r#"{"type":"flow","time":"2026-12-03T10:00:00.000000001Z","seq":1,"node":"n1","verdict":"allowed","mode":"observe","protocol":"tcp","hook":"connect4","src":{"cgroup_id":7,"cgroup":"/kubepods.slice/p","pid":1,"tid":1,"comm":"curl","uid":0,"gid":0,"identity":"pod","pod_uid":"u","namespace":"prod","pod":"payments-1","container":null,"workload":{"kind":"Deployment","name":"payments"},"labels":{"app":"payments"}},"dst":{"ip":"10.231.1.2","port":443,"fqdn":null},"policy":null,"policy_source":null,"rule":"default","rule_id":0,"generation":1,"socket_cookie":9,"summary":{"count":4,"first_time":"2026-12-03T10:00:00.000000001Z","last_time":"2026-12-03T10:00:09.000000000Z"}}

{"type":"dns","time":"2026-12-03T09:59:59.000000000Z","seq":2,"node":"n1","src":{"cgroup_id":7,"cgroup":"/kubepods.slice/p","pid":1,"tid":1,"comm":"curl","uid":0,"gid":0,"identity":"pod","pod_uid":"u","namespace":"prod","pod":"payments-1","container":null,"workload":null,"labels":null},"resolver":{"ip":"10.0.0.10","port":53},"query":"API.example.com.","query_type":"A","rcode":"NOERROR","answers":[{"name":"api.example.com","type":"CNAME","data":"edge.example.net","ttl":60},{"name":"edge.example.net","type":"A","data":"10.231.1.2","ttl":60}],"learned":false}
{"type":"loss","time":"2026-12-03T10:00:01.000000000Z","seq":3,"node":"n1","count":5,"reason":"kernel_ringbuf","sink":null,"first_seq":null,"last_seq":null}
"#;
    let mut recording = Recording::default();
    recording.read_json_lines(text).unwrap();
    assert_eq!(recording.lost, 5);
    let flow = &recording.flows[0];
    assert_eq!(
        flow.source.workload,
        Workload::Controller {
            namespace: "prod".into(),
            kind: "Deployment".into(),
            name: "payments".into()
        }
    );
    assert_eq!(flow.evidence.count, 4);
    assert_eq!(flow.evidence.last_seen, "2026-12-03T10:00:09.000000000Z");
    assert_eq!(flow.ip, IpAddr::V4(Ipv4Addr::new(10, 231, 1, 2)));
    assert_eq!(
        recording.learned_names(),
        [BTreeSet::from(["api.example.com"])],
        "the question names the addresses at the end of its chain"
    );

    let error = recording
        .read_json_lines("{\"type\":\"flow\"}\n")
        .unwrap_err();
    assert_eq!(error.line, 1);
    assert!(error.message.contains("missing field"), "{error}");
}

#[test]
fn a_suggestion_reads_as_a_commented_policy() {
    let seen: Vec<Seen> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .map(|(i, label)| Seen {
            workload: (Workload::Cgroup("/tgtest/app".into()), SourceKind::Host, 1),
            ip: IpAddr::from([10, 232, 0, i as u8 + 1]),
            name: Some((format!("{label}.svc.example.com"), true)),
            protocol: 6,
            port: 443,
        })
        .collect();
    let options = Options {
        collapse_threshold: 3,
        ..Options::default()
    };
    let (text, policies) = suggested_policies(&recording(&seen), &options);
    assert_eq!(policies.len(), 1);
    assert_eq!(policies[0].key.name, "cgroup-tgtest-app-egress");
    assert!(
        text.contains(
            "  # 6 connections, first 2026-12-03T10:00:00.000000000Z, last 2026-12-03T11:00:02.000000000Z, by curl\n  - name: to-*.svc.example.com\n"
        ),
        "{text}"
    );
    assert!(text.contains("mode: observe"), "{text}");
    assert!(
        text.contains("kind: ClusterEgressPolicy"),
        "a host's: {text}"
    );
}

#[test]
fn candidates_replace_the_policies_of_their_name_beside_the_others() {
    let policy = |name: &str, cidr: &str| {
        let text = format!(
            "apiVersion: policy.tollgate.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: {name}}}\nspec:\n  cgroupSelector: {{paths: [/app]}}\n  egress: [{{to: [{{cidr: {cidr}}}]}}]\n"
        );
        parse_documents(name, &text).unwrap().remove(0).policy
    };
    let in_force = [policy("a", "10.0.0.0/8"), policy("b", "10.1.0.0/16")];
    let set = candidate_set(&in_force, &[policy("b", "10.2.0.0/16")]).unwrap();
    let rules: Vec<String> = set
        .iter()
        .map(|p| format!("{} {:?}", p.key, p.rules[0].to))
        .collect();
    assert_eq!(set.len(), 2, "{rules:?}");
    assert!(
        rules[1].starts_with("b ") && rules[1].contains("10.2.0.0/16"),
        "{rules:?}"
    );

    let errors = candidate_set(&in_force, &[policy("c", "10.0.0.0/33")]).unwrap_err();
    assert_eq!(errors[0].document.source, "candidates", "{errors:?}");
}

#[test]
fn consecutive_ports_become_ranges() {
    let seen: Vec<Seen> = [80u16, 81, 82, 443, 8080]
        .iter()
        .map(|&port| Seen {
            workload: (Workload::Cgroup("/tgtest/app".into()), SourceKind::Host, 1),
            ip: IpAddr::from([10, 231, 1, 2]),
            name: None,
            protocol: 6,
            port,
        })
        .collect();
    let (text, policies) = suggested_policies(&recording(&seen), &Options::default());
    let ports: Vec<_> = policies[0].rules[0]
        .ports
        .iter()
        .map(|p| (p.ports.first, p.ports.last))
        .collect();
    assert_eq!(ports, [(80, 82), (443, 443), (8080, 8080)], "{text}");
}
