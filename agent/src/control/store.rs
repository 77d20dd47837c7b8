//! The policy set of the node: named policies, its generation, the global
//! mode and per-policy mode overrides. Pure: it plans changes, and the caller
//! commits a plan only once it is in force in the kernel.
//!
//! A policy is local (gRPC, tollgatectl, --policy) or a cluster resource
//! (watched from the Kubernetes API). Each source changes only its own
//! policies: a local apply or delete of a cluster policy's name is refused,
//! and a cluster policy whose name a local one holds is not put in force
//! but reported as a conflict.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use serde::{Deserialize, Serialize};
use tollgate_common::Mode;
use tollgate_proto::v1::{self as api, PolicyChange};

use tollgate_policy::{
    document::{DocumentRef, FieldError, SourcedPolicy, describe},
    model::{Policy, PolicyKey, PolicyMode},
    validate::validate_all,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StoreError {
    #[error("invalid policies:\n{}", describe(.0))]
    Invalid(Vec<FieldError>),
    #[error("the policy set is at generation {actual}, not {expected}")]
    GenerationMismatch { expected: u64, actual: u64 },
    #[error("no policy named {0}")]
    UnknownPolicy(String),
    #[error("{0:?} is not a mode: use \"observe\" or \"enforce\" (or \"inherit\" for a policy)")]
    InvalidMode(String),
    #[error(
        "{policy} is the cluster's {kind} (uid {uid}); change or delete it through the Kubernetes API, or give the local policy another name"
    )]
    ClusterOwned {
        policy: String,
        kind: String,
        uid: String,
    },
}

#[derive(Clone, Debug, Default)]
pub struct PolicyStore {
    generation: u64,
    policies: BTreeMap<PolicyKey, Stored>,
    global_mode: Option<Mode>,
    overrides: BTreeMap<PolicyKey, Mode>,
}

/// A policy as applied and as compiled. The document is kept encoded
/// (protobuf): at 100k rules the decoded form is ten times the size, and it
/// is only read to answer `GetPolicies` and to save the set.
#[derive(Clone, Debug, PartialEq)]
struct Stored {
    document: prost::bytes::Bytes,
    policy: Policy,
    /// None: a local policy.
    origin: Option<ClusterOrigin>,
}

/// Which version of which cluster resource a policy is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterOrigin {
    /// `EgressPolicy` or `ClusterEgressPolicy`.
    pub kind: String,
    pub uid: String,
    /// The resource's `metadata.generation`.
    pub generation: i64,
}

/// A cluster resource's policy, valid on its own, for [`PolicyStore::plan_cluster`].
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterDocument {
    pub document: api::EgressPolicy,
    pub origin: ClusterOrigin,
}

/// A cluster policy that a local policy of the same name keeps out of force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub policy: PolicyKey,
    pub origin: ClusterOrigin,
}

impl Stored {
    fn document(&self) -> api::EgressPolicy {
        api::EgressPolicy::decode(self.document.clone()).expect("the store encoded it")
    }
}

/// A change worked out against the current set, not yet made.
#[derive(Debug)]
pub struct Plan {
    pub changes: Vec<PolicyChange>,
    next: BTreeMap<PolicyKey, Stored>,
}

impl Plan {
    pub fn changes_anything(&self) -> bool {
        self.changes.iter().any(|c| c.change != "unchanged")
    }

    /// The policies the plan creates, changes or deletes.
    pub fn changed_keys(&self) -> Vec<PolicyKey> {
        self.changes
            .iter()
            .filter(|c| c.change != "unchanged")
            .map(|c| parse_key(&c.policy))
            .collect()
    }

    /// The plan's policies that are cluster resources.
    pub fn cluster_policies(&self) -> BTreeSet<PolicyKey> {
        cluster_keys(&self.next)
    }
}

fn cluster_keys(policies: &BTreeMap<PolicyKey, Stored>) -> BTreeSet<PolicyKey> {
    policies
        .iter()
        .filter(|(_, stored)| stored.origin.is_some())
        .map(|(key, _)| key.clone())
        .collect()
}

/// The saved policy set. `Documents` is what is read back; saving writes
/// [`StoredDocuments`] in its place, decoding one document at a time.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PersistedState<Documents = Vec<api::EgressPolicy>> {
    pub generation: u64,
    pub global_mode: Option<String>,
    #[serde(default)]
    pub policy_modes: BTreeMap<String, String>,
    #[serde(default)]
    pub policies: Documents,
    /// The cluster resources among `policies`, by policy name; the others
    /// are local.
    #[serde(default)]
    pub cluster: BTreeMap<String, ClusterOrigin>,
}

/// One change to the saved state, as the state journal records it: the
/// new values of what changed (the generation, the modes, each policy put
/// or deleted), never a difference to the value before, so that replaying
/// a record on a state that already has it changes nothing. `Puts` is what
/// is read back; saving writes [`StoredPuts`] in its place, decoding one
/// document at a time.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StateDelta<Puts = Vec<PutPolicy>> {
    pub generation: u64,
    pub global_mode: Option<String>,
    #[serde(default)]
    pub policy_modes: BTreeMap<String, String>,
    /// Policies created or changed, as they are now.
    #[serde(default)]
    pub put: Puts,
    /// Policies deleted, by name.
    #[serde(default)]
    pub deleted: Vec<String>,
}

/// A policy as a [`StateDelta`] puts it.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PutPolicy {
    pub document: api::EgressPolicy,
    /// None: a local policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterOrigin>,
}

impl PersistedState {
    /// The state with `deltas` made, in order.
    pub fn replay(mut self, deltas: impl IntoIterator<Item = StateDelta>) -> Self {
        let mut documents: BTreeMap<PolicyKey, api::EgressPolicy> =
            std::mem::take(&mut self.policies)
                .into_iter()
                .map(|document| (key_of(&document), document))
                .collect();
        for delta in deltas {
            self.generation = delta.generation;
            self.global_mode = delta.global_mode;
            self.policy_modes = delta.policy_modes;
            for name in delta.deleted {
                documents.remove(&parse_key(&name));
                self.cluster.remove(&name);
            }
            for put in delta.put {
                let key = key_of(&put.document);
                match put.cluster {
                    Some(origin) => self.cluster.insert(key.to_string(), origin),
                    None => self.cluster.remove(&key.to_string()),
                };
                documents.insert(key, put.document);
            }
        }
        self.policies = documents.into_values().collect();
        self
    }
}

/// The store's documents, serialized as a list without a decoded copy of
/// them all.
pub struct StoredDocuments<'a>(&'a BTreeMap<PolicyKey, Stored>);

impl Serialize for StoredDocuments<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.values().map(Stored::document))
    }
}

/// The store's policies a change put, serialized as [`PutPolicy`]s: an
/// apply of 100k rules decoded all its documents at once only to write
/// them, and that was its peak (64 MB of small allocations).
pub struct StoredPuts<'a>(Vec<&'a Stored>);

impl Serialize for StoredPuts<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|stored| PutPolicy {
            document: stored.document(),
            cluster: stored.origin.clone(),
        }))
    }
}

impl PolicyStore {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The global mode, if one was ever set.
    pub fn global_mode(&self) -> Option<Mode> {
        self.global_mode
    }

    pub fn documents(&self) -> Vec<api::EgressPolicy> {
        self.policies.values().map(Stored::document).collect()
    }

    /// Where each policy came from, in the order of [`Self::documents`].
    pub fn sources(&self) -> Vec<api::PolicySource> {
        self.policies
            .values()
            .map(|stored| match &stored.origin {
                None => api::PolicySource {
                    source: "local".into(),
                    ..Default::default()
                },
                Some(origin) => api::PolicySource {
                    source: "cluster".into(),
                    uid: origin.uid.clone(),
                    generation: origin.generation,
                },
            })
            .collect()
    }

    /// The set's policies that are cluster resources.
    pub fn cluster_policies(&self) -> BTreeSet<PolicyKey> {
        cluster_keys(&self.policies)
    }

    /// The cluster resources in the set, with the version of each.
    pub fn cluster_origins(&self) -> impl Iterator<Item = (&PolicyKey, &ClusterOrigin)> {
        self.policies
            .iter()
            .filter_map(|(key, stored)| Some((key, stored.origin.as_ref()?)))
    }

    /// The cluster resources' policies in the set, as they were put in force.
    pub fn cluster_documents(&self) -> Vec<ClusterDocument> {
        self.policies
            .values()
            .filter_map(|stored| {
                Some(ClusterDocument {
                    document: stored.document(),
                    origin: stored.origin.clone()?,
                })
            })
            .collect()
    }

    /// The local and cluster policy counts.
    pub fn counts_by_source(&self) -> (usize, usize) {
        let cluster = self.cluster_origins().count();
        (self.policies.len() - cluster, cluster)
    }

    /// Validates `documents` and works out what applying them would change.
    /// A document equal to the one in force under its name is not
    /// validated again (it was when it was applied); the others are, all of
    /// them, with every error.
    pub fn plan_apply(
        &self,
        documents: Vec<api::EgressPolicy>,
        expected: Option<u64>,
    ) -> Result<Plan, StoreError> {
        self.check_generation(expected)?;
        let keys: Vec<PolicyKey> = documents.iter().map(key_of).collect();
        // A name given twice is refused by validation, which sees them all.
        let distinct = keys.iter().collect::<BTreeSet<_>>().len() == keys.len();
        let mut next = self.policies.clone();
        let mut changes = Vec::with_capacity(documents.len());
        let mut sourced: Vec<SourcedPolicy> = Vec::new();
        let mut encodings: Vec<prost::bytes::Bytes> = Vec::new();
        for (i, (document, key)) in documents.into_iter().zip(keys).enumerate() {
            let encoded: prost::bytes::Bytes = document.encode_to_vec().into();
            let old = self.policies.get(&key);
            // Decoded, not only compared encoded: label maps encode in any
            // order, though to the same length, so only documents of one
            // length are decoded to compare.
            let unchanged = distinct
                && old.is_some_and(|old| {
                    old.origin.is_none()
                        && (old.document == encoded
                            || (old.document.len() == encoded.len() && old.document() == document))
                });
            if unchanged {
                changes.push(PolicyChange {
                    policy: key.to_string(),
                    change: "unchanged".into(),
                });
                continue;
            }
            changes.push(PolicyChange {
                policy: key.to_string(),
                change: if old.is_some() {
                    "configured"
                } else {
                    "created"
                }
                .into(),
            });
            sourced.push(SourcedPolicy {
                document: DocumentRef {
                    source: "request".into(),
                    index: i + 1,
                },
                policy: document,
            });
            encodings.push(encoded);
        }
        let validated = validate_all(&sourced).map_err(StoreError::Invalid)?;
        drop(sourced);
        for policy in &validated {
            self.check_local(&policy.key)?;
        }
        for (encoded, policy) in encodings.into_iter().zip(validated) {
            next.insert(
                policy.key.clone(),
                Stored {
                    document: encoded,
                    policy,
                    origin: None,
                },
            );
        }
        Ok(Plan { changes, next })
    }

    /// Works out making `desired` the cluster's policies in the set: the
    /// local ones stay, cluster ones not in `desired` go. A desired policy
    /// whose name a local policy holds is left out and returned as a
    /// conflict. Documents of an unchanged version are not validated again.
    pub fn plan_cluster(
        &self,
        desired: Vec<ClusterDocument>,
    ) -> Result<(Plan, Vec<Conflict>), StoreError> {
        let mut next: BTreeMap<PolicyKey, Stored> = self
            .policies
            .iter()
            .filter(|(_, stored)| stored.origin.is_none())
            .map(|(key, stored)| (key.clone(), stored.clone()))
            .collect();
        let mut conflicts = Vec::new();
        let mut changed = Vec::new();
        for item in desired {
            let key = key_of(&item.document);
            if next.contains_key(&key) {
                conflicts.push(Conflict {
                    policy: key,
                    origin: item.origin,
                });
                continue;
            }
            match self.policies.get(&key) {
                Some(old) if old.origin.as_ref() == Some(&item.origin) => {
                    next.insert(key, old.clone());
                }
                _ => changed.push(item),
            }
        }
        let sourced: Vec<SourcedPolicy> = changed
            .iter()
            .enumerate()
            .map(|(i, item)| SourcedPolicy {
                document: DocumentRef {
                    source: format!("{} {}", item.origin.kind, key_of(&item.document)),
                    index: i + 1,
                },
                policy: item.document.clone(),
            })
            .collect();
        let validated = validate_all(&sourced).map_err(StoreError::Invalid)?;
        for (item, policy) in changed.into_iter().zip(validated) {
            next.insert(
                policy.key.clone(),
                Stored {
                    document: item.document.encode_to_vec().into(),
                    policy,
                    origin: Some(item.origin),
                },
            );
        }
        let mut changes = Vec::new();
        for (key, old) in self.policies.iter().filter(|(_, s)| s.origin.is_some()) {
            let change = match next.get(key) {
                None => "deleted",
                Some(new) if new.origin == old.origin => "unchanged",
                Some(_) => "configured",
            };
            changes.push(PolicyChange {
                policy: key.to_string(),
                change: change.into(),
            });
        }
        for key in next.keys().filter(|key| !self.policies.contains_key(*key)) {
            changes.push(PolicyChange {
                policy: key.to_string(),
                change: "created".into(),
            });
        }
        Ok((Plan { changes, next }, conflicts))
    }

    /// Works out deleting the named policies; every name must exist.
    pub fn plan_delete(&self, names: &[String], expected: Option<u64>) -> Result<Plan, StoreError> {
        self.check_generation(expected)?;
        let mut next = self.policies.clone();
        let mut changes = Vec::new();
        for name in names {
            let key = parse_key(name);
            // A name given twice is deleted once.
            if changes
                .iter()
                .any(|c: &PolicyChange| c.policy == key.to_string())
            {
                continue;
            }
            self.check_local(&key)?;
            if next.remove(&key).is_none() {
                return Err(StoreError::UnknownPolicy(name.clone()));
            }
            changes.push(PolicyChange {
                policy: key.to_string(),
                change: "deleted".into(),
            });
        }
        Ok(Plan { changes, next })
    }

    /// The policies of `plan` as the compiler must see them, with mode
    /// overrides applied.
    pub fn effective_policies_of(&self, plan: &Plan) -> Vec<Policy> {
        self.effective(&plan.next, &self.overrides)
    }

    /// The policies in force, with mode overrides applied.
    pub fn effective_policies(&self) -> Vec<Policy> {
        self.effective(&self.policies, &self.overrides)
    }

    fn effective(
        &self,
        policies: &BTreeMap<PolicyKey, Stored>,
        overrides: &BTreeMap<PolicyKey, Mode>,
    ) -> Vec<Policy> {
        policies
            .iter()
            .map(|(key, stored)| {
                let mut policy = stored.policy.clone();
                if let Some(mode) = overrides.get(key) {
                    policy.mode = policy_mode(*mode);
                }
                policy
            })
            .collect()
    }

    /// Makes `plan` the current set. A plan that changes something moves the
    /// generation on; overrides of deleted policies go with them.
    pub fn commit(&mut self, plan: Plan) {
        if plan.changes_anything() {
            self.generation += 1;
        }
        self.policies = plan.next;
        self.overrides
            .retain(|key, _| self.policies.contains_key(key));
    }

    /// The policies as they would be with `mode` set for `policy` (or
    /// globally when `policy` is empty), without changing the store.
    pub fn plan_mode(&self, mode: &str, policy: &str) -> Result<ModePlan, StoreError> {
        let parsed = match mode {
            "observe" => Some(Mode::Observe),
            "enforce" => Some(Mode::Enforce),
            "inherit" if !policy.is_empty() => None,
            other => return Err(StoreError::InvalidMode(other.into())),
        };
        if policy.is_empty() {
            return Ok(ModePlan::Global(
                parsed.expect("inherit is refused without a policy"),
            ));
        }
        let key = parse_key(policy);
        if !self.policies.contains_key(&key) {
            return Err(StoreError::UnknownPolicy(policy.into()));
        }
        let mut overrides = self.overrides.clone();
        match parsed {
            Some(mode) => overrides.insert(key.clone(), mode),
            None => overrides.remove(&key),
        };
        Ok(ModePlan::Policy {
            policies: self.effective(&self.policies, &overrides),
            overrides,
        })
    }

    pub fn commit_mode(&mut self, plan: ModePlan) {
        match plan {
            ModePlan::Global(mode) => self.global_mode = Some(mode),
            ModePlan::Policy { overrides, .. } => self.overrides = overrides,
        }
    }

    pub fn mode_settings(&self) -> api::ModeSettings {
        api::ModeSettings {
            global: mode_name(self.global_mode.unwrap_or(Mode::Observe)).into(),
            policy_overrides: self.policy_modes().into_iter().collect(),
        }
    }

    /// Whether `key` is a cluster resource's policy.
    pub fn is_cluster_owned(&self, key: &PolicyKey) -> bool {
        self.policies.get(key).is_some_and(|s| s.origin.is_some())
    }

    /// A local change may not touch a cluster resource's policy.
    fn check_local(&self, key: &PolicyKey) -> Result<(), StoreError> {
        match self.policies.get(key).and_then(|s| s.origin.as_ref()) {
            Some(origin) => Err(StoreError::ClusterOwned {
                policy: key.to_string(),
                kind: origin.kind.clone(),
                uid: origin.uid.clone(),
            }),
            None => Ok(()),
        }
    }

    fn check_generation(&self, expected: Option<u64>) -> Result<(), StoreError> {
        match expected {
            Some(expected) if expected != self.generation => Err(StoreError::GenerationMismatch {
                expected,
                actual: self.generation,
            }),
            _ => Ok(()),
        }
    }

    /// The per-policy mode overrides, by policy name.
    fn policy_modes(&self) -> BTreeMap<String, String> {
        self.overrides
            .iter()
            .map(|(k, m)| (k.to_string(), mode_name(*m).into()))
            .collect()
    }

    /// What the journal records of a change to the `changed` policies (and
    /// to the generation and modes), made already.
    pub fn delta(&self, changed: &[PolicyKey]) -> StateDelta<StoredPuts<'_>> {
        let mut delta = StateDelta {
            generation: self.generation,
            global_mode: self.global_mode.map(|m| mode_name(m).into()),
            policy_modes: self.policy_modes(),
            put: StoredPuts(Vec::new()),
            deleted: Vec::new(),
        };
        for key in changed {
            match self.policies.get(key) {
                Some(stored) => delta.put.0.push(stored),
                None => delta.deleted.push(key.to_string()),
            }
        }
        delta
    }

    pub fn to_persisted(&self) -> PersistedState<StoredDocuments<'_>> {
        PersistedState {
            generation: self.generation,
            global_mode: self.global_mode.map(|m| mode_name(m).into()),
            policy_modes: self.policy_modes(),
            policies: StoredDocuments(&self.policies),
            cluster: self
                .cluster_origins()
                .map(|(key, origin)| (key.to_string(), origin.clone()))
                .collect(),
        }
    }

    /// Rebuilds the store from what was persisted; the documents are
    /// validated again, as any other input.
    pub fn from_persisted(state: PersistedState) -> Result<Self, StoreError> {
        let mut store = Self::default();
        let plan = store.plan_apply(state.policies, None)?;
        store.policies = plan.next;
        for (name, origin) in state.cluster {
            let stored = store
                .policies
                .get_mut(&parse_key(&name))
                .ok_or(StoreError::UnknownPolicy(name))?;
            stored.origin = Some(origin);
        }
        store.generation = state.generation;
        store.global_mode = match state.global_mode.as_deref() {
            None => None,
            Some("observe") => Some(Mode::Observe),
            Some("enforce") => Some(Mode::Enforce),
            Some(other) => return Err(StoreError::InvalidMode(other.into())),
        };
        for (name, mode) in state.policy_modes {
            match store.plan_mode(&mode, &name)? {
                plan @ ModePlan::Policy { .. } => store.commit_mode(plan),
                ModePlan::Global(_) => return Err(StoreError::UnknownPolicy(name)),
            }
        }
        Ok(store)
    }
}

pub enum ModePlan {
    Global(Mode),
    Policy {
        policies: Vec<Policy>,
        overrides: BTreeMap<PolicyKey, Mode>,
    },
}

/// A document's policy key, as validation derives it: `metadata.namespace`
/// (none when empty) and `metadata.name`.
pub fn key_of(document: &api::EgressPolicy) -> PolicyKey {
    let metadata = document.metadata.clone().unwrap_or_default();
    PolicyKey {
        namespace: (!metadata.namespace.is_empty()).then_some(metadata.namespace),
        name: metadata.name,
    }
}

/// "namespace/name" or "name".
pub fn parse_key(name: &str) -> PolicyKey {
    match name.split_once('/') {
        Some((namespace, name)) => PolicyKey {
            namespace: Some(namespace.into()),
            name: name.into(),
        },
        None => PolicyKey {
            namespace: None,
            name: name.into(),
        },
    }
}

pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Observe => "observe",
        Mode::Enforce => "enforce",
    }
}

fn policy_mode(mode: Mode) -> PolicyMode {
    match mode {
        Mode::Observe => PolicyMode::Observe,
        Mode::Enforce => PolicyMode::Enforce,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use tollgate_policy::document::parse_documents;

    fn docs(names: &[&str]) -> Vec<api::EgressPolicy> {
        let yaml: String = names
            .iter()
            .map(|n| format!("---\napiVersion: policy.tollgate.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: {n}}}\nspec: {{cgroupSelector: {{paths: [/x]}}}}\n"))
            .collect();
        parse_documents("t", &yaml)
            .unwrap()
            .into_iter()
            .map(|s| s.policy)
            .collect()
    }

    fn kinds(plan: &Plan) -> Vec<(String, String)> {
        plan.changes
            .iter()
            .map(|c| (c.policy.clone(), c.change.clone()))
            .collect()
    }

    #[test]
    fn a_document_with_labels_applied_again_is_unchanged() {
        let labelled = || {
            let mut docs = docs(&["a"]);
            let metadata = docs[0].metadata.as_mut().unwrap();
            for i in 0..32 {
                metadata.labels.insert(format!("label-{i}"), i.to_string());
            }
            docs
        };
        let mut store = PolicyStore::default();
        let plan = store.plan_apply(labelled(), None).unwrap();
        store.commit(plan);
        // The stored encoding may list the labels in another order.
        for _ in 0..8 {
            let plan = store.plan_apply(labelled(), None).unwrap();
            assert!(!plan.changes_anything(), "{:?}", kinds(&plan));
        }
        assert_eq!(store.documents(), labelled());
    }

    #[test]
    fn apply_reports_created_configured_unchanged_and_moves_the_generation_once() {
        let mut store = PolicyStore::default();
        let plan = store.plan_apply(docs(&["a", "b"]), Some(0)).unwrap();
        assert_eq!(
            kinds(&plan),
            [
                ("a".into(), "created".into()),
                ("b".into(), "created".into())
            ]
        );
        store.commit(plan);
        assert_eq!(store.generation(), 1);

        let mut changed = docs(&["a", "b"]);
        changed[1].spec.as_mut().unwrap().mode = "observe".into();
        let plan = store.plan_apply(changed, None).unwrap();
        assert_eq!(
            kinds(&plan),
            [
                ("a".into(), "unchanged".into()),
                ("b".into(), "configured".into())
            ]
        );
        store.commit(plan);
        assert_eq!(store.generation(), 2);

        let plan = store.plan_apply(docs(&["a"]), None).unwrap();
        assert!(!plan.changes_anything());
        store.commit(plan);
        assert_eq!(
            store.generation(),
            2,
            "an apply that changes nothing keeps the generation"
        );
    }

    #[test]
    fn stale_generations_and_invalid_documents_are_refused_whole() {
        let mut store = PolicyStore::default();
        store.commit(store.plan_apply(docs(&["a"]), None).unwrap());
        assert_eq!(
            store.plan_apply(docs(&["b"]), Some(0)).unwrap_err(),
            StoreError::GenerationMismatch {
                expected: 0,
                actual: 1
            }
        );
        let mut bad = docs(&["b", "c"]);
        bad[1].spec.as_mut().unwrap().mode = "block".into();
        let StoreError::Invalid(errors) = store.plan_apply(bad, None).unwrap_err() else {
            panic!()
        };
        assert_eq!(errors.len(), 1);
        assert_eq!(
            (errors[0].document.index, errors[0].path.as_str()),
            (2, "spec.mode")
        );
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn only_changed_documents_are_validated_and_errors_keep_their_request_index() {
        let mut store = PolicyStore::default();
        store.commit(store.plan_apply(docs(&["a", "b", "c"]), None).unwrap());
        let mut changed = docs(&["a", "b", "c"]);
        changed[2].spec.as_mut().unwrap().mode = "block".into();
        let StoreError::Invalid(errors) = store.plan_apply(changed, None).unwrap_err() else {
            panic!()
        };
        assert_eq!(
            errors
                .iter()
                .map(|e| (e.document.index, e.path.as_str()))
                .collect::<Vec<_>>(),
            [(3, "spec.mode")]
        );
        // Unchanged documents keep the policy validated when they were
        // applied: the very same rules.
        let before = store.effective_policies();
        let plan = store.plan_apply(docs(&["a", "b", "c"]), None).unwrap();
        assert!(!plan.changes_anything());
        store.commit(plan);
        for (old, new) in before.iter().zip(store.effective_policies()) {
            assert!(Arc::ptr_eq(&old.rules, &new.rules), "{}", old.key);
        }
        // A name given twice is still refused, unchanged or not.
        let StoreError::Invalid(errors) = store.plan_apply(docs(&["a", "a"]), None).unwrap_err()
        else {
            panic!()
        };
        assert_eq!(errors[0].document.index, 2);
    }

    #[test]
    fn delete_needs_existing_names() {
        let mut store = PolicyStore::default();
        store.commit(store.plan_apply(docs(&["a", "b"]), None).unwrap());
        assert_eq!(
            store.plan_delete(&["zzz".into()], None).unwrap_err(),
            StoreError::UnknownPolicy("zzz".into())
        );
        assert_eq!(
            kinds(&store.plan_delete(&["b".into(), "b".into()], None).unwrap()),
            [("b".into(), "deleted".into())]
        );
        let plan = store.plan_delete(&["a".into()], Some(1)).unwrap();
        assert_eq!(kinds(&plan), [("a".into(), "deleted".into())]);
        store.commit(plan);
        assert_eq!((store.len(), store.generation()), (1, 2));
    }

    #[test]
    fn mode_overrides_apply_to_the_effective_policies_and_go_with_their_policy() {
        let mut store = PolicyStore::default();
        store.commit(store.plan_apply(docs(&["a"]), None).unwrap());
        assert!(matches!(
            store.plan_mode("loud", ""),
            Err(StoreError::InvalidMode(_))
        ));
        assert!(matches!(
            store.plan_mode("inherit", ""),
            Err(StoreError::InvalidMode(_))
        ));
        assert!(matches!(
            store.plan_mode("observe", "nope"),
            Err(StoreError::UnknownPolicy(_))
        ));
        let plan = store.plan_mode("observe", "a").unwrap();
        store.commit_mode(plan);
        assert_eq!(store.effective_policies()[0].mode, PolicyMode::Observe);
        assert_eq!(store.mode_settings().policy_overrides["a"], "observe");
        store.commit_mode(store.plan_mode("enforce", "").unwrap());
        assert_eq!(store.mode_settings().global, "enforce");
        store.commit(store.plan_delete(&["a".into()], None).unwrap());
        assert!(store.mode_settings().policy_overrides.is_empty());
    }

    #[test]
    fn persisted_state_round_trips() {
        let mut store = PolicyStore::default();
        store.commit(store.plan_apply(docs(&["a", "b"]), None).unwrap());
        store.commit_mode(store.plan_mode("enforce", "").unwrap());
        store.commit_mode(store.plan_mode("observe", "b").unwrap());
        let json = serde_json::to_string(&store.to_persisted()).unwrap();
        let back = PolicyStore::from_persisted(serde_json::from_str(&json).unwrap()).unwrap();
        assert_eq!(back.generation(), 1);
        assert_eq!(back.documents(), store.documents());
        assert_eq!(back.mode_settings(), store.mode_settings());
    }
}
