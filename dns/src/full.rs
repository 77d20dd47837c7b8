//! A general DNS answer decoder, for what the kernel's bounded parser leaves
//! to the agent ([`tollgate_common::dns::Error::Unsupported`]) and for DNS
//! over TCP, which the kernel does not parse at all.

use std::borrow::Cow;
use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode};
use hickory_proto::rr::{self, Name, RData, RecordType};
use tollgate_common::dns::CLASS_IN;

use crate::twin::join_labels;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a DNS message: {0}")]
    Invalid(#[from] hickory_proto::serialize::binary::DecodeError),
    /// A query, or another opcode than a standard query.
    #[error("not the answer to a standard query")]
    NotAnAnswer,
    #[error("{0} questions where one is expected")]
    QuestionCount(usize),
}

/// An answer: its header, its one question and its answer section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub id: u16,
    /// The question name, lowercase and dotted, without the trailing dot
    /// (spelled as [`crate::twin::dotted`] spells it).
    pub name: String,
    pub qtype: u16,
    /// The header's 4-bit RCODE; EDNS's extended bits are left out, as the
    /// kernel leaves them out.
    pub rcode: u8,
    /// The TC bit: the client is expected to ask again over TCP.
    pub truncated: bool,
    pub answers: Vec<Record>,
}

/// A record of the answer section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Owner name, lowercase and dotted.
    pub name: String,
    pub rtype: u16,
    pub class: u16,
    /// As sent.
    pub ttl: u32,
    pub data: RecordData,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordData {
    /// From an A or AAAA record.
    Address(IpAddr),
    /// A CNAME's target, lowercase and dotted.
    Name(String),
    Other,
}

/// Decodes the answer to a standard query with one question.
pub fn decode(message: &[u8]) -> Result<Decoded, DecodeError> {
    let message = Message::from_vec(message)?;
    if message.metadata.message_type != MessageType::Response
        || message.metadata.op_code != OpCode::Query
    {
        return Err(DecodeError::NotAnAnswer);
    }
    let [query] = message.queries.as_slice() else {
        return Err(DecodeError::QuestionCount(message.queries.len()));
    };
    Ok(Decoded {
        id: message.metadata.id,
        name: text(query.name()),
        qtype: query.query_type().into(),
        rcode: message.metadata.response_code.low(),
        truncated: message.metadata.truncation,
        answers: message.answers.iter().map(record).collect(),
    })
}

impl Decoded {
    /// The addresses the kernel would learn: A and AAAA records of class IN
    /// in the answer section, in order, with their TTLs as sent.
    pub fn addresses(&self) -> Vec<(IpAddr, u32)> {
        self.answers
            .iter()
            .filter(|record| record.class == CLASS_IN)
            .filter_map(|record| match record.data {
                RecordData::Address(ip) => Some((ip, record.ttl)),
                _ => None,
            })
            .collect()
    }
}

fn record(record: &rr::Record) -> Record {
    let data = match &record.data {
        RData::A(a) => RecordData::Address(a.0.into()),
        RData::AAAA(aaaa) => RecordData::Address(aaaa.0.into()),
        RData::CNAME(cname) => RecordData::Name(text(&cname.0)),
        _ => RecordData::Other,
    };
    Record {
        name: text(&record.name),
        rtype: record.record_type().into(),
        class: record.dns_class.into(),
        ttl: record.ttl,
        data,
    }
}

fn text(name: &Name) -> String {
    join_labels(&name.to_lowercase())
}

/// The mnemonic of a record type, or `TYPE<n>` (RFC 3597) for one without.
pub fn rtype_name(rtype: u16) -> Cow<'static, str> {
    match RecordType::from(rtype) {
        // hickory's names for these are placeholders, not mnemonics (ANAME
        // has no assigned number: hickory uses a private-use one).
        RecordType::Unknown(_) | RecordType::ZERO | RecordType::ANAME => {
            Cow::Owned(format!("TYPE{rtype}"))
        }
        known => Cow::Borrowed(known.into()),
    }
}

/// The mnemonic of a 4-bit RCODE as dig prints it, or `RCODE<n>`.
pub fn rcode_name(rcode: u8) -> Cow<'static, str> {
    Cow::Borrowed(match rcode {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        6 => "YXDOMAIN",
        7 => "YXRRSET",
        8 => "NXRRSET",
        9 => "NOTAUTH",
        10 => "NOTZONE",
        _ => return Cow::Owned(format!("RCODE{rcode}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_type_names() {
        assert_eq!(rtype_name(1), "A");
        assert_eq!(rtype_name(28), "AAAA");
        assert_eq!(rtype_name(5), "CNAME");
        assert_eq!(rtype_name(16), "TXT");
        assert_eq!(rtype_name(65), "HTTPS");
        assert_eq!(rtype_name(0), "TYPE0");
        assert_eq!(rtype_name(65305), "TYPE65305");
        assert_eq!(rtype_name(4242), "TYPE4242");
    }

    #[test]
    fn rcode_names() {
        assert_eq!(rcode_name(0), "NOERROR");
        assert_eq!(rcode_name(1), "FORMERR");
        assert_eq!(rcode_name(2), "SERVFAIL");
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(rcode_name(4), "NOTIMP");
        assert_eq!(rcode_name(5), "REFUSED");
        assert_eq!(rcode_name(11), "RCODE11");
        assert_eq!(rcode_name(200), "RCODE200");
    }

    /// The kernel parser's own test answer, with a CH record added.
    const ANSWER: &[u8] = &[
        0x12, 0x34, 0x83, 0x83, 0, 1, 0, 3, 0, 0, 0, 0, // TC, NXDOMAIN, 3 answers
        3, b'W', b'w', b'W', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0,
        0, 1, 0, 1, // A IN
        0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0, 16, // CNAME example.com
        0xc0, 16, 0, 1, 0, 1, 0, 0, 1, 0, 0, 4, 10, 0, 0, 7, // A 10.0.0.7, TTL 256
        0xc0, 16, 0, 1, 0, 3, 0, 0, 1, 0, 0, 4, 10, 0, 0, 8, // A CH 10.0.0.8
    ];

    #[test]
    fn decodes_an_answer() {
        let decoded = decode(ANSWER).unwrap();
        assert_eq!(decoded.id, 0x1234);
        assert_eq!(decoded.name, "www.example.com");
        assert_eq!(decoded.qtype, 1);
        assert_eq!(decoded.rcode, 3);
        assert!(decoded.truncated);
        assert_eq!(
            decoded.answers,
            vec![
                Record {
                    name: "www.example.com".into(),
                    rtype: 5,
                    class: 1,
                    ttl: 60,
                    data: RecordData::Name("example.com".into()),
                },
                Record {
                    name: "example.com".into(),
                    rtype: 1,
                    class: 1,
                    ttl: 256,
                    data: RecordData::Address("10.0.0.7".parse().unwrap()),
                },
                Record {
                    name: "example.com".into(),
                    rtype: 1,
                    class: 3,
                    ttl: 256,
                    data: RecordData::Address("10.0.0.8".parse().unwrap()),
                },
            ]
        );
        assert_eq!(
            decoded.addresses(),
            vec![("10.0.0.7".parse().unwrap(), 256)]
        );
    }

    #[test]
    fn refuses_what_is_not_an_answer() {
        let mut query = ANSWER.to_vec();
        query[2] &= 0x7f;
        assert!(matches!(decode(&query), Err(DecodeError::NotAnAnswer)));
        let mut no_question = ANSWER[..12].to_vec();
        no_question[5] = 0;
        no_question[7] = 0;
        assert!(matches!(
            decode(&no_question),
            Err(DecodeError::QuestionCount(0))
        ));
        assert!(matches!(
            decode(&ANSWER[..40]),
            Err(DecodeError::Invalid(_))
        ));
    }
}
