//! Reading decisions and DNS answers off the ring buffer.

use std::io;

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};
use tollgate_common::{DnsEvent, FlowEvent, event_kind};

use crate::flow::decode_event;

/// One record of the ring buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Flow(FlowEvent),
    Dns(DnsMessage),
}

/// A DNS answer (or a TCP segment of a DNS stream) an endpoint received
/// from a trusted resolver, as the ingress program reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsMessage {
    pub header: DnsEvent,
    /// The UDP or TCP payload as copied (`header.payload_len` bytes).
    pub payload: Vec<u8>,
}

/// Decodes one ring buffer record; `None` for anything this agent does not
/// know or that is cut short.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    let kind = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    match kind {
        event_kind::FLOW => decode_event(bytes).map(Event::Flow),
        event_kind::DNS => {
            let header_len = size_of::<DnsEvent>();
            let header = bytes.get(..header_len)?;
            // SAFETY: length checked; DnsEvent is plain old data.
            let header = unsafe { header.as_ptr().cast::<DnsEvent>().read_unaligned() };
            let payload = bytes.get(header_len..header_len + header.payload_len as usize)?;
            Some(Event::Dns(DnsMessage {
                header,
                payload: payload.to_vec(),
            }))
        }
        _ => None,
    }
}

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
    pub async fn read(&mut self, out: &mut Vec<Event>, max: usize) -> io::Result<usize> {
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
    pub fn read_available(&mut self, out: &mut Vec<Event>, max: usize) -> usize {
        drain(self.ring.get_mut(), out, max, &mut self.undecodable)
    }

    /// Records on the ring buffer that were not events this agent knows.
    pub fn undecodable(&self) -> u64 {
        self.undecodable
    }
}

/// How often the reader looks for events nobody woke it for (the programs'
/// wakeup threshold, agent-ebpf/src/report.rs).
const POLL: std::time::Duration = std::time::Duration::from_millis(10);

fn drain(
    ring: &mut RingBuf<MapData>,
    out: &mut Vec<Event>,
    max: usize,
    undecodable: &mut u64,
) -> usize {
    let mut read = 0;
    while read < max {
        let Some(item) = ring.next() else { break };
        match decode(&item) {
            Some(event) => out.push(event),
            None => *undecodable += 1,
        }
        read += 1;
    }
    read
}
