//! Typed rule sets and the generation switch that puts one in force.
//!
//! A [`RuleSet`] is what the policy compiler (tollgate-policy) produces: rule sets (one per
//! distinct combination of policies) with their prefixes and port rules, and
//! the endpoints (cgroups) that use each set. [`Datapath::switch_rules`]
//! writes the sets that are new under fresh set ids, the endpoints into the
//! inactive half of the endpoints map, flips the generation in one write,
//! and deletes the sets only the old generation used; see `decide.rs` in
//! agent-ebpf for why the kernel never mixes two generations. The agent's
//! controller leaves that deletion until the change is answered
//! ([`Datapath::remove_out_of_force`]). A switch whose whole change is one
//! entry of a set in force rewrites that entry where it is instead
//! ([`super::set_delta`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use aya::{
    Pod,
    maps::{IterableMap, LpmTrie, MapData, lpm_trie::Key},
};
use ipnet::IpNet;
use tollgate_common::{
    Config, EndpointKey, EndpointValue, FqdnName, FqdnNameIds, FqdnRuleKey, MAX_PORT_RULES,
    MAX_RULE_ORDER, Mode, PortRule, RuleKeyV4, RuleKeyV6, RuleList, action,
    dns::{NAME_KEY, NAME_MAX},
    endpoint_flags, map_names, policy_mode, protocol,
};

use tollgate_policy::{
    compiled::{PortRuleSpec, RuleSet, SetRules},
    model::{Action, FqdnPattern, PolicyMode, PortRange},
};

use super::{
    Datapath, DatapathError, map_err,
    set_delta::{PrefixWrite, prefix_writes},
};

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

/// What the rule maps hold, as this agent wrote them (or, after a restart,
/// found them).
#[derive(Debug, Default)]
pub(super) struct Written {
    /// Rule entries by set id; every id an endpoint of either half refers
    /// to is here, with or without entries.
    sets: BTreeMap<u32, WrittenSet>,
    /// Set ids of the sets whose entries are complete and known, by
    /// content: a later rule set with the same set reuses them. One
    /// content may have several ids, one per set index that had it (flow
    /// records name a set's default owners by its id).
    by_content: HashMap<Arc<SetRules>, BTreeSet<u32>>,
    /// The same ids by the address of the content's allocation: the
    /// compiler hands an unchanged set over as the very `Arc` it was, and
    /// finding it by address costs nothing per rule, where hashing and
    /// comparing its contents costs a walk of every entry. (`content` of
    /// each set holds the allocation, so its address is not reused while
    /// it is here.)
    by_allocation: HashMap<usize, BTreeSet<u32>>,
    /// What each generation half of `TG_ENDPOINTS` holds, by cgroup id. The
    /// half out of force keeps its entries until the next switch rewrites
    /// it: only what differs is written then.
    endpoints: [BTreeMap<u64, EndpointValue>; 2],
    /// Set ids of the rule set in force, by set index (empty after a
    /// restart until the first switch).
    live: Vec<u32>,
    /// The last set id handed out; the search for a free one goes on after
    /// it, so a freed id comes back only after the others.
    next_set_id: u32,
    /// Entries written and deleted so far, of all the maps here: each
    /// switch logs how many it made, which shows that it writes what
    /// changed only.
    map_writes: u64,
    /// The FQDN names of the rule set in force, while what only the
    /// generation before it used is still to be removed
    /// ([`Datapath::remove_out_of_force`]).
    removal_due: Option<FqdnNames>,
}

#[derive(Debug, Default)]
struct WrittenSet {
    /// Known once all its entries are written.
    content: Option<Arc<SetRules>>,
    v4: Vec<(u32, RuleKeyV4)>,
    v6: Vec<(u32, RuleKeyV6)>,
    fqdn: Vec<FqdnRuleKey>,
}

impl WrittenSet {
    fn counts(&self) -> [usize; 3] {
        [self.v4.len(), self.v6.len(), self.fqdn.len()]
    }
}

impl Written {
    /// Takes in a set rewritten in place: its keys and its content.
    fn rewritten(&mut self, delta: SetDelta) {
        let Some(set) = self.sets.get_mut(&delta.id) else {
            return;
        };
        match &delta.entry {
            PrefixEntry::V4(write) => keep_keys(&mut set.v4, write),
            PrefixEntry::V6(write) => keep_keys(&mut set.v6, write),
        }
        if let Some(old) = set.content.replace(Arc::clone(&delta.content)) {
            self.forget_content(&old, delta.id);
        }
        let by_allocation = self.by_allocation.entry(allocation(&delta.content));
        by_allocation.or_default().insert(delta.id);
        self.by_content
            .entry(delta.content)
            .or_default()
            .insert(delta.id);
    }

    /// A set whose entry may be either version: no content is known, and
    /// the entry's key is kept for deletion.
    fn unknown_content(&mut self, delta: &SetDelta) {
        let Some(set) = self.sets.get_mut(&delta.id) else {
            return;
        };
        fn keep<K: Pod + PartialEq>(keys: &mut Vec<(u32, K)>, key: &Key<K>) {
            let held = (key.prefix_len(), key.data());
            if !keys.contains(&held) {
                keys.push(held);
            }
        }
        match &delta.entry {
            PrefixEntry::V4(write) => keep(&mut set.v4, &write.key),
            PrefixEntry::V6(write) => keep(&mut set.v6, &write.key),
        }
        if let Some(old) = set.content.take() {
            self.forget_content(&old, delta.id);
        }
    }

    /// Drops set `id` from the ids known by `content`.
    fn forget_content(&mut self, content: &Arc<SetRules>, id: u32) {
        if let Some(ids) = self.by_content.get_mut(content) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_content.remove(content);
            }
        }
        if let Some(ids) = self.by_allocation.get_mut(&allocation(content)) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_allocation.remove(&allocation(content));
            }
        }
    }

    /// Sets a decision may read now: those of the rule set in force, and
    /// whatever the endpoints of the half in force point at.
    fn live_set_ids(&self, live_half: usize) -> BTreeSet<u32> {
        let mut ids: BTreeSet<u32> = self.live.iter().copied().collect();
        ids.extend(self.endpoints[live_half].values().map(|v| v.set_id));
        ids
    }

    /// Entries of the endpoints map and of the three rule maps that the
    /// rule set in force uses.
    pub(super) fn live_counts(&self, live_half: usize) -> [usize; 4] {
        let [mut v4, mut v6, mut fqdn] = [0; 3];
        for id in self.live_set_ids(live_half) {
            if let Some(set) = self.sets.get(&id) {
                let [a, b, c] = set.counts();
                (v4, v6, fqdn) = (v4 + a, v6 + b, fqdn + c);
            }
        }
        [self.endpoints[live_half].len(), v4, v6, fqdn]
    }
}

/// Makes a set's keys `(prefix length, data)` what they are after `write`.
fn keep_keys<K: Pod + PartialEq>(keys: &mut Vec<(u32, K)>, write: &PrefixWrite<Key<K>, RuleList>) {
    let held = (write.key.prefix_len(), write.key.data());
    match (&write.old, &write.new) {
        (None, Some(_)) => keys.push(held),
        (Some(_), None) => keys.retain(|key| *key != held),
        _ => {}
    }
}

/// A rule set's switch worked out against what the maps hold; nothing is
/// written yet.
struct SwitchPlan {
    /// Set id of each set index: an unchanged set keeps the id it has.
    ids: Vec<u32>,
    /// The sets to write, under fresh ids.
    new_sets: Vec<NewSet>,
    /// The set in force rewritten where it is, when the switch's whole
    /// change is one of its entries.
    in_place: Option<SetDelta>,
    endpoints: BTreeMap<u64, EndpointValue>,
    /// Not per generation: the names map holds the patterns of every
    /// generation in force or about to be.
    names: FqdnNames,
}

/// A set in kernel form, checked and ready to write.
struct NewSet {
    id: u32,
    content: Arc<SetRules>,
    v4: Vec<(Key<RuleKeyV4>, RuleList)>,
    v6: Vec<(Key<RuleKeyV6>, RuleList)>,
    fqdn: Vec<(FqdnRuleKey, RuleList)>,
}

/// A set in force whose change is one entry, in kernel form: the entry is
/// rewritten where it is ([`super::set_delta`]).
struct SetDelta {
    id: u32,
    content: Arc<SetRules>,
    entry: PrefixEntry,
}

enum PrefixEntry {
    V4(PrefixWrite<Key<RuleKeyV4>, RuleList>),
    V6(PrefixWrite<Key<RuleKeyV6>, RuleList>),
}

impl SetDelta {
    /// Entries it adds to the maps (less those it deletes): [v4, v6].
    fn growth(&self) -> [isize; 2] {
        fn growth<K, V>(write: &PrefixWrite<K, V>) -> isize {
            write.new.is_some() as isize - write.old.is_some() as isize
        }
        match &self.entry {
            PrefixEntry::V4(write) => [growth(write), 0],
            PrefixEntry::V6(write) => [0, growth(write)],
        }
    }
}

/// How a set's lists carry each rule's precedence (`order`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Orders {
    /// As compiled: a set with FQDN lists, which a decision merges with a
    /// prefix's list by order.
    AcrossLists,
    /// The rule's position in its list: a set without FQDN lists, whose
    /// decision reads one list, in which position is precedence. A rule
    /// added or removed before others then changes no entry but those it
    /// is in, where its order as compiled would change every entry after.
    InList,
}

impl Orders {
    fn of(set: &SetRules) -> Self {
        if set.fqdn.is_empty() {
            Self::InList
        } else {
            Self::AcrossLists
        }
    }

    /// Whether two lists of a set encode alike.
    fn same(self, a: &[PortRuleSpec], b: &[PortRuleSpec]) -> bool {
        match self {
            Self::AcrossLists => a == b,
            Self::InList => {
                let without_order =
                    |r: &PortRuleSpec| (r.ports, r.protocol, r.action, r.mode, r.rule_id);
                a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|(a, b)| without_order(a) == without_order(b))
            }
        }
    }
}

fn encode_rules(
    set: u32,
    list: ListName,
    rules: &[PortRuleSpec],
    orders: Orders,
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
    for (position, (slot, rule)) in encoded.rules.iter_mut().zip(rules).enumerate() {
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
            protocol: rule.protocol.number().unwrap_or(protocol::ANY),
            action: encode_action(rule.action),
            mode: encode_mode(rule.mode),
            _pad: 0,
            rule_id: rule.rule_id,
            order: match orders {
                Orders::AcrossLists => rule.order,
                Orders::InList => position as u32,
            },
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

/// The names of two generations together, for while either may decide.
/// A name's pattern ids merge field by field: a pattern keeps its id while
/// it is in use, so where both name a pattern the ids agree, and a pattern
/// only the older has goes on learning until that generation leaves force.
fn union_names(older: &FqdnNames, newer: &FqdnNames) -> FqdnNames {
    let mut both = older.clone();
    for (key, new) in newer {
        let ids = both.entry(*key).or_default();
        let either = |new: u32, old: u32| if new != 0 { new } else { old };
        ids.exact = either(new.exact, ids.exact);
        ids.one_label = either(new.one_label, ids.one_label);
        ids.any_labels = either(new.any_labels, ids.any_labels);
    }
    both
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

/// Works out the switch to `rules`: which sets the maps already hold (same
/// content, same id), which are new and get an id no set in the maps has,
/// and every endpoint's value; or, where the whole change is one entry of
/// one set in force and `live_half` (the endpoints' half in force) is
/// given, that entry's rewrite. Pure, so all of it is checked before a
/// write.
fn plan_switch(
    written: &Written,
    rules: &RuleSet,
    live_half: Option<usize>,
) -> Result<SwitchPlan, RuleSetError> {
    if let Some(live_half) = live_half
        && let Some(plan) = plan_sets(written, rules, Some(live_half))?
    {
        return Ok(plan);
    }
    Ok(plan_sets(written, rules, None)?.expect("a switch without rewrites always has a plan"))
}

/// [`plan_switch`]. With `live_half`, only a switch that writes no set
/// whole, and moves no endpoint, is planned (None otherwise, as soon as
/// that shows and before anything is encoded): at most one set in force
/// rewritten in one entry.
fn plan_sets(
    written: &Written,
    rules: &RuleSet,
    live_half: Option<usize>,
) -> Result<Option<SwitchPlan>, RuleSetError> {
    let names = encode_names(&rules.fqdn_patterns)?;
    let mut ids = Vec::with_capacity(rules.sets.len());
    let mut new_sets: Vec<NewSet> = Vec::new();
    let mut in_place: Option<SetDelta> = None;
    let mut taken: BTreeSet<u32> = BTreeSet::new();
    let in_force = match live_half {
        Some(live_half) => sets_in_force_by_index(written, live_half, rules),
        None => Vec::new(),
    };
    let mut next_id = written.next_set_id;
    for (index, set) in rules.sets.iter().enumerate() {
        let free = |ids: &BTreeSet<u32>| ids.iter().find(|id| !taken.contains(id)).copied();
        let held = written
            .by_allocation
            .get(&allocation(set))
            .and_then(free)
            .or_else(|| written.by_content.get(&**set).and_then(free));
        if let Some(id) = held {
            taken.insert(id);
            ids.push(id);
            continue;
        }
        let rewrite = in_force
            .get(index)
            .copied()
            .flatten()
            // A second set to rewrite makes two entries: planned whole.
            .filter(|id| in_place.is_none() && !taken.contains(id))
            .and_then(|id| {
                let old = written.sets.get(&id)?.content.as_ref()?;
                plan_in_place(index as u32, id, old, set)
            })
            .transpose()?;
        if let Some(delta) = rewrite {
            taken.insert(delta.id);
            ids.push(delta.id);
            in_place = Some(delta);
            continue;
        }
        if live_half.is_some() {
            return Ok(None);
        }
        // Ids only grow within a plan, so none of this plan's repeats.
        let id = loop {
            next_id = next_id.wrapping_add(1);
            if next_id != 0 && !written.sets.contains_key(&next_id) {
                break next_id;
            }
        };
        new_sets.push(encode_set(index as u32, id, set, &rules.fqdn_patterns)?);
        taken.insert(id);
        ids.push(id);
    }
    let mut endpoints = BTreeMap::new();
    for (&cgroup_id, &set) in &rules.endpoints {
        let Some(set_rules) = rules.sets.get(set as usize) else {
            return Err(RuleSetError::UnknownSet {
                cgroup_id,
                set,
                sets: rules.sets.len(),
            });
        };
        let value = EndpointValue {
            set_id: ids[set as usize],
            default_action: encode_action(set_rules.default_action),
            default_mode: encode_mode(set_rules.default_mode),
            flags: if set_rules.fqdn.is_empty() {
                0
            } else {
                endpoint_flags::FQDN_RULES
            },
            _pad: 0,
            default_hits_id: set_rules.default_hits_id,
        };
        endpoints.insert(cgroup_id, value);
    }
    if let Some(live_half) = live_half
        && endpoints != written.endpoints[live_half]
    {
        return Ok(None);
    }
    Ok(Some(SwitchPlan {
        ids,
        new_sets,
        in_place,
        endpoints,
        names,
    }))
}

/// For each set index of `rules`, the set in force (in the endpoints'
/// `live_half`) that its endpoints, and no others, use: the one a change
/// to the index's set may rewrite in place, which moves no endpoint.
fn sets_in_force_by_index(
    written: &Written,
    live_half: usize,
    rules: &RuleSet,
) -> Vec<Option<u32>> {
    let live = &written.endpoints[live_half];
    let mut users: HashMap<u32, usize> = HashMap::new();
    for value in live.values() {
        *users.entry(value.set_id).or_default() += 1;
    }
    // Per index: not seen yet, one set id for this many endpoints, or
    // endpoints that do not share one.
    #[derive(Clone, Copy)]
    enum Seen {
        Nothing,
        One(u32, usize),
        Mixed,
    }
    let mut seen = vec![Seen::Nothing; rules.sets.len()];
    for (cgroup_id, &index) in &rules.endpoints {
        let Some(slot) = seen.get_mut(index as usize) else {
            continue; // plan_switch reports it
        };
        *slot = match (*slot, live.get(cgroup_id).map(|v| v.set_id)) {
            (Seen::Nothing, Some(id)) => Seen::One(id, 1),
            (Seen::One(id, n), Some(held)) if held == id => Seen::One(id, n + 1),
            _ => Seen::Mixed,
        };
    }
    seen.into_iter()
        .map(|slot| match slot {
            Seen::One(id, n) if users.get(&id) == Some(&n) => Some(id),
            _ => None,
        })
        .collect()
}

/// `set` (index `index`) as a rewrite of set `id` in force, which holds
/// `old`, where the two differ in one prefix's entry alone. Defaults and
/// FQDN lists must be equal: a decision reads them beside one prefix's
/// list.
fn plan_in_place(
    index: u32,
    id: u32,
    old: &SetRules,
    set: &Arc<SetRules>,
) -> Option<Result<SetDelta, RuleSetError>> {
    let same_frame = old.default_action == set.default_action
        && old.default_mode == set.default_mode
        && old.default_hits_id == set.default_hits_id
        && old.fqdn == set.fqdn;
    if !same_frame {
        return None;
    }
    let orders = Orders::of(set);
    let same = |a: &Vec<PortRuleSpec>, b: &Vec<PortRuleSpec>| orders.same(a, b);
    let v4 = prefix_writes(&old.v4, &set.v4, same);
    let v6 = prefix_writes(&old.v6, &set.v6, same);
    let set_id_be = id.to_be();
    let lists = |net: IpNet, old: Option<&Vec<PortRuleSpec>>, new: Option<&Vec<PortRuleSpec>>| {
        let encode =
            |list: &Vec<PortRuleSpec>| encode_rules(index, ListName::Prefix(net), list, orders);
        Ok::<_, RuleSetError>((old.map(encode).transpose()?, new.map(encode).transpose()?))
    };
    let entry = match (&v4[..], &v6[..]) {
        ([write], []) => lists(IpNet::V4(write.key), write.old, write.new).map(|(old, new)| {
            let key = v4_key(set_id_be, &write.key);
            PrefixEntry::V4(PrefixWrite { key, old, new })
        }),
        ([], [write]) => lists(IpNet::V6(write.key), write.old, write.new).map(|(old, new)| {
            let key = v6_key(set_id_be, &write.key);
            PrefixEntry::V6(PrefixWrite { key, old, new })
        }),
        _ => return None,
    };
    Some(entry.map(|entry| SetDelta {
        id,
        content: Arc::clone(set),
        entry,
    }))
}

fn v4_key(set_id_be: u32, net: &ipnet::Ipv4Net) -> Key<RuleKeyV4> {
    let data = RuleKeyV4 {
        set_id_be,
        addr: net.network().octets(),
    };
    Key::new(32 + u32::from(net.prefix_len()), data)
}

fn v6_key(set_id_be: u32, net: &ipnet::Ipv6Net) -> Key<RuleKeyV6> {
    let data = RuleKeyV6 {
        set_id_be,
        addr: net.network().octets(),
    };
    Key::new(32 + u32::from(net.prefix_len()), data)
}

/// The address of a set's allocation, as `Written::by_allocation` knows it.
fn allocation(set: &Arc<SetRules>) -> usize {
    Arc::as_ptr(set) as usize
}

/// Set `index` of a rule set in kernel form, under set id `id`.
fn encode_set(
    index: u32,
    id: u32,
    set: &Arc<SetRules>,
    patterns: &BTreeMap<u32, FqdnPattern>,
) -> Result<NewSet, RuleSetError> {
    let set_id_be = id.to_be();
    let orders = Orders::of(set);
    let mut encoded = NewSet {
        id,
        content: Arc::clone(set),
        v4: Vec::with_capacity(set.v4.len()),
        v6: Vec::with_capacity(set.v6.len()),
        fqdn: Vec::with_capacity(set.fqdn.len()),
    };
    for (net, port_rules) in &set.v4 {
        let list = encode_rules(index, ListName::Prefix(IpNet::V4(*net)), port_rules, orders)?;
        encoded.v4.push((v4_key(set_id_be, net), list));
    }
    for (net, port_rules) in &set.v6 {
        let list = encode_rules(index, ListName::Prefix(IpNet::V6(*net)), port_rules, orders)?;
        encoded.v6.push((v6_key(set_id_be, net), list));
    }
    for (pattern_id, port_rules) in &set.fqdn {
        if !patterns.contains_key(pattern_id) {
            return Err(RuleSetError::UnknownFqdnPattern {
                set: index,
                pattern_id: *pattern_id,
            });
        }
        let list = encode_rules(
            index,
            ListName::FqdnPattern(*pattern_id),
            port_rules,
            orders,
        )?;
        let key = FqdnRuleKey {
            set_id: id,
            pattern_id: *pattern_id,
        };
        encoded.fqdn.push((key, list));
    }
    Ok(encoded)
}

impl Datapath {
    /// Puts `rules` in force atomically: connections are decided wholly by
    /// the previous rule set until the switch, wholly by `rules` after it.
    /// On error the previous rule set stays in force, untouched. Then
    /// removes what only the previous rule set used.
    pub fn switch_rules(&mut self, rules: &RuleSet) -> Result<u32, DatapathError> {
        let generation = self.switch_rules_with_mode(rules, self.global_mode())?;
        self.remove_out_of_force();
        Ok(generation)
    }

    /// Puts `rules` in force as [`switch_rules`](Self::switch_rules) does,
    /// switching the global mode in the same write, so no decision
    /// combines the new rules with the old mode or the other way round.
    ///
    /// Only what changed is written: sets the maps hold already keep their
    /// ids and entries, a switch whose whole change is one entry of a set
    /// in force rewrites that entry where it is, before the flip (one write
    /// is one moment for every decision, see [`super::set_delta`]), and of
    /// the endpoints' half out of force only the entries that differ from
    /// the new ones are rewritten. What only the previous rule set used
    /// stays until [`remove_out_of_force`](Self::remove_out_of_force), or
    /// the next switch: no decision reads it once the generation has moved,
    /// and deleting a replaced set entry by entry would hold up the answer
    /// to the change that replaced it.
    pub fn switch_rules_with_mode(
        &mut self,
        rules: &RuleSet,
        mode: Mode,
    ) -> Result<u32, DatapathError> {
        let started = std::time::Instant::now();
        let writes_before = self.written.map_writes;
        let next_generation = self.state.generation.wrapping_add(1);
        let next_half = (next_generation & 1) as usize;
        let live_half = 1 - next_half;
        // A decision reads the mode beside a set: an entry rewritten in
        // place before the flip would meet the old mode.
        let in_place = (mode == self.global_mode()).then_some(live_half);
        let plan = plan_switch(&self.written, rules, in_place)?;
        let sets_written = plan.new_sets.len();
        let sets_rewritten = usize::from(plan.in_place.is_some());
        let planned = started.elapsed();
        self.check_capacity(&plan, live_half)?;

        // Sets neither in force nor wanted: the generation before the one
        // in force, or a switch that failed half way.
        let mut keep = self.written.live_set_ids(live_half);
        keep.extend(&plan.ids);
        self.delete_sets_except(&keep)?;
        // Names of both generations while either may decide.
        self.write_names(union_names(&self.fqdn_names, &plan.names))?;
        // Rules before endpoints: an endpoint never points at a missing set.
        // On error nothing is in force that was not; what was written goes
        // at the next switch. An entry rewritten in place is in force once
        // written, so it goes last before the flip and is taken back if
        // the flip fails.
        self.write_sets(plan.new_sets)?;
        self.write_endpoints(next_half, &plan.endpoints)?;
        if let Some(delta) = &plan.in_place {
            self.write_entry(&delta.entry)?;
        }
        let next = Config {
            generation: next_generation,
            global_mode: mode as u8,
            ..self.state
        };
        if let Err(e) = self.write_config(next) {
            if let Some(delta) = &plan.in_place {
                self.take_back(delta);
            }
            return Err(e);
        }
        if let Some(delta) = plan.in_place {
            self.written.rewritten(delta);
        }
        let flipped_at = started.elapsed();
        // The new rules are in force whatever happens now.
        self.written.live = plan.ids;
        self.written.removal_due = Some(plan.names);
        tracing::debug!(
            generation = next_generation,
            sets_written,
            sets_rewritten,
            map_writes = self.written.map_writes - writes_before,
            plan_us = planned.as_micros() as u64,
            flip_us = (flipped_at - planned).as_micros() as u64,
            "switch: rules written"
        );
        Ok(next_generation)
    }

    /// Deletes what only rule sets out of force used, after a switch: their
    /// sets, the entries of endpoints gone since in the endpoints' half out
    /// of force (the others stay there until the next switch writes what
    /// differs), and the FQDN names no rule in force has. What is not
    /// deleted here goes at the next switch.
    pub fn remove_out_of_force(&mut self) {
        let Some(names) = self.written.removal_due.take() else {
            return;
        };
        let started = std::time::Instant::now();
        let writes_before = self.written.map_writes;
        let live_half = (self.state.generation & 1) as usize;
        let keep: BTreeSet<u32> = self.written.live.iter().copied().collect();
        let live_endpoints = std::mem::take(&mut self.written.endpoints[live_half]);
        let cleared = self
            .delete_sets_except(&keep)
            .and_then(|()| self.delete_endpoints_except(1 - live_half, &live_endpoints));
        self.written.endpoints[live_half] = live_endpoints;
        if let Err(e) = cleared {
            tracing::warn!(error = %e, "old rules not all removed; they are out of force and go at the next switch");
        }
        if let Err(e) = self.write_names(names) {
            tracing::warn!(error = %e, "FQDN names of old rules not all removed; they go at the next switch");
        }
        tracing::debug!(
            map_writes = self.written.map_writes - writes_before,
            elapsed_us = started.elapsed().as_micros() as u64,
            "switch: rules out of force removed"
        );
    }

    /// Whether `rules` could be switched to now (encoding and capacity),
    /// without writing anything.
    pub fn check_rules(&self, rules: &RuleSet) -> Result<(), DatapathError> {
        let live_half = (self.state.generation & 1) as usize;
        let plan = plan_switch(&self.written, rules, Some(live_half))?;
        self.check_capacity(&plan, live_half)
    }

    /// Set ids of the rule set in force, by set index: flow records carry
    /// the set id.
    pub fn set_ids(&self) -> &[u32] {
        &self.written.live
    }

    fn check_capacity(&self, plan: &SwitchPlan, live_half: usize) -> Result<(), DatapathError> {
        let mut keep = self.written.live_set_ids(live_half);
        keep.extend(&plan.ids);
        let mut kept = [0; 3];
        for id in &keep {
            if let Some(set) = self.written.sets.get(id) {
                for (count, n) in kept.iter_mut().zip(set.counts()) {
                    *count += n;
                }
            }
        }
        let mut new = [0; 3];
        for set in &plan.new_sets {
            for (count, n) in new
                .iter_mut()
                .zip([set.v4.len(), set.v6.len(), set.fqdn.len()])
            {
                *count += n;
            }
        }
        if let Some(delta) = &plan.in_place {
            for (count, n) in new.iter_mut().zip(delta.growth()) {
                *count = count.saturating_add_signed(n);
            }
        }
        let checks = [
            (
                map_names::ENDPOINTS,
                self.endpoints.map(),
                plan.endpoints.len(),
                self.written.endpoints[live_half].len(),
            ),
            (map_names::RULES_V4, self.rules_v4.map(), new[0], kept[0]),
            (map_names::RULES_V6, self.rules_v6.map(), new[1], kept[1]),
            (
                map_names::FQDN_RULES,
                self.fqdn_rules.map(),
                new[2],
                kept[2],
            ),
            (
                map_names::FQDN_NAMES,
                self.fqdn_names_map.map(),
                plan.names.len(),
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

    /// Writes each set's entries; a set's content is known (and reusable)
    /// only once all of them are in.
    fn write_sets(&mut self, sets: Vec<NewSet>) -> Result<(), DatapathError> {
        for set in sets {
            self.written.map_writes += (set.v4.len() + set.v6.len() + set.fqdn.len()) as u64;
            let written = self.written.sets.entry(set.id).or_default();
            // Kept while the set is: sized exactly, not by doubling.
            written.v4.reserve_exact(set.v4.len());
            written.v6.reserve_exact(set.v6.len());
            written.fqdn.reserve_exact(set.fqdn.len());
            for (key, list) in &set.v4 {
                self.rules_v4
                    .insert(key, list, 0)
                    .map_err(map_err(map_names::RULES_V4))?;
                written.v4.push((key.prefix_len(), key.data()));
            }
            for (key, list) in &set.v6 {
                self.rules_v6
                    .insert(key, list, 0)
                    .map_err(map_err(map_names::RULES_V6))?;
                written.v6.push((key.prefix_len(), key.data()));
            }
            for (key, list) in &set.fqdn {
                self.fqdn_rules
                    .insert(key, list, 0)
                    .map_err(map_err(map_names::FQDN_RULES))?;
                written.fqdn.push(*key);
            }
            written.content = Some(Arc::clone(&set.content));
            let by_allocation = self.written.by_allocation.entry(allocation(&set.content));
            by_allocation.or_default().insert(set.id);
            let ids = self.written.by_content.entry(set.content).or_default();
            ids.insert(set.id);
            self.written.next_set_id = set.id;
        }
        Ok(())
    }

    /// Writes the one entry of a set in force that changed
    /// ([`super::set_delta`]). A write that fails leaves the entry as it
    /// was.
    fn write_entry(&mut self, entry: &PrefixEntry) -> Result<(), DatapathError> {
        match entry {
            PrefixEntry::V4(write) => {
                apply_write(&mut self.rules_v4, write).map_err(map_err(map_names::RULES_V4))?
            }
            PrefixEntry::V6(write) => {
                apply_write(&mut self.rules_v6, write).map_err(map_err(map_names::RULES_V6))?
            }
        }
        self.written.map_writes += 1;
        Ok(())
    }

    /// Writes an entry rewritten in place back as it was, after a switch
    /// that failed. If that fails too, the set's content is no longer
    /// known (so the next switch writes it anew under another id) and the
    /// entry's key is kept for deletion.
    fn take_back(&mut self, delta: &SetDelta) {
        let undo = match &delta.entry {
            PrefixEntry::V4(write) => PrefixEntry::V4(write.undo()),
            PrefixEntry::V6(write) => PrefixEntry::V6(write.undo()),
        };
        if let Err(error) = self.write_entry(&undo) {
            tracing::warn!(set = delta.id, %error, "an entry rewritten in place could not be taken back after the switch failed; the set is written anew at the next switch");
            self.written.unknown_content(delta);
        }
    }

    /// Makes the endpoints' `half` hold `target`, writing only what differs.
    fn write_endpoints(
        &mut self,
        half: usize,
        target: &BTreeMap<u64, EndpointValue>,
    ) -> Result<(), DatapathError> {
        let key = |cgroup_id: u64| EndpointKey {
            cgroup_id,
            half: half as u32,
            _pad: 0,
        };
        // Those not wanted go first: the map has room for two halves of
        // endpoints, not for the old contents of this one besides the new.
        self.delete_endpoints_except(half, target)?;
        let held = &mut self.written.endpoints[half];
        for (&cgroup_id, value) in target {
            if held.get(&cgroup_id) != Some(value) {
                self.endpoints
                    .insert(key(cgroup_id), value, 0)
                    .map_err(map_err(map_names::ENDPOINTS))?;
                held.insert(cgroup_id, *value);
                self.written.map_writes += 1;
            }
        }
        Ok(())
    }

    /// Deletes the entries of `half` for cgroups `target` does not hold.
    fn delete_endpoints_except(
        &mut self,
        half: usize,
        target: &BTreeMap<u64, EndpointValue>,
    ) -> Result<(), DatapathError> {
        let held = &mut self.written.endpoints[half];
        let gone: Vec<u64> = held
            .keys()
            .filter(|id| !target.contains_key(id))
            .copied()
            .collect();
        for cgroup_id in gone {
            let key = EndpointKey {
                cgroup_id,
                half: half as u32,
                _pad: 0,
            };
            match self.endpoints.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::ENDPOINTS)(e)),
            }
            held.remove(&cgroup_id);
            self.written.map_writes += 1;
        }
        Ok(())
    }

    /// Deletes the entries of every set not in `keep`. Keys are forgotten
    /// only once deleted, so after an error the rest is still known and
    /// deleted next time.
    fn delete_sets_except(&mut self, keep: &BTreeSet<u32>) -> Result<(), DatapathError> {
        let Self {
            rules_v4,
            rules_v6,
            fqdn_rules,
            written,
            ..
        } = self;
        let gone: Vec<u32> = written
            .sets
            .keys()
            .filter(|id| !keep.contains(id))
            .copied()
            .collect();
        for id in gone {
            let set = written.sets.get_mut(&id).expect("listed above");
            let content = set.content.take();
            if let Some(content) = content {
                written.forget_content(&content, id);
            }
            let set = written.sets.get_mut(&id).expect("listed above");
            let entries = set.counts().iter().sum::<usize>() as u64;
            delete_each(
                &mut set.v4,
                |(len, data)| rules_v4.remove(&Key::new(*len, *data)),
                map_names::RULES_V4,
            )?;
            delete_each(
                &mut set.v6,
                |(len, data)| rules_v6.remove(&Key::new(*len, *data)),
                map_names::RULES_V6,
            )?;
            delete_each(
                &mut set.fqdn,
                |key| fqdn_rules.remove(key),
                map_names::FQDN_RULES,
            )?;
            written.map_writes += entries;
            written.sets.remove(&id);
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
                self.written.map_writes += 1;
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
            self.written.map_writes += 1;
        }
        Ok(())
    }

    /// FQDN pattern ids as the pinned maps hold them: a restarted agent
    /// keeps them, so addresses learned before it started stay tied to
    /// the same patterns.
    pub fn fqdn_pattern_ids(&self) -> BTreeMap<FqdnPattern, u32> {
        decode_names(&self.fqdn_names)
    }

    /// Reads back what the maps hold (after adopting pinned maps). Set
    /// contents are not known from their entries, so no set is reused
    /// before the first switch has written its own.
    pub(super) fn scan_written(&self) -> Result<Written, DatapathError> {
        let mut written = Written::default();
        for entry in self.endpoints.iter() {
            let (key, value) = entry.map_err(map_err(map_names::ENDPOINTS))?;
            written.endpoints[(key.half & 1) as usize].insert(key.cgroup_id, value);
            written.sets.entry(value.set_id).or_default();
        }
        for key in self.rules_v4.keys() {
            let key = key.map_err(map_err(map_names::RULES_V4))?;
            let data = key.data();
            let set = written.sets.entry(u32::from_be(data.set_id_be));
            set.or_default().v4.push((key.prefix_len(), data));
        }
        for key in self.rules_v6.keys() {
            let key = key.map_err(map_err(map_names::RULES_V6))?;
            let data = key.data();
            let set = written.sets.entry(u32::from_be(data.set_id_be));
            set.or_default().v6.push((key.prefix_len(), data));
        }
        for key in self.fqdn_rules.keys() {
            let key = key.map_err(map_err(map_names::FQDN_RULES))?;
            written.sets.entry(key.set_id).or_default().fqdn.push(key);
        }
        written.next_set_id = written.sets.keys().next_back().copied().unwrap_or(0);
        Ok(written)
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

/// Writes or deletes one entry (deleting a missing entry counts as done).
fn apply_write<K: Pod>(
    map: &mut LpmTrie<MapData, K, RuleList>,
    write: &PrefixWrite<Key<K>, RuleList>,
) -> Result<(), aya::maps::MapError> {
    match &write.new {
        Some(list) => map.insert(&write.key, list, 0),
        None => match map.remove(&write.key) {
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            other => other,
        },
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
    use ipnet::Ipv4Net;
    use tollgate_policy::model::Protocol;

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

    fn set(v4: Vec<(Ipv4Net, Vec<PortRuleSpec>)>) -> Arc<SetRules> {
        Arc::new(SetRules {
            default_action: Action::Deny,
            default_mode: PolicyMode::Enforce,
            default_hits_id: 0,
            v4,
            v6: vec![],
            fqdn: vec![],
        })
    }

    fn one_set(v4: Vec<(Ipv4Net, Vec<PortRuleSpec>)>) -> RuleSet {
        RuleSet {
            sets: vec![set(v4)],
            endpoints: BTreeMap::from([(42, 0)]),
            fqdn_patterns: BTreeMap::new(),
        }
    }

    fn plan(rules: &RuleSet) -> Result<SwitchPlan, RuleSetError> {
        plan_switch(&Written::default(), rules, None)
    }

    #[test]
    fn encodes_keys_with_the_set_id() {
        let net: Ipv4Net = "10.1.0.0/16".parse().unwrap();
        let plan = plan(&one_set(vec![(
            net,
            vec![rule(PortRange::single(443), Action::Allow, 7)],
        )]))
        .unwrap();
        let id = plan.ids[0];
        let (key, list) = plan.new_sets[0].v4[0];
        assert_eq!(key.prefix_len(), 48);
        assert_eq!(key.data().addr, [10, 1, 0, 0]);
        assert_eq!(u32::from_be(key.data().set_id_be), id);
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
        let endpoint = plan.endpoints[&42];
        assert_eq!(endpoint.set_id, id);
        assert_eq!(endpoint.default_action, action::DENY);
    }

    #[test]
    fn a_set_the_maps_hold_keeps_its_id_and_a_new_one_gets_a_free_id() {
        let net = |s: &str| -> Ipv4Net { s.parse().unwrap() };
        let held = set(vec![(
            net("10.1.0.0/16"),
            vec![rule(PortRange::ANY, Action::Allow, 1)],
        )]);
        let new = set(vec![(
            net("10.2.0.0/16"),
            vec![rule(PortRange::ANY, Action::Allow, 2)],
        )]);
        let mut written = Written {
            next_set_id: 4,
            ..Written::default()
        };
        let complete = WrittenSet {
            content: Some(Arc::clone(&held)),
            ..WrittenSet::default()
        };
        written.sets.insert(5, complete);
        written
            .by_content
            .insert(Arc::clone(&held), BTreeSet::from([5]));
        // Found in the maps at start: contents unknown, id taken.
        written.sets.insert(6, WrittenSet::default());

        let rules = RuleSet {
            // Equal contents, another allocation: recognised all the same.
            sets: vec![Arc::new((*held).clone()), Arc::clone(&new), new],
            endpoints: BTreeMap::from([(1, 0), (2, 1), (3, 2)]),
            fqdn_patterns: BTreeMap::new(),
        };
        let plan = plan_switch(&written, &rules, None).unwrap();
        // Equal contents at two indices still get an id each: flow records
        // name each set's default owners by its id.
        assert_eq!(plan.ids, [5, 7, 8], "held set kept; 6 is taken");
        let new: Vec<u32> = plan.new_sets.iter().map(|s| s.id).collect();
        assert_eq!(new, [7, 8], "only sets the maps do not hold are written");
        let ids: Vec<u32> = plan.endpoints.values().map(|v| v.set_id).collect();
        assert_eq!(ids, [5, 7, 8]);
    }

    /// Written as a switch to `set` for endpoints 1 and 2 leaves it: set
    /// id 3 in force in half 0.
    fn written_in_force(set: &Arc<SetRules>) -> Written {
        let mut written = Written {
            next_set_id: 3,
            live: vec![3],
            ..Written::default()
        };
        let value = EndpointValue {
            set_id: 3,
            default_action: encode_action(set.default_action),
            default_mode: encode_mode(set.default_mode),
            ..EndpointValue::default()
        };
        written.endpoints[0] = BTreeMap::from([(1, value), (2, value)]);
        let complete = WrittenSet {
            content: Some(Arc::clone(set)),
            ..WrittenSet::default()
        };
        written.sets.insert(3, complete);
        written
            .by_content
            .insert(Arc::clone(set), BTreeSet::from([3]));
        written
    }

    #[test]
    fn a_set_in_force_changed_in_a_few_prefixes_is_rewritten_where_it_is() {
        let prefixes = |n: u8, extra: Option<&str>| {
            let mut v4: Vec<(Ipv4Net, Vec<PortRuleSpec>)> = (0..n)
                .map(|i| {
                    let net = format!("10.{i}.0.0/16").parse().unwrap();
                    (
                        net,
                        vec![rule(PortRange::ANY, Action::Allow, 1 + u32::from(i))],
                    )
                })
                .collect();
            if let Some(net) = extra {
                v4.push((
                    net.parse().unwrap(),
                    vec![rule(PortRange::ANY, Action::Allow, 99)],
                ));
            }
            set(v4)
        };
        let old = prefixes(8, None);
        let written = written_in_force(&old);
        let rules = |set: Arc<SetRules>, endpoints: &[u64]| RuleSet {
            sets: vec![set],
            endpoints: endpoints.iter().map(|&e| (e, 0)).collect(),
            fqdn_patterns: BTreeMap::new(),
        };

        let one_more = rules(prefixes(8, Some("10.200.1.0/24")), &[1, 2]);
        let plan = plan_switch(&written, &one_more, Some(0)).unwrap();
        assert_eq!(plan.ids, [3], "the set keeps its id");
        assert!(plan.new_sets.is_empty());
        let Some(delta) = &plan.in_place else {
            panic!("one set rewritten")
        };
        let PrefixEntry::V4(write) = &delta.entry else {
            panic!("an IPv4 entry")
        };
        assert_eq!(
            (write.key.prefix_len(), write.key.data().addr),
            (56, [10, 200, 1, 0])
        );
        assert_eq!(u32::from_be(write.key.data().set_id_be), 3);
        assert!(write.old.is_none() && write.new.is_some_and(|l| l.rules[0].rule_id == 99));
        assert_eq!(plan.endpoints[&1].set_id, 3);

        // Written whole under a new id: where the switch may not rewrite in
        // place (a mode change), where an endpoint joins or leaves the
        // set, where its default changes, where two entries change (each
        // rewritten in place would decide before the other).
        let whole = |plan: SwitchPlan| plan.in_place.is_none() && plan.ids != [3];
        assert!(whole(plan_switch(&written, &one_more, None).unwrap()));
        let joined = rules(prefixes(8, Some("10.200.1.0/24")), &[1, 2, 5]);
        assert!(whole(plan_switch(&written, &joined, Some(0)).unwrap()));
        let left = rules(prefixes(8, Some("10.200.1.0/24")), &[1]);
        assert!(whole(plan_switch(&written, &left, Some(0)).unwrap()));
        let mut other_default = (*prefixes(8, Some("10.200.1.0/24"))).clone();
        other_default.default_action = Action::Allow;
        let other_default = rules(Arc::new(other_default), &[1, 2]);
        assert!(whole(
            plan_switch(&written, &other_default, Some(0)).unwrap()
        ));
        let mut moved = (*prefixes(8, None)).clone();
        moved.v4[0].0 = "10.201.0.0/16".parse().unwrap();
        let moved = rules(Arc::new(moved), &[1, 2]);
        assert!(whole(plan_switch(&written, &moved, Some(0)).unwrap()));
        // A rule added before the others moves every rule's order; in a set
        // without FQDN lists a list carries positions, so only the added
        // rule's entry is written.
        let mut first = (*prefixes(8, Some("10.200.1.0/24"))).clone();
        for (_, list) in &mut first.v4 {
            for rule in list {
                rule.order = if rule.rule_id == 99 {
                    0
                } else {
                    rule.order + 1
                };
            }
        }
        let plan =
            plan_switch(&written, &rules(Arc::new(first.clone()), &[1, 2]), Some(0)).unwrap();
        assert!(plan.new_sets.is_empty() && plan.in_place.is_some());
        // With FQDN lists, orders are compared across lists: all written.
        let with_names = |mut set: SetRules| {
            set.fqdn = vec![(1, vec![rule(PortRange::ANY, Action::Allow, 50)])];
            Arc::new(set)
        };
        let mut named = written_in_force(&with_names((*old).clone()));
        named.endpoints[0]
            .values_mut()
            .for_each(|v| v.flags = endpoint_flags::FQDN_RULES);
        let mut ruleset = rules(with_names(first), &[1, 2]);
        ruleset.fqdn_patterns = BTreeMap::from([(1, FqdnPattern::Exact("example.com".into()))]);
        assert!(whole(plan_switch(&named, &ruleset, Some(0)).unwrap()));
        // Unchanged: neither written nor rewritten.
        let same = plan_switch(&written, &rules(Arc::clone(&old), &[1, 2]), Some(0)).unwrap();
        assert!(same.in_place.is_none() && same.new_sets.is_empty() && same.ids == [3]);
    }

    #[test]
    fn taking_in_a_rewrite_moves_the_set_to_its_new_content() {
        let net = |s: &str| -> Ipv4Net { s.parse().unwrap() };
        let any = |id| vec![rule(PortRange::ANY, Action::Allow, id)];
        let old = set((0..8)
            .map(|i| (net(&format!("10.{i}.0.0/16")), any(1)))
            .collect());
        let mut written = written_in_force(&old);
        for (n, _) in &old.v4 {
            written.sets.get_mut(&3).unwrap().v4.push((
                32 + u32::from(n.prefix_len()),
                RuleKeyV4 {
                    set_id_be: 3u32.to_be(),
                    addr: n.network().octets(),
                },
            ));
        }
        let mut v4 = old.v4.clone();
        v4.remove(0);
        let new = set(v4);
        let rules = RuleSet {
            sets: vec![Arc::clone(&new)],
            endpoints: BTreeMap::from([(1, 0), (2, 0)]),
            fqdn_patterns: BTreeMap::new(),
        };
        let mut plan = plan_switch(&written, &rules, Some(0)).unwrap();
        written.rewritten(plan.in_place.take().expect("rewritten in place"));
        let mut held: Vec<[u8; 4]> = written.sets[&3].v4.iter().map(|(_, k)| k.addr).collect();
        held.sort();
        let expected: Vec<[u8; 4]> = (1..8).map(|i| [10, i, 0, 0]).collect();
        assert_eq!(held, expected, "the key deleted is gone");
        assert_eq!(written.by_content.get(&new), Some(&BTreeSet::from([3])));
        assert!(
            !written.by_content.contains_key(&old),
            "the old content is no longer held"
        );
        assert_eq!(
            written.by_allocation.get(&allocation(&new)),
            Some(&BTreeSet::from([3]))
        );
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
    fn while_two_generations_decide_each_keeps_learning_for_its_patterns() {
        let names = |patterns: &[(u32, FqdnPattern)]| {
            encode_names(&patterns.iter().cloned().collect()).unwrap()
        };
        let older = names(&[
            (1, FqdnPattern::Exact("example.com".into())),
            (2, FqdnPattern::OneLabel("example.com".into())),
            (3, FqdnPattern::Exact("gone.test".into())),
        ]);
        let newer = names(&[
            (2, FqdnPattern::OneLabel("example.com".into())),
            (4, FqdnPattern::AnyLabels("example.com".into())),
            (5, FqdnPattern::Exact("new.test".into())),
        ]);
        let both = union_names(&older, &newer);
        let ids = both[&wire_name("example.com").unwrap()];
        assert_eq!(
            (ids.exact, ids.one_label, ids.any_labels),
            (1, 2, 4),
            "the older generation's exact pattern stays beside the newer's"
        );
        assert_eq!(both[&wire_name("gone.test").unwrap()].exact, 3);
        assert_eq!(both[&wire_name("new.test").unwrap()].exact, 5);
        assert_eq!(both.len(), 3);
    }

    #[test]
    fn host_bits_of_a_prefix_are_dropped() {
        let net: Ipv4Net = "10.1.2.3/16".parse().unwrap();
        let plan = plan(&one_set(vec![(
            net,
            vec![rule(PortRange::ANY, Action::Deny, 1)],
        )]))
        .unwrap();
        assert_eq!(plan.new_sets[0].v4[0].0.data().addr, [10, 1, 0, 0]);
    }

    #[test]
    fn rejects_what_the_kernel_cannot_hold() {
        let net: Ipv4Net = "10.0.0.0/8".parse().unwrap();
        let too_many = (1..=17)
            .map(|id| rule(PortRange::single(id as u16), Action::Allow, id))
            .collect();
        assert!(matches!(
            plan(&one_set(vec![(net, too_many)])),
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
            plan(&one_set(vec![(net, reversed)])),
            Err(RuleSetError::ReversedPortRange { .. })
        ));
        let zero = vec![rule(PortRange::ANY, Action::Allow, 0)];
        assert!(matches!(
            plan(&one_set(vec![(net, zero)])),
            Err(RuleSetError::ReservedRuleId { .. })
        ));
        let mut dangling = one_set(vec![]);
        dangling.endpoints.insert(7, 3);
        assert!(matches!(
            plan(&dangling),
            Err(RuleSetError::UnknownSet {
                cgroup_id: 7,
                set: 3,
                ..
            })
        ));
    }
}
