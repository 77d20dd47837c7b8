//! What a changed rule set changes, prefix by prefix. A switch whose whole
//! change is one such entry of one set in force (a rule added for a prefix
//! of its own, removed, or given other ports; in a set without FQDN lists
//! a list carries positions, not orders, so a rule added before others
//! changes only its own entry) rewrites that entry where it is instead of
//! writing the set anew under a new id: one map write rather than the
//! set's thousands, and still one moment at which every decision
//! goes from the old rules to the new (the kernel replaces an entry whole).
//! A change of two entries or more is written as a new set and switched to
//! by generation: rewriting two entries in place would let a decision for
//! one address see the new rules while another still sees the old.

use std::{collections::HashMap, hash::Hash};

/// One entry's change: `key`'s list goes from `old` to `new` (`None`: no
/// entry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PrefixWrite<K, V> {
    pub key: K,
    pub old: Option<V>,
    pub new: Option<V>,
}

impl<K: Copy, V: Copy> PrefixWrite<K, V> {
    /// The write that takes this one back.
    pub fn undo(&self) -> Self {
        Self {
            key: self.key,
            old: self.new,
            new: self.old,
        }
    }
}

/// The entries whose lists differ between `old` and `new` (prefix ->
/// list) by `same`: those only `new` has, those both have with other
/// lists, those only `old` has.
pub(super) fn prefix_writes<'a, K, V>(
    old: &'a [(K, V)],
    new: &'a [(K, V)],
    same: impl Fn(&V, &V) -> bool,
) -> Vec<PrefixWrite<K, &'a V>>
where
    K: Copy + Eq + Hash,
{
    let before: HashMap<K, &V> = old.iter().map(|(key, list)| (*key, list)).collect();
    let mut writes = Vec::new();
    let mut kept = std::collections::HashSet::with_capacity(new.len());
    for (key, list) in new {
        kept.insert(*key);
        let was = before.get(key).copied();
        if !was.is_some_and(|was| same(was, list)) {
            writes.push(PrefixWrite {
                key: *key,
                old: was,
                new: Some(list),
            });
        }
    }
    writes.extend(
        old.iter()
            .filter(|(key, _)| !kept.contains(key))
            .map(|(key, list)| PrefixWrite {
                key: *key,
                old: Some(list),
                new: None,
            }),
    );
    writes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_differs_is_written() {
        let old = [(1, 1), (2, 2), (3, 3)];
        let new = [(1, 1), (2, 9), (4, 4)];
        let writes: Vec<(u8, Option<u8>, Option<u8>)> = prefix_writes(&old, &new, u8::eq)
            .iter()
            .map(|w| (w.key, w.old.copied(), w.new.copied()))
            .collect();
        assert_eq!(
            writes,
            [
                (2, Some(2), Some(9)),
                (4, None, Some(4)),
                (3, Some(3), None)
            ]
        );
        assert!(prefix_writes(&old, &old, u8::eq).is_empty());
        let odd = |a: &u8, b: &u8| a % 2 == b % 2;
        assert_eq!(
            prefix_writes(&old, &[(1, 3), (2, 4), (3, 5)], odd).len(),
            0,
            "lists the same by `same` are not written"
        );
    }
}
