//! Learned FQDN addresses for the connect comparison: written straight into
//! the pinned map, as the DNS ingress program would write them.

use std::net::{IpAddr, Ipv4Addr};

use aya::maps::{HashMap, Map, MapData};
use tollgate_agent::datapath::learned::learned_key;
use tollgate_common::{FqdnName, FqdnNameIds, LearnedSlot, LearnedValue, map_names};
use tollgate_tests::TestEnv;

/// The row of the connect comparison.
pub const SUBJECT: &str = "Tollgate enforce, loopback by name, 1k learned";
/// Addresses the endpoint holds in that row.
pub const LEARNED_IN_COMPARISON: usize = 1_000;

/// Installs `count` learned addresses for the test's endpoint under the
/// one FQDN pattern of its policy: 127.0.0.1 (where the load connects and
/// sends) and `count - 1` others, alive for an hour.
pub fn install(env: &TestEnv, count: usize) {
    let maps = env.datapath_options().pin_dir().join("maps");
    let open = |name: &str| Map::HashMap(MapData::from_pin(maps.join(name)).expect(name));
    let names: HashMap<_, FqdnName, FqdnNameIds> = open(map_names::FQDN_NAMES).try_into().unwrap();
    let pattern_id = names
        .iter()
        .filter_map(Result::ok)
        .map(|(_, ids)| ids.one_label)
        .find(|id| *id != 0)
        .expect("the policy's *.bench.test pattern");
    let mut learned: HashMap<_, tollgate_common::LearnedKey, LearnedValue> =
        Map::LruHashMap(MapData::from_pin(maps.join(map_names::FQDN_LEARNED)).unwrap())
            .try_into()
            .unwrap();
    let mut value = LearnedValue::default();
    value.slots[0] = LearnedSlot {
        pattern_id,
        _pad: 0,
        expires_ns: tollgate_agent::flow::monotonic_ns() + 3_600_000_000_000,
    };
    let others =
        (0..count.saturating_sub(1) as u32).map(|i| IpAddr::V4(Ipv4Addr::from(0x0a40_0000 + i)));
    for ip in std::iter::once(IpAddr::V4(Ipv4Addr::LOCALHOST)).chain(others) {
        learned
            .insert(learned_key(env.cgroup.id, ip), value, 0)
            .expect("installing a learned address");
    }
}

/// DNS learning throughput: answers from a trusted resolver in a test
/// host's namespace, sent as fast as one sender goes to a socket of an
/// endpoint with an FQDN rule, each answer for a name the rule matches.
pub fn learning_rate(plan: &crate::Plan, report: &mut crate::report::Report) {
    let mut env = TestEnv::new("bench-dns");
    let resolver = env.add_host(90, &[]).v4;
    let netns = env.hosts[0].netns.clone();
    let policy = tollgate_tests::TempFile::new(
        "bench-dns.yaml",
        &format!(
            "apiVersion: policy.tollgate.dev/v1alpha1\nkind: EgressPolicy\nmetadata:\n  name: bench-dns\n\
             spec:\n  cgroupSelector:\n    paths: [\"{}\"]\n  mode: enforce\n  egress:\n\
             \x20 - {{name: dns, to: [{{cidr: {resolver}/32}}], ports: [{{port: 53, protocol: UDP}}]}}\n\
             \x20 - {{name: names, to: [{{fqdn: \"*.bench.test\"}}]}}\n",
            env.cgroup.relative
        ),
    );
    let agent = tollgate_tests::AgentProcess::start(
        &env,
        &[
            "--policy",
            policy.path.to_str().unwrap(),
            "--dns-resolver",
            &resolver.to_string(),
        ],
    );
    let seconds = plan.seconds.max(1.0);
    // The resolver answers each query with the prepared answer for its id;
    // the endpoint asks as fast as one socket goes. Each answer is learned
    // only because its query went out first (the packet hook records it).
    let mut server = start_resolver(&netns, resolver, NAMES);
    let before = counters(&env);
    let sent = ask(&env.cgroup.path, resolver, seconds, NAMES);
    let after = counters(&env);

    // Latency: query and answer, one at a time, from the endpoint (the
    // ingress program parses and learns each answer) and from a cgroup
    // outside the attach point (nothing runs), in turns.
    let outside = tollgate_tests::TestCgroup::new("bench-dns-base");
    let rounds = if plan.smoke { 2_000 } else { 20_000 };
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..plan.rounds {
        without.extend(round_trips(&outside.path, resolver, rounds));
        with.extend(round_trips(&env.cgroup.path, resolver, rounds));
    }
    let _ = server.kill();
    let _ = server.wait();
    drop(agent);
    env.cleanup_pins();
    report.dns_learning(crate::report::DnsLearning {
        seconds,
        sent,
        answers: after.0 - before.0,
        learned: after.1 - before.1,
        latency_ns: percentiles(&mut with),
        baseline_latency_ns: percentiles(&mut without),
    });
}

/// Names `r<n>.bench.test`, n < this, that the learning rate asks for.
const NAMES: u32 = 4096;

/// `dns-serve` at `resolver`:53 in `netns`, answering `r<n>.bench.test`,
/// n < `names`; kill it when done.
fn start_resolver(netns: &str, resolver: Ipv4Addr, names: u32) -> std::process::Child {
    let server = std::process::Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(std::env::current_exe().unwrap())
        .args(["dns-serve", &format!("{resolver}:53"), &names.to_string()])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    server
}

/// Has an endpoint (`cgroup`) learn `names` addresses: it asks the resolver
/// in `netns` for each, as the learning rate does. Returns the queries sent.
pub fn learn(
    netns: &str,
    resolver: Ipv4Addr,
    cgroup: &std::path::Path,
    seconds: f64,
    names: u32,
) -> u64 {
    let mut server = start_resolver(netns, resolver, names);
    let sent = ask(cgroup, resolver, seconds, names);
    let _ = server.kill();
    let _ = server.wait();
    sent
}

/// Runs `dns-ask` in `cgroup` for `seconds`; returns how many queries it sent.
fn ask(cgroup: &std::path::Path, resolver: Ipv4Addr, seconds: f64, names: u32) -> u64 {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "dns-ask",
            cgroup.to_str().unwrap(),
            &format!("{resolver}:53"),
        ])
        .arg(seconds.to_string())
        .arg(names.to_string())
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// (p50, p99) of `samples`.
fn percentiles(samples: &mut [u64]) -> (u64, u64) {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    (at(0.50), at(0.99))
}

/// Query/answer round trips (ns) from a process in `cgroup`.
fn round_trips(cgroup: &std::path::Path, resolver: Ipv4Addr, rounds: usize) -> Vec<u64> {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "dns-rtt",
            cgroup.to_str().unwrap(),
            &format!("{resolver}:53"),
        ])
        .arg(rounds.to_string())
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// `tg-bench dns-serve ADDR NAMES`: answers every query on ADDR with the
/// prepared answer of its id (so of its question), until killed.
pub fn serve(addr: &str, names: u32) {
    let answers = prepared(names, true);
    let socket = std::net::UdpSocket::bind(addr).expect("binding the resolver's port 53");
    let mut buffer = [0u8; 512];
    loop {
        if let Ok((len, peer)) = socket.recv_from(&mut buffer)
            && len >= 2
        {
            let id = u16::from_be_bytes([buffer[0], buffer[1]]) as usize;
            let _ = socket.send_to(&answers[id % answers.len()], peer);
        }
    }
}

/// `tg-bench dns-ask CGROUP RESOLVER SECONDS NAMES`: joins CGROUP, then
/// sends queries for `r<n>.bench.test`, n < NAMES, in turn on one connected
/// UDP socket for SECONDS, as fast as the resolver answers: a window of
/// [`ASK_WINDOW`] queries, then their answers, and again. Prints how many
/// queries it sent.
///
/// A sender that does not wait (as this one did) only fills the
/// resolver's queue, and on two cores takes the time the resolver needs
/// to answer: nine queries in ten went unanswered, and what was measured
/// was the resolver's share of the CPU, not learning.
pub fn ask_worker(cgroup: &str, resolver: &str, seconds: f64, names: u32) {
    std::fs::write(
        format!("{cgroup}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("joining the cgroup");
    let queries = prepared(names, false);
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.connect(resolver).unwrap();
    // An answer lost (a full queue) ends its window's wait this late.
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(5)))
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds);
    let mut buffer = [0u8; 512];
    let mut sent = 0u64;
    let mut next = 0;
    while std::time::Instant::now() < deadline {
        let mut in_flight = 0;
        for _ in 0..ASK_WINDOW {
            if socket.send(&queries[next]).is_ok() {
                sent += 1;
                in_flight += 1;
            }
            next = (next + 1) % queries.len();
        }
        while in_flight > 0 && socket.recv(&mut buffer).is_ok() {
            in_flight -= 1;
        }
    }
    println!("{sent}");
}

/// Queries [`ask_worker`] has in flight at most.
const ASK_WINDOW: usize = 64;

/// `tg-bench dns-rtt CGROUP RESOLVER ROUNDS`: joins CGROUP, then sends
/// ROUNDS queries one after the other on a connected UDP socket (the
/// connect is judged once) and prints each round trip in ns.
pub fn rtt(cgroup: &str, resolver: &str, rounds: usize) {
    std::fs::write(
        format!("{cgroup}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("joining the cgroup");
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.connect(resolver).unwrap();
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(1)))
        .unwrap();
    let queries = prepared(NAMES, false);
    let mut buffer = [0u8; 512];
    let mut out = String::with_capacity(rounds * 8);
    for round in 0..rounds {
        let start = std::time::Instant::now();
        if socket.send(&queries[round % queries.len()]).is_ok() && socket.recv(&mut buffer).is_ok()
        {
            out.push_str(&start.elapsed().as_nanos().to_string());
            out.push('\n');
        }
    }
    print!("{out}");
}

/// The kernel's (DNS answers, addresses learned) counters.
fn counters(env: &TestEnv) -> (u64, u64) {
    use tollgate_common::counter;
    let path = env
        .datapath_options()
        .pin_dir()
        .join("maps")
        .join(map_names::COUNTERS);
    let map: aya::maps::PerCpuArray<_, u64> = Map::PerCpuArray(MapData::from_pin(path).unwrap())
        .try_into()
        .unwrap();
    let sum = |index: u32| map.get(&index, 0).unwrap().iter().sum::<u64>();
    (
        sum(counter::DNS_ANSWERS),
        sum(counter::DNS_ADDRESSES_LEARNED),
    )
}

/// Queries (or their answers) for `r<n>.bench.test`, n < `names`, with id
/// n; each answer gives an address of its own.
fn prepared(names: u32, answers: bool) -> Vec<Vec<u8>> {
    use hickory_proto::{
        op::{Message, MessageType, Query},
        rr::{Name, RData, Record, RecordType, rdata::A},
    };
    (0..names)
        .map(|i| {
            let name = Name::from_ascii(format!("r{i}.bench.test.")).unwrap();
            let mut message = Message::query();
            message.metadata.id = i as u16;
            message.add_query(Query::query(name.clone(), RecordType::A));
            if answers {
                message.metadata.message_type = MessageType::Response;
                message.add_answer(Record::from_rdata(
                    name,
                    300,
                    RData::A(A(Ipv4Addr::from(0x0a50_0000 + i))),
                ));
            }
            message.to_vec().unwrap()
        })
        .collect()
}
