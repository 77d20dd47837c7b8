//! What the Kubernetes API says about the pods on this node and their
//! namespaces, kept as the identity of pod cgroups. Pure: the watch feeds it
//! updates, selection and flow records read it.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{ContainerStatus, Namespace, Pod};
use serde::{Deserialize, Serialize};

use tollgate_policy::select::{Identity, Labels};

/// One pod, reduced to what selection and flow records need.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodMeta {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// The labels whose keys flow records carry (--pod-label-keys).
    pub record_labels: Labels,
    pub workload: Option<Workload>,
    /// Containers that have an id yet (init and ephemeral ones included).
    pub containers: Vec<ContainerMeta>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerMeta {
    pub name: String,
    /// Without the runtime's scheme: what the cgroup path carries.
    pub id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceMeta {
    pub name: String,
    pub labels: Labels,
}

/// A change the watch reports.
#[derive(Clone, Debug, PartialEq)]
pub enum IdentityUpdate {
    /// A complete list (start, or relist after a `410 Gone`): replaces all pods.
    Pods(Vec<PodMeta>),
    PodApplied(PodMeta),
    PodDeleted {
        uid: String,
    },
    /// A complete list: replaces all namespaces.
    Namespaces(Vec<NamespaceMeta>),
    NamespaceApplied(NamespaceMeta),
    NamespaceDeleted {
        name: String,
    },
}

/// The pods of this node and every namespace, as last seen.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodDirectory {
    pods: HashMap<String, PodMeta>,
    namespaces: HashMap<String, Labels>,
}

impl PodDirectory {
    /// Applies one update; false when it changed nothing.
    pub fn apply(&mut self, update: IdentityUpdate) -> bool {
        match update {
            IdentityUpdate::Pods(pods) => {
                let pods: HashMap<_, _> = pods.into_iter().map(|p| (p.uid.clone(), p)).collect();
                let changed = pods != self.pods;
                self.pods = pods;
                changed
            }
            IdentityUpdate::PodApplied(pod) => {
                let changed = self.pods.get(&pod.uid) != Some(&pod);
                self.pods.insert(pod.uid.clone(), pod);
                changed
            }
            IdentityUpdate::PodDeleted { uid } => self.pods.remove(&uid).is_some(),
            IdentityUpdate::Namespaces(namespaces) => {
                let namespaces: HashMap<_, _> =
                    namespaces.into_iter().map(|n| (n.name, n.labels)).collect();
                let changed = namespaces != self.namespaces;
                self.namespaces = namespaces;
                changed
            }
            IdentityUpdate::NamespaceApplied(namespace) => {
                let changed = self.namespaces.get(&namespace.name) != Some(&namespace.labels);
                self.namespaces.insert(namespace.name, namespace.labels);
                changed
            }
            IdentityUpdate::NamespaceDeleted { name } => self.namespaces.remove(&name).is_some(),
        }
    }

    pub fn pod(&self, uid: &str) -> Option<&PodMeta> {
        self.pods.get(uid)
    }

    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// The identity of a pod's cgroup: known once the pod and its namespace
    /// both are (a namespaceSelector cannot be judged without the latter).
    pub fn identity(&self, pod_uid: &str) -> Identity<'_> {
        let Some(pod) = self.pods.get(pod_uid) else {
            return Identity::UnknownPod;
        };
        match self.namespaces.get(&pod.namespace) {
            Some(namespace_labels) => Identity::Pod {
                namespace: &pod.namespace,
                labels: &pod.labels,
                namespace_labels,
            },
            None => Identity::UnknownPod,
        }
    }
}

impl PodMeta {
    /// None for an object without uid, namespace or name (never from a real
    /// API server, but the input is not ours to trust).
    pub fn from_pod(pod: &Pod, record_label_keys: &[String]) -> Option<Self> {
        let metadata = &pod.metadata;
        let labels: Labels = metadata.labels.clone().unwrap_or_default();
        let record_labels = record_label_keys
            .iter()
            .filter_map(|k| labels.get(k).map(|v| (k.clone(), v.clone())))
            .collect();
        let containers = pod
            .status
            .iter()
            .flat_map(|s| {
                [
                    &s.container_statuses,
                    &s.init_container_statuses,
                    &s.ephemeral_container_statuses,
                ]
            })
            .flatten()
            .flatten()
            .filter_map(container_meta)
            .collect();
        Some(Self {
            uid: metadata.uid.clone()?,
            namespace: metadata.namespace.clone()?,
            name: metadata.name.clone()?,
            workload: workload(pod, &labels),
            labels,
            record_labels,
            containers,
        })
    }

    pub fn container_name(&self, container_id: &str) -> Option<&str> {
        self.containers
            .iter()
            .find(|c| c.id == container_id)
            .map(|c| c.name.as_str())
    }
}

impl NamespaceMeta {
    pub fn from_namespace(namespace: &Namespace) -> Option<Self> {
        Some(Self {
            name: namespace.metadata.name.clone()?,
            labels: namespace.metadata.labels.clone().unwrap_or_default(),
        })
    }
}

/// `containerd://<id>` -> `<id>`; containers not started yet have no id.
fn container_meta(status: &ContainerStatus) -> Option<ContainerMeta> {
    let id = status.container_id.as_deref()?;
    let id = id.split_once("://").map_or(id, |(_, id)| id);
    (!id.is_empty()).then(|| ContainerMeta {
        name: status.name.clone(),
        id: id.to_owned(),
    })
}

/// The pod's controller; a ReplicaSet that a Deployment made is named
/// `<deployment>-<pod-template-hash>` and its pods carry that hash as a
/// label, so the Deployment is found without reading ReplicaSets (which
/// would need more RBAC than pods and namespaces).
fn workload(pod: &Pod, labels: &Labels) -> Option<Workload> {
    let owner = pod
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|o| o.controller == Some(true))?;
    if owner.kind == "ReplicaSet" {
        let deployment = labels
            .get("pod-template-hash")
            .and_then(|hash| owner.name.strip_suffix(hash.as_str())?.strip_suffix('-'))
            .filter(|name| !name.is_empty());
        if let Some(name) = deployment {
            return Some(Workload {
                kind: "Deployment".into(),
                name: name.into(),
            });
        }
    }
    Some(Workload {
        kind: owner.kind.clone(),
        name: owner.name.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod as `kubectl get pod -o json` shows it (trimmed).
    const PAYMENTS_POD: &str = r#"{
      "apiVersion": "v1", "kind": "Pod",
      "metadata": {
        "name": "payments-7d9c6b5f4-x2x8q", "namespace": "prod",
        "uid": "6a1c3f0e-1b2c-4d5e-8f90-123456789abc", "resourceVersion": "1234",
        "labels": {"app": "payments", "pod-template-hash": "7d9c6b5f4", "team": "billing"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
          "name": "payments-7d9c6b5f4", "uid": "0b6f0a4e-0000-4000-8000-000000000001",
          "controller": true, "blockOwnerDeletion": true}]
      },
      "spec": {"nodeName": "aks-nodepool1-0", "containers": [{"name": "app", "image": "payments:1"}]},
      "status": {
        "phase": "Running",
        "initContainerStatuses": [{"name": "migrate", "image": "payments:1", "imageID": "",
          "ready": false, "restartCount": 0,
          "containerID": "containerd://1111111111111111111111111111111111111111111111111111111111111111"}],
        "containerStatuses": [
          {"name": "app", "image": "payments:1", "imageID": "", "ready": true, "restartCount": 0,
           "containerID": "containerd://2222222222222222222222222222222222222222222222222222222222222222"},
          {"name": "sidecar", "image": "proxy:1", "imageID": "", "ready": false, "restartCount": 0}
        ]
      }
    }"#;

    fn pod(json: &str) -> Pod {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_real_pod_becomes_its_identity() {
        let meta = PodMeta::from_pod(&pod(PAYMENTS_POD), &["app".into(), "zone".into()]).unwrap();
        assert_eq!(meta.uid, "6a1c3f0e-1b2c-4d5e-8f90-123456789abc");
        assert_eq!(
            (meta.namespace.as_str(), meta.name.as_str()),
            ("prod", "payments-7d9c6b5f4-x2x8q")
        );
        assert_eq!(meta.labels.len(), 3);
        assert_eq!(
            meta.record_labels,
            Labels::from([("app".into(), "payments".into())])
        );
        assert_eq!(
            meta.workload,
            Some(Workload {
                kind: "Deployment".into(),
                name: "payments".into()
            })
        );
        assert_eq!(meta.container_name(&"2".repeat(64)), Some("app"));
        assert_eq!(meta.container_name(&"1".repeat(64)), Some("migrate"));
        assert_eq!(
            meta.containers.len(),
            2,
            "a container without an id yet is left out"
        );
    }

    #[test]
    fn workloads_other_than_deployments_are_their_owner() {
        let with_owner = |kind: &str, name: &str, hash: Option<&str>| {
            let mut p = pod(PAYMENTS_POD);
            p.metadata.owner_references.as_mut().unwrap()[0].kind = kind.into();
            p.metadata.owner_references.as_mut().unwrap()[0].name = name.into();
            let labels = p.metadata.labels.as_mut().unwrap();
            labels.remove("pod-template-hash");
            if let Some(hash) = hash {
                labels.insert("pod-template-hash".into(), hash.into());
            }
            PodMeta::from_pod(&p, &[]).unwrap().workload.unwrap()
        };
        let workload = |kind: &str, name: &str| Workload {
            kind: kind.into(),
            name: name.into(),
        };
        assert_eq!(
            with_owner("StatefulSet", "db", None),
            workload("StatefulSet", "db")
        );
        // A bare ReplicaSet (no hash label, or a name that does not end in it).
        assert_eq!(
            with_owner("ReplicaSet", "cache-abc", None),
            workload("ReplicaSet", "cache-abc")
        );
        assert_eq!(
            with_owner("ReplicaSet", "cache", Some("abc")),
            workload("ReplicaSet", "cache")
        );
        assert_eq!(
            with_owner("ReplicaSet", "-abc", Some("abc")),
            workload("ReplicaSet", "-abc")
        );

        let mut bare = pod(PAYMENTS_POD);
        bare.metadata.owner_references = None;
        assert_eq!(PodMeta::from_pod(&bare, &[]).unwrap().workload, None);
        bare.metadata.uid = None;
        assert_eq!(PodMeta::from_pod(&bare, &[]), None);
    }

    #[test]
    fn a_pod_is_known_once_it_and_its_namespace_are() {
        let meta = PodMeta::from_pod(&pod(PAYMENTS_POD), &[]).unwrap();
        let uid = meta.uid.clone();
        let mut directory = PodDirectory::default();
        assert_eq!(directory.identity(&uid), Identity::UnknownPod);
        assert!(directory.apply(IdentityUpdate::PodApplied(meta.clone())));
        assert!(
            !directory.apply(IdentityUpdate::PodApplied(meta.clone())),
            "no change"
        );
        assert_eq!(
            directory.identity(&uid),
            Identity::UnknownPod,
            "namespace unknown"
        );
        let prod = NamespaceMeta {
            name: "prod".into(),
            labels: Labels::from([("env".into(), "prod".into())]),
        };
        assert!(directory.apply(IdentityUpdate::Namespaces(vec![prod.clone()])));
        assert_eq!(
            directory.identity(&uid),
            Identity::Pod {
                namespace: "prod",
                labels: &meta.labels,
                namespace_labels: &prod.labels
            }
        );

        let mut relabelled = meta.clone();
        relabelled.labels.insert("app".into(), "web".into());
        assert!(directory.apply(IdentityUpdate::PodApplied(relabelled)));
        assert!(
            matches!(directory.identity(&uid), Identity::Pod { labels, .. } if labels["app"] == "web")
        );

        // A relist replaces everything: what it lacks was deleted meanwhile.
        assert!(directory.apply(IdentityUpdate::Pods(vec![])));
        assert_eq!(directory.identity(&uid), Identity::UnknownPod);
        assert!(!directory.apply(IdentityUpdate::PodDeleted { uid: uid.clone() }));
        assert!(directory.apply(IdentityUpdate::NamespaceDeleted {
            name: "prod".into()
        }));
        let dev = NamespaceMeta {
            name: "dev".into(),
            labels: Labels::new(),
        };
        assert!(directory.apply(IdentityUpdate::NamespaceApplied(dev.clone())));
        assert!(!directory.apply(IdentityUpdate::NamespaceApplied(dev)));
    }
}
