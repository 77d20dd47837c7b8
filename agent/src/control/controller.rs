//! Control requests, handled on the task that owns the datapath, so there is
//! one writer of the kernel maps. A change is planned in the store, put in
//! force in the kernel, then committed and persisted; if putting it in force
//! fails, neither the store nor the kernel changes.
//! A change is saved as one record appended to the state journal
//! (`persist`).

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use tokio::sync::oneshot;
use tollgate_common::Mode;
use tollgate_proto::v1 as api;

use super::{
    persist::{SavedState, load_state},
    store::{ClusterDocument, Conflict, ModePlan, PolicyStore, StoreError, key_of, mode_name},
};
use crate::{
    datapath::{Attachment, Datapath, DatapathError},
    enforce::{EnforceError, Enforcer},
};

/// A request for the datapath task, with where its answer goes.
pub enum Command {
    Apply(
        api::ApplyPoliciesRequest,
        oneshot::Sender<Result<api::PolicyChanges, ControlError>>,
    ),
    Delete(
        api::DeletePoliciesRequest,
        oneshot::Sender<Result<api::PolicyChanges, ControlError>>,
    ),
    List(oneshot::Sender<api::ListPoliciesResponse>),
    GetMode(oneshot::Sender<api::ModeSettings>),
    SetMode(
        api::SetModeRequest,
        oneshot::Sender<Result<api::ModeSettings, ControlError>>,
    ),
    Status(oneshot::Sender<Result<api::StatusResponse, ControlError>>),
    RuleStats(
        api::ListRuleStatsRequest,
        oneshot::Sender<Result<api::ListRuleStatsResponse, ControlError>>,
    ),
    /// The cluster's policies (each valid on its own), to be the cluster
    /// part of the set.
    Cluster(
        Vec<ClusterDocument>,
        oneshot::Sender<Result<ClusterApplied, ControlError>>,
    ),
}

/// A command answered, and [`Controller::tidy`] due once its answer has
/// gone out.
#[must_use = "tidy once the answer has gone out"]
pub struct Answered;

impl Command {
    /// Whether answering it may change the policies or the mode (and so
    /// the journal and the heap).
    fn changes_state(&self) -> bool {
        match self {
            Self::Apply(..) | Self::Delete(..) | Self::SetMode(..) | Self::Cluster(..) => true,
            Self::List(_) | Self::GetMode(_) | Self::Status(_) | Self::RuleStats(..) => false,
        }
    }
}

/// The cluster's policies are in force, but for the conflicts.
#[derive(Debug)]
pub struct ClusterApplied {
    pub generation: u64,
    pub changes: Vec<api::PolicyChange>,
    pub conflicts: Vec<Conflict>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Enforce(#[from] EnforceError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("the change is in force but could not be saved to {path}: {source}")]
    Persist {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("reading the saved state {path}: {message}")]
    LoadState { path: PathBuf, message: String },
}

pub struct Controller {
    store: PolicyStore,
    /// False while the kernel holds rules the store may not know: a start
    /// with nothing saved leaves the pinned rules as they are, and an agent
    /// killed between a switch and its save left a set the store never
    /// committed. The next change then puts the store's set in force even
    /// if it changes nothing in the store.
    kernel_matches_store: bool,
    enforcer: Enforcer,
    saved: SavedState,
    attach_cgroup: PathBuf,
}

/// The rule ids in force and their names, in the state directory
/// (`enforce::SavedRules`).
pub const RULES_FILE: &str = "rules.json";

impl Controller {
    /// Restores the saved policy set, applies `documents` (from --policy) on
    /// top, sets the global mode (the flag wins over the saved one), and
    /// puts the result in force. With no saved set and no documents, the
    /// datapath's rules are left as they are.
    pub fn start(
        datapath: &mut Datapath,
        state_dir: &Path,
        enforcer: Enforcer,
        attach_cgroup: &Path,
        documents: Vec<api::EgressPolicy>,
        mode_flag: Option<Mode>,
    ) -> Result<Self, ControlError> {
        let saved = SavedState::new(state_dir);
        let mut enforcer = enforcer;
        enforcer.keep_rule_ids_in(state_dir.join(RULES_FILE));
        let mut store = match load_state(state_dir)? {
            Some(state) => {
                PolicyStore::from_persisted(state).map_err(|e| ControlError::LoadState {
                    path: saved.state_file().to_owned(),
                    message: e.to_string(),
                })?
            }
            None => PolicyStore::default(),
        };
        // A file must not stop the agent from starting because the cluster
        // has taken over a policy of the same name since: the cluster's wins.
        let (documents, shadowed): (Vec<_>, Vec<_>) = documents
            .into_iter()
            .partition(|document| !store.is_cluster_owned(&key_of(document)));
        for document in shadowed {
            tracing::warn!(
                policy = %key_of(&document),
                "--policy names a cluster resource's policy; the file's is not applied (rename it, or delete the resource)"
            );
        }
        let manage = !store.is_empty() || !documents.is_empty();
        if !documents.is_empty() {
            let plan = store.plan_apply(documents, None)?;
            store.commit(plan);
        }
        if let Some(mode) = mode_flag {
            if store.global_mode().is_some_and(|saved| saved != mode) {
                tracing::warn!(flag = mode_name(mode), saved = ?store.global_mode().map(mode_name), "--mode overrides the saved global mode");
            }
            store.commit_mode(ModePlan::Global(mode));
        }
        let mode = store.global_mode().unwrap_or(Mode::Observe);
        let mut controller = Self {
            store,
            kernel_matches_store: manage,
            enforcer,
            saved,
            attach_cgroup: attach_cgroup.to_owned(),
        };
        // Rules and mode change in one write: no decision pairs the old
        // rules with the new mode.
        if manage {
            controller.enforcer.put_in_force(
                controller.store.effective_policies(),
                controller.store.cluster_policies(),
                mode,
                datapath,
            )?;
            datapath.remove_out_of_force();
        } else {
            datapath.set_global_mode(mode)?;
        }
        controller.enforcer.save_rule_ids_if_changed();
        // What was read, and what start changed, in one snapshot.
        controller.saved.write_snapshot(&controller.store)?;
        crate::heap::release_freed_memory();
        Ok(controller)
    }

    /// At a stop: the whole state into the snapshot, so that `state.json`
    /// alone has it (for an agent older than the journal).
    pub fn stop(&mut self) {
        self.enforcer.save_rule_ids_if_changed();
        self.enforcer.finish_saving();
        self.saved.compact_if_any(&self.store);
    }

    pub fn enforcer(&self) -> &Enforcer {
        &self.enforcer
    }

    pub fn enforcer_mut(&mut self) -> &mut Enforcer {
        &mut self.enforcer
    }

    pub fn policy_count(&self) -> usize {
        self.store.len()
    }

    /// The cluster resources' policies in force.
    pub fn cluster_documents(&self) -> Vec<ClusterDocument> {
        self.store.cluster_documents()
    }

    /// Answers `command`. What can wait for the answer to go out is left
    /// for [`Self::tidy`].
    pub fn handle(&mut self, command: Command, datapath: &mut Datapath) -> Answered {
        let changed_state = command.changes_state();
        self.answer(command, datapath);
        if changed_state {
            // Before the answer goes out: a compaction writes the whole
            // state, which at 100k rules is tens of MB allocated for a
            // moment; done while the requester waits, nothing else
            // allocates in between, and the heap is handed back whole.
            self.saved.compact_if_due(&self.store);
            crate::heap::release_freed_memory();
        }
        Answered
    }

    /// After an answer has gone out: removes what no decision reads any
    /// more, and saves what only a restart needs.
    pub fn tidy(&mut self, _answered: Answered, datapath: &mut Datapath) {
        datapath.remove_out_of_force();
        self.enforcer.save_rule_ids_if_changed();
    }

    fn answer(&mut self, command: Command, datapath: &mut Datapath) {
        // A requester that went away does not care about the answer.
        match command {
            Command::Apply(request, reply) => {
                let _ = reply.send(self.apply(request, datapath));
            }
            Command::Delete(request, reply) => {
                let _ = reply.send(self.delete(request, datapath));
            }
            Command::List(reply) => {
                let _ = reply.send(api::ListPoliciesResponse {
                    generation: self.store.generation(),
                    policies: self.store.documents(),
                    sources: self.store.sources(),
                });
            }
            Command::GetMode(reply) => {
                let _ = reply.send(self.store.mode_settings());
            }
            Command::SetMode(request, reply) => {
                let _ = reply.send(self.set_mode(request, datapath));
            }
            Command::Status(reply) => {
                let _ = reply.send(self.status(datapath));
            }
            Command::RuleStats(request, reply) => {
                let _ = reply.send(self.rule_stats(request, datapath));
            }
            Command::Cluster(desired, reply) => {
                let _ = reply.send(self.apply_cluster(desired, datapath));
            }
        }
    }

    fn apply_cluster(
        &mut self,
        desired: Vec<ClusterDocument>,
        datapath: &mut Datapath,
    ) -> Result<ClusterApplied, ControlError> {
        let (plan, conflicts) = self.store.plan_cluster(desired)?;
        let changes = plan.changes.clone();
        match self.put_plan_in_force(plan, false, datapath) {
            Ok(_) => {}
            // In force and committed; only the save failed, and the API
            // server has the cluster's policies for the next start.
            Err(e @ ControlError::Persist { .. }) => {
                tracing::error!(error = %e, "the cluster's policies are in force but not saved");
            }
            Err(e) => return Err(e),
        }
        Ok(ClusterApplied {
            generation: self.store.generation(),
            changes,
            conflicts,
        })
    }

    fn apply(
        &mut self,
        request: api::ApplyPoliciesRequest,
        datapath: &mut Datapath,
    ) -> Result<api::PolicyChanges, ControlError> {
        let started = Instant::now();
        let documents = request.policies.len();
        let plan = self
            .store
            .plan_apply(request.policies, request.expected_generation)?;
        tracing::debug!(
            documents,
            changed = plan.changed_keys().len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "apply: validated and planned"
        );
        self.put_plan_in_force(plan, request.dry_run, datapath)
    }

    fn delete(
        &mut self,
        request: api::DeletePoliciesRequest,
        datapath: &mut Datapath,
    ) -> Result<api::PolicyChanges, ControlError> {
        let plan = self
            .store
            .plan_delete(&request.names, request.expected_generation)?;
        self.put_plan_in_force(plan, request.dry_run, datapath)
    }

    fn put_plan_in_force(
        &mut self,
        plan: super::store::Plan,
        dry_run: bool,
        datapath: &mut Datapath,
    ) -> Result<api::PolicyChanges, ControlError> {
        let policies = self.store.effective_policies_of(&plan);
        let changes = plan.changes.clone();
        if dry_run {
            self.enforcer.check(policies, datapath)?;
            return Ok(api::PolicyChanges {
                generation: self.store.generation(),
                changes,
                dry_run: true,
            });
        }
        // Nothing to switch, save or move the generation for.
        if !plan.changes_anything() && self.kernel_matches_store {
            return Ok(api::PolicyChanges {
                generation: self.store.generation(),
                changes,
                dry_run: false,
            });
        }
        self.enforcer.put_in_force(
            policies,
            plan.cluster_policies(),
            datapath.global_mode(),
            datapath,
        )?;
        self.kernel_matches_store = true;
        let changed = plan.changed_keys();
        self.store.commit(plan);
        if !changed.is_empty() {
            self.saved.save(&self.store, &changed)?;
        }
        Ok(api::PolicyChanges {
            generation: self.store.generation(),
            changes,
            dry_run: false,
        })
    }

    fn set_mode(
        &mut self,
        request: api::SetModeRequest,
        datapath: &mut Datapath,
    ) -> Result<api::ModeSettings, ControlError> {
        let plan = self.store.plan_mode(&request.mode, &request.policy)?;
        match &plan {
            ModePlan::Global(mode) => datapath.set_global_mode(*mode)?,
            ModePlan::Policy { policies, .. } => {
                self.enforcer.put_in_force(
                    policies.clone(),
                    self.store.cluster_policies(),
                    datapath.global_mode(),
                    datapath,
                )?;
            }
        }
        self.store.commit_mode(plan);
        self.saved.save(&self.store, &[])?;
        Ok(self.store.mode_settings())
    }

    fn status(&self, datapath: &Datapath) -> Result<api::StatusResponse, ControlError> {
        let counters = datapath.counters()?;
        Ok(api::StatusResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            kernel: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            attach_cgroup: self.attach_cgroup.display().to_string(),
            programs: datapath
                .attachments()
                .iter()
                .map(|(name, attachment)| api::ProgramStatus {
                    name: (*name).into(),
                    attachment: match attachment {
                        Attachment::New => "new",
                        Attachment::Adopted => "adopted",
                        Attachment::Replaced => "replaced",
                        Attachment::Pending => "pending",
                    }
                    .into(),
                })
                .collect(),
            counters: Some(api::DecisionCounters {
                allowed: counters.allowed,
                denied: counters.denied,
                audit: counters.audit,
                allowed_deduplicated: counters.allowed_deduplicated,
                packets_deduplicated: counters.packets_deduplicated,
                ringbuf_reserve_failed: counters.ringbuf_reserve_failed,
                generation_retries: counters.generation_retries,
                dns_answers: counters.dns_answers,
                dns_addresses_learned: counters.dns_addresses_learned,
                dns_answers_to_agent: counters.dns_to_userspace,
                dns_answers_malformed: counters.dns_malformed,
                dns_answers_untrusted: counters.dns_untrusted,
                fqdn_slots_full: counters.fqdn_slots_full,
                dns_answers_not_asked: counters.dns_not_asked,
                dns_answers_via_loopback: counters.dns_via_loopback,
                dns_queries_foreign_netns: counters.dns_foreign_netns,
                dns_spoofed_dropped: counters.dns_spoofed,
                allowed_counts_full: counters.allowed_counts_full,
            }),
            policy_generation: self.store.generation(),
            datapath_generation: datapath.generation(),
            maps: datapath
                .map_fill()?
                .into_iter()
                .map(|(name, entries, capacity)| api::MapFill {
                    name: name.into(),
                    entries: entries as u64,
                    capacity: u64::from(capacity),
                })
                .collect(),
            global_mode: mode_name(datapath.global_mode()).into(),
            policies: self.store.len() as u32,
            cluster_policies: self.store.counts_by_source().1 as u32,
            endpoints: self.enforcer.endpoint_count() as u32,
            degraded: datapath
                .degraded()
                .iter()
                .map(|d| api::DegradedFeature {
                    feature: d.feature.into(),
                    program: d.program.into(),
                    reason: d.reason.clone(),
                    consequence: d.consequence.into(),
                })
                .collect(),
        })
    }

    fn rule_stats(
        &self,
        request: api::ListRuleStatsRequest,
        datapath: &Datapath,
    ) -> Result<api::ListRuleStatsResponse, ControlError> {
        let policy = (!request.policy.is_empty()).then_some(request.policy.as_str());
        let stats = self
            .enforcer
            .rule_stats(policy, datapath)
            .map_err(EnforceError::from)?;
        if let Some(policy) = policy
            && stats.is_empty()
        {
            return Err(StoreError::UnknownPolicy(policy.to_owned()).into());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let rules = crate::enforce::unused_for(stats, request.unused_for_seconds, now)
            .into_iter()
            .map(api::RuleStats::from)
            .collect();
        Ok(api::ListRuleStatsResponse { rules })
    }
}
