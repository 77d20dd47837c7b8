//! The kernel datapath, driven through the agent's typed API, judged by real
//! sockets. Every destination is a test host in a namespace of the test's
//! own, so a block that fails reaches nothing outside.
//!
//! These tests need root and the BPF object: `cargo xtask test` runs them.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
    time::Duration,
};

use tollgate_agent::datapath::{Datapath, EventReader};
use tollgate_common::{
    FlowEvent, Hook, Mode, RULE_ID_DEFAULT, Verdict, family, flow_flags, protocol,
};
use tollgate_policy::{
    compiled::{PortRuleSpec, RuleSet, SetRules},
    model::{Action, PolicyMode, PortRange, Protocol},
};
use tollgate_tests::{TestEnv, collect_events, no_more_events};

const EPERM: i32 = libc::EPERM;
const WAIT: Duration = Duration::from_secs(5);

/// The datapath attached to the test's cgroup, enforcing, reporting every
/// decision, and its event reader.
fn enforcing(env: &TestEnv) -> (Datapath, EventReader) {
    let mut dp = env.open_datapath();
    let events = dp.take_event_reader().unwrap().unwrap();
    dp.set_global_mode(Mode::Enforce).unwrap();
    dp.set_allowed_report_interval(Duration::ZERO).unwrap();
    (dp, events)
}

fn rule(ports: PortRange, protocol: Protocol, action: Action, rule_id: u32) -> PortRuleSpec {
    PortRuleSpec {
        ports,
        protocol,
        action,
        mode: PolicyMode::Inherit,
        rule_id,
        // These tests list rules in the order they mean them to be tried.
        order: rule_id,
    }
}

fn set(default_action: Action) -> SetRules {
    SetRules {
        default_action,
        default_mode: PolicyMode::Inherit,
        default_hits_id: 0,
        v4: vec![],
        v6: vec![],
        fqdn: vec![],
    }
}

fn only_endpoint(cgroup_id: u64, set: SetRules) -> RuleSet {
    RuleSet {
        sets: vec![set.into()],
        endpoints: BTreeMap::from([(cgroup_id, 0)]),
        ..RuleSet::default()
    }
}

fn dst_ip(event: &FlowEvent) -> IpAddr {
    if event.family == family::INET6 {
        IpAddr::from(event.dst_addr)
    } else {
        let [a, b, c, d, ..] = event.dst_addr;
        IpAddr::from([a, b, c, d])
    }
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn tcp_connect_is_denied_with_eperm_and_allowed_by_rule() {
    let mut env = TestEnv::new("tcp");
    let host = env.add_host(1, &[8080, 8081]).v4;
    let (mut dp, mut events) = enforcing(&env);

    // Default deny; one allow rule for 8080/TCP on the host's /24.
    let mut rules = set(Action::Deny);
    rules.v4.push((
        "10.231.1.0/24".parse().unwrap(),
        vec![rule(
            PortRange::single(8080),
            Protocol::Tcp,
            Action::Allow,
            12,
        )],
    ));
    dp.switch_rules(&only_endpoint(env.cgroup.id, rules))
        .unwrap();

    let allowed = env.probe(&["connect", "tcp", &format!("{host}:8080")]);
    assert_eq!(allowed.result(), Ok(()));
    let denied = env.probe(&["connect", "tcp", &format!("{host}:8081")]);
    assert_eq!(denied.result(), Err(EPERM));

    let got = collect_events(&mut events, 2, WAIT).await;
    assert_eq!(got.len(), 2, "{got:?}");
    let (a, d) = (&got[0], &got[1]);
    assert_eq!(
        (a.verdict, a.rule_id, a.dst_port),
        (Verdict::Allowed as u8, 12, 8080)
    );
    assert_eq!(
        (d.verdict, d.rule_id, d.dst_port),
        (Verdict::Denied as u8, RULE_ID_DEFAULT, 8081)
    );
    // Every field of the record, on the denied one.
    assert_eq!(d.hook, Hook::Connect4 as u8);
    assert_eq!(d.mode, Mode::Enforce as u8);
    assert_eq!(d.family, family::INET);
    assert_eq!(d.protocol, protocol::TCP);
    assert_eq!(d.cgroup_id, env.cgroup.id);
    assert_eq!((d.pid_tgid >> 32) as u32, denied.pid);
    assert_eq!(d.uid_gid as u32, 0);
    assert_eq!(&d.comm[..9], b"tg-probe\0");
    assert_eq!(dst_ip(d), IpAddr::V4(host));
    assert_ne!(d.flags & flow_flags::ENDPOINT_KNOWN, 0);
    assert_ne!(d.socket_cookie, 0);
    assert_eq!(d.generation, dp.generation());
    assert!(no_more_events(&mut events).await.is_empty());
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn unconnected_udp_sendto_is_denied() {
    let mut env = TestEnv::new("udp");
    let host = env.add_host(2, &[]).v4;
    let (mut dp, mut events) = enforcing(&env);
    let mut rules = set(Action::Allow);
    rules.v4.push((
        format!("{host}/32").parse().unwrap(),
        vec![rule(
            PortRange::single(5353),
            Protocol::Udp,
            Action::Deny,
            21,
        )],
    ));
    dp.switch_rules(&only_endpoint(env.cgroup.id, rules))
        .unwrap();

    assert_eq!(
        env.probe(&["sendto", &format!("{host}:5353")]).result(),
        Err(EPERM)
    );
    assert_eq!(
        env.probe(&["sendto", &format!("{host}:5354")]).result(),
        Ok(())
    );
    // Connected UDP goes through connect4 and is judged the same way.
    assert_eq!(
        env.probe(&["connect", "udp", &format!("{host}:5353")])
            .result(),
        Err(EPERM)
    );
    // The rule is UDP only: TCP to the same port is not denied by it.
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("{host}:5353")])
            .result(),
        Err(libc::ECONNREFUSED)
    );

    let got = collect_events(&mut events, 4, WAIT).await;
    let summary: Vec<_> = got
        .iter()
        .map(|e| (e.hook, e.protocol, e.dst_port, e.verdict, e.rule_id))
        .collect();
    assert_eq!(
        summary,
        [
            (
                Hook::Sendmsg4 as u8,
                protocol::UDP,
                5353,
                Verdict::Denied as u8,
                21
            ),
            (
                Hook::Sendmsg4 as u8,
                protocol::UDP,
                5354,
                Verdict::Allowed as u8,
                RULE_ID_DEFAULT
            ),
            (
                Hook::Connect4 as u8,
                protocol::UDP,
                5353,
                Verdict::Denied as u8,
                21
            ),
            (
                Hook::Connect4 as u8,
                protocol::TCP,
                5353,
                Verdict::Allowed as u8,
                RULE_ID_DEFAULT
            ),
        ]
    );
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn ipv4_mapped_ipv6_destinations_are_judged_as_ipv4() {
    let mut env = TestEnv::new("mapped");
    let host = env.add_host(3, &[8080]).v4;
    let (mut dp, mut events) = enforcing(&env);
    let mut rules = set(Action::Allow);
    rules.v4.push((
        format!("{host}/32").parse().unwrap(),
        vec![rule(PortRange::ANY, Protocol::Any, Action::Deny, 31)],
    ));
    dp.switch_rules(&only_endpoint(env.cgroup.id, rules))
        .unwrap();

    // A dual-stack AF_INET6 socket. connect() to a mapped address runs only
    // connect6, which sees ::ffff:a.b.c.d; an unconnected UDP send is turned
    // into an IPv4 send by the kernel first and runs sendmsg4.
    assert_eq!(
        env.probe(&["connect", "tcp", &format!("[::ffff:{host}]:8080")])
            .result(),
        Err(EPERM)
    );
    assert_eq!(
        env.probe(&["connect", "udp", &format!("[::ffff:{host}]:53")])
            .result(),
        Err(EPERM)
    );
    assert_eq!(
        env.probe(&["sendto", &format!("[::ffff:{host}]:53")])
            .result(),
        Err(EPERM)
    );

    let got = collect_events(&mut events, 3, WAIT).await;
    assert_eq!(got.len(), 3, "{got:?}");
    let expected = [
        (Hook::Connect6, flow_flags::V4_MAPPED),
        (Hook::Connect6, flow_flags::V4_MAPPED),
        (Hook::Sendmsg4, 0),
    ];
    for (event, (hook, mapped)) in got.iter().zip(expected) {
        assert_eq!(event.hook, hook as u8);
        assert_eq!(event.family, family::INET);
        assert_eq!(dst_ip(event), IpAddr::V4(host));
        assert_eq!(event.flags & flow_flags::V4_MAPPED, mapped);
        assert_eq!((event.verdict, event.rule_id), (Verdict::Denied as u8, 31));
    }
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn ipv6_prefixes_port_ranges_and_any_protocol() {
    let mut env = TestEnv::new("ipv6");
    let host = env.add_host(4, &[8999, 9005, 9006, 9011]).v6;
    let (mut dp, mut events) = enforcing(&env);
    let deny_range = rule(
        PortRange {
            first: 9000,
            last: 9010,
        },
        Protocol::Any,
        Action::Deny,
        40,
    );
    let mut rules = set(Action::Allow);
    rules
        .v6
        .push(("fd00:231:4::/64".parse().unwrap(), vec![deny_range]));
    // The longer prefix wins the lookup, so it carries the /64's rule too.
    rules.v6.push((
        format!("{host}/128").parse().unwrap(),
        vec![
            rule(PortRange::single(9005), Protocol::Tcp, Action::Allow, 41),
            deny_range,
        ],
    ));
    dp.switch_rules(&only_endpoint(env.cgroup.id, rules))
        .unwrap();

    let tcp = |port: u16| {
        env.probe(&["connect", "tcp", &format!("[{host}]:{port}")])
            .result()
    };
    assert_eq!(tcp(9005), Ok(()), "allowed by the /128 rule");
    assert_eq!(tcp(9006), Err(EPERM), "inside the denied range");
    assert_eq!(tcp(8999), Ok(()), "below the range");
    assert_eq!(tcp(9011), Ok(()), "above the range");
    assert_eq!(
        env.probe(&["sendto", &format!("[{host}]:9005")]).result(),
        Err(EPERM),
        "protocol any covers UDP"
    );
    // Another address of the /64 gets the /64's rules only.
    assert_eq!(
        env.probe(&["sendto", "[fd00:231:4::99]:9001"]).result(),
        Err(EPERM)
    );

    let got = collect_events(&mut events, 6, WAIT).await;
    let summary: Vec<_> = got
        .iter()
        .map(|e| (e.dst_port, e.verdict, e.rule_id))
        .collect();
    assert_eq!(
        summary,
        [
            (9005, Verdict::Allowed as u8, 41),
            (9006, Verdict::Denied as u8, 40),
            (8999, Verdict::Allowed as u8, RULE_ID_DEFAULT),
            (9011, Verdict::Allowed as u8, RULE_ID_DEFAULT),
            (9005, Verdict::Denied as u8, 40),
            (9001, Verdict::Denied as u8, 40),
        ]
    );
    assert!(
        got.iter()
            .all(|e| e.family == family::INET6 && e.flags & flow_flags::V4_MAPPED == 0)
    );
    assert_eq!(dst_ip(&got[5]), "fd00:231:4::99".parse::<IpAddr>().unwrap());
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn observe_mode_lets_denied_connections_through_as_audit() {
    let mut env = TestEnv::new("observe");
    let host = env.add_host(5, &[8080, 8081, 8082]).v4;
    let mut dp = env.open_datapath();
    let mut events = dp.take_event_reader().unwrap().unwrap();
    dp.set_global_mode(Mode::Observe).unwrap();
    let mut rules = set(Action::Allow);
    let with_mode = |port, mode, id| PortRuleSpec {
        mode,
        ..rule(PortRange::single(port), Protocol::Tcp, Action::Deny, id)
    };
    rules.v4.push((
        format!("{host}/32").parse().unwrap(),
        vec![
            with_mode(8080, PolicyMode::Inherit, 51),
            with_mode(8081, PolicyMode::Enforce, 52),
            with_mode(8082, PolicyMode::Observe, 53),
        ],
    ));
    dp.switch_rules(&only_endpoint(env.cgroup.id, rules))
        .unwrap();
    let tcp = |port: u16| {
        env.probe(&["connect", "tcp", &format!("{host}:{port}")])
            .result()
    };

    // Global observe: the inheriting rule audits, the enforcing one blocks.
    assert_eq!(tcp(8080), Ok(()));
    assert_eq!(tcp(8081), Err(EPERM));
    // Global enforce: now the inheriting rule blocks, the observing one audits.
    dp.set_global_mode(Mode::Enforce).unwrap();
    assert_eq!(tcp(8080), Err(EPERM));
    assert_eq!(tcp(8082), Ok(()));

    let got = collect_events(&mut events, 4, WAIT).await;
    let summary: Vec<_> = got
        .iter()
        .map(|e| (e.dst_port, e.verdict, e.mode, e.rule_id))
        .collect();
    assert_eq!(
        summary,
        [
            (8080, Verdict::Audit as u8, Mode::Observe as u8, 51),
            (8081, Verdict::Denied as u8, Mode::Enforce as u8, 52),
            (8080, Verdict::Denied as u8, Mode::Enforce as u8, 51),
            (8082, Verdict::Audit as u8, Mode::Observe as u8, 53),
        ]
    );
    let counters = dp.counters().unwrap();
    assert_eq!((counters.audit, counters.denied), (2, 2));
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn allowed_flows_are_deduplicated_denied_ones_never() {
    let mut env = TestEnv::new("dedup");
    let host = env.add_host(6, &[8080]).v4;
    let (mut dp, mut events) = enforcing(&env);
    dp.set_allowed_report_interval(Duration::from_secs(3600))
        .unwrap();
    let mut rules = set(Action::Allow);
    rules.v4.push((
        format!("{host}/32").parse().unwrap(),
        vec![rule(
            PortRange::single(8081),
            Protocol::Tcp,
            Action::Deny,
            61,
        )],
    ));
    dp.switch_rules(&only_endpoint(env.cgroup.id, rules))
        .unwrap();
    let before = dp.counters().unwrap();

    let allowed = env.probe(&["--count", "5", "connect", "tcp", &format!("{host}:8080")]);
    assert_eq!(allowed.results, vec![Ok(()); 5]);
    let denied = env.probe(&["--count", "5", "connect", "tcp", &format!("{host}:8081")]);
    assert_eq!(denied.results, vec![Err(EPERM); 5]);

    let got = collect_events(&mut events, 6, WAIT).await;
    assert_eq!(
        got.iter()
            .filter(|e| e.verdict == Verdict::Allowed as u8)
            .count(),
        1
    );
    assert_eq!(
        got.iter()
            .filter(|e| e.verdict == Verdict::Denied as u8)
            .count(),
        5
    );
    assert!(no_more_events(&mut events).await.is_empty());
    let after = dp.counters().unwrap();
    assert_eq!(
        after.allowed - before.allowed,
        5,
        "every decision is counted"
    );
    assert_eq!(after.allowed_deduplicated - before.allowed_deduplicated, 4);
    assert_eq!(after.denied - before.denied, 5);
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn a_full_ring_buffer_loses_nothing_silently() {
    let mut env = TestEnv::new("ringfull");
    let host = env.add_host(7, &[]).v4;
    let (mut dp, mut events) = enforcing(&env);
    let mut rules = set(Action::Allow);
    rules.v4.push((
        format!("{host}/32").parse().unwrap(),
        vec![rule(PortRange::ANY, Protocol::Any, Action::Deny, 71)],
    ));
    dp.switch_rules(&only_endpoint(env.cgroup.id, rules))
        .unwrap();

    // More denials than the 4 MiB ring buffer holds, with nobody reading.
    const ATTEMPTS: usize = 50_000;
    let run = env.probe(&[
        "--count",
        &ATTEMPTS.to_string(),
        "sendto",
        &format!("{host}:9"),
    ]);
    assert!(run.results.iter().all(|r| *r == Err(EPERM)));
    assert_eq!(run.results.len(), ATTEMPTS);

    let mut delivered = Vec::new();
    while events.read_available(&mut delivered, 4096) > 0 {}
    let counters = dp.counters().unwrap();
    assert_eq!(counters.denied, ATTEMPTS as u64);
    assert!(
        counters.ringbuf_reserve_failed > 0,
        "the buffer should have overflowed: {counters:?}"
    );
    assert_eq!(
        delivered.len() as u64 + counters.ringbuf_reserve_failed,
        ATTEMPTS as u64,
        "{counters:?}"
    );
}

/// Rules for `cgroup_id` one entry apart: six prefixes elsewhere, and
/// `with_host`, rule 9 allowing TCP to `host`:8080; denied by default.
fn one_entry_apart(cgroup_id: u64, host: std::net::Ipv4Addr, with_host: bool) -> RuleSet {
    let mut set = set(Action::Deny);
    for i in 0..6u32 {
        let any = rule(PortRange::ANY, Protocol::Any, Action::Allow, 1 + i);
        set.v4
            .push((format!("10.1.{i}.0/24").parse().unwrap(), vec![any]));
    }
    if with_host {
        let to_host = rule(PortRange::single(8080), Protocol::Tcp, Action::Allow, 9);
        set.v4
            .push((format!("{host}/32").parse().unwrap(), vec![to_host]));
    }
    only_endpoint(cgroup_id, set)
}

/// Switches `dp` between `odd` (to odd generations) and `even` while
/// connecting to `host`:8080 from the test's cgroup in small batches,
/// pausing between them; the switches go on until at least three batches
/// ran meanwhile and the probes met both an allowed and a denied
/// connection (on a loaded machine a switch can outlast a batch). So the
/// two overlap by construction, and the ring buffer (read only afterwards)
/// is never flooded. Returns every probe's (pid, result) and its event.
async fn decisions_during_switches(
    env: &TestEnv,
    dp: &mut Datapath,
    events: &mut EventReader,
    host: std::net::Ipv4Addr,
    [odd, even]: [&RuleSet; 2],
) -> Vec<(FlowEvent, Result<(), i32>)> {
    const SWITCHES: u32 = 2000;
    let switching = AtomicBool::new(true);
    let batches = AtomicUsize::new(0);
    let (met_allow, met_deny) = (AtomicBool::new(false), AtomicBool::new(false));
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    let runs = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut n = 0;
            while n < SWITCHES
                || batches.load(SeqCst) < 3
                || (!(met_allow.load(SeqCst) && met_deny.load(SeqCst))
                    && std::time::Instant::now() < give_up)
            {
                let next = if (dp.generation() + 1) % 2 == 1 {
                    odd
                } else {
                    even
                };
                dp.switch_rules(next).unwrap();
                n += 1;
            }
            switching.store(false, SeqCst);
        });
        let mut runs = Vec::new();
        while switching.load(SeqCst) {
            let run = env.probe(&["--count", "100", "connect", "tcp", &format!("{host}:8080")]);
            met_allow.fetch_or(run.results.contains(&Ok(())), SeqCst);
            met_deny.fetch_or(run.results.contains(&Err(EPERM)), SeqCst);
            runs.push(run);
            batches.fetch_add(1, SeqCst);
            std::thread::sleep(Duration::from_millis(5));
        }
        runs
    });

    let attempts: usize = runs.iter().map(|r| r.results.len()).sum();
    let got = collect_events(events, attempts, WAIT).await;
    assert_eq!(got.len(), attempts);
    let results = runs
        .iter()
        .flat_map(|r| r.results.iter().map(move |result| (r.pid, *result)));
    got.into_iter()
        .zip(results)
        .map(|(event, (pid, result))| {
            assert_eq!((event.pid_tgid >> 32) as u32, pid);
            (event, result)
        })
        .collect()
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn every_decision_during_rule_switches_belongs_to_one_generation() {
    let mut env = TestEnv::new("switch");
    let host = env.add_host(8, &[8080]).v4;
    let (mut dp, mut events) = enforcing(&env);
    let target: ipnet::Ipv4Net = format!("{host}/32").parse().unwrap();
    // Generation parity tells which set must have decided.
    let mut deny_set = set(Action::Allow);
    deny_set.v4.push((
        target,
        vec![rule(
            PortRange::single(8080),
            Protocol::Tcp,
            Action::Deny,
            101,
        )],
    ));
    let mut allow_set = set(Action::Deny);
    allow_set.v4.push((
        target,
        vec![rule(
            PortRange::single(8080),
            Protocol::Tcp,
            Action::Allow,
            202,
        )],
    ));
    let deny_rules = only_endpoint(env.cgroup.id, deny_set);
    let allow_rules = only_endpoint(env.cgroup.id, allow_set);

    dp.switch_rules(&deny_rules).unwrap();
    assert_eq!(dp.generation() % 2, 1);
    let decisions = decisions_during_switches(
        &env,
        &mut dp,
        &mut events,
        host,
        [&deny_rules, &allow_rules],
    )
    .await;
    for (event, result) in &decisions {
        let expected_rule = if event.generation % 2 == 1 { 101 } else { 202 };
        assert_eq!(
            event.rule_id, expected_rule,
            "decision from outside its generation: {event:?}"
        );
        let expected_result = if expected_rule == 101 {
            Err(EPERM)
        } else {
            Ok(())
        };
        assert_eq!(*result, expected_result, "{event:?}");
    }
    assert!(decisions.iter().any(|(e, _)| e.rule_id == 101));
    assert!(decisions.iter().any(|(e, _)| e.rule_id == 202));
}

/// The same under changes of one entry, rewritten in place: every decision
/// is the old set's or the new one's whole, and its record says which (by
/// rule id: a decision between the write and the flip carries the
/// generation before).
#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn every_decision_during_one_entry_rewrites_is_one_sets() {
    let mut env = TestEnv::new("rewrite");
    let host = env.add_host(11, &[8080]).v4;
    let (mut dp, mut events) = enforcing(&env);
    let rules = |with_host| one_entry_apart(env.cgroup.id, host, with_host);
    let (without, with) = (rules(false), rules(true));
    dp.switch_rules(&without).unwrap();
    let set_ids = dp.set_ids().to_vec();
    let decisions =
        decisions_during_switches(&env, &mut dp, &mut events, host, [&with, &without]).await;
    assert_eq!(dp.set_ids(), set_ids, "every switch was a rewrite in place");
    for (event, result) in &decisions {
        let expected = match event.rule_id {
            9 => Ok(()),
            RULE_ID_DEFAULT => Err(EPERM),
            other => panic!("rule {other} cannot decide: {event:?}"),
        };
        assert_eq!(*result, expected, "{event:?}");
    }
    assert!(decisions.iter().any(|(e, _)| e.rule_id == 9));
    assert!(decisions.iter().any(|(e, _)| e.rule_id == RULE_ID_DEFAULT));
}

/// (cgroup id, half) -> set id, as the pinned endpoints map holds them;
/// and the set ids of the pinned IPv4 rules, one per entry.
fn kernel_sets(env: &TestEnv) -> (BTreeMap<(u64, u32), u32>, Vec<u32>) {
    use tollgate_common::{EndpointKey, EndpointValue, map_names};
    let endpoints: BTreeMap<EndpointKey, EndpointValue> = env.pinned_hash_map(map_names::ENDPOINTS);
    let endpoints = endpoints
        .into_iter()
        .map(|(k, v)| ((k.cgroup_id, k.half), v.set_id))
        .collect();
    (endpoints, env.v4_rule_set_ids())
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn a_switch_writes_only_the_sets_that_changed() {
    let mut env = TestEnv::new("incremental");
    let host = env.add_host(10, &[8080]).v4;
    let (mut dp, _events) = enforcing(&env);
    let other = env.cgroup.child("other");
    let other_id = tollgate_agent::cgroups::cgroup_id(&other).unwrap();
    let allow = |prefixes: &[&str], rule_id: u32| {
        let mut set = set(Action::Deny);
        for prefix in prefixes {
            let any = rule(PortRange::ANY, Protocol::Any, Action::Allow, rule_id);
            set.v4.push((prefix.parse().unwrap(), vec![any]));
        }
        std::sync::Arc::new(set)
    };
    let rules = |second: std::sync::Arc<SetRules>| RuleSet {
        sets: vec![allow(&["10.231.10.0/24"], 1), second],
        endpoints: BTreeMap::from([(env.cgroup.id, 0), (other_id, 1)]),
        ..RuleSet::default()
    };

    let connect = |cgroup: &std::path::Path| {
        env.probe_in(cgroup, &["connect", "tcp", &format!("{host}:8080")])
            .result()
    };
    let without_host = || allow(&["10.1.0.0/16"], 2);
    // Two entries differ (and one more): a change of one entry alone is
    // rewritten in place (a_change_of_one_entry_is_rewritten_in_place).
    let with_host = || allow(&["10.2.0.0/16", "10.231.10.0/24"], 2);

    let first = dp.switch_rules(&rules(without_host())).unwrap();
    let (endpoints, _) = kernel_sets(&env);
    let [kept, old] = [env.cgroup.id, other_id].map(|c| endpoints[&(c, first & 1)]);
    assert_eq!(connect(&other), Err(EPERM));

    // The second set gains the host's prefix (and trades 10.1/16 for
    // 10.2/16); the first is the same.
    let second = dp.switch_rules(&rules(with_host())).unwrap();
    let (endpoints, mut rule_sets) = kernel_sets(&env);
    let [now_kept, new] = [env.cgroup.id, other_id].map(|c| endpoints[&(c, second & 1)]);
    assert_eq!(now_kept, kept, "an unchanged set keeps its id and entries");
    assert_ne!(new, old, "a changed set is written under a new id");
    rule_sets.sort();
    let mut expected = vec![kept, new, new];
    expected.sort();
    assert_eq!(rule_sets, expected, "the old version's entries are gone");
    assert_eq!(dp.set_ids(), [kept, new]);
    assert_eq!(connect(&other), Ok(()), "the new set's entries decide");
    assert_eq!(
        connect(&env.cgroup.path),
        Ok(()),
        "the kept set still decides"
    );

    // And back, through the half the first switch wrote.
    let third = dp.switch_rules(&rules(without_host())).unwrap();
    let (endpoints, mut rule_sets) = kernel_sets(&env);
    let [still_kept, newer] = [env.cgroup.id, other_id].map(|c| endpoints[&(c, third & 1)]);
    assert_eq!(still_kept, kept);
    assert!(
        newer != new && newer != old,
        "a freed id is not handed out at once"
    );
    rule_sets.sort();
    let mut expected = vec![kept, newer];
    expected.sort();
    assert_eq!(rule_sets, expected);
    assert_eq!(connect(&other), Err(EPERM));
    assert_eq!(connect(&env.cgroup.path), Ok(()));
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn a_change_of_one_entry_is_rewritten_in_place() {
    let mut env = TestEnv::new("in-place");
    let host = env.add_host(9, &[8080]).v4;
    let (mut dp, _events) = enforcing(&env);
    let rules = |with_host| one_entry_apart(env.cgroup.id, host, with_host);
    let connect = || {
        env.probe(&["connect", "tcp", &format!("{host}:8080")])
            .result()
    };

    let first = dp.switch_rules(&rules(false)).unwrap();
    let [set_id] = dp.set_ids() else {
        panic!("one set")
    };
    let set_id = *set_id;
    assert_eq!(env.v4_rule_set_ids(), vec![set_id; 6]);
    assert_eq!(connect(), Err(EPERM));

    let second = dp.switch_rules(&rules(true)).unwrap();
    assert_ne!(second, first, "the generation moves all the same");
    assert_eq!(dp.set_ids(), [set_id], "rewritten where it is");
    let (endpoints, rule_sets) = kernel_sets(&env);
    assert_eq!(
        rule_sets,
        vec![set_id; 7],
        "one entry added, none written anew"
    );
    assert_eq!(endpoints[&(env.cgroup.id, second & 1)], set_id);
    assert_eq!(connect(), Ok(()), "the added entry decides");

    let third = dp.switch_rules(&rules(false)).unwrap();
    assert_eq!(dp.set_ids(), [set_id]);
    assert_eq!(
        env.v4_rule_set_ids(),
        vec![set_id; 6],
        "the entry is gone again"
    );
    assert_eq!(kernel_sets(&env).0[&(env.cgroup.id, third & 1)], set_id);
    assert_eq!(connect(), Err(EPERM));
}

// The packet hook: sockets the sock_addr hooks do not see, judged per
// packet. Whether a packet got out is checked where it would arrive.

/// A caught packet as the catcher prints it.
fn caught(protocol: u8, port: u16) -> String {
    format!("caught {protocol} {port}")
}

const CATCH_WAIT: Duration = Duration::from_millis(500);

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn raw_sockets_reach_only_what_policy_allows() {
    let mut env = TestEnv::new("raw");
    let host = env.add_host(100, &[]);
    let (v4, v6) = (host.v4, host.v6);
    let (mut dp, mut events) = enforcing(&env);
    // Default deny; TCP 8080 and SCTP 9899 allowed to the host.
    let mut rules = set(Action::Deny);
    rules.v4.push((
        format!("{v4}/32").parse().unwrap(),
        vec![
            rule(PortRange::single(8080), Protocol::Tcp, Action::Allow, 101),
            rule(PortRange::single(9899), Protocol::Sctp, Action::Allow, 102),
        ],
    ));
    dp.switch_rules(&only_endpoint(env.cgroup.id, rules))
        .unwrap();
    let host = &env.hosts[0];
    let mark = tollgate_tests::marker("raw");
    let catcher = host.catch(&mark);

    // Each way out, denied: fails with EPERM and nothing arrives.
    let denied: [&[&str]; 7] = [
        &["raw", "udp", &format!("{v4}:9"), &mark],
        &["raw-hdrincl", "udp", &format!("{v4}:9"), &mark],
        &["raw", "tcp", &format!("{v4}:8081"), &mark],
        &["raw", "sctp", &format!("{v4}:9900"), &mark],
        &["raw", "gre", &v4.to_string(), &mark],
        &["raw", "icmp", &v4.to_string(), &mark],
        &["raw", "udp", &format!("[{v6}]:9"), &mark],
    ];
    for args in denied {
        assert_eq!(env.probe(args).result(), Err(EPERM), "{args:?}");
    }
    assert_eq!(catcher.caught(CATCH_WAIT), Vec::<String>::new());

    // Hand-made headers are judged by their ports: the allowed ones arrive.
    assert_eq!(
        env.probe(&["raw", "tcp", &format!("{v4}:8080"), &mark])
            .result(),
        Ok(())
    );
    assert_eq!(
        env.probe(&["raw-hdrincl", "sctp", &format!("{v4}:9899"), &mark])
            .result(),
        Ok(())
    );
    assert_eq!(
        catcher.caught(CATCH_WAIT),
        [caught(protocol::TCP, 8080), caught(protocol::SCTP, 9899)]
    );

    let got = collect_events(&mut events, 9, WAIT).await;
    let summary: Vec<_> = got
        .iter()
        .map(|e| (e.hook, e.protocol, e.dst_port, e.verdict, e.rule_id))
        .collect();
    let denied = |hook: Hook, protocol: u8, port: u16| {
        (
            hook as u8,
            protocol,
            port,
            Verdict::Denied as u8,
            RULE_ID_DEFAULT,
        )
    };
    assert_eq!(
        summary,
        [
            denied(Hook::Packet4, protocol::UDP, 9),
            denied(Hook::Packet4, protocol::UDP, 9),
            denied(Hook::Packet4, protocol::TCP, 8081),
            denied(Hook::Packet4, protocol::SCTP, 9900),
            denied(Hook::Packet4, 47, 0),
            denied(Hook::Packet4, protocol::ICMP, 0),
            denied(Hook::Packet6, protocol::UDP, 9),
            (
                Hook::Packet4 as u8,
                protocol::TCP,
                8080,
                Verdict::Allowed as u8,
                101
            ),
            (
                Hook::Packet4 as u8,
                protocol::SCTP,
                9899,
                Verdict::Allowed as u8,
                102
            ),
        ]
    );
    // The packet hook names the socket's owner, not a task.
    let d = &got[0];
    assert_eq!((d.pid_tgid, d.uid_gid, d.comm), (0, 0, [0; 16]));
    assert_eq!(d.cgroup_id, env.cgroup.id);
    assert_ne!(d.socket_cookie, 0);
    assert_eq!(dst_ip(d), IpAddr::V4(v4));
    assert_eq!(dst_ip(&got[6]), IpAddr::V6(v6));
    assert!(no_more_events(&mut events).await.is_empty());
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn icmp_echo_sockets_reach_only_what_policy_allows() {
    let _ping = tollgate_tests::PingSockets::allow();
    let mut env = TestEnv::new("ping");
    let allowed = env.add_host(101, &[]);
    let (allowed_v4, allowed_v6) = (allowed.v4, allowed.v6);
    let denied = env.add_host(102, &[]);
    let (denied_v4, denied_v6) = (denied.v4, denied.v6);
    let (mut dp, mut events) = enforcing(&env);
    let mut rules = set(Action::Deny);
    rules.v4.push((
        format!("{allowed_v4}/32").parse().unwrap(),
        vec![rule(PortRange::ANY, Protocol::Icmp, Action::Allow, 111)],
    ));
    rules.v6.push((
        format!("{allowed_v6}/128").parse().unwrap(),
        vec![rule(PortRange::ANY, Protocol::Icmpv6, Action::Allow, 112)],
    ));
    // A TCP-only allow does not let echo requests out.
    rules.v4.push((
        format!("{denied_v4}/32").parse().unwrap(),
        vec![rule(PortRange::ANY, Protocol::Tcp, Action::Allow, 113)],
    ));
    dp.switch_rules(&only_endpoint(env.cgroup.id, rules))
        .unwrap();
    let mark = tollgate_tests::marker("ping");
    let at_allowed = env.hosts[0].catch(&mark);
    let at_denied = env.hosts[1].catch(&mark);

    // The echo comes back from the allowed host, over both families.
    for to in [allowed_v4.to_string(), allowed_v6.to_string()] {
        assert_eq!(env.probe(&["ping", &to, &mark]).result(), Ok(()), "{to}");
    }
    // The kernel drops a denied echo request either way; ICMPv6 echo
    // sockets do not pass the error up (ping_v6_sendmsg ignores what
    // sending the frames returns), so the call times out waiting instead.
    assert_eq!(
        env.probe(&["ping", &denied_v4.to_string(), &mark]).result(),
        Err(EPERM)
    );
    assert_eq!(
        env.probe(&["ping", &denied_v6.to_string(), &mark]).result(),
        Err(libc::ETIMEDOUT)
    );
    assert_eq!(
        at_allowed.caught(CATCH_WAIT),
        [caught(protocol::ICMP, 0), caught(protocol::ICMPV6, 0)]
    );
    assert_eq!(at_denied.caught(CATCH_WAIT), Vec::<String>::new());

    let got = collect_events(&mut events, 4, WAIT).await;
    let summary: Vec<_> = got
        .iter()
        .map(|e| (e.hook, e.protocol, e.verdict, e.rule_id))
        .collect();
    assert_eq!(
        summary,
        [
            (
                Hook::Packet4 as u8,
                protocol::ICMP,
                Verdict::Allowed as u8,
                111
            ),
            (
                Hook::Packet6 as u8,
                protocol::ICMPV6,
                Verdict::Allowed as u8,
                112
            ),
            (
                Hook::Packet4 as u8,
                protocol::ICMP,
                Verdict::Denied as u8,
                RULE_ID_DEFAULT
            ),
            (
                Hook::Packet6 as u8,
                protocol::ICMPV6,
                Verdict::Denied as u8,
                RULE_ID_DEFAULT
            ),
        ]
    );
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn observed_packets_go_out_and_are_recorded_as_audit() {
    let mut env = TestEnv::new("rawobs");
    let host = env.add_host(103, &[]).v4;
    let (mut dp, mut events) = enforcing(&env);
    dp.set_global_mode(Mode::Observe).unwrap();
    dp.switch_rules(&only_endpoint(env.cgroup.id, set(Action::Deny)))
        .unwrap();
    let mark = tollgate_tests::marker("rawobs");
    let catcher = env.hosts[0].catch(&mark);

    assert_eq!(
        env.probe(&["raw", "udp", &format!("{host}:9"), &mark])
            .result(),
        Ok(())
    );
    assert_eq!(catcher.caught(CATCH_WAIT), [caught(protocol::UDP, 9)]);
    let got = collect_events(&mut events, 1, WAIT).await;
    assert_eq!(
        (got[0].hook, got[0].verdict, got[0].mode),
        (
            Hook::Packet4 as u8,
            Verdict::Audit as u8,
            Mode::Observe as u8
        )
    );
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn a_packet_flood_is_one_record_per_flow_and_interval() {
    let mut env = TestEnv::new("flood");
    let host = env.add_host(104, &[]).v4;
    let (mut dp, mut events) = enforcing(&env);
    dp.set_packet_report_interval(Duration::from_secs(3600))
        .unwrap();
    dp.switch_rules(&only_endpoint(env.cgroup.id, set(Action::Deny)))
        .unwrap();
    let before = dp.counters().unwrap();
    let mark = tollgate_tests::marker("flood");

    let flood = env.probe(&["--count", "200", "raw", "udp", &format!("{host}:9"), &mark]);
    assert_eq!(flood.results, vec![Err(EPERM); 200]);
    // Another flow (another port) is a record of its own.
    let other = env.probe(&["raw", "udp", &format!("{host}:10"), &mark]);
    assert_eq!(other.result(), Err(EPERM));

    let got = collect_events(&mut events, 2, WAIT).await;
    let ports: Vec<u16> = got.iter().map(|e| e.dst_port).collect();
    assert_eq!(ports, [9, 10]);
    assert!(no_more_events(&mut events).await.is_empty());
    let after = dp.counters().unwrap();
    assert_eq!(after.denied - before.denied, 201, "every packet is counted");
    assert_eq!(
        after.packets_deduplicated - before.packets_deduplicated,
        199
    );
}

#[tokio::test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
async fn tcp_and_udp_sockets_are_judged_once_not_per_packet() {
    let mut env = TestEnv::new("once");
    let host = env.add_host(105, &[8080]).v4;
    let (mut dp, _events) = enforcing(&env);
    let mut rules = set(Action::Deny);
    rules.v4.push((
        format!("{host}/32").parse().unwrap(),
        vec![rule(PortRange::ANY, Protocol::Any, Action::Allow, 121)],
    ));
    dp.switch_rules(&only_endpoint(env.cgroup.id, rules))
        .unwrap();
    let before = dp.counters().unwrap();

    // A connect is a handshake of several packets, a sendto one datagram:
    // one decision each, made by the sock_addr hooks.
    let tcp = env.probe(&["--count", "3", "connect", "tcp", &format!("{host}:8080")]);
    assert_eq!(tcp.results, vec![Ok(()); 3]);
    let udp = env.probe(&["--count", "3", "sendto", &format!("{host}:9")]);
    assert_eq!(udp.results, vec![Ok(()); 3]);
    let after = dp.counters().unwrap();
    assert_eq!(after.allowed - before.allowed, 6);
}
