//! Every map is pinned by name, so a restarted agent adopts the same maps and
//! the attached programs keep deciding while it is away.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use tollgate_common::{
    AllowedCount, Config, DecideScratch, DnsScratch, EndpointKey, EndpointValue, FlowDedupKey,
    FqdnName, FqdnNameIds, FqdnRuleKey, LearnedKey, LearnedValue, QueryKey, QueryValue,
    ResolverKey, RuleHits, RuleKeyV4, RuleKeyV6, RuleList, capacity, counter,
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

/// The two halves allowed decisions are counted in (aggregate mode), by
/// flow: the programs count in the one `Config::allowed_counts` names while
/// the agent reads and empties the other. No preallocation: a half holds
/// what one interval's flows need.
#[map]
pub static TG_ALLOWED_A: HashMap<FlowDedupKey, AllowedCount> =
    HashMap::pinned(capacity::ALLOWED_COUNTS, BPF_F_NO_PREALLOC);
#[map]
pub static TG_ALLOWED_B: HashMap<FlowDedupKey, AllowedCount> =
    HashMap::pinned(capacity::ALLOWED_COUNTS, BPF_F_NO_PREALLOC);

/// FQDN rule names -> the patterns built on them. Not per generation:
/// pattern ids are stable, and the agent removes a name only after no
/// generation in force uses it.
#[map]
pub static TG_FQDN_NAMES: HashMap<FqdnName, FqdnNameIds> =
    HashMap::pinned(capacity::FQDN_NAMES, BPF_F_NO_PREALLOC);

/// (set, pattern) -> the set's port rules for addresses learned for the
/// pattern. Keyed by set id, like the rule tries.
#[map]
pub static TG_FQDN_RULES: HashMap<FqdnRuleKey, RuleList> =
    HashMap::pinned(capacity::FQDN_RULES, BPF_F_NO_PREALLOC);

/// (endpoint, address) -> the patterns it was learned for, until when.
/// LRU: a full map forgets the least recently used address, never refuses.
#[map]
pub static TG_FQDN_LEARNED: LruHashMap<LearnedKey, LearnedValue> =
    LruHashMap::pinned(capacity::FQDN_LEARNED, 0);

/// Resolvers whose answers are learned from.
#[map]
pub static TG_DNS_TRUSTED: HashMap<ResolverKey, u8> = HashMap::pinned(capacity::DNS_TRUSTED, 0);

#[map]
pub static TG_DNS_SCRATCH: PerCpuArray<DnsScratch> = PerCpuArray::pinned(1, 0);

/// Sockets of endpoints with FQDN rules that connected or sent to a trusted
/// resolver from their endpoint's network namespace (or one the agent does
/// not know), by socket cookie: the cookie of the socket's namespace.
#[map]
pub static TG_DNS_SOCKETS: LruHashMap<u64, u64> = LruHashMap::pinned(capacity::DNS_SOCKETS, 0);

/// Queries those sockets sent, awaiting their answers (dns.rs).
#[map]
pub static TG_DNS_QUERIES: LruHashMap<QueryKey, QueryValue> =
    LruHashMap::pinned(capacity::DNS_QUERIES, 0);

/// Cgroup id -> cookie of the endpoint's network namespace, for the
/// endpoints whose namespace the agent knows.
#[map]
pub static TG_ENDPOINT_NETNS: HashMap<u64, u64> =
    HashMap::pinned(capacity::ENDPOINT_NETNS, BPF_F_NO_PREALLOC);

/// The packet hook's DNS scratch value, where it reads the queries it
/// records: its own, since an answer's ingress can interrupt it.
#[map]
pub static TG_DNS_QUERY_SCRATCH: PerCpuArray<DnsScratch> = PerCpuArray::with_max_entries(1, 0);

/// The scratch value of the fallback DNS program (`tollgate_dns_forward`).
#[map]
pub static TG_DNS_FORWARD: PerCpuArray<DnsScratch> = PerCpuArray::pinned(1, 0);

/// Decision slots (destination, candidates and result, shared by a
/// decision's global functions; decide.rs). Not pinned: they hold nothing
/// across runs, so their layout may change with the programs, and a
/// program swapped in by an upgrade never shares one with its predecessor.
#[map]
pub static TG_DECIDE_SCRATCH: PerCpuArray<DecideScratch> =
    PerCpuArray::with_max_entries(capacity::DECIDE_SLOTS, 0);

/// A pod's link, by the ifindex of the node's side -> the cgroup id of an
/// endpoint of the pod: whose policies judge the frames there that carry
/// no socket to tell their cgroup (frame.rs).
#[map]
pub static TG_POD_LINKS: HashMap<u32, u64> =
    HashMap::pinned(capacity::POD_LINKS, BPF_F_NO_PREALLOC);

/// Rule id -> its decisions by verdict and last decision time, per CPU
/// (report.rs). Pinned: counts survive restarts and rule switches that
/// keep the rule; the agent zeroes an id's slot when the id leaves force
/// and before it is handed out again.
#[map]
pub static TG_RULE_HITS: PerCpuArray<RuleHits> = PerCpuArray::pinned(capacity::RULE_HITS, 0);
