//! Interval aggregates of allowed flows: one record per source cgroup,
//! destination, port, protocol and rule per interval, counting the
//! connections it stands for. Denied and audit decisions never come here:
//! each is reported on its own.
//!
//! The kernel counts allowed flows itself where it can ([`CountedFlows`]:
//! it reports a flow's first decision in a counting half, and the agent
//! adds the half's counts when it closes); [`Aggregator`] aggregates the
//! flows it reports one by one (its half was full, or it does not count).
//!
//! Pure bookkeeping on kernel events and their CLOCK_MONOTONIC times; the
//! caller enriches and publishes what comes out.

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt};

use tollgate_common::{AllowedCount, FlowDedupKey, FlowEvent, Verdict, flow_flags};

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
            mode: 0,
            flags: 0,
            generation: 0,
            ..counted_key(event)
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

/// The kernel's key of the flow an event's decision was counted in.
fn counted_key(event: &FlowEvent) -> FlowDedupKey {
    FlowDedupKey {
        cgroup_id: event.cgroup_id,
        dst_addr: event.dst_addr,
        dst_port: event.dst_port,
        protocol: event.protocol,
        family: event.family,
        rule_id: event.rule_id,
        hook: event.hook,
        verdict: event.verdict,
        mode: event.mode,
        flags: event.flags & !(flow_flags::COUNTED | flow_flags::COUNTED_IN_B),
        generation: event.generation,
    }
}

/// The flows the kernel counts in each of its two halves, by the event of
/// each one's first decision there. A half's counts are added when it
/// closes: then every decision counted in it is in exactly one aggregate.
#[derive(Default)]
pub struct CountedFlows {
    firsts: [HashMap<FlowDedupKey, FlowEvent>; 2],
}

impl CountedFlows {
    /// Keeps the event of a flow's first decision in half `half` (0 or 1).
    pub fn first(&mut self, half: usize, event: &FlowEvent) {
        self.firsts[half].insert(counted_key(event), *event);
    }

    /// Flows whose first decision in either half came under `generation`.
    pub fn holds_generation(&self, generation: u32) -> bool {
        self.firsts
            .iter()
            .flat_map(HashMap::values)
            .any(|first| first.generation == generation)
    }

    /// Closes half `half` with the counts the kernel kept in it: one
    /// aggregate per counted flow, its first decision's event (or, if that
    /// event was lost, one made from the flow's key and times) with the
    /// count. A first decision without a count (not possible while the
    /// kernel counts before it reports) stands for itself.
    pub fn close(
        &mut self,
        half: usize,
        counts: Vec<(FlowDedupKey, AllowedCount)>,
        closed: &mut Vec<Aggregate>,
    ) {
        let firsts = &mut self.firsts[half];
        let from = closed.len();
        for (key, counted) in counts {
            let first = firsts
                .remove(&key)
                .unwrap_or_else(|| event_of_key(&key, counted.first_ns));
            closed.push(Aggregate {
                first,
                count: counted.count,
                last_ts_ns: counted.last_ns.max(first.ts_ns),
            });
        }
        closed.extend(firsts.drain().map(|(_, first)| Aggregate {
            first,
            count: 1,
            last_ts_ns: first.ts_ns,
        }));
        // Oldest first, as every other record goes out.
        closed[from..].sort_by_key(|aggregate| aggregate.first.ts_ns);
    }
}

/// A flow's first decision as far as its key tells: no task, no set id
/// (a decision by a policy's default is not attributed to the policy).
fn event_of_key(key: &FlowDedupKey, ts_ns: u64) -> FlowEvent {
    FlowEvent {
        kind: tollgate_common::event_kind::FLOW,
        hook: key.hook,
        verdict: key.verdict,
        mode: key.mode,
        family: key.family,
        protocol: key.protocol,
        flags: key.flags,
        dst_port: key.dst_port,
        rule_id: key.rule_id,
        generation: key.generation,
        ts_ns,
        cgroup_id: key.cgroup_id,
        dst_addr: key.dst_addr,
        ..FlowEvent::default()
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

    fn counted(event: &FlowEvent, half_b: bool) -> FlowEvent {
        let mut flags = flow_flags::COUNTED;
        if half_b {
            flags |= flow_flags::COUNTED_IN_B;
        }
        FlowEvent {
            flags: event.flags | flags,
            ..*event
        }
    }

    fn count(event: &FlowEvent, count: u64, last_ns: u64) -> (FlowDedupKey, AllowedCount) {
        (
            counted_key(event),
            AllowedCount {
                count,
                first_ns: event.ts_ns,
                last_ns,
            },
        )
    }

    #[test]
    fn a_closed_half_gives_each_counted_flow_its_first_event_and_count() {
        let mut flows = CountedFlows::default();
        let mut first = event(Verdict::Allowed, 7, 443, SECOND);
        first.pid_tgid = 42;
        first.flags = flow_flags::ENDPOINT_KNOWN;
        let other = event(Verdict::Allowed, 7, 80, 2 * SECOND);
        flows.first(1, &counted(&first, true));
        flows.first(0, &counted(&other, false));
        let mut closed = Vec::new();
        flows.close(1, vec![count(&first, 5, 9 * SECOND)], &mut closed);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].first.pid_tgid, 42, "the first decision's task");
        assert_eq!((closed[0].count, closed[0].last_ts_ns), (5, 9 * SECOND));
        assert!(flows.holds_generation(0), "the other half is still open");
        closed.clear();
        flows.close(0, vec![count(&other, 1, 2 * SECOND)], &mut closed);
        assert_eq!(closed[0].count, 1);
        assert!(!flows.holds_generation(0));
    }

    #[test]
    fn a_flow_whose_first_event_was_lost_is_reported_from_its_key() {
        let mut flows = CountedFlows::default();
        let mut lost = event(Verdict::Allowed, 9, 53, 3 * SECOND);
        lost.generation = 4;
        lost.mode = 2;
        lost.flags = flow_flags::ENDPOINT_KNOWN;
        lost.rule_id = 11;
        let mut closed = Vec::new();
        flows.close(0, vec![count(&lost, 3, 4 * SECOND)], &mut closed);
        let made = closed[0].first;
        assert_eq!(
            (made.cgroup_id, made.dst_port, made.dst_addr, made.rule_id),
            (9, 53, lost.dst_addr, 11)
        );
        assert_eq!((made.generation, made.mode, made.flags), (4, 2, lost.flags));
        assert_eq!((made.ts_ns, closed[0].count), (3 * SECOND, 3));
    }

    proptest! {
        /// Counted decisions are reported exactly once whatever the halves'
        /// order of closing, with or without their first events.
        #[test]
        fn every_counted_decision_is_reported_once(
            flows in prop::collection::vec((0u64..5, 1u64..50, any::<bool>(), any::<bool>()), 0..40),
        ) {
            let mut counted_flows = CountedFlows::default();
            let mut kernel: [Vec<(FlowDedupKey, AllowedCount)>; 2] = Default::default();
            let mut decided = 0;
            for (i, (cgroup, decisions, half_b, event_lost)) in flows.into_iter().enumerate() {
                let first = event(Verdict::Allowed, cgroup, i as u16, i as u64);
                let half = usize::from(half_b);
                if kernel[half].iter().any(|(key, _)| *key == counted_key(&first)) {
                    continue;
                }
                decided += decisions;
                kernel[half].push(count(&first, decisions, first.ts_ns + 1));
                if !event_lost {
                    counted_flows.first(half, &counted(&first, half_b));
                }
            }
            let mut closed = Vec::new();
            let [a, b] = kernel;
            counted_flows.close(1, b, &mut closed);
            counted_flows.close(0, a, &mut closed);
            prop_assert_eq!(closed.iter().map(|a| a.count).sum::<u64>(), decided);
        }
    }
}
