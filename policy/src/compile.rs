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
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tollgate_common::MAX_PORT_RULES;

use super::model::{Action, FqdnPattern, Peer, Policy, PolicyKey, PolicyMode, PortSpec, Rule};
use crate::compiled::{PortRuleSpec, RuleSet, SetRules};

/// What a rule id stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleRef {
    pub policy: PolicyKey,
    pub rule: String,
}

/// How flow records name what decided: rule ids, and for each set the
/// policies that own its default decision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub rules: HashMap<u32, RuleRef>,
    pub set_defaults: Vec<Vec<PolicyKey>>,
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
/// stay the same for a (policy, rule position) as long as the policy exists,
/// and the set of every combination of policies whose contents did not
/// change is reused as it was.
#[derive(Clone, Debug, Default)]
pub struct Compiler {
    /// Rule ids of each policy, by rule position.
    rule_ids: HashMap<PolicyKey, Vec<u32>>,
    next_rule_id: u32,
    /// FQDN pattern ids: kept while a policy uses the pattern, because the
    /// kernel's learned addresses refer to them.
    fqdn_ids: BTreeMap<FqdnPattern, u32>,
    /// The highest FQDN pattern id handed out or found in the kernel. Ids
    /// are never handed out twice: addresses learned for a pattern that
    /// left the policies stay until their TTL, and must not count for the
    /// pattern that would get its id.
    last_fqdn_id: u32,
    /// Member policies (in key order, with their contents) -> compiled set.
    sets: HashMap<Vec<Policy>, CompiledSet>,
    last_stats: CompileStats,
}

#[derive(Clone, Debug)]
struct CompiledSet {
    rules: Arc<SetRules>,
    defaults: Vec<PolicyKey>,
}

/// Rule ids for one compilation: by policy index, then rule position; and
/// the table (without policies that are gone) and counter to keep after it.
#[derive(Default)]
struct RuleIds {
    by_position: Vec<Vec<u32>>,
    table: HashMap<PolicyKey, Vec<u32>>,
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
}

impl Compiler {
    pub fn last_stats(&self) -> CompileStats {
        self.last_stats
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
        let assigned = self.assign_rule_ids(policies)?;
        let rule_ids = &assigned.by_position;
        let mut names = Names::default();
        for (p, policy) in policies.iter().enumerate() {
            for (r, rule) in policy.rules.iter().enumerate() {
                names.rules.insert(
                    rule_ids[p][r],
                    RuleRef {
                        policy: policy.key.clone(),
                        rule: rule.name.clone(),
                    },
                );
            }
        }

        let mut stats = CompileStats::default();
        let mut used: HashMap<Vec<Policy>, CompiledSet> = HashMap::new();
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
            let contents: Vec<Policy> = members.iter().map(|&i| policies[i].clone()).collect();
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
                    let members_ref: Vec<(usize, &Policy)> =
                        members.iter().map(|&i| (i, &policies[i])).collect();
                    let (rules, defaults) = compile_set(&members_ref, rule_ids, &assigned.fqdn)?;
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
        self.rule_ids = assigned.table;
        self.next_rule_id = assigned.next;
        self.fqdn_ids = assigned.fqdn;
        self.last_fqdn_id = assigned.last_fqdn;
        self.last_stats = stats;
        Ok(Compiled { rules, names })
    }

    /// Ids by (index into `policies`, rule position): existing ones kept,
    /// new ones after the highest so far. Nothing changes in `self`; the
    /// caller keeps the new table only if the compilation succeeds.
    fn assign_rule_ids(&self, policies: &[Policy]) -> Result<RuleIds, CompileError> {
        let mut by_key: Vec<usize> = (0..policies.len()).collect();
        by_key.sort_by(|&a, &b| policies[a].key.cmp(&policies[b].key));
        let mut ids = RuleIds {
            by_position: vec![Vec::new(); policies.len()],
            next: self.next_rule_id,
            ..RuleIds::default()
        };
        for p in by_key {
            let key = &policies[p].key;
            let known = self.rule_ids.get(key).map_or(&[][..], Vec::as_slice);
            let policy_ids: Vec<u32> = (0..policies[p].rules.len())
                .map(|r| match known.get(r) {
                    Some(&id) => Ok(id),
                    None => next_id(&mut ids.next, "rule"),
                })
                .collect::<Result<_, _>>()?;
            ids.by_position[p] = policy_ids.clone();
            ids.table.insert(key.clone(), policy_ids);
        }
        let patterns: std::collections::BTreeSet<&FqdnPattern> = policies
            .iter()
            .flat_map(|p| p.rules.iter())
            .flat_map(|r| &r.to)
            .filter_map(|peer| match peer {
                Peer::Fqdn(pattern) => Some(pattern),
                Peer::Cidr { .. } => None,
            })
            .collect();
        ids.last_fqdn = self.last_fqdn_id;
        for pattern in patterns {
            let id = match self.fqdn_ids.get(pattern) {
                Some(&id) => id,
                None => next_id(&mut ids.last_fqdn, "FQDN pattern")?,
            };
            ids.fqdn.insert(pattern.clone(), id);
        }
        Ok(ids)
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
    members: &[(usize, &Policy)],
    rule_ids: &[Vec<u32>],
    fqdn_ids: &BTreeMap<FqdnPattern, u32>,
) -> Result<(SetRules, Vec<PolicyKey>), CompileError> {
    let in_order = members.iter().flat_map(|&(p, policy)| {
        policy
            .rules
            .iter()
            .enumerate()
            .map(move |(r, rule)| OrderedRule {
                id: rule_ids[p][r],
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
            .map(|(_, p)| p.key.to_string())
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
    for (prefix, list) in lists {
        match prefix {
            IpNet::V4(net) => set.v4.push((net, list)),
            IpNet::V6(net) => set.v6.push((net, list)),
        }
    }

    let deny_defaults: Vec<&Policy> = members
        .iter()
        .map(|(_, p)| *p)
        .filter(|p| p.default_action == Action::Deny)
        .collect();
    let defaults = if deny_defaults.is_empty() {
        members.iter().map(|(_, p)| p.key.clone()).collect()
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

    let mut lists: HashMap<IpNet, Vec<PortRuleSpec>> = HashMap::new();
    let mut needed = Vec::new();
    for boundary in boundaries {
        let mut covering: HashSet<(usize, usize)> = HashSet::new();
        let mut excepted: HashSet<(usize, usize)> = HashSet::new();
        let mut nearest_ancestor: Option<IpNet> = None;
        for len in 0..=boundary.prefix_len() {
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
