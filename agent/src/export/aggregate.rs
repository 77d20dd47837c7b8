//! Interval aggregates of allowed flows: one record per source cgroup,
//! destination, port, protocol and rule per interval, counting the
//! connections it stands for. Denied and audit decisions never come here:
//! each is reported on its own.
//!
//! Pure bookkeeping on kernel events and their CLOCK_MONOTONIC times; the
//! caller enriches and publishes what comes out.

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt};

use tollgate_common::{FlowDedupKey, FlowEvent, Verdict};

/// An aggregate that closed: its first connection's event, and how many
/// connections it stands for up to the last one's time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aggregate {
    pub first: FlowEvent,
    pub count: u64,
    pub last_ts_ns: u64,
}

pub struct Aggregator {
    interval_ns: u64,
    max_open: usize,
    open: HashMap<FlowDedupKey, Aggregate>,
    /// Open keys by their first connection's time: the order they close in.
    closing: VecDeque<(u64, FlowDedupKey)>,
}

/// What `offer` did with an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    /// Counted into an open aggregate.
    Absorbed,
    /// To be reported on its own: not an allowed flow, or too many
    /// aggregates are open already (nothing is ever dropped here).
    ReportNow,
}

impl Aggregator {
    /// At most `max_open` aggregates are held at once; beyond that, new
    /// flows are reported one by one until some close.
    pub fn new(interval_ns: u64, max_open: usize) -> Self {
        Self {
            interval_ns,
            max_open,
            open: HashMap::new(),
            closing: VecDeque::new(),
        }
    }

    /// Takes an event, in time order. Aggregates whose interval ended by
    /// its time are closed into `closed` first, so none outlasts its
    /// interval.
    pub fn offer(&mut self, event: &FlowEvent, closed: &mut Vec<Aggregate>) -> Offered {
        self.close_due(event.ts_ns, closed);
        if Verdict::from_u8(event.verdict) != Some(Verdict::Allowed) {
            return Offered::ReportNow;
        }
        let key = FlowDedupKey {
            cgroup_id: event.cgroup_id,
            dst_addr: event.dst_addr,
            dst_port: event.dst_port,
            protocol: event.protocol,
            family: event.family,
            rule_id: event.rule_id,
            hook: event.hook,
            verdict: event.verdict,
            _pad: [0; 6],
        };
        if let Some(open) = self.open.get_mut(&key) {
            open.count += 1;
            open.last_ts_ns = open.last_ts_ns.max(event.ts_ns);
            return Offered::Absorbed;
        }
        if self.open.len() >= self.max_open {
            return Offered::ReportNow;
        }
        self.open.insert(
            key,
            Aggregate {
                first: *event,
                count: 1,
                last_ts_ns: event.ts_ns,
            },
        );
        self.closing.push_back((event.ts_ns, key));
        Offered::Absorbed
    }

    /// Moves the aggregates whose interval has ended by `now_ns` into
    /// `closed`, oldest first; called on a timer too, for quiet times.
    pub fn close_due(&mut self, now_ns: u64, closed: &mut Vec<Aggregate>) {
        while let Some(&(opened, key)) = self.closing.front() {
            if now_ns.saturating_sub(opened) < self.interval_ns {
                break;
            }
            self.closing.pop_front();
            closed.extend(self.open.remove(&key));
        }
    }

    /// Closes the aggregates whose first connection was decided under
    /// `generation` (before its rule names are forgotten), oldest first.
    pub fn close_generation(&mut self, generation: u32, closed: &mut Vec<Aggregate>) {
        let open = &mut self.open;
        self.closing.retain(|(_, key)| {
            let of_generation = open
                .get(key)
                .is_some_and(|a| a.first.generation == generation);
            if of_generation {
                closed.extend(open.remove(key));
            }
            !of_generation
        });
    }

    /// Closes every aggregate (at a stop), oldest first.
    pub fn close_all(&mut self, closed: &mut Vec<Aggregate>) {
        self.close_due(u64::MAX, closed);
    }

    pub fn open(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tollgate_common::Verdict;

    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn event(verdict: Verdict, cgroup_id: u64, port: u16, ts_ns: u64) -> FlowEvent {
        FlowEvent {
            verdict: verdict as u8,
            cgroup_id,
            dst_port: port,
            ts_ns,
            dst_addr: [10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ..FlowEvent::default()
        }
    }

    #[test]
    fn allowed_flows_are_counted_per_interval_and_key() {
        let mut aggregator = Aggregator::new(10 * SECOND, 100);
        let mut closed = Vec::new();
        for ts in [SECOND, 2 * SECOND, 9 * SECOND] {
            let offered = aggregator.offer(&event(Verdict::Allowed, 7, 443, ts), &mut closed);
            assert_eq!(offered, Offered::Absorbed);
        }
        aggregator.offer(&event(Verdict::Allowed, 7, 80, 3 * SECOND), &mut closed);
        aggregator.close_due(10 * SECOND, &mut closed);
        assert_eq!(closed, [], "no interval has ended yet");
        aggregator.close_due(11 * SECOND, &mut closed);
        assert_eq!(closed.len(), 1);
        assert_eq!(
            (closed[0].first.dst_port, closed[0].first.ts_ns),
            (443, SECOND)
        );
        assert_eq!((closed[0].count, closed[0].last_ts_ns), (3, 9 * SECOND));
        // The same flow after its interval opens a new aggregate.
        closed.clear();
        aggregator.offer(&event(Verdict::Allowed, 7, 443, 12 * SECOND), &mut closed);
        assert_eq!(closed, [], "port 80's interval lasts until 13 s");
        aggregator.offer(&event(Verdict::Allowed, 7, 443, 20 * SECOND), &mut closed);
        let counts = |closed: &[Aggregate]| -> Vec<_> {
            closed.iter().map(|a| (a.first.dst_port, a.count)).collect()
        };
        assert_eq!(
            counts(&closed),
            [(80, 1)],
            "an offer closes what ended by its time"
        );
        aggregator.offer(&event(Verdict::Denied, 7, 1, 22 * SECOND), &mut closed);
        assert_eq!(counts(&closed), [(80, 1), (443, 2)]);
        assert_eq!(aggregator.open(), 0);
    }

    #[test]
    fn aggregates_of_a_generation_close_together() {
        let mut aggregator = Aggregator::new(10 * SECOND, 100);
        let mut closed = Vec::new();
        for (port, generation) in [(1, 7), (2, 8), (3, 7)] {
            let mut event = event(Verdict::Allowed, 1, port, SECOND);
            event.generation = generation;
            aggregator.offer(&event, &mut closed);
        }
        aggregator.close_generation(7, &mut closed);
        let ports: Vec<u16> = closed.iter().map(|a| a.first.dst_port).collect();
        assert_eq!(ports, [1, 3], "oldest first");
        closed.clear();
        aggregator.close_all(&mut closed);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].first.generation, 8);
    }

    #[test]
    fn denied_and_audit_decisions_are_never_aggregated() {
        let mut aggregator = Aggregator::new(10 * SECOND, 100);
        for verdict in [Verdict::Denied, Verdict::Audit] {
            for ts in [SECOND, 2 * SECOND] {
                let offered = aggregator.offer(&event(verdict, 7, 443, ts), &mut Vec::new());
                assert_eq!(offered, Offered::ReportNow);
            }
        }
        assert_eq!(aggregator.open(), 0);
    }

    #[test]
    fn beyond_the_bound_flows_are_reported_one_by_one() {
        let mut aggregator = Aggregator::new(10 * SECOND, 2);
        let mut offer = |cgroup_id, ts| {
            aggregator.offer(&event(Verdict::Allowed, cgroup_id, 1, ts), &mut Vec::new())
        };
        assert_eq!(offer(1, 0), Offered::Absorbed);
        assert_eq!(offer(2, 0), Offered::Absorbed);
        assert_eq!(offer(3, 0), Offered::ReportNow);
        assert_eq!(offer(1, 5), Offered::Absorbed);
    }

    proptest! {
        /// Every allowed connection is counted exactly once, whatever the
        /// order of offers and closes.
        #[test]
        fn every_connection_is_counted_once(
            steps in prop::collection::vec((0u64..4, 0u16..3, 0u64..30, any::<bool>(), any::<bool>()), 0..200),
        ) {
            let mut aggregator = Aggregator::new(10 * SECOND, 5);
            let (mut offered, mut reported_now, mut closed) = (0u64, 0u64, Vec::new());
            let mut now = 0;
            for (cgroup, port, advance, allowed, close) in steps {
                now += advance * SECOND / 3;
                let verdict = if allowed { Verdict::Allowed } else { Verdict::Denied };
                offered += 1;
                if aggregator.offer(&event(verdict, cgroup, port, now), &mut closed) == Offered::ReportNow {
                    reported_now += 1;
                }
                if close {
                    aggregator.close_due(now, &mut closed);
                }
            }
            aggregator.close_all(&mut closed);
            let aggregated: u64 = closed.iter().map(|a| a.count).sum();
            prop_assert_eq!(aggregated + reported_now, offered);
            for aggregate in &closed {
                prop_assert!(aggregate.last_ts_ns - aggregate.first.ts_ns < 10 * SECOND);
            }
        }
    }
}
