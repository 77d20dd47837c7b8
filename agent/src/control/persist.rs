//! The saved state: a snapshot (`state.json`) and a journal
//! (`state.journal`) of the changes since. Each change appends one record
//! and waits for it alone to be on disk (`fdatasync`); when the journal
//! outgrows the snapshot, the snapshot is written anew and the journal
//! started again after it. A start reads the snapshot and replays the
//! journal: the same state as the last change acknowledged.

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use tollgate_policy::model::PolicyKey;

use super::{
    controller::ControlError,
    store::{PersistedState, PolicyStore, StateDelta},
};
use crate::state_file::Journal;

/// The saved policy set and modes, as of the last snapshot.
pub const STATE_FILE: &str = "state.json";

/// The changes since the snapshot, one record each.
pub const JOURNAL_FILE: &str = "state.journal";

/// A record of the state journal. `Delta` is what is read back; saving
/// writes a delta of the store's documents (see [`PolicyStore::delta`]).
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
enum JournalRecord<Delta = StateDelta> {
    /// The first record: which snapshot the journal continues, by its
    /// length and CRC-32. A journal of another snapshot (left by a crash
    /// between writing a snapshot and starting the journal anew) holds
    /// nothing the snapshot does not, and is ignored.
    Snapshot {
        len: u64,
        crc32: u32,
    },
    Change(Delta),
}

/// Reads the saved state: the snapshot, and the changes the journal
/// recorded since. A torn last record (a crash while it was written) is
/// ignored: its change was never acknowledged.
pub fn load_state(state_dir: &Path) -> Result<Option<PersistedState>, ControlError> {
    let state_file = state_dir.join(STATE_FILE);
    let journal_file = state_dir.join(JOURNAL_FILE);
    let load_err = |path: &Path, message: String| ControlError::LoadState {
        path: path.to_owned(),
        message,
    };
    let bytes = match std::fs::read(&state_file) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(load_err(&state_file, e.to_string())),
    };
    let state: PersistedState =
        serde_json::from_slice(&bytes).map_err(|e| load_err(&state_file, e.to_string()))?;
    let (journal, records, torn) =
        Journal::open(&journal_file).map_err(|e| load_err(&journal_file, e.to_string()))?;
    drop(journal);
    if torn {
        tracing::warn!(path = %journal_file.display(), "the state journal ends in a torn record (the agent stopped while saving a change it had not acknowledged); the change is not restored");
    }
    let mut records = records.into_iter().map(|record| {
        serde_json::from_slice::<JournalRecord>(&record)
            .map_err(|e| load_err(&journal_file, e.to_string()))
    });
    let snapshot = JournalRecord::Snapshot {
        len: bytes.len() as u64,
        crc32: crc32fast::hash(&bytes),
    };
    match records.next().transpose()? {
        Some(first) if first == snapshot => {}
        None => return Ok(Some(state)),
        Some(_) => {
            tracing::info!(path = %journal_file.display(), "the state journal continues an older snapshot; the snapshot has its changes");
            return Ok(Some(state));
        }
    }
    let deltas = records
        .map(|record| match record? {
            JournalRecord::Change(delta) => Ok(delta),
            JournalRecord::Snapshot { .. } => Err(load_err(
                &journal_file,
                "a snapshot record after the first".into(),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(state.replay(deltas)))
}

/// Where the state is saved, and the journal being appended to.
pub struct SavedState {
    state_file: PathBuf,
    journal_file: PathBuf,
    /// None when the journal could not be appended to or started: the next
    /// change writes a snapshot instead.
    journal: Option<Journal>,
    /// Bytes of the snapshot the journal continues.
    snapshot_len: u64,
}

impl SavedState {
    /// The state in `state_dir`; nothing is read or written yet.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            state_file: state_dir.join(STATE_FILE),
            journal_file: state_dir.join(JOURNAL_FILE),
            journal: None,
            snapshot_len: 0,
        }
    }

    pub fn state_file(&self) -> &Path {
        &self.state_file
    }

    /// Saves a change just committed to the store (to the `changed`
    /// policies, and the generation and modes): one record appended to the
    /// journal, on disk before this returns. Without a journal to append
    /// to, a snapshot of the whole state.
    pub fn save(&mut self, store: &PolicyStore, changed: &[PolicyKey]) -> Result<(), ControlError> {
        let started = Instant::now();
        if let Some(journal) = &mut self.journal {
            let record = JournalRecord::Change(store.delta(changed));
            let appended = serde_json::to_vec(&record)
                .map_err(std::io::Error::from)
                .and_then(|payload| journal.append(&payload));
            match appended {
                Ok(()) => {
                    tracing::debug!(
                        policies = changed.len(),
                        journal_bytes = journal.len(),
                        elapsed_us = started.elapsed().as_micros() as u64,
                        "apply: change appended to the state journal"
                    );
                    return Ok(());
                }
                Err(error) => {
                    tracing::warn!(path = %journal.path().display(), %error, "cannot append to the state journal; writing a snapshot instead");
                    self.journal = None;
                }
            }
        }
        self.write_snapshot(store)
    }

    /// Writes a snapshot if the journal holds changes: at a stop, so that
    /// `state.json` alone has the whole state.
    pub fn compact_if_any(&mut self, store: &PolicyStore) {
        let header_only = self
            .journal
            .as_ref()
            .is_some_and(|journal| journal.records() <= 1);
        if !header_only && let Err(error) = self.write_snapshot(store) {
            tracing::error!(%error, "the state snapshot is not written; the journal has the changes since the last");
        }
    }

    /// Writes a snapshot when the journal has outgrown the last one (after
    /// the change's answer is sent), or when there is no journal.
    pub fn compact_if_due(&mut self, store: &PolicyStore) {
        let due = match &self.journal {
            Some(journal) => journal.len() > self.snapshot_len,
            None => true,
        };
        if due && let Err(error) = self.write_snapshot(store) {
            tracing::error!(%error, "the state snapshot is not written; the next change tries again");
        }
    }

    /// Writes the whole state as the snapshot, then starts the journal anew
    /// after it. A crash in between leaves the new snapshot and the old
    /// journal, which names the old snapshot and is ignored.
    pub fn write_snapshot(&mut self, store: &PolicyStore) -> Result<(), ControlError> {
        let started = Instant::now();
        let state = store.to_persisted();
        let mut crc = crc32fast::Hasher::new();
        let mut len = 0u64;
        crate::state_file::write_atomic_with(&self.state_file, |file| {
            let mut file = Checksummed {
                inner: file,
                crc: &mut crc,
                len: &mut len,
            };
            serde_json::to_writer_pretty(&mut file, &state).map_err(std::io::Error::from)
        })
        .map_err(|source| ControlError::Persist {
            path: self.state_file.clone(),
            source,
        })?;
        self.snapshot_len = len;
        let header = JournalRecord::<StateDelta>::Snapshot {
            len,
            crc32: crc.finalize(),
        };
        let header = serde_json::to_vec(&header).expect("a snapshot record serializes");
        // The snapshot holds everything: a journal that cannot be started
        // costs only the next change a snapshot of its own.
        self.journal = match Journal::replace(&self.journal_file, &header) {
            Ok(journal) => Some(journal),
            Err(error) => {
                tracing::warn!(path = %self.journal_file.display(), %error, "cannot start the state journal; changes are saved as snapshots");
                None
            }
        };
        tracing::debug!(
            bytes = len,
            elapsed_us = started.elapsed().as_micros() as u64,
            "state snapshot written"
        );
        Ok(())
    }
}

/// A writer that keeps the CRC-32 and length of what goes through it.
struct Checksummed<'a, W> {
    inner: W,
    crc: &'a mut crc32fast::Hasher,
    len: &'a mut u64,
}

impl<W: std::io::Write> std::io::Write for Checksummed<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.crc.update(&buf[..written]);
        *self.len += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::store::{ClusterDocument, ClusterOrigin, ModePlan, parse_key};
    use tollgate_policy::document::parse_documents;
    use tollgate_proto::v1 as api;

    fn document(name: &str, cidr: &str) -> api::EgressPolicy {
        let yaml = format!(
            "apiVersion: policy.tollgate.dev/v1alpha1\nkind: EgressPolicy\nmetadata: {{name: {name}}}\n\
             spec:\n  cgroupSelector: {{paths: [/x]}}\n  egress:\n  - {{name: r, to: [{{cidr: \"{cidr}\"}}]}}\n"
        );
        parse_documents("t", &yaml).unwrap().remove(0).policy
    }

    fn temporary_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tg-persist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// What a restart reads back: the store as `from_persisted` rebuilds it.
    fn restored(dir: &Path) -> PolicyStore {
        PolicyStore::from_persisted(load_state(dir).unwrap().expect("a saved state")).unwrap()
    }

    fn assert_same(restored: &PolicyStore, live: &PolicyStore) {
        assert_eq!(restored.generation(), live.generation());
        assert_eq!(restored.documents(), live.documents());
        assert_eq!(restored.sources(), live.sources());
        assert_eq!(restored.mode_settings(), live.mode_settings());
        assert_eq!(restored.global_mode(), live.global_mode());
    }

    /// Applies `documents` and saves the change as the controller does.
    fn apply(store: &mut PolicyStore, saved: &mut SavedState, documents: Vec<api::EgressPolicy>) {
        let plan = store.plan_apply(documents, None).unwrap();
        let changed = plan.changed_keys();
        store.commit(plan);
        saved.save(store, &changed).unwrap();
    }

    /// A store and its saved state after a run of every kind of change.
    fn changes(dir: &Path) -> (PolicyStore, SavedState, Vec<u64>) {
        let mut store = PolicyStore::default();
        let mut saved = SavedState::new(dir);
        saved.write_snapshot(&store).unwrap();
        let mut ends = vec![saved.journal.as_ref().unwrap().len()];
        // The journal's length after each change.
        let step = |saved: &SavedState, ends: &mut Vec<u64>| {
            ends.push(saved.journal.as_ref().unwrap().len());
        };
        apply(
            &mut store,
            &mut saved,
            vec![document("a", "10.0.0.0/8"), document("b", "10.1.0.0/16")],
        );
        step(&saved, &mut ends);
        apply(&mut store, &mut saved, vec![document("a", "10.2.0.0/16")]);
        step(&saved, &mut ends);
        let plan = store.plan_mode("observe", "b").unwrap();
        store.commit_mode(plan);
        saved.save(&store, &[]).unwrap();
        step(&saved, &mut ends);
        store.commit_mode(ModePlan::Global(tollgate_common::Mode::Enforce));
        saved.save(&store, &[]).unwrap();
        step(&saved, &mut ends);
        let (plan, conflicts) = store
            .plan_cluster(vec![ClusterDocument {
                document: document("c", "10.3.0.0/16"),
                origin: ClusterOrigin {
                    kind: "ClusterEgressPolicy".into(),
                    uid: "u-1".into(),
                    generation: 2,
                },
            }])
            .unwrap();
        assert!(conflicts.is_empty());
        let changed = plan.changed_keys();
        store.commit(plan);
        saved.save(&store, &changed).unwrap();
        step(&saved, &mut ends);
        let plan = store.plan_delete(&["b".into()], None).unwrap();
        let changed = plan.changed_keys();
        store.commit(plan);
        saved.save(&store, &changed).unwrap();
        step(&saved, &mut ends);
        apply(&mut store, &mut saved, vec![document("b", "10.4.0.0/16")]);
        step(&saved, &mut ends);
        (store, saved, ends)
    }

    #[test]
    fn a_restart_restores_exactly_the_state_of_snapshot_and_journal() {
        let dir = temporary_dir("restore");
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&dir); }
        let (store, saved, _) = changes(&dir);
        assert!(saved.journal.as_ref().unwrap().records() > 1);
        let back = restored(&dir);
        assert_same(&back, &store);
        assert_eq!(back.cluster_documents(), store.cluster_documents());
        assert!(back.is_cluster_owned(&parse_key("c")));
        assert_eq!(back.effective_policies(), store.effective_policies());
    }

    #[test]
    fn a_torn_last_record_is_ignored_and_the_change_before_it_restored() {
        let dir = temporary_dir("torn");
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&dir); }
        let (_, _, ends) = changes(&dir);
        let journal = dir.join(JOURNAL_FILE);
        let whole = std::fs::read(&journal).unwrap();
        // The state after each change, as a journal cut right after it.
        let mut states = Vec::new();
        for &end in &ends {
            std::fs::write(&journal, &whole[..end as usize]).unwrap();
            let back = restored(&dir);
            states.push((back.generation(), back.documents(), back.mode_settings()));
        }
        // A cut anywhere inside a record restores the change before it.
        for pair in ends.windows(2).enumerate() {
            let (i, &[start, end]) = pair else {
                unreachable!()
            };
            for cut in [start + 1, start + 8, (start + end) / 2, end - 1] {
                std::fs::write(&journal, &whole[..cut as usize]).unwrap();
                let back = restored(&dir);
                assert_eq!(
                    (back.generation(), back.documents(), back.mode_settings()),
                    states[i],
                    "cut at {cut}, inside record {}",
                    i + 1
                );
            }
        }
        // A flipped bit in the last record: the same as a torn one.
        let mut flipped = whole.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 1;
        std::fs::write(&journal, &flipped).unwrap();
        let back = restored(&dir);
        assert_eq!(
            (back.generation(), back.documents(), back.mode_settings()),
            states[states.len() - 2]
        );
    }

    #[test]
    fn compaction_writes_the_snapshot_and_starts_the_journal_after_it() {
        let dir = temporary_dir("compact");
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&dir); }
        let (mut store, mut saved, _) = changes(&dir);
        // Grow the journal past the snapshot.
        let mut i = 0;
        while saved.journal.as_ref().unwrap().len() <= saved.snapshot_len {
            i += 1;
            apply(
                &mut store,
                &mut saved,
                vec![document("a", &format!("10.9.{i}.0/24"))],
            );
        }
        let snapshot_before = std::fs::read(dir.join(STATE_FILE)).unwrap();
        saved.compact_if_due(&store);
        assert_ne!(
            std::fs::read(dir.join(STATE_FILE)).unwrap(),
            snapshot_before
        );
        let (_, records, torn) = Journal::open(&dir.join(JOURNAL_FILE)).unwrap();
        assert_eq!(records.len(), 1, "only the snapshot record");
        assert!(!torn);
        assert_same(&restored(&dir), &store);
        // Not due again until it outgrows the new snapshot.
        apply(&mut store, &mut saved, vec![document("a", "10.8.0.0/16")]);
        let snapshot = std::fs::read(dir.join(STATE_FILE)).unwrap();
        saved.compact_if_due(&store);
        assert_eq!(std::fs::read(dir.join(STATE_FILE)).unwrap(), snapshot);
        assert_same(&restored(&dir), &store);
        // At a stop, whatever the journal holds goes into the snapshot.
        saved.compact_if_any(&store);
        let (_, records, _) = Journal::open(&dir.join(JOURNAL_FILE)).unwrap();
        assert_eq!(records.len(), 1);
        let snapshot: PersistedState =
            serde_json::from_slice(&std::fs::read(dir.join(STATE_FILE)).unwrap()).unwrap();
        assert_same(&PolicyStore::from_persisted(snapshot).unwrap(), &store);
    }

    #[test]
    fn a_journal_of_an_older_snapshot_is_ignored() {
        let dir = temporary_dir("older");
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&dir); }
        let (mut store, mut saved, _) = changes(&dir);
        let old_journal = std::fs::read(dir.join(JOURNAL_FILE)).unwrap();
        apply(&mut store, &mut saved, vec![document("a", "10.7.0.0/16")]);
        // A crash after the new snapshot, before the journal restarted.
        saved.write_snapshot(&store).unwrap();
        std::fs::write(dir.join(JOURNAL_FILE), &old_journal).unwrap();
        assert_same(&restored(&dir), &store);
    }

    #[test]
    fn without_a_journal_changes_are_saved_as_snapshots() {
        let dir = temporary_dir("nojournal");
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&dir); }
        let mut store = PolicyStore::default();
        let mut saved = SavedState::new(&dir);
        apply(&mut store, &mut saved, vec![document("a", "10.0.0.0/8")]);
        assert!(saved.journal.is_some(), "the snapshot starts a journal");
        assert_same(&restored(&dir), &store);
        assert!(load_state(&temporary_dir("empty")).unwrap().is_none());
    }
}
