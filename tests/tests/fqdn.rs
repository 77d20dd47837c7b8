//! FQDN rules learned in the kernel from DNS answers: dnsmasq in a test
//! host's namespace resolves names to test hosts, and a client in the
//! enforced cgroup resolves and connects at once.
//!
//! These tests need root and the BPF object: `cargo xtask test` runs them.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use tollgate_common::{capacity, map_names};
use tollgate_tests::{AgentProcess, TempFile, TestEnv, Zone, free_port, http_get, metric_sample};

const EPERM: i32 = libc::EPERM;
const WAIT: Duration = Duration::from_secs(5);
const HTTPS: u16 = 443;

/// The AKS-style policy of the issue: DNS to the resolver, `*.azurecr.io`
/// and `login.microsoftonline.com` on 443, everything else denied.
fn aks_policy(env: &TestEnv, resolver: IpAddr, extra_rules: &str) -> TempFile {
    let rules = format!(
        "  - name: registry
    to: [{{fqdn: \"*.azurecr.io\"}}]
    ports: [{{port: 443, protocol: TCP}}]
  - name: login
    to: [{{fqdn: login.microsoftonline.com}}]
    ports: [{{port: 443, protocol: TCP}}]
{extra_rules}"
    );
    enforced_policy(env, "registry-and-login", resolver, &rules)
}

/// An enforced policy `name` for the test's cgroup: DNS to `resolver`,
/// then `rules`; everything else denied.
fn enforced_policy(env: &TestEnv, name: &str, resolver: IpAddr, rules: &str) -> TempFile {
    let text = format!(
        "apiVersion: policy.tollgate.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: {name}
spec:
  cgroupSelector:
    paths: [\"{cgroup}/**\"]
  mode: enforce
  egress:
  - name: dns
    to: [{{cidr: {resolver}/32}}]
    ports: [{{port: 53, protocol: UDP}}, {{port: 53, protocol: TCP}}]
{rules}",
        cgroup = env.cgroup.relative
    );
    TempFile::new(
        &format!(
            "{}-{name}.yaml",
            env.cgroup.relative.trim_start_matches("/tgtest-")
        ),
        &text,
    )
}

/// Starts the agent with the AKS policy (plus `extra_rules`), trusting
/// `resolver`; the policy file lives as long as the agent is needed.
fn start_agent(
    env: &TestEnv,
    resolver: std::net::Ipv4Addr,
    extra_rules: &str,
    extra_args: &[&str],
) -> (AgentProcess, TempFile) {
    let policy = aks_policy(env, resolver.into(), extra_rules);
    let resolver = resolver.to_string();
    let mut args = vec![
        "--policy",
        policy.path.to_str().unwrap(),
        "--dns-resolver",
        &resolver,
    ];
    args.extend_from_slice(extra_args);
    (AgentProcess::start(env, &args), policy)
}

/// A zone with one name.
fn one_name(name: &str, ip: std::net::Ipv4Addr, ttl: u32) -> Zone {
    Zone {
        addresses: vec![(name.into(), ip.into())],
        ttl,
        ..Zone::default()
    }
}

fn resolve_connect(
    env: &TestEnv,
    transport: &str,
    resolver: IpAddr,
    name: &str,
    qtype: &str,
) -> String {
    resolve_connect_via(env, transport, SocketAddr::new(resolver, 53), name, qtype)
}

/// Resolves `name` at `resolver` over `transport`, then connects to the
/// first address of the answer on the HTTPS port: "ok", "EPERM" or the errno.
fn resolve_connect_via(
    env: &TestEnv,
    transport: &str,
    resolver: SocketAddr,
    name: &str,
    qtype: &str,
) -> String {
    let run = env.probe(&[
        "resolve-connect",
        transport,
        &resolver.to_string(),
        name,
        qtype,
        &HTTPS.to_string(),
    ]);
    match run.result() {
        Ok(()) => "ok".into(),
        Err(errno) if errno == EPERM => "EPERM".into(),
        Err(errno) => format!("errno {errno}"),
    }
}

/// Resolves `myreg.azurecr.io` (served at `resolver`'s own address) over
/// `transport` and checks that the agent learned it and that the address
/// then opens. The agent installs addresses after the client read the
/// answer, so the first connect may come too early (docs/policies.md).
fn the_agent_learns(env: &TestEnv, agent: &AgentProcess, transport: &str, resolver: Ipv4Addr) {
    let _ = resolve_connect(
        env,
        transport,
        IpAddr::V4(resolver),
        "myreg.azurecr.io",
        "A",
    );
    let records = records_until(agent, WAIT, |r| r["type"] == "dns");
    let dns = records.last().unwrap();
    assert_eq!(dns["query"], "myreg.azurecr.io");
    assert_eq!(dns["learned"], true, "{dns}");
    let then = env.probe(&["connect", "tcp", &format!("{resolver}:{HTTPS}")]);
    assert_eq!(then.result(), Ok(()));
}

/// The records the agent printed within `timeout` that satisfy `keep`.
fn records_until(
    agent: &AgentProcess,
    timeout: Duration,
    mut done: impl FnMut(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    let mut records = Vec::new();
    while Instant::now() < deadline {
        let record = agent.next_record(deadline - Instant::now());
        let finished = done(&record);
        records.push(record);
        if finished {
            break;
        }
    }
    records
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn names_open_what_they_resolve_to_for_the_endpoint_that_resolved_them() {
    let mut env = TestEnv::new("fqdn-names");
    let resolver = env.add_host(60, &[HTTPS]).v4;
    let login_host = env.add_host(61, &[HTTPS]).v4;
    let other_host = env.add_host(62, &[HTTPS]).v4;
    let resolver_v6 = env.hosts[0].v6;
    env.hosts[0].serve_dns(&Zone {
        addresses: vec![
            ("myreg.azurecr.io".into(), resolver.into()),
            ("myreg.azurecr.io".into(), resolver_v6.into()),
            ("deep.myreg.azurecr.io".into(), other_host.into()),
            ("target.msidentity.com".into(), login_host.into()),
            ("other.example.com".into(), other_host.into()),
        ],
        cnames: vec![
            (
                "login.microsoftonline.com".into(),
                "login.mso.msidentity.com".into(),
            ),
            (
                "login.mso.msidentity.com".into(),
                "target.msidentity.com".into(),
            ),
        ],
        ttl: 60,
    });
    let (agent, _policy) = start_agent(
        &env,
        resolver,
        "",
        &[
            // Every allowed connection reported at once.
            "--allowed-report-interval",
            "0",
        ],
    );
    let r = IpAddr::V4(resolver);

    // Nothing resolved yet: the login host is closed.
    let direct = env.probe(&["connect", "tcp", &format!("{login_host}:{HTTPS}")]);
    assert_eq!(direct.result(), Err(EPERM));

    assert_eq!(
        resolve_connect(&env, "udp", r, "login.microsoftonline.com", "A"),
        "ok",
        "a CNAME chain"
    );
    assert_eq!(
        resolve_connect(&env, "udp", r, "myreg.azurecr.io", "A"),
        "ok"
    );
    assert_eq!(
        resolve_connect(&env, "udp", r, "MyReg.AzureCR.IO", "A"),
        "ok",
        "case does not matter"
    );
    assert_eq!(
        resolve_connect(&env, "udp", r, "myreg.azurecr.io", "AAAA"),
        "ok",
        "AAAA"
    );
    assert_eq!(
        resolve_connect(&env, "udp", r, "deep.myreg.azurecr.io", "A"),
        "EPERM",
        "*. is exactly one label"
    );
    assert_eq!(
        resolve_connect(&env, "udp", r, "other.example.com", "A"),
        "EPERM"
    );
    // The other host stays closed, also on a port the names open elsewhere.
    let direct = env.probe(&["connect", "tcp", &format!("{other_host}:{HTTPS}")]);
    assert_eq!(direct.result(), Err(EPERM));

    // Another endpoint does not get what this one learned. A new cgroup is
    // not restricted until the agent has seen it (inotify), so this waits
    // for the deny; were learned addresses not scoped, it never came.
    let sibling = env.cgroup.child("sibling");
    let deadline = Instant::now() + WAIT;
    loop {
        let run = env.probe_in(
            &sibling,
            &["connect", "tcp", &format!("{login_host}:{HTTPS}")],
        );
        if run.result() == Err(EPERM) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a sibling cgroup is not the endpoint that resolved: {:?}",
            run.result()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Flow records name the destination; DNS answers are records too.
    let records = records_until(&agent, WAIT, |record| {
        record["type"] == "flow" && record["dst"]["fqdn"] == "other.example.com"
    });
    let allowed_login = records
        .iter()
        .find(|r| {
            r["type"] == "flow"
                && r["verdict"] == "allowed"
                && r["dst"]["ip"] == login_host.to_string()
        })
        .expect("the allowed connection to the login host");
    assert_eq!(allowed_login["dst"]["fqdn"], "login.microsoftonline.com");
    assert_eq!(allowed_login["rule"], "login");
    let denied_other = records
        .iter()
        .find(|r| {
            r["type"] == "flow"
                && r["verdict"] == "denied"
                && r["dst"]["fqdn"] == "other.example.com"
        })
        .unwrap_or_else(|| panic!("the denied connection, named: {records:#?}"));
    assert_eq!(denied_other["rule"], "default");
    let dns = records
        .iter()
        .find(|r| r["type"] == "dns" && r["query"] == "login.microsoftonline.com")
        .expect("a DNS record of the login answer");
    assert_eq!(dns["learned"], true);
    assert_eq!(dns["rcode"], "NOERROR");
    assert_eq!(dns["resolver"]["ip"], resolver.to_string());
    assert_eq!(dns["answers"].as_array().unwrap().len(), 3, "{dns}");
    let unlearned = records
        .iter()
        .find(|r| r["type"] == "dns" && r["query"] == "other.example.com")
        .expect("a DNS record of the unmatched answer");
    assert_eq!(unlearned["learned"], false);
    drop(agent);
    env.cleanup_pins();
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn any_label_wildcards_match_one_or_more_labels() {
    let mut env = TestEnv::new("fqdn-deep");
    let resolver = env.add_host(63, &[HTTPS]).v4;
    let target = env.add_host(64, &[HTTPS]).v4;
    env.hosts[0].serve_dns(&Zone {
        addresses: vec![
            ("a.blob.core.windows.net".into(), target.into()),
            ("x.y.blob.core.windows.net".into(), target.into()),
            ("blob.core.windows.net".into(), target.into()),
        ],
        ttl: 60,
        ..Zone::default()
    });
    let (_agent, _policy) = start_agent(
        &env,
        resolver,
        "  - name: storage
    to: [{fqdn: \"**.blob.core.windows.net\"}]
",
        &[],
    );
    let r = IpAddr::V4(resolver);
    assert_eq!(
        resolve_connect(&env, "udp", r, "blob.core.windows.net", "A"),
        "EPERM",
        "** needs a label"
    );
    assert_eq!(
        resolve_connect(&env, "udp", r, "x.y.blob.core.windows.net", "A"),
        "ok"
    );
    assert_eq!(
        resolve_connect(&env, "udp", r, "a.blob.core.windows.net", "A"),
        "ok"
    );
    drop(_agent);
    env.cleanup_pins();
}

/// Applies the `partner` policy: DNS to `resolver`, and `names` on 443.
fn apply_partner_names(env: &TestEnv, resolver: IpAddr, names: &[&str]) -> tollgate_tests::CtlRun {
    let rules: String = names
        .iter()
        .map(|name| {
            format!("  - to: [{{fqdn: {name}}}]\n    ports: [{{port: 443, protocol: TCP}}]\n")
        })
        .collect();
    let policy = enforced_policy(env, "partner", resolver, &rules);
    env.ctl(&["apply", "-f", policy.path.to_str().unwrap()])
}

fn connect_https(env: &TestEnv, ip: std::net::Ipv4Addr) -> Result<(), i32> {
    env.probe(&["connect", "tcp", &format!("{ip}:{HTTPS}")])
        .result()
}

/// Addresses learned for a name outlive its rule until their TTL. A name
/// that comes into the policy later must not inherit them, even when the
/// agent restarted in between: the kernel ties learned addresses to
/// pattern ids, and an id is never handed out twice.
#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_name_that_left_the_policy_opens_nothing_for_names_that_came_after_it() {
    let mut env = TestEnv::new("fqdn-reuse");
    let resolver = env.add_host(72, &[HTTPS]).v4;
    let old_target = env.add_host(73, &[HTTPS]).v4;
    let new_target = env.add_host(74, &[HTTPS]).v4;
    env.hosts[0].serve_dns(&Zone {
        addresses: vec![
            ("old.partner.test".into(), old_target.into()),
            ("new.partner.test".into(), new_target.into()),
            ("newer.partner.test".into(), resolver.into()),
        ],
        ttl: 300,
        ..Zone::default()
    });
    let r = IpAddr::V4(resolver);
    let resolver_arg = resolver.to_string();
    let agent_args = ["--dns-resolver", resolver_arg.as_str()];
    let apply = |names: &[&str]| {
        apply_partner_names(&env, r, names).ok();
    };
    let connect = |ip| connect_https(&env, ip);

    let mut agent = AgentProcess::start(&env, &agent_args);
    apply(&["old.partner.test"]);
    assert_eq!(
        resolve_connect(&env, "udp", r, "old.partner.test", "A"),
        "ok"
    );
    apply(&[]);
    assert_eq!(connect(old_target), Err(EPERM), "its name left the policy");
    apply(&["new.partner.test"]);
    assert_eq!(connect(old_target), Err(EPERM), "learned for another name");
    assert_eq!(
        resolve_connect(&env, "udp", r, "new.partner.test", "A"),
        "ok"
    );

    // A restarted agent finds no name rule in force, only learned addresses.
    apply(&[]);
    agent.kill();
    let _restarted = AgentProcess::start(&env, &agent_args);
    apply(&["newer.partner.test"]);
    assert_eq!(connect(old_target), Err(EPERM), "learned for another name");
    assert_eq!(connect(new_target), Err(EPERM), "learned for another name");
    assert_eq!(
        resolve_connect(&env, "udp", r, "newer.partner.test", "A"),
        "ok"
    );
    drop(_restarted);
    env.cleanup_pins();
}

/// A switch the datapath refuses (more names than its map holds) changes
/// no id: a name in force keeps its own, so what was learned for it still
/// counts when it is applied again beside another.
#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_refused_switch_leaves_the_names_in_force_what_they_learned() {
    let mut env = TestEnv::new("fqdn-refused");
    let resolver = env.add_host(75, &[HTTPS]).v4;
    let target = env.add_host(76, &[HTTPS]).v4;
    env.hosts[0].serve_dns(&one_name("kept.partner.test", target, 300));
    let r = IpAddr::V4(resolver);
    let resolver_arg = resolver.to_string();
    let _agent = AgentProcess::start(&env, &["--dns-resolver", &resolver_arg]);
    let apply = |names: &[&str]| apply_partner_names(&env, r, names);
    let connect = || connect_https(&env, target);

    apply(&["kept.partner.test"]).ok();
    assert_eq!(
        resolve_connect(&env, "udp", r, "kept.partner.test", "A"),
        "ok"
    );
    let too_many: Vec<String> = (0..=capacity::FQDN_NAMES)
        .map(|i| format!("n{i}.partner.test"))
        .collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let refused = apply(&too_many).failed();
    assert!(refused.contains(map_names::FQDN_NAMES), "{refused}");
    assert_eq!(connect(), Ok(()), "the rules in force stay");
    apply(&["kept.partner.test", "other.partner.test"]).ok();
    assert_eq!(connect(), Ok(()), "learned before, under the same id");
    drop(_agent);
    env.cleanup_pins();
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn answers_from_resolvers_that_are_not_trusted_are_ignored() {
    let mut env = TestEnv::new("fqdn-forged");
    let resolver = env.add_host(65, &[HTTPS]).v4;
    let forger = env.add_host(66, &[HTTPS]).v4;
    env.hosts[1].serve_dns(&one_name("myreg.azurecr.io", forger, 60));
    // DNS to the forger is allowed; only its answers are not trusted.
    let (_agent, _policy) = start_agent(
        &env,
        resolver,
        &format!(
            "  - name: other-dns
    to: [{{cidr: {forger}/32}}]
    ports: [{{port: 53, protocol: UDP}}]
"
        ),
        &[],
    );
    assert_eq!(
        resolve_connect(&env, "udp", IpAddr::V4(forger), "myreg.azurecr.io", "A"),
        "EPERM"
    );
    drop(_agent);
    env.cleanup_pins();
}

/// A resolver on a port other than 53 is trusted on that port alone. The
/// ingress program leaves at once for any packet whose source port is
/// neither 53 nor a trusted resolver's, so this holds that early exit to
/// both: answers from the resolver's port teach, and answers from port 53
/// of the same address are counted as untrusted and teach nothing.
#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_resolver_on_another_port_is_trusted_on_that_port_alone() {
    let mut env = TestEnv::new("fqdn-port");
    let resolver = env.add_host(118, &[HTTPS]).v4;
    let zone = one_name("myreg.azurecr.io", resolver, 60);
    env.hosts[0].serve_dns_on(&zone, 5353);
    env.hosts[0].serve_dns(&zone);
    let policy = aks_policy(
        &env,
        resolver.into(),
        &format!(
            "  - name: dns-5353
    to: [{{cidr: {resolver}/32}}]
    ports: [{{port: 5353, protocol: UDP}}, {{port: 5353, protocol: TCP}}]
"
        ),
    );
    let metrics = free_port();
    let agent = AgentProcess::start(
        &env,
        &[
            "--policy",
            policy.path.to_str().unwrap(),
            "--dns-resolver",
            &format!("{resolver}:5353"),
            "--metrics-listen",
            &format!("127.0.0.1:{metrics}"),
        ],
    );
    let at = |port| SocketAddr::new(IpAddr::V4(resolver), port);

    assert_eq!(
        resolve_connect_via(&env, "udp", at(53), "myreg.azurecr.io", "A"),
        "EPERM",
        "an answer from port 53 of a resolver trusted on 5353"
    );
    assert_eq!(
        dns_counter(metrics, "tollgate_dns_answers_untrusted_total"),
        1
    );
    assert_eq!(
        resolve_connect_via(&env, "udp", at(5353), "myreg.azurecr.io", "A"),
        "ok",
        "learned in the kernel from the trusted port"
    );
    assert_eq!(
        dns_counter(metrics, "tollgate_dns_answers_untrusted_total"),
        1
    );
    drop(agent);
    env.cleanup_pins();
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn learned_addresses_expire_with_their_ttl() {
    let mut env = TestEnv::new("fqdn-ttl");
    let resolver = env.add_host(67, &[HTTPS]).v4;
    env.hosts[0].serve_dns(&one_name("myreg.azurecr.io", resolver, 1));
    let (_agent, _policy) = start_agent(&env, resolver, "", &["--dns-min-ttl", "1s"]);
    assert_eq!(
        resolve_connect(&env, "udp", IpAddr::V4(resolver), "myreg.azurecr.io", "A"),
        "ok"
    );
    std::thread::sleep(Duration::from_millis(1_500));
    let later = env.probe(&["connect", "tcp", &format!("{resolver}:{HTTPS}")]);
    assert_eq!(later.result(), Err(EPERM), "the answer's TTL has passed");
    drop(_agent);
    env.cleanup_pins();
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn learning_goes_on_while_the_agent_is_down() {
    let mut env = TestEnv::new("fqdn-down");
    let resolver = env.add_host(68, &[HTTPS]).v4;
    env.hosts[0].serve_dns(&one_name("myreg.azurecr.io", resolver, 60));
    let (mut agent, _policy) = start_agent(&env, resolver, "", &[]);
    agent.kill();
    assert_eq!(
        resolve_connect(&env, "udp", IpAddr::V4(resolver), "myreg.azurecr.io", "A"),
        "ok"
    );
    // And a restarted agent keeps what was learned meanwhile, and counts it.
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let _restarted = AgentProcess::start(
        &env,
        &[
            "--dns-resolver",
            &resolver.to_string(),
            "--metrics-listen",
            &metrics,
        ],
    );
    let again = env.probe(&["connect", "tcp", &format!("{resolver}:{HTTPS}")]);
    assert_eq!(again.result(), Ok(()));
    let deadline = Instant::now() + WAIT;
    let learned = loop {
        let (_, text) = http_get(port, "/metrics");
        let learned = metric_sample(&text, "tollgate_fqdn_learned_addresses");
        if learned > 0 || Instant::now() > deadline {
            assert!(
                metric_sample(&text, "tollgate_dns_answers_total") >= 1,
                "{text}"
            );
            assert!(
                metric_sample(&text, "tollgate_dns_addresses_learned_total") >= 1,
                "{text}"
            );
            break learned;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        learned, 1,
        "the one address learned while the agent was down"
    );
    drop(_restarted);
    env.cleanup_pins();
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn answers_over_tcp_are_learned_by_the_agent() {
    let mut env = TestEnv::new("fqdn-tcp");
    let resolver = env.add_host(69, &[HTTPS]).v4;
    env.hosts[0].serve_dns(&one_name("myreg.azurecr.io", resolver, 60));
    let (agent, _policy) = start_agent(&env, resolver, "", &[]);
    the_agent_learns(&env, &agent, "tcp", resolver);
    drop(agent);
    env.cleanup_pins();
}

/// The bar: 1,000 rounds of resolve-then-connect, each to an
/// address never learned before, without one failure.
#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_thousand_first_connects_after_resolving_all_succeed() {
    const ROUNDS: usize = 1_000;
    let mut env = TestEnv::new("fqdn-loop");
    let resolver = env.add_host(70, &[HTTPS]).v4;
    // 10.232.0.0/22 all belongs to the test host: one fresh address a round.
    env.hosts[0].own_prefix("10.232.0.0/22");
    env.hosts[0].serve_dns(&Zone {
        addresses: (0..ROUNDS)
            .map(|i| {
                let ip = std::net::Ipv4Addr::new(10, 232, (i / 250) as u8, (i % 250 + 1) as u8);
                (format!("r{i}.azurecr.io"), ip.into())
            })
            .collect(),
        ttl: 60,
        ..Zone::default()
    });
    let (agent, _policy) = start_agent(&env, resolver, "", &[]);
    let run = env.probe(&[
        "--count",
        &ROUNDS.to_string(),
        "resolve-connect",
        "udp",
        &format!("{resolver}:53"),
        "r{}.azurecr.io",
        "A",
        &HTTPS.to_string(),
    ]);
    let failures: Vec<(usize, &Result<(), i32>)> = run
        .results
        .iter()
        .enumerate()
        .filter(|(_, result)| result.is_err())
        .collect();
    assert_eq!(run.results.len(), ROUNDS);
    assert!(
        failures.is_empty(),
        "{} of {ROUNDS} failed: {failures:?}",
        failures.len()
    );
    drop(agent);
    env.cleanup_pins();
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn an_endpoint_over_a_limit_forgets_addresses_and_the_record_says_so() {
    let mut env = TestEnv::new("fqdn-limit");
    let resolver = env.add_host(71, &[HTTPS]).v4;
    env.hosts[0].own_prefix("10.232.8.0/24");
    let addresses: Vec<std::net::Ipv4Addr> = (1..=3)
        .map(|i| std::net::Ipv4Addr::new(10, 232, 8, i))
        .collect();
    env.hosts[0].serve_dns(&Zone {
        addresses: addresses
            .iter()
            .map(|ip| ("cdn.azurecr.io".to_owned(), IpAddr::V4(*ip)))
            .collect(),
        ttl: 60,
        ..Zone::default()
    });
    let (agent, _policy) = start_agent(&env, resolver, "", &["--fqdn-max-addresses-per-name", "2"]);
    // dig, in the endpoint's cgroup, resolves; nothing connects yet.
    let cgroup_procs = env.cgroup.path.join("cgroup.procs");
    let dig = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {} && exec dig +short @{resolver} cdn.azurecr.io",
            cgroup_procs.display()
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&dig.stdout).lines().count(), 3);
    let records = records_until(&agent, WAIT, |r| r["type"] == "dns");
    let dns = records.last().unwrap();
    assert_eq!(dns["limit"], "addresses_per_name", "{dns}");
    let results: Vec<Result<(), i32>> = addresses
        .iter()
        .map(|ip| {
            env.probe(&["connect", "tcp", &format!("{ip}:{HTTPS}")])
                .result()
        })
        .collect();
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        2,
        "two of three kept: {results:?}"
    );
    assert!(results.contains(&Err(EPERM)));
    drop(agent);
    env.cleanup_pins();
}

/// The verifier's work on every program stays well inside its budget of
/// 1,000,000 instructions, under 100,000, also on the older verifiers that
/// `cargo xtask kernels` runs this in (they prune less): a change that
/// makes it grow shows here first, not as a program that fails to load, or
/// takes seconds to, on a customer's kernel.
#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn every_program_verifies_well_inside_the_budget() {
    let env = TestEnv::new("fqdn-verifier");
    let checks = tollgate_agent::datapath::Datapath::verify(&env.bpffs.root()).unwrap();
    eprintln!("{checks:#?}");
    assert_eq!(
        checks.len(),
        tollgate_agent::datapath::ALL_PROGRAMS.len(),
        "{checks:?}"
    );
    for check in &checks {
        assert!(check.loaded, "{check:?}");
        // Kernels before 5.16 do not report the count
        // (bpf_prog_info.verified_insns); there, loading is what is checked.
        if let Some(count) = check.verified_insns {
            assert!(
                count < 100_000,
                "{}: {count} instructions verified",
                check.program
            );
        }
    }
}

/// A kernel that refuses the DNS parser (made to here by an undersized map
/// the parser uses: the verifier refuses the program as a kernel lacking
/// what it needs would): the agent starts all the same, enforces, says
/// what it lacks in its log, status, metrics and readiness, and learns
/// names itself from the answers its fallback program hands it.
#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn a_refused_dns_parser_degrades_to_learning_in_the_agent_and_says_so() {
    let mut env = TestEnv::new("fqdn-degraded");
    let resolver = env.add_host(77, &[HTTPS]).v4;
    let other = env.add_host(78, &[HTTPS]).v4;
    env.hosts[0].serve_dns(&one_name("myreg.azurecr.io", resolver, 60));
    env.pin_undersized_map(map_names::DNS_SCRATCH);
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let (agent, _policy) = start_agent(&env, resolver, "", &["--metrics-listen", &metrics]);
    assert_eq!(
        agent.startup_lines_with("DEGRADED"),
        1,
        "{:#?}",
        agent.startup_log
    );

    the_agent_learns(&env, &agent, "udp", resolver);
    let denied = env.probe(&["connect", "tcp", &format!("{other}:{HTTPS}")]);
    assert_eq!(denied.result(), Err(EPERM));

    let status = env.ctl(&["status"]).ok();
    assert!(
        status.contains("DEGRADED dns-learning-in-kernel: the kernel refused tollgate_dns_ingress"),
        "{status}"
    );
    assert!(
        status.contains("program tollgate_dns_forward: new"),
        "{status}"
    );
    let (_, scraped) = http_get(port, "/metrics");
    assert_eq!(
        metric_sample(
            &scraped,
            "tollgate_degraded{feature=\"dns-learning-in-kernel\",program=\"tollgate_dns_ingress\"}"
        ),
        1,
        "{scraped}"
    );
    assert_eq!(
        http_get(port, "/readyz"),
        (
            200,
            "ready, degraded: dns-learning-in-kernel (tollgate_dns_ingress refused)\n".into()
        )
    );
    drop(agent);
    env.cleanup_pins();
}

// Answers that cannot be forged: an answer teaches only the socket that
// asked its question of the trusted resolver, from its endpoint's own
// network namespace.

/// The agent for the forged-answer tests: `*.azurecr.io` on 443 by name,
/// `resolver` trusted, metrics on a port of its own.
/// The resolver's host is allowed on every port too, so nothing but the
/// binding of answers to queries stands in a forger's way.
fn start_agent_with_metrics(env: &TestEnv, resolver: Ipv4Addr) -> (AgentProcess, TempFile, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let resolver_host = format!("  - name: resolver-host\n    to: [{{cidr: {resolver}/32}}]\n");
    let (agent, policy) = start_agent(
        env,
        resolver,
        &resolver_host,
        &["--metrics-listen", &listen],
    );
    (agent, policy, port)
}

fn dns_counter(port: u16, name: &str) -> u64 {
    let (code, metrics) = http_get(port, "/metrics");
    assert_eq!(code, 200);
    metric_sample(&metrics, name)
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn an_answer_to_a_socket_that_asked_nothing_teaches_nothing() {
    let mut env = TestEnv::new("fqdn-unasked");
    let resolver = env.add_host(107, &[HTTPS]).v4;
    let target = env.add_host(108, &[HTTPS]).v4;
    env.hosts[0].serve_dns(&one_name("myreg.azurecr.io", resolver, 60));
    let (_agent, _policy, metrics) = start_agent_with_metrics(&env, resolver);

    // An endpoint socket waits for an answer it never asked for; another
    // process of the node, with CAP_NET_RAW, sends it one in the trusted
    // resolver's name.
    let port = free_port();
    let mut waiting = std::process::Command::new(tollgate_tests::probe_binary())
        .args(["--cgroup", env.cgroup.path.to_str().unwrap()])
        .args(["await-answer", &port.to_string(), &HTTPS.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(waiting.stdout.take().unwrap());
    let mut line = String::new();
    while line.trim() != "listening" {
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    }
    let forged = std::process::Command::new(tollgate_tests::probe_binary())
        .args([
            "forge-answer",
            &resolver.to_string(),
            &format!("127.0.0.1:{port}"),
            "4242",
            "evil.azurecr.io",
            &target.to_string(),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&forged.stdout).contains("\nok"));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(waiting.wait().unwrap().success());
    assert_eq!(rest.trim(), "errno=1", "the forged address stays closed");
    assert_eq!(
        dns_counter(metrics, "tollgate_dns_answers_not_asked_total"),
        1
    );

    // The real resolver's answers, to the socket that asked, still teach.
    assert_eq!(
        resolve_connect(&env, "udp", resolver.into(), "myreg.azurecr.io", "A"),
        "ok"
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn answers_from_a_network_namespace_of_the_endpoints_own_teach_nothing() {
    let mut env = TestEnv::new("fqdn-ownns");
    let resolver = env.add_host(109, &[HTTPS]).v4;
    let target = env.add_host(110, &[HTTPS]).v4;
    env.hosts[0].serve_dns(&one_name("myreg.azurecr.io", resolver, 60));
    let (_agent, _policy, metrics) = start_agent_with_metrics(&env, resolver);

    // The endpoint makes a namespace with the resolver's address in it,
    // answers its own query there, and connects from its own namespace.
    let run = env.probe(&[
        "own-netns-resolve",
        &resolver.to_string(),
        "evil.azurecr.io",
        &target.to_string(),
        &HTTPS.to_string(),
    ]);
    assert_eq!(run.result(), Err(EPERM));
    assert_eq!(
        dns_counter(metrics, "tollgate_dns_queries_foreign_netns_total"),
        1
    );
    assert_eq!(
        resolve_connect(&env, "udp", resolver.into(), "myreg.azurecr.io", "A"),
        "ok"
    );
}

#[test]
#[ignore = "needs root and the BPF object: cargo xtask test"]
fn an_endpoints_raw_packets_in_a_resolvers_name_are_dropped() {
    let mut env = TestEnv::new("fqdn-spoof");
    let resolver = env.add_host(111, &[HTTPS]).v4;
    let target = env.add_host(112, &[HTTPS]).v4;
    env.hosts[0].serve_dns(&one_name("myreg.azurecr.io", resolver, 60));
    let (_agent, _policy, metrics) = start_agent_with_metrics(&env, resolver);

    // Whatever its policy allows, a raw packet from the resolver's address
    // and port does not leave an enforced endpoint's socket.
    let run = env.probe(&[
        "forge-answer",
        &resolver.to_string(),
        &format!("{target}:5353"),
        "4242",
        "evil.azurecr.io",
        &target.to_string(),
    ]);
    assert_eq!(run.result(), Err(EPERM));
    assert_eq!(
        dns_counter(metrics, "tollgate_dns_spoofed_dropped_total"),
        1
    );
}
