//! ArcSight CEF (Common Event Format) version 0, for Microsoft Sentinel's
//! CEF connector (table CommonSecurityLog) and other CEF consumers:
//! `CEF:0|Tollgate|tollgate-agent|<version>|<signature>|<name>|<severity>|<extension>`.
//! The extension uses only keys of CEF's dictionary; what has no key of its
//! own goes to the custom `csN`/`cnN`/`flexStringN` keys, each with its
//! `…Label`. CEF is a summary: JSON, OCSF and ECS carry every field.

use std::{
    fmt::{self, Display, Write as _},
    net::IpAddr,
};

use super::{
    LossMessage, Severity, event_name, event_title, loss_reason, policies_with_sources, unix_millis,
};
use crate::{
    export::record::{DnsAnswer, DnsRecord, LossRecord, Record},
    flow::{FlowRecord, PolicySource, Source},
};

const VENDOR: &str = "Tollgate";
const PRODUCT: &str = "tollgate-agent";

pub(super) fn write(record: Record, out: &mut Vec<u8>) {
    header(record, out);
    let mut extension = Extension { out, empty: true };
    match record {
        Record::Flow(flow) => write_flow(flow, &mut extension),
        Record::Dns(dns) => write_dns(dns, &mut extension),
        Record::Loss(loss) => write_loss(loss, &mut extension),
    }
}

fn header(record: Record, out: &mut Vec<u8>) {
    out.extend_from_slice(b"CEF:0|");
    for field in [
        VENDOR,
        PRODUCT,
        env!("CARGO_PKG_VERSION"),
        event_name(record),
        event_title(record),
    ] {
        escape_header(field, out);
        out.push(b'|');
    }
    put(out, Severity::of(record).cef());
    out.push(b'|');
}

/// Header fields escape `\` and `|`. They hold only the constants above,
/// never record data, so nothing else needs escaping there.
fn escape_header(field: &str, out: &mut Vec<u8>) {
    for byte in field.bytes() {
        if matches!(byte, b'\\' | b'|') {
            out.push(b'\\');
        }
        out.push(byte);
    }
}

/// Appends `value`'s `Display` form, unescaped.
fn put(out: &mut Vec<u8>, value: impl Display) {
    // Writing to a Vec cannot fail, and our Display impls do not either.
    write!(Unescaped(out), "{value}").expect("formatting into a Vec");
}

struct Unescaped<'a>(&'a mut Vec<u8>);

impl fmt::Write for Unescaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Escapes extension values: `\`, `=`, and line breaks as `\n` and `\r` so
/// a record stays on one line. A `|` needs no escape after the header.
/// Writes at most `room` characters of the value (before escaping) and
/// drops the rest.
struct Escaped<'a> {
    out: &'a mut Vec<u8>,
    room: usize,
}

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let Some(room) = self.room.checked_sub(1) else {
                break;
            };
            self.room = room;
            match c {
                '\\' => self.out.extend_from_slice(b"\\\\"),
                '=' => self.out.extend_from_slice(b"\\="),
                '\n' => self.out.extend_from_slice(b"\\n"),
                '\r' => self.out.extend_from_slice(b"\\r"),
                other => self
                    .out
                    .extend_from_slice(other.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        Ok(())
    }
}

/// The most characters CEF's key dictionary allows in `key`'s value
/// (conformance/cef-keys.json); consumers cut longer values, Sentinel's
/// connector among them, so the cut is ours. Numbers, addresses and
/// times have no length.
fn max_len(key: &str) -> usize {
    match key {
        "app" | "proto" => 31,
        "act" | "outcome" => 63,
        "dvchost" => 100,
        "cs1" | "cs2" | "cs3" | "cs4" | "cs5" | "cs6" => 4000,
        "cat" | "dhost" | "msg" | "reason" | "sproc" | "suid" | "flexString1" | "flexString2" => {
            1023
        }
        // Labels: the custom keys' are 1023, flexString's 128; ours are
        // short constants.
        _ if key.ends_with("Label") => 128,
        _ => usize::MAX,
    }
}

/// The `key=value` pairs after the header, separated by spaces.
struct Extension<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl Extension<'_> {
    /// Appends `key=value`, or nothing when the value is empty: CEF has no
    /// empty values, and consumers read `cs2=` as the start of whatever
    /// follows. Keys are CEF's, letters and digits only: no escape.
    /// Returns whether the pair was written.
    fn pair(&mut self, key: &str, value: impl Display) -> bool {
        let start = self.out.len();
        if !self.empty {
            self.out.push(b' ');
        }
        self.out.extend_from_slice(key.as_bytes());
        self.out.push(b'=');
        let value_start = self.out.len();
        let mut escaped = Escaped {
            out: self.out,
            room: max_len(key),
        };
        write!(escaped, "{value}").expect("formatting into a Vec");
        if self.out.len() == value_start {
            self.out.truncate(start);
            return false;
        }
        self.empty = false;
        true
    }

    fn pair_if(&mut self, key: &str, value: Option<impl Display>) {
        if let Some(value) = value {
            self.pair(key, value);
        }
    }

    /// A custom key (`cs1`, `cn2`, `flexString1`, ...) and its label, or
    /// neither when there is no value.
    fn custom(&mut self, key: &str, label: &str, value: Option<impl Display>) {
        let Some(value) = value else { return };
        let (start, empty) = (self.out.len(), self.empty);
        let mut label_key = [0; 24];
        let label_key = label_key_of(key, &mut label_key);
        self.pair(label_key, label);
        if !self.pair(key, value) {
            self.out.truncate(start);
            self.empty = empty;
        }
    }

    /// `dst` for both address families: CEF's destinationAddress takes
    /// IPv6 since revision 25, and Sentinel's DestinationIP is a string.
    fn destination(&mut self, ip: IpAddr, port: u16) {
        self.pair("dst", ip);
        self.pair("dpt", port);
    }

    /// The record's time as CEF's startTime (Sentinel's StartTime); `rt`
    /// is when the device "received" it, a string column in Sentinel.
    fn times(&mut self, start: &str, end: Option<&str>) {
        self.pair("start", unix_millis(start));
        self.pair_if("end", end.map(unix_millis));
    }

    /// The record's `seq`: Sentinel's ExternalID (`externalId`) is a
    /// 32-bit integer column that a node's sequence outgrows, and
    /// DeviceCustomNumber2 is 64-bit.
    fn seq(&mut self, seq: Option<u64>) {
        self.custom("cn2", "Seq", seq);
    }

    /// The calling process and its pod, alike for flows and DNS answers.
    fn source(&mut self, src: &Source) {
        self.pair("spid", src.pid);
        self.pair("sproc", &src.comm);
        self.pair("suid", src.uid);
        self.custom("cs3", "Namespace", src.namespace);
        self.custom("cs4", "Pod", src.pod);
        self.custom("cs5", "Cgroup", src.cgroup);
        self.custom("cs6", "Container ID", src.container.as_ref().map(|c| c.id));
        let workload = src.workload.map(|w| Joined(&w.kind, "/", &w.name));
        self.custom("flexString2", "Workload", workload);
    }
}

/// `cs1` → `cs1Label`, in `buffer` (custom keys are short constants).
fn label_key_of<'b>(key: &str, buffer: &'b mut [u8; 24]) -> &'b str {
    const SUFFIX: &[u8] = b"Label";
    let len = key.len() + SUFFIX.len();
    buffer[..key.len()].copy_from_slice(key.as_bytes());
    buffer[key.len()..len].copy_from_slice(SUFFIX);
    std::str::from_utf8(&buffer[..len]).expect("a key and an ASCII suffix")
}

/// Two values with a separator between them.
struct Joined<'a, A, B>(A, &'a str, B);

impl<A: Display, B: Display> Display for Joined<'_, A, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}{}", self.0, self.1, self.2)
    }
}

fn write_flow(flow: &FlowRecord, extension: &mut Extension) {
    extension.pair("rt", unix_millis(&flow.time));
    extension.pair("cat", FlowRecord::KIND);
    extension.pair("act", flow.verdict);
    // CEF's deviceDirection: 1 is outbound.
    extension.pair("deviceDirection", 1);
    let protocol = match flow.protocol.as_ref() {
        "tcp" => "TCP",
        "udp" => "UDP",
        other => other,
    };
    extension.pair("proto", protocol);
    extension.destination(flow.dst.ip, flow.dst.port);
    // CEF's destinationHostName: the name the source resolved, when known.
    extension.pair_if("dhost", flow.dst.fqdn);
    extension.source(&flow.src);
    extension.pair("dvchost", flow.node);
    extension.seq(Some(flow.seq));
    extension.custom("cs1", "Policy", flow.policy);
    extension.custom("cs2", "Rule", Some(&flow.rule));
    extension.custom("cn1", "Rule ID", Some(flow.rule_id));
    // Every custom string key has a use already: the source as how many of
    // the policies in cs1 are cluster resources (0: local; one policy
    // unless a default decided).
    let cluster_policies = flow.policy.zip(flow.policy_source).map(|(policy, source)| {
        policies_with_sources(policy, Some(source))
            .filter(|(_, source)| *source == Some(PolicySource::Cluster.as_str()))
            .count()
    });
    extension.custom("cn3", "Cluster Policies", cluster_policies);
    extension.custom("flexString1", "Mode", Some(flow.mode));
    match &flow.summary {
        Some(summary) => {
            extension.pair("cnt", summary.count);
            extension.times(&summary.first_time, Some(&summary.last_time));
        }
        None => extension.times(&flow.time, None),
    }
}

fn write_dns(dns: &DnsRecord, extension: &mut Extension) {
    extension.pair("rt", unix_millis(&dns.time));
    extension.pair("cat", DnsRecord::KIND);
    extension.pair("app", "DNS");
    extension.destination(dns.resolver.ip, dns.resolver.port);
    extension.source(&dns.src);
    extension.pair("dvchost", dns.node);
    extension.seq(Some(dns.seq));
    extension.pair("outcome", &dns.rcode);
    extension.custom("cs1", "DNS Query", Some(&dns.query));
    extension.custom("flexString1", "DNS Query Type", Some(&dns.query_type));
    extension.custom("cs2", "DNS Answers", Some(ZoneLines(&dns.answers)));
    extension.custom("cn1", "FQDN Learned", Some(u8::from(dns.learned)));
    extension.times(&dns.time, None);
}

/// Answers as zone file lines (`name ttl type data`), `; `-separated.
struct ZoneLines<'a>(&'a [DnsAnswer<'a>]);

impl Display for ZoneLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, answer) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(
                f,
                "{} {} {} {}",
                answer.name, answer.ttl, answer.kind, answer.data
            )?;
        }
        Ok(())
    }
}

fn write_loss(loss: &LossRecord, extension: &mut Extension) {
    extension.pair("rt", unix_millis(&loss.time));
    extension.pair("cat", LossRecord::KIND);
    extension.pair("dvchost", &loss.node);
    extension.seq(loss.seq);
    extension.pair("reason", loss_reason(loss.reason));
    extension.pair("msg", LossMessage(loss));
    extension.custom("cs1", "Sink", loss.sink.as_deref());
    extension.custom("cn1", "Lost Records", Some(loss.count));
    // cn2 is the marker's own seq, so the range lost is one string.
    let lost_seqs = loss
        .first_seq
        .zip(loss.last_seq)
        .map(|(first, last)| Joined(first, "-", last));
    extension.custom("cs2", "Lost Seqs", lost_seqs);
    extension.times(&loss.time, None);
}

#[cfg(test)]
mod tests {
    use super::escape_header;

    #[test]
    fn header_escapes_backslashes_and_pipes() {
        let mut out = Vec::new();
        escape_header("a|b\\c=d", &mut out);
        assert_eq!(out, b"a\\|b\\\\c=d");
    }
}
