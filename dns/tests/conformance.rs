//! The kernel parser's twin against a general DNS library, on answers that
//! library builds and compresses, and on damaged and arbitrary bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Header, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, TXT};
use hickory_proto::rr::{DNSClass, Label, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use proptest::prelude::*;
use proptest::sample::Index;
use tollgate_common::dns::{Error, MAX_ANSWERS, MAX_LABELS, MESSAGE_MAX, Unsupported};
use tollgate_dns::{check_twin_agrees, full, twin};

/// A name as its labels, case kept: hickory compresses byte for byte.
type Labels = Vec<String>;

/// 1 to 40 labels of letters in either case, digits and hyphens, mostly
/// short so that many labels fit; labels that would take the name past 255
/// bytes are left out.
fn labels() -> impl Strategy<Value = Labels> {
    let label = prop_oneof![
        8 => "[a-zA-Z0-9-]{1,5}",
        1 => "[a-zA-Z0-9-]{6,63}",
    ];
    prop::collection::vec(label, 1..=40).prop_map(|labels| fit(Vec::new(), labels))
}

/// `suffix` with as many of `prefix`'s labels before it as fit in 255 bytes.
fn fit(suffix: Labels, prefix: Labels) -> Labels {
    let mut wire_len = 1 + suffix.iter().map(|label| 1 + label.len()).sum::<usize>();
    let mut labels: Labels = prefix
        .into_iter()
        .filter(|label| {
            let fits = wire_len + 1 + label.len() <= 255;
            if fits {
                wire_len += 1 + label.len();
            }
            fits
        })
        .collect();
    labels.extend(suffix);
    labels
}

fn name(labels: &[String]) -> Name {
    let labels = labels
        .iter()
        .map(|label| Label::from_raw_bytes(label.as_bytes()).unwrap());
    let mut name = Name::from_labels(labels).unwrap();
    name.set_fqdn(true);
    name
}

/// An owner or CNAME target.
#[derive(Clone, Debug)]
enum NameChoice {
    Question,
    /// The target of the last CNAME before, as in a resolver's chain (the
    /// question name when there is none).
    ChainTarget,
    QuestionUpper,
    /// A name under the question's (labels, then a pointer, on the wire).
    Under(Labels),
    Other(Labels),
}

/// Owners as resolvers write them: names written before, so compressed to
/// a pointer.
fn chain_name() -> impl Strategy<Value = NameChoice> {
    prop_oneof![Just(NameChoice::Question), Just(NameChoice::ChainTarget)]
}

fn any_name() -> impl Strategy<Value = NameChoice> {
    prop_oneof![
        3 => Just(NameChoice::Question),
        2 => Just(NameChoice::ChainTarget),
        1 => Just(NameChoice::QuestionUpper),
        2 => labels().prop_map(NameChoice::Under),
        2 => labels().prop_map(NameChoice::Other),
    ]
}

impl NameChoice {
    fn resolve(&self, question: &Labels, chain_target: &Labels) -> Labels {
        match self {
            Self::Question => question.clone(),
            Self::ChainTarget => chain_target.clone(),
            Self::QuestionUpper => question.iter().map(|l| l.to_ascii_uppercase()).collect(),
            Self::Under(prefix) => fit(question.clone(), prefix.clone()),
            Self::Other(labels) => labels.clone(),
        }
    }
}

#[derive(Clone, Debug)]
enum Data {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(NameChoice),
    Txt(Vec<String>),
}

fn data() -> impl Strategy<Value = Data> {
    prop_oneof![
        4 => any::<Ipv4Addr>().prop_map(Data::A),
        3 => any::<Ipv6Addr>().prop_map(Data::Aaaa),
        2 => any_name().prop_map(Data::Cname),
        1 => prop_oneof![
            9 => prop::collection::vec("[ -~]{0,40}", 1..4),
            // Now and then big enough to take the message past MESSAGE_MAX.
            1 => prop::collection::vec("[ -~]{200,255}", 4..12),
        ]
        .prop_map(Data::Txt),
    ]
}

#[derive(Clone, Debug)]
struct RecordSpec {
    owner: NameChoice,
    data: Data,
    /// Mostly IN, sometimes CH.
    chaos: bool,
    ttl: u32,
}

fn record_spec(owner: impl Strategy<Value = NameChoice>) -> impl Strategy<Value = RecordSpec> {
    (owner, data(), prop::bool::weighted(0.1), any::<u32>()).prop_map(
        |(owner, data, chaos, ttl)| RecordSpec {
            owner,
            data,
            chaos,
            ttl,
        },
    )
}

fn records(
    owner: impl Strategy<Value = NameChoice>,
    max: usize,
) -> impl Strategy<Value = Vec<RecordSpec>> {
    prop::collection::vec(record_spec(owner), 0..=max)
}

/// A record's owner and CNAME target, resolved.
struct Names {
    owner: Labels,
    target: Option<Labels>,
}

impl RecordSpec {
    fn names(&self, question: &Labels, chain_target: &Labels) -> Names {
        Names {
            owner: self.owner.resolve(question, chain_target),
            target: match &self.data {
                Data::Cname(target) => Some(target.resolve(question, chain_target)),
                _ => None,
            },
        }
    }

    fn build(&self, names: &Names) -> Record {
        let rdata = match (&self.data, &names.target) {
            (Data::A(ip), _) => RData::A(A(*ip)),
            (Data::Aaaa(ip), _) => RData::AAAA(AAAA(*ip)),
            (Data::Cname(_), Some(target)) => RData::CNAME(CNAME(name(target))),
            (Data::Cname(_), None) => unreachable!("a CNAME has a target"),
            (Data::Txt(strings), _) => RData::TXT(TXT::new(strings.clone())),
        };
        let mut record = Record::from_rdata(name(&names.owner), self.ttl, rdata);
        if self.chaos {
            record.dns_class = DNSClass::CH;
        }
        record
    }
}

#[derive(Clone, Debug)]
struct AnswerSpec {
    id: u16,
    question: Labels,
    qtype: u16,
    rcode: u16,
    truncated: bool,
    edns: bool,
    answers: Vec<RecordSpec>,
    authority: Vec<RecordSpec>,
    additional: Vec<RecordSpec>,
}

fn answer_spec() -> impl Strategy<Value = AnswerSpec> {
    (
        any::<u16>(),
        labels(),
        prop_oneof![Just(1u16), Just(28u16), any::<u16>()],
        (prop::bool::weighted(0.3), 0u16..4096),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.3),
        prop_oneof![
            7 => records(chain_name(), 20),
            3 => records(any_name(), 20),
        ],
        records(any_name(), 2),
        records(any_name(), 2),
    )
        .prop_map(
            |(
                id,
                question,
                qtype,
                (extended, rcode),
                truncated,
                edns,
                answers,
                authority,
                additional,
            )| {
                AnswerSpec {
                    id,
                    question,
                    qtype,
                    // An extended RCODE needs EDNS to carry its high bits.
                    rcode: if extended && edns { rcode } else { rcode & 0xf },
                    truncated,
                    edns,
                    answers,
                    authority,
                    additional,
                }
            },
        )
}

impl AnswerSpec {
    /// The names of the answer section's records, in order.
    fn answer_names(&self) -> Vec<Names> {
        let mut chain_target = self.question.clone();
        self.answers
            .iter()
            .map(|spec| {
                let names = spec.names(&self.question, &chain_target);
                if let Some(target) = &names.target {
                    chain_target = target.clone();
                }
                names
            })
            .collect()
    }

    /// The message on the wire, as hickory encodes (and compresses) it.
    fn encode(&self) -> Vec<u8> {
        let question = name(&self.question);
        let mut message = Message::response(self.id, OpCode::Query);
        message.metadata.response_code =
            ResponseCode::from((self.rcode >> 4) as u8, self.rcode as u8);
        message.metadata.truncation = self.truncated;
        message.metadata.recursion_desired = true;
        message.metadata.recursion_available = true;
        message.add_query(Query::query(question.clone(), RecordType::from(self.qtype)));
        for (spec, names) in self.answers.iter().zip(self.answer_names()) {
            message.add_answer(spec.build(&names));
        }
        for spec in &self.authority {
            let mut record = spec.build(&spec.names(&self.question, &self.question));
            // Authority records are typically NS or SOA.
            if let Data::Cname(_) = spec.data {
                record.data = RData::NS(NS(question.clone()));
            }
            message.add_authority(record);
        }
        for spec in &self.additional {
            message.add_additional(spec.build(&spec.names(&self.question, &self.question)));
        }
        if self.edns {
            let mut edns = Edns::new();
            edns.set_max_payload(1232);
            message.set_edns(edns);
        }
        message.to_vec().expect("hickory encodes what it built")
    }
}

/// Whether an answer record's owner name is spelled out in `message`
/// rather than a pointer: what hickory compresses depends on its limits on
/// compression candidates, so this looks at the wire.
fn spelled_out_owner(message: &[u8]) -> bool {
    let mut decoder = BinDecoder::new(message);
    let header = Header::read(&mut decoder).unwrap();
    for _ in 0..header.counts.queries {
        Query::read(&mut decoder).unwrap();
    }
    for _ in 0..header.counts.answers {
        let first = message[decoder.index()];
        if first != 0 && first & 0xc0 == 0 {
            return true;
        }
        Record::read(&mut decoder).unwrap();
    }
    false
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// On well-formed answers the twin reads what hickory reads, or says
    /// why it leaves the answer to the agent, and only when that is so.
    #[test]
    fn twin_reads_well_formed_answers(spec in answer_spec()) {
        let bytes = spec.encode();
        let decoded = full::decode(&bytes).expect("hickory decodes what it encoded");
        prop_assert_eq!(decoded.answers.len(), spec.answers.len());

        let expected = if bytes.len() > MESSAGE_MAX {
            Err(Unsupported::TooLarge)
        } else if decoded.truncated {
            Err(Unsupported::Truncated)
        } else if decoded.answers.len() > MAX_ANSWERS {
            Err(Unsupported::TooManyAnswers)
        } else if spec.question.len() > MAX_LABELS {
            Err(Unsupported::TooManyLabels)
        } else if spelled_out_owner(&bytes) {
            Err(Unsupported::UncompressedOwner)
        } else {
            Ok(())
        };
        match (twin::parse(&bytes), expected) {
            (Err(Error::Unsupported(why)), Err(expected)) => prop_assert_eq!(why, expected),
            (Ok(answer), Ok(())) => {
                prop_assert_eq!(answer.id, decoded.id);
                prop_assert_eq!(&answer.name, &decoded.name);
                prop_assert_eq!(answer.name, spec.question.join(".").to_ascii_lowercase());
                prop_assert_eq!(answer.qtype, decoded.qtype);
                prop_assert_eq!(answer.rcode, decoded.rcode);
                prop_assert_eq!(answer.addresses, decoded.addresses());
            }
            (parsed, expected) => {
                prop_assert!(false, "twin {:?}, expected {:?}", parsed, expected);
            }
        }
        prop_assert_eq!(check_twin_agrees(&bytes), Ok(()));
    }

    /// On anything at all the twin does not panic, and when both accept,
    /// the twin and hickory agree.
    #[test]
    fn twin_agrees_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        prop_assert_eq!(check_twin_agrees(&bytes), Ok(()));
    }

    #[test]
    fn twin_agrees_on_damaged_answers(
        spec in answer_spec(),
        damage in prop::collection::vec(damage(), 1..6),
    ) {
        let mut bytes = spec.encode();
        for damage in &damage {
            damage.apply(&mut bytes);
        }
        prop_assert_eq!(check_twin_agrees(&bytes), Ok(()));
    }
}

#[derive(Clone, Debug)]
enum Damage {
    Truncate(Index),
    FlipBit(Index, u8),
    Overwrite(Index, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        1 => any::<Index>().prop_map(Damage::Truncate),
        3 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Damage::FlipBit(at, bit)),
        3 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Damage::Overwrite(at, byte)),
    ]
}

impl Damage {
    fn apply(&self, bytes: &mut Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let len = bytes.len();
        match *self {
            Self::Truncate(at) => bytes.truncate(at.index(len)),
            Self::FlipBit(at, bit) => bytes[at.index(len)] ^= 1 << bit,
            Self::Overwrite(at, byte) => bytes[at.index(len)] = byte,
        }
    }
}

/// The twin does not follow owner-name pointers: it learns from an answer
/// whose owner points at itself, which hickory refuses. The check allows
/// that (the question is sound and the twin's reading bounded).
#[test]
fn owner_pointers_are_not_followed() {
    let message = [
        0, 1, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0, // header
        1, b'a', 0, 0, 1, 0, 1, // a. A IN
        0xc0, 19, 0, 1, 0, 1, 0, 0, 0, 9, 0, 4, 10, 0, 0, 1, // owner points to itself
    ];
    assert!(full::decode(&message).is_err());
    let answer = twin::parse(&message).unwrap();
    assert_eq!(
        answer.addresses,
        vec![(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 9)]
    );
    assert_eq!(check_twin_agrees(&message), Ok(()));
}

/// A message of exactly MESSAGE_MAX bytes whose answer count claims more
/// records than it holds: the kernel parser's record cursor reaches 4096,
/// is masked to 0, and the header and question are read as further
/// records, one of which is learned as an A record. It must be Malformed,
/// as the same message one byte shorter is.
#[test]
fn a_cursor_at_message_max_does_not_wrap() {
    let mut message = vec![
        0, 0, 0x81, 0x80, 0, 1, 0, 3, 0, 0, 0, 0, // 1 question, 3 answers
        0, 0x01, 0x00, 0x01, 0x00, // ". TYPE256 CLASS256"
        0xc0, 12, 0x01, 0x00, 0x04, 0x0a, 0x42, 0x42, 0x42, 0x00, 0x0f,
        0xe3, // TYPE256, to the end
    ];
    message.resize(MESSAGE_MAX, 0);
    assert!(full::decode(&message).is_err());
    assert_eq!(twin::parse(&message), Err(Error::Malformed));
}
