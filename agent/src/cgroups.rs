//! Cgroup ids and paths. A cgroup v2 id is the inode number of its directory.

use crate::pods::kubelet::{self, PodCgroup};
use foldhash::{HashMap, HashMapExt};
use std::{
    collections::BTreeMap,
    os::unix::fs::{DirEntryExt, MetadataExt},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

/// The id the kernel reports for the cgroup at `path`.
pub fn cgroup_id(path: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(path)?.ino())
}

/// What is known of a cgroup from its place in the tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupInfo {
    /// Relative to the cgroup2 mount ("/" is the root).
    pub path: String,
    /// The pod (and container) whose cgroup this is, by kubelet's layout.
    pub pod: Option<PodCgroup>,
}

/// Maps cgroup ids to paths relative to the cgroup2 mount ("/" is the root).
///
/// Ids are learned by walking the tree; an unknown id triggers a new walk at
/// most once per `min_rescan_interval`, so a burst of events from a cgroup
/// that is already gone costs one walk, not one per event.
pub struct CgroupPaths {
    root: PathBuf,
    paths: HashMap<u64, CgroupInfo>,
    last_scan: Option<Instant>,
    min_rescan_interval: Duration,
}

impl CgroupPaths {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            paths: HashMap::new(),
            last_scan: None,
            min_rescan_interval: Duration::from_millis(100),
        }
    }

    pub fn resolve(&mut self, id: u64) -> Option<&CgroupInfo> {
        if !self.paths.contains_key(&id) {
            let due = self
                .last_scan
                .is_none_or(|t| t.elapsed() >= self.min_rescan_interval);
            if due {
                self.rescan();
            }
        }
        self.paths.get(&id)
    }

    fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        self.paths = walk(&self.root)
            .into_iter()
            .map(|(id, path)| {
                (
                    id,
                    CgroupInfo {
                        pod: kubelet::parse(&path),
                        path,
                    },
                )
            })
            .collect();
    }
}

/// Every cgroup of the tree by id, as the cgroup watcher
/// ([`crate::cgroup_watch::CgroupWatcher`]) sees it: filled by its first
/// walk, kept by the creations and removals inotify reports, replaced
/// whole by its rescans. The enforcer selects endpoints from it instead of
/// walking the tree on each change. A handle: clones share one index.
#[derive(Clone, Debug, Default)]
pub struct CgroupIndex(Arc<Mutex<IndexedCgroups>>);

#[derive(Debug, Default)]
pub struct IndexedCgroups {
    by_id: BTreeMap<u64, CgroupInfo>,
    by_path: HashMap<String, u64>,
    /// Moves on with every change, so that what was worked out from the
    /// index can be known to be current.
    version: u64,
}

impl IndexedCgroups {
    /// Every cgroup, by id.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &CgroupInfo)> + Clone {
        self.by_id.iter().map(|(&id, info)| (id, info))
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    fn insert(&mut self, id: u64, path: String) {
        if self.by_id.get(&id).is_some_and(|known| known.path == path) {
            return;
        }
        // A path reused by a new cgroup, or an id by a new path.
        if let Some(old) = self.by_path.remove(&path) {
            self.by_id.remove(&old);
        }
        if let Some(old) = self.by_id.remove(&id) {
            self.by_path.remove(&old.path);
        }
        self.by_path.insert(path.clone(), id);
        self.by_id.insert(
            id,
            CgroupInfo {
                pod: kubelet::parse(&path),
                path,
            },
        );
        self.version += 1;
    }

    fn remove_path(&mut self, path: &str) {
        if let Some(id) = self.by_path.remove(path) {
            self.by_id.remove(&id);
            self.version += 1;
        }
    }
}

impl CgroupIndex {
    /// The index as it is now; changes wait until the guard is dropped.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, IndexedCgroups> {
        // Nothing panics while holding it with the index half changed.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds cgroups found (id, path relative to the cgroup2 mount).
    pub fn insert(&self, found: impl IntoIterator<Item = (u64, String)>) {
        let mut index = self.lock();
        for (id, path) in found {
            index.insert(id, path);
        }
    }

    /// Forgets the cgroup at `path` (relative to the cgroup2 mount).
    pub fn remove(&self, path: &str) {
        self.lock().remove_path(path);
    }

    /// Makes the index hold exactly `found`.
    pub fn replace(&self, found: Vec<(u64, String)>) {
        let mut index = self.lock();
        let keep: std::collections::HashSet<u64> = found.iter().map(|(id, _)| *id).collect();
        let gone: Vec<String> = index
            .by_id
            .iter()
            .filter(|(id, _)| !keep.contains(id))
            .map(|(_, info)| info.path.clone())
            .collect();
        for path in gone {
            index.remove_path(&path);
        }
        for (id, path) in found {
            index.insert(id, path);
        }
    }
}

/// The path of `dir` relative to `root`, as the index and [`walk`] give
/// it ("/" for the root itself).
pub fn relative_path(root: &Path, dir: &Path) -> String {
    let relative = dir.strip_prefix(root).unwrap_or(dir);
    format!("/{}", relative.display())
}

/// Every cgroup below `root` (included), as (id, path relative to `root`).
pub fn walk(root: &Path) -> Vec<(u64, String)> {
    let mut found = Vec::new();
    let Ok(meta) = std::fs::metadata(root) else {
        return found;
    };
    // Below the root, ids come from the directory entries: kernfs gives
    // each entry its node's inode number, so no stat per cgroup.
    let mut stack = vec![(meta.ino(), root.to_path_buf())];
    while let Some((id, dir)) = stack.pop() {
        found.push((id, relative_path(root, &dir)));
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((entry.ino(), entry.path()));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_walk_of_the_cgroup_tree_gives_each_cgroup_its_id() {
        let root = crate::mounts::cgroup2_mount(None).expect("a cgroup2 mount");
        let walked = walk(&root);
        assert!(!walked.is_empty());
        for (id, path) in walked.iter().take(200) {
            let dir = root.join(path.trim_start_matches('/'));
            // A cgroup may go away meanwhile; those that stay must agree.
            if let Ok(stat_id) = cgroup_id(&dir) {
                assert_eq!(*id, stat_id, "{path}");
            }
        }
    }

    #[test]
    fn resolves_directories_by_inode() {
        let root = std::env::temp_dir().join(format!("tg-cgpaths-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&root); }
        let mut paths = CgroupPaths::new(root.clone());
        let id = cgroup_id(&root.join("a/b")).unwrap();
        assert_eq!(paths.resolve(id).map(|c| c.path.as_str()), Some("/a/b"));
        assert_eq!(
            paths
                .resolve(cgroup_id(&root).unwrap())
                .map(|c| c.path.as_str()),
            Some("/")
        );
        assert_eq!(paths.resolve(u64::MAX), None);
    }
}
