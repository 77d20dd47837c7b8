//! Typed rule sets and the generation switch that puts one in force.
//!
//! A [`RuleSet`] is what the policy compiler produces: rule sets (one per
//! distinct combination of policies) with their prefixes and port rules, and
//! the endpoints (cgroups) that use each set. [`Datapath::switch_rules`]
//! writes it into the inactive half of the maps, flips the generation in one
//! write, and deletes the old half; see `decide.rs` in agent-ebpf for why the
//! kernel never mixes the two halves.

use std::collections::BTreeMap;

use aya::maps::{IterableMap, lpm_trie::Key};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tollgate_common::{
    Config, EndpointKey, EndpointValue, FqdnName, FqdnNameIds, FqdnRuleKey, MAX_PORT_RULES,
    MAX_RULE_ORDER, Mode, PortRule, RuleKeyV4, RuleKeyV6, RuleList, SET_ID_HALF_BIT, action,
    dns::{NAME_KEY, NAME_MAX},
    endpoint_flags, map_names, policy_mode, protocol,
};

use super::{Datapath, DatapathError, map_err};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// A policy's mode: the global one, or an override.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum PolicyMode {
    #[default]
    Inherit,
    Observe,
    Enforce,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
}

impl Protocol {
    /// Whether a socket's IP protocol number is covered.
    pub fn matches(self, protocol: u8) -> bool {
        match self {
            Protocol::Any => true,
            Protocol::Tcp => protocol == protocol::TCP,
            Protocol::Udp => protocol == protocol::UDP,
        }
    }
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ANY: Self = Self {
        first: 0,
        last: u16::MAX,
    };

    pub const fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }
}

/// One port rule of a prefix, in the order the kernel tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRuleSpec {
    pub ports: PortRange,
    pub protocol: Protocol,
    pub action: Action,
    pub mode: PolicyMode,
    /// Reported with every decision this rule makes; never 0 (that is "default").
    pub rule_id: u32,
    /// Precedence within the set, lower first: denies (strongest mode
    /// first), then allows. Every list holds its rules in this order.
    pub order: u32,
}

/// A DNS name rule, lowercased, without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FqdnPattern {
    /// `api.example.com`
    Exact(String),
    /// `*.example.com`: exactly one more label; holds `example.com`.
    OneLabel(String),
    /// `**.example.com`: one or more labels; holds `example.com`.
    AnyLabels(String),
}

impl FqdnPattern {
    /// The name the pattern is built on.
    pub fn name(&self) -> &str {
        match self {
            Self::Exact(name) | Self::OneLabel(name) | Self::AnyLabels(name) => name,
        }
    }

    /// Whether `name` (lowercase, dotted, no trailing dot) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => name == exact,
            Self::OneLabel(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            Self::AnyLabels(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|labels| !labels.is_empty() && !labels.split('.').any(str::is_empty)),
        }
    }
}

impl std::fmt::Display for FqdnPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::OneLabel(name) => write!(f, "*.{name}"),
            Self::AnyLabels(name) => write!(f, "**.{name}"),
        }
    }
}

/// The datapath entries of one rule set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetRules {
    pub default_action: Action,
    pub default_mode: PolicyMode,
    /// Each prefix lists every rule that applies to it: the lookup of the
    /// longest matching prefix alone must decide.
    pub v4: Vec<(Ipv4Net, Vec<PortRuleSpec>)>,
    pub v6: Vec<(Ipv6Net, Vec<PortRuleSpec>)>,
    /// FQDN pattern id -> the rules for addresses an endpoint of the set
    /// learned for that pattern.
    pub fqdn: Vec<(u32, Vec<PortRuleSpec>)>,
}

/// Everything one generation holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    pub sets: Vec<SetRules>,
    /// cgroup id -> index into `sets`.
    pub endpoints: BTreeMap<u64, u32>,
    /// Every FQDN pattern the sets use, by id. Ids are the agent's, stable
    /// while a pattern is in use, and never 0.
    pub fqdn_patterns: BTreeMap<u32, FqdnPattern>,
}

impl SetRules {
    /// What the kernel decides for this set (agent-ebpf `decide.rs`, in
    /// plain Rust) under the global mode `global` (observe or enforce),
    /// for an endpoint that learned the destination for the FQDN patterns
    /// `learned`: the port rules of the longest prefix containing the
    /// destination and of those patterns, taken by precedence, else the
    /// default. Returns the action, the mode of what decided and its rule
    /// id (0 for the default).
    pub fn decide(
        &self,
        ip: std::net::IpAddr,
        port: u16,
        protocol: u8,
        global: PolicyMode,
        learned: &[u32],
    ) -> (Action, PolicyMode, u32) {
        let longest = match ip {
            std::net::IpAddr::V4(ip) => self
                .v4
                .iter()
                .filter(|(net, _)| net.contains(&ip))
                .max_by_key(|(net, _)| net.prefix_len())
                .map(|(_, l)| l),
            std::net::IpAddr::V6(ip) => self
                .v6
                .iter()
                .filter(|(net, _)| net.contains(&ip))
                .max_by_key(|(net, _)| net.prefix_len())
                .map(|(_, l)| l),
        };
        let by_name = self
            .fqdn
            .iter()
            .filter(|(id, _)| learned.contains(id))
            .map(|(_, l)| l);
        let enforced = |mode: PolicyMode| {
            mode == PolicyMode::Enforce
                || (mode == PolicyMode::Inherit && global == PolicyMode::Enforce)
        };
        // Within a list, everything after its first matching allow comes later.
        let matching: Vec<&PortRuleSpec> = longest
            .into_iter()
            .chain(by_name)
            .flat_map(|list| {
                let mut matching = list.iter().filter(|rule| {
                    rule.ports.first <= port
                        && port <= rule.ports.last
                        && rule.protocol.matches(protocol)
                });
                let mut taken = Vec::new();
                for rule in matching.by_ref() {
                    taken.push(rule);
                    if rule.action == Action::Allow {
                        break;
                    }
                }
                taken
            })
            .collect();
        let first = |keep: &dyn Fn(&PortRuleSpec) -> bool| {
            matching
                .iter()
                .filter(|r| keep(r))
                .min_by_key(|r| r.order)
                .map(|r| (r.mode, r.rule_id))
        };
        let enforced_deny = first(&|r| r.action == Action::Deny && enforced(r.mode));
        let deny = first(&|r| r.action == Action::Deny);
        let allow = first(&|r| r.action == Action::Allow);
        let default = (
            self.default_action,
            self.default_mode,
            tollgate_common::RULE_ID_DEFAULT,
        );
        match (enforced_deny, deny, allow) {
            (Some((mode, id)), _, _) => (Action::Deny, mode, id),
            (None, Some(_), None)
                if self.default_action == Action::Deny && enforced(self.default_mode) =>
            {
                default
            }
            (None, Some((mode, id)), _) => (Action::Deny, mode, id),
            (None, None, Some((mode, id))) => (Action::Allow, mode, id),
            (None, None, None) => default,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuleSetError {
    #[error("set {set}, {list}: {len} port rules, at most {MAX_PORT_RULES} fit one list")]
    TooManyPortRules {
        set: u32,
        list: ListName,
        len: usize,
    },
    #[error("set {set}, {list}: port range {first}-{last} is reversed")]
    ReversedPortRange {
        set: u32,
        list: ListName,
        first: u16,
        last: u16,
    },
    #[error("set {set} has more than {} rules", MAX_RULE_ORDER + 1)]
    TooManyRules { set: u32 },
    #[error("set {set}, {list}: rule id 0 is reserved for default decisions")]
    ReservedRuleId { set: u32, list: ListName },
    #[error("set {set} uses FQDN pattern id {pattern_id}, which the rule set does not name")]
    UnknownFqdnPattern { set: u32, pattern_id: u32 },
    #[error("FQDN pattern {0:?} is not a name of at most 253 characters in labels of 1 to 63")]
    BadFqdnName(String),
    #[error("endpoint (cgroup id {cgroup_id}) uses set {set}, but there are only {sets} sets")]
    UnknownSet {
        cgroup_id: u64,
        set: u32,
        sets: usize,
    },
    #[error("{sets} rule sets; at most {} fit", SET_ID_HALF_BIT)]
    TooManySets { sets: usize },
    #[error(
        "map {map} holds at most {capacity} entries; this rule set needs {needed} beside the {live} in force"
    )]
    Capacity {
        map: &'static str,
        needed: usize,
        live: usize,
        capacity: u32,
    },
}

/// Which of a set's rule lists an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListName {
    Prefix(IpNet),
    FqdnPattern(u32),
}

impl std::fmt::Display for ListName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Prefix(net) => write!(f, "prefix {net}"),
            Self::FqdnPattern(id) => write!(f, "FQDN pattern {id}"),
        }
    }
}

/// The keys written into one generation half.
#[derive(Clone, Debug, Default)]
pub(super) struct HalfContents {
    endpoints: Vec<EndpointKey>,
    v4: Vec<(u32, RuleKeyV4)>,
    v6: Vec<(u32, RuleKeyV6)>,
    fqdn: Vec<FqdnRuleKey>,
}

impl HalfContents {
    pub(super) fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    pub(super) fn v4_count(&self) -> usize {
        self.v4.len()
    }

    pub(super) fn v6_count(&self) -> usize {
        self.v6.len()
    }

    pub(super) fn fqdn_count(&self) -> usize {
        self.fqdn.len()
    }
}

/// The kernel's set id for set `index` in generation half `half`.
fn set_id(half: u32, index: u32) -> u32 {
    (half << 31) | index
}

fn half_of_set(set_id_be: u32) -> usize {
    (u32::from_be(set_id_be) >> 31) as usize
}

fn encode_rules(
    set: u32,
    list: ListName,
    rules: &[PortRuleSpec],
) -> Result<RuleList, RuleSetError> {
    if rules.len() > MAX_PORT_RULES {
        return Err(RuleSetError::TooManyPortRules {
            set,
            list,
            len: rules.len(),
        });
    }
    let mut encoded = RuleList {
        len: rules.len() as u32,
        ..Default::default()
    };
    for (slot, rule) in encoded.rules.iter_mut().zip(rules) {
        if rule.ports.first > rule.ports.last {
            let PortRange { first, last } = rule.ports;
            return Err(RuleSetError::ReversedPortRange {
                set,
                list,
                first,
                last,
            });
        }
        if rule.rule_id == tollgate_common::RULE_ID_DEFAULT {
            return Err(RuleSetError::ReservedRuleId { set, list });
        }
        if rule.order > MAX_RULE_ORDER {
            return Err(RuleSetError::TooManyRules { set });
        }
        *slot = PortRule {
            port_lo: rule.ports.first,
            port_hi: rule.ports.last,
            protocol: match rule.protocol {
                Protocol::Any => protocol::ANY,
                Protocol::Tcp => protocol::TCP,
                Protocol::Udp => protocol::UDP,
            },
            action: encode_action(rule.action),
            mode: encode_mode(rule.mode),
            _pad: 0,
            rule_id: rule.rule_id,
            order: rule.order,
        };
    }
    Ok(encoded)
}

fn encode_action(action: Action) -> u8 {
    match action {
        Action::Allow => action::ALLOW,
        Action::Deny => action::DENY,
    }
}

fn encode_mode(mode: PolicyMode) -> u8 {
    match mode {
        PolicyMode::Inherit => policy_mode::INHERIT,
        PolicyMode::Observe => policy_mode::OBSERVE,
        PolicyMode::Enforce => policy_mode::ENFORCE,
    }
}

/// A rule set in kernel form, checked and ready to write.
struct Encoded {
    endpoints: Vec<(EndpointKey, EndpointValue)>,
    v4: Vec<(Key<RuleKeyV4>, RuleList)>,
    v6: Vec<(Key<RuleKeyV6>, RuleList)>,
    fqdn: Vec<(FqdnRuleKey, RuleList)>,
    /// Not per half: the names map holds the patterns of every generation
    /// in force or about to be.
    names: FqdnNames,
}

/// The contents of `TG_FQDN_NAMES`.
pub(super) type FqdnNames = BTreeMap<FqdnName, FqdnNameIds>;

/// `name` (lowercase, dotted, no trailing dot) in wire form, zero-padded.
pub fn wire_name(name: &str) -> Option<FqdnName> {
    let mut key = FqdnName {
        wire: [0; NAME_KEY],
    };
    let mut at = 0;
    for label in name.split('.') {
        let len = label.len();
        if len == 0 || len > 63 || at + 1 + len + 1 > NAME_MAX {
            return None;
        }
        key.wire[at] = len as u8;
        key.wire[at + 1..at + 1 + len].copy_from_slice(label.as_bytes());
        at += 1 + len;
    }
    Some(key)
}

/// The dotted form of a wire name key; None if it is not one this agent
/// writes.
fn dotted_name(key: &FqdnName) -> Option<String> {
    let mut labels = Vec::new();
    let mut at = 0;
    while at < NAME_MAX {
        let len = key.wire[at] as usize;
        if len == 0 {
            return (!labels.is_empty()).then(|| labels.join("."));
        }
        let label = key.wire.get(at + 1..at + 1 + len)?;
        labels.push(std::str::from_utf8(label).ok()?.to_owned());
        at += 1 + len;
    }
    None
}

fn encode_names(patterns: &BTreeMap<u32, FqdnPattern>) -> Result<FqdnNames, RuleSetError> {
    let mut names = FqdnNames::new();
    for (&id, pattern) in patterns {
        let key = wire_name(pattern.name())
            .ok_or_else(|| RuleSetError::BadFqdnName(pattern.to_string()))?;
        let ids = names.entry(key).or_default();
        match pattern {
            FqdnPattern::Exact(_) => ids.exact = id,
            FqdnPattern::OneLabel(_) => ids.one_label = id,
            FqdnPattern::AnyLabels(_) => ids.any_labels = id,
        }
    }
    Ok(names)
}

/// The patterns a names map holds, by id.
pub(super) fn decode_names(names: &FqdnNames) -> BTreeMap<FqdnPattern, u32> {
    let mut patterns = BTreeMap::new();
    for (key, ids) in names {
        let Some(name) = dotted_name(key) else {
            continue;
        };
        for (id, pattern) in [
            (ids.exact, FqdnPattern::Exact(name.clone())),
            (ids.one_label, FqdnPattern::OneLabel(name.clone())),
            (ids.any_labels, FqdnPattern::AnyLabels(name.clone())),
        ] {
            if id != 0 {
                patterns.insert(pattern, id);
            }
        }
    }
    patterns
}

fn encode(rules: &RuleSet, half: u32) -> Result<Encoded, RuleSetError> {
    if rules.sets.len() >= SET_ID_HALF_BIT as usize {
        return Err(RuleSetError::TooManySets {
            sets: rules.sets.len(),
        });
    }
    // Sized up front: at 100k rules, growing by doubling held 1.5 copies.
    let count = |list: fn(&SetRules) -> usize| rules.sets.iter().map(list).sum();
    let mut encoded = Encoded {
        endpoints: Vec::with_capacity(rules.endpoints.len()),
        v4: Vec::with_capacity(count(|set| set.v4.len())),
        v6: Vec::with_capacity(count(|set| set.v6.len())),
        fqdn: Vec::with_capacity(count(|set| set.fqdn.len())),
        names: encode_names(&rules.fqdn_patterns)?,
    };
    for (index, set) in rules.sets.iter().enumerate() {
        let index = index as u32;
        let set_id_be = set_id(half, index).to_be();
        for (net, port_rules) in &set.v4 {
            let list = encode_rules(index, ListName::Prefix(IpNet::V4(*net)), port_rules)?;
            let data = RuleKeyV4 {
                set_id_be,
                addr: net.network().octets(),
            };
            encoded
                .v4
                .push((Key::new(32 + u32::from(net.prefix_len()), data), list));
        }
        for (net, port_rules) in &set.v6 {
            let list = encode_rules(index, ListName::Prefix(IpNet::V6(*net)), port_rules)?;
            let data = RuleKeyV6 {
                set_id_be,
                addr: net.network().octets(),
            };
            encoded
                .v6
                .push((Key::new(32 + u32::from(net.prefix_len()), data), list));
        }
        for (pattern_id, port_rules) in &set.fqdn {
            if !rules.fqdn_patterns.contains_key(pattern_id) {
                return Err(RuleSetError::UnknownFqdnPattern {
                    set: index,
                    pattern_id: *pattern_id,
                });
            }
            let list = encode_rules(index, ListName::FqdnPattern(*pattern_id), port_rules)?;
            let key = FqdnRuleKey {
                set_id: set_id(half, index),
                pattern_id: *pattern_id,
            };
            encoded.fqdn.push((key, list));
        }
    }
    for (&cgroup_id, &set) in &rules.endpoints {
        let Some(set_rules) = rules.sets.get(set as usize) else {
            return Err(RuleSetError::UnknownSet {
                cgroup_id,
                set,
                sets: rules.sets.len(),
            });
        };
        encoded.endpoints.push((
            EndpointKey {
                cgroup_id,
                half,
                _pad: 0,
            },
            EndpointValue {
                set_id: set_id(half, set),
                default_action: encode_action(set_rules.default_action),
                default_mode: encode_mode(set_rules.default_mode),
                flags: if set_rules.fqdn.is_empty() {
                    0
                } else {
                    endpoint_flags::FQDN_RULES
                },
                _pad: 0,
            },
        ));
    }
    Ok(encoded)
}

impl Datapath {
    /// Puts `rules` in force atomically: connections are decided wholly by
    /// the previous rule set until the switch, wholly by `rules` after it.
    /// On error the previous rule set stays in force, untouched.
    pub fn switch_rules(&mut self, rules: &RuleSet) -> Result<u32, DatapathError> {
        self.switch_rules_with_mode(rules, self.global_mode())
    }

    /// [`switch_rules`](Self::switch_rules), switching the global mode in
    /// the same write, so no decision combines the new rules with the old
    /// mode or the other way round.
    pub fn switch_rules_with_mode(
        &mut self,
        rules: &RuleSet,
        mode: Mode,
    ) -> Result<u32, DatapathError> {
        let next_generation = self.state.generation.wrapping_add(1);
        let next_half = (next_generation & 1) as usize;
        let live_half = 1 - next_half;
        let encoded = encode(rules, next_half as u32)?;
        self.check_capacity(&encoded, live_half)?;

        // Left over by a switch that failed half way; not in force.
        self.clear_half(next_half)?;
        // Names of both generations while either may decide; a pattern id
        // never changes while the pattern is in use, so the union is sound.
        let mut both = self.fqdn_names.clone();
        both.extend(encoded.names.iter().map(|(k, v)| (*k, *v)));
        self.write_names(both)?;
        let flipped = self.write_half(&encoded, next_half).and_then(|()| {
            let next = Config {
                generation: next_generation,
                global_mode: mode as u8,
                ..self.state
            };
            self.write_config(next)
        });
        if let Err(e) = flipped {
            // Still not in force; whatever stays is cleared by the next switch.
            let _ = self.clear_half(next_half);
            return Err(e);
        }
        // The new rules are in force whatever happens now. Entries of the old
        // half that cannot be deleted stay tracked and go at the next switch.
        if let Err(e) = self.clear_half(live_half) {
            tracing::warn!(error = %e, "old rules not all removed; they are out of force and go at the next switch");
        }
        if let Err(e) = self.write_names(encoded.names) {
            tracing::warn!(error = %e, "FQDN names of old rules not all removed; they go at the next switch");
        }
        Ok(next_generation)
    }

    /// Whether `rules` could be switched to now (encoding and capacity),
    /// without writing anything.
    pub fn check_rules(&self, rules: &RuleSet) -> Result<(), DatapathError> {
        let next_half = (self.state.generation.wrapping_add(1) & 1) as usize;
        let encoded = encode(rules, next_half as u32)?;
        self.check_capacity(&encoded, 1 - next_half)
    }

    fn check_capacity(&self, encoded: &Encoded, live_half: usize) -> Result<(), DatapathError> {
        let live = &self.halves[live_half];
        let checks = [
            (
                map_names::ENDPOINTS,
                self.endpoints.map(),
                encoded.endpoints.len(),
                live.endpoints.len(),
            ),
            (
                map_names::RULES_V4,
                self.rules_v4.map(),
                encoded.v4.len(),
                live.v4.len(),
            ),
            (
                map_names::RULES_V6,
                self.rules_v6.map(),
                encoded.v6.len(),
                live.v6.len(),
            ),
            (
                map_names::FQDN_RULES,
                self.fqdn_rules.map(),
                encoded.fqdn.len(),
                live.fqdn.len(),
            ),
            (
                map_names::FQDN_NAMES,
                self.fqdn_names_map.map(),
                encoded.names.len(),
                self.fqdn_names.len(),
            ),
        ];
        for (map, data, needed, live) in checks {
            let capacity = data.info().map_err(map_err(map))?.max_entries();
            if needed + live > capacity as usize {
                return Err(RuleSetError::Capacity {
                    map,
                    needed,
                    live,
                    capacity,
                }
                .into());
            }
        }
        Ok(())
    }

    fn write_half(&mut self, encoded: &Encoded, half: usize) -> Result<(), DatapathError> {
        // Rules before endpoints: an endpoint never points at a missing set.
        for (key, list) in &encoded.v4 {
            self.rules_v4
                .insert(key, list, 0)
                .map_err(map_err(map_names::RULES_V4))?;
            self.halves[half].v4.push((key.prefix_len(), key.data()));
        }
        for (key, list) in &encoded.v6 {
            self.rules_v6
                .insert(key, list, 0)
                .map_err(map_err(map_names::RULES_V6))?;
            self.halves[half].v6.push((key.prefix_len(), key.data()));
        }
        for (key, list) in &encoded.fqdn {
            self.fqdn_rules
                .insert(key, list, 0)
                .map_err(map_err(map_names::FQDN_RULES))?;
            self.halves[half].fqdn.push(*key);
        }
        for (key, value) in &encoded.endpoints {
            self.endpoints
                .insert(key, value, 0)
                .map_err(map_err(map_names::ENDPOINTS))?;
            self.halves[half].endpoints.push(*key);
        }
        Ok(())
    }

    /// Makes `TG_FQDN_NAMES` hold `target`, writing only what differs.
    fn write_names(&mut self, target: FqdnNames) -> Result<(), DatapathError> {
        for (key, ids) in &target {
            if self.fqdn_names.get(key) != Some(ids) {
                self.fqdn_names_map
                    .insert(key, ids, 0)
                    .map_err(map_err(map_names::FQDN_NAMES))?;
                self.fqdn_names.insert(*key, *ids);
            }
        }
        let gone: Vec<FqdnName> = self
            .fqdn_names
            .keys()
            .filter(|key| !target.contains_key(key))
            .copied()
            .collect();
        for key in gone {
            match self.fqdn_names_map.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::FQDN_NAMES)(e)),
            }
            self.fqdn_names.remove(&key);
        }
        Ok(())
    }

    /// FQDN pattern ids as the pinned maps hold them: a restarted agent
    /// keeps them, so addresses learned before it started stay tied to
    /// the same patterns.
    pub fn fqdn_pattern_ids(&self) -> BTreeMap<FqdnPattern, u32> {
        decode_names(&self.fqdn_names)
    }

    /// Deletes the entries of a half. Keys are forgotten only once deleted,
    /// so after an error the rest is still known and deleted next time.
    fn clear_half(&mut self, half: usize) -> Result<(), DatapathError> {
        let Self {
            endpoints,
            rules_v4,
            rules_v6,
            fqdn_rules,
            halves,
            ..
        } = self;
        let contents = &mut halves[half];
        // Endpoints first: nothing points at a set while its rules go.
        delete_each(
            &mut contents.endpoints,
            |key| endpoints.remove(key),
            map_names::ENDPOINTS,
        )?;
        delete_each(
            &mut contents.v4,
            |(len, data)| rules_v4.remove(&Key::new(*len, *data)),
            map_names::RULES_V4,
        )?;
        delete_each(
            &mut contents.v6,
            |(len, data)| rules_v6.remove(&Key::new(*len, *data)),
            map_names::RULES_V6,
        )?;
        delete_each(
            &mut contents.fqdn,
            |key| fqdn_rules.remove(key),
            map_names::FQDN_RULES,
        )
    }

    /// Reads back which keys each half holds (after adopting pinned maps).
    pub(super) fn scan_halves(&self) -> Result<[HalfContents; 2], DatapathError> {
        let mut halves: [HalfContents; 2] = Default::default();
        for key in self.endpoints.keys() {
            let key = key.map_err(map_err(map_names::ENDPOINTS))?;
            halves[(key.half & 1) as usize].endpoints.push(key);
        }
        for key in self.rules_v4.keys() {
            let key = key.map_err(map_err(map_names::RULES_V4))?;
            let data = key.data();
            halves[half_of_set(data.set_id_be)]
                .v4
                .push((key.prefix_len(), data));
        }
        for key in self.rules_v6.keys() {
            let key = key.map_err(map_err(map_names::RULES_V6))?;
            let data = key.data();
            halves[half_of_set(data.set_id_be)]
                .v6
                .push((key.prefix_len(), data));
        }
        for key in self.fqdn_rules.keys() {
            let key = key.map_err(map_err(map_names::FQDN_RULES))?;
            halves[(key.set_id >> 31) as usize].fqdn.push(key);
        }
        Ok(halves)
    }

    /// Reads back the names map (after adopting pinned maps).
    pub(super) fn scan_names(&self) -> Result<FqdnNames, DatapathError> {
        let mut names = FqdnNames::new();
        for entry in self.fqdn_names_map.iter() {
            let (key, ids) = entry.map_err(map_err(map_names::FQDN_NAMES))?;
            names.insert(key, ids);
        }
        Ok(names)
    }
}

/// Deletes every key in `keys` (a missing one counts as deleted), dropping
/// each from `keys` once it is gone; stops at the first error.
fn delete_each<K>(
    keys: &mut Vec<K>,
    mut delete: impl FnMut(&K) -> Result<(), aya::maps::MapError>,
    map: &'static str,
) -> Result<(), DatapathError> {
    let mut deleted = 0;
    let mut result = Ok(());
    for key in keys.iter() {
        match delete(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => deleted += 1,
            Err(e) => {
                result = Err(map_err(map)(e));
                break;
            }
        }
    }
    keys.drain(..deleted);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(ports: PortRange, action: Action, rule_id: u32) -> PortRuleSpec {
        PortRuleSpec {
            ports,
            protocol: Protocol::Tcp,
            action,
            mode: PolicyMode::Inherit,
            rule_id,
            order: rule_id,
        }
    }

    fn one_set(v4: Vec<(Ipv4Net, Vec<PortRuleSpec>)>) -> RuleSet {
        RuleSet {
            sets: vec![SetRules {
                default_action: Action::Deny,
                default_mode: PolicyMode::Enforce,
                v4,
                v6: vec![],
                fqdn: vec![],
            }],
            endpoints: BTreeMap::from([(42, 0)]),
            fqdn_patterns: BTreeMap::new(),
        }
    }

    #[test]
    fn encodes_keys_with_set_id_and_half() {
        let net: Ipv4Net = "10.1.0.0/16".parse().unwrap();
        let encoded = encode(
            &one_set(vec![(
                net,
                vec![rule(PortRange::single(443), Action::Allow, 7)],
            )]),
            1,
        )
        .unwrap();
        let (key, list) = encoded.v4[0];
        assert_eq!(key.prefix_len(), 48);
        assert_eq!(key.data().addr, [10, 1, 0, 0]);
        assert_eq!(u32::from_be(key.data().set_id_be), SET_ID_HALF_BIT);
        assert_eq!(list.len, 1);
        assert_eq!(
            (
                list.rules[0].port_lo,
                list.rules[0].port_hi,
                list.rules[0].rule_id
            ),
            (443, 443, 7)
        );
        assert_eq!(list.rules[0].protocol, protocol::TCP);
        let (ekey, evalue) = encoded.endpoints[0];
        assert_eq!((ekey.cgroup_id, ekey.half), (42, 1));
        assert_eq!(evalue.set_id, SET_ID_HALF_BIT);
        assert_eq!(evalue.default_action, action::DENY);
    }

    #[test]
    fn names_are_keys_in_wire_form_and_read_back() {
        let key = wire_name("api.example.com").unwrap();
        assert_eq!(&key.wire[..17], b"\x03api\x07example\x03com\x00");
        assert!(key.wire[17..].iter().all(|b| *b == 0));
        assert!(wire_name("a..b").is_none());
        assert!(wire_name(&"a".repeat(64)).is_none());
        assert!(
            wire_name(&vec!["a".repeat(63); 4].join(".")).is_none(),
            "over 255 bytes"
        );

        let patterns: BTreeMap<u32, FqdnPattern> = [
            (1, FqdnPattern::Exact("example.com".into())),
            (2, FqdnPattern::OneLabel("example.com".into())),
            (3, FqdnPattern::AnyLabels("azurecr.io".into())),
        ]
        .into();
        let names = encode_names(&patterns).unwrap();
        assert_eq!(names.len(), 2, "one key per name");
        let ids = names[&wire_name("example.com").unwrap()];
        assert_eq!((ids.exact, ids.one_label, ids.any_labels), (1, 2, 0));
        let back: BTreeMap<u32, FqdnPattern> = decode_names(&names)
            .into_iter()
            .map(|(p, id)| (id, p))
            .collect();
        assert_eq!(back, patterns);
    }

    #[test]
    fn host_bits_of_a_prefix_are_dropped() {
        let net: Ipv4Net = "10.1.2.3/16".parse().unwrap();
        let encoded = encode(
            &one_set(vec![(net, vec![rule(PortRange::ANY, Action::Deny, 1)])]),
            0,
        )
        .unwrap();
        assert_eq!(encoded.v4[0].0.data().addr, [10, 1, 0, 0]);
    }

    #[test]
    fn rejects_what_the_kernel_cannot_hold() {
        let net: Ipv4Net = "10.0.0.0/8".parse().unwrap();
        let too_many = (1..=17)
            .map(|id| rule(PortRange::single(id as u16), Action::Allow, id))
            .collect();
        assert!(matches!(
            encode(&one_set(vec![(net, too_many)]), 0),
            Err(RuleSetError::TooManyPortRules { len: 17, .. })
        ));
        let reversed = vec![rule(
            PortRange {
                first: 90,
                last: 80,
            },
            Action::Allow,
            1,
        )];
        assert!(matches!(
            encode(&one_set(vec![(net, reversed)]), 0),
            Err(RuleSetError::ReversedPortRange { .. })
        ));
        let zero = vec![rule(PortRange::ANY, Action::Allow, 0)];
        assert!(matches!(
            encode(&one_set(vec![(net, zero)]), 0),
            Err(RuleSetError::ReservedRuleId { .. })
        ));
        let mut dangling = one_set(vec![]);
        dangling.endpoints.insert(7, 3);
        assert!(matches!(
            encode(&dangling, 0),
            Err(RuleSetError::UnknownSet {
                cgroup_id: 7,
                set: 3,
                ..
            })
        ));
    }
}
