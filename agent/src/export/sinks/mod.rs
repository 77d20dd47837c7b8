//! Where exported records go: stdout or a rotating file, syslog, or an HTTP
//! log API. A sink turns each formatted record into its wire form once
//! (`encode`, before the spool) and sends batches of those (`send`).

pub mod file;
pub mod http;
pub mod syslog;

use std::time::Duration;

pub use self::syslog::Encoded;
use self::{file::LineTarget, http::HttpSender, syslog::SyslogSender};
use super::record::LossRecord;

/// What transports need of a record besides its formatted payload.
#[derive(Clone, Copy, Debug)]
pub struct RecordMeta<'a> {
    /// The record's `type`: `flow`, `dns`, `loss`.
    pub kind: &'static str,
    /// RFC 3339 with nine fractional digits, as in the record.
    pub time: &'a str,
    pub unix_nanos: i128,
    pub node: &'a str,
    pub severity: Severity,
    pub seq: Option<u64>,
}

impl<'a> RecordMeta<'a> {
    /// A loss marker's: it warns.
    pub fn of_loss(marker: &'a LossRecord, unix_nanos: i128) -> Self {
        Self {
            kind: LossRecord::KIND,
            time: &marker.time,
            unix_nanos,
            node: &marker.node,
            severity: Severity::Warning,
            seq: marker.seq,
        }
    }

    pub fn unix_seconds(&self) -> f64 {
        self.unix_nanos as f64 / 1e9
    }
}

/// How loud a record is: a deny warns, an audit notices, the rest informs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Info,
    Notice,
    Warning,
}

/// The first records of a batch that the receiver has dealt with: taken,
/// or (`rejected` of them) refused for good. They are not sent again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settled {
    pub records: usize,
    pub rejected: usize,
}

/// A batch not (wholly) delivered now: it is sent again from where
/// `settled` ends, after `after` when the receiver said so. Records the
/// receiver refuses for good are no error: they are counted as rejected.
#[derive(Debug, PartialEq, Eq)]
pub struct SendError {
    pub after: Option<Duration>,
    pub reason: String,
    pub settled: Settled,
}

impl SendError {
    pub fn retry(reason: impl Into<String>) -> Self {
        Self {
            after: None,
            reason: reason.into(),
            settled: Settled::default(),
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "will retry: {}", self.reason)
    }
}

/// How a sink writes one record on the wire (no connection needed, so the
/// publisher encodes and the sink's task only sends).
#[derive(Clone, Debug)]
pub enum Encoder {
    Lines,
    Syslog {
        facility: u8,
        /// UDP: the largest datagram to send.
        max_message_bytes: Option<usize>,
    },
    Http(http::HttpApi),
}

impl Encoder {
    /// Appends the wire form of one record. `json`: whether `payload` is
    /// JSON; `instance` names this run of the agent (ids made of it and
    /// `seq` are unique across restarts). Only syslog over UDP cuts.
    pub fn encode(
        &self,
        meta: &RecordMeta,
        payload: &[u8],
        json: bool,
        instance: &str,
        out: &mut Vec<u8>,
    ) -> Encoded {
        match self {
            Self::Lines => out.extend_from_slice(payload),
            Self::Syslog {
                facility,
                max_message_bytes,
            } => return syslog::encode(*facility, *max_message_bytes, meta, payload, out),
            Self::Http(api) => api.encode(meta, payload, json, instance, out),
        }
        Encoded::Whole
    }
}

/// A connected (or connectable) transport.
pub enum Transport {
    Lines(LineTarget),
    Syslog(SyslogSender),
    Http(HttpSender),
}

impl Transport {
    /// Delivers a batch of encoded records, in order. `Ok(n)`: delivered but
    /// for `n` the receiver rejected for good.
    pub async fn send(&mut self, records: &[Vec<u8>]) -> Result<usize, SendError> {
        match self {
            Self::Lines(target) => target
                .write_batch(records)
                .map(|()| 0)
                .map_err(|e| SendError::retry(e.to_string())),
            Self::Syslog(sender) => sender
                .send(records)
                .await
                .map(|()| 0)
                .map_err(|e| SendError::retry(e.to_string())),
            Self::Http(sender) => sender.send(records).await,
        }
    }
}
