//! Keeps the datapath in step with the policies and the endpoints they
//! select: loads policy files, resolves selectors, compiles, switches, and
//! remembers for each recent generation how its rules are named.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::Arc,
};

use tollgate_common::Mode;

use tollgate_policy::{
    compile::{CompileError, Compiler, Names},
    model::{Action, FqdnPattern, Peer, Policy, PolicyKey, PolicyMode, Selector},
    select::{Endpoint, Identity, select_endpoints},
};

use crate::{
    cgroups,
    datapath::{Datapath, DatapathError},
    pods::{
        UnknownPodAction,
        directory::{IdentityUpdate, PodDirectory},
        kubelet,
    },
};

/// The policy that unknownPodAction `deny` puts on pods whose metadata is
/// not known yet; its name cannot clash with a user's (`:` is not allowed).
pub const UNKNOWN_POD_POLICY: &str = "tollgate:unknown-pod";

#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// Generations whose names are kept, for events still in flight. Events of
/// the oldest are read (and its open aggregates closed) before a switch
/// forgets it, so two would do; a few more spare those early closes when
/// applies come in bursts.
const NAMED_GENERATIONS: usize = 4;

/// How cgroups become endpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointOptions {
    /// Pod cgroups are identified through the Kubernetes API; without it
    /// every cgroup is a host cgroup, selected by path only.
    pub kubernetes: bool,
    pub unknown_pod_action: UnknownPodAction,
}

pub struct Enforcer {
    /// None until a policy set is put in force: until then the rules in the
    /// datapath (maybe left by an earlier agent) are not touched. Ends with
    /// the unknown-pod policy under unknownPodAction `deny`.
    policies: Option<Vec<Policy>>,
    cgroup_root: PathBuf,
    options: EndpointOptions,
    pods: PodDirectory,
    endpoints: Option<BTreeMap<u64, Vec<usize>>>,
    compiler: Compiler,
    /// Whether the compiler has taken over the kernel's FQDN pattern ids.
    fqdn_ids_adopted: bool,
    /// The FQDN patterns in force, by id.
    fqdn_patterns: BTreeMap<u32, FqdnPattern>,
    names: VecDeque<GenerationNames>,
}

/// The names of one generation's rules, rendered once for every record.
struct GenerationNames {
    generation: u32,
    /// rule id -> (policy, rule); the strings are shared with the
    /// generation before wherever they did not change.
    rules: foldhash::HashMap<u32, (Arc<str>, Arc<str>)>,
    /// set id -> the policies owning its default, comma-separated
    defaults: foldhash::HashMap<u32, String>,
}

impl GenerationNames {
    /// `set_ids`: the kernel's id of each set, by set index.
    fn new(
        generation: u32,
        names: Names,
        set_ids: &[u32],
        previous: Option<&GenerationNames>,
    ) -> Self {
        let mut policies: HashMap<PolicyKey, Arc<str>> = HashMap::new();
        let rules = names
            .rules
            .into_iter()
            .map(|(id, r)| {
                let kept = previous
                    .and_then(|p| p.rules.get(&id))
                    .filter(|(_, rule)| **rule == *r.rule);
                let policy = policies
                    .entry(r.policy)
                    .or_insert_with_key(|key| key.to_string().into());
                let names = match kept {
                    Some((kept_policy, rule)) if *kept_policy == *policy => {
                        (kept_policy.clone(), rule.clone())
                    }
                    _ => (policy.clone(), r.rule.into()),
                };
                (id, names)
            })
            .collect();
        Self {
            generation,
            rules,
            defaults: set_ids
                .iter()
                .zip(&names.set_defaults)
                .map(|(&id, owners)| {
                    let owners: Vec<String> = owners.iter().map(ToString::to_string).collect();
                    (id, owners.join(","))
                })
                .collect(),
        }
    }
}

impl Enforcer {
    /// `pods`: what is known of pods at start (saved by an earlier run).
    pub fn new(cgroup_root: &Path, options: EndpointOptions, pods: PodDirectory) -> Self {
        Self {
            policies: None,
            cgroup_root: cgroup_root.to_owned(),
            options,
            pods,
            endpoints: None,
            compiler: Compiler::default(),
            fqdn_ids_adopted: false,
            fqdn_patterns: BTreeMap::new(),
            names: VecDeque::new(),
        }
    }

    /// Checks that `policies` would compile for the endpoints they select
    /// now and fit the datapath's maps, without changing anything.
    pub fn check(&self, policies: Vec<Policy>, datapath: &Datapath) -> Result<(), EnforceError> {
        let policies = self.with_unknown_pod_policy(policies);
        // The compiler as a switch would use it: same rule and pattern ids,
        // so the sets the maps hold are recognised as the switch would.
        let mut compiler = self.compiler.clone();
        if !self.fqdn_ids_adopted {
            adopt_kernel_fqdn_ids(&mut compiler, datapath)?;
        }
        let compiled = compiler.compile(&policies, &self.select(&policies))?;
        datapath.check_rules(&compiled.rules)?;
        Ok(())
    }

    /// Compiles `policies` for the endpoints they select and switches the
    /// datapath to them, and to `mode` in the same write. On error nothing
    /// changes.
    pub fn put_in_force(
        &mut self,
        policies: Vec<Policy>,
        mode: Mode,
        datapath: &mut Datapath,
    ) -> Result<u32, EnforceError> {
        let policies = self.with_unknown_pod_policy(policies);
        let endpoints = self.select(&policies);
        let generation = self.switch(&policies, &endpoints, mode, datapath)?;
        self.policies = Some(policies);
        self.endpoints = Some(endpoints);
        Ok(generation)
    }

    /// Looks for endpoints anew; when they changed, puts the policies in
    /// force for them. Returns the new generation, if it switched.
    pub fn refresh(&mut self, datapath: &mut Datapath) -> Result<Option<u32>, EnforceError> {
        let Some(policies) = &self.policies else {
            return Ok(None);
        };
        let endpoints = self.select(policies);
        if self.endpoints.as_ref() == Some(&endpoints) {
            return Ok(None);
        }
        let policies = policies.clone();
        let generation = self.switch(&policies, &endpoints, datapath.global_mode(), datapath)?;
        self.endpoints = Some(endpoints);
        Ok(Some(generation))
    }

    /// Takes in what the Kubernetes API says; `refresh` puts it in force.
    pub fn update_pods(&mut self, update: IdentityUpdate) -> bool {
        self.pods.apply(update)
    }

    pub fn pods(&self) -> &PodDirectory {
        &self.pods
    }

    fn with_unknown_pod_policy(&self, mut policies: Vec<Policy>) -> Vec<Policy> {
        if self.options.kubernetes && self.options.unknown_pod_action == UnknownPodAction::Deny {
            policies.push(Policy {
                key: PolicyKey {
                    namespace: None,
                    name: UNKNOWN_POD_POLICY.into(),
                },
                mode: PolicyMode::Inherit,
                default_action: Action::Deny,
                selector: Selector::default(),
                rules: Arc::from([]),
            });
        }
        policies
    }

    /// Which of `policies` select which cgroups, as the tree and the pod
    /// directory are now.
    fn select(&self, policies: &[Policy]) -> BTreeMap<u64, Vec<usize>> {
        let cgroups = cgroups::walk(&self.cgroup_root);
        let pod_uids: Vec<Option<String>> = cgroups
            .iter()
            .map(|(_, path)| {
                self.options
                    .kubernetes
                    .then(|| kubelet::parse(path).map(|pod| pod.pod_uid))
                    .flatten()
            })
            .collect();
        let endpoints = cgroups
            .iter()
            .zip(&pod_uids)
            .map(|((id, path), uid)| Endpoint {
                cgroup_id: *id,
                path,
                identity: uid
                    .as_deref()
                    .map_or(Identity::Host, |uid| self.pods.identity(uid)),
            });
        let unknown_pod_policy = policies
            .last()
            .filter(|p| p.key.namespace.is_none() && p.key.name == UNKNOWN_POD_POLICY)
            .map(|_| policies.len() - 1);
        select_endpoints(policies, endpoints, unknown_pod_policy)
    }

    fn switch(
        &mut self,
        policies: &[Policy],
        endpoints: &BTreeMap<u64, Vec<usize>>,
        mode: Mode,
        datapath: &mut Datapath,
    ) -> Result<u32, EnforceError> {
        // The compiler moves on with the kernel only: after a failed
        // switch, the rules in force keep their ids.
        let mut compiler = self.compiler.clone();
        if !self.fqdn_ids_adopted {
            adopt_kernel_fqdn_ids(&mut compiler, datapath)?;
        }
        let compiled = compiler.compile(policies, endpoints)?;
        let generation = match datapath.switch_rules_with_mode(&compiled.rules, mode) {
            Ok(generation) => generation,
            Err(e) => {
                self.compiler.retire_fqdn_ids_of(&compiler);
                return Err(e.into());
            }
        };
        self.compiler = compiler;
        self.fqdn_ids_adopted = true;
        self.fqdn_patterns = compiled.rules.fqdn_patterns.clone();
        if self.names.len() == NAMED_GENERATIONS {
            self.names.pop_front();
        }
        let names = GenerationNames::new(
            generation,
            compiled.names,
            datapath.set_ids(),
            self.names.back(),
        );
        self.names.push_back(names);
        Ok(generation)
    }

    /// The generation whose names the next switch forgets, if the kept
    /// window is full: records of it must be named before that switch.
    pub fn generation_named_last_time(&self) -> Option<u32> {
        (self.names.len() == NAMED_GENERATIONS)
            .then(|| self.names.front().map(|n| n.generation))
            .flatten()
    }

    /// The FQDN patterns of the rules in force, by id.
    pub fn fqdn_patterns(&self) -> &BTreeMap<u32, FqdnPattern> {
        &self.fqdn_patterns
    }

    /// Whether a policy selecting the endpoint has FQDN rules (then its
    /// DNS answers are learned from).
    pub fn has_fqdn_rules(&self, cgroup_id: u64) -> bool {
        let (Some(policies), Some(endpoints)) = (&self.policies, &self.endpoints) else {
            return false;
        };
        endpoints.get(&cgroup_id).is_some_and(|selecting| {
            selecting.iter().any(|&p| {
                policies[p]
                    .rules
                    .iter()
                    .flat_map(|r| &r.to)
                    .any(|peer| matches!(peer, Peer::Fqdn(_)))
            })
        })
    }

    /// Number of endpoints the policies select now.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.as_ref().map_or(0, BTreeMap::len)
    }

    /// The deciding policy and rule (None for a default decision) of an
    /// event; `None` when its generation is not one this agent wrote.
    pub fn attribute(
        &self,
        generation: u32,
        set_id: u32,
        rule_id: u32,
    ) -> Option<(&str, Option<&str>)> {
        let names = self.names.iter().find(|n| n.generation == generation)?;
        if rule_id == tollgate_common::RULE_ID_DEFAULT {
            let owners = names.defaults.get(&set_id)?;
            return Some((owners.as_str(), None));
        }
        let (policy, rule) = names.rules.get(&rule_id)?;
        Some((policy, Some(rule)))
    }
}

/// Gives `compiler` the FQDN pattern ids the kernel holds, as the first
/// switch of this agent must: addresses learned before it started refer
/// to them, and to ids of patterns gone since, which are not handed out
/// again.
fn adopt_kernel_fqdn_ids(compiler: &mut Compiler, datapath: &Datapath) -> Result<(), EnforceError> {
    compiler.adopt_fqdn_ids(
        datapath.fqdn_pattern_ids(),
        datapath.highest_fqdn_pattern_id()?,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_policy::compile::RuleRef;

    fn names(rules: &[(u32, &str, &str)]) -> Names {
        Names {
            rules: rules
                .iter()
                .map(|&(id, policy, rule)| {
                    let policy = PolicyKey {
                        namespace: None,
                        name: policy.into(),
                    };
                    let rule = rule.into();
                    (id, RuleRef { policy, rule })
                })
                .collect(),
            set_defaults: vec![],
        }
    }

    #[test]
    fn generations_share_the_names_that_did_not_change() {
        let first = GenerationNames::new(1, names(&[(1, "a", "web"), (2, "b", "db")]), &[], None);
        let second = GenerationNames::new(
            2,
            names(&[(1, "a", "web"), (2, "b", "cache"), (3, "c", "dns")]),
            &[],
            Some(&first),
        );
        let shared = |id: u32| {
            let (p1, r1) = &first.rules[&id];
            let (p2, r2) = &second.rules[&id];
            Arc::ptr_eq(p1, p2) && Arc::ptr_eq(r1, r2)
        };
        assert!(shared(1), "unchanged rule");
        assert!(!shared(2), "renamed rule");
        assert_eq!(
            second.rules[&2],
            (Arc::from("b"), Arc::from("cache")),
            "renamed rule"
        );
        assert_eq!(second.rules[&3], (Arc::from("c"), Arc::from("dns")));
    }
}
