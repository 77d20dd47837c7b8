//! Record formats for SIEMs: each turns one record (`super::record::Record`)
//! into bytes appended to a buffer, without framing (sinks add newlines,
//! syslog headers or batch envelopes). They run for every record, so they
//! write straight into the buffer: no intermediate JSON values, no strings
//! built only to be copied. docs/export-formats.md has the field mappings.

mod cef;
mod ecs;
mod json;
mod ocsf;

#[cfg(test)]
mod tests;

use std::{
    collections::btree_map,
    fmt::{self, Display},
};

use serde::{Serialize, Serializer};

use super::record::{LossReason, LossRecord, Record};
use crate::flow::FlowRecord;
use tollgate_policy::select::Labels;

/// The wire format of a sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The records as they are (docs/flow-records.md).
    Json,
    /// OCSF 1.3: Network Activity, DNS Activity, Event Log Activity.
    Ocsf,
    /// Elastic Common Schema 8.
    Ecs,
    /// ArcSight CEF, for Microsoft Sentinel's CEF connector.
    Cef,
}

/// Appends `record` to `out` in `format`: exactly one record, no newline.
/// `instance` names this run of the agent (its start time, as the sinks'
/// record ids use it): with the node and `seq` it names a record once, so
/// that a resent record keeps its OCSF `metadata.uid`.
pub fn write(format: Format, record: Record<'_, '_>, instance: &str, out: &mut Vec<u8>) {
    match format {
        Format::Json => json::write(record, out),
        Format::Ocsf => ocsf::write(record, instance, out),
        Format::Ecs => ecs::write(record, out),
        Format::Cef => cef::write(record, out),
    }
}

/// Serializes `value` as JSON onto the end of `out`.
fn put_json<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    // A Vec takes every write, and the records hold nothing serde_json
    // refuses (all map keys are strings), so this cannot fail.
    serde_json::to_writer(out, value).expect("records serialize to JSON");
}

/// A flow's verdict (`FlowRecord::verdict`), which every format maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Allowed,
    Denied,
    /// Denied by policy, let through by observe mode.
    Audit,
    /// The kernel reported a verdict this agent does not know.
    Unknown,
}

impl Verdict {
    fn of(flow: &FlowRecord) -> Self {
        match flow.verdict {
            "allowed" => Self::Allowed,
            "denied" => Self::Denied,
            "audit" => Self::Audit,
            _ => Self::Unknown,
        }
    }
}

/// What a record is, named alike in every format: CEF's signature id and
/// ECS's `event.action`.
fn event_name(record: Record) -> &'static str {
    match record {
        Record::Flow(flow) => match Verdict::of(flow) {
            Verdict::Allowed => "flow-allowed",
            Verdict::Denied => "flow-denied",
            Verdict::Audit => "flow-audit",
            Verdict::Unknown => "flow-unknown",
        },
        Record::Dns(_) => "dns",
        Record::Loss(_) => "loss",
    }
}

/// What happened, in a few words: CEF's name and the start of OCSF's
/// `message`.
fn event_title(record: Record) -> &'static str {
    match record {
        Record::Flow(flow) => match Verdict::of(flow) {
            Verdict::Allowed => "Egress allowed",
            Verdict::Denied => "Egress denied",
            Verdict::Audit => "Egress would be denied (observe mode)",
            Verdict::Unknown => "Egress decision unknown",
        },
        Record::Dns(_) => "DNS answer",
        Record::Loss(_) => "Records lost",
    }
}

/// How much attention a record asks for, on one scale for all formats: a
/// denied connection broke something, an audit one would have, an allowed
/// one is routine. Lost records leave a gap in the audit trail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Severity {
    Unknown,
    Informational,
    Low,
    Medium,
}

impl Severity {
    fn of(record: Record) -> Self {
        match record {
            Record::Flow(flow) => match Verdict::of(flow) {
                Verdict::Allowed => Self::Informational,
                Verdict::Audit => Self::Low,
                Verdict::Denied => Self::Medium,
                Verdict::Unknown => Self::Unknown,
            },
            Record::Dns(_) => Self::Informational,
            Record::Loss(_) => Self::Medium,
        }
    }

    /// CEF's 0-10 (0-3 low, 4-6 medium); ECS's `event.severity` uses it too.
    fn cef(self) -> u8 {
        match self {
            Self::Unknown => 0,
            Self::Informational => 1,
            Self::Low => 3,
            Self::Medium => 5,
        }
    }
}

/// Milliseconds since the epoch of a record's time. Record times come from
/// `flow::rfc3339_nanos` (`2026-11-24T08:00:00.123456789Z`, always that
/// layout); anything else is a bug upstream, and shows as the epoch rather
/// than losing the record.
fn unix_millis(time: &str) -> i64 {
    parse_rfc3339_nanos(time).map_or(0, |nanos| (nanos / 1_000_000) as i64)
}

fn parse_rfc3339_nanos(rfc3339: &str) -> Option<i128> {
    let bytes = rfc3339.as_bytes();
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    let layout_ok = bytes.len() == 30
        && separators.iter().all(|&(at, byte)| bytes[at] == byte)
        && bytes[19] == b'.'
        && bytes[29] == b'Z';
    if !layout_ok {
        return None;
    }
    let number = |from: usize, to: usize| -> Option<u32> {
        let digits = rfc3339.get(from..to)?;
        if digits.bytes().all(|b| b.is_ascii_digit()) {
            digits.parse().ok()
        } else {
            None
        }
    };
    let small = |from: usize, to: usize| u8::try_from(number(from, to)?).ok();
    let date = time::Date::from_calendar_date(
        i32::try_from(number(0, 4)?).ok()?,
        time::Month::try_from(small(5, 7)?).ok()?,
        small(8, 10)?,
    )
    .ok()?;
    let time_of_day = time::Time::from_hms_nano(
        small(11, 13)?,
        small(14, 16)?,
        small(17, 19)?,
        number(20, 29)?,
    )
    .ok()?;
    Some(
        date.with_time(time_of_day)
            .assume_utc()
            .unix_timestamp_nanos(),
    )
}

/// The IANA keyword of a flow's transport, where the record names it.
fn transport_name(protocol: &str) -> Option<&str> {
    matches!(protocol, "tcp" | "udp").then_some(protocol)
}

/// A flow's deciding policies (`policy`, comma-separated), each with its
/// source from `policy_source`: that holds one value for all of them, or
/// one per policy in the same order.
fn policies_with_sources<'a>(
    policy: &'a str,
    source: Option<&'a str>,
) -> impl Iterator<Item = (&'a str, Option<&'a str>)> + 'a {
    let mut sources = source.map(|s| s.split(','));
    let mut current = None;
    policy.split(',').map(move |name| {
        // A single value stays in force for every policy after it.
        if let Some(next) = sources.as_mut().and_then(Iterator::next) {
            current = Some(next);
        }
        (name, current)
    })
}

/// `LossReason` as the JSON record spells it.
fn loss_reason(reason: LossReason) -> &'static str {
    match reason {
        LossReason::KernelRingbuf => "kernel_ringbuf",
        LossReason::QueueFull => "queue_full",
        LossReason::SpoolFull => "spool_full",
        LossReason::SpoolDamaged => "spool_damaged",
        LossReason::WriteFailed => "write_failed",
        LossReason::Rejected => "rejected",
    }
}

/// A loss marker in a sentence, for formats with a free-text message.
struct LossMessage<'r>(&'r LossRecord);

impl Display for LossMessage<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let loss = self.0;
        write!(
            f,
            "{} records lost: {}",
            loss.count,
            loss_reason(loss.reason)
        )?;
        if let Some(sink) = &loss.sink {
            write!(f, " at sink {sink}")?;
        }
        if let (Some(first), Some(last)) = (loss.first_seq, loss.last_seq) {
            write!(f, " (seq {first}-{last})")?;
        }
        Ok(())
    }
}

/// Serializes a value by its `Display` form: numeric ids that a schema
/// types as strings, and compound strings, without allocating.
struct AsString<T>(T);

impl<T: Display> Serialize for AsString<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

/// A pod label as `key:value`. Pod labels go to string arrays in this form,
/// never to objects keyed by label: keys like `app.kubernetes.io/name`
/// would expand into nested objects in Elasticsearch and clash with `app`.
struct LabelPair<'a>(&'a str, &'a str);

impl Display for LabelPair<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0, self.1)
    }
}

/// A pod's labels as a JSON array of `key:value` strings.
type LabelList<'a> = ArrayOf<btree_map::Iter<'a, String, String>, AsString<LabelPair<'a>>>;

fn label_list(labels: &Labels) -> LabelList<'_> {
    ArrayOf {
        items: labels.iter(),
        item: |(key, value)| Some(AsString(LabelPair(key, value))),
    }
}

/// Serializes what `item` makes of each element of `items` (skipping
/// `None`) as a JSON array, without collecting the elements first.
struct ArrayOf<I: Iterator, U> {
    items: I,
    item: fn(I::Item) -> Option<U>,
}

impl<I, U> Serialize for ArrayOf<I, U>
where
    I: Iterator + Clone,
    U: Serialize,
{
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.items.clone().filter_map(self.item))
    }
}
