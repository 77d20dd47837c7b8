//! Network namespaces of endpoints, by the cookie the kernel gives each
//! (`SO_NETNS_COOKIE`, 5.14; what `bpf_get_netns_cookie` returns). A DNS
//! query teaches only from its endpoint's own namespace (agent-ebpf
//! `dns.rs`), so the agent tells the kernel which namespace that is.
//!
//! A pod's namespace is its sandbox's: the runtime makes it, with the
//! sandbox's (pause) process, before any container of the pod starts. So
//! it is the namespace of the oldest process in the pod's cgroup tree; a
//! process of the pod that makes a namespace of its own later cannot pass
//! for it.

use std::{
    collections::HashMap,
    fs,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::Path,
};

/// The cookies of the namespaces seen so far, by the namespace file's
/// inode: finding a cookie takes a thread that enters the namespace, so
/// each is found once.
#[derive(Debug, Default)]
pub struct NetnsCookies {
    by_inode: HashMap<u64, u64>,
}

impl NetnsCookies {
    /// The cookie of the network namespace of the oldest process in the
    /// cgroup `dir` and below it; None while no process lives there, or
    /// where the kernel cannot tell cookies.
    pub fn of_oldest_process(&mut self, dir: &Path) -> Option<u64> {
        let namespace = of_oldest_process(dir)?;
        let inode = namespace.metadata().ok()?.ino();
        if let Some(&cookie) = self.by_inode.get(&inode) {
            return Some(cookie);
        }
        let cookie = cookie_of(namespace)?;
        self.by_inode.insert(inode, cookie);
        Some(cookie)
    }
}

/// The network namespace (its `/proc/PID/ns/net` file) of the oldest
/// process in the cgroup `dir` and below it: a pod's, for its directory.
pub fn of_oldest_process(dir: &Path) -> Option<fs::File> {
    let pid = oldest_process(dir)?;
    match fs::File::open(format!("/proc/{pid}/ns/net")) {
        Ok(namespace) => Some(namespace),
        Err(error) => {
            if error.kind() == std::io::ErrorKind::PermissionDenied {
                warn_once(
                    &OPEN_REFUSED,
                    "cannot open pods' network namespaces (the agent needs CAP_SYS_PTRACE for \
                     processes of other users): their packet sockets and DNS namespaces are not checked",
                );
            }
            None
        }
    }
}

static OPEN_REFUSED: std::sync::Once = std::sync::Once::new();
static ENTER_REFUSED: std::sync::Once = std::sync::Once::new();

/// Logs `message` the first time only: a missing privilege stays missing.
fn warn_once(once: &std::sync::Once, message: &'static str) {
    once.call_once(|| tracing::warn!("{message}"));
}

/// The process under `dir` (cgroup v2) that started first.
fn oldest_process(dir: &Path) -> Option<u32> {
    crate::cgroups::walk(dir)
        .into_iter()
        .filter_map(|(_, relative)| {
            fs::read_to_string(
                dir.join(relative.trim_start_matches('/'))
                    .join("cgroup.procs"),
            )
            .ok()
        })
        .flat_map(|procs| {
            procs
                .lines()
                .filter_map(|line| line.trim().parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .filter_map(|pid| Some((start_time(pid)?, pid)))
        .min()
        .map(|(_, pid)| pid)
}

/// When `pid` started, in clock ticks since boot (`/proc/PID/stat`, field
/// 22; fields are counted after the parenthesised name, which may hold
/// spaces).
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The cookie of `namespace` (a `/proc/PID/ns/net` or `/run/netns` file),
/// read from a socket made inside it by a thread of its own (entering a
/// namespace changes the calling thread's).
pub fn cookie_of(namespace: fs::File) -> Option<u64> {
    std::thread::spawn(move || {
        // SAFETY: a namespace file this thread holds; only this thread,
        // which ends here, enters it.
        if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) {
                warn_once(
                    &ENTER_REFUSED,
                    "cannot enter pods' network namespaces to read their cookies (the agent \
                     needs CAP_SYS_ADMIN): DNS answers to pods are not bound to their namespace",
                );
            }
            return None;
        }
        socket_netns_cookie()
    })
    .join()
    .ok()
    .flatten()
}

/// The cookie of the calling thread's network namespace.
pub fn socket_netns_cookie() -> Option<u64> {
    // SAFETY: no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new socket, owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a buffer of the length given.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    (result == 0 && cookie != 0).then_some(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_start_time_is_read_after_its_name() {
        let pid = std::process::id();
        assert!(start_time(pid).is_some());
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn the_own_namespace_has_a_cookie_where_the_kernel_tells_it() {
        // 5.14 and later: every kernel this runs on in CI.
        assert!(socket_netns_cookie().is_some());
    }
}
