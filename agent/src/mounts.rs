//! Finding the cgroup v2 and bpffs mounts from /proc/self/mountinfo.
//!
//! The parsing is pure so it can be tested on the layouts seen in the field
//! (unified, hybrid and legacy hosts).

use std::path::{Path, PathBuf};

/// Mount points of the given filesystem type, in mountinfo order.
pub fn mount_points(mountinfo: &str, fs_type: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options [optional...] - type source super
            let (before, after) = line.split_once(" - ")?;
            let ty = after.split_whitespace().next()?;
            if ty != fs_type {
                return None;
            }
            let mount_point = before.split_whitespace().nth(4)?;
            Some(PathBuf::from(unescape_octal(mount_point)))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 mount to use: the one that holds `cgroup` when it is
/// given (in a pod, the host's tree mounted from a hostPath, not the
/// container's own /sys/fs/cgroup), else the first (/sys/fs/cgroup on
/// unified hosts, /sys/fs/cgroup/unified on hybrid ones).
pub fn choose_cgroup2_mount(mounts: &[PathBuf], cgroup: Option<&Path>) -> Option<PathBuf> {
    match cgroup {
        Some(cgroup) => mounts
            .iter()
            .filter(|m| cgroup.starts_with(m))
            .max_by_key(|m| m.components().count())
            .cloned(),
        None => mounts.first().cloned(),
    }
}

/// [`choose_cgroup2_mount`] on this process's mounts.
pub fn cgroup2_mount(cgroup: Option<&Path>) -> std::io::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    choose_cgroup2_mount(&mount_points(&mountinfo, "cgroup2"), cgroup).ok_or_else(|| {
        let what = match cgroup {
            Some(cgroup) => format!(
                "no cgroup2 filesystem is mounted at or above {}",
                cgroup.display()
            ),
            None => "no cgroup2 filesystem is mounted".to_owned(),
        };
        std::io::Error::new(std::io::ErrorKind::NotFound, what)
    })
}

/// Where bpffs is mounted, if anywhere.
pub fn bpffs_mounts() -> std::io::Result<Vec<PathBuf>> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mount_points(&mountinfo, "bpf"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
40 25 0:33 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:15 - bpf bpf rw,mode=700
";

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        assert_eq!(
            mount_points(HYBRID, "cgroup2"),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
    }

    #[test]
    fn finds_bpffs() {
        assert_eq!(
            mount_points(HYBRID, "bpf"),
            vec![PathBuf::from("/sys/fs/bpf")]
        );
    }

    #[test]
    fn in_a_pod_the_mount_holding_the_given_cgroup_wins() {
        let mounts = [
            PathBuf::from("/sys/fs/cgroup"),
            PathBuf::from("/host/sys/fs/cgroup"),
        ];
        let host_root = Path::new("/host/sys/fs/cgroup");
        assert_eq!(
            choose_cgroup2_mount(&mounts, Some(host_root)),
            Some(mounts[1].clone())
        );
        assert_eq!(
            choose_cgroup2_mount(
                &mounts,
                Some(Path::new("/host/sys/fs/cgroup/kubepods.slice"))
            ),
            Some(mounts[1].clone())
        );
        assert_eq!(choose_cgroup2_mount(&mounts, None), Some(mounts[0].clone()));
        assert_eq!(
            choose_cgroup2_mount(&mounts, Some(Path::new("/elsewhere"))),
            None
        );
    }

    #[test]
    fn legacy_host_has_no_cgroup2() {
        let legacy = "33 31 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert!(mount_points(legacy, "cgroup2").is_empty());
    }

    #[test]
    fn optional_fields_and_escapes() {
        let line = "50 1 0:40 / /mnt/with\\040space rw shared:3 master:1 - cgroup2 none rw\n";
        assert_eq!(
            mount_points(line, "cgroup2"),
            vec![PathBuf::from("/mnt/with space")]
        );
    }
}
