//! Finding the cgroup v2 and bpffs mounts from /proc/self/mountinfo.
//!
//! The parsing is pure so it can be tested on the layouts seen in the field
//! (unified, hybrid and legacy hosts).

use std::path::PathBuf;

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

/// The cgroup v2 mount of this host: /sys/fs/cgroup on unified hosts,
/// /sys/fs/cgroup/unified on hybrid ones.
pub fn cgroup2_mount() -> std::io::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mount_points(&mountinfo, "cgroup2")
        .into_iter()
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no cgroup2 filesystem is mounted",
            )
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
