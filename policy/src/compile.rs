//! The compiler: policies and the endpoints they select in, datapath rule
//! sets out, with exactly the answers of the reference evaluator
//! (`evaluate.rs`; a property test holds the two together).
//!
//! The kernel makes one longest-prefix lookup and takes the first matching
//! port rule of the list stored there. So the list at a prefix must hold every
//! rule that matches the addresses for which that prefix is the longest match,
//! in precedence order. Let the boundaries be every `cidr` and `except` prefix
//! of the set's rules. For an address whose longest matching boundary is B,
//! "the address is in prefix P" is the same as "B is inside P" for every
//! boundary P (two prefixes that share an address are nested, and B is the
//! longest). So whether a peer covers the address is decided by B alone, and
//! the list at B is: the rules with a peer whose cidr contains B and none of
//! whose excepts contains B. Addresses under no boundary get the default.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tollgate_common::MAX_PORT_RULES;

use super::model::{Action, FqdnPattern, Peer, Policy, PolicyKey, PolicyMode, PortSpec, Rule};
use crate::{
    compiled::{PortRuleSpec, RuleSet, SetRules},
    serialize,
};

/// One policy's rules with the ids a compilation gave them. Later
/// compilations share it (and so do the names of their generations) for as
/// long as the policy's rules are the same allocation: an unchanged policy
/// costs no work per rule.
#[derive(Debug, PartialEq, Eq)]
pub struct PolicyRuleIds {
    pub key: PolicyKey,
    pub rules: Arc<[Rule]>,
    /// The id of each rule, by position.
    pub ids: Vec<u32>,
    /// The id its default decisions are counted under.
    pub default: u32,
    /// The FQDN patterns its rules name, each once.
    fqdn_patterns: Vec<FqdnPattern>,
}

impl PolicyRuleIds {
    /// Each rule's name with its id, in rule order.
    pub fn named_ids(&self) -> impl Iterator<Item = (&Arc<str>, u32)> {
        self.rules
            .iter()
            .map(|rule| &rule.name)
            .zip(self.ids.iter().copied())
    }

    /// Every id it uses: its rules' and its default's.
    fn all_ids(&self) -> impl Iterator<Item = u32> + '_ {
        std::iter::once(self.default).chain(self.ids.iter().copied())
    }

    /// Its ids in the form they are saved in: by rule key.
    fn by_key(&self) -> PolicyIds {
        PolicyIds {
            default: self.default,
            rules: rule_keys(&self.rules)
                .map(Cow::into_owned)
                .zip(self.ids.iter().copied())
                .collect(),
        }
    }
}

/// How flow records name what decided: each policy's rules with their
/// ids, and for each set the policies that own its default decision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    /// In the order of the policies compiled; a policy whose rules did not
    /// change since the compilation before has the very same `Arc`.
    pub policies: Vec<Arc<PolicyRuleIds>>,
    pub set_defaults: Vec<Vec<PolicyKey>>,
}

impl Names {
    /// The policy and name of the rule with id `id`. A walk of every rule:
    /// for tests and tools, not for each record.
    pub fn rule(&self, id: u32) -> Option<(&PolicyKey, &str)> {
        self.policies.iter().find_map(|policy| {
            policy
                .named_ids()
                .find(|&(_, rule_id)| rule_id == id)
                .map(|(name, _)| (&policy.key, &**name))
        })
    }
}

#[derive(Clone, Debug)]
pub struct Compiled {
    pub rules: RuleSet,
    pub names: Names,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error(
        "{count} port rules apply to {prefix} for endpoints selected by {policies}; the datapath holds at most \
         {MAX_PORT_RULES} per prefix (merge rules, or use fewer port entries)"
    )]
    TooManyPortRules {
        prefix: IpNet,
        count: usize,
        policies: String,
    },
    #[error(
        "{count} port rules apply to names matching {pattern} for endpoints selected by {policies}; the datapath \
         holds at most {MAX_PORT_RULES} per name (merge rules, or use fewer port entries)"
    )]
    TooManyFqdnPortRules {
        pattern: String,
        count: usize,
        policies: String,
    },
    #[error(
        "every {0} id has been handed out; `tollgate-agent cleanup` (which removes the pins and what the kernel \
         learned) starts them over"
    )]
    IdsExhausted(&'static str),
}

/// Compiles `policies` for `endpoints` (cgroup id -> indexes into
/// `policies` of the policies that select it) from scratch.
#[cfg(test)]
pub fn compile(
    policies: &[Policy],
    endpoints: &BTreeMap<u64, Vec<usize>>,
) -> Result<Compiled, CompileError> {
    Compiler::default().compile(policies, endpoints)
}

/// Compiles again and again, doing only the work a change needs: rule ids
/// stay the same for a (policy, rule name) as long as the policy has the
/// rule (the kernel counts each rule's hits by its id); a policy whose rules
/// are the same allocation as at the compilation before keeps its ids
/// without a look at its rules; and the set of every combination of
/// policies whose contents did not change is reused as it was.
#[derive(Clone, Debug, Default)]
pub struct Compiler {
    /// Rule ids of each policy of the last compilation (or adopted).
    policies: HashMap<PolicyKey, PolicyEntry>,
    next_rule_id: u32,
    /// FQDN pattern ids: kept while a policy uses the pattern, because the
    /// kernel's learned addresses refer to them.
    fqdn_ids: BTreeMap<FqdnPattern, u32>,
    /// The highest FQDN pattern id handed out or found in the kernel. Ids
    /// are never handed out twice: addresses learned for a pattern that
    /// left the policies stay until their TTL, and must not count for the
    /// pattern that would get its id.
    last_fqdn_id: u32,
    /// Member policies (in key order) -> compiled set.
    sets: HashMap<SetKey, CompiledSet>,
    last_stats: CompileStats,
}

/// What the compiler knows of a policy's rule ids.
#[derive(Clone, Debug)]
enum PolicyEntry {
    /// Saved by an earlier agent; not compiled by this one yet.
    Adopted(PolicyIds),
    Compiled(Arc<PolicyRuleIds>),
}

impl PolicyEntry {
    fn all_ids(&self) -> Box<dyn Iterator<Item = u32> + '_> {
        match self {
            Self::Adopted(ids) => {
                Box::new(std::iter::once(ids.default).chain(ids.rules.values().copied()))
            }
            Self::Compiled(ids) => Box::new(ids.all_ids()),
        }
    }

    fn default_id(&self) -> u32 {
        match self {
            Self::Adopted(ids) => ids.default,
            Self::Compiled(ids) => ids.default,
        }
    }

    /// Rule ids by rule key.
    fn by_key(&self) -> HashMap<Cow<'_, str>, u32> {
        match self {
            Self::Adopted(ids) => ids
                .rules
                .iter()
                .map(|(key, &id)| (Cow::Borrowed(key.as_str()), id))
                .collect(),
            Self::Compiled(ids) => rule_keys(&ids.rules).zip(ids.ids.iter().copied()).collect(),
        }
    }

    /// The compiled ids, if they are for exactly `rules`.
    fn for_rules(&self, rules: &Arc<[Rule]>) -> Option<&Arc<PolicyRuleIds>> {
        match self {
            Self::Compiled(ids) if Arc::ptr_eq(&ids.rules, rules) => Some(ids),
            _ => None,
        }
    }

    fn is_same(&self, other: &Self) -> bool {
        matches!((self, other), (Self::Compiled(a), Self::Compiled(b)) if Arc::ptr_eq(a, b))
    }
}

/// The rule ids of one policy as saved: each rule's, by its name, and its
/// default's (the slot its default decisions are counted in).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyIds {
    pub default: u32,
    /// Rule name (with `#<n>` after the first rule of a name, for
    /// policies whose rules share one) -> id.
    pub rules: BTreeMap<String, u32>,
}

/// The keys rules are given ids by: the name, made unique within the
/// policy (validation makes names unique; policies built in code may not).
fn rule_keys(rules: &[Rule]) -> impl Iterator<Item = Cow<'_, str>> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    rules.iter().map(move |rule| {
        let n = seen.entry(&rule.name).or_insert(0);
        *n += 1;
        if *n == 1 {
            Cow::Borrowed(&*rule.name)
        } else {
            Cow::Owned(format!("{}#{}", rule.name, n))
        }
    })
}

/// Every rule id in use, with the highest handed out: what the agent
/// saves so that a restarted agent keeps counting each rule in its slot.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RuleIdTable {
    pub next: u32,
    pub policies: Vec<(PolicyKeyOwned, PolicyIds)>,
}

/// A policy key as saved.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyKeyOwned {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
}

/// A compiler's rule ids as they were at one moment.
#[derive(Clone, Debug)]
pub struct RuleIdSnapshot {
    next: u32,
    policies: Vec<(PolicyKey, PolicyEntry)>,
}

/// Written as the [`RuleIdTable`] it stands for ([`RuleIdSnapshot::table`]
/// reads back from it), policy by policy and rule by rule as it goes out:
/// the table of 100k rules is 100k small allocations, which the agent's
/// writer of `rules.json` would otherwise make beside its long-lived state.
impl serde::Serialize for RuleIdSnapshot {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut policies: Vec<&(PolicyKey, PolicyEntry)> = self.policies.iter().collect();
        policies.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
        let policies = policies.into_iter().map(|(key, entry)| {
            let key = SavedKey {
                namespace: key.namespace.as_deref(),
                name: &key.name,
            };
            (key, SavedEntry(entry))
        });
        let mut table = serializer.serialize_struct("RuleIdTable", 2)?;
        table.serialize_field("next", &self.next)?;
        table.serialize_field("policies", &serialize::Seq::new(policies))?;
        table.end()
    }
}

/// A [`PolicyKeyOwned`] as written, borrowed.
#[derive(serde::Serialize)]
struct SavedKey<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
    name: &'a str,
}

/// A [`PolicyIds`] as written, from what the compiler holds.
struct SavedEntry<'a>(&'a PolicyEntry);

impl serde::Serialize for SavedEntry<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        match self.0 {
            PolicyEntry::Adopted(ids) => ids.serialize(serializer),
            PolicyEntry::Compiled(ids) => {
                let rules = rule_keys(&ids.rules).zip(ids.ids.iter().copied());
                let mut entry = serializer.serialize_struct("PolicyIds", 2)?;
                entry.serialize_field("default", &ids.default)?;
                entry.serialize_field("rules", &serialize::Map::new(rules))?;
                entry.end()
            }
        }
    }
}

impl RuleIdSnapshot {
    /// The rule ids to save.
    pub fn table(&self) -> RuleIdTable {
        let mut policies: Vec<_> = self
            .policies
            .iter()
            .map(|(key, entry)| {
                let ids = match entry {
                    PolicyEntry::Adopted(ids) => ids.clone(),
                    PolicyEntry::Compiled(ids) => ids.by_key(),
                };
                let key = PolicyKeyOwned {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                };
                (key, ids)
            })
            .collect();
        policies.sort_by(|a, b| (&a.0.namespace, &a.0.name).cmp(&(&b.0.namespace, &b.0.name)));
        RuleIdTable {
            next: self.next,
            policies,
        }
    }
}

/// The rule and default ids one compilation put in force that the one
/// before did not (`came`), and those it took out (`left`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleIdChanges {
    pub came: BTreeSet<u32>,
    pub left: BTreeSet<u32>,
}

/// The member policies of a set, as the cache of compiled sets knows them:
/// each one's key, mode and default, and its rules by identity (the `Arc`
/// the store, the plans and the enforcer share). Comparing and hashing the
/// rules' contents cost more than compiling a small set; a policy whose
/// rules are equal but not the same allocation (validated again) only
/// compiles its sets once more. The key holds the rules, so their address
/// is not reused while the key is in the cache.
#[derive(Clone, Debug)]
struct SetKey(Vec<Policy>);

impl PartialEq for SetKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self.0.iter().zip(&other.0).all(|(a, b)| {
                a.key == b.key
                    && a.mode == b.mode
                    && a.default_action == b.default_action
                    && Arc::ptr_eq(&a.rules, &b.rules)
            })
    }
}

impl Eq for SetKey {}

impl std::hash::Hash for SetKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for policy in &self.0 {
            policy.key.hash(state);
            policy.mode.hash(state);
            policy.default_action.hash(state);
            Arc::as_ptr(&policy.rules).cast::<Rule>().hash(state);
        }
    }
}

#[derive(Clone, Debug)]
struct CompiledSet {
    rules: Arc<SetRules>,
    defaults: Vec<PolicyKey>,
}

/// Rule ids for one compilation: each policy's, by index; and the counter
/// and FQDN pattern ids to keep after it.
struct RuleIds {
    policies: Vec<Arc<PolicyRuleIds>>,
    next: u32,
    /// Every pattern the policies use.
    fqdn: BTreeMap<FqdnPattern, u32>,
    last_fqdn: u32,
}

/// What the last compilation did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompileStats {
    pub sets_compiled: usize,
    pub sets_reused: usize,
    /// Policies whose rules were numbered (new or changed rules); the
    /// others kept their ids as they were.
    pub policies_numbered: usize,
}

impl Compiler {
    pub fn last_stats(&self) -> CompileStats {
        self.last_stats
    }

    /// The rule ids of a policy of the last compilation.
    pub fn policy_ids(&self, key: &PolicyKey) -> Option<&Arc<PolicyRuleIds>> {
        match self.policies.get(key)? {
            PolicyEntry::Compiled(ids) => Some(ids),
            PolicyEntry::Adopted(_) => None,
        }
    }

    /// The ids this compiler's last compilation put in force and took out,
    /// against `before`'s: only policies whose ids are not shared with
    /// `before` are looked at (ids are unique across policies, and an
    /// unchanged policy keeps exactly its own).
    pub fn rule_id_changes(&self, before: &Compiler) -> RuleIdChanges {
        let mut now = BTreeSet::new();
        let mut then = BTreeSet::new();
        for (key, entry) in &self.policies {
            match before.policies.get(key) {
                Some(old) if old.is_same(entry) => continue,
                Some(old) => then.extend(old.all_ids()),
                None => {}
            }
            now.extend(entry.all_ids());
        }
        for (key, old) in &before.policies {
            if !self.policies.contains_key(key) {
                then.extend(old.all_ids());
            }
        }
        RuleIdChanges {
            came: now.difference(&then).copied().collect(),
            left: then.difference(&now).copied().collect(),
        }
    }

    /// The rule ids to save, cheap to take (each policy's ids are shared):
    /// [`RuleIdSnapshot::table`] makes the table, wherever it is written.
    pub fn rule_id_snapshot(&self) -> RuleIdSnapshot {
        RuleIdSnapshot {
            next: self.next_rule_id,
            policies: self
                .policies
                .iter()
                .map(|(key, entry)| (key.clone(), entry.clone()))
                .collect(),
        }
    }

    /// Takes over the rule ids an earlier agent saved, so each kept rule
    /// goes on counting in its slot. Before the first compilation only.
    pub fn adopt_rule_ids(&mut self, table: RuleIdTable) {
        let highest = table
            .policies
            .iter()
            .flat_map(|(_, ids)| std::iter::once(ids.default).chain(ids.rules.values().copied()))
            .max()
            .unwrap_or(0);
        self.next_rule_id = table.next.max(highest);
        self.policies = table
            .policies
            .into_iter()
            .map(|(key, ids)| {
                let key = PolicyKey {
                    namespace: key.namespace,
                    name: key.name,
                };
                (key, PolicyEntry::Adopted(ids))
            })
            .collect();
    }

    /// Takes over FQDN pattern ids already in the kernel (from an earlier
    /// agent), so addresses learned under them keep their meaning; new
    /// patterns get ids above `highest_in_kernel`, the highest id the
    /// kernel's names or learned addresses still refer to.
    pub fn adopt_fqdn_ids(&mut self, ids: BTreeMap<FqdnPattern, u32>, highest_in_kernel: u32) {
        let highest_adopted = ids.values().max().copied().unwrap_or(0);
        self.last_fqdn_id = self
            .last_fqdn_id
            .max(highest_adopted)
            .max(highest_in_kernel);
        self.fqdn_ids = ids;
    }

    /// After `next` (a clone of this compiler) compiled rules that did not
    /// go into force: keeps this compiler's ids, for the rules still in
    /// force, but never hands out again an FQDN pattern id `next` did. The
    /// failed switch may have written them to the kernel's names already.
    pub fn retire_fqdn_ids_of(&mut self, next: &Compiler) {
        self.last_fqdn_id = self.last_fqdn_id.max(next.last_fqdn_id);
    }

    /// Endpoints selected by the same policies share one rule set.
    pub fn compile(
        &mut self,
        policies: &[Policy],
        endpoints: &BTreeMap<u64, Vec<usize>>,
    ) -> Result<Compiled, CompileError> {
        // Nothing of `self` changes unless the whole compilation succeeds:
        // a cached set must never outlive the rule ids built into it.
        let (assigned, policies_numbered) = self.assign_rule_ids(policies)?;
        let mut names = Names {
            policies: assigned.policies.clone(),
            set_defaults: Vec::new(),
        };

        let mut stats = CompileStats {
            policies_numbered,
            ..CompileStats::default()
        };
        let mut used: HashMap<SetKey, CompiledSet> = HashMap::new();
        let mut rules = RuleSet::default();
        let mut set_of: HashMap<Vec<usize>, u32> = HashMap::new();
        for (&cgroup_id, selecting) in endpoints {
            let mut members: Vec<usize> = selecting.clone();
            members.sort_by(|&a, &b| policies[a].key.cmp(&policies[b].key));
            members.dedup();
            if members.is_empty() {
                continue; // no policy selects it: not restricted
            }
            if let Some(&set) = set_of.get(&members) {
                rules.endpoints.insert(cgroup_id, set);
                continue;
            }
            let contents = SetKey(members.iter().map(|&i| policies[i].clone()).collect());
            let compiled = match self
                .sets
                .get(&contents)
                .or_else(|| used.get(&contents))
                .cloned()
            {
                Some(compiled) => {
                    stats.sets_reused += 1;
                    compiled
                }
                None => {
                    stats.sets_compiled += 1;
                    let members_ref: Vec<(&Policy, &PolicyRuleIds)> = members
                        .iter()
                        .map(|&i| (&policies[i], &*assigned.policies[i]))
                        .collect();
                    let (rules, defaults) = compile_set(&members_ref, &assigned.fqdn)?;
                    CompiledSet {
                        rules: Arc::new(rules),
                        defaults,
                    }
                }
            };
            let set = rules.sets.len() as u32;
            rules.sets.push(compiled.rules.clone());
            names.set_defaults.push(compiled.defaults.clone());
            used.insert(contents, compiled);
            set_of.insert(members, set);
            rules.endpoints.insert(cgroup_id, set);
        }
        rules.fqdn_patterns = assigned
            .fqdn
            .iter()
            .map(|(pattern, &id)| (id, pattern.clone()))
            .collect();
        // Only what this compilation used is kept for the next.
        self.sets = used;
        self.policies = assigned
            .policies
            .into_iter()
            .map(|ids| (ids.key.clone(), PolicyEntry::Compiled(ids)))
            .collect();
        self.next_rule_id = assigned.next;
        self.fqdn_ids = assigned.fqdn;
        self.last_fqdn_id = assigned.last_fqdn;
        self.last_stats = stats;
        Ok(Compiled { rules, names })
    }

    /// Each policy's rule ids, and how many policies were numbered anew. A
    /// policy whose rules are the allocation its ids were worked out for
    /// keeps them as they are. Otherwise existing ids are kept (by policy
    /// and rule key), and new ones go after the highest so far, rules
    /// before defaults, in policy key order. Ids stay below the kernel's
    /// hit counter slots (`capacity::RULE_HITS`) while they can: past
    /// them, the lowest id neither in use nor in use before is handed out
    /// (the agent zeroes a slot when its id leaves force, and before it is
    /// handed out again). Nothing changes in `self`; the caller keeps the
    /// new ids only if the compilation succeeds.
    fn assign_rule_ids(&self, policies: &[Policy]) -> Result<(RuleIds, usize), CompileError> {
        let mut by_key: Vec<usize> = (0..policies.len()).collect();
        by_key.sort_by(|&a, &b| policies[a].key.cmp(&policies[b].key));
        let mut next = self.next_rule_id;
        let mut new_ids = IdAllocator {
            next: &mut next,
            taken: None,
            handed_out: Vec::new(),
            before: &self.policies,
        };
        let mut kept: Vec<Option<Arc<PolicyRuleIds>>> = vec![None; policies.len()];
        // Rule ids by position of the policies numbered anew.
        let mut numbered: Vec<Option<Vec<u32>>> = vec![None; policies.len()];
        for &p in &by_key {
            let policy = &policies[p];
            let known = self.policies.get(&policy.key);
            if let Some(ids) = known.and_then(|k| k.for_rules(&policy.rules)) {
                kept[p] = Some(Arc::clone(ids));
                continue;
            }
            let known = known.map(PolicyEntry::by_key).unwrap_or_default();
            let mut positions = Vec::with_capacity(policy.rules.len());
            for key in rule_keys(&policy.rules) {
                positions.push(match known.get(&key) {
                    Some(&id) => id,
                    None => new_ids.next()?,
                });
            }
            numbered[p] = Some(positions);
        }
        let mut policies_numbered = 0;
        for &p in &by_key {
            let Some(positions) = numbered[p].take() else {
                continue;
            };
            policies_numbered += 1;
            let policy = &policies[p];
            let default = match self.policies.get(&policy.key).map(PolicyEntry::default_id) {
                Some(known) if known != 0 => known,
                _ => new_ids.next()?,
            };
            let fqdn_patterns: BTreeSet<&FqdnPattern> = policy
                .rules
                .iter()
                .flat_map(|r| &r.to)
                .filter_map(|peer| match peer {
                    Peer::Fqdn(pattern) => Some(pattern),
                    Peer::Cidr { .. } => None,
                })
                .collect();
            kept[p] = Some(Arc::new(PolicyRuleIds {
                key: policy.key.clone(),
                rules: Arc::clone(&policy.rules),
                ids: positions,
                default,
                fqdn_patterns: fqdn_patterns.into_iter().cloned().collect(),
            }));
        }
        let policy_ids: Vec<Arc<PolicyRuleIds>> = kept
            .into_iter()
            .map(|ids| ids.expect("every policy kept or numbered"))
            .collect();
        let patterns: BTreeSet<&FqdnPattern> =
            policy_ids.iter().flat_map(|p| &p.fqdn_patterns).collect();
        let mut last_fqdn = self.last_fqdn_id;
        let mut fqdn = BTreeMap::new();
        for pattern in patterns {
            let id = match self.fqdn_ids.get(pattern) {
                Some(&id) => id,
                None => next_id(&mut last_fqdn, "FQDN pattern")?,
            };
            fqdn.insert(pattern.clone(), id);
        }
        let ids = RuleIds {
            policies: policy_ids,
            next,
            fqdn,
            last_fqdn,
        };
        Ok((ids, policies_numbered))
    }
}

/// Hands out rule ids: the next one while it has a hit counter slot, then
/// the lowest one neither in use before this compilation nor handed out
/// in it.
struct IdAllocator<'a> {
    next: &'a mut u32,
    /// Worked out only once ids run past the counter slots.
    taken: Option<BTreeSet<u32>>,
    handed_out: Vec<u32>,
    /// The ids of the compilation before, by policy.
    before: &'a HashMap<PolicyKey, PolicyEntry>,
}

impl IdAllocator<'_> {
    fn next(&mut self) -> Result<u32, CompileError> {
        let id = if *self.next + 1 < tollgate_common::capacity::RULE_HITS {
            next_id(self.next, "rule")?
        } else {
            let (before, handed_out) = (self.before, &self.handed_out);
            let taken = self.taken.get_or_insert_with(|| {
                before
                    .values()
                    .flat_map(PolicyEntry::all_ids)
                    .chain(handed_out.iter().copied())
                    .collect()
            });
            match (1..tollgate_common::capacity::RULE_HITS).find(|id| !taken.contains(id)) {
                Some(id) => id,
                None => loop {
                    // More ids in use than slots: counted as uncounted.
                    let id = next_id(self.next, "rule")?;
                    if !taken.contains(&id) {
                        break id;
                    }
                },
            }
        };
        if let Some(taken) = &mut self.taken {
            taken.insert(id);
        }
        self.handed_out.push(id);
        Ok(id)
    }
}

/// The id after `last`, which becomes it; 0 means none in the datapath, so
/// ids never wrap around to it.
fn next_id(last: &mut u32, what: &'static str) -> Result<u32, CompileError> {
    *last = last
        .checked_add(1)
        .ok_or(CompileError::IdsExhausted(what))?;
    Ok(*last)
}

/// Deny rules with a stronger mode come first, so the reported rule of a
/// destination two denies match is the one that decides whether it blocks.
pub(super) fn mode_rank(mode: PolicyMode) -> u8 {
    match mode {
        PolicyMode::Enforce => 0,
        PolicyMode::Inherit => 1,
        PolicyMode::Observe => 2,
    }
}

/// A rule in precedence order, with what the datapath needs of it.
struct OrderedRule<'a> {
    id: u32,
    rule: &'a Rule,
    mode: PolicyMode,
    /// Its position in that order.
    order: u32,
}

/// `members` are in policy key order.
fn compile_set(
    members: &[(&Policy, &PolicyRuleIds)],
    fqdn_ids: &BTreeMap<FqdnPattern, u32>,
) -> Result<(SetRules, Vec<PolicyKey>), CompileError> {
    let in_order = members.iter().flat_map(|&(policy, ids)| {
        policy
            .rules
            .iter()
            .zip(&ids.ids)
            .map(move |(rule, &id)| OrderedRule {
                id,
                rule,
                mode: policy.mode,
                order: 0,
            })
    });
    let (mut ordered, allows): (Vec<_>, Vec<_>) =
        in_order.partition(|o| o.rule.action == Action::Deny);
    ordered.sort_by_key(|o| mode_rank(o.mode)); // stable: key order within a mode
    ordered.extend(allows);
    for (order, rule) in ordered.iter_mut().enumerate() {
        rule.order = order as u32;
    }

    let policy_names = || {
        members
            .iter()
            .map(|(p, _)| p.key.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let lists =
        prefix_lists(&ordered).map_err(|(prefix, count)| CompileError::TooManyPortRules {
            prefix,
            count,
            policies: policy_names(),
        })?;
    let mut set = SetRules {
        default_action: Action::Allow,
        default_mode: PolicyMode::Inherit,
        default_hits_id: 0,
        v4: vec![],
        v6: vec![],
        fqdn: vec![],
    };
    for (pattern, list) in fqdn_lists(&ordered) {
        if list.len() > MAX_PORT_RULES {
            return Err(CompileError::TooManyFqdnPortRules {
                pattern: pattern.to_string(),
                count: list.len(),
                policies: policy_names(),
            });
        }
        set.fqdn.push((fqdn_ids[pattern], list));
    }
    // Sized exactly: a set of 100k prefixes is kept for as long as it is
    // in force, and doubling would leave up to half of it unused.
    let v4 = lists
        .iter()
        .filter(|(p, _)| matches!(p, IpNet::V4(_)))
        .count();
    set.v4.reserve_exact(v4);
    set.v6.reserve_exact(lists.len() - v4);
    for (prefix, list) in lists {
        match prefix {
            IpNet::V4(net) => set.v4.push((net, list)),
            IpNet::V6(net) => set.v6.push((net, list)),
        }
    }

    let deny_defaults: Vec<&Policy> = members
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| p.default_action == Action::Deny)
        .collect();
    // A default several policies own counts its hits under one of them:
    // the first (in key order) of those whose mode decides.
    set.default_hits_id = if deny_defaults.is_empty() {
        members.first().map_or(0, |(_, ids)| ids.default)
    } else {
        let strongest = deny_defaults
            .iter()
            .map(|p| mode_rank(p.mode))
            .min()
            .expect("not empty");
        members
            .iter()
            .find(|(p, _)| p.default_action == Action::Deny && mode_rank(p.mode) == strongest)
            .map_or(0, |(_, ids)| ids.default)
    };
    let defaults = if deny_defaults.is_empty() {
        members.iter().map(|(p, _)| p.key.clone()).collect()
    } else {
        set.default_action = Action::Deny;
        // Enforced when any of them enforces (under the global mode, for
        // those that inherit it).
        set.default_mode = deny_defaults
            .iter()
            .map(|p| p.mode)
            .min_by_key(|m| mode_rank(*m))
            .expect("not empty");
        deny_defaults.iter().map(|p| p.key.clone()).collect()
    };
    Ok((set, defaults))
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Mark {
    Cidr,
    Except,
}

/// A prefix and the port rules the kernel must find there.
type PrefixList = (IpNet, Vec<PortRuleSpec>);

/// The port rule list of every boundary prefix that needs one; on overflow,
/// the prefix and the number of port rules it would need.
fn prefix_lists(ordered: &[OrderedRule]) -> Result<Vec<PrefixList>, (IpNet, usize)> {
    let whole_v4 = IpNet::V4(Ipv4Net::default());
    let whole_v6 = IpNet::V6(Ipv6Net::default());
    // boundary prefix -> (rule position, peer position, mark)
    let mut marks: HashMap<IpNet, Vec<(usize, usize, Mark)>> = HashMap::new();
    for (position, ordered_rule) in ordered.iter().enumerate() {
        if ordered_rule.rule.to.is_empty() {
            // Any destination: a peer of each whole address family.
            marks
                .entry(whole_v4)
                .or_default()
                .push((position, 0, Mark::Cidr));
            marks
                .entry(whole_v6)
                .or_default()
                .push((position, 1, Mark::Cidr));
        }
        for (peer_position, peer) in ordered_rule.rule.to.iter().enumerate() {
            if let Peer::Cidr { net, except } = peer {
                marks
                    .entry(*net)
                    .or_default()
                    .push((position, peer_position, Mark::Cidr));
                for e in except {
                    marks
                        .entry(*e)
                        .or_default()
                        .push((position, peer_position, Mark::Except));
                }
            }
        }
    }
    let mut boundaries: Vec<IpNet> = marks.keys().copied().collect();
    // Shorter first, so a boundary's ancestors are done before it.
    boundaries.sort_by_key(|b| (b.prefix_len(), *b));
    // An ancestor is a boundary, so only the lengths boundaries of the
    // family have need a look (a few, where every length up to 64 or 128
    // would be looked up otherwise).
    let mut lengths: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    for boundary in &boundaries {
        let family = &mut lengths[usize::from(matches!(boundary, IpNet::V6(_)))];
        if family.last() != Some(&boundary.prefix_len()) {
            family.push(boundary.prefix_len()); // sorted: boundaries are
        }
    }

    let mut lists: HashMap<IpNet, Vec<PortRuleSpec>> = HashMap::new();
    let mut needed = Vec::new();
    for boundary in boundaries {
        let mut covering: HashSet<(usize, usize)> = HashSet::new();
        let mut excepted: HashSet<(usize, usize)> = HashSet::new();
        let mut nearest_ancestor: Option<IpNet> = None;
        let family = &lengths[usize::from(matches!(boundary, IpNet::V6(_)))];
        for &len in family
            .iter()
            .take_while(|&&len| len <= boundary.prefix_len())
        {
            let ancestor = IpNet::new(boundary.addr(), len)
                .expect("len within the family")
                .trunc();
            let Some(found) = marks.get(&ancestor) else {
                continue;
            };
            if len < boundary.prefix_len() {
                nearest_ancestor = Some(ancestor);
            }
            for &(rule, peer, mark) in found {
                match mark {
                    Mark::Cidr => covering.insert((rule, peer)),
                    Mark::Except => excepted.insert((rule, peer)),
                };
            }
        }
        let mut active: Vec<usize> = covering
            .difference(&excepted)
            .map(|&(rule, _)| rule)
            .collect();
        active.sort_unstable();
        active.dedup();
        let list: Vec<PortRuleSpec> = active
            .iter()
            .flat_map(|&position| port_rules(&ordered[position]))
            .collect();
        if list.len() > MAX_PORT_RULES {
            return Err((boundary, list.len()));
        }
        // The kernel would find the ancestor's list anyway: no entry needed.
        let inherited = nearest_ancestor.map_or(&[][..], |a| lists[&a].as_slice());
        if list != inherited {
            needed.push((boundary, list.clone()));
        }
        lists.insert(boundary, list);
    }
    Ok(needed)
}

/// For each FQDN pattern of the set, the port rules of the rules naming it,
/// in order: what applies to an address learned for that pattern.
fn fqdn_lists<'a>(ordered: &[OrderedRule<'a>]) -> BTreeMap<&'a FqdnPattern, Vec<PortRuleSpec>> {
    let mut lists: BTreeMap<&FqdnPattern, Vec<PortRuleSpec>> = BTreeMap::new();
    for ordered_rule in ordered {
        let patterns: std::collections::BTreeSet<&FqdnPattern> = ordered_rule
            .rule
            .to
            .iter()
            .filter_map(|peer| match peer {
                Peer::Fqdn(pattern) => Some(pattern),
                Peer::Cidr { .. } => None,
            })
            .collect();
        for pattern in patterns {
            lists
                .entry(pattern)
                .or_default()
                .extend(port_rules(ordered_rule));
        }
    }
    lists
}

fn port_rules(ordered: &OrderedRule) -> Vec<PortRuleSpec> {
    let specs: &[PortSpec] = if ordered.rule.ports.is_empty() {
        &[PortSpec::ANY]
    } else {
        &ordered.rule.ports
    };
    specs
        .iter()
        .map(|spec| PortRuleSpec {
            ports: spec.ports,
            protocol: spec.protocol,
            action: ordered.rule.action,
            mode: ordered.mode,
            rule_id: ordered.id,
            order: ordered.order,
        })
        .collect()
}

#[cfg(test)]
mod rule_id_tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{Selector, SmallVec, smallvec};

    fn allow(name: &str, net: &str) -> Rule {
        Rule {
            name: name.into(),
            action: Action::Allow,
            to: smallvec![Peer::Cidr {
                net: net.parse().unwrap(),
                except: Box::default(),
            }],
            ports: SmallVec::new(),
        }
    }

    fn policy(name: &str, default_action: Action, mode: PolicyMode, rules: Vec<Rule>) -> Policy {
        Policy {
            key: PolicyKey {
                namespace: None,
                name: name.into(),
            },
            mode,
            default_action,
            selector: Selector::default(),
            rules: Arc::from(rules),
        }
    }

    fn key(name: &str) -> PolicyKey {
        PolicyKey {
            namespace: None,
            name: name.into(),
        }
    }

    fn ids(compiler: &Compiler, name: &str) -> PolicyIds {
        compiler.policy_ids(&key(name)).unwrap().by_key()
    }

    /// Every id in use, as saved.
    fn in_use(compiler: &Compiler) -> BTreeSet<u32> {
        compiler
            .rule_id_snapshot()
            .table()
            .policies
            .iter()
            .flat_map(|(_, ids)| std::iter::once(ids.default).chain(ids.rules.values().copied()))
            .collect()
    }

    #[test]
    fn a_rule_keeps_its_id_by_name_and_defaults_have_ids_of_their_own() {
        let endpoints = BTreeMap::from([(1, vec![0])]);
        let mut compiler = Compiler::default();
        let first = vec![policy(
            "p",
            Action::Deny,
            PolicyMode::Inherit,
            vec![allow("a", "10.1.0.0/16"), allow("b", "10.2.0.0/16")],
        )];
        let compiled = compiler.compile(&first, &endpoints).unwrap();
        let before = ids(&compiler, "p");
        assert_eq!(before.rules["a"], 1);
        assert_eq!(before.rules["b"], 2);
        assert_eq!(before.default, 3, "defaults after the rules");
        assert_eq!(compiled.rules.sets[0].default_hits_id, 3);
        // `a` goes, `b` moves up and is edited, `c` is new: `b` keeps its id.
        let second = vec![policy(
            "p",
            Action::Deny,
            PolicyMode::Inherit,
            vec![allow("b", "10.3.0.0/16"), allow("c", "10.4.0.0/16")],
        )];
        compiler.compile(&second, &endpoints).unwrap();
        let after = ids(&compiler, "p");
        assert_eq!(after.rules["b"], 2);
        assert_eq!(after.default, 3);
        assert_eq!(
            after.rules["c"], 4,
            "a freed id is not handed out again at once"
        );
        assert!(!in_use(&compiler).contains(&1));
        assert_eq!(compiler.policy_ids(&key("p")).unwrap().ids, vec![2, 4]);
    }

    #[test]
    fn a_policy_whose_rules_did_not_change_keeps_its_ids_and_names_without_numbering() {
        let endpoints = BTreeMap::from([(1, vec![0]), (2, vec![1])]);
        let rules = |names: &[&str]| -> Vec<Rule> {
            names
                .iter()
                .enumerate()
                .map(|(i, name)| allow(name, &format!("10.{i}.0.0/16")))
                .collect()
        };
        let first = vec![
            policy("p", Action::Deny, PolicyMode::Inherit, rules(&["a", "b"])),
            policy("q", Action::Deny, PolicyMode::Inherit, rules(&["x", "y"])),
        ];
        let mut compiler = Compiler::default();
        let before = compiler.compile(&first, &endpoints).unwrap();
        assert_eq!(compiler.last_stats().policies_numbered, 2);
        let q_before = ids(&compiler, "q");

        // `p`: the same rules (a new mode does not touch its ids). `q`: `x`
        // goes, `y` stays, `z` is new.
        let mut second = first.clone();
        second[0].mode = PolicyMode::Enforce;
        second[1].rules = Arc::from(rules(&["y", "z"]));
        let previous = compiler.clone();
        let after = compiler.compile(&second, &endpoints).unwrap();
        assert_eq!(
            compiler.last_stats().policies_numbered,
            1,
            "only `q` is numbered"
        );
        assert!(
            Arc::ptr_eq(&before.names.policies[0], &after.names.policies[0]),
            "`p`'s ids and names are shared, not worked out again"
        );
        let q_after = ids(&compiler, "q");
        assert_eq!(q_after.rules["y"], q_before.rules["y"]);
        assert_eq!(q_after.default, q_before.default);
        let z = q_after.rules["z"];
        assert!(!in_use(&previous).contains(&z), "a new name, a new id");
        assert_eq!(
            compiler.rule_id_changes(&previous),
            RuleIdChanges {
                came: BTreeSet::from([z]),
                left: BTreeSet::from([q_before.rules["x"]]),
            }
        );
        assert_eq!(after.names.rule(z), Some((&key("q"), "z")));

        // Equal rules in another allocation (validated again): numbered
        // again, to the same ids.
        let mut third = second.clone();
        third[1].rules = Arc::from(rules(&["y", "z"]));
        let previous = compiler.clone();
        compiler.compile(&third, &endpoints).unwrap();
        assert_eq!(compiler.last_stats().policies_numbered, 1);
        assert_eq!(ids(&compiler, "q"), q_after);
        assert_eq!(
            compiler.rule_id_changes(&previous),
            RuleIdChanges::default()
        );

        // A policy that goes takes all its ids out.
        let previous = compiler.clone();
        compiler
            .compile(&third[..1], &BTreeMap::from([(1, vec![0])]))
            .unwrap();
        let changes = compiler.rule_id_changes(&previous);
        assert!(changes.came.is_empty());
        assert_eq!(
            changes.left,
            BTreeSet::from([q_after.rules["y"], z, q_after.default])
        );
    }

    #[test]
    fn a_restarted_compiler_adopting_the_saved_ids_keeps_them() {
        let endpoints = BTreeMap::from([(1, vec![0, 1])]);
        let policies = vec![
            policy(
                "a",
                Action::Allow,
                PolicyMode::Inherit,
                vec![allow("x", "10.0.0.0/8")],
            ),
            policy(
                "b",
                Action::Deny,
                PolicyMode::Enforce,
                vec![allow("y", "10.0.0.0/8")],
            ),
        ];
        let mut compiler = Compiler::default();
        // Ids the restarted one could not guess: `a` came later.
        compiler
            .compile(&policies[1..], &BTreeMap::from([(1, vec![0])]))
            .unwrap();
        let compiled = compiler.compile(&policies, &endpoints).unwrap();
        let table = compiler.rule_id_snapshot().table();
        let json = serde_json::to_string(&table).unwrap();
        let mut restarted = Compiler::default();
        restarted.adopt_rule_ids(serde_json::from_str(&json).unwrap());
        let again = restarted.compile(&policies, &endpoints).unwrap();
        assert_eq!(again.rules, compiled.rules);
        assert_eq!(ids(&restarted, "a"), ids(&compiler, "a"));
        assert_eq!(
            compiled.rules.sets[0].default_hits_id,
            ids(&compiler, "b").default,
            "the deny default of `b` decides"
        );
    }

    #[test]
    fn past_the_counter_slots_the_lowest_free_id_is_reused() {
        let endpoints = BTreeMap::from([(1, vec![0])]);
        let mut compiler = Compiler::default();
        compiler.adopt_rule_ids(RuleIdTable {
            next: tollgate_common::capacity::RULE_HITS - 1,
            policies: vec![(
                PolicyKeyOwned {
                    namespace: None,
                    name: "old".into(),
                },
                PolicyIds {
                    default: 2,
                    rules: BTreeMap::from([("x".into(), 1)]),
                },
            )],
        });
        let p = vec![policy(
            "p",
            Action::Deny,
            PolicyMode::Inherit,
            vec![allow("a", "10.1.0.0/16")],
        )];
        compiler.compile(&p, &endpoints).unwrap();
        // 1 and 2 were in use before this compilation: not reused yet.
        assert_eq!(ids(&compiler, "p").rules["a"], 3);
        assert_eq!(ids(&compiler, "p").default, 4);
        let q = vec![
            p[0].clone(),
            policy("q", Action::Deny, PolicyMode::Inherit, vec![]),
        ];
        compiler
            .compile(&q, &BTreeMap::from([(1, vec![0, 1])]))
            .unwrap();
        assert_eq!(ids(&compiler, "q").default, 1);
    }
}
