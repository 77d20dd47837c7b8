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
