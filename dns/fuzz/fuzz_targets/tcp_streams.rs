//! DNS over TCP reassembly on arbitrary segment sequences: it never panics
//! and never holds more than its bounds allow.
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tollgate_dns::tcp::{MAX_BUFFERED, Streams};

const MAX_STREAMS: usize = 64;

#[derive(Arbitrary, Debug)]
enum Op {
    /// The resolver's SYN: segments of streams not opened are ignored.
    Open {
        cookie: u8,
    },
    /// A segment at `offset` from the stream's base sequence number, so
    /// that segments of one stream overlap and leave gaps.
    Segment {
        cookie: u8,
        offset: u16,
        payload: Vec<u8>,
    },
    /// A large segment of one repeated byte, to reach the bytes bound.
    Fill {
        cookie: u8,
        offset: u16,
        len: u16,
        byte: u8,
    },
    /// One-byte segments on many streams, to reach the streams bound.
    Spread {
        first: u16,
        count: u8,
    },
    Wait {
        millis: u16,
    },
    Expire {
        idle_millis: u16,
    },
    Remove {
        cookie: u8,
    },
}

/// Stream bases spread over the sequence space, some right before the wrap.
fn base(cookie: u64) -> u32 {
    (cookie as u32).wrapping_mul(0x9e37_79b9).wrapping_sub(1000)
}

/// Pushes a segment at `offset` from the stream's base. What it completes
/// comes from the segment and from what the stream held, at most
/// MAX_BUFFERED bytes.
fn push(streams: &mut Streams, cookie: u64, offset: u16, payload: &[u8], now: Instant) {
    let seq = base(cookie).wrapping_add(u32::from(offset));
    let framed: usize = streams
        .push(cookie, seq, payload, now)
        .iter()
        .map(|message| 2 + message.len())
        .sum();
    assert!(
        framed <= payload.len() + MAX_BUFFERED,
        "more message bytes out than in"
    );
}

fuzz_target!(|ops: Vec<Op>| {
    // A small bound on streams, so that reaching it is cheap.
    let mut streams = Streams::with_max_streams(MAX_STREAMS);
    let start = Instant::now();
    let mut elapsed = Duration::ZERO;
    for op in ops {
        let now = start + elapsed;
        match op {
            Op::Open { cookie } => streams.open(cookie.into(), base(cookie.into()), now),
            Op::Segment {
                cookie,
                offset,
                payload,
            } => push(&mut streams, cookie.into(), offset, &payload, now),
            Op::Fill {
                cookie,
                offset,
                len,
                byte,
            } => push(
                &mut streams,
                cookie.into(),
                offset,
                &vec![byte; len.into()],
                now,
            ),
            Op::Spread { first, count } => {
                for cookie in u64::from(first)..u64::from(first) + u64::from(count) {
                    streams.open(cookie, base(cookie), now);
                    push(&mut streams, cookie, 0, &[0], now);
                }
            }
            Op::Wait { millis } => elapsed += Duration::from_millis(millis.into()),
            Op::Expire { idle_millis } => {
                streams.expire(now, Duration::from_millis(idle_millis.into()))
            }
            Op::Remove { cookie } => streams.remove(cookie.into()),
        }
        assert!(streams.len() <= MAX_STREAMS);
    }
    assert!(streams.buffered_bytes() <= streams.len() * MAX_BUFFERED);
});
