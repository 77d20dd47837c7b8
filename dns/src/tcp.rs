//! DNS over TCP reassembly from the segments the kernel copies from an
//! endpoint's receive path. Each message on the stream is prefixed with its
//! length, two bytes big-endian (RFC 7766 8).
//!
//! The copies are of packets, not of the socket's byte stream: they come
//! with retransmissions, overlaps and reordering, and lost copies never
//! come. Streams are bounded in number and in bytes held, so peers cannot
//! make the agent hold more than [`MAX_STREAMS`] × [`MAX_BUFFERED`] bytes
//! (by default); a stream past its bound is dropped, as is one left idle.
//!
//! Only a stream seen to start (the resolver's SYN) is framed. Framing from
//! any other byte would read a length prefix where there is none, and a
//! peer who controls the bytes there (a TXT record, say) could make them
//! frame a forged answer. So segments of a stream not opened, or dropped
//! since, are ignored: their answers are not learned.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// Streams followed at once by default; a new one beyond the limit drops the
/// one seen least recently.
pub const MAX_STREAMS: usize = 4096;
/// Bytes held per stream: an incomplete message and the segments past a
/// gap. The largest message with its length prefix (65,537 bytes) still
/// fits, since its last byte completes it.
pub const MAX_BUFFERED: usize = 64 * 1024;
/// Segments past a gap held per stream, which bounds the bookkeeping of
/// many tiny segments.
pub const MAX_AHEAD_SEGMENTS: usize = 256;

/// DNS over TCP streams, keyed by socket cookie.
#[derive(Debug)]
pub struct Streams {
    max_streams: usize,
    streams: HashMap<u64, Stream>,
    /// (last seen, cookie) of every stream, the least recent first: what
    /// makes room and what expires is found without a scan.
    recency: BTreeSet<(Instant, u64)>,
}

#[derive(Debug)]
struct Stream {
    /// Sequence number of the stream's first byte.
    start_seq: u32,
    /// Bytes received in order since the start: the offset of the next one
    /// expected. Offsets are 64-bit so that sequence numbers wrap only here.
    consumed: u64,
    /// In-order bytes not yet a whole message, from its length prefix on.
    pending: Vec<u8>,
    /// Segments past a gap, by offset, never overlapping one another.
    ahead: BTreeMap<u64, Vec<u8>>,
    ahead_bytes: usize,
    last_seen: Instant,
}

impl Default for Streams {
    fn default() -> Self {
        Self::with_max_streams(MAX_STREAMS)
    }
}

impl Streams {
    pub fn new() -> Self {
        Self::default()
    }

    /// Follows at most `max_streams` streams (at least one).
    pub fn with_max_streams(max_streams: usize) -> Self {
        Self {
            max_streams: max_streams.max(1),
            streams: HashMap::new(),
            recency: BTreeSet::new(),
        }
    }

    /// Starts following the stream of `cookie`, whose first byte has the
    /// sequence number `first_seq` (the SYN's plus one). A stream followed
    /// already is left as it is: a retransmitted SYN starts nothing anew.
    pub fn open(&mut self, cookie: u64, first_seq: u32, now: Instant) {
        if self.streams.contains_key(&cookie) {
            return;
        }
        if self.streams.len() >= self.max_streams
            && let Some((_, least_recent)) = self.recency.pop_first()
        {
            self.streams.remove(&least_recent);
        }
        self.recency.insert((now, cookie));
        self.streams.insert(
            cookie,
            Stream {
                start_seq: first_seq,
                consumed: 0,
                pending: Vec::new(),
                ahead: BTreeMap::new(),
                ahead_bytes: 0,
                last_seen: now,
            },
        );
    }

    /// Takes in one segment's payload, with the sequence number of its first
    /// byte, and returns the messages it completes, in stream order. A
    /// segment of a stream not followed (not opened, or dropped) is ignored.
    pub fn push(&mut self, cookie: u64, seq: u32, payload: &[u8], now: Instant) -> Vec<Vec<u8>> {
        let Some(stream) = self.streams.get_mut(&cookie) else {
            return Vec::new();
        };
        self.recency.remove(&(stream.last_seen, cookie));
        self.recency.insert((now, cookie));
        stream.last_seen = now;
        stream.take(seq, payload);
        let messages = stream.complete_messages();
        if stream.pending.len() + stream.ahead_bytes > MAX_BUFFERED
            || stream.ahead.len() > MAX_AHEAD_SEGMENTS
        {
            // What it completed is sound; what is left would never fit.
            self.remove(cookie);
        }
        debug_assert_eq!(self.recency.len(), self.streams.len());
        messages
    }

    /// Drops the streams that have seen no segment for `idle` or longer.
    pub fn expire(&mut self, now: Instant, idle: Duration) {
        while let Some(&(last_seen, cookie)) = self.recency.first() {
            if now.saturating_duration_since(last_seen) < idle {
                break;
            }
            self.recency.pop_first();
            self.streams.remove(&cookie);
        }
        debug_assert_eq!(self.recency.len(), self.streams.len());
    }

    /// Forgets a stream, when its socket closes.
    pub fn remove(&mut self, cookie: u64) {
        if let Some(stream) = self.streams.remove(&cookie) {
            self.recency.remove(&(stream.last_seen, cookie));
        }
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Payload bytes held over all streams.
    pub fn buffered_bytes(&self) -> usize {
        self.streams
            .values()
            .map(|stream| stream.pending.len() + stream.ahead_bytes)
            .sum()
    }
}

impl Stream {
    fn take(&mut self, seq: u32, payload: &[u8]) {
        // Where the segment lies relative to the next byte expected: within
        // 2 GiB either way, as TCP's own sequence comparisons assume.
        let next_seq = self.start_seq.wrapping_add(self.consumed as u32);
        let delta = i64::from(seq.wrapping_sub(next_seq) as i32);
        let consumed = self.consumed as i64;
        let start = consumed + delta;
        let end = start + payload.len() as i64;
        if end <= consumed {
            return; // a retransmission of what was consumed already
        }
        if start <= consumed {
            let fresh = &payload[(consumed - start) as usize..];
            self.pending.extend_from_slice(fresh);
            self.consumed = end as u64;
            self.take_ahead();
        } else {
            self.hold_ahead(start as u64, payload);
        }
    }

    /// Holds the parts of a segment past the gap that are not held yet.
    fn hold_ahead(&mut self, mut offset: u64, mut data: &[u8]) {
        if let Some((&start, held)) = self.ahead.range(..=offset).next_back() {
            let covered = (start + held.len() as u64).saturating_sub(offset);
            let skip = data.len().min(covered as usize);
            offset += skip as u64;
            data = &data[skip..];
        }
        while !data.is_empty() {
            let next = self
                .ahead
                .range(offset..)
                .next()
                .map(|(&start, held)| (start, held.len()));
            let gap = match next {
                Some((start, _)) => data.len().min((start - offset) as usize),
                None => data.len(),
            };
            if gap > 0 {
                self.ahead.insert(offset, data[..gap].to_vec());
                self.ahead_bytes += gap;
            }
            let skip = match next {
                Some((_, held)) if gap < data.len() => data.len().min(gap + held),
                _ => gap,
            };
            offset += skip as u64;
            data = &data[skip..];
        }
    }

    /// Moves the held segments that the stream has now reached to `pending`.
    fn take_ahead(&mut self) {
        while let Some(entry) = self.ahead.first_entry() {
            let offset = *entry.key();
            if offset > self.consumed {
                break;
            }
            let data = entry.remove();
            self.ahead_bytes -= data.len();
            let end = offset + data.len() as u64;
            if end > self.consumed {
                let fresh = &data[(self.consumed - offset) as usize..];
                self.pending.extend_from_slice(fresh);
                self.consumed = end;
            }
        }
    }

    fn complete_messages(&mut self) -> Vec<Vec<u8>> {
        let mut messages = Vec::new();
        let mut at = 0;
        while let Some(&[high, low]) = self.pending.get(at..at + 2) {
            let end = at + 2 + usize::from(u16::from_be_bytes([high, low]));
            let Some(message) = self.pending.get(at + 2..end) else {
                break;
            };
            messages.push(message.to_vec());
            at = end;
        }
        self.pending.drain(..at);
        messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Messages on a stream, each with its length prefix.
    fn framed(messages: &[&[u8]]) -> Vec<u8> {
        let mut stream = Vec::new();
        for message in messages {
            stream.extend_from_slice(&(message.len() as u16).to_be_bytes());
            stream.extend_from_slice(message);
        }
        stream
    }

    const ISN: u32 = 1_000;

    /// Streams with the stream of `cookie` open at `first_seq`.
    fn opened(cookie: u64, first_seq: u32, now: Instant) -> Streams {
        let mut streams = Streams::new();
        streams.open(cookie, first_seq, now);
        streams
    }

    #[test]
    fn one_message_in_one_segment() {
        let now = Instant::now();
        let mut streams = opened(1, ISN, now);
        assert_eq!(
            streams.push(1, ISN, &framed(&[b"hello"]), now),
            vec![b"hello".to_vec()]
        );
        assert_eq!(streams.buffered_bytes(), 0);
    }

    #[test]
    fn split_anywhere_including_the_length_prefix() {
        let bytes = framed(&[b"first", b"second!"]);
        for cut in 0..=bytes.len() {
            let now = Instant::now();
            let mut streams = opened(7, ISN, now);
            let mut got = streams.push(7, ISN, &bytes[..cut], now);
            got.extend(streams.push(7, ISN + cut as u32, &bytes[cut..], now));
            assert_eq!(
                got,
                vec![b"first".to_vec(), b"second!".to_vec()],
                "cut {cut}"
            );
        }
    }

    #[test]
    fn several_messages_in_one_segment_and_an_empty_one() {
        let now = Instant::now();
        let mut streams = opened(1, ISN, now);
        let got = streams.push(1, ISN, &framed(&[b"a", b"", b"ccc"]), now);
        assert_eq!(got, vec![b"a".to_vec(), Vec::new(), b"ccc".to_vec()]);
    }

    #[test]
    fn exact_retransmissions_are_ignored() {
        let bytes = framed(&[b"one", b"two"]);
        let now = Instant::now();
        let mut streams = opened(1, ISN, now);
        assert_eq!(
            streams.push(1, ISN, &bytes[..5], now),
            vec![b"one".to_vec()]
        );
        assert!(streams.push(1, ISN, &bytes[..5], now).is_empty());
        assert_eq!(
            streams.push(1, ISN + 5, &bytes[5..], now),
            vec![b"two".to_vec()]
        );
        assert!(streams.push(1, ISN + 5, &bytes[5..], now).is_empty());
        assert_eq!(streams.buffered_bytes(), 0);
    }

    #[test]
    fn partial_overlaps_skip_what_was_consumed() {
        let bytes = framed(&[b"abcdef", b"ghij"]);
        let now = Instant::now();
        let mut streams = opened(1, ISN, now);
        assert!(streams.push(1, ISN, &bytes[..4], now).is_empty());
        // Repeats bytes 2..4 and completes the first message.
        assert_eq!(
            streams.push(1, ISN + 2, &bytes[2..9], now),
            vec![b"abcdef".to_vec()]
        );
        // Repeats byte 8 and brings the rest.
        assert_eq!(
            streams.push(1, ISN + 8, &bytes[8..], now),
            vec![b"ghij".to_vec()]
        );
    }

    #[test]
    fn out_of_order_segments_wait_for_the_gap() {
        let bytes = framed(&[b"first", b"second"]);
        let now = Instant::now();
        let mut streams = opened(1, ISN, now);
        assert!(streams.push(1, ISN, &bytes[..3], now).is_empty());
        assert!(streams.push(1, ISN + 10, &bytes[10..], now).is_empty());
        // Overlaps both the gap's end and the held segment.
        assert!(streams.push(1, ISN + 6, &bytes[6..12], now).is_empty());
        assert_eq!(
            streams.push(1, ISN + 3, &bytes[3..7], now),
            vec![b"first".to_vec(), b"second".to_vec()]
        );
        assert_eq!(streams.buffered_bytes(), 0);
    }

    #[test]
    fn sequence_numbers_wrap() {
        let bytes = framed(&[b"across the wrap"]);
        let isn = u32::MAX - 4;
        let now = Instant::now();
        let mut streams = opened(1, isn, now);
        assert!(streams.push(1, isn, &bytes[..3], now).is_empty());
        assert!(
            streams
                .push(1, isn.wrapping_add(8), &bytes[8..], now)
                .is_empty()
        );
        assert_eq!(
            streams.push(1, isn.wrapping_add(3), &bytes[3..8], now),
            vec![b"across the wrap".to_vec()]
        );
    }

    #[test]
    fn the_largest_message_fits() {
        let message = vec![0xab; usize::from(u16::MAX)];
        let bytes = framed(&[&message]);
        let now = Instant::now();
        let mut streams = opened(1, ISN, now);
        let mut got = Vec::new();
        for (i, chunk) in bytes.chunks(1400).enumerate() {
            got.extend(streams.push(1, ISN + (i * 1400) as u32, chunk, now));
        }
        assert_eq!(got, vec![message]);
        assert_eq!(streams.len(), 1);
    }

    #[test]
    fn too_much_held_drops_the_stream() {
        let now = Instant::now();
        let mut streams = opened(1, ISN, now);
        streams.push(1, ISN, &[0xff, 0xff], now); // a 65,535-byte message
        streams.push(1, ISN + 2, &[0; 1000], now);
        // Past a gap of one byte, enough to go over the bound.
        streams.push(1, ISN + 1003, &vec![0; MAX_BUFFERED - 1000], now);
        assert!(streams.is_empty());
        // What follows is not framed: the stream's start is gone.
        assert!(
            streams
                .push(1, ISN + 1002, &framed(&[b"x"]), now)
                .is_empty()
        );
        assert!(streams.is_empty());
    }

    #[test]
    fn too_many_held_segments_drop_the_stream() {
        let now = Instant::now();
        let mut streams = opened(1, ISN, now);
        for i in 0..=MAX_AHEAD_SEGMENTS as u32 {
            streams.push(1, ISN + 2 + 2 * i, b"x", now);
        }
        assert!(streams.is_empty());
    }

    #[test]
    fn idle_streams_expire() {
        let start = Instant::now();
        let mut streams = opened(1, ISN, start);
        streams.push(1, ISN, &[0, 5], start);
        streams.open(2, ISN, start + Duration::from_secs(20));
        streams.push(2, ISN, &[0, 5], start + Duration::from_secs(20));
        streams.expire(start + Duration::from_secs(30), Duration::from_secs(30));
        assert_eq!(streams.len(), 1);
        assert_eq!(streams.push(2, ISN + 2, b"later", start).len(), 1);
        assert!(
            streams.push(1, ISN + 2, b"later", start).is_empty(),
            "an expired stream is not framed again"
        );
        streams.remove(2);
        assert!(streams.is_empty());
    }

    #[test]
    fn a_stream_not_seen_to_start_is_never_framed() {
        // Bytes that frame a message only when read from the middle: the
        // start of a TXT answer's data, say, that a peer chose.
        let mut inner = framed(&[b"forged answer"]);
        inner.insert(0, b'?');
        let now = Instant::now();
        let mut streams = Streams::new();
        assert!(streams.push(3, ISN + 1, &inner[1..], now).is_empty());
        assert!(streams.is_empty());
        // A retransmitted SYN does not restart a stream under way.
        streams.open(3, ISN, now);
        assert!(streams.push(3, ISN, &[0, 20, 1, 2], now).is_empty());
        streams.open(3, ISN + 2, now);
        // Read as the old stream's bytes 2..5, not as a message of its own.
        assert!(streams.push(3, ISN + 2, &framed(&[b"x"]), now).is_empty());
        assert_eq!(streams.buffered_bytes(), 5);
    }

    #[test]
    fn the_least_recent_stream_makes_room() {
        let mut streams = Streams::new();
        let start = Instant::now();
        for cookie in 0..MAX_STREAMS as u64 {
            streams.open(cookie, ISN, start + Duration::from_millis(cookie));
        }
        // Stream 0 is seen again, so stream 1 is the least recent.
        streams.push(0, ISN, &[3], start + Duration::from_secs(60));
        streams.open(u64::MAX, ISN, start + Duration::from_secs(61));
        assert_eq!(streams.len(), MAX_STREAMS);
        assert!(streams.streams.contains_key(&0));
        assert!(!streams.streams.contains_key(&1));
        assert!(streams.streams.contains_key(&2));
    }

    proptest! {
        /// However a stream is cut, reordered and repeated, every message
        /// comes out once, in order, as long as the bounds are kept.
        #[test]
        fn reassembles_any_delivery(
            messages in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..8),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
            order in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
            isn in any::<u32>(),
        ) {
            let refs: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
            let bytes = framed(&refs);
            let mut bounds: Vec<usize> = cuts.iter().map(|cut| cut.index(bytes.len())).collect();
            bounds.extend([0, bytes.len()]);
            bounds.sort_unstable();
            bounds.dedup();
            // Segments, possibly overlapping their neighbours by a few bytes.
            let segments: Vec<(usize, usize)> = bounds
                .windows(2)
                .map(|w| (w[0].saturating_sub(3), w[1]))
                .collect();
            // Deliveries: random picks (repeats, reordering), then all in order
            // so that every gap is filled in the end.
            let deliveries = order
                .iter()
                .map(|pick| segments[pick.index(segments.len())])
                .chain(segments.iter().copied());
            let now = Instant::now();
            let mut streams = opened(9, isn, now);
            let mut got = Vec::new();
            for (start, end) in deliveries {
                got.extend(streams.push(9, isn.wrapping_add(start as u32), &bytes[start..end], now));
            }
            prop_assert_eq!(got, messages);
            prop_assert_eq!(streams.buffered_bytes(), 0);
        }
    }
}
