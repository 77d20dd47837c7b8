//! Which policies select which endpoints. Without Kubernetes, endpoints are
//! cgroups, selected by `cgroupSelector.paths`.

use std::collections::BTreeMap;

use super::{cgroup_glob, model::Policy};

/// cgroup id -> indexes of the policies whose cgroup globs match its path.
/// Cgroups no policy selects are left out.
pub fn select_cgroups(policies: &[Policy], cgroups: &[(u64, String)]) -> BTreeMap<u64, Vec<usize>> {
    let mut selected = BTreeMap::new();
    for (id, path) in cgroups {
        let selecting: Vec<usize> = policies
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.selector
                    .cgroups
                    .iter()
                    .any(|glob| cgroup_glob::matches(glob, path))
            })
            .map(|(i, _)| i)
            .collect();
        if !selecting.is_empty() {
            selected.insert(*id, selecting);
        }
    }
    selected
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::*;

    fn host_policy(name: &str, globs: &[&str]) -> Policy {
        Policy {
            key: PolicyKey {
                namespace: None,
                name: name.into(),
            },
            mode: PolicyMode::Inherit,
            default_action: Action::Deny,
            selector: Selector {
                pods: None,
                cgroups: globs.iter().map(|g| g.to_string()).collect(),
            },
            rules: vec![],
        }
    }

    #[test]
    fn selects_by_glob() {
        let policies = [
            host_policy("a", &["/app/*"]),
            host_policy("b", &["/app/web", "/db"]),
        ];
        let cgroups = [
            (1, "/".into()),
            (2, "/app".into()),
            (3, "/app/web".into()),
            (4, "/app/api".into()),
            (5, "/db".into()),
        ];
        let selected = select_cgroups(&policies, &cgroups);
        assert_eq!(
            selected,
            BTreeMap::from([(3, vec![0, 1]), (4, vec![0]), (5, vec![1])])
        );
    }
}
