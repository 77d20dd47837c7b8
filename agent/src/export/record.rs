//! The exported record model: flow records (`crate::flow::FlowRecord`), DNS
//! answer records and loss markers. Every record has `type`, `time`, `node`
//! and, when the pipeline made it, a per-node `seq`. docs/export.md is the
//! reference; each format (`super::format`) maps these fields.

use std::{borrow::Cow, net::IpAddr};

use serde::Serialize;

use crate::flow::{FlowRecord, Source};

/// `<node>-<instance>-<seq>`: a record's id across sinks and resends. The
/// same record, resent, keeps it, and no other record has it, as `seq`
/// restarts only with a new instance (a run of the agent). OCSF's
/// `metadata.uid` and the Elastic sink's `_id` are this string.
pub struct RecordUid<'a> {
    pub node: &'a str,
    pub instance: &'a str,
    pub seq: u64,
}

impl std::fmt::Display for RecordUid<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}-{}", self.node, self.instance, self.seq)
    }
}

/// One record, borrowed for formatting.
#[derive(Clone, Copy, Debug)]
pub enum Record<'r, 'a> {
    Flow(&'r FlowRecord<'a>),
    Dns(&'r DnsRecord<'a>),
    Loss(&'r LossRecord),
}

/// Interval aggregate of allowed flows (`--export-aggregate`): the flow
/// record of the first connection, with how many there were. Denied and
/// audit decisions are never aggregated.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub count: u64,
    /// RFC 3339, as `time`.
    pub first_time: String,
    pub last_time: String,
}

/// A DNS answer seen by the datapath for an endpoint (the FQDN issue makes
/// these; the model and formats exist first).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DnsRecord<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    pub seq: u64,
    pub node: &'a str,
    /// The endpoint that received the answer.
    pub src: Source<'a>,
    pub resolver: DnsResolver,
    /// The question name, lowercase, without the trailing dot.
    pub query: Cow<'a, str>,
    /// `A`, `AAAA`, or `TYPE<n>`.
    pub query_type: Cow<'static, str>,
    /// `NOERROR`, `NXDOMAIN`, `SERVFAIL`, ... or `RCODE<n>`.
    pub rcode: Cow<'static, str>,
    pub answers: Vec<DnsAnswer<'a>>,
    /// Whether the answer's addresses were installed for an FQDN rule.
    pub learned: bool,
    /// Set when learning this answer took the endpoint over a limit
    /// (`addresses_per_name`, `addresses_per_endpoint`): it forgot the
    /// addresses that would have expired first (native JSON only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<&'static str>,
    /// Set when nothing was learned from this answer whatever it says:
    /// `not-asked` (no query with its id and question went from the
    /// receiving socket to this resolver, from its endpoint's network
    /// namespace, within 30 s) or `via-loopback` (over loopback from a
    /// resolver that is not a loopback address, outside the host's network
    /// namespace). Native JSON only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<&'static str>,
}

impl DnsRecord<'_> {
    pub const KIND: &'static str = "dns";
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DnsResolver {
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct DnsAnswer<'a> {
    /// The owner name of the record (the question, or a CNAME target).
    pub name: Cow<'a, str>,
    /// `A`, `AAAA` or `CNAME`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The address (A, AAAA) or the target name (CNAME).
    pub data: Cow<'a, str>,
    pub ttl: u32,
}

/// Records were dropped: how many, where, and which `seq` numbers they had
/// when known.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct LossRecord {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub time: String,
    /// The pipeline's `seq` for losses it reports itself (`kernel`); null
    /// for a sink's marker, which sits in that sink's stream only.
    pub seq: Option<u64>,
    pub node: String,
    pub count: u64,
    pub reason: LossReason,
    /// The sink that dropped them, for sink losses.
    pub sink: Option<String>,
    /// The dropped range of `seq`, when the records had one.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
}

impl LossRecord {
    pub const KIND: &'static str = "loss";
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LossReason {
    /// The kernel's ring buffer was full: events never reached the agent.
    KernelRingbuf,
    /// A sink's in-memory queue was full: its intake fell behind.
    QueueFull,
    /// A sink's spool was full: its receiver has been away too long.
    SpoolFull,
    /// Spooled records could not be read back: a torn write at a crash, or
    /// damage on disk (their checksum does not match).
    SpoolDamaged,
    /// A sink without a spool (stdout) could not write them.
    WriteFailed,
    /// A sink refused the records for good (a permanent HTTP error).
    Rejected,
}
