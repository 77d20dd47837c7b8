//! Keeps the datapath in step with the policies and the endpoints they
//! select: loads policy files, resolves selectors, compiles, switches, and
//! remembers for each recent generation how its rules are named.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    path::{Path, PathBuf},
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use tollgate_common::Mode;

use tollgate_policy::{
    compile::{CompileError, Compiler, Names, PolicyRuleIds, RuleIdSnapshot, RuleIdTable},
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

/// How long the writer of `rules.json` waits for another change before it
/// writes, and at most after the first it has not written.
const RULES_FILE_SETTLE: Duration = Duration::from_millis(500);
const RULES_FILE_MAX_DELAY: Duration = Duration::from_secs(5);

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
    /// The rules' names over the generations in `names`.
    rule_names: RuleNamesById,
    /// Switches that named a generation, so far.
    switches: u64,
    /// Saves the rule ids in force (`rules.json` in the state directory),
    /// if anywhere.
    rules_file: Option<RulesFileWriter>,
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

/// The names of one generation's set defaults, rendered once for every
/// record; its rules' names are in [`RuleNamesById`].
struct GenerationNames {
    generation: u32,
    /// The switch that put it in force (rule names are kept by switch).
    switch: u64,
    /// set id -> the policies owning its default
    defaults: foldhash::HashMap<u32, DefaultNames>,
}

impl GenerationNames {
    /// `set_ids`: the kernel's id of each set, by set index.
    fn new(
        generation: u32,
        switch: u64,
        set_defaults: &[Vec<PolicyKey>],
        set_ids: &[u32],
        cluster: &BTreeSet<PolicyKey>,
    ) -> Self {
        let defaults = set_ids
            .iter()
            .zip(set_defaults)
            .map(|(&id, owners)| {
                let names = DefaultNames {
                    owners: owners
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                    sources: owner_sources(owners.iter().map(|key| source_of(cluster, key))),
                };
                (id, names)
            })
            .collect();
        Self {
            generation,
            switch,
            defaults,
        }
    }
}

fn source_of(cluster: &BTreeSet<PolicyKey>, key: &PolicyKey) -> PolicySource {
    if cluster.contains(key) {
        PolicySource::Cluster
    } else {
        PolicySource::Local
    }
}

/// The names of the rules of every generation kept, by rule id. A rule id
/// names one (policy, rule) from the switch that put it in force under
/// that name to the one that took it out, so one span serves every
/// generation in between, and a switch looks rule by rule only at the
/// policies it changed.
#[derive(Default)]
struct RuleNamesById {
    /// rule id -> its latest span: the one in force, or the last to end.
    /// Most ids only ever have this one, so it is kept inline (a list per
    /// id cost an allocation of four spans per rule: 19 MB at 100k rules).
    latest: foldhash::HashMap<u32, NameSpan>,
    /// rule id -> its spans before the latest, oldest first: those of ids
    /// renamed, or moved to a policy from another source, while a
    /// generation that knew them is still kept.
    earlier: foldhash::HashMap<u32, Vec<NameSpan>>,
    /// The switches that ended spans, oldest first, with the ids whose
    /// spans they ended: those spans go once no kept generation is older.
    ended: VecDeque<(u64, Vec<u32>)>,
    /// The policies of the latest generation, as named.
    policies: HashMap<PolicyKey, NamedPolicy>,
}

struct NameSpan {
    /// The switch that put the id in force under these names.
    from: u64,
    /// The switch that took it out (or renamed it); [`NameSpan::IN_FORCE`]
    /// while none has. (A plain u64: one span per rule id, 100k at the
    /// bench's size, is kept in a map whose buckets it sizes.)
    until: u64,
    names: RuleNames,
}

impl NameSpan {
    const IN_FORCE: u64 = u64::MAX;
}

struct NamedPolicy {
    ids: Arc<PolicyRuleIds>,
    name: Arc<PolicyName>,
}

impl RuleNamesById {
    /// Takes in the rule ids switch `switch` put in force: a policy with
    /// the same ids (the very allocation) and source as before is passed
    /// over; the rules of the others are compared by id and name.
    fn switched(
        &mut self,
        switch: u64,
        policies: Vec<Arc<PolicyRuleIds>>,
        cluster: &BTreeSet<PolicyKey>,
    ) {
        let mut before = std::mem::take(&mut self.policies);
        let mut ended = Vec::new();
        let mut started = Vec::new();
        for ids in policies {
            let source = source_of(cluster, &ids.key);
            // A policy of the same name from another source is another
            // policy: none of its names carry over.
            let old = match before.remove(&ids.key) {
                Some(old) if old.name.source != source => {
                    ended.extend(old.ids.ids.iter().copied());
                    None
                }
                old => old,
            };
            if let Some(old) = old.as_ref().filter(|old| Arc::ptr_eq(&old.ids, &ids)) {
                let name = Arc::clone(&old.name);
                self.policies
                    .insert(ids.key.clone(), NamedPolicy { ids, name });
                continue;
            }
            let name = match &old {
                Some(old) => Arc::clone(&old.name),
                None => Arc::new(PolicyName {
                    name: ids.key.to_string().into(),
                    source,
                }),
            };
            let was: HashMap<u32, &Arc<str>> = old
                .as_ref()
                .map(|old| old.ids.named_ids().map(|(rule, id)| (id, rule)).collect())
                .unwrap_or_default();
            let mut kept = std::collections::HashSet::new();
            for (rule, id) in ids.named_ids() {
                if was.get(&id) == Some(&rule) {
                    kept.insert(id);
                } else {
                    let names = RuleNames {
                        policy: Arc::clone(&name),
                        rule: Arc::clone(rule),
                    };
                    started.push((id, names));
                }
            }
            ended.extend(was.keys().filter(|id| !kept.contains(id)));
            self.policies
                .insert(ids.key.clone(), NamedPolicy { ids, name });
        }
        // Gone.
        for old in before.into_values() {
            ended.extend(old.ids.ids.iter().copied());
        }
        for &id in &ended {
            if let Some(span) = self.latest.get_mut(&id)
                && span.until == NameSpan::IN_FORCE
            {
                span.until = switch;
            }
        }
        for (id, names) in started {
            // A set in force whose change is one entry is rewritten where
            // it is before the generation moves (datapath `set_delta`), so
            // a rule it gains can decide, and be recorded under, the
            // generation before. An id new to force was in
            // force under no name then (ids are not handed out again
            // while in use), so its span starts a switch early.
            let in_force_before = self
                .latest
                .get(&id)
                .is_some_and(|span| span.until >= switch);
            let from = if in_force_before {
                switch
            } else {
                switch.saturating_sub(1)
            };
            let span = NameSpan {
                from,
                until: NameSpan::IN_FORCE,
                names,
            };
            if let Some(before) = self.latest.insert(id, span) {
                self.earlier.entry(id).or_default().push(before);
            }
        }
        if !ended.is_empty() {
            self.ended.push_back((switch, ended));
        }
    }

    /// Forgets the spans that ended at or before switch `oldest`, that of
    /// the oldest generation kept.
    fn forget_before(&mut self, oldest: u64) {
        while self
            .ended
            .front()
            .is_some_and(|(switch, _)| *switch <= oldest)
        {
            let (_, ids) = self.ended.pop_front().expect("checked above");
            let needed = |span: &NameSpan| span.until > oldest;
            for id in ids {
                if let Some(spans) = self.earlier.get_mut(&id) {
                    spans.retain(needed);
                    if spans.is_empty() {
                        self.earlier.remove(&id);
                    }
                }
                if self.latest.get(&id).is_some_and(|span| !needed(span)) {
                    self.latest.remove(&id);
                }
            }
        }
    }

    /// The names of rule `id` in the generation switch `switch` put in force.
    fn get(&self, switch: u64, id: u32) -> Option<&RuleNames> {
        let covers = |span: &&NameSpan| span.from <= switch && switch < span.until;
        let latest = self.latest.get(&id)?;
        if covers(&latest) {
            return Some(&latest.names);
        }
        self.earlier
            .get(&id)?
            .iter()
            .rev()
            .find(covers)
            .map(|span| &span.names)
    }

    /// Every span of rule `id` kept, oldest first.
    #[cfg(test)]
    fn spans(&self, id: u32) -> Vec<&NameSpan> {
        let earlier = self.earlier.get(&id).into_iter().flatten();
        earlier.chain(self.latest.get(&id)).collect()
    }
}

/// Writes `rules.json` on a thread of its own: a change is answered
/// without waiting for the file (tens of thousands of rules take
/// milliseconds to write out), and a burst of changes is saved once, as
/// the latest, when it settles: its write and sync then do not compete
/// with the changes' own journal records for the disk.
///
/// A stop waits for it ([`Drop`]); a crash before it loses only the ids of
/// rules new since the last save, whose slots are zeroed anyway before a
/// restarted agent hands their ids out.
struct RulesFileWriter {
    queue: Option<std::sync::mpsc::Sender<RulesSnapshot>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What `rules.json` is made from, taken at a switch: each policy's ids
/// are shared with the compiler.
struct RulesSnapshot {
    ids: RuleIdSnapshot,
    policies: Vec<PolicyInForce>,
}

struct PolicyInForce {
    ids: Arc<PolicyRuleIds>,
    default_action: Action,
    source: PolicySource,
}

/// Written as the [`SavedRules`] it stands for, rule by rule as it goes
/// out: collected first, 100k rules were 100k strings made and freed
/// beside the agent's long-lived state (and its RSS the higher for it).
impl serde::Serialize for RulesSnapshot {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let rules = self.policies.iter().flat_map(PolicyInForce::rules);
        let mut saved = serializer.serialize_struct("SavedRules", 2)?;
        saved.serialize_field("ids", &self.ids)?;
        saved.serialize_field("rules", &tollgate_policy::serialize::Seq::new(rules))?;
        saved.end()
    }
}

/// A [`SavedRule`], borrowed from the policy it is of.
#[derive(serde::Serialize)]
struct SavedRuleRef<'a> {
    /// Shared by the policy's rules.
    policy: Rc<str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rule: Option<&'a str>,
    action: &'static str,
    source: &'static str,
    id: u32,
}

impl From<SavedRuleRef<'_>> for SavedRule {
    fn from(rule: SavedRuleRef<'_>) -> Self {
        Self {
            policy: rule.policy.to_string(),
            rule: rule.rule.map(str::to_owned),
            action: rule.action.into(),
            source: rule.source.into(),
            id: rule.id,
        }
    }
}

impl PolicyInForce {
    /// Its rules and default, with their ids.
    fn rules(&self) -> impl Iterator<Item = SavedRuleRef<'_>> + '_ {
        let policy = Rc::<str>::from(self.ids.key.to_string());
        let action = |a: Action| match a {
            Action::Allow => "allow",
            Action::Deny => "deny",
        };
        let source = self.source.as_str();
        let default = SavedRuleRef {
            policy: Rc::clone(&policy),
            rule: None,
            action: action(self.default_action),
            source,
            id: self.ids.default,
        };
        self.ids
            .rules
            .iter()
            .zip(&self.ids.ids)
            .map(move |(rule, &id)| SavedRuleRef {
                policy: Rc::clone(&policy),
                rule: Some(&rule.name),
                action: action(rule.action),
                source,
                id,
            })
            .chain(std::iter::once(default))
    }
}

impl RulesFileWriter {
    fn new(path: PathBuf) -> Self {
        let (queue, snapshots) = std::sync::mpsc::channel::<RulesSnapshot>();
        let thread = std::thread::Builder::new()
            .name("rules-file".into())
            .spawn(move || {
                while let Ok(mut snapshot) = snapshots.recv() {
                    // Only the latest matters, once changes settle (or
                    // have gone on for long).
                    let deadline = Instant::now() + RULES_FILE_MAX_DELAY;
                    while let Some(wait) = deadline
                        .checked_duration_since(Instant::now())
                        .map(|left| left.min(RULES_FILE_SETTLE))
                        && let Ok(later) = snapshots.recv_timeout(wait)
                    {
                        snapshot = later;
                    }
                    let started = Instant::now();
                    let written = crate::state_file::write_atomic_with(&path, |file| {
                        serde_json::to_writer(file, &snapshot).map_err(std::io::Error::from)
                    });
                    match written {
                        Ok(()) => tracing::debug!(
                            elapsed_us = started.elapsed().as_micros() as u64,
                            "rule ids saved"
                        ),
                        Err(error) => tracing::warn!(path = %path.display(), %error, "rule ids not saved; after a restart, rules changed since the last save count their hits anew"),
                    }
                    drop(snapshot);
                    crate::heap::release_freed_memory();
                }
            })
            .expect("spawning the rules file writer");
        Self {
            queue: Some(queue),
            thread: Some(thread),
        }
    }

    fn save(&self, snapshot: RulesSnapshot) {
        if let Some(queue) = &self.queue {
            // The thread ends only when the queue is dropped.
            let _ = queue.send(snapshot);
        }
    }
}

impl Drop for RulesFileWriter {
    /// Waits until what was handed over is written.
    fn drop(&mut self) {
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
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
            rule_names: RuleNamesById::default(),
            switches: 0,
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
        self.rules_file = Some(RulesFileWriter::new(path));
    }

    /// The rules (and defaults) in force, with their ids.
    pub fn rules_in_force(&self) -> Vec<SavedRule> {
        self.policies_in_force()
            .iter()
            .flat_map(PolicyInForce::rules)
            .map(SavedRule::from)
            .collect()
    }

    /// Each policy in force with its rule ids.
    fn policies_in_force(&self) -> Vec<PolicyInForce> {
        let Some(policies) = &self.policies else {
            return Vec::new();
        };
        policies
            .iter()
            .filter_map(|policy| {
                Some(PolicyInForce {
                    ids: Arc::clone(self.compiler.policy_ids(&policy.key)?),
                    default_action: policy.default_action,
                    source: source_of(&self.cluster_policies, &policy.key),
                })
            })
            .collect()
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
    /// save: hands them to the writer of `rules.json`, which writes them
    /// while the agent goes on. The file only keeps hit counts in their
    /// slots across a restart (and names them while no agent runs); a stop
    /// waits until it is written.
    pub fn save_rule_ids_if_changed(&mut self) {
        if self.rule_ids_saved {
            return;
        }
        if let Some(writer) = &self.rules_file {
            writer.save(RulesSnapshot {
                ids: self.compiler.rule_id_snapshot(),
                policies: self.policies_in_force(),
            });
        }
        self.rule_ids_saved = true;
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
        let moved = compiler.rule_id_changes(&self.compiler);
        datapath.zero_rule_hits(moved.came.iter().copied())?;
        let generation = match datapath.switch_rules_with_mode(&compiled.rules, mode) {
            Ok(generation) => generation,
            Err(e) => {
                self.compiler.retire_fqdn_ids_of(&compiler);
                return Err(e.into());
            }
        };
        if let Err(error) = datapath.zero_rule_hits(moved.left.iter().copied()) {
            tracing::warn!(%error, "hit counters of removed rules not all zeroed; they are zeroed before their ids are used again");
        }
        self.compiler = compiler;
        self.fqdn_ids_adopted = true;
        self.fqdn_patterns = compiled.rules.fqdn_patterns.clone();
        self.name_generation(generation, compiled.names, datapath.set_ids(), cluster);
        Ok(generation)
    }

    /// Keeps the names of the generation just put in force (`set_ids`: the
    /// kernel's id of each set, by set index), forgetting the oldest's
    /// when the window is full.
    fn name_generation(
        &mut self,
        generation: u32,
        names: Names,
        set_ids: &[u32],
        cluster: &BTreeSet<PolicyKey>,
    ) {
        self.switches += 1;
        let switch = self.switches;
        if self.names.len() == NAMED_GENERATIONS {
            self.names.pop_front();
        }
        self.rule_names.switched(switch, names.policies, cluster);
        self.names.push_back(GenerationNames::new(
            generation,
            switch,
            &names.set_defaults,
            set_ids,
            cluster,
        ));
        let oldest = self.names.front().map_or(switch, |n| n.switch);
        self.rule_names.forget_before(oldest);
    }

    /// Waits until the rule ids handed to the writer of `rules.json` are
    /// written; nothing is saved after.
    pub fn finish_saving(&mut self) {
        drop(self.rules_file.take());
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
        let names = self.rule_names.get(names.switch, rule_id)?;
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
    use tollgate_policy::model::Rule;

    fn key(name: &str) -> PolicyKey {
        crate::control::store::parse_key(name)
    }

    /// A policy allowing anything, with rules of these names.
    fn policy(name: &str, rules: &[&str]) -> Policy {
        Policy {
            key: key(name),
            mode: PolicyMode::Inherit,
            default_action: Action::Deny,
            selector: Selector::default(),
            rules: rules
                .iter()
                .map(|rule| Rule {
                    name: (*rule).into(),
                    action: Action::Allow,
                    to: Default::default(),
                    ports: Default::default(),
                })
                .collect(),
        }
    }

    fn cluster(keys: &[&str]) -> BTreeSet<PolicyKey> {
        keys.iter().map(|k| key(k)).collect()
    }

    /// An enforcer that only names generations, and the compiler that
    /// numbers their rules.
    struct Naming {
        enforcer: Enforcer,
        compiler: Compiler,
        generation: u32,
    }

    impl Naming {
        fn new() -> Self {
            Self {
                enforcer: Enforcer::new(
                    Path::new("/nonexistent"),
                    EndpointOptions::default(),
                    PodDirectory::default(),
                ),
                compiler: Compiler::default(),
                generation: 0,
            }
        }

        /// Names the next generation, of `policies` each selecting an
        /// endpoint of its own; returns the generation.
        fn switch(&mut self, policies: &[Policy], cluster: &BTreeSet<PolicyKey>) -> u32 {
            let endpoints = (0..policies.len()).map(|p| (p as u64, vec![p])).collect();
            let compiled = self.compiler.compile(policies, &endpoints).unwrap();
            self.generation += 1;
            let set_ids: Vec<u32> = (1..=compiled.rules.sets.len() as u32).collect();
            self.enforcer
                .name_generation(self.generation, compiled.names, &set_ids, cluster);
            self.generation
        }

        fn id(&self, policy: &str, rule: &str) -> u32 {
            let ids = self.compiler.policy_ids(&key(policy)).unwrap();
            ids.named_ids()
                .find(|(name, _)| &***name == rule)
                .unwrap()
                .1
        }

        /// (policy, rule, source) of a rule id in a generation.
        fn rule(&self, generation: u32, id: u32) -> Option<(String, String, String)> {
            let a = self.enforcer.attribute(generation, 0, id)?;
            Some((a.policy.into(), a.rule?.into(), a.source.into()))
        }
    }

    fn named(policy: &str, rule: &str, source: &str) -> Option<(String, String, String)> {
        Some((policy.into(), rule.into(), source.into()))
    }

    /// rules.json is written as it goes out; it must read back as what
    /// collecting it would have written: the compiler's id table (ids
    /// adopted and not compiled yet, or compiled) and the rules in force,
    /// rules of one name told apart as the table keys them.
    #[test]
    fn the_rules_file_reads_back_as_the_ids_and_rules_in_force() {
        let mut compiler = Compiler::default();
        let adopted = RuleIdTable {
            next: 40,
            policies: vec![(
                tollgate_policy::compile::PolicyKeyOwned {
                    namespace: Some("team".into()),
                    name: "saved".into(),
                },
                tollgate_policy::compile::PolicyIds {
                    default: 39,
                    rules: [("kept".to_owned(), 38)].into(),
                },
            )],
        };
        compiler.adopt_rule_ids(adopted.clone());
        // Before the first compilation: the ids adopted, as read.
        let before = RulesSnapshot {
            ids: compiler.rule_id_snapshot(),
            policies: Vec::new(),
        };
        let read: SavedRules =
            serde_json::from_slice(&serde_json::to_vec(&before).unwrap()).unwrap();
        assert_eq!(read.ids, adopted);
        assert!(read.rules.is_empty());

        let policies = [policy("b", &["x", "y", "x"]), policy("team/a", &["z"])];
        let endpoints = (0..policies.len()).map(|p| (p as u64, vec![p])).collect();
        compiler.compile(&policies, &endpoints).unwrap();
        let snapshot = RulesSnapshot {
            ids: compiler.rule_id_snapshot(),
            policies: policies
                .iter()
                .map(|p| PolicyInForce {
                    ids: Arc::clone(compiler.policy_ids(&p.key).unwrap()),
                    default_action: p.default_action,
                    source: PolicySource::Cluster,
                })
                .collect(),
        };

        let written = serde_json::to_vec(&snapshot).unwrap();
        let read: SavedRules = serde_json::from_slice(&written).unwrap();

        let table = snapshot.ids.table();
        assert_eq!(read.ids, table);
        assert_eq!(table.policies.len(), 2);
        assert!(
            table
                .policies
                .iter()
                .any(|(_, ids)| ids.rules.contains_key("x#2"))
        );
        let rules: Vec<SavedRule> = snapshot
            .policies
            .iter()
            .flat_map(PolicyInForce::rules)
            .map(SavedRule::from)
            .collect();
        assert_eq!(read.rules, rules);
        assert_eq!(rules.len(), 6, "four rules and two defaults");
        assert_eq!(rules[0].policy, "b");
        assert_eq!(rules[0].source, "cluster");
        assert_eq!(rules[3].rule, None, "b's default");
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
    fn each_generation_names_its_rules_and_unchanged_ones_are_shared() {
        let mut naming = Naming::new();
        let none = BTreeSet::new();
        let a = policy("a", &["web"]);
        let first = naming.switch(&[a.clone(), policy("b", &["db"])], &none);
        let (web, db) = (naming.id("a", "web"), naming.id("b", "db"));
        // `a` as it was (its rules the same allocation), `b` renamed its
        // rule, `c` is new.
        let second = naming.switch(&[a, policy("b", &["cache"]), policy("c", &["dns"])], &none);
        let (cache, dns) = (naming.id("b", "cache"), naming.id("c", "dns"));
        assert_eq!(naming.rule(second, web), named("a", "web", "local"));
        assert_eq!(
            naming.enforcer.rule_names.spans(web).len(),
            1,
            "one span serves both generations of the unchanged rule"
        );
        assert_eq!(naming.rule(second, cache), named("b", "cache", "local"));
        assert_eq!(naming.rule(second, dns), named("c", "dns", "local"));
        assert_eq!(naming.rule(second, db), None, "out of force");
        // Records of the generation before still get its names.
        assert_eq!(naming.rule(first, db), named("b", "db", "local"));
        assert_eq!(
            naming.rule(first, cache),
            named("b", "cache", "local"),
            "new to force: named a generation early (a_rule_new_to_force_is_named_in_the_generation_before_too)"
        );
    }

    #[test]
    fn names_of_a_generation_go_with_it() {
        let mut naming = Naming::new();
        let none = BTreeSet::new();
        let first = naming.switch(&[policy("p", &["old"])], &none);
        let old = naming.id("p", "old");
        let mut generations = vec![first];
        for _ in 0..NAMED_GENERATIONS {
            generations.push(naming.switch(&[policy("p", &["new"])], &none));
        }
        assert_eq!(naming.enforcer.attribute(first, 0, old), None);
        assert!(
            naming.enforcer.rule_names.spans(old).is_empty(),
            "no kept generation needs it"
        );
        let new = naming.id("p", "new");
        for &generation in &generations[1..] {
            assert_eq!(naming.rule(generation, new), named("p", "new", "local"));
        }
    }

    /// A set whose change is one entry is rewritten in place before the
    /// generation moves, so a rule new to force can decide under the
    /// generation before; its records must carry its name all the same.
    #[test]
    fn a_rule_new_to_force_is_named_in_the_generation_before_too() {
        let mut naming = Naming::new();
        let none = BTreeSet::new();
        let first = naming.switch(&[policy("p", &["kept", "gone"])], &none);
        let gone = naming.id("p", "gone");
        let second = naming.switch(&[policy("p", &["kept", "added"])], &none);
        let (kept, added) = (naming.id("p", "kept"), naming.id("p", "added"));
        assert_eq!(naming.rule(first, added), named("p", "added", "local"));
        assert_eq!(naming.rule(second, added), named("p", "added", "local"));
        assert_eq!(naming.rule(first, kept), named("p", "kept", "local"));
        assert_eq!(naming.rule(first, gone), named("p", "gone", "local"));
        assert_eq!(
            naming.rule(second, gone),
            None,
            "a rule that left force is not named after"
        );
    }

    #[test]
    fn rules_carry_the_source_of_their_policy() {
        let mut naming = Naming::new();
        let policies = [policy("prod/web", &["https"]), policy("baseline", &["dns"])];
        let first = naming.switch(&policies, &cluster(&["prod/web"]));
        let (https, dns) = (naming.id("prod/web", "https"), naming.id("baseline", "dns"));
        assert_eq!(
            naming.rule(first, https),
            named("prod/web", "https", "cluster")
        );
        assert_eq!(naming.rule(first, dns), named("baseline", "dns", "local"));
        // The local `baseline` gone, a cluster resource of that name in its
        // place, with the same rules: same names, new source.
        let second = naming.switch(&policies, &cluster(&["prod/web", "baseline"]));
        assert_eq!(
            naming.rule(second, dns),
            named("baseline", "dns", "cluster")
        );
        assert_eq!(naming.rule(first, dns), named("baseline", "dns", "local"));
        assert_eq!(
            naming.rule(second, https),
            named("prod/web", "https", "cluster")
        );
        let spans = naming.enforcer.rule_names.spans(dns);
        assert_eq!(spans.len(), 2);
        assert_eq!(spans[0].until, spans[1].from, "the local one's ended");
    }

    #[test]
    fn defaults_name_their_owners_and_sources() {
        let owners = |keys: &[&str]| keys.iter().map(|k| key(k)).collect::<Vec<_>>();
        let generation = GenerationNames::new(
            1,
            1,
            &[
                owners(&["prod/web"]),
                owners(&["baseline"]),
                owners(&["prod/web", "prod/db"]),
                owners(&["baseline", "prod/web", "node"]),
            ],
            &[10, 11, 12, 13],
            &cluster(&["prod/web", "prod/db"]),
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
        let mut naming = Naming::new();
        let generation = naming.switch(
            &[policy("baseline", &["dns"]), policy("prod/web", &["https"])],
            &cluster(&["prod/web"]),
        );
        let (https, dns) = (naming.id("prod/web", "https"), naming.id("baseline", "dns"));
        let enforcer = &naming.enforcer;
        let attribution = |set, rule| enforcer.attribute(generation, set, rule);
        assert_eq!(
            attribution(1, https),
            Some(Attribution {
                policy: "prod/web",
                rule: Some("https"),
                source: "cluster",
            })
        );
        assert_eq!(
            attribution(1, dns),
            Some(Attribution {
                policy: "baseline",
                rule: Some("dns"),
                source: "local",
            })
        );
        // Set 1 is the endpoint of `baseline`, the first policy.
        assert_eq!(
            attribution(1, tollgate_common::RULE_ID_DEFAULT),
            Some(Attribution {
                policy: "baseline",
                rule: None,
                source: "local",
            })
        );
        assert_eq!(
            enforcer.attribute(generation + 1, 1, https),
            None,
            "an unknown generation"
        );
    }
}
