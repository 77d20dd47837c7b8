//! Turning the kernel's events into records: flow records (one per
//! decision, or one per interval aggregate of allowed flows), DNS records
//! and the names they teach, and loss markers, handed to the sinks and the
//! flow service.

use std::{
    hash::BuildHasher,
    sync::Arc,
    time::{Duration, Instant},
};

use foldhash::HashMap;
use prometheus_client::metrics::{counter::Counter, family::Family};
use tollgate_common::{FlowEvent, LEARNED_SLOTS, dns_flags, flow_flags};
use tracing::warn;

use super::BATCH;
use crate::{
    cgroups::CgroupPaths,
    control::flows::FlowHub,
    datapath::{
        AllowedCounts, Datapath, DatapathError, Event, EventReader, Half, events::DnsMessage,
    },
    enforce::Enforcer,
    export::{
        aggregate::{Aggregate, Aggregator, CountedFlows, Offered},
        delivery::Exporter,
        record::{DnsAnswer, DnsRecord, DnsResolver, LossReason, LossRecord, Record, Summary},
        sinks::{RecordMeta, Severity},
    },
    flow::{Enrichment, FlowRecord, Source, WallClock, monotonic_ns, rfc3339_nanos},
    names::{LearnedAddresses, Messages, NameCache, expiry_ns, matching_patterns},
    telemetry::{LimitLabels, RecordLabels},
};

pub(super) struct FqdnMetrics {
    pub(super) learned_addresses: prometheus_client::metrics::gauge::Gauge,
    pub(super) limit_evictions: Family<LimitLabels, Counter>,
}

pub(super) struct RecordCounters {
    pub(super) records: Family<RecordLabels, Counter>,
    pub(super) decisions: Family<RecordLabels, Counter>,
    /// The two counters of each label set seen, by a hash of its labels:
    /// a record costs that hash, not three Strings and the families'
    /// lookups (which at 200k records/s was a tenth of the agent's time).
    pub(super) by_labels: HashMap<u64, Vec<(RecordLabels, Counter, Counter)>>,
}

impl RecordCounters {
    fn count(&mut self, verdict: &str, policy: &str, namespace: &str, decisions: u64) {
        let hash = self
            .by_labels
            .hasher()
            .hash_one((verdict, policy, namespace));
        let same = |labels: &RecordLabels| {
            labels.verdict == verdict && labels.policy == policy && labels.namespace == namespace
        };
        let bucket = self.by_labels.entry(hash).or_default();
        let index = match bucket.iter().position(|(labels, ..)| same(labels)) {
            Some(index) => index,
            None => {
                let labels = RecordLabels {
                    verdict: verdict.to_owned(),
                    policy: policy.to_owned(),
                    namespace: namespace.to_owned(),
                };
                // Counters share their value with the family's.
                let records = self.records.get_or_create(&labels).clone();
                let decided = self.decisions.get_or_create(&labels).clone();
                bucket.push((labels, records, decided));
                bucket.len() - 1
            }
        };
        let (_, records, decided) = &bucket[index];
        records.inc();
        decided.inc_by(decisions);
    }
}

pub(super) struct Printer {
    pub(super) exporter: Exporter,
    /// The kernel's count of ring buffer reservation failures already reported.
    pub(super) kernel_losses_seen: u64,
    pub(super) cgroups: CgroupPaths,
    pub(super) clock: WallClock,
    pub(super) node: String,
    pub(super) seq: u64,
    pub(super) flows: FlowHub,
    /// Counted when metrics are served.
    pub(super) record_counters: Option<RecordCounters>,
    /// Allowed flows are reported as interval aggregates (else one by one,
    /// or as the kernel's first of each interval).
    pub(super) aggregator: Option<Aggregator>,
    /// The kernel's counting of allowed flows (aggregate mode), and the
    /// flows it counts.
    pub(super) kernel_counts: KernelCounts,
    /// Aggregates closed and not yet published (kept for its allocation).
    pub(super) closed: Vec<Aggregate>,
    /// The DNS messages of DNS events (TCP streams reassembled).
    pub(super) messages: Messages,
    /// The names endpoints resolved addresses from, for `dst.fqdn`.
    pub(super) names: NameCache,
    /// Learned addresses, kept within the limits.
    pub(super) learned: LearnedAddresses,
    pub(super) fqdn_metrics: FqdnMetrics,
    /// The datapath's bounds of a learned address's lifetime, in seconds.
    pub(super) ttl_bounds: (u32, u32),
}

/// Allowed flows the kernel counts: its halves, the flows counted in
/// each, and when the halves switch.
pub(super) struct KernelCounts {
    pub(super) halves: AllowedCounts,
    pub(super) flows: CountedFlows,
    /// The aggregate mode's interval: the halves switch this often (None:
    /// the kernel does not count).
    pub(super) interval: Option<Duration>,
    pub(super) last_switch: Instant,
}

impl Printer {
    /// Puts the kernel's counting as configured: counting in a half that
    /// this agent closes (or not counting), and every half another agent
    /// counted in closed now, so that no count from before is lost.
    pub(super) fn start_counting(
        &mut self,
        reader: &mut EventReader,
        events: &mut Vec<Event>,
        enforcer: &Enforcer,
        datapath: &mut Datapath,
    ) -> Result<(), DatapathError> {
        let counting = self
            .kernel_counts
            .interval
            .map(|_| datapath.allowed_counts_half().map_or(Half::A, Half::other));
        self.switch_halves(counting, reader, events, enforcer, datapath)
    }

    /// Makes the kernel count in `next` (None: not at all), waits until no
    /// program counts in the other halves, reads the events they reported
    /// until then and closes those halves with their counts.
    fn switch_halves(
        &mut self,
        next: Option<Half>,
        reader: &mut EventReader,
        events: &mut Vec<Event>,
        enforcer: &Enforcer,
        datapath: &mut Datapath,
    ) -> Result<(), DatapathError> {
        datapath.set_allowed_counts_half(next)?;
        self.kernel_counts.last_switch = Instant::now();
        self.kernel_counts.halves.wait_for_programs()?;
        self.read_available(reader, events, enforcer, datapath);
        for half in [Half::A, Half::B] {
            if Some(half) == next {
                continue;
            }
            let counts = self.kernel_counts.halves.take(half)?;
            self.kernel_counts
                .flows
                .close(half.index(), counts, &mut self.closed);
        }
        self.publish_closed(enforcer);
        Ok(())
    }

    /// Once a second: aggregates whose interval ended go out, the kernel
    /// switches counting halves once an interval, and events the kernel
    /// could not report are reported lost.
    pub(super) fn tick(
        &mut self,
        reader: &mut EventReader,
        events: &mut Vec<Event>,
        enforcer: &Enforcer,
        datapath: &mut Datapath,
    ) {
        self.close_due_aggregates(enforcer);
        if let (Some(interval), Some(counting)) =
            (self.kernel_counts.interval, datapath.allowed_counts_half())
            && self.kernel_counts.last_switch.elapsed() >= interval
            && let Err(error) =
                self.switch_halves(Some(counting.other()), reader, events, enforcer, datapath)
        {
            warn!(%error, "cannot close the kernel's allowed-flow counts; retrying next interval");
        }
        match datapath.counters() {
            Ok(counters) => self.report_kernel_losses(counters.ringbuf_reserve_failed),
            Err(e) => warn!(error = %e, "cannot read counters"),
        }
    }

    /// At a stop: every aggregate goes out, and the kernel counts on in the
    /// other half for the next agent to close.
    pub(super) fn close_all_aggregates(
        &mut self,
        reader: &mut EventReader,
        events: &mut Vec<Event>,
        enforcer: &Enforcer,
        datapath: &mut Datapath,
    ) {
        if let Some(counting) = datapath.allowed_counts_half()
            && let Err(error) =
                self.switch_halves(Some(counting.other()), reader, events, enforcer, datapath)
        {
            warn!(%error, "cannot close the kernel's allowed-flow counts; the next agent will");
        }
        if let Some(aggregator) = &mut self.aggregator {
            aggregator.close_all(&mut self.closed);
            self.publish_closed(enforcer);
        }
    }

    /// Prints every event the ring buffer holds now, without waiting (the
    /// programs wake the reader only once events pile up). Called before
    /// every rule switch, so that records are named while their
    /// generation's names are kept.
    pub(super) fn print_available(
        &mut self,
        reader: &mut EventReader,
        events: &mut Vec<Event>,
        enforcer: &Enforcer,
        datapath: &mut Datapath,
    ) {
        self.read_available(reader, events, enforcer, datapath);
        // Open aggregates whose names the coming switch may forget go now.
        let Some(generation) = enforcer.generation_named_last_time() else {
            return;
        };
        if let Some(aggregator) = &mut self.aggregator {
            aggregator.close_generation(generation, &mut self.closed);
            self.publish_closed(enforcer);
        }
        if self.kernel_counts.flows.holds_generation(generation)
            && let Some(counting) = datapath.allowed_counts_half()
            && let Err(error) =
                self.switch_halves(Some(counting.other()), reader, events, enforcer, datapath)
        {
            warn!(%error, "cannot close the kernel's allowed-flow counts before a rule switch");
        }
    }

    fn read_available(
        &mut self,
        reader: &mut EventReader,
        events: &mut Vec<Event>,
        enforcer: &Enforcer,
        datapath: &mut Datapath,
    ) {
        while reader.read_available(events, BATCH) > 0 {
            self.print(events, enforcer, datapath);
            events.clear();
        }
    }

    pub(super) fn print(&mut self, events: &[Event], enforcer: &Enforcer, datapath: &mut Datapath) {
        // Taken anew per batch, so a step of the wall clock (NTP) shows at once.
        self.clock = WallClock::now();
        for event in events {
            let event = match event {
                Event::Flow(event) => event,
                Event::Dns(message) => {
                    self.on_dns(message, enforcer, datapath);
                    continue;
                }
            };
            if let Some(half) = Half::of_event_flags(event.flags) {
                self.kernel_counts.flows.first(half.index(), event);
                continue;
            }
            let offered = match &mut self.aggregator {
                Some(aggregator) => aggregator.offer(event, &mut self.closed),
                None => Offered::ReportNow,
            };
            self.publish_closed(enforcer);
            if offered == Offered::ReportNow {
                self.publish(event, None, enforcer);
            }
        }
    }

    /// Publishes the aggregates whose interval has ended by now: quiet
    /// flows are reported on time too.
    fn close_due_aggregates(&mut self, enforcer: &Enforcer) {
        if let Some(aggregator) = &mut self.aggregator {
            aggregator.close_due(monotonic_ns(), &mut self.closed);
            self.clock = WallClock::now();
            self.publish_closed(enforcer);
        }
    }

    fn publish_closed(&mut self, enforcer: &Enforcer) {
        if self.closed.is_empty() {
            return;
        }
        let mut closed = std::mem::take(&mut self.closed);
        for aggregate in closed.drain(..) {
            self.publish(&aggregate.first, Some(&aggregate), enforcer);
        }
        self.closed = closed;
    }

    /// Enriches one event (an aggregate's first) and hands it to the sinks
    /// and the flow service.
    fn publish(&mut self, event: &FlowEvent, aggregate: Option<&Aggregate>, enforcer: &Enforcer) {
        self.seq += 1;
        let cgroup = self.cgroups.resolve(event.cgroup_id);
        let (cgroup, pod) = (
            cgroup.map(|c| c.path.as_str()),
            cgroup.and_then(|c| c.pod.as_ref()),
        );
        let pod_meta = pod.and_then(|p| enforcer.pods().pod(&p.pod_uid));
        if event.flags & flow_flags::UNJUDGED != 0 {
            warn!(
                cgroup_id = event.cgroup_id,
                "a connection was decided without its rules: every decision slot of its CPU \
                 was held by a preempted decision (a fully preemptible kernel); it was denied \
                 if a policy selects its endpoint"
            );
        }
        let attribution = (event.flags & flow_flags::ENDPOINT_KNOWN != 0)
            .then(|| enforcer.attribute(event.generation, event.set_id, event.rule_id))
            .flatten();
        let enrichment = Enrichment {
            seq: self.seq,
            node: &self.node,
            cgroup,
            pod,
            pod_meta,
            clock: self.clock,
            attribution,
            dst_fqdn: self.names.get(event.cgroup_id, dst_ip(event), event.ts_ns),
        };
        let mut record = FlowRecord::new(event, enrichment);
        record.summary = aggregate.map(|aggregate| Summary {
            count: aggregate.count,
            first_time: record.time.clone(),
            last_time: rfc3339_nanos(self.clock.unix_nanos(aggregate.last_ts_ns)),
        });
        let meta = RecordMeta {
            kind: FlowRecord::KIND,
            time: &record.time,
            unix_nanos: self.clock.unix_nanos(event.ts_ns),
            node: &self.node,
            severity: match record.verdict {
                "denied" => Severity::Warning,
                "audit" => Severity::Notice,
                _ => Severity::Info,
            },
            seq: Some(self.seq),
        };
        self.exporter.publish(Record::Flow(&record), &meta);
        self.flows.publish(&record);
        if let Some(counters) = &mut self.record_counters {
            let decisions = record.summary.as_ref().map_or(1, |s| s.count);
            counters.count(
                record.verdict,
                record.policy.unwrap_or_default(),
                record.src.namespace.unwrap_or_default(),
                decisions,
            );
        }
    }

    /// Learns from one DNS event: remembers the names of its addresses,
    /// installs the addresses of answers the kernel left to the agent, and
    /// publishes a DNS record for each answer.
    fn on_dns(&mut self, message: &DnsMessage, enforcer: &Enforcer, datapath: &mut Datapath) {
        let header = &message.header;
        for bytes in self.messages.of(message, Instant::now()) {
            let answer = match tollgate_dns::full::decode(&bytes) {
                Ok(answer) => answer,
                Err(error) => {
                    tracing::debug!(%error, cgroup_id = header.cgroup_id, "undecodable DNS answer");
                    continue;
                }
            };
            let mut learned = header.flags & dns_flags::LEARNED != 0;
            // An answer the kernel found unasked for names nothing either:
            // its addresses could be anyone's choosing.
            let refused = refusal(header.flags).or_else(|| {
                let unparsed_udp = header.flags & dns_flags::TO_USERSPACE != 0
                    && header.flags & dns_flags::TCP == 0;
                (unparsed_udp
                    && !datapath.take_query(
                        header.socket_cookie,
                        answer.id,
                        &answer.name,
                        answer.qtype,
                    ))
                .then_some("not-asked")
            });
            if answer.rcode == tollgate_common::dns::RCODE_NOERROR && refused.is_none() {
                let to_install = if header.flags & dns_flags::TO_USERSPACE != 0
                    && enforcer.has_fqdn_rules(header.cgroup_id)
                {
                    matching_patterns(enforcer.fqdn_patterns(), &answer.name, LEARNED_SLOTS)
                } else {
                    Vec::new()
                };
                let name: Arc<str> = answer.name.as_str().into();
                let now = monotonic_ns();
                for (ip, ttl) in answer.addresses() {
                    let expires_ns = expiry_ns(header.ts_ns, ttl, self.ttl_bounds);
                    self.names
                        .insert(header.cgroup_id, ip, name.clone(), expires_ns, now);
                    if to_install.is_empty() {
                        continue;
                    }
                    let expires_ns = expiry_ns(now, ttl, self.ttl_bounds);
                    match datapath.install_learned(
                        header.cgroup_id,
                        ip,
                        &to_install,
                        now,
                        expires_ns,
                    ) {
                        Ok(_) => learned = true,
                        Err(error) => warn!(%error, %ip, "cannot install a learned address"),
                    }
                }
            }
            let limit = if learned {
                self.keep_within_limits(header, &answer, datapath)
            } else {
                None
            };
            self.publish_dns(header, &answer, learned, limit, refused, enforcer);
        }
    }

    /// Records an answer's learned addresses and forgets, in the kernel
    /// too, those the limits leave no room for; returns the limit that was
    /// hit, if any.
    fn keep_within_limits(
        &mut self,
        header: &tollgate_common::DnsEvent,
        answer: &tollgate_dns::full::Decoded,
        datapath: &mut Datapath,
    ) -> Option<&'static str> {
        let name: Arc<str> = answer.name.as_str().into();
        let mut hit = None;
        for (ip, ttl) in answer.addresses() {
            let expires_ns = expiry_ns(header.ts_ns, ttl, self.ttl_bounds);
            let forget = self
                .learned
                .learned(header.cgroup_id, ip, name.clone(), expires_ns);
            for (gone, limit) in forget {
                let key = crate::datapath::learned::learned_key(header.cgroup_id, gone);
                if let Err(error) = datapath.remove_learned(&key) {
                    warn!(%error, ip = %gone, "cannot forget a learned address");
                }
                self.fqdn_metrics
                    .limit_evictions
                    .get_or_create(&LimitLabels {
                        limit: limit.name(),
                    })
                    .inc();
                hit = Some(limit.name());
            }
        }
        if let Some(limit) = hit {
            warn!(cgroup_id = header.cgroup_id, name = %answer.name, limit, "learned addresses over a limit: those expiring first were forgotten");
        }
        hit
    }

    /// Removes learned addresses whose every pattern expired, counts the
    /// live ones, and forgets expired names.
    pub(super) fn sweep_learned(&mut self, datapath: &mut Datapath) {
        let now = monotonic_ns();
        let entries = match datapath.learned() {
            Ok(entries) => entries,
            Err(error) => {
                warn!(%error, "cannot read the learned addresses");
                return;
            }
        };
        let mut live = 0;
        for (key, value) in entries {
            if crate::datapath::learned::all_expired(&value, now) {
                if let Err(error) = datapath.remove_learned(&key) {
                    warn!(%error, "cannot remove an expired learned address");
                }
            } else {
                live += 1;
            }
        }
        self.fqdn_metrics.learned_addresses.set(live);
        self.names.expire(now);
        self.learned.expire(now);
    }

    fn publish_dns(
        &mut self,
        header: &tollgate_common::DnsEvent,
        answer: &tollgate_dns::full::Decoded,
        learned: bool,
        limit: Option<&'static str>,
        refused: Option<&'static str>,
        enforcer: &Enforcer,
    ) {
        use tollgate_dns::full::{RecordData, rcode_name, rtype_name};
        self.seq += 1;
        let cgroup = self.cgroups.resolve(header.cgroup_id);
        let (cgroup, pod) = (
            cgroup.map(|c| c.path.as_str()),
            cgroup.and_then(|c| c.pod.as_ref()),
        );
        let enrichment = Enrichment {
            seq: self.seq,
            node: &self.node,
            cgroup,
            pod,
            pod_meta: pod.and_then(|p| enforcer.pods().pod(&p.pod_uid)),
            clock: self.clock,
            attribution: None,
            dst_fqdn: None,
        };
        let resolver_ip = if header.family == tollgate_common::family::INET6 {
            std::net::IpAddr::from(header.resolver_addr)
        } else {
            let [a, b, c, d, ..] = header.resolver_addr;
            std::net::IpAddr::from([a, b, c, d])
        };
        let time = rfc3339_nanos(self.clock.unix_nanos(header.ts_ns));
        let record = DnsRecord {
            kind: DnsRecord::KIND,
            time: time.clone(),
            seq: self.seq,
            node: &self.node,
            src: Source::endpoint(header.cgroup_id, &enrichment),
            resolver: DnsResolver {
                ip: resolver_ip,
                port: header.resolver_port,
            },
            query: answer.name.as_str().into(),
            query_type: rtype_name(answer.qtype),
            rcode: rcode_name(answer.rcode),
            answers: answer
                .answers
                .iter()
                .filter_map(|record| {
                    let (kind, data) = match &record.data {
                        RecordData::Address(ip) if ip.is_ipv4() => ("A", ip.to_string()),
                        RecordData::Address(ip) => ("AAAA", ip.to_string()),
                        RecordData::Name(target) => ("CNAME", target.clone()),
                        RecordData::Other => return None,
                    };
                    Some(DnsAnswer {
                        name: record.name.as_str().into(),
                        kind,
                        data: data.into(),
                        ttl: record.ttl,
                    })
                })
                .collect(),
            learned,
            limit,
            refused,
        };
        let meta = RecordMeta {
            kind: DnsRecord::KIND,
            time: &time,
            unix_nanos: self.clock.unix_nanos(header.ts_ns),
            node: &self.node,
            severity: Severity::Info,
            seq: Some(self.seq),
        };
        self.exporter.publish(Record::Dns(&record), &meta);
    }

    /// Turns new kernel ring buffer reservation failures (events that never
    /// reached the agent) into a loss marker for every sink.
    pub(super) fn report_kernel_losses(&mut self, failed_so_far: u64) {
        let lost = failed_so_far.saturating_sub(self.kernel_losses_seen);
        self.kernel_losses_seen = failed_so_far;
        if lost == 0 {
            return;
        }
        warn!(lost, "the kernel's ring buffer was full: events lost");
        self.seq += 1;
        let unix_nanos = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
        let marker = LossRecord {
            kind: LossRecord::KIND,
            time: rfc3339_nanos(unix_nanos),
            seq: Some(self.seq),
            node: self.node.clone(),
            count: lost,
            reason: LossReason::KernelRingbuf,
            sink: None,
            first_seq: None,
            last_seq: None,
        };
        let meta = RecordMeta::of_loss(&marker, unix_nanos);
        self.exporter.publish(Record::Loss(&marker), &meta);
    }
}

/// Why the kernel refused to learn from a DNS answer, as DNS records say.
fn refusal(flags: u16) -> Option<&'static str> {
    if flags & dns_flags::VIA_LOOPBACK != 0 {
        Some("via-loopback")
    } else if flags & dns_flags::NOT_ASKED != 0 {
        Some("not-asked")
    } else {
        None
    }
}

/// The destination of a flow event.
fn dst_ip(event: &FlowEvent) -> std::net::IpAddr {
    if event.family == tollgate_common::family::INET6 {
        std::net::IpAddr::from(event.dst_addr)
    } else {
        let [a, b, c, d, ..] = event.dst_addr;
        std::net::IpAddr::from([a, b, c, d])
    }
}
