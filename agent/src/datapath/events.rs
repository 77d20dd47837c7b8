//! Reading decisions off the ring buffer.

use std::io;

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};
use tollgate_common::FlowEvent;

use crate::flow::decode_event;

/// Reads `TG_EVENTS` without blocking the runtime.
pub struct EventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    undecodable: u64,
}

impl EventReader {
    pub(super) fn new(ring: RingBuf<MapData>) -> io::Result<Self> {
        // SAFETY: the ring buffer owns its map fd for as long as it lives and
        // always returns that same fd; the AsyncFd owns the ring buffer.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        Ok(Self {
            ring,
            undecodable: 0,
        })
    }

    /// Waits until at least one event is available, then appends up to `max`
    /// of them to `out`.
    pub async fn read(&mut self, out: &mut Vec<FlowEvent>, max: usize) -> io::Result<usize> {
        loop {
            // The programs wake the agent only once events pile up; below
            // that, they wait for this poll.
            let Ok(ready) = tokio::time::timeout(POLL, self.ring.readable_mut()).await else {
                let read = self.read_available(out, max);
                if read > 0 {
                    return Ok(read);
                }
                continue;
            };
            let mut guard = ready?;
            let read = drain(guard.get_inner_mut(), out, max, &mut self.undecodable);
            if read > 0 {
                return Ok(read);
            }
            guard.clear_ready();
            // An event submitted between the empty read and clear_ready would
            // otherwise wait for the next one: look once more.
            let read = drain(guard.get_inner_mut(), out, max, &mut self.undecodable);
            if read > 0 {
                return Ok(read);
            }
        }
    }

    /// Appends up to `max` events that are available now, without waiting.
    pub fn read_available(&mut self, out: &mut Vec<FlowEvent>, max: usize) -> usize {
        drain(self.ring.get_mut(), out, max, &mut self.undecodable)
    }

    /// Records on the ring buffer that were not flow events this agent knows.
    pub fn undecodable(&self) -> u64 {
        self.undecodable
    }
}

/// How often the reader looks for events nobody woke it for (the programs'
/// wakeup threshold, agent-ebpf/src/report.rs).
const POLL: std::time::Duration = std::time::Duration::from_millis(10);

fn drain(
    ring: &mut RingBuf<MapData>,
    out: &mut Vec<FlowEvent>,
    max: usize,
    undecodable: &mut u64,
) -> usize {
    let mut read = 0;
    while read < max {
        let Some(item) = ring.next() else { break };
        match decode_event(&item) {
            Some(event) => out.push(event),
            None => *undecodable += 1,
        }
        read += 1;
    }
    read
}
