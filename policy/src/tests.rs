//! The compiler against the reference evaluator: worked examples of the
//! cases that make push-down necessary, then a property test over random
//! policy sets and destinations (32,000 comparisons per run).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;
use proptest::prelude::*;

use super::{
    compile::{CompileError, Compiled, Compiler, compile},
    evaluate::{Outcome, evaluate},
    model::*,
};

use tollgate_common::protocol::{ICMP, ICMPV6, SCTP, TCP, UDP, has_ports};

fn cidr(text: &str) -> Peer {
    Peer::Cidr {
        net: text.parse().unwrap(),
        except: Box::default(),
    }
}

fn rule(action: Action, to: Vec<Peer>, ports: Vec<PortSpec>) -> Rule {
    Rule {
        name: "".into(),
        action,
        to: to.into(),
        ports: ports.into(),
    }
}

fn tcp(port: u16) -> PortSpec {
    PortSpec {
        ports: PortRange::single(port),
        protocol: Protocol::Tcp,
    }
}

fn policy(name: &str, default_action: Action, mode: PolicyMode, rules: Vec<Rule>) -> Policy {
    let rules = rules
        .into_iter()
        .enumerate()
        .map(|(i, r)| Rule {
            name: format!("egress[{i}]").into(),
            ..r
        })
        .collect();
    Policy {
        key: PolicyKey {
            namespace: None,
            name: name.into(),
        },
        mode,
        default_action,
        selector: Selector {
            pods: None,
            cgroups: vec!["/x".into()],
        },
        rules,
    }
}

fn compile_for_one(policies: &[Policy]) -> Result<Compiled, CompileError> {
    compile(
        policies,
        &BTreeMap::from([(1, (0..policies.len()).collect())]),
    )
}

/// The kernel's outcome for the compiled set of endpoint 1.
fn kernel_outcome(
    compiled: &Compiled,
    ip: IpAddr,
    port: u16,
    protocol: u8,
    global: PolicyMode,
) -> (Outcome, u32) {
    let set = &compiled.rules.sets[compiled.rules.endpoints[&1] as usize];
    outcome_of(set.decide(ip, port, protocol, global, &[]), global)
}

/// The verdict the kernel gives a decision under the global mode.
fn outcome_of(
    (action, mode, rule_id): (Action, PolicyMode, u32),
    global: PolicyMode,
) -> (Outcome, u32) {
    let enforce = match mode {
        PolicyMode::Inherit => global == PolicyMode::Enforce,
        mode => mode == PolicyMode::Enforce,
    };
    let outcome = match (action, enforce) {
        (Action::Allow, _) => Outcome::Allowed,
        (Action::Deny, true) => Outcome::Denied,
        (Action::Deny, false) => Outcome::Audit,
    };
    (outcome, rule_id)
}

/// Asserts that the compiled datapath and the reference agree, and returns
/// the outcome with the name of the deciding rule.
fn decide(
    policies: &[Policy],
    compiled: &Compiled,
    ip: &str,
    port: u16,
    protocol: u8,
    global: PolicyMode,
) -> (Outcome, String) {
    let ip: IpAddr = ip.parse().unwrap();
    let refs: Vec<&Policy> = policies.iter().collect();
    let reference = evaluate(&refs, ip, port, protocol, global, &[]);
    let (outcome, rule_id) = kernel_outcome(compiled, ip, port, protocol, global);
    let kernel_rule = (rule_id != 0).then(|| {
        let (policy, rule) = compiled
            .names
            .rule(rule_id)
            .expect("every rule id is named");
        format!("{policy}/{rule}")
    });
    let reference_rule = reference
        .rule
        .map(|(p, i)| format!("{}/{}", p.key, p.rules[i].name));
    assert_eq!(
        (outcome, &kernel_rule),
        (reference.outcome, &reference_rule),
        "{ip} {port}/{protocol} under {global:?}"
    );
    (outcome, kernel_rule.unwrap_or_else(|| "default".into()))
}

#[test]
fn except_blocks_carve_out_of_an_allow() {
    let mut allow = rule(Action::Allow, vec![], vec![]);
    allow.to = smallvec![Peer::Cidr {
        net: "10.0.0.0/8".parse().unwrap(),
        except: ["10.1.0.0/16".parse().unwrap()].into(),
    }];
    let policies = [policy("p", Action::Deny, PolicyMode::Enforce, vec![allow])];
    let compiled = compile_for_one(&policies).unwrap();
    let g = PolicyMode::Enforce;
    assert_eq!(
        decide(&policies, &compiled, "10.2.0.1", 80, TCP, g),
        (Outcome::Allowed, "p/egress[0]".into())
    );
    assert_eq!(
        decide(&policies, &compiled, "10.1.2.3", 80, TCP, g),
        (Outcome::Denied, "default".into())
    );
    assert_eq!(
        decide(&policies, &compiled, "11.0.0.1", 80, TCP, g),
        (Outcome::Denied, "default".into())
    );
}

#[test]
fn a_broad_deny_beats_a_narrow_allow() {
    let policies = [policy(
        "p",
        Action::Allow,
        PolicyMode::Inherit,
        vec![
            rule(Action::Allow, vec![cidr("10.1.1.1/32")], vec![]),
            rule(Action::Deny, vec![cidr("10.0.0.0/8")], vec![tcp(22)]),
        ],
    )];
    let compiled = compile_for_one(&policies).unwrap();
    // The /32 is the longest match, so it must carry the /8's deny, first.
    let list = &compiled.rules.sets[0]
        .v4
        .iter()
        .find(|(n, _)| n.prefix_len() == 32)
        .unwrap()
        .1;
    assert_eq!(
        list.iter().map(|r| r.action).collect::<Vec<_>>(),
        [Action::Deny, Action::Allow]
    );
    for global in [PolicyMode::Enforce, PolicyMode::Observe] {
        let blocked = if global == PolicyMode::Enforce {
            Outcome::Denied
        } else {
            Outcome::Audit
        };
        assert_eq!(
            decide(&policies, &compiled, "10.1.1.1", 22, TCP, global),
            (blocked, "p/egress[1]".into())
        );
        assert_eq!(
            decide(&policies, &compiled, "10.1.1.1", 22, UDP, global),
            (Outcome::Allowed, "p/egress[0]".into())
        );
        assert_eq!(
            decide(&policies, &compiled, "10.9.9.9", 22, TCP, global),
            (blocked, "p/egress[1]".into())
        );
    }
}

#[test]
fn the_strongest_mode_decides_between_denies_and_defaults() {
    let deny_all = || rule(Action::Deny, vec![cidr("0.0.0.0/0")], vec![tcp(25)]);
    let policies = [
        policy(
            "a-observe",
            Action::Deny,
            PolicyMode::Observe,
            vec![deny_all()],
        ),
        policy(
            "b-enforce",
            Action::Deny,
            PolicyMode::Enforce,
            vec![deny_all()],
        ),
        policy("c-allow-list", Action::Allow, PolicyMode::Observe, vec![]),
    ];
    let compiled = compile_for_one(&policies).unwrap();
    let g = PolicyMode::Observe;
    assert_eq!(
        decide(&policies, &compiled, "192.0.2.1", 25, TCP, g),
        (Outcome::Denied, "b-enforce/egress[0]".into())
    );
    assert_eq!(
        decide(&policies, &compiled, "192.0.2.1", 26, TCP, g),
        (Outcome::Denied, "default".into())
    );
    // The default is owned by the policies whose default is deny.
    let owners: Vec<String> = compiled.names.set_defaults[0]
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(owners, ["a-observe", "b-enforce"]);
}

#[test]
fn an_observing_deny_never_weakens_an_enforced_default() {
    let policies = [
        policy(
            "a-trial",
            Action::Allow,
            PolicyMode::Observe,
            vec![rule(Action::Deny, vec![cidr("10.0.0.0/8")], vec![tcp(25)])],
        ),
        policy(
            "b-strict",
            Action::Deny,
            PolicyMode::Enforce,
            vec![rule(Action::Allow, vec![cidr("10.1.0.0/16")], vec![])],
        ),
    ];
    let compiled = compile_for_one(&policies).unwrap();
    let g = PolicyMode::Enforce;
    // b-strict blocks 10.2.0.1:25 by default; a-trial's observed deny must not let it through.
    assert_eq!(
        decide(&policies, &compiled, "10.2.0.1", 25, TCP, g),
        (Outcome::Denied, "default".into())
    );
    // b-strict allows 10.1.0.1: a-trial's deny is only observed.
    assert_eq!(
        decide(&policies, &compiled, "10.1.0.1", 25, TCP, g),
        (Outcome::Audit, "a-trial/egress[0]".into())
    );
    assert_eq!(
        decide(&policies, &compiled, "10.1.0.1", 80, TCP, g),
        (Outcome::Allowed, "b-strict/egress[0]".into())
    );
}

#[test]
fn endpoints_selected_by_the_same_policies_share_a_set() {
    let policies = [
        policy(
            "a",
            Action::Deny,
            PolicyMode::Inherit,
            vec![rule(Action::Allow, vec![cidr("10.0.0.0/8")], vec![])],
        ),
        policy(
            "b",
            Action::Deny,
            PolicyMode::Inherit,
            vec![rule(Action::Allow, vec![cidr("fd00::/8")], vec![tcp(443)])],
        ),
    ];
    let endpoints = BTreeMap::from([
        (1, vec![0]),
        (2, vec![0]),
        (3, vec![1, 0]),
        (4, vec![0, 1]),
        (5, vec![]),
    ]);
    let compiled = compile(&policies, &endpoints).unwrap();
    let e = &compiled.rules.endpoints;
    assert_eq!((e[&1], e[&2], e[&3], e[&4]), (0, 0, 1, 1));
    assert!(
        !e.contains_key(&5),
        "an endpoint no policy selects is not restricted"
    );
    assert_eq!(compiled.rules.sets.len(), 2);
    assert_eq!(
        compiled.rules.sets[1].v6[0].1[0].rule_id, 2,
        "ids follow policy key order"
    );
}

#[test]
fn a_change_to_one_policy_recompiles_only_the_sets_it_is_in() {
    let allow = |net: &str| rule(Action::Allow, vec![cidr(net)], vec![]);
    let mut policies = vec![
        policy(
            "a",
            Action::Deny,
            PolicyMode::Inherit,
            vec![allow("10.1.0.0/16")],
        ),
        policy(
            "b",
            Action::Deny,
            PolicyMode::Inherit,
            vec![allow("10.2.0.0/16")],
        ),
        policy(
            "c",
            Action::Deny,
            PolicyMode::Inherit,
            vec![allow("10.3.0.0/16")],
        ),
    ];
    let endpoints = BTreeMap::from([(1, vec![0]), (2, vec![1]), (3, vec![0, 2]), (4, vec![0])]);
    let mut compiler = super::compile::Compiler::default();
    let first = compiler.compile(&policies, &endpoints).unwrap();
    assert_eq!(
        compiler.last_stats(),
        super::compile::CompileStats {
            sets_compiled: 3,
            sets_reused: 0,
            policies_numbered: 3,
        }
    );

    policies[1].rules = policies[1]
        .rules
        .iter()
        .cloned()
        .chain([allow("10.9.0.0/16")])
        .collect();
    let second = compiler.compile(&policies, &endpoints).unwrap();
    assert_eq!(
        compiler.last_stats(),
        super::compile::CompileStats {
            sets_compiled: 1,
            sets_reused: 2,
            policies_numbered: 1,
        }
    );
    // Untouched sets are the very same, rule ids included.
    let set_of = |c: &Compiled, e: u64| c.rules.sets[c.rules.endpoints[&e] as usize].clone();
    assert_eq!(set_of(&first, 1), set_of(&second, 1));
    assert_eq!(set_of(&first, 3), set_of(&second, 3));
    // And the incremental result decides like a compilation from scratch.
    let fresh = compile(&policies, &endpoints).unwrap();
    for endpoint in [1, 2, 3] {
        for ip in ["10.1.0.1", "10.2.0.1", "10.3.0.1", "10.9.0.1", "10.8.0.1"] {
            let name = |c: &Compiled| {
                let (action, _, id) = set_of(c, endpoint).decide(
                    ip.parse().unwrap(),
                    80,
                    TCP,
                    PolicyMode::Enforce,
                    &[],
                );
                (
                    action,
                    c.names
                        .rule(id)
                        .map(|(policy, rule)| (policy.clone(), rule.to_owned())),
                )
            };
            assert_eq!(name(&second), name(&fresh), "endpoint {endpoint}, {ip}");
        }
    }
}

#[test]
fn a_failed_compilation_changes_nothing_in_the_compiler() {
    let allow = |net: &str, ports: Vec<PortSpec>| rule(Action::Allow, vec![cidr(net)], ports);
    let a = policy(
        "a",
        Action::Deny,
        PolicyMode::Inherit,
        vec![allow("10.1.0.0/16", vec![])],
    );
    let b = policy(
        "b",
        Action::Deny,
        PolicyMode::Inherit,
        vec![allow("10.2.0.0/16", vec![])],
    );
    let wide = policy(
        "c-wide",
        Action::Deny,
        PolicyMode::Inherit,
        vec![allow("10.0.0.0/8", (1..=17).map(tcp).collect())],
    );
    let mut compiler = super::compile::Compiler::default();
    compiler
        .compile(
            &[a.clone(), b.clone()],
            &BTreeMap::from([(1, vec![0]), (2, vec![1])]),
        )
        .unwrap();
    // A deletion of `a` that fails (another endpoint's set is over a limit) ...
    let failed = compiler.compile(
        &[b.clone(), wide.clone()],
        &BTreeMap::from([(2, vec![0]), (3, vec![1])]),
    );
    assert!(matches!(failed, Err(CompileError::TooManyPortRules { .. })));
    // ... must leave `a` and its cached set as they were: their ids still name them.
    let compiled = compiler
        .compile(&[a, b], &BTreeMap::from([(1, vec![0]), (2, vec![1])]))
        .unwrap();
    for endpoint in [1, 2] {
        let set = &compiled.rules.sets[compiled.rules.endpoints[&endpoint] as usize];
        let id = set.v4[0].1[0].rule_id;
        assert!(
            compiled.names.rule(id).is_some(),
            "rule id {id} of endpoint {endpoint} has no name"
        );
    }
}

#[test]
fn prefixes_that_change_nothing_get_no_entry() {
    // The except's own allow rule repeats the /8's list: no extra entry for
    // 10.1.0.0/16 is needed except the carve-out.
    let policies = [policy(
        "p",
        Action::Deny,
        PolicyMode::Inherit,
        vec![
            rule(Action::Allow, vec![cidr("10.0.0.0/8")], vec![]),
            rule(Action::Allow, vec![cidr("10.0.0.0/8")], vec![]),
        ],
    )];
    let compiled = compile_for_one(&policies).unwrap();
    assert_eq!(compiled.rules.sets[0].v4.len(), 1);
    assert!(compiled.rules.sets[0].v6.is_empty());
}

fn fqdn(text: &str) -> Peer {
    Peer::Fqdn(super::fqdn::parse_pattern(text).unwrap())
}

/// Decides for endpoint 1 with `ip` learned for `learned`, checked against
/// the reference evaluator; returns the outcome and the deciding rule.
fn decide_learned(
    policies: &[Policy],
    compiled: &Compiled,
    ip: &str,
    learned: &[&str],
    global: PolicyMode,
) -> (Outcome, String) {
    let ip: IpAddr = ip.parse().unwrap();
    let patterns: Vec<FqdnPattern> = learned
        .iter()
        .map(|p| super::fqdn::parse_pattern(p).unwrap())
        .collect();
    let pattern_refs: Vec<&FqdnPattern> = patterns.iter().collect();
    let ids: Vec<u32> = compiled
        .rules
        .fqdn_patterns
        .iter()
        .filter(|(_, p)| patterns.contains(p))
        .map(|(id, _)| *id)
        .collect();
    let refs: Vec<&Policy> = policies.iter().collect();
    let reference = evaluate(&refs, ip, 443, TCP, global, &pattern_refs);
    let set = &compiled.rules.sets[compiled.rules.endpoints[&1] as usize];
    let (outcome, rule_id) = outcome_of(set.decide(ip, 443, TCP, global, &ids), global);
    let kernel_rule = if rule_id != 0 {
        compiled
            .names
            .rule(rule_id)
            .expect("every rule id is named")
            .1
            .to_owned()
    } else {
        "default".into()
    };
    let reference_rule = reference
        .rule
        .map_or_else(|| "default".into(), |(p, i)| p.rules[i].name.to_string());
    assert_eq!(
        (outcome, &kernel_rule),
        (reference.outcome, &reference_rule)
    );
    (outcome, kernel_rule)
}

#[test]
fn fqdn_rules_hold_exactly_the_addresses_learned_for_their_pattern() {
    let policies = [policy(
        "registry",
        Action::Deny,
        PolicyMode::Enforce,
        vec![
            rule(Action::Allow, vec![fqdn("*.azurecr.io")], vec![tcp(443)]),
            rule(
                Action::Allow,
                vec![fqdn("login.microsoftonline.com")],
                vec![],
            ),
        ],
    )];
    let compiled = compile_for_one(&policies).unwrap();
    assert_eq!(compiled.rules.fqdn_patterns.len(), 2);
    let enforce = PolicyMode::Enforce;
    assert_eq!(
        decide_learned(&policies, &compiled, "20.1.2.3", &["*.azurecr.io"], enforce),
        (Outcome::Allowed, "egress[0]".into())
    );
    assert_eq!(
        decide_learned(&policies, &compiled, "20.1.2.3", &[], enforce),
        (Outcome::Denied, "default".into())
    );
    // Learned for a pattern this set does not use: nothing.
    assert_eq!(
        decide_learned(
            &policies,
            &compiled,
            "20.1.2.3",
            &["*.example.com"],
            enforce
        ),
        (Outcome::Denied, "default".into())
    );
}

#[test]
fn fqdn_and_cidr_rules_combine_by_precedence() {
    let policies = [policy(
        "mixed",
        Action::Allow,
        PolicyMode::Inherit,
        vec![
            rule(Action::Allow, vec![cidr("10.0.0.0/8")], vec![]),
            rule(Action::Deny, vec![fqdn("**.pastebin.com")], vec![]),
        ],
    )];
    let compiled = compile_for_one(&policies).unwrap();
    for global in [PolicyMode::Observe, PolicyMode::Enforce] {
        // The deny of the name wins over the allow of the prefix.
        let (outcome, rule) = decide_learned(
            &policies,
            &compiled,
            "10.9.9.9",
            &["**.pastebin.com"],
            global,
        );
        assert_eq!(rule, "egress[1]");
        assert_ne!(outcome, Outcome::Allowed);
        assert_eq!(
            decide_learned(&policies, &compiled, "10.9.9.9", &[], global),
            (Outcome::Allowed, "egress[0]".into())
        );
    }
}

#[test]
fn too_many_rules_for_one_name_is_an_error_that_says_so() {
    let ports = (1..=17).map(tcp).collect();
    let policies = [policy(
        "wide",
        Action::Deny,
        PolicyMode::Inherit,
        vec![rule(Action::Allow, vec![fqdn("api.example.com")], ports)],
    )];
    let err = compile_for_one(&policies).unwrap_err();
    assert_eq!(
        err.to_string(),
        "17 port rules apply to names matching api.example.com for endpoints selected by wide; the datapath holds \
         at most 16 per name (merge rules, or use fewer port entries)"
    );
}

#[test]
fn fqdn_pattern_ids_stay_while_a_pattern_is_used_and_are_adopted() {
    let with = |patterns: &[&str]| {
        [policy(
            "p",
            Action::Deny,
            PolicyMode::Inherit,
            patterns
                .iter()
                .map(|p| rule(Action::Allow, vec![fqdn(p)], vec![]))
                .collect(),
        )]
    };
    let endpoints = BTreeMap::from([(1, vec![0])]);
    let mut compiler = Compiler::default();
    let first = compiler
        .compile(&with(&["a.example.com", "*.b.example.com"]), &endpoints)
        .unwrap();
    let second = compiler
        .compile(&with(&["*.b.example.com", "c.example.com"]), &endpoints)
        .unwrap();
    let id_of = |c: &Compiled, p: &str| {
        let pattern = super::fqdn::parse_pattern(p).unwrap();
        c.rules
            .fqdn_patterns
            .iter()
            .find(|(_, q)| **q == pattern)
            .map(|(id, _)| *id)
    };
    assert_eq!(
        id_of(&first, "*.b.example.com"),
        id_of(&second, "*.b.example.com")
    );
    assert_eq!(id_of(&second, "a.example.com"), None);
    let ids: std::collections::BTreeSet<u32> = second.rules.fqdn_patterns.keys().copied().collect();
    assert_eq!(ids.len(), 2, "distinct ids");
    // Addresses learned for a.example.com live on until their TTL: its id
    // is never given to another pattern.
    assert_eq!(id_of(&second, "c.example.com"), Some(3));
    let with_d = compiler
        .compile(&with(&["*.b.example.com", "d.example.com"]), &endpoints)
        .unwrap();
    assert_eq!(id_of(&with_d, "d.example.com"), Some(4));

    // A compilation whose switch failed keeps the ids in force, but the
    // ones it handed out (the kernel may hold them) are not handed out
    // again.
    let mut failed = compiler.clone();
    let not_in_force = failed
        .compile(&with(&["*.b.example.com", "e.example.com"]), &endpoints)
        .unwrap();
    assert_eq!(id_of(&not_in_force, "e.example.com"), Some(5));
    compiler.retire_fqdn_ids_of(&failed);
    let after_failure = compiler
        .compile(
            &with(&["*.b.example.com", "d.example.com", "f.example.com"]),
            &endpoints,
        )
        .unwrap();
    assert_eq!(id_of(&after_failure, "d.example.com"), Some(4));
    assert_eq!(id_of(&after_failure, "f.example.com"), Some(6));

    // A new agent adopting the kernel's ids keeps them, and hands out new
    // ones above every id a learned address still refers to.
    let mut restarted = Compiler::default();
    restarted.adopt_fqdn_ids(
        second
            .rules
            .fqdn_patterns
            .iter()
            .map(|(id, p)| (p.clone(), *id))
            .collect(),
        9,
    );
    let third = restarted
        .compile(&with(&["c.example.com", "*.b.example.com"]), &endpoints)
        .unwrap();
    assert_eq!(third.rules.fqdn_patterns, second.rules.fqdn_patterns);
    let after_restart = restarted
        .compile(&with(&["*.b.example.com", "e.example.com"]), &endpoints)
        .unwrap();
    assert_eq!(id_of(&after_restart, "e.example.com"), Some(10));

    // The names may hold a higher id than any learned address.
    let mut restarted = Compiler::default();
    restarted.adopt_fqdn_ids(
        BTreeMap::from([(super::fqdn::parse_pattern("c.example.com").unwrap(), 7)]),
        3,
    );
    let from_names = restarted
        .compile(&with(&["c.example.com", "g.example.com"]), &endpoints)
        .unwrap();
    assert_eq!(id_of(&from_names, "c.example.com"), Some(7));
    assert_eq!(id_of(&from_names, "g.example.com"), Some(8));
}

#[test]
fn ids_never_wrap_around_to_none() {
    let endpoints = BTreeMap::from([(1, vec![0])]);
    let policies = [policy(
        "p",
        Action::Deny,
        PolicyMode::Inherit,
        vec![rule(Action::Allow, vec![fqdn("a.example.com")], vec![])],
    )];
    let mut compiler = Compiler::default();
    compiler.adopt_fqdn_ids(BTreeMap::new(), u32::MAX);
    let err = compiler.compile(&policies, &endpoints).unwrap_err();
    assert_eq!(
        err.to_string(),
        "every FQDN pattern id has been handed out; `tollgate-agent cleanup` (which removes the pins and what the \
         kernel learned) starts them over"
    );
}

#[test]
fn too_many_rules_for_one_prefix_is_an_error_that_says_so() {
    let ports = (1..=17).map(tcp).collect();
    let policies = [policy(
        "wide",
        Action::Deny,
        PolicyMode::Inherit,
        vec![rule(Action::Allow, vec![cidr("10.0.0.0/8")], ports)],
    )];
    let err = compile_for_one(&policies).unwrap_err();
    assert_eq!(
        err.to_string(),
        "17 port rules apply to 10.0.0.0/8 for endpoints selected by wide; the datapath holds at most 16 per prefix \
         (merge rules, or use fewer port entries)"
    );
}

#[test]
fn the_shipped_examples_are_valid() {
    let examples = [
        (
            "host-allow-list.yaml",
            include_str!("../../examples/policies/host-allow-list.yaml"),
        ),
        (
            "observe-first.yaml",
            include_str!("../../examples/policies/observe-first.yaml"),
        ),
        (
            "deny-instance-metadata.yaml",
            include_str!("../../examples/policies/deny-instance-metadata.yaml"),
        ),
        (
            "aks-allow-list.yaml",
            include_str!("../../examples/policies/aks-allow-list.yaml"),
        ),
        (
            "aks-minimal-egress.yaml",
            include_str!("../../examples/policies/aks-minimal-egress.yaml"),
        ),
    ];
    for (name, text) in examples {
        let documents =
            super::document::parse_documents(name, text).unwrap_or_else(|e| panic!("{e:?}"));
        let policies =
            super::validate::validate_all(&documents).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        let compiled = compile(
            &policies,
            &BTreeMap::from([(1, (0..policies.len()).collect())]),
        );
        assert!(compiled.is_ok(), "{name}: {compiled:?}");
    }
}

#[test]
fn the_aks_minimal_egress_example_selects_application_namespaces_only() {
    use super::select::{Endpoint, Identity, Labels, select_endpoints};
    let text = include_str!("../../examples/policies/aks-minimal-egress.yaml");
    let documents = super::document::parse_documents("aks", text).unwrap();
    let policies = super::validate::validate_all(&documents).unwrap();
    let namespaces: Vec<(&str, Labels)> = ["default", "shop", "kube-system", "tollgate-system"]
        .into_iter()
        .map(|name| {
            let labels = Labels::from([("kubernetes.io/metadata.name".into(), name.into())]);
            (name, labels)
        })
        .collect();
    let pod_labels = Labels::from([("app".into(), "x".into())]);
    let endpoints = namespaces
        .iter()
        .zip(1..)
        .map(|((name, labels), id)| Endpoint {
            cgroup_id: id,
            path: "/kubepods.slice/x",
            identity: Identity::Pod {
                namespace: name,
                labels: &pod_labels,
                namespace_labels: labels,
            },
        });
    let selected: Vec<u64> = select_endpoints(&policies, endpoints, None)
        .into_keys()
        .collect();
    assert_eq!(
        selected,
        [1, 2],
        "default and shop, not the system namespaces"
    );
}

// ---- property test -------------------------------------------------------

fn v4_in_space() -> impl Strategy<Value = Ipv4Addr> {
    (0u8..4, any::<u8>(), any::<u8>()).prop_map(|(b, c, d)| Ipv4Addr::new(10, b, c, d))
}

fn v6_in_space() -> impl Strategy<Value = Ipv6Addr> {
    (0u16..4, 0u16..4, any::<u16>())
        .prop_map(|(a, b, c)| Ipv6Addr::new(0xfd00, a, b, 0, 0, 0, 0, c))
}

fn prefix() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        3 => (v4_in_space(), prop::sample::select(vec![0u8, 8, 14, 16, 22, 24, 30, 32]))
            .prop_map(|(ip, len)| IpNet::new(IpAddr::V4(ip), len).unwrap().trunc()),
        1 => (v6_in_space(), prop::sample::select(vec![0u8, 16, 32, 48, 112, 128]))
            .prop_map(|(ip, len)| IpNet::new(IpAddr::V6(ip), len).unwrap().trunc()),
    ]
}

/// A prefix strictly inside `net`, or None when `net` is a host.
fn inside(net: IpNet, seed: u128, extra: u8) -> Option<IpNet> {
    let max = net.max_prefix_len();
    if net.prefix_len() == max {
        return None;
    }
    let len = (net.prefix_len() + 1 + extra % (max - net.prefix_len())).min(max);
    let addr = match net {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(
            u32::from(n.network()) | (seed as u32 & u32::from(n.hostmask())),
        )),
        IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(
            u128::from(n.network()) | (seed & u128::from(n.hostmask())),
        )),
    };
    Some(IpNet::new(addr, len).unwrap().trunc())
}

/// The FQDN patterns the property test draws from; a destination is
/// learned for a random subset of them.
const PATTERN_POOL: [&str; 3] = ["api.example.com", "*.example.com", "**.example.org"];

fn peer() -> impl Strategy<Value = Peer> {
    prop_oneof![
        4 => cidr_peer(),
        1 => prop::sample::select(PATTERN_POOL.to_vec()).prop_map(fqdn),
    ]
}

fn cidr_peer() -> impl Strategy<Value = Peer> {
    (
        prefix(),
        prop::collection::vec((any::<u128>(), any::<u8>()), 0..=2),
    )
        .prop_map(|(net, excepts)| {
            let except = excepts
                .into_iter()
                .filter_map(|(seed, extra)| inside(net, seed, extra))
                .collect();
            Peer::Cidr { net, except }
        })
}

fn port_spec() -> impl Strategy<Value = PortSpec> {
    (
        1u16..=12,
        0u16..=3,
        prop::sample::select(vec![
            Protocol::Any,
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Sctp,
            Protocol::Icmp,
            Protocol::Icmpv6,
        ]),
        any::<bool>(),
    )
        .prop_map(|(first, width, protocol, any_port)| PortSpec {
            ports: if any_port || !protocol.has_ports() {
                PortRange::ANY
            } else {
                PortRange {
                    first,
                    last: first + width,
                }
            },
            protocol,
        })
}

fn any_rule() -> impl Strategy<Value = Rule> {
    (
        prop::sample::select(vec![Action::Allow, Action::Deny]),
        prop::collection::vec(peer(), 0..=2),
        prop::collection::vec(port_spec(), 0..=2),
    )
        .prop_map(|(action, to, ports)| rule(action, to, ports))
}

fn policies() -> impl Strategy<Value = Vec<Policy>> {
    let one = (
        prop::sample::select(vec![Action::Allow, Action::Deny]),
        prop::sample::select(vec![
            PolicyMode::Inherit,
            PolicyMode::Observe,
            PolicyMode::Enforce,
        ]),
        prop::collection::vec(any_rule(), 0..=3),
    );
    prop::collection::vec(one, 1..=3).prop_map(|ps| {
        ps.into_iter()
            .enumerate()
            .map(|(i, (default_action, mode, rules))| {
                policy(&format!("p{i}"), default_action, mode, rules)
            })
            .collect()
    })
}

/// Destinations: random ones, and ones inside the policies' own prefixes,
/// where the interesting boundaries are.
fn destinations(policies: &[Policy], seeds: &[(u128, u16, u8, bool)]) -> Vec<(IpAddr, u16, u8)> {
    let nets: Vec<IpNet> = policies
        .iter()
        .flat_map(|p| p.rules.iter())
        .flat_map(|r| &r.to)
        .flat_map(|peer| match peer {
            Peer::Cidr { net, except } => std::iter::once(*net)
                .chain(except.iter().copied())
                .collect::<Vec<_>>(),
            Peer::Fqdn(_) => vec![],
        })
        .collect();
    seeds
        .iter()
        .map(|&(seed, port, protocol, near_a_prefix)| {
            let ip = if near_a_prefix && !nets.is_empty() {
                let net = nets[(seed % nets.len() as u128) as usize];
                inside(net, seed >> 8, 255).map_or(net.network(), |n| n.network())
            } else if seed % 4 == 0 {
                IpAddr::V6(Ipv6Addr::new(
                    0xfd00,
                    (seed >> 8) as u16 % 4,
                    (seed >> 24) as u16 % 4,
                    0,
                    0,
                    0,
                    0,
                    (seed >> 40) as u16,
                ))
            } else {
                IpAddr::V4(Ipv4Addr::new(
                    10,
                    (seed >> 8) as u8 % 4,
                    (seed >> 16) as u8,
                    (seed >> 24) as u8,
                ))
            };
            let protocol = [TCP, UDP, ICMP, SCTP, ICMPV6][protocol as usize % 5];
            // The datapath judges a protocol without ports with port 0.
            let port = if has_ports(protocol) { port } else { 0 };
            (ip, port, protocol)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// 1,000 policy sets x 16 destinations x 2 endpoints x 2 global modes,
    /// each destination learned for a random subset of the FQDN patterns.
    #[test]
    fn compiled_datapath_agrees_with_the_reference_evaluator(
        policies in policies(),
        subset in prop::collection::vec(any::<bool>(), 3),
        seeds in prop::collection::vec((any::<u128>(), prop_oneof![15 => 1u16..=16, 1 => Just(65_535u16)], any::<u8>(), any::<bool>()), 16),
        learned_sets in prop::collection::vec(0u8..8, 16),
    ) {
        // Endpoint 1: every policy; endpoint 2: a subset (at least the first).
        let chosen: Vec<usize> = (0..policies.len()).filter(|&i| i == 0 || subset[i]).collect();
        let endpoints = BTreeMap::from([(1, (0..policies.len()).collect()), (2, chosen.clone())]);
        let compiled = match compile(&policies, &endpoints) {
            Ok(compiled) => compiled,
            Err(CompileError::TooManyPortRules { .. } | CompileError::TooManyFqdnPortRules { .. }) => return Err(TestCaseError::reject("over the per-list limit")),
            Err(e @ CompileError::IdsExhausted(_)) => panic!("{e}"),
        };
        for (endpoint, members) in [(1u64, (0..policies.len()).collect::<Vec<_>>()), (2, chosen)] {
            let refs: Vec<&Policy> = members.iter().map(|&i| &policies[i]).collect();
            let set = &compiled.rules.sets[compiled.rules.endpoints[&endpoint] as usize];
            for ((ip, port, protocol), bits) in destinations(&policies, &seeds).into_iter().zip(&learned_sets) {
                let learned: Vec<FqdnPattern> = PATTERN_POOL
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| bits & (1 << i) != 0)
                    .map(|(_, p)| super::fqdn::parse_pattern(p).unwrap())
                    .collect();
                let learned_refs: Vec<&FqdnPattern> = learned.iter().collect();
                let learned_ids: Vec<u32> = compiled
                    .rules
                    .fqdn_patterns
                    .iter()
                    .filter(|(_, p)| learned.contains(p))
                    .map(|(id, _)| *id)
                    .collect();
                for global in [PolicyMode::Observe, PolicyMode::Enforce] {
                    let reference = evaluate(&refs, ip, port, protocol, global, &learned_refs);
                    let (outcome, rule_id) = outcome_of(set.decide(ip, port, protocol, global, &learned_ids), global);
                    let kernel_rule = (rule_id != 0).then(|| compiled.names.rule(rule_id).expect("every rule id is named")).map(|(policy, rule)| (policy.clone(), rule.to_owned()));
                    let reference_rule = reference.rule.map(|(p, i)| (p.key.clone(), p.rules[i].name.to_string()));
                    prop_assert_eq!((outcome, kernel_rule), (reference.outcome, reference_rule), "endpoint {} {} {}/{} under {:?}", endpoint, ip, port, protocol, global);
                }
            }
        }
    }
}
