//! Per-rule hit counters (`TG_RULE_HITS`): each rule's and each policy
//! default's decisions by verdict and the time of its last one, counted by
//! the programs per CPU in the slot of the rule id (agent-ebpf `report.rs`).
//! The map is pinned, so the counts outlive the agent and can be read while
//! it is away (`tollgate-agent rules`).

use std::{collections::BTreeMap, path::Path};

use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use tollgate_common::{RuleHits, capacity, map_names};

use super::{DatapathError, map_err};

/// One rule's hits, summed over the CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleHitCount {
    pub allowed: u64,
    pub denied: u64,
    pub audit: u64,
    /// CLOCK_MONOTONIC ns of the last decision (the latest of the CPUs');
    /// 0: never.
    pub last_hit_ns: u64,
}

impl RuleHitCount {
    pub fn total(&self) -> u64 {
        self.allowed + self.denied + self.audit
    }

    fn sum(values: &PerCpuValues<RuleHits>) -> Self {
        values.iter().fold(Self::default(), |sum, cpu| Self {
            allowed: sum.allowed + cpu.allowed,
            denied: sum.denied + cpu.denied,
            audit: sum.audit + cpu.audit,
            last_hit_ns: sum.last_hit_ns.max(cpu.last_hit_ns),
        })
    }

    /// The last hit as wall-clock time (ns since the Unix epoch), if any.
    pub fn last_hit_unix_ns(&self) -> Option<u64> {
        monotonic_to_unix_ns(self.last_hit_ns)
    }
}

/// The pinned counters.
pub struct RuleHitsMap {
    map: PerCpuArray<MapData, RuleHits>,
}

impl RuleHitsMap {
    pub(super) fn new(map: PerCpuArray<MapData, RuleHits>) -> Self {
        Self { map }
    }

    /// Opens the counters pinned under `pin_dir` (`<bpffs-root>/v<N>`)
    /// without loading anything: for a reader while the agent is down.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self, DatapathError> {
        let path = pin_dir.join("maps").join(map_names::RULE_HITS);
        let data = MapData::from_pin(&path).map_err(map_err(map_names::RULE_HITS))?;
        let map =
            PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(map_err(map_names::RULE_HITS))?;
        Ok(Self { map })
    }

    /// The hits of each of `ids` that has a slot (ids at or above the
    /// map's capacity are not counted, and left out).
    pub fn read(
        &self,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<BTreeMap<u32, RuleHitCount>, DatapathError> {
        let mut hits = BTreeMap::new();
        for id in ids {
            if id == 0 || id >= self.map.len() {
                continue;
            }
            let values = self
                .map
                .get(&id, 0)
                .map_err(map_err(map_names::RULE_HITS))?;
            hits.insert(id, RuleHitCount::sum(&values));
        }
        Ok(hits)
    }

    /// Zeroes the slots of `ids`: an id that leaves force, or is about to
    /// be handed to a new rule, starts over.
    pub fn zero(&mut self, ids: impl IntoIterator<Item = u32>) -> Result<(), DatapathError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, error)| DatapathError::Map {
            name: map_names::RULE_HITS,
            source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: error,
            }),
        })?;
        for id in ids {
            if id == 0 || id >= self.map.len() {
                continue;
            }
            let zeros = PerCpuValues::try_from(vec![RuleHits::default(); cpus]).map_err(|e| {
                DatapathError::Map {
                    name: map_names::RULE_HITS,
                    source: aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                        call: "bpf_map_update_elem",
                        io_error: e,
                    }),
                }
            })?;
            self.map
                .set(id, zeros, 0)
                .map_err(map_err(map_names::RULE_HITS))?;
        }
        Ok(())
    }
}

const _: () = assert!(capacity::RULE_HITS > 1);

/// CLOCK_MONOTONIC ns (what `bpf_ktime_get_ns` reads) as ns since the Unix
/// epoch, by the current offset between the two clocks; None for 0.
pub fn monotonic_to_unix_ns(monotonic_ns: u64) -> Option<u64> {
    if monotonic_ns == 0 {
        return None;
    }
    let now = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a valid timespec to write to.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
    };
    let offset = now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC);
    u64::try_from(monotonic_ns as i128 + offset).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_monotonic_time_becomes_the_wall_time_it_was() {
        assert_eq!(monotonic_to_unix_ns(0), None);
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let monotonic = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let converted = monotonic_to_unix_ns(monotonic).unwrap();
        assert!(
            converted.abs_diff(wall) < 1_000_000_000,
            "{converted} vs {wall}"
        );
    }
}
