//! Every map is pinned by name, so a restarted agent adopts the same maps and
//! the attached programs keep deciding while it is away.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use tollgate_common::{
    Config, EndpointKey, EndpointValue, FlowDedupKey, RuleKeyV4, RuleKeyV6, RuleList, capacity,
    counter,
};

#[map]
pub static TG_CONFIG: Array<Config> = Array::pinned(1, 0);

// No preallocation: entries deleted by a generation switch are freed after an
// RCU grace period instead of being reused under a reader's feet.
#[map]
pub static TG_ENDPOINTS: HashMap<EndpointKey, EndpointValue> =
    HashMap::pinned(capacity::ENDPOINTS, BPF_F_NO_PREALLOC);

#[map]
pub static TG_RULES_V4: LpmTrie<RuleKeyV4, RuleList> = LpmTrie::pinned(capacity::RULES_V4, 0);

#[map]
pub static TG_RULES_V6: LpmTrie<RuleKeyV6, RuleList> = LpmTrie::pinned(capacity::RULES_V6, 0);

#[map]
pub static TG_EVENTS: RingBuf = RingBuf::pinned(capacity::EVENTS_BYTES, 0);

#[map]
pub static TG_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

/// Last report time (CLOCK_MONOTONIC ns) of each recent allowed flow.
#[map]
pub static TG_FLOW_DEDUP: LruHashMap<FlowDedupKey, u64> =
    LruHashMap::pinned(capacity::FLOW_DEDUP, 0);
