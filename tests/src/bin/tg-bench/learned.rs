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
        &crate::rules::policy_by_name("bench-dns", &env.cgroup.relative, &[]),
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
    // The endpoint's socket, on the root side of the host's veth.
    let receiver_addr = format!("{}:5300", Ipv4Addr::from(u32::from(resolver) - 1));
    let before = counters(&env);
    let mut receiver = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["drain", env.cgroup.path.to_str().unwrap(), &receiver_addr])
        .arg((seconds + 1.0).to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let sender = std::process::Command::new("ip")
        .args(["netns", "exec", &netns])
        .arg(std::env::current_exe().unwrap())
        .args(["dns-blast", &format!("{resolver}:53"), &receiver_addr])
        .arg(seconds.to_string())
        .output()
        .unwrap();
    let sent: u64 = String::from_utf8_lossy(&sender.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let _ = receiver.wait();
    let after = counters(&env);
    drop(agent);
    env.cleanup_pins();
    report.dns_learning(crate::report::DnsLearning {
        seconds,
        sent,
        answers: after.0 - before.0,
        learned: after.1 - before.1,
    });
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

/// `tg-bench drain CGROUP ADDR SECONDS`: joins CGROUP, then receives on a
/// UDP socket bound to ADDR until SECONDS pass.
pub fn drain(cgroup: &str, addr: &str, seconds: f64) {
    std::fs::write(
        format!("{cgroup}/cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("joining the cgroup");
    let socket = std::net::UdpSocket::bind(addr).expect("binding the receiver");
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(100)))
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds);
    let mut buffer = [0u8; 2048];
    let mut received = 0u64;
    while std::time::Instant::now() < deadline {
        if socket.recv(&mut buffer).is_ok() {
            received += 1;
        }
    }
    println!("{received}");
}

/// `tg-bench dns-blast FROM TO SECONDS`: sends DNS answers for
/// `r<n>.bench.test` (a different address each) from FROM to TO as fast as
/// it can; prints how many it sent.
pub fn blast(from: &str, to: &str, seconds: f64) {
    use hickory_proto::{
        op::{Message, MessageType, Query},
        rr::{Name, RData, Record, RecordType, rdata::A},
    };
    let answers: Vec<Vec<u8>> = (0..4096u32)
        .map(|i| {
            let name = Name::from_ascii(format!("r{i}.bench.test.")).unwrap();
            let mut message = Message::query();
            message.metadata.id = i as u16;
            message.metadata.message_type = MessageType::Response;
            message.add_query(Query::query(name.clone(), RecordType::A));
            message.add_answer(Record::from_rdata(
                name,
                300,
                RData::A(A(Ipv4Addr::from(0x0a50_0000 + i))),
            ));
            message.to_vec().unwrap()
        })
        .collect();
    let socket = std::net::UdpSocket::bind(from).expect("binding the resolver's port 53");
    socket.connect(to).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    let mut next = 0;
    while std::time::Instant::now() < deadline {
        for _ in 0..256 {
            if socket.send(&answers[next]).is_ok() {
                sent += 1;
            }
            next = (next + 1) % answers.len();
        }
    }
    println!("{sent}");
}
