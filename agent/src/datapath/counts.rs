//! Allowed flows counted in the kernel (the aggregate mode): the programs
//! count each flow's allowed decisions in one of two halves
//! (`TG_ALLOWED_A`/`_B`, as `Config::allowed_counts` names) and report only
//! the first decision of a flow in a half. At the end of an interval the
//! agent points the programs at the other half, waits until no program
//! still counts in the old one, and empties it: every decision is in
//! exactly one half's count, read once.

use aya::maps::{HashMap, MapData};
use tollgate_common::{AllowedCount, FlowDedupKey, allowed_counts, flow_flags, map_names};

use super::{DatapathError, map_err, raw_bpf::ProgramsBarrier};

/// One of the two counting halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Half {
    A,
    B,
}

impl Half {
    pub fn other(self) -> Self {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }

    /// The `Config::allowed_counts` value that counts in this half.
    pub fn config_value(self) -> u8 {
        match self {
            Self::A => allowed_counts::IN_A,
            Self::B => allowed_counts::IN_B,
        }
    }

    /// The half a `Config::allowed_counts` value counts in (None: off).
    pub fn of_config(value: u8) -> Option<Self> {
        match value {
            allowed_counts::IN_A => Some(Self::A),
            allowed_counts::IN_B => Some(Self::B),
            _ => None,
        }
    }

    /// The half an event's flow is counted in, if the event opened a count
    /// (`flow_flags::COUNTED`).
    pub fn of_event_flags(flags: u8) -> Option<Self> {
        if flags & flow_flags::COUNTED == 0 {
            None
        } else if flags & flow_flags::COUNTED_IN_B != 0 {
            Some(Self::B)
        } else {
            Some(Self::A)
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// The two pinned halves, and the wait for programs still using one.
pub struct AllowedCounts {
    halves: [HashMap<MapData, FlowDedupKey, AllowedCount>; 2],
    barrier: ProgramsBarrier,
}

impl AllowedCounts {
    pub(super) fn new(
        a: HashMap<MapData, FlowDedupKey, AllowedCount>,
        b: HashMap<MapData, FlowDedupKey, AllowedCount>,
    ) -> Result<Self, DatapathError> {
        let barrier = ProgramsBarrier::new().map_err(DatapathError::Barrier)?;
        Ok(Self {
            halves: [a, b],
            barrier,
        })
    }

    /// Returns once no program that may have read the config before the
    /// call still runs: after a switch of halves, the old half is no
    /// longer counted in.
    pub fn wait_for_programs(&self) -> Result<(), DatapathError> {
        self.barrier.wait().map_err(DatapathError::Barrier)
    }

    /// Empties `half` and returns its flows' counts. Only for a half no
    /// program counts in (after [`Self::wait_for_programs`]); the flows are
    /// read first and then deleted, so a failure part way loses no count
    /// (the next take reads what is left).
    pub fn take(&mut self, half: Half) -> Result<Vec<(FlowDedupKey, AllowedCount)>, DatapathError> {
        let name = match half {
            Half::A => map_names::ALLOWED_COUNTS_A,
            Half::B => map_names::ALLOWED_COUNTS_B,
        };
        let map = &mut self.halves[half.index()];
        let flows = map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(name))?;
        for (key, _) in &flows {
            map.remove(key).map_err(map_err(name))?;
        }
        Ok(flows)
    }
}
