//! The two policy resources as the API server serves them: `EgressPolicy`
//! (namespaced) and `ClusterEgressPolicy` (cluster-scoped), group
//! `policy.tollgate.dev`, version `v1alpha1`, and the status both carry.
//!
//! The spec is kept as the API server sent it (JSON) and read into the
//! policy model by the same document reader as policy files, so a field
//! this agent does not know is an error on that one resource, with its
//! path, and never a watch that cannot decode its list.

use std::{borrow::Cow, marker::PhantomData};

use k8s_openapi::{
    ClusterResourceScope, NamespaceResourceScope, apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "policy.tollgate.dev";
pub const VERSION: &str = "v1alpha1";

/// What tells the two kinds apart.
pub trait PolicyKind: Send + Sync + 'static {
    const KIND: &'static str;
    const PLURAL: &'static str;
    type Scope;
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Namespaced;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClusterScoped;

impl PolicyKind for Namespaced {
    const KIND: &'static str = "EgressPolicy";
    const PLURAL: &'static str = "egresspolicies";
    type Scope = NamespaceResourceScope;
}

impl PolicyKind for ClusterScoped {
    const KIND: &'static str = "ClusterEgressPolicy";
    const PLURAL: &'static str = "clusteregresspolicies";
    type Scope = ClusterResourceScope;
}

/// One policy resource of kind `K`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PolicyResource<K> {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<PolicyStatus>,
    #[serde(skip)]
    kind: PhantomData<K>,
}

pub type EgressPolicyResource = PolicyResource<Namespaced>;
pub type ClusterEgressPolicyResource = PolicyResource<ClusterScoped>;

impl<K> PolicyResource<K> {
    pub fn new(metadata: ObjectMeta, spec: serde_json::Value) -> Self {
        Self {
            metadata,
            spec,
            status: None,
            kind: PhantomData,
        }
    }
}

impl<K: PolicyKind> kube::Resource for PolicyResource<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(_: &()) -> Cow<'_, str> {
        K::KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        K::PLURAL.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// What `kubectl get egresspolicies` shows of a policy across the cluster.
/// The status writer writes it, from every agent's report (docs/aks.md,
/// "Status").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    /// The generation of the spec that this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The number of egress rules of the version in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<u32>,
    /// `Accepted`: the spec passed the agents' validation (if not, the last
    /// valid generation stays in force and the message says why).
    /// `Enforced`: every node with an agent has the accepted generation in
    /// its kernel.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeCounts>,
}

/// A status condition, as Kubernetes' `metav1.Condition`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Accepted` or `Enforced`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word for programs.
    pub reason: String,
    /// What a person needs to know, with the field path and value of a
    /// validation error.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// How many nodes enforce the policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    /// Nodes with a running agent.
    pub desired: u32,
    /// Nodes whose kernel has `observedGeneration` in force.
    pub enforced: u32,
    /// Nodes that failed to put it in force, and why (at most 20 listed).
    /// Always written, empty too: a merge patch can only clear a list by
    /// sending it.
    #[serde(default)]
    pub failed: Vec<NodeFailure>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeFailure {
    pub node: String,
    pub reason: String,
}
