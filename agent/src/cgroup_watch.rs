//! Noticing new and removed cgroups at once: an inotify watch on every
//! directory of the cgroup tree (cgroup2 reports mkdir and rmdir to inotify).

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
        };
        watcher.watch_tree(root);
        Ok(watcher)
    }

    pub fn watched(&self) -> usize {
        self.directories.len()
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
                    for event in &events {
                        if event.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                            // Events were lost: look at the whole tree again.
                            created.push(self.root.clone());
                        } else if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                            self.directories.remove(&event.wd);
                        } else if event
                            .mask
                            .contains(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ISDIR)
                            && let (Some(dir), Some(name)) =
                                (self.directories.get(&event.wd), &event.name)
                        {
                            created.push(dir.join(name));
                        }
                    }
                    for dir in created {
                        self.watch_tree(&dir);
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
        self.watch_tree(&self.root.clone());
    }

    /// Adding a watch twice is harmless. A directory that vanishes meanwhile
    /// is simply not watched; other failures (the inotify watch limit) are
    /// logged, and those cgroups wait for the periodic rescan.
    fn watch_tree(&mut self, root: &Path) {
        let mut stack = vec![root.to_path_buf()];
        let mut failed = 0;
        let mut first_error = None;
        while let Some(dir) = stack.pop() {
            match self.inotify.get_ref().0.add_watch(&dir, EVENTS) {
                Ok(wd) => {
                    self.directories.insert(wd, dir.clone());
                }
                Err(Errno::ENOENT) => continue,
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                    continue;
                }
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        if let Some(error) = first_error {
            tracing::warn!(failed, %error, "cannot watch some cgroups (fs.inotify.max_user_watches?); the periodic rescan finds them");
        }
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
}
