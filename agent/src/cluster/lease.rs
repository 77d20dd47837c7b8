//! One status writer for the cluster: the replica of `tollgate-agent
//! status-writer` that holds a `coordination.k8s.io` Lease. Taking or
//! renewing it is a replace at the read resource version, so two replicas
//! can never both succeed.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease as LeaseObject, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{
        PostParams,
        entry::{CommitError, Entry},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("reading the lease: {0}")]
    Read(#[from] kube::Error),
    #[error("writing the lease: {0}")]
    Write(#[from] CommitError),
}

pub struct Lease {
    api: Api<LeaseObject>,
    name: String,
    identity: String,
    duration: Duration,
}

impl Lease {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    /// Takes the lease if it is free or expired, renews it if held: whether
    /// this agent holds it now.
    pub async fn acquire_or_renew(&self) -> Result<bool, LeaseError> {
        let now = Timestamp::now();
        let held_by_us = |spec: &LeaseSpec| spec.holder_identity.as_deref() == Some(&self.identity);
        let expired = |spec: &LeaseSpec| {
            let renewed = spec
                .renew_time
                .as_ref()
                .or(spec.acquire_time.as_ref())
                .map_or(Timestamp::UNIX_EPOCH, |t| t.0);
            let duration = SignedDuration::from_secs(i64::from(
                spec.lease_duration_seconds.unwrap_or_default(),
            ));
            renewed + duration < now
        };
        let spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        };
        let result = match self.api.entry(&self.name).await? {
            Entry::Vacant(vacant) => {
                let lease = LeaseObject {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(spec(0, None)),
                };
                vacant.insert(lease).commit(&PostParams::default()).await
            }
            Entry::Occupied(mut occupied) => {
                let current = occupied.get().spec.clone().unwrap_or_default();
                if held_by_us(&current) {
                    let acquired = current.acquire_time.clone();
                    let transitions = current.lease_transitions.unwrap_or_default();
                    occupied.get_mut().spec = Some(spec(transitions, acquired));
                } else if expired(&current) {
                    let transitions = current.lease_transitions.unwrap_or_default() + 1;
                    occupied.get_mut().spec = Some(spec(transitions, None));
                } else {
                    return Ok(false);
                }
                occupied.commit(&PostParams::default()).await
            }
        };
        match result {
            Ok(()) => Ok(true),
            // Another agent wrote first.
            Err(CommitError::Save(kube::Error::Api(e))) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
