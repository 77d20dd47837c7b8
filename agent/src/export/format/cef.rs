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
    LossMessage, Severity, Verdict, event_name, loss_reason, policies_with_sources, unix_millis,
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
    let name = match record {
        Record::Flow(flow) => match Verdict::of(flow) {
            Verdict::Allowed => "Egress allowed",
            Verdict::Denied => "Egress denied",
            Verdict::Audit => "Egress would be denied (observe mode)",
            Verdict::Unknown => "Egress decision unknown",
        },
        Record::Dns(_) => "DNS answer",
        Record::Loss(_) => "Records lost",
    };
    out.extend_from_slice(b"CEF:0|");
    for field in [
        VENDOR,
        PRODUCT,
        env!("CARGO_PKG_VERSION"),
        event_name(record),
        name,
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
struct Escaped<'a>(&'a mut Vec<u8>);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            match byte {
                b'\\' => self.0.extend_from_slice(b"\\\\"),
                b'=' => self.0.extend_from_slice(b"\\="),
                b'\n' => self.0.extend_from_slice(b"\\n"),
                b'\r' => self.0.extend_from_slice(b"\\r"),
                other => self.0.push(other),
            }
        }
        Ok(())
    }
}

/// The `key=value` pairs after the header, separated by spaces.
struct Extension<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl Extension<'_> {
    /// Keys are CEF's, letters and digits only: they need no escape.
    fn pair(&mut self, key: impl Display, value: impl Display) {
        if !self.empty {
            self.out.push(b' ');
        }
        self.empty = false;
        put(self.out, key);
        self.out.push(b'=');
        write!(Escaped(self.out), "{value}").expect("formatting into a Vec");
    }

    fn pair_if(&mut self, key: &str, value: Option<impl Display>) {
        if let Some(value) = value {
            self.pair(key, value);
        }
    }

    /// A custom key (`cs1`, `cn2`, `flexString1`, ...) and its label.
    fn custom(&mut self, key: &str, label: &str, value: Option<impl Display>) {
        if let Some(value) = value {
            self.pair(LabelKey(key), label);
            self.pair(key, value);
        }
    }

    fn destination(&mut self, ip: IpAddr, port: u16) {
        match ip {
            IpAddr::V4(v4) => self.pair("dst", v4),
            // `dst` is IPv4 only; CEF's convention for an IPv6 destination
            // is the custom IPv6 address 3.
            IpAddr::V6(v6) => self.custom("c6a3", "Destination IPv6 Address", Some(v6)),
        }
        self.pair("dpt", port);
    }

    /// The calling process and its pod, alike for flows and DNS answers.
    fn source(&mut self, src: &Source) {
        self.pair("spid", src.pid);
        self.pair("sproc", &src.comm);
        self.pair("suid", src.uid);
        self.custom("cs3", "Namespace", src.namespace);
        self.custom("cs4", "Pod", src.pod);
        self.custom("cs5", "Cgroup", src.cgroup);
        self.custom("cn2", "Cgroup ID", Some(src.cgroup_id));
        self.custom("cs6", "Container ID", src.container.as_ref().map(|c| c.id));
        let workload = src.workload.map(|w| Joined(&w.kind, "/", &w.name));
        self.custom("flexString2", "Workload", workload);
    }
}

/// `cs1` → `cs1Label`.
struct LabelKey<'a>(&'a str);

impl Display for LabelKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}Label", self.0)
    }
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
    match flow.protocol.as_ref() {
        "tcp" => extension.pair("proto", "TCP"),
        "udp" => extension.pair("proto", "UDP"),
        other => extension.pair("proto", other),
    }
    extension.destination(flow.dst.ip, flow.dst.port);
    // CEF's destinationHostName: the name the source resolved, when known.
    extension.pair_if("dhost", flow.dst.fqdn);
    extension.source(&flow.src);
    extension.pair("dvchost", flow.node);
    extension.pair("externalId", flow.seq);
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
    if let Some(summary) = &flow.summary {
        extension.pair("cnt", summary.count);
        extension.pair("start", unix_millis(&summary.first_time));
        extension.pair("end", unix_millis(&summary.last_time));
    }
}

fn write_dns(dns: &DnsRecord, extension: &mut Extension) {
    extension.pair("rt", unix_millis(&dns.time));
    extension.pair("cat", DnsRecord::KIND);
    extension.pair("app", "DNS");
    extension.destination(dns.resolver.ip, dns.resolver.port);
    extension.source(&dns.src);
    extension.pair("dvchost", dns.node);
    extension.pair("externalId", dns.seq);
    extension.pair("outcome", &dns.rcode);
    extension.custom("cs1", "DNS Query", Some(&dns.query));
    extension.custom("flexString1", "DNS Query Type", Some(&dns.query_type));
    extension.custom("cs2", "DNS Answers", Some(ZoneLines(&dns.answers)));
    extension.custom("cn1", "FQDN Learned", Some(u8::from(dns.learned)));
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
    extension.pair_if("externalId", loss.seq);
    extension.pair("reason", loss_reason(loss.reason));
    extension.pair("msg", LossMessage(loss));
    extension.custom("cs1", "Sink", loss.sink.as_deref());
    extension.custom("cn1", "Lost Records", Some(loss.count));
    extension.custom("cn2", "First Seq", loss.first_seq);
    extension.custom("cn3", "Last Seq", loss.last_seq);
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
