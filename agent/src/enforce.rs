//! Keeps the datapath in step with the policies and the endpoints they
//! select: loads policy files, resolves selectors, compiles, switches, and
//! remembers for each recent generation how its rules are named.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tollgate_common::Mode;

use tollgate_policy::{
    compile::{CompileError, Compiler, Names, RuleIdTable},
    model::{Action, FqdnPattern, Peer, Policy, PolicyKey, PolicyMode, Selector},
    select::{Endpoint, Identity, selects},
};

use crate::{
    cgroups::{self, CgroupIndex, CgroupInfo},
    datapath::{Datapath, DatapathError, PodLink, RuleHitCount},
    flow::{Attribution, PolicySource},
    netns::{self, NetnsCookies},
    pod_links::NodeLinks,
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
    /// Pods' network namespaces, found once each.
    netns: NetnsCookies,
    endpoints: Option<BTreeMap<u64, Vec<usize>>>,
    compiler: Compiler,
    /// Whether the compiler has taken over the kernel's FQDN pattern ids.
    fqdn_ids_adopted: bool,
    /// The FQDN patterns in force, by id.
    fqdn_patterns: BTreeMap<u32, FqdnPattern>,
    /// The policies in force that are cluster resources; the others are
    /// local.
    cluster_policies: BTreeSet<PolicyKey>,
    names: VecDeque<GenerationNames>,
    /// Where the rule ids in force are saved (`rules.json` in the state
    /// directory), if anywhere.
    rules_file: Option<PathBuf>,
    /// The cgroups as the watcher sees them; without, each selection walks
    /// the tree.
    cgroups: Option<CgroupIndex>,
    /// Each policy's selection, kept while the cgroups and pods it was
    /// worked out from stay the same.
    selections: std::sync::Mutex<Selections>,
    /// Moves on whenever what is known of pods changes.
    pods_version: u64,
    /// Whether `rules_file` holds the rule ids in force.
    rule_ids_saved: bool,
    /// How long the last compilation took.
    last_compile: Duration,
}

/// The cgroups each policy selected, by policy; for the cgroup index
/// version and pods version in `basis`.
#[derive(Debug, Default)]
struct Selections {
    basis: Option<(u64, u64)>,
    by_policy: HashMap<PolicyKey, (Selector, Arc<[u64]>)>,
}

/// What `rules.json` holds: the compiler's rule ids, which a restarted
/// agent adopts so that every kept rule goes on counting in its slot of
/// `TG_RULE_HITS`, and the rules in force with their ids, which
/// `tollgate-agent rules` names the pinned counters by while no agent runs.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct SavedRules {
    pub ids: RuleIdTable,
    pub rules: Vec<SavedRule>,
}

/// A rule (or a policy's default) in force and its id.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedRule {
    /// `namespace/name`, or `name`.
    pub policy: String,
    /// None: the policy's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// `allow` or `deny`.
    pub action: String,
    /// `local` or `cluster`.
    pub source: String,
    pub id: u32,
}

/// A rule in force and its hits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleStat {
    pub rule: SavedRule,
    pub hits: RuleHitCount,
}

impl SavedRules {
    pub fn read(path: &Path) -> std::io::Result<Self> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes).map_err(std::io::Error::other)
    }
}

/// Of `stats`, those with no hit within `seconds` before `now_unix_ns`
/// (never hit, or last hit before): all of them for 0.
pub fn unused_for(stats: Vec<RuleStat>, seconds: u64, now_unix_ns: u64) -> Vec<RuleStat> {
    if seconds == 0 {
        return stats;
    }
    let since = now_unix_ns.saturating_sub(seconds.saturating_mul(1_000_000_000));
    stats
        .into_iter()
        .filter(|s| s.hits.last_hit_unix_ns().is_none_or(|last| last < since))
        .collect()
}

/// The rules of `saved` (of policy `policy` only, if given) with their hits.
pub fn rule_stats(
    saved: &[SavedRule],
    policy: Option<&str>,
    read: impl FnOnce(Vec<u32>) -> Result<BTreeMap<u32, RuleHitCount>, DatapathError>,
) -> Result<Vec<RuleStat>, DatapathError> {
    let rules: Vec<&SavedRule> = saved
        .iter()
        .filter(|r| policy.is_none_or(|p| r.policy == p))
        .collect();
    let hits = read(rules.iter().map(|r| r.id).collect())?;
    Ok(rules
        .into_iter()
        .map(|rule| RuleStat {
            rule: rule.clone(),
            hits: hits.get(&rule.id).copied().unwrap_or_default(),
        })
        .collect())
}

/// A deciding policy as records name it: its name and where it came from,
/// shared by all its rules.
#[derive(Debug, PartialEq, Eq)]
struct PolicyName {
    name: Box<str>,
    source: PolicySource,
}

/// A rule as records name it: one lookup by rule id gives everything.
#[derive(Clone, Debug, PartialEq)]
struct RuleNames {
    policy: Arc<PolicyName>,
    rule: Arc<str>,
}

/// A set's default as records name it.
struct DefaultNames {
    /// The policies owning it, comma-separated.
    owners: String,
    /// Their sources: one value when they agree, else one per owner.
    sources: Cow<'static, str>,
}

/// The names of one generation's rules, rendered once for every record.
struct GenerationNames {
    generation: u32,
    /// rule id -> (policy, rule); the names are shared with the generation
    /// before wherever they did not change.
    rules: foldhash::HashMap<u32, RuleNames>,
    /// set id -> the policies owning its default
    defaults: foldhash::HashMap<u32, DefaultNames>,
}

impl GenerationNames {
    /// `set_ids`: the kernel's id of each set, by set index. `cluster`: the
    /// policies that are cluster resources.
    fn new(
        generation: u32,
        names: Names,
        set_ids: &[u32],
        cluster: &BTreeSet<PolicyKey>,
        previous: Option<&GenerationNames>,
    ) -> Self {
        let source_of = |key: &PolicyKey| {
            if cluster.contains(key) {
                PolicySource::Cluster
            } else {
                PolicySource::Local
            }
        };
        let mut policies: HashMap<PolicyKey, Arc<PolicyName>> = HashMap::new();
        let rules = names
            .rules
            .into_iter()
            .map(|(id, r)| {
                let kept = previous
                    .and_then(|p| p.rules.get(&id))
                    .filter(|kept| *kept.rule == *r.rule);
                let policy = policies.entry(r.policy).or_insert_with_key(|key| {
                    Arc::new(PolicyName {
                        name: key.to_string().into(),
                        source: source_of(key),
                    })
                });
                let names = match kept {
                    Some(kept) if *kept.policy == **policy => kept.clone(),
                    _ => RuleNames {
                        policy: policy.clone(),
                        rule: r.rule.into(),
                    },
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
                    let names = DefaultNames {
                        owners: owners
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                        sources: owner_sources(owners.iter().map(source_of)),
                    };
                    (id, names)
                })
                .collect(),
        }
    }
}

/// The sources of a default's owners: one value when they agree (always,
/// for a single owner), else one per owner, comma-separated in their order.
fn owner_sources(sources: impl Iterator<Item = PolicySource> + Clone) -> Cow<'static, str> {
    let mut all = sources.clone();
    match all.next() {
        Some(first) if all.all(|s| s == first) => Cow::Borrowed(first.as_str()),
        // No owner (every set has one): as empty as the owners.
        None => Cow::Borrowed(""),
        Some(_) => Cow::Owned(
            sources
                .map(PolicySource::as_str)
                .collect::<Vec<_>>()
                .join(","),
        ),
    }
}

impl Enforcer {
    /// `pods`: what is known of pods at start (saved by an earlier run).
    pub fn new(cgroup_root: &Path, options: EndpointOptions, pods: PodDirectory) -> Self {
        Self {
            policies: None,
            cgroup_root: cgroup_root.to_owned(),
            netns: NetnsCookies::default(),
            options,
            pods,
            endpoints: None,
            compiler: Compiler::default(),
            fqdn_ids_adopted: false,
            fqdn_patterns: BTreeMap::new(),
            cluster_policies: BTreeSet::new(),
            names: VecDeque::new(),
            rules_file: None,
            cgroups: None,
            selections: std::sync::Mutex::default(),
            pods_version: 0,
            rule_ids_saved: true,
            last_compile: Duration::ZERO,
        }
    }

    /// Selects endpoints from `index` (the cgroup watcher's) instead of a
    /// walk of the tree, which must be the one under the cgroup root given
    /// to [`Self::new`].
    pub fn use_cgroup_index(&mut self, index: CgroupIndex) {
        self.cgroups = Some(index);
    }

    /// Saves the rule ids in force to `path` at every switch, and takes
    /// over the ones saved there by an earlier agent: a kept rule keeps
    /// its id, and so its hit counts. Before the first switch only.
    pub fn keep_rule_ids_in(&mut self, path: PathBuf) {
        match SavedRules::read(&path) {
            Ok(saved) => self.compiler.adopt_rule_ids(saved.ids),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => tracing::warn!(
                path = %path.display(),
                %error,
                "saved rule ids unreadable; rules get new ids and their hit counts start over"
            ),
        }
        self.rules_file = Some(path);
    }

    /// The rules (and defaults) in force, with their ids.
    pub fn rules_in_force(&self) -> Vec<SavedRule> {
        let Some(policies) = &self.policies else {
            return Vec::new();
        };
        let mut rules = Vec::new();
        for policy in policies {
            let Some(ids) = self.compiler.policy_ids(&policy.key) else {
                continue;
            };
            let source = if self.cluster_policies.contains(&policy.key) {
                PolicySource::Cluster
            } else {
                PolicySource::Local
            };
            let name = policy.key.to_string();
            let action = |a: Action| match a {
                Action::Allow => "allow",
                Action::Deny => "deny",
            };
            for (rule, id) in policy.rules.iter().zip(ids.by_position(policy)) {
                rules.push(SavedRule {
                    policy: name.clone(),
                    rule: Some(rule.name.clone()),
                    action: action(rule.action).into(),
                    source: source.as_str().into(),
                    id,
                });
            }
            rules.push(SavedRule {
                policy: name,
                rule: None,
                action: action(policy.default_action).into(),
                source: source.as_str().into(),
                id: ids.default,
            });
        }
        rules
    }

    /// The rules in force (of `policy` only, if given) with their hits.
    pub fn rule_stats(
        &self,
        policy: Option<&str>,
        datapath: &Datapath,
    ) -> Result<Vec<RuleStat>, DatapathError> {
        rule_stats(&self.rules_in_force(), policy, |ids| {
            datapath.rule_hits(ids)
        })
    }

    fn save_rule_ids(&self) {
        let Some(path) = &self.rules_file else {
            return;
        };
        let saved = SavedRules {
            ids: self.compiler.rule_id_table(),
            rules: self.rules_in_force(),
        };
        let written = crate::state_file::write_atomic_with(path, |file| {
            serde_json::to_writer(file, &saved).map_err(std::io::Error::from)
        });
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "rule ids not saved; after a restart, rules changed since the last save count their hits anew");
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
        let compiled = compiler.compile(&policies, &self.select(&policies).0)?;
        datapath.check_rules(&compiled.rules)?;
        Ok(())
    }

    /// Compiles `policies` for the endpoints they select and switches the
    /// datapath to them, and to `mode` in the same write. `cluster`: which
    /// of them are cluster resources (records name the others `local`). On
    /// error nothing changes.
    pub fn put_in_force(
        &mut self,
        policies: Vec<Policy>,
        cluster: BTreeSet<PolicyKey>,
        mode: Mode,
        datapath: &mut Datapath,
    ) -> Result<u32, EnforceError> {
        let started = Instant::now();
        let policies = self.with_unknown_pod_policy(policies);
        let (endpoints, pods) = self.select(&policies);
        let selected = started.elapsed();
        let generation = self.switch(&policies, &endpoints, &cluster, mode, datapath)?;
        let switched = started.elapsed();
        set_endpoint_netns(&endpoints, &pods, &mut self.netns, datapath)?;
        set_pod_links(&endpoints, &pods, datapath)?;
        self.policies = Some(policies);
        self.endpoints = Some(endpoints);
        self.cluster_policies = cluster;
        self.rule_ids_saved = false;
        tracing::debug!(
            generation,
            endpoints = self.endpoint_count(),
            select_us = selected.as_micros() as u64,
            compile_us = self.last_compile.as_micros() as u64,
            switch_us = (switched - selected - self.last_compile).as_micros() as u64,
            netns_links_us = (started.elapsed() - switched).as_micros() as u64,
            sets_compiled = self.compiler.last_stats().sets_compiled,
            sets_reused = self.compiler.last_stats().sets_reused,
            "apply: in force"
        );
        Ok(generation)
    }

    /// Saves the rule ids in force if a switch changed them since the last
    /// save. Called once the change is answered: the file only keeps hit
    /// counts in their slots across a restart.
    pub fn save_rule_ids_if_changed(&mut self) {
        if !self.rule_ids_saved {
            let started = Instant::now();
            self.save_rule_ids();
            self.rule_ids_saved = true;
            tracing::debug!(
                elapsed_us = started.elapsed().as_micros() as u64,
                "rule ids saved"
            );
        }
    }

    /// Looks for endpoints anew; when they changed, puts the policies in
    /// force for them. Returns the new generation, if it switched.
    pub fn refresh(&mut self, datapath: &mut Datapath) -> Result<Option<u32>, EnforceError> {
        let Some(policies) = &self.policies else {
            return Ok(None);
        };
        let (endpoints, pods) = self.select(policies);
        if self.endpoints.as_ref() == Some(&endpoints) {
            return Ok(None);
        }
        let policies = policies.clone();
        let cluster = self.cluster_policies.clone();
        let generation = self.switch(
            &policies,
            &endpoints,
            &cluster,
            datapath.global_mode(),
            datapath,
        )?;
        set_endpoint_netns(&endpoints, &pods, &mut self.netns, datapath)?;
        set_pod_links(&endpoints, &pods, datapath)?;
        self.endpoints = Some(endpoints);
        Ok(Some(generation))
    }

    /// Takes in what the Kubernetes API says; `refresh` puts it in force.
    pub fn update_pods(&mut self, update: IdentityUpdate) -> bool {
        // Selections are worked out anew after any update, changed or not.
        self.pods_version += 1;
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
    /// directory are now; and which cgroups are pods', with the pod's
    /// cgroup directory. With the watcher's index, a policy's selection is
    /// worked out again only when the policy's selector, the cgroups or the
    /// pods changed.
    fn select(&self, policies: &[Policy]) -> (BTreeMap<u64, Vec<usize>>, BTreeMap<u64, PathBuf>) {
        let Some(index) = &self.cgroups else {
            let walked: Vec<(u64, CgroupInfo)> = cgroups::walk(&self.cgroup_root)
                .into_iter()
                .map(|(id, path)| {
                    let pod = self
                        .options
                        .kubernetes
                        .then(|| kubelet::parse(&path))
                        .flatten();
                    (id, CgroupInfo { path, pod })
                })
                .collect();
            let mut none = Selections::default();
            return self.select_from(
                policies,
                walked.iter().map(|(id, c)| (*id, c)),
                0,
                &mut none,
            );
        };
        let index = index.lock();
        let mut selections = self
            .selections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.select_from(policies, index.iter(), index.version(), &mut selections)
    }

    fn select_from<'a>(
        &self,
        policies: &[Policy],
        cgroups: impl Iterator<Item = (u64, &'a CgroupInfo)> + Clone,
        cgroups_version: u64,
        selections: &mut Selections,
    ) -> (BTreeMap<u64, Vec<usize>>, BTreeMap<u64, PathBuf>) {
        let basis = (cgroups_version, self.pods_version);
        if selections.basis != Some(basis) {
            selections.by_policy.clear();
            selections.basis = Some(basis);
        }
        let pod_uid = |info: &'a CgroupInfo| -> Option<&'a str> {
            self.options
                .kubernetes
                .then_some(info.pod.as_ref())
                .flatten()
                .map(|pod| pod.pod_uid.as_str())
        };
        let endpoint = |(id, info): (u64, &'a CgroupInfo)| Endpoint {
            cgroup_id: id,
            path: &info.path,
            identity: pod_uid(info).map_or(Identity::Host, |uid| self.pods.identity(uid)),
        };
        let unknown_pod_policy = policies
            .last()
            .filter(|p| p.key.namespace.is_none() && p.key.name == UNKNOWN_POD_POLICY)
            .map(|_| policies.len() - 1);
        let mut selected: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        let mut kept = HashMap::new();
        for (i, policy) in policies.iter().enumerate() {
            if Some(i) == unknown_pod_policy {
                for endpoint in cgroups.clone().map(endpoint) {
                    if endpoint.identity == Identity::UnknownPod {
                        selected.entry(endpoint.cgroup_id).or_default().push(i);
                    }
                }
                continue;
            }
            let ids = match selections.by_policy.remove(&policy.key) {
                Some((selector, ids)) if selector == policy.selector => ids,
                _ => cgroups
                    .clone()
                    .map(endpoint)
                    .filter(|endpoint| selects(policy, endpoint))
                    .map(|endpoint| endpoint.cgroup_id)
                    .collect(),
            };
            for &id in ids.iter() {
                selected.entry(id).or_default().push(i);
            }
            kept.insert(policy.key.clone(), (policy.selector.clone(), ids));
        }
        // Only the policies of this selection are kept for the next.
        selections.by_policy = kept;
        let pods = cgroups
            .filter_map(|(id, info)| {
                let pod = pod_dir(&info.path, pod_uid(info)?);
                Some((id, self.cgroup_root.join(pod.trim_start_matches('/'))))
            })
            .collect();
        (selected, pods)
    }

    fn switch(
        &mut self,
        policies: &[Policy],
        endpoints: &BTreeMap<u64, Vec<usize>>,
        cluster: &BTreeSet<PolicyKey>,
        mode: Mode,
        datapath: &mut Datapath,
    ) -> Result<u32, EnforceError> {
        // The compiler moves on with the kernel only: after a failed
        // switch, the rules in force keep their ids.
        let mut compiler = self.compiler.clone();
        if !self.fqdn_ids_adopted {
            adopt_kernel_fqdn_ids(&mut compiler, datapath)?;
        }
        let compiling = Instant::now();
        let compiled = compiler.compile(policies, endpoints)?;
        self.last_compile = compiling.elapsed();
        // A rule id new to force counts from zero (it may be one handed out
        // before, or counted by a switch that failed); one that leaves
        // force is zeroed once out of force.
        let ids_before = self.compiler.rule_ids_in_use();
        let ids_after = compiler.rule_ids_in_use();
        datapath.zero_rule_hits(ids_after.difference(&ids_before).copied())?;
        let generation = match datapath.switch_rules_with_mode(&compiled.rules, mode) {
            Ok(generation) => generation,
            Err(e) => {
                self.compiler.retire_fqdn_ids_of(&compiler);
                return Err(e.into());
            }
        };
        if let Err(error) = datapath.zero_rule_hits(ids_before.difference(&ids_after).copied()) {
            tracing::warn!(%error, "hit counters of removed rules not all zeroed; they are zeroed before their ids are used again");
        }
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
            cluster,
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

    /// The deciding policy, its source, and rule (None for a default
    /// decision) of an event; `None` when its generation is not one this
    /// agent wrote. One lookup by rule (or set) id.
    pub fn attribute(&self, generation: u32, set_id: u32, rule_id: u32) -> Option<Attribution<'_>> {
        let names = self.names.iter().find(|n| n.generation == generation)?;
        if rule_id == tollgate_common::RULE_ID_DEFAULT {
            let default = names.defaults.get(&set_id)?;
            return Some(Attribution {
                policy: &default.owners,
                rule: None,
                source: &default.sources,
            });
        }
        let names = names.rules.get(&rule_id)?;
        Some(Attribution {
            policy: &names.policy.name,
            rule: Some(&names.rule),
            source: names.policy.source.as_str(),
        })
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

/// Tells the datapath each endpoint's network namespace: a pod's is its
/// sandbox's (`netns`), any other endpoint's the host's. A pod with no
/// process yet is left out until a later switch finds one; where the
/// kernel cannot tell cookies (before 5.14), every endpoint is.
fn set_endpoint_netns(
    endpoints: &BTreeMap<u64, Vec<usize>>,
    pods: &BTreeMap<u64, PathBuf>,
    netns: &mut NetnsCookies,
    datapath: &mut Datapath,
) -> Result<(), EnforceError> {
    let host = datapath.host_netns_cookie();
    let mut known = BTreeMap::new();
    if host != 0 {
        for &id in endpoints.keys() {
            let cookie = match pods.get(&id) {
                Some(pod) => netns.of_oldest_process(pod),
                None => Some(host),
            };
            if let Some(cookie) = cookie {
                known.insert(id, cookie);
            }
        }
    }
    datapath.set_endpoint_netns(&known)?;
    Ok(())
}

/// The pod's own cgroup, of the cgroup `path` of pod `uid`: the highest
/// ancestor that is still the pod's (a container's parent; the sandbox's,
/// whatever its scope is named).
fn pod_dir<'a>(path: &'a str, uid: &str) -> &'a str {
    let mut pod = path;
    while let Some((parent, _)) = pod.rsplit_once('/') {
        if kubelet::parse(parent).is_none_or(|p| p.pod_uid != uid) {
            break;
        }
        pod = parent;
    }
    pod
}

/// Puts the frame hook on the links of every pod with an endpoint (the
/// node's side of the veths into the pod's namespace, its sandbox's). A
/// frame there without a socket is judged as the pod's first endpoint: its
/// own cgroup, made before its containers'. Links that cannot be found or
/// attached are logged and left out; the other pods' are in place.
fn set_pod_links(
    endpoints: &BTreeMap<u64, Vec<usize>>,
    pods: &BTreeMap<u64, PathBuf>,
    datapath: &mut Datapath,
) -> Result<(), EnforceError> {
    let mut first_endpoint: BTreeMap<&Path, u64> = BTreeMap::new();
    for (&id, pod) in pods {
        if endpoints.contains_key(&id) {
            let first = first_endpoint.entry(pod).or_insert(id);
            *first = (*first).min(id);
        }
    }
    let mut wanted = BTreeMap::new();
    if !first_endpoint.is_empty() {
        match NodeLinks::dump() {
            Ok(mut node) => {
                for (pod, endpoint) in first_endpoint {
                    let Some(namespace) = netns::of_oldest_process(pod) else {
                        continue;
                    };
                    match node.into_namespace(&namespace) {
                        Ok(veths) => wanted.extend(veths.into_iter().map(|veth| {
                            (
                                veth.ifindex,
                                PodLink {
                                    name: veth.name,
                                    endpoint,
                                },
                            )
                        })),
                        Err(error) => tracing::warn!(
                            pod = %pod.display(), %error,
                            "cannot find the pod's links; its packet sockets are not judged"
                        ),
                    }
                }
            }
            Err(error) => tracing::warn!(
                %error,
                "cannot list the node's links; pods' packet sockets are not judged"
            ),
        }
    }
    for failure in datapath.set_pod_links(&wanted)? {
        tracing::warn!(%failure, "the pod's packet sockets are not judged on this link");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_policy::compile::RuleRef;

    fn key(name: &str) -> PolicyKey {
        crate::control::store::parse_key(name)
    }

    fn names(rules: &[(u32, &str, &str)], set_defaults: &[&[&str]]) -> Names {
        Names {
            rules: rules
                .iter()
                .map(|&(id, policy, rule)| {
                    let policy = key(policy);
                    let rule = rule.into();
                    (id, RuleRef { policy, rule })
                })
                .collect(),
            set_defaults: set_defaults
                .iter()
                .map(|owners| owners.iter().map(|o| key(o)).collect())
                .collect(),
        }
    }

    fn cluster(keys: &[&str]) -> BTreeSet<PolicyKey> {
        keys.iter().map(|k| key(k)).collect()
    }

    fn rule(names: &GenerationNames, id: u32) -> (&str, &str, PolicySource) {
        let r = &names.rules[&id];
        (&r.policy.name, &r.rule, r.policy.source)
    }

    #[test]
    fn a_pods_dir_is_its_highest_cgroup_of_the_same_pod() {
        let pod = "/kubepods.slice/kubepods-burstable.slice/\
                   kubepods-burstable-pod0a1b2c3d_0000_4000_8000_00000000000a.slice";
        let uid = "0a1b2c3d-0000-4000-8000-00000000000a";
        let container = format!("{pod}/cri-containerd-{}.scope", "ab".repeat(32));
        let sandbox = format!("{pod}/sandbox.scope");
        assert_eq!(pod_dir(&container, uid), pod);
        assert_eq!(pod_dir(&sandbox, uid), pod);
        assert_eq!(pod_dir(pod, uid), pod);
        let cgroupfs = "/kubepods/besteffort/pod0a1b2c3d-0000-4000-8000-00000000000a";
        assert_eq!(
            pod_dir(&format!("{cgroupfs}/{}", "cd".repeat(32)), uid),
            cgroupfs
        );
    }

    #[test]
    fn generations_share_the_names_that_did_not_change() {
        let none = BTreeSet::new();
        let first = GenerationNames::new(
            1,
            names(&[(1, "a", "web"), (2, "b", "db")], &[]),
            &[],
            &none,
            None,
        );
        let second = GenerationNames::new(
            2,
            names(&[(1, "a", "web"), (2, "b", "cache"), (3, "c", "dns")], &[]),
            &[],
            &none,
            Some(&first),
        );
        let shared = |id: u32| {
            let (r1, r2) = (&first.rules[&id], &second.rules[&id]);
            Arc::ptr_eq(&r1.policy, &r2.policy) && Arc::ptr_eq(&r1.rule, &r2.rule)
        };
        assert!(shared(1), "unchanged rule");
        assert!(!shared(2), "renamed rule");
        assert_eq!(
            rule(&second, 2),
            ("b", "cache", PolicySource::Local),
            "renamed rule"
        );
        assert_eq!(rule(&second, 3), ("c", "dns", PolicySource::Local));
    }

    #[test]
    fn rules_carry_the_source_of_their_policy() {
        let first = GenerationNames::new(
            1,
            names(&[(1, "prod/web", "https"), (2, "baseline", "dns")], &[]),
            &[],
            &cluster(&["prod/web"]),
            None,
        );
        assert_eq!(
            rule(&first, 1),
            ("prod/web", "https", PolicySource::Cluster)
        );
        assert_eq!(rule(&first, 2), ("baseline", "dns", PolicySource::Local));
        // The local `baseline` gone, a cluster resource of that name in its
        // place: same names, new source, nothing shared.
        let second = GenerationNames::new(
            2,
            names(&[(1, "prod/web", "https"), (2, "baseline", "dns")], &[]),
            &[],
            &cluster(&["prod/web", "baseline"]),
            Some(&first),
        );
        assert!(Arc::ptr_eq(
            &first.rules[&1].policy,
            &second.rules[&1].policy
        ));
        assert!(!Arc::ptr_eq(
            &first.rules[&2].policy,
            &second.rules[&2].policy
        ));
        assert_eq!(rule(&second, 2), ("baseline", "dns", PolicySource::Cluster));
    }

    #[test]
    fn defaults_name_their_owners_and_sources() {
        let generation = GenerationNames::new(
            1,
            names(
                &[],
                &[
                    &["prod/web"],
                    &["baseline"],
                    &["prod/web", "prod/db"],
                    &["baseline", "prod/web", "node"],
                ],
            ),
            &[10, 11, 12, 13],
            &cluster(&["prod/web", "prod/db"]),
            None,
        );
        let default = |set: u32| {
            let d = &generation.defaults[&set];
            (d.owners.as_str(), d.sources.as_ref())
        };
        assert_eq!(default(10), ("prod/web", "cluster"));
        assert_eq!(default(11), ("baseline", "local"));
        assert_eq!(default(12), ("prod/web,prod/db", "cluster"));
        assert_eq!(
            default(13),
            ("baseline,prod/web,node", "local,cluster,local")
        );
    }

    #[test]
    fn unused_rules_are_those_never_hit_or_last_hit_before_the_age() {
        let rule = |name: &str, id: u32| SavedRule {
            policy: "p".into(),
            rule: Some(name.into()),
            action: "allow".into(),
            source: "local".into(),
            id,
        };
        let saved = [rule("never", 1), rule("old", 2), rule("recent", 3)];
        let now = crate::datapath::monotonic_to_unix_ns(1).unwrap();
        let stats = super::rule_stats(&saved, Some("p"), |ids| {
            assert_eq!(ids, [1, 2, 3]);
            Ok(BTreeMap::from([
                (
                    2,
                    RuleHitCount {
                        allowed: 1,
                        last_hit_ns: 1,
                        ..Default::default()
                    },
                ),
                (
                    3,
                    RuleHitCount {
                        denied: 1,
                        // Monotonic time 1 s past the "old" hit's.
                        last_hit_ns: 1_000_000_001,
                        ..Default::default()
                    },
                ),
            ]))
        })
        .unwrap();
        assert_eq!(stats.len(), 3);
        assert_eq!(stats[0].hits, RuleHitCount::default());
        let unused = |seconds: u64, now: u64| -> Vec<String> {
            super::unused_for(stats.clone(), seconds, now)
                .into_iter()
                .map(|s| s.rule.rule.unwrap())
                .collect()
        };
        assert_eq!(unused(0, now), ["never", "old", "recent"], "0: every rule");
        // 0.5 s after `recent`'s hit, 1.5 s after `old`'s.
        let later = now + 1_500_000_000;
        assert_eq!(unused(1, later), ["never", "old"]);
        assert_eq!(unused(2, later), ["never"]);
        assert!(
            super::rule_stats(&saved, Some("q"), |_| Ok(BTreeMap::new()))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn attribution_gives_policy_rule_and_source_in_one_lookup() {
        let mut enforcer = Enforcer::new(
            Path::new("/nonexistent"),
            EndpointOptions::default(),
            PodDirectory::default(),
        );
        enforcer.names.push_back(GenerationNames::new(
            7,
            names(
                &[(1, "prod/web", "https"), (2, "baseline", "dns")],
                &[&["baseline"]],
            ),
            &[3],
            &cluster(&["prod/web"]),
            None,
        ));
        let attribution = |set, rule| enforcer.attribute(7, set, rule);
        assert_eq!(
            attribution(3, 1),
            Some(Attribution {
                policy: "prod/web",
                rule: Some("https"),
                source: "cluster",
            })
        );
        assert_eq!(
            attribution(3, 2),
            Some(Attribution {
                policy: "baseline",
                rule: Some("dns"),
                source: "local",
            })
        );
        assert_eq!(
            attribution(3, tollgate_common::RULE_ID_DEFAULT),
            Some(Attribution {
                policy: "baseline",
                rule: None,
                source: "local",
            })
        );
        assert_eq!(enforcer.attribute(8, 3, 1), None, "an unknown generation");
    }
}
