//! The kernel ABI of Tollgate: every map key, map value and ring buffer event
//! that the BPF programs and the agent exchange.
//!
//! All types are `#[repr(C)]` with explicit padding fields, so that their
//! layout is the same on both sides and a zeroed value has no uninitialised
//! bytes (hash and LPM keys are compared byte by byte). A change to any of
//! them must bump [`PIN_LAYOUT_VERSION`]: pinned maps of an older layout are
//! never reused by a newer agent.
//!
//! See `docs/datapath.md` for how the maps fit together.
#![no_std]

pub mod dns;

/// Version of the pinned map layout; part of the bpffs pin directory name.
pub const PIN_LAYOUT_VERSION: u32 = 8;

/// Map names (at most 15 bytes: the kernel truncates longer object names).
pub mod map_names {
    pub const CONFIG: &str = "TG_CONFIG";
    pub const ENDPOINTS: &str = "TG_ENDPOINTS";
    pub const RULES_V4: &str = "TG_RULES_V4";
    pub const RULES_V6: &str = "TG_RULES_V6";
    pub const EVENTS: &str = "TG_EVENTS";
    pub const COUNTERS: &str = "TG_COUNTERS";
    pub const FLOW_DEDUP: &str = "TG_FLOW_DEDUP";
    pub const FQDN_NAMES: &str = "TG_FQDN_NAMES";
    pub const FQDN_RULES: &str = "TG_FQDN_RULES";
    pub const FQDN_LEARNED: &str = "TG_FQDN_LEARNED";
    pub const DNS_TRUSTED: &str = "TG_DNS_TRUSTED";
    pub const DNS_SCRATCH: &str = "TG_DNS_SCRATCH";
    pub const DNS_FORWARD: &str = "TG_DNS_FORWARD";
    pub const DNS_SOCKETS: &str = "TG_DNS_SOCKETS";
    pub const DNS_QUERIES: &str = "TG_DNS_QUERIES";
    pub const ENDPOINT_NETNS: &str = "TG_ENDPOINT_NETNS";
    pub const POD_LINKS: &str = "TG_POD_LINKS";
    pub const RULE_HITS: &str = "TG_RULE_HITS";
    pub const ALLOWED_COUNTS_A: &str = "TG_ALLOWED_A";
    pub const ALLOWED_COUNTS_B: &str = "TG_ALLOWED_B";
}

/// Default capacities; the agent may override them at load time.
pub mod capacity {
    pub const ENDPOINTS: u32 = 16_384;
    pub const RULES_V4: u32 = 262_144;
    pub const RULES_V6: u32 = 65_536;
    pub const FLOW_DEDUP: u32 = 65_536;
    /// Distinct FQDN rule names (a pattern's name; `*.` and `**.` share it).
    pub const FQDN_NAMES: u32 = 16_384;
    /// (rule set, FQDN pattern) port rule lists, both generation halves.
    pub const FQDN_RULES: u32 = 65_536;
    /// (endpoint, address) pairs learned from DNS answers (LRU).
    pub const FQDN_LEARNED: u32 = 131_072;
    /// Trusted resolver (address, port) pairs.
    pub const DNS_TRUSTED: u32 = 64;
    /// Sockets of endpoints with FQDN rules that may ask a trusted
    /// resolver (LRU).
    pub const DNS_SOCKETS: u32 = 65_536;
    /// DNS queries awaiting their answer (LRU).
    pub const DNS_QUERIES: u32 = 16_384;
    /// Endpoints whose network namespace is known.
    pub const ENDPOINT_NETNS: u32 = 16_384;
    /// Pods' links (the node's side) the frame hook is attached to.
    pub const POD_LINKS: u32 = 16_384;
    /// Hit counters, by rule id (rules and policies' defaults): ids at or
    /// above it are not counted (`counter::RULE_HITS_UNCOUNTED`). Per CPU,
    /// 32 bytes each: 512 KiB a CPU.
    pub const RULE_HITS: u32 = 16_384;
    /// Decision slots per CPU: one for a decision, one more for a decision
    /// made while it is preempted (agent-ebpf/src/decide.rs).
    pub const DECIDE_SLOTS: u32 = 2;
    /// Allowed flows counted in each half of `TG_ALLOWED_A`/`_B` per
    /// interval (allocated as used); beyond, a new flow is reported by an
    /// event of its own (`counter::ALLOWED_COUNTS_FULL`).
    pub const ALLOWED_COUNTS: u32 = 65_536;
    /// Ring buffer size in bytes (a power of two, a multiple of the page size).
    pub const EVENTS_BYTES: u32 = 4 << 20;
}

/// Highest [`PortRule::order`]: the programs pack it into 24 bits.
pub const MAX_RULE_ORDER: u32 = (1 << 24) - 1;

/// Port rules stored inline in one LPM value. The compiler checks this limit
/// before anything is written.
pub const MAX_PORT_RULES: usize = 16;

/// Rule id that marks a decision made by the endpoint's default action (no
/// rule matched), or by the absence of any policy for the endpoint.
pub const RULE_ID_DEFAULT: u32 = 0;

/// Global mode, and the mode a policy may override it with.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Denials are reported as `audit` and the connection proceeds.
    Observe = 1,
    /// Denials fail the connection with EPERM.
    Enforce = 2,
}

/// Per-policy mode as stored in rules: inherit the global mode or override it.
pub mod policy_mode {
    pub const INHERIT: u8 = 0;
    pub const OBSERVE: u8 = super::Mode::Observe as u8;
    pub const ENFORCE: u8 = super::Mode::Enforce as u8;
}

/// What a rule does with a matching connection.
pub mod action {
    pub const ALLOW: u8 = 1;
    pub const DENY: u8 = 2;
}

/// The decision reported for a connection.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed = 1,
    Denied = 2,
    /// Would have been denied, but the deciding policy is in observe mode.
    Audit = 3,
}

/// The hook that made a decision.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Connect4 = 1,
    Connect6 = 2,
    Sendmsg4 = 3,
    Sendmsg6 = 4,
    /// The `cgroup_skb` egress hook, which judges each packet of the
    /// sockets the four above do not see (raw, ICMP echo, SCTP, ...).
    Packet4 = 5,
    Packet6 = 6,
    /// The `tc` ingress hook on the node's side of a pod's link, which
    /// judges each frame there that no inet socket sent (packet sockets,
    /// AF_XDP, packets the pod's namespace forwards).
    Frame4 = 7,
    Frame6 = 8,
}

/// IP protocol numbers used in rules; 0 matches any protocol.
pub mod protocol {
    pub const ANY: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const DCCP: u8 = 33;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;

    /// Whether the protocol's header starts with a source and a
    /// destination port (16 bits each): the ports that port rules match.
    /// Other protocols are judged with port 0, which only port-less rules
    /// match.
    pub const fn has_ports(protocol: u8) -> bool {
        matches!(protocol, TCP | UDP | DCCP | SCTP | UDPLITE)
    }
}

/// Address families as the kernel numbers them.
pub mod family {
    pub const INET: u8 = 2;
    pub const INET6: u8 = 10;
}

/// Bits of [`FlowEvent::flags`].
pub mod flow_flags {
    /// The source cgroup has an endpoint entry (a policy selects it).
    pub const ENDPOINT_KNOWN: u8 = 1 << 0;
    /// The destination was an IPv4-mapped IPv6 address, judged as IPv4.
    pub const V4_MAPPED: u8 = 1 << 1;
    /// Every decision slot of the CPU was held by a preempted decision: a
    /// selected endpoint was denied without its rules being evaluated.
    pub const UNJUDGED: u8 = 1 << 2;
    /// An allowed decision that opened its flow's count in the counting
    /// half (`allowed_counts`): the kernel counts the flow's further
    /// decisions there instead of reporting them.
    pub const COUNTED: u8 = 1 << 3;
    /// With `COUNTED`: the half is `TG_ALLOWED_B` (else `TG_ALLOWED_A`).
    pub const COUNTED_IN_B: u8 = 1 << 4;
}

/// Indexes of the per-CPU counters in `TG_COUNTERS`.
pub mod counter {
    pub const ALLOWED: u32 = 0;
    pub const DENIED: u32 = 1;
    pub const AUDIT: u32 = 2;
    /// Allowed decisions not reported because an identical one was reported
    /// within the dedup interval.
    pub const ALLOWED_DEDUPLICATED: u32 = 3;
    /// Events lost because the ring buffer was full.
    pub const RINGBUF_RESERVE_FAILED: u32 = 4;
    /// Decisions that saw the generation change under them and re-ran.
    pub const GENERATION_RETRIES: u32 = 5;
    /// Decisions that saw the generation change on every attempt and went
    /// with the last one (only a writer switching continuously can cause it).
    pub const GENERATION_UNSTABLE: u32 = 6;
    /// DNS answers from trusted resolvers seen by the ingress program.
    pub const DNS_ANSWERS: u32 = 7;
    /// Addresses installed (new or refreshed) for an FQDN rule by the kernel.
    pub const DNS_ADDRESSES_LEARNED: u32 = 8;
    /// Answers the kernel parser left to the agent (TCP, too large, too odd).
    pub const DNS_TO_USERSPACE: u32 = 9;
    /// Answers the kernel parser found malformed: nothing learned.
    pub const DNS_MALFORMED: u32 = 10;
    /// Answers from port 53 of a resolver that is not trusted: ignored.
    pub const DNS_UNTRUSTED: u32 = 11;
    /// An address matched more FQDN patterns than a learned entry holds.
    pub const FQDN_SLOTS_FULL: u32 = 12;
    /// A learned address could not be written to its map.
    pub const FQDN_LEARN_FAILED: u32 = 13;
    /// Denied or audit packets not reported because the same flow was
    /// reported within the interval (the packet hooks report every
    /// verdict once per flow and interval, so a flood is one record).
    pub const PACKETS_DEDUPLICATED: u32 = 14;
    /// DNS answers from a trusted resolver to a socket that sent no query
    /// with their id and question to it: nothing learned.
    pub const DNS_NOT_ASKED: u32 = 15;
    /// DNS answers over loopback from a resolver that is not a loopback
    /// address, to an endpoint outside the host's network namespace.
    pub const DNS_VIA_LOOPBACK: u32 = 16;
    /// Queries to a trusted resolver from a socket outside its endpoint's
    /// network namespace: their answers teach nothing.
    pub const DNS_FOREIGN_NETNS: u32 = 17;
    /// Packets of raw and other packet-hook sockets that claim to come from
    /// a trusted resolver's address and port: dropped, whatever the policy.
    pub const DNS_SPOOFED: u32 = 18;
    /// Decisions whose rule id has no slot in `TG_RULE_HITS` (more rules
    /// in force than it holds): not counted per rule.
    pub const RULE_HITS_UNCOUNTED: u32 = 19;
    /// Allowed decisions of a new flow that found the counting half full:
    /// reported by an event of their own instead (nothing is lost).
    pub const ALLOWED_COUNTS_FULL: u32 = 20;
    pub const COUNT: u32 = 21;
}

/// Singleton in `TG_CONFIG[0]`.
///
/// `generation` and `global_mode` share the first 8-byte word: the programs
/// read them together as one u64 ([`Config::state_word`]), so a decision
/// uses the mode of the generation it decided by.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Active rule generation; its low bit selects the half of the endpoint
    /// and rule maps in force. Only ever increases.
    pub generation: u32,
    /// [`Mode`] as u8; 0 (not yet configured) behaves as observe.
    pub global_mode: u8,
    pub _pad: [u8; 3],
    /// Allowed decisions with the same source cgroup, destination, port and
    /// protocol are reported at most once per this interval. 0: report all.
    pub allowed_report_interval_ns: u64,
    /// Id of the cgroup the programs are attached to; lets a restarted agent
    /// check that the pinned links are the ones it was asked for.
    pub attached_cgroup_id: u64,
    /// Bounds applied to a DNS answer's TTL before it becomes a learned
    /// address's lifetime (see [`dns::learned_ttl`]).
    pub fqdn_ttl_min_s: u32,
    pub fqdn_ttl_max_s: u32,
    /// Decisions of the packet hooks with the same source cgroup,
    /// destination, port, protocol, rule and verdict are reported at most
    /// once per this interval, whatever the verdict (a flood is one
    /// decision per packet). 0: report all.
    pub packet_report_interval_ns: u64,
    /// Cookie of the host's network namespace (0: unknown). An answer over
    /// loopback from a resolver that is not a loopback address counts only
    /// for a socket of this namespace (node-local DNS).
    pub host_netns_cookie: u64,
    /// The ports of the trusted resolvers (0: unused): the packet hook
    /// looks at UDP datagrams to these ports for DNS queries.
    pub dns_ports: [u16; DNS_PORTS],
    /// 1 when the packet hook records DNS queries (`tollgate_packet`), so
    /// an answer must match one; 0 under its fallback
    /// (`tollgate_packet_plain`), where answers are tied to their socket
    /// only.
    pub queries_recorded: u8,
    /// Where allowed decisions of the sock_addr hooks are counted (the
    /// aggregate mode): [`allowed_counts`]. Not in the state word, so that
    /// switching halves never makes a decision re-run.
    pub allowed_counts: u8,
    pub _pad2: [u8; 6],
}

/// Distinct ports the trusted resolvers may listen on.
pub const DNS_PORTS: usize = 4;

/// Key of `TG_ENDPOINTS`: a cgroup in one generation half.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointKey {
    pub cgroup_id: u64,
    /// 0 or 1: `generation & 1` of the generation this entry belongs to.
    pub half: u32,
    pub _pad: u32,
}

/// Value of `TG_ENDPOINTS`: the rule set that applies to the endpoint, and
/// what happens when none of its rules match.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointValue {
    /// Key prefix of this endpoint's entries in `TG_RULES_V4`/`V6`.
    pub set_id: u32,
    /// [`action`] when no rule matches.
    pub default_action: u8,
    /// [`policy_mode`] of the default decision.
    pub default_mode: u8,
    /// [`endpoint_flags`].
    pub flags: u8,
    pub _pad: u8,
    /// Slot in `TG_RULE_HITS` of the default decision: the rule id the
    /// compiler gave the default of the policy owning it.
    pub default_hits_id: u32,
}

/// Per-CPU value of `TG_RULE_HITS`: one rule's (or policy default's)
/// decisions by verdict, and when it last decided (CLOCK_MONOTONIC ns;
/// 0: never). The agent sums the CPUs' counts and takes the latest time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleHits {
    pub allowed: u64,
    pub denied: u64,
    pub audit: u64,
    pub last_hit_ns: u64,
}

/// Bits of [`EndpointValue::flags`].
pub mod endpoint_flags {
    /// The endpoint's set has FQDN rules: connects also look up the
    /// addresses it learned, and its DNS answers are learned from.
    pub const FQDN_RULES: u8 = 1 << 0;
}

/// LPM key data of `TG_RULES_V4`: prefix length = 32 + CIDR prefix length,
/// so the set id always matches in full.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKeyV4 {
    /// Big-endian set id, so that its bits come first in the trie.
    pub set_id_be: u32,
    /// Network order.
    pub addr: [u8; 4],
}

/// LPM key data of `TG_RULES_V6`: prefix length = 32 + CIDR prefix length.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKeyV6 {
    pub set_id_be: u32,
    pub addr: [u8; 16],
}

/// One port/protocol rule within a prefix's rule list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRule {
    /// Inclusive port range, host order; 0..=65535 matches any port.
    pub port_lo: u16,
    pub port_hi: u16,
    /// [`protocol`]: 0 any, 6 TCP, 17 UDP.
    pub protocol: u8,
    /// [`action`].
    pub action: u8,
    /// [`policy_mode`] of the policy that owns the rule.
    pub mode: u8,
    pub _pad: u8,
    /// Agent-assigned id, reported with the decision.
    pub rule_id: u32,
    /// Precedence of the rule within its set: lower goes first. Lists of
    /// one lookup are sorted by it; a decision that combines a prefix's list
    /// with FQDN lists takes every category's lowest. At most
    /// [`MAX_RULE_ORDER`].
    pub order: u32,
}

/// Value of the rule LPM tries: every rule that applies to destinations in
/// the prefix, in precedence order (the compiler puts denies first). The
/// first match decides; no match means the endpoint's default.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleList {
    pub len: u32,
    pub rules: [PortRule; MAX_PORT_RULES],
}

/// Event kinds on the ring buffer; every event starts with its kind.
pub mod event_kind {
    pub const FLOW: u32 = 1;
    pub const DNS: u32 = 2;
}

/// A decision, as reported on `TG_EVENTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    /// [`event_kind::FLOW`].
    pub kind: u32,
    /// [`Hook`].
    pub hook: u8,
    /// [`Verdict`].
    pub verdict: u8,
    /// Effective [`Mode`] of the decision.
    pub mode: u8,
    /// [`family`] of the destination as judged (IPv4 for mapped addresses).
    pub family: u8,
    /// The IP protocol: the socket's at the sock_addr hooks, the packet's
    /// (after IPv6 extension headers) at the packet hooks.
    pub protocol: u8,
    /// [`flow_flags`].
    pub flags: u8,
    /// Host order; 0 for a protocol without ports and for a fragment
    /// other than the first.
    pub dst_port: u16,
    pub rule_id: u32,
    /// Set id of the endpoint's rules (meaningful with `ENDPOINT_KNOWN`).
    pub set_id: u32,
    pub generation: u32,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub pid_tgid: u64,
    pub uid_gid: u64,
    pub socket_cookie: u64,
    /// Network order; IPv4 in the first four bytes.
    pub dst_addr: [u8; 16],
    pub comm: [u8; 16],
}

/// Values of [`Config::allowed_counts`].
pub mod allowed_counts {
    /// Not counted: each allowed decision is reported (or deduplicated).
    pub const OFF: u8 = 0;
    /// Counted in `TG_ALLOWED_A`.
    pub const IN_A: u8 = 1;
    /// Counted in `TG_ALLOWED_B`.
    pub const IN_B: u8 = 2;
}

/// Key of `TG_FLOW_DEDUP` (LRU) and of `TG_ALLOWED_A`/`_B`: what makes two
/// decisions the same flow within an interval.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowDedupKey {
    pub cgroup_id: u64,
    pub dst_addr: [u8; 16],
    pub dst_port: u16,
    pub protocol: u8,
    pub family: u8,
    pub rule_id: u32,
    /// [`Hook`]: a raw socket's UDP and a UDP socket's are different flows.
    pub hook: u8,
    /// [`Verdict`]: a flow that turns from audit to denied is reported at
    /// once.
    pub verdict: u8,
    /// The decision's [`Mode`], [`flow_flags`] and generation, in the
    /// counting halves only (0 in `TG_FLOW_DEDUP`): a count never mixes
    /// two generations' rules, and a flow whose first decision's event was
    /// lost can still be reported from its key.
    pub mode: u8,
    pub flags: u8,
    pub generation: u32,
}

/// Value of `TG_ALLOWED_A`/`_B`: the flow's allowed decisions in the
/// interval, and the time of the last one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowedCount {
    /// Added to atomically: the flow's decisions may run on several CPUs.
    pub count: u64,
    /// CLOCK_MONOTONIC ns of the first decision, and of the last (a racing
    /// decision may leave a slightly earlier one).
    pub first_ns: u64,
    pub last_ns: u64,
}

/// Key of `TG_FQDN_NAMES`: a DNS name in wire form (length-prefixed
/// labels, lowercase, ending with the root label), zero-padded. Wire form
/// is unambiguous, so equal keys are equal names: matching compares the
/// whole name, never a hash of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnName {
    pub wire: [u8; dns::NAME_KEY],
}

/// Value of `TG_FQDN_NAMES`: the FQDN patterns built on a name; 0 = none.
/// For `example.com`: `example.com` (exact), `*.example.com` (one label)
/// and `**.example.com` (any labels).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FqdnNameIds {
    pub exact: u32,
    pub one_label: u32,
    pub any_labels: u32,
    pub _pad: u32,
}

/// Key of `TG_FQDN_RULES`: the port rules that a set applies to addresses
/// learned for one FQDN pattern.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnRuleKey {
    pub set_id: u32,
    pub pattern_id: u32,
}

/// Key of `TG_FQDN_LEARNED`: an address one endpoint learned.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LearnedKey {
    pub cgroup_id: u64,
    /// Network order; IPv4 in the first four bytes, the rest zero.
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 7],
}

/// Patterns one learned address holds at most.
pub const LEARNED_SLOTS: usize = 2;

/// One FQDN pattern an address was learned for, until when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedSlot {
    /// 0: free.
    pub pattern_id: u32,
    pub _pad: u32,
    /// CLOCK_MONOTONIC nanoseconds.
    pub expires_ns: u64,
}

/// Value of `TG_FQDN_LEARNED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LearnedValue {
    pub slots: [LearnedSlot; LEARNED_SLOTS],
}

/// Key of `TG_DNS_TRUSTED`: a trusted resolver's address and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResolverKey {
    pub addr: [u8; 16],
    /// Host order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}

/// Bits of [`DnsEvent::flags`].
pub mod dns_flags {
    /// Addresses of this answer were installed by the kernel.
    pub const LEARNED: u16 = 1 << 0;
    /// The kernel parser left this answer to the agent (too large or too
    /// odd); the agent parses it and installs what it allows.
    pub const TO_USERSPACE: u16 = 1 << 1;
    /// The payload is a TCP segment of a DNS stream (`tcp_seq` is set).
    pub const TCP: u16 = 1 << 2;
    /// The message is longer than the copy: only `payload_len` bytes follow.
    pub const CLIPPED: u16 = 1 << 3;
    /// The receiving endpoint has FQDN rules.
    pub const ENDPOINT_FQDN: u16 = 1 << 4;
    /// The kernel parser found the answer malformed.
    pub const MALFORMED: u16 = 1 << 5;
    /// The resolver's SYN of a DNS stream (with `TCP`; no payload):
    /// `tcp_seq` is its sequence number, and the stream starts after it.
    pub const TCP_SYN: u16 = 1 << 6;
    /// No query with this answer's id and question went from this socket
    /// to this resolver within the window, or the socket is not one of
    /// its endpoint's network namespace: nothing is learned from it.
    pub const NOT_ASKED: u16 = 1 << 7;
    /// Over loopback from a resolver that is not a loopback address, to a
    /// socket outside the host's network namespace: nothing learned.
    pub const VIA_LOOPBACK: u16 = 1 << 8;
}

/// Key of `TG_DNS_QUERIES`: a query a socket sent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct QueryKey {
    pub socket_cookie: u64,
    /// The DNS message id.
    pub id: u16,
    pub _pad: [u8; 6],
}

/// Value of `TG_DNS_QUERIES`: what was asked of whom, and when.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct QueryValue {
    /// The question name, as the DNS programs key names (`FqdnName`).
    pub name: FqdnName,
    pub qtype: u16,
    pub qclass: u16,
    pub resolver: ResolverKey,
    /// CLOCK_MONOTONIC nanoseconds.
    pub sent_ns: u64,
}

/// How long after its query an answer counts.
pub const QUERY_WINDOW_NS: u64 = 30_000_000_000;

/// A DNS answer (or a TCP segment of one) arriving at an endpoint from a
/// trusted resolver, as reported on `TG_EVENTS`: this header, then
/// `payload_len` bytes of the UDP or TCP payload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsEvent {
    /// [`event_kind::DNS`].
    pub kind: u32,
    /// [`dns_flags`].
    pub flags: u16,
    pub payload_len: u16,
    /// CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub socket_cookie: u64,
    /// Network order; IPv4 in the first four bytes.
    pub resolver_addr: [u8; 16],
    pub resolver_port: u16,
    pub family: u8,
    /// IPPROTO_UDP or IPPROTO_TCP.
    pub protocol: u8,
    /// TCP sequence number of the payload's first byte (host order).
    pub tcp_seq: u32,
    /// Length of the whole UDP or TCP payload.
    pub message_len: u16,
    /// Addresses the kernel installed from this answer.
    pub learned: u16,
    pub _pad: u32,
}

/// Per-CPU scratch space of the DNS ingress program (too big for the BPF
/// stack): the event being built, the payload right after it so the two go
/// out in one copy, and the question name as a lookup key.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsScratch {
    pub event: DnsEvent,
    pub payload: [u8; dns::MESSAGE_MAX],
    pub name: [u8; dns::NAME_BUF],
    pub found: dns::FoundAddresses,
    /// The parse so far, stored and read back between the program's
    /// phases (see `agent-ebpf/src/dns.rs`).
    pub header: dns::Header,
    pub question: dns::Question,
    pub patterns: [u32; LEARNED_SLOTS],
    pub pattern_count: u32,
    /// The query being recorded (egress) or looked up (ingress).
    pub query_key: QueryKey,
    pub query: QueryValue,
}

/// Per-CPU working memory of one decision (`agent-ebpf/src/decide.rs`).
/// The destination goes in and the decision comes out through it: the
/// decision's steps are global functions, which the verifier checks once
/// each, on their own, and which older kernels (before 5.12) let take
/// nothing but scalars.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct DecideScratch {
    /// Decisions holding or trying to claim this slot (decide.rs).
    pub busy: u64,
    /// The lowest candidate of each kind so far (enforced deny, deny,
    /// allow), `order << 40 | mode << 32 | rule_id`, `u64::MAX` for none.
    pub candidates: [u64; 3],
    /// Destination, network-order words; IPv4 in the first.
    pub addr: [u32; 4],
    /// Host order.
    pub port: u16,
    pub protocol: u8,
    /// The family the destination is judged as.
    pub family: u8,
    pub global_mode: u8,
    /// The decision: [`action`], [`policy_mode`] of the deciding rule or
    /// default, whether the endpoint is known.
    pub action: u8,
    pub mode: u8,
    pub endpoint_known: u8,
    pub rule_id: u32,
    pub set_id: u32,
    /// The slot of `TG_RULE_HITS` the decision counts in: `rule_id`, or
    /// the endpoint's `default_hits_id` for a default decision.
    pub hits_id: u32,
    pub _pad: u32,
}

impl Config {
    /// The (generation, global mode) word as the programs read it
    /// (little-endian: generation in the low half, mode in the next byte).
    pub const fn state_word(generation: u32, global_mode: u8) -> u64 {
        generation as u64 | (global_mode as u64) << 32
    }
}

impl Verdict {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Allowed),
            2 => Some(Self::Denied),
            3 => Some(Self::Audit),
            _ => None,
        }
    }
}

impl Hook {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Connect4),
            2 => Some(Self::Connect6),
            3 => Some(Self::Sendmsg4),
            4 => Some(Self::Sendmsg6),
            5 => Some(Self::Packet4),
            6 => Some(Self::Packet6),
            7 => Some(Self::Frame4),
            8 => Some(Self::Frame6),
            _ => None,
        }
    }
}

impl Mode {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Observe),
            2 => Some(Self::Enforce),
            _ => None,
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), Copy, made only of integers and byte arrays,
    // with every padding byte an explicit field.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for EndpointKey {}
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for RuleKeyV4 {}
    unsafe impl aya::Pod for RuleKeyV6 {}
    unsafe impl aya::Pod for PortRule {}
    unsafe impl aya::Pod for RuleList {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for FlowDedupKey {}
    unsafe impl aya::Pod for FqdnName {}
    unsafe impl aya::Pod for FqdnNameIds {}
    unsafe impl aya::Pod for FqdnRuleKey {}
    unsafe impl aya::Pod for LearnedKey {}
    unsafe impl aya::Pod for LearnedValue {}
    unsafe impl aya::Pod for ResolverKey {}
    unsafe impl aya::Pod for DnsEvent {}
    unsafe impl aya::Pod for DnsScratch {}
    unsafe impl aya::Pod for QueryKey {}
    unsafe impl aya::Pod for QueryValue {}
    unsafe impl aya::Pod for RuleHits {}
    unsafe impl aya::Pod for AllowedCount {}
}

// The layouts are part of the pinned ABI: fail the build if one drifts.
const _: () = {
    assert!(core::mem::size_of::<Config>() == 64);
    assert!(core::mem::size_of::<QueryKey>() == 16);
    assert!(core::mem::size_of::<QueryValue>() == 256 + 4 + 20 + 8);
    assert!(core::mem::size_of::<EndpointKey>() == 16);
    assert!(core::mem::size_of::<EndpointValue>() == 12);
    assert!(core::mem::size_of::<RuleHits>() == 32);
    assert!(core::mem::size_of::<RuleKeyV4>() == 8);
    assert!(core::mem::size_of::<RuleKeyV6>() == 20);
    assert!(core::mem::size_of::<PortRule>() == 16);
    assert!(core::mem::size_of::<RuleList>() == 4 + 16 * MAX_PORT_RULES);
    assert!(core::mem::size_of::<FlowEvent>() == 96);
    // No implicit padding anywhere: every byte of an event is written.
    assert!(core::mem::offset_of!(FlowEvent, ts_ns) == 24);
    assert!(core::mem::offset_of!(FlowEvent, comm) == 80);
    assert!(core::mem::offset_of!(Config, allowed_report_interval_ns) == 8);
    assert!(core::mem::size_of::<FlowDedupKey>() == 40);
    assert!(core::mem::offset_of!(FlowDedupKey, generation) == 36);
    assert!(core::mem::size_of::<AllowedCount>() == 24);
    assert!(core::mem::size_of::<FqdnNameIds>() == 16);
    assert!(core::mem::size_of::<FqdnRuleKey>() == 8);
    assert!(core::mem::size_of::<LearnedKey>() == 32);
    assert!(core::mem::size_of::<LearnedValue>() == 16 * LEARNED_SLOTS);
    assert!(core::mem::size_of::<ResolverKey>() == 20);
    assert!(core::mem::size_of::<DnsEvent>() == 64);
    assert!(core::mem::size_of::<DecideScratch>() == 72);
    assert!(core::mem::offset_of!(DnsScratch, payload) == 64);
    assert!(core::mem::offset_of!(DnsScratch, name) == 64 + dns::MESSAGE_MAX);
};
