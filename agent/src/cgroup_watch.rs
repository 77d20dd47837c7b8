//! Noticing new and removed cgroups at once: an inotify watch on every
//! directory of the cgroup tree (cgroup2 reports mkdir and rmdir to inotify).
//! What it sees is kept in a [`CgroupIndex`], which the enforcer selects
//! endpoints from.

use std::{
    collections::HashMap,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor},
};
use tokio::io::{Interest, unix::AsyncFd};

use crate::cgroups::{CgroupIndex, relative_path};

struct Fd(Inotify);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub struct CgroupWatcher {
    root: PathBuf,
    inotify: AsyncFd<Fd>,
    directories: HashMap<WatchDescriptor, PathBuf>,
    index: CgroupIndex,
}

const EVENTS: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_ONLYDIR);

impl CgroupWatcher {
    /// Watches `root` and every cgroup below it.
    pub fn new(root: &Path) -> std::io::Result<Self> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        // SAFETY: the AsyncFd owns the inotify instance, whose fd stays open
        // and the same for as long as it lives.
        let inotify = unsafe { AsyncFd::register_with_interest(Fd(inotify), Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let mut watcher = Self {
            root: root.to_owned(),
            inotify,
            directories: HashMap::new(),
            index: CgroupIndex::default(),
        };
        let found = watcher.watch_tree(root);
        watcher.index.replace(found);
        Ok(watcher)
    }

    pub fn watched(&self) -> usize {
        self.directories.len()
    }

    /// The cgroups as this watcher sees them, kept up to date by
    /// [`Self::changed`] and [`Self::rewatch`].
    pub fn index(&self) -> CgroupIndex {
        self.index.clone()
    }

    /// Waits until cgroups were created or removed (all changes so far are
    /// consumed). New directories are watched before this returns, and so is
    /// anything created below them in the meantime.
    pub async fn changed(&mut self) -> std::io::Result<()> {
        loop {
            let mut guard = self.inotify.readable().await?;
            match guard.get_inner().0.read_events() {
                Ok(events) => {
                    drop(guard);
                    let mut created = Vec::new();
                    let mut rescan = false;
                    for event in &events {
                        if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                            // Events were lost: look at the whole tree again.
                            rescan = true;
                        } else if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                            self.directories.remove(&event.wd);
                        } else if let (Some(dir), Some(name)) =
                            (self.directories.get(&event.wd), &event.name)
                            && event.mask.contains(AddWatchFlags::IN_ISDIR)
                        {
                            let path = dir.join(name);
                            if event.mask.contains(AddWatchFlags::IN_CREATE) {
                                created.push(path);
                            } else if event.mask.contains(AddWatchFlags::IN_DELETE) {
                                // Made and removed within one read: not
                                // looked at below, and not indexed.
                                created.retain(|c| *c != path);
                                self.index.remove(&relative_path(&self.root, &path));
                            }
                        }
                    }
                    if rescan {
                        self.rewatch();
                    } else {
                        for dir in created {
                            let found = self.watch_tree(&dir);
                            self.index.insert(found);
                        }
                    }
                    if !events.is_empty() {
                        return Ok(());
                    }
                }
                Err(Errno::EAGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Watches the whole tree again: for directories whose creation was
    /// not reported (the periodic rescan calls this).
    pub fn rewatch(&mut self) {
        let found = self.watch_tree(&self.root.clone());
        self.index.replace(found);
    }

    /// Adding a watch twice is harmless. A directory that vanishes meanwhile
    /// is simply not watched; other failures (the inotify watch limit) are
    /// logged, and those cgroups wait for the periodic rescan to be
    /// watched (they are indexed all the same). Returns every cgroup found,
    /// as (id, path relative to the watched root).
    fn watch_tree(&mut self, root: &Path) -> Vec<(u64, String)> {
        use std::os::unix::fs::{DirEntryExt, MetadataExt};
        let mut found = Vec::new();
        // Ids below the subtree's top come from the directory entries: kernfs
        // gives each entry its node's inode number, so no stat per cgroup.
        let Ok(top) = std::fs::metadata(root) else {
            return found;
        };
        let mut stack = vec![(top.ino(), root.to_path_buf())];
        let mut failed = 0;
        let mut first_error = None;
        while let Some((id, dir)) = stack.pop() {
            match self.inotify.get_ref().0.add_watch(&dir, EVENTS) {
                Ok(wd) => {
                    self.directories.insert(wd, dir.clone());
                }
                Err(Errno::ENOENT) => continue,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            found.push((id, relative_path(&self.root, &dir)));
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| (e.ino(), e.path())),
            );
        }
        if let Some(error) = first_error {
            tracing::warn!(failed, %error, "cannot watch some cgroups (fs.inotify.max_user_watches?); the periodic rescan finds them");
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn wait(watcher: &mut CgroupWatcher) {
        tokio::time::timeout(Duration::from_secs(5), watcher.changed())
            .await
            .expect("a change")
            .unwrap();
    }

    #[tokio::test]
    async fn reports_created_and_removed_directories_at_any_depth() {
        let root = std::env::temp_dir().join(format!("tg-watch-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a")).unwrap();
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&root); }
        let mut watcher = CgroupWatcher::new(&root).unwrap();
        assert_eq!(watcher.watched(), 2);
        std::fs::create_dir(root.join("a/b")).unwrap();
        wait(&mut watcher).await;
        assert_eq!(watcher.watched(), 3, "the new directory is watched too");
        std::fs::create_dir(root.join("a/b/c")).unwrap();
        wait(&mut watcher).await;
        assert_eq!(watcher.watched(), 4);

        std::fs::remove_dir(root.join("a/b/c")).unwrap();
        wait(&mut watcher).await;
        assert_eq!(
            watcher.watched(),
            3,
            "a removed directory is no longer watched"
        );
    }

    fn indexed(watcher: &CgroupWatcher) -> Vec<(u64, String)> {
        let index = watcher.index();
        let index = index.lock();
        let mut paths: Vec<(u64, String)> =
            index.iter().map(|(id, c)| (id, c.path.clone())).collect();
        paths.sort_by(|a, b| a.1.cmp(&b.1));
        paths
    }

    fn walked(root: &Path) -> Vec<(u64, String)> {
        let mut paths = crate::cgroups::walk(root);
        paths.sort_by(|a, b| a.1.cmp(&b.1));
        paths
    }

    #[tokio::test]
    async fn the_index_holds_what_a_walk_finds_through_creations_and_removals() {
        let root = std::env::temp_dir().join(format!("tg-watch-index-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("a")).unwrap();
        scopeguard::defer! { let _ = std::fs::remove_dir_all(&root); }
        let mut watcher = CgroupWatcher::new(&root).unwrap();
        assert_eq!(indexed(&watcher), walked(&root));
        let version = watcher.index().lock().version();
        // A subtree made at once, deeper than the events report one by one.
        std::fs::create_dir_all(root.join("b/c/d")).unwrap();
        std::fs::create_dir(root.join("a/e")).unwrap();
        while indexed(&watcher) != walked(&root) {
            wait(&mut watcher).await;
        }
        assert!(watcher.index().lock().version() > version);
        assert_eq!(indexed(&watcher).len(), 6);
        std::fs::remove_dir(root.join("b/c/d")).unwrap();
        std::fs::remove_dir(root.join("a/e")).unwrap();
        while indexed(&watcher) != walked(&root) {
            wait(&mut watcher).await;
        }
        assert_eq!(
            indexed(&watcher)
                .into_iter()
                .map(|(_, path)| path)
                .collect::<Vec<_>>(),
            ["/", "/a", "/b", "/b/c"]
        );
        // A directory the events missed is found by a rescan.
        std::fs::create_dir(root.join("a/f")).unwrap();
        wait(&mut watcher).await;
        watcher.rewatch();
        assert_eq!(indexed(&watcher), walked(&root));
    }
}
