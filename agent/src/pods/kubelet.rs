//! The cgroup layouts kubelet makes on cgroup v2 nodes, parsed into pod
//! identity. Pure: the caller walks or watches the tree.
//!
//! systemd driver (AKS default):
//!   /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope
//!   /kubepods.slice/kubepods-pod<uid_>.slice/crio-<id>.scope            (Guaranteed: no QoS level)
//!   pod UIDs are written with `_` for `-`; scopes are cri-containerd-, crio- or docker-.
//! cgroupfs driver:
//!   /kubepods/besteffort/pod<uid>/<id>
//!   /kubepods/pod<uid>/<id>                                              (Guaranteed)

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerCgroup {
    /// None with the cgroupfs driver, whose paths do not say.
    pub runtime: Option<Runtime>,
    pub id: String,
}

/// What a cgroup path says about the pod it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// With dashes, as the Kubernetes API writes it.
    pub pod_uid: String,
    pub qos: QosClass,
    /// None for the pod's own cgroup (and for CRI-O's conmon scope).
    pub container: Option<ContainerCgroup>,
}

/// Parses a cgroup path relative to the cgroup2 mount ("/kubepods.slice/...").
/// Paths outside kubepods, and the kubepods and QoS cgroups themselves, are
/// not pods.
pub fn parse(path: &str) -> Option<PodCgroup> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let start = segments
        .iter()
        .position(|s| *s == "kubepods.slice" || *s == "kubepods")?;
    let rest = &segments[start + 1..];
    if segments[start] == "kubepods.slice" {
        parse_systemd(rest)
    } else {
        parse_cgroupfs(rest)
    }
}

fn parse_systemd(rest: &[&str]) -> Option<PodCgroup> {
    let (qos, pod_segment, container_segment) = match rest {
        [first, ..] if first.starts_with("kubepods-pod") => {
            (QosClass::Guaranteed, *first, rest.get(1))
        }
        [qos_slice, pod, ..] => {
            let qos = match *qos_slice {
                "kubepods-burstable.slice" => QosClass::Burstable,
                "kubepods-besteffort.slice" => QosClass::BestEffort,
                _ => return None,
            };
            (qos, *pod, rest.get(2))
        }
        _ => return None,
    };
    let prefix = match qos {
        QosClass::Guaranteed => "kubepods-pod",
        QosClass::Burstable => "kubepods-burstable-pod",
        QosClass::BestEffort => "kubepods-besteffort-pod",
    };
    let uid = pod_segment
        .strip_prefix(prefix)?
        .strip_suffix(".slice")?
        .replace('_', "-");
    let container = container_segment.and_then(|scope| systemd_container(scope));
    valid_uid(&uid).then_some(PodCgroup {
        pod_uid: uid,
        qos,
        container,
    })
}

fn systemd_container(scope: &str) -> Option<ContainerCgroup> {
    let name = scope.strip_suffix(".scope")?;
    // CRI-O's monitor process, not a container of the pod.
    if name.starts_with("crio-conmon-") {
        return None;
    }
    let (runtime, id) = if let Some(id) = name.strip_prefix("cri-containerd-") {
        (Runtime::Containerd, id)
    } else if let Some(id) = name.strip_prefix("crio-") {
        (Runtime::CriO, id)
    } else if let Some(id) = name.strip_prefix("docker-") {
        (Runtime::Docker, id)
    } else {
        return None;
    };
    valid_container_id(id).then(|| ContainerCgroup {
        runtime: Some(runtime),
        id: id.to_owned(),
    })
}

fn parse_cgroupfs(rest: &[&str]) -> Option<PodCgroup> {
    let (qos, pod_segment, container_segment) = match rest {
        [first, ..] if first.starts_with("pod") => (QosClass::Guaranteed, *first, rest.get(1)),
        ["burstable", pod, ..] => (QosClass::Burstable, *pod, rest.get(2)),
        ["besteffort", pod, ..] => (QosClass::BestEffort, *pod, rest.get(2)),
        _ => return None,
    };
    let uid = pod_segment.strip_prefix("pod")?.to_owned();
    let container = container_segment
        .filter(|id| valid_container_id(id))
        .map(|id| ContainerCgroup {
            runtime: None,
            id: (*id).to_owned(),
        });
    valid_uid(&uid).then_some(PodCgroup {
        pod_uid: uid,
        qos,
        container,
    })
}

/// 8-4-4-4-12 hexadecimal digits.
fn valid_uid(uid: &str) -> bool {
    let groups: Vec<&str> = uid.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Container ids are 64 hexadecimal digits.
fn valid_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f5b6e2a-1c3d-4e5f-8a9b-0c1d2e3f4a5b";
    const UID_: &str = "0f5b6e2a_1c3d_4e5f_8a9b_0c1d2e3f4a5b";
    const ID: &str = "3f2c9a8b7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a";

    fn container(runtime: Option<Runtime>) -> Option<ContainerCgroup> {
        Some(ContainerCgroup {
            runtime,
            id: ID.into(),
        })
    }

    #[test]
    fn systemd_driver_every_qos_class_and_runtime() {
        let cases = [
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
                ),
                QosClass::Burstable,
                Some(Runtime::Containerd),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"
                ),
                QosClass::BestEffort,
                Some(Runtime::CriO),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{ID}.scope"),
                QosClass::Guaranteed,
                Some(Runtime::Docker),
            ),
        ];
        for (path, qos, runtime) in cases {
            assert_eq!(
                parse(&path),
                Some(PodCgroup {
                    pod_uid: UID.into(),
                    qos,
                    container: container(runtime)
                }),
                "{path}"
            );
        }
    }

    #[test]
    fn cgroupfs_driver_every_qos_class() {
        for (qos_dir, qos) in [
            ("burstable/", QosClass::Burstable),
            ("besteffort/", QosClass::BestEffort),
            ("", QosClass::Guaranteed),
        ] {
            let path = format!("/kubepods/{qos_dir}pod{UID}/{ID}");
            assert_eq!(
                parse(&path),
                Some(PodCgroup {
                    pod_uid: UID.into(),
                    qos,
                    container: container(None)
                }),
                "{path}"
            );
        }
    }

    #[test]
    fn pod_cgroups_conmon_and_nested_cgroups() {
        let pod =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice");
        assert_eq!(parse(&pod).unwrap().container, None);
        assert_eq!(
            parse(&format!("{pod}/crio-conmon-{ID}.scope"))
                .unwrap()
                .container,
            None
        );
        // A cgroup inside a container's (e.g. systemd in the container) is that container's.
        let nested = format!("{pod}/cri-containerd-{ID}.scope/init.scope");
        assert_eq!(
            parse(&nested).unwrap().container,
            container(Some(Runtime::Containerd))
        );
        // kubepods below another prefix, as on some hybrid hosts.
        assert!(parse(&format!("/system.slice/kubepods/pod{UID}")).is_some());
    }

    #[test]
    fn not_pods() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/kubepods.slice",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podnot_a_uid.slice",
            "/kubepods/pod1234",
            "/kubepods.slice/kubepods-gold.slice/kubepods-gold-pod0f5b6e2a_1c3d_4e5f_8a9b_0c1d2e3f4a5b.slice",
        ] {
            assert_eq!(parse(path), None, "{path}");
        }
        // An unknown scope inside a pod is the pod's, not a container.
        let odd = format!("/kubepods.slice/kubepods-pod{UID_}.slice/something-{ID}.scope");
        assert_eq!(parse(&odd).unwrap().container, None);
    }
}
