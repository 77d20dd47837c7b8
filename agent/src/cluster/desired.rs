//! What the cluster asks of this node: for every policy resource, the last
//! version that passed validation. Pure: the watch feeds it resources, and
//! the controller puts [`ClusterPolicies::desired`] in force.
//!
//! A bad change never opens anything: an update that fails validation
//! leaves the resource's last valid version in force (a resource that was
//! never valid is not in force), and only that resource is held back.

use std::collections::BTreeMap;

use serde_json::json;
use tollgate_policy::{
    document::{DocumentRef, FieldError, from_json},
    model::PolicyKey,
    validate::{API_VERSION, validate_resource},
};

use super::{
    report::{NodeReport, PolicyReport},
    resources::{PolicyKind, PolicyResource, PolicyStatus},
    status::Acceptance,
};
use crate::control::store::{self, ClusterDocument, ClusterOrigin};

/// A policy resource as read from the API: which version of what it is, and
/// its document.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub kind: &'static str,
    pub key: PolicyKey,
    pub uid: String,
    pub generation: i64,
    /// The resource as a policy document (`apiVersion`, `kind`, `metadata`,
    /// `spec`), not yet read into the policy model.
    pub document: serde_json::Value,
    /// The status it carries.
    pub status: Option<PolicyStatus>,
}

impl<K: PolicyKind> From<PolicyResource<K>> for Resource {
    fn from(resource: PolicyResource<K>) -> Self {
        let status = resource.status;
        let metadata = resource.metadata;
        let name = metadata.name.unwrap_or_default();
        let namespace = metadata.namespace.filter(|n| !n.is_empty());
        let document = json!({
            "apiVersion": API_VERSION,
            "kind": K::KIND,
            "metadata": {
                "name": name,
                "namespace": namespace.clone().unwrap_or_default(),
                "labels": metadata.labels.unwrap_or_default(),
            },
            "spec": resource.spec,
        });
        Self {
            kind: K::KIND,
            key: PolicyKey { namespace, name },
            uid: metadata.uid.unwrap_or_default(),
            // The API server sets it on every resource; 0 only in a test.
            generation: metadata.generation.unwrap_or_default(),
            document,
            status,
        }
    }
}

/// Why a resource's newest version is not in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub generation: i64,
    pub errors: Vec<FieldError>,
}

impl Rejection {
    /// The errors as the CLI prints them: `path: message`, one per line.
    pub fn message(&self) -> String {
        self.errors
            .iter()
            .map(|e| {
                if e.path.is_empty() {
                    e.message.clone()
                } else {
                    format!("{}: {}", e.path, e.message)
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Entry {
    kind: &'static str,
    uid: String,
    /// The newest generation seen.
    observed: i64,
    /// Set while the newest generation is invalid.
    rejection: Option<Rejection>,
    /// The last valid version: what the node puts in force.
    valid: Option<ClusterDocument>,
}

/// The cluster's policies as this node knows them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterPolicies {
    entries: BTreeMap<PolicyKey, Entry>,
}

impl ClusterPolicies {
    /// Starts from the cluster policies the node had in force (its saved
    /// set), so that their last valid versions survive a restart.
    pub fn restored(in_force: Vec<ClusterDocument>) -> Self {
        let entries = in_force
            .into_iter()
            .map(|document| {
                let key = key_of(&document);
                let entry = Entry {
                    kind: kind_name(&document.origin.kind),
                    uid: document.origin.uid.clone(),
                    observed: document.origin.generation,
                    rejection: None,
                    valid: Some(document),
                };
                (key, entry)
            })
            .collect();
        Self { entries }
    }

    /// Takes a created or updated resource. Returns whether what the node
    /// should enforce changed.
    pub fn apply(&mut self, resource: Resource) -> bool {
        let key = resource.key.clone();
        let before = self.entries.get(&key).and_then(|e| e.valid.clone());
        let previous = self.entries.remove(&key);
        // A resource deleted and made again is another resource: the old
        // one's valid version does not stand in for the new one.
        let previous = previous.filter(|e| e.uid == resource.uid && e.kind == resource.kind);
        let origin = ClusterOrigin {
            kind: resource.kind.into(),
            uid: resource.uid.clone(),
            generation: resource.generation,
        };
        let entry = match read(&resource) {
            Ok(document) => Entry {
                kind: resource.kind,
                uid: resource.uid,
                observed: resource.generation,
                rejection: None,
                valid: Some(ClusterDocument { document, origin }),
            },
            Err(errors) => Entry {
                kind: resource.kind,
                uid: resource.uid,
                observed: resource.generation,
                rejection: Some(Rejection {
                    generation: resource.generation,
                    errors,
                }),
                valid: previous.and_then(|e| e.valid),
            },
        };
        let changed = entry.valid != before;
        self.entries.insert(key, entry);
        changed
    }

    /// Takes a deleted resource.
    pub fn delete(&mut self, kind: &str, key: &PolicyKey) -> bool {
        match self.entries.get(key) {
            Some(entry) if entry.kind == kind => {
                let was_in_force = entry.valid.is_some();
                self.entries.remove(key);
                was_in_force
            }
            _ => false,
        }
    }

    /// Takes a complete list of one kind: resources of that kind missing
    /// from it were deleted (while the watch was down, or the agent).
    pub fn relist(&mut self, kind: &str, resources: Vec<Resource>) -> bool {
        let listed: std::collections::BTreeSet<PolicyKey> =
            resources.iter().map(|r| r.key.clone()).collect();
        let gone: Vec<PolicyKey> = self
            .entries
            .iter()
            .filter(|(key, entry)| entry.kind == kind && !listed.contains(key))
            .map(|(key, _)| key.clone())
            .collect();
        let mut changed = false;
        for key in gone {
            changed |= self.delete(kind, &key);
        }
        for resource in resources {
            changed |= self.apply(resource);
        }
        changed
    }

    /// What the node should enforce: every resource's last valid version.
    pub fn desired(&self) -> Vec<ClusterDocument> {
        self.entries
            .values()
            .filter_map(|entry| entry.valid.clone())
            .collect()
    }

    /// Resources whose newest version is not valid, with why and the
    /// generation in force instead (if any).
    pub fn rejections(&self) -> impl Iterator<Item = (&PolicyKey, &Rejection, Option<i64>)> {
        self.entries.iter().filter_map(|(key, entry)| {
            let rejection = entry.rejection.as_ref()?;
            Some((
                key,
                rejection,
                entry.valid.as_ref().map(|v| v.origin.generation),
            ))
        })
    }
}

impl ClusterPolicies {
    /// What validation says of the resource `key` (`uid`) at `generation`.
    pub fn acceptance(&self, key: &PolicyKey, uid: &str, generation: i64) -> Acceptance {
        let entry = self.entries.get(key).filter(|e| e.uid == uid);
        let valid = entry.and_then(|e| e.valid.as_ref());
        Acceptance {
            uid: uid.into(),
            generation,
            valid_generation: valid.map(|v| v.origin.generation),
            rules: valid.map(|v| {
                v.document
                    .spec
                    .as_ref()
                    .map_or(0, |spec| spec.egress.len() as u32)
            }),
            refused: entry
                .and_then(|e| e.rejection.as_ref())
                .map(Rejection::message),
        }
    }

    /// This node's report: for each resource the newest generation seen,
    /// the one `in_force` in the kernel, and why the newest is not (its
    /// rejection, or what `node_errors` says of it).
    pub fn report(
        &self,
        node: &str,
        synced: bool,
        in_force: &BTreeMap<PolicyKey, i64>,
        node_errors: &BTreeMap<PolicyKey, String>,
    ) -> NodeReport {
        let policies =
            self.entries
                .iter()
                .map(|(key, entry)| PolicyReport {
                    kind: entry.kind.into(),
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                    uid: entry.uid.clone(),
                    observed_generation: entry.observed,
                    in_force: in_force.get(key).copied(),
                    error: node_errors.get(key).cloned().or_else(|| {
                        entry.rejection.as_ref().map(|r| {
                            format!("generation {} is invalid: {}", r.generation, r.message())
                        })
                    }),
                })
                .collect();
        NodeReport {
            node: node.into(),
            synced,
            policies,
        }
    }
}

/// The policy key of a resource's document.
pub fn key_of(document: &ClusterDocument) -> PolicyKey {
    store::key_of(&document.document)
}

/// Reads and validates one resource on its own.
fn read(resource: &Resource) -> Result<tollgate_proto::v1::EgressPolicy, Vec<FieldError>> {
    let document = DocumentRef {
        source: format!("{} {}", resource.kind, resource.key),
        index: 1,
    };
    let sourced = from_json(document, resource.document.clone()).map_err(|e| vec![e])?;
    validate_resource(&sourced)?;
    Ok(sourced.policy)
}

/// The kind names are the resources' own; a saved name is one of them.
fn kind_name(kind: &str) -> &'static str {
    use super::resources::{ClusterScoped, Namespaced};
    if kind == ClusterScoped::KIND {
        ClusterScoped::KIND
    } else {
        Namespaced::KIND
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(
        namespace: Option<&str>,
        name: &str,
        uid: &str,
        generation: i64,
        spec: serde_json::Value,
    ) -> Resource {
        let kind = if namespace.is_some() {
            "EgressPolicy"
        } else {
            "ClusterEgressPolicy"
        };
        Resource {
            kind,
            key: PolicyKey {
                namespace: namespace.map(Into::into),
                name: name.into(),
            },
            uid: uid.into(),
            generation,
            status: None,
            document: json!({
                "apiVersion": API_VERSION, "kind": kind,
                "metadata": {"name": name, "namespace": namespace.unwrap_or_default()},
                "spec": spec,
            }),
        }
    }

    fn allow(cidr: &str) -> serde_json::Value {
        json!({"podSelector": {}, "egress": [{"to": [{"cidr": cidr}]}]})
    }

    fn in_force(policies: &ClusterPolicies) -> Vec<(String, i64)> {
        policies
            .desired()
            .iter()
            .map(|d| (key_of(d).to_string(), d.origin.generation))
            .collect()
    }

    #[test]
    fn a_bad_update_keeps_the_last_valid_version_and_says_why() {
        let mut policies = ClusterPolicies::default();
        assert!(policies.apply(resource(Some("team"), "a", "u1", 1, allow("10.0.0.0/8"))));
        assert!(!policies.apply(resource(Some("team"), "a", "u1", 2, allow("10.0.0.0/33"))));
        assert_eq!(in_force(&policies), [("team/a".to_owned(), 1)]);
        let rejections: Vec<_> = policies
            .rejections()
            .map(|(key, rejection, kept)| {
                (
                    key.to_string(),
                    rejection.generation,
                    rejection.message(),
                    kept,
                )
            })
            .collect();
        assert_eq!(
            rejections,
            [(
                "team/a".to_owned(),
                2,
                "spec.egress[0].to[0].cidr: \"10.0.0.0/33\" is not a valid prefix".to_owned(),
                Some(1)
            )]
        );
        // A fix clears the rejection.
        assert!(policies.apply(resource(Some("team"), "a", "u1", 3, allow("10.1.0.0/16"))));
        assert_eq!(in_force(&policies), [("team/a".to_owned(), 3)]);
        assert_eq!(policies.rejections().count(), 0);
    }

    #[test]
    fn a_never_valid_resource_is_not_in_force_and_holds_no_other_back() {
        let mut policies = ClusterPolicies::default();
        let unknown_field = json!({"podSelector": {}, "egress": [{"acton": "deny"}]});
        assert!(!policies.apply(resource(None, "bad", "u1", 1, unknown_field)));
        assert!(policies.apply(resource(None, "good", "u2", 1, allow("10.0.0.0/8"))));
        assert_eq!(in_force(&policies), [("good".to_owned(), 1)]);
        let (_, rejection, kept) = policies.rejections().next().unwrap();
        assert_eq!(rejection.errors[0].path, "spec.egress[0].acton");
        assert_eq!(kept, None);
    }

    #[test]
    fn a_resource_made_again_does_not_inherit_the_old_ones_valid_version() {
        let mut policies = ClusterPolicies::default();
        policies.apply(resource(None, "a", "u1", 4, allow("10.0.0.0/8")));
        assert!(policies.apply(resource(None, "a", "u2", 1, allow("10.0.0.0/33"))));
        assert!(in_force(&policies).is_empty());
    }

    #[test]
    fn deletes_and_relists_remove_what_the_cluster_no_longer_has() {
        let mut policies = ClusterPolicies::default();
        policies.apply(resource(None, "a", "u1", 1, allow("10.0.0.0/8")));
        policies.apply(resource(None, "b", "u2", 1, allow("10.0.0.0/8")));
        policies.apply(resource(Some("team"), "c", "u3", 1, allow("10.0.0.0/8")));
        // A delete of another kind's key does nothing.
        assert!(!policies.delete(
            "EgressPolicy",
            &PolicyKey {
                namespace: None,
                name: "a".into()
            }
        ));
        assert!(policies.delete(
            "ClusterEgressPolicy",
            &PolicyKey {
                namespace: None,
                name: "a".into()
            }
        ));
        // b was deleted while the watch was down; the relist of cluster
        // policies leaves the namespaced c alone.
        assert!(policies.relist(
            "ClusterEgressPolicy",
            vec![resource(None, "d", "u4", 1, allow("10.0.0.0/8"))]
        ));
        assert_eq!(
            in_force(&policies),
            [("d".to_owned(), 1), ("team/c".to_owned(), 1)]
        );
        // The same list again changes nothing.
        assert!(!policies.relist(
            "ClusterEgressPolicy",
            vec![resource(None, "d", "u4", 1, allow("10.0.0.0/8"))]
        ));
    }

    #[test]
    fn a_restored_set_keeps_its_versions_through_an_invalid_relist() {
        let mut before = ClusterPolicies::default();
        before.apply(resource(None, "a", "u1", 5, allow("10.0.0.0/8")));
        let mut after = ClusterPolicies::restored(before.desired());
        assert_eq!(after, before);
        // Edited while the agent was away, badly.
        assert!(!after.relist(
            "ClusterEgressPolicy",
            vec![resource(None, "a", "u1", 6, allow("300.0.0.0/8"))]
        ));
        assert_eq!(in_force(&after), [("a".to_owned(), 5)]);
    }
}
