//! Writing out what an iterator yields, without collecting it first: a
//! sequence or a map of 100k entries collected only to be written is
//! 100k allocations made and freed beside long-lived state.

use std::cell::Cell;

use serde::{Serialize, Serializer, ser::Error};

/// The items of an iterator, written as a sequence, once.
pub struct Seq<I>(Cell<Option<I>>);

/// The (key, value) items of an iterator, written as a map, once.
pub struct Map<I>(Cell<Option<I>>);

impl<I> Seq<I> {
    pub fn new(items: I) -> Self {
        Self(Cell::new(Some(items)))
    }
}

impl<I> Map<I> {
    pub fn new(items: I) -> Self {
        Self(Cell::new(Some(items)))
    }
}

impl<I> Serialize for Seq<I>
where
    I: Iterator,
    I::Item: Serialize,
{
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let items = self
            .0
            .take()
            .ok_or_else(|| S::Error::custom("written twice"))?;
        serializer.collect_seq(items)
    }
}

impl<I, K, V> Serialize for Map<I>
where
    I: Iterator<Item = (K, V)>,
    K: Serialize,
    V: Serialize,
{
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let items = self
            .0
            .take()
            .ok_or_else(|| S::Error::custom("written twice"))?;
        serializer.collect_map(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_what_collecting_would() {
        let pairs = [("a", 1), ("b", 2)];
        assert_eq!(
            serde_json::to_string(&Seq::new(pairs.iter())).unwrap(),
            serde_json::to_string(&pairs.to_vec()).unwrap()
        );
        let map: std::collections::BTreeMap<_, _> = pairs.into_iter().collect();
        assert_eq!(
            serde_json::to_string(&Map::new(pairs.into_iter())).unwrap(),
            serde_json::to_string(&map).unwrap()
        );
    }

    #[test]
    fn a_second_write_is_an_error_not_an_empty_list() {
        let seq = Seq::new([1, 2].into_iter());
        serde_json::to_string(&seq).unwrap();
        assert!(serde_json::to_string(&seq).is_err());
    }
}
