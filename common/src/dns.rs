//! The DNS answer parser of the kernel's learning path. The same code runs
//! in the agent as its userspace twin, so the two cannot disagree.
//!
//! It is written for the verifier: it reads a message from a fixed-size
//! buffer through masked offsets, every loop has a constant bound, and it
//! keeps nothing on the stack beyond a few scalars. What the bounds leave
//! out is [`Error::Unsupported`]: the kernel hands such answers to the agent,
//! which parses them with a general DNS library.
//!
//! It reads the header, the one question (its name lowercased into wire
//! form, the key of the FQDN name lookups) and the answer section; it learns
//! the A and AAAA records of class IN there. Authority and additional
//! sections are never read.

// Plain counted loops with indexes: what the verifier handles best.
#![allow(clippy::needless_range_loop)]

/// Bytes of a message the kernel copies and parses; longer answers go to
/// the agent.
pub const MESSAGE_MAX: usize = 4096;
const MESSAGE_MASK: usize = MESSAGE_MAX - 1;

/// Longest name in wire form, the root label included (RFC 1035 2.3.4).
pub const NAME_MAX: usize = 255;
/// Size of an FQDN name lookup key ([`crate::FqdnName`]).
pub const NAME_KEY: usize = 256;
/// The question name buffer: the name, then zeros, so that a key read from
/// the start of any label is the rest of the name, zero-padded.
pub const NAME_BUF: usize = 2 * NAME_KEY;

/// Labels the question name may have (the root not counted); a longer name
/// is [`Unsupported::TooManyLabels`].
pub const MAX_LABELS: usize = 32;
/// Answer records the kernel reads; more is [`Unsupported::TooManyAnswers`].
pub const MAX_ANSWERS: usize = 16;

const HEADER_LEN: usize = 12;
/// Header flags: response, opcode, truncated.
const FLAG_QR: u16 = 0x8000;
const OPCODE_MASK: u16 = 0x7800;
const FLAG_TC: u16 = 0x0200;
const RCODE_MASK: u16 = 0x000f;

pub mod rtype {
    pub const A: u16 = 1;
    pub const CNAME: u16 = 5;
    pub const AAAA: u16 = 28;
}

pub const CLASS_IN: u16 = 1;
pub const RCODE_NOERROR: u8 = 0;

/// Which kind of message a parse expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message {
    /// A standard query, as a client sends it.
    Query,
    /// The answer to one.
    Answer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// Not the kind of message expected (a query where an answer was
    /// expected, or the reverse), or another opcode than a standard query.
    NotAnAnswer,
    /// The message contradicts itself or ends early. Nothing is learned.
    Malformed,
    /// Valid, perhaps, but beyond the parser's bounds.
    Unsupported(Unsupported),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsupported {
    /// Longer than [`MESSAGE_MAX`].
    TooLarge,
    /// The TC bit: the client asks again over TCP.
    Truncated,
    /// Not exactly one question.
    QuestionCount,
    /// A compression pointer in the question name.
    CompressedQuestion,
    /// A name with more than [`MAX_LABELS`] labels.
    TooManyLabels,
    /// More than [`MAX_ANSWERS`] answer records.
    TooManyAnswers,
    /// An answer record whose owner name is spelled out, not a pointer.
    UncompressedOwner,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub rcode: u8,
    pub answer_count: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Question {
    /// Wire length of the name, the root label included.
    pub name_len: u16,
    pub label_count: u8,
    /// Offset of each label's length byte within the name.
    pub label_offsets: [u8; MAX_LABELS],
    pub qtype: u16,
    pub qclass: u16,
    /// Offset of the first answer record.
    pub end: u16,
}

/// An address from an A or AAAA record of the answer section.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FoundAddress {
    /// Network order; IPv4 in the first four bytes, the rest zero.
    pub addr: [u8; 16],
    pub ttl: u32,
    /// [`crate::family`].
    pub family: u8,
    pub _pad: [u8; 3],
}

#[inline(always)]
fn byte(msg: &[u8; MESSAGE_MAX], len: usize, at: usize) -> Result<u8, Error> {
    if at >= len {
        return Err(Error::Malformed);
    }
    Ok(msg[at & MESSAGE_MASK])
}

#[inline(always)]
fn u16_at(msg: &[u8; MESSAGE_MAX], len: usize, at: usize) -> Result<u16, Error> {
    Ok(u16::from_be_bytes([
        byte(msg, len, at)?,
        byte(msg, len, at + 1)?,
    ]))
}

#[inline(always)]
fn u32_at(msg: &[u8; MESSAGE_MAX], len: usize, at: usize) -> Result<u32, Error> {
    Ok((u16_at(msg, len, at)? as u32) << 16 | u16_at(msg, len, at + 2)? as u32)
}

/// Reads the header and the question of the `len` bytes in `msg`, writing
/// the question name lowercased in wire form to the start of `name`, and
/// zeros after it up to [`NAME_KEY`] (the rest of `name` is left as it is:
/// the kernel zeroes it first).
#[inline(always)]
pub fn question(
    msg: &[u8; MESSAGE_MAX],
    len: usize,
    name: &mut [u8; NAME_BUF],
) -> Result<(Header, Question), Error> {
    let mut question = Question::default();
    let header = question_name(msg, len, name, &mut question, Message::Answer)?;
    finish_question(msg, len, name, &mut question)?;
    Ok((header, question))
}

/// The first half of [`question`]: the header, and the name copied and
/// walked into `question` (which must start zeroed). The kernel runs the
/// halves as separate steps: the name's length is known exactly at each
/// of the walk's exits, and a verifier that followed it into the second
/// half would check that half once per exit.
#[inline(always)]
pub fn question_name(
    msg: &[u8; MESSAGE_MAX],
    len: usize,
    name: &mut [u8; NAME_BUF],
    question: &mut Question,
    kind: Message,
) -> Result<Header, Error> {
    if len > MESSAGE_MAX {
        return Err(Error::Unsupported(Unsupported::TooLarge));
    }
    let flags = u16_at(msg, len, 2)?;
    let is_answer = flags & FLAG_QR != 0;
    if is_answer != (kind == Message::Answer) || flags & OPCODE_MASK != 0 {
        return Err(Error::NotAnAnswer);
    }
    let header = Header {
        id: u16_at(msg, len, 0)?,
        rcode: (flags & RCODE_MASK) as u8,
        answer_count: u16_at(msg, len, 6)?,
    };
    if flags & FLAG_TC != 0 {
        return Err(Error::Unsupported(Unsupported::Truncated));
    }
    if u16_at(msg, len, 4)? != 1 {
        return Err(Error::Unsupported(Unsupported::QuestionCount));
    }
    if header.answer_count as usize > MAX_ANSWERS {
        return Err(Error::Unsupported(Unsupported::TooManyAnswers));
    }

    // The name's bytes, lowercased, then its labels walked. Length bytes
    // (at most 63) and pointers (0xc0 and up) are never letters, so
    // lowercasing everything changes only label bytes. Two flat loops keep
    // the verifier's work linear; bytes past the message end are copied
    // but never used: every byte the walk uses is checked against `len`.
    for word in 0..NAME_KEY / 8 {
        let mut bytes = [0u8; 8];
        for (k, b) in bytes.iter_mut().enumerate() {
            *b = msg[(HEADER_LEN + word * 8 + k) & MESSAGE_MASK];
        }
        let lower = ascii_lowercase_word(u64::from_le_bytes(bytes)).to_le_bytes();
        name[word * 8..word * 8 + 8].copy_from_slice(&lower);
    }
    let mut at = 0usize;
    let mut ended = false;
    for label in 0..=MAX_LABELS {
        if HEADER_LEN + at >= len {
            return Err(Error::Malformed);
        }
        let b = name[at & 0xff] as usize;
        if b == 0 {
            ended = true;
            break;
        }
        if b & 0xc0 == 0xc0 {
            return Err(Error::Unsupported(Unsupported::CompressedQuestion));
        }
        if b & 0xc0 != 0 {
            return Err(Error::Malformed);
        }
        if label == MAX_LABELS {
            return Err(Error::Unsupported(Unsupported::TooManyLabels));
        }
        // The root label must still fit: the name is at most NAME_MAX.
        if at + 1 + b + 1 > NAME_MAX {
            return Err(Error::Malformed);
        }
        question.label_offsets[label & (MAX_LABELS - 1)] = at as u8;
        question.label_count += 1;
        at += 1 + b;
    }
    if !ended {
        return Err(Error::Malformed);
    }
    question.name_len = at as u16 + 1;
    Ok(header)
}

/// The eight bytes of `word` with `A`..=`Z` lowercased, without a branch
/// (a branch per byte would split the verifier's state at every byte).
#[inline(always)]
fn ascii_lowercase_word(word: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let low7 = word & LOW7;
    // Each byte's top bit: set from 'A' (0x41) on, and from past 'Z' (0x5b) on.
    let from_a = low7 + 0x3f3f_3f3f_3f3f_3f3f;
    let past_z = low7 + 0x2525_2525_2525_2525;
    // Upper case: from 'A', not past 'Z', and an ASCII byte.
    let upper = (from_a ^ past_z) & !word & HIGH;
    word | (upper >> 2)
}

/// The second half of [`question`]: zeros after the name in `name`, and
/// the question's type, class and end, for a `question` that
/// [`question_name`] read from the same message.
#[inline(always)]
pub fn finish_question(
    msg: &[u8; MESSAGE_MAX],
    len: usize,
    name: &mut [u8; NAME_BUF],
    question: &mut Question,
) -> Result<(), Error> {
    // Zero what follows the name. The length is read afresh for every
    // byte (in the kernel, from map memory, whose contents the verifier
    // does not track): what a byte's branch teaches the verifier about it
    // then dies with the byte, and the states of every byte merge.
    // SAFETY (both volatile reads): a plain field of `question`.
    for i in 0..NAME_KEY {
        if i >= unsafe { core::ptr::read_volatile(&question.name_len) } as usize {
            name[i] = 0;
        }
    }
    let name_len = unsafe { core::ptr::read_volatile(&question.name_len) } as usize;
    if name_len > NAME_MAX {
        return Err(Error::Malformed);
    }
    let at = HEADER_LEN + name_len;
    question.qtype = u16_at(msg, len, at)?;
    question.qclass = u16_at(msg, len, at + 2)?;
    question.end = (at + 4) as u16;
    Ok(())
}

/// The addresses of an answer, and the parser's place while it reads them.
/// `cursor` and `count` are kept in this struct (map memory in the kernel)
/// and read back with volatile loads on every record: the verifier then
/// knows nothing of their values across records, so its work stays linear
/// in the number of records instead of growing with every combination of
/// record types.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FoundAddresses {
    pub addresses: [FoundAddress; MAX_ANSWERS],
    pub cursor: u32,
    pub count: u32,
}

/// Reads every record of the answer section, and writes the addresses of
/// its A and AAAA records (class IN) to `found`; returns how many. On an
/// error the caller must use none of them: an answer is learned whole or
/// not at all.
///
/// Owner names must be compression pointers (or the root), as every
/// resolver writes them; a spelled-out owner name is
/// [`Unsupported::UncompressedOwner`].
#[inline(always)]
pub fn answer_addresses(
    msg: &[u8; MESSAGE_MAX],
    len: usize,
    header: &Header,
    question: &Question,
    found: &mut FoundAddresses,
) -> Result<usize, Error> {
    start_answers(question, found);
    for i in 0..MAX_ANSWERS {
        if i >= header.answer_count as usize {
            break;
        }
        answer_record(msg, len, found)?;
    }
    // SAFETY: a plain field of `found`.
    Ok(unsafe { core::ptr::read_volatile(&found.count) } as usize)
}

/// Places the [`answer_record`] cursor at the first record after
/// `question`, with no address found yet.
#[inline(always)]
pub fn start_answers(question: &Question, found: &mut FoundAddresses) {
    // SAFETY: plain fields of `found`.
    unsafe {
        core::ptr::write_volatile(&mut found.cursor, question.end as u32);
        core::ptr::write_volatile(&mut found.count, 0);
    }
}

/// Reads the answer record at `found.cursor`, moves the cursor past it, and
/// adds its address to `found` if it is an A or AAAA record of class IN.
/// The kernel calls it once per record, as a step of its own.
#[inline(always)]
pub fn answer_record(
    msg: &[u8; MESSAGE_MAX],
    len: usize,
    found: &mut FoundAddresses,
) -> Result<(), Error> {
    // Never more than `len` (checked below), so the mask changes nothing;
    // it only tells the verifier so. Masking with MESSAGE_MASK would wrap a
    // cursor at the end of a full-size message back to its start.
    // SAFETY (all volatile accesses): plain fields of `found`.
    let at = unsafe { core::ptr::read_volatile(&found.cursor) } as usize & (2 * MESSAGE_MAX - 1);
    let owner = byte(msg, len, at)?;
    let at = match owner {
        0 => at + 1,
        b if b & 0xc0 == 0xc0 => {
            byte(msg, len, at + 1)?;
            at + 2
        }
        b if b & 0xc0 == 0 => {
            return Err(Error::Unsupported(Unsupported::UncompressedOwner));
        }
        _ => return Err(Error::Malformed),
    };
    let rtype = u16_at(msg, len, at)?;
    let class = u16_at(msg, len, at + 2)?;
    let ttl = u32_at(msg, len, at + 4)?;
    let rdlen = u16_at(msg, len, at + 8)? as usize;
    let rdata = at + 10;
    if rdata + rdlen > len {
        return Err(Error::Malformed);
    }
    unsafe { core::ptr::write_volatile(&mut found.cursor, (rdata + rdlen) as u32) };
    let (family, size) = match rtype {
        rtype::A => (crate::family::INET, 4),
        rtype::AAAA => (crate::family::INET6, 16),
        _ => return Ok(()),
    };
    if class != CLASS_IN {
        return Ok(());
    }
    if rdlen != size {
        return Err(Error::Malformed);
    }
    let count = unsafe { core::ptr::read_volatile(&found.count) } as usize;
    let slot = &mut found.addresses[count & (MAX_ANSWERS - 1)];
    slot.addr = [0; 16];
    for k in 0..16 {
        if k < size {
            slot.addr[k] = msg[(rdata + k) & MESSAGE_MASK];
        }
    }
    slot.ttl = ttl;
    slot.family = family;
    slot._pad = [0; 3];
    unsafe { core::ptr::write_volatile(&mut found.count, count as u32 + 1) };
    Ok(())
}

/// The lifetime of an address learned from a record with `ttl`: TTLs with
/// the top bit set count as 0 (RFC 2181 8), then the configured bounds.
#[inline(always)]
pub fn learned_ttl(ttl: u32, min: u32, max: u32) -> u32 {
    let ttl = if ttl > i32::MAX as u32 { 0 } else { ttl };
    if ttl < min {
        min
    } else if ttl > max {
        max
    } else {
        ttl
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(bytes: &[u8]) -> ([u8; MESSAGE_MAX], usize) {
        let mut msg = [0u8; MESSAGE_MAX];
        msg[..bytes.len()].copy_from_slice(bytes);
        (msg, bytes.len())
    }

    const ANSWER: &[u8] = &[
        0x12, 0x34, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0, // header: 1 question, 2 answers
        3, b'W', b'w', b'W', 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 3, b'c', b'o', b'm', 0,
        0, 1, 0, 1, // A IN
        0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 60, 0, 2, 0xc0, 16, // CNAME example.com
        0xc0, 16, 0, 1, 0, 1, 0, 0, 1, 0, 0, 4, 10, 0, 0, 7, // A 10.0.0.7, TTL 256
    ];

    #[test]
    fn reads_question_and_addresses() {
        let (msg, len) = message(ANSWER);
        let mut name = [0u8; NAME_BUF];
        let (header, question) = question(&msg, len, &mut name).unwrap();
        assert_eq!(header.id, 0x1234);
        assert_eq!(header.rcode, RCODE_NOERROR);
        assert_eq!(&name[..17], b"\x03www\x07example\x03com\x00");
        assert_eq!(question.label_count, 3);
        assert_eq!(&question.label_offsets[..3], &[0, 4, 12]);
        assert_eq!((question.qtype, question.qclass), (rtype::A, CLASS_IN));
        let mut found = FoundAddresses::default();
        assert_eq!(
            answer_addresses(&msg, len, &header, &question, &mut found),
            Ok(1)
        );
        assert_eq!(&found.addresses[0].addr[..4], &[10, 0, 0, 7]);
        assert_eq!(found.addresses[0].ttl, 256);
    }

    #[test]
    fn a_message_cut_anywhere_is_malformed() {
        for cut in 0..ANSWER.len() {
            let (msg, _) = message(ANSWER);
            let mut name = [0u8; NAME_BUF];
            let parsed = question(&msg, cut, &mut name).and_then(|(header, question)| {
                let mut found = FoundAddresses::default();
                answer_addresses(&msg, cut, &header, &question, &mut found)
            });
            assert_eq!(parsed, Err(Error::Malformed), "cut at {cut}");
        }
    }

    #[test]
    fn what_the_bounds_leave_out_is_unsupported() {
        let mut truncated = ANSWER.to_vec();
        truncated[2] |= 0x02;
        let mut two_questions = ANSWER.to_vec();
        two_questions[5] = 2;
        let mut many_answers = ANSWER.to_vec();
        many_answers[7] = 17;
        for (bytes, why) in [
            (truncated, Unsupported::Truncated),
            (two_questions, Unsupported::QuestionCount),
            (many_answers, Unsupported::TooManyAnswers),
        ] {
            let (msg, len) = message(&bytes);
            let mut name = [0u8; NAME_BUF];
            assert_eq!(question(&msg, len, &mut name), Err(Error::Unsupported(why)));
        }
    }

    /// Every pair of neighbouring byte values, in every lane: no carry or
    /// borrow crosses from one byte into the next.
    #[test]
    fn a_word_lowercases_as_its_bytes_do() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let bytes = [a, b, a, b, a, b, a, b];
                let shifted = [b, a, b, a, b, a, b, a];
                for word in [bytes, shifted] {
                    let lowered = ascii_lowercase_word(u64::from_le_bytes(word)).to_le_bytes();
                    assert_eq!(lowered, word.map(|x| x.to_ascii_lowercase()), "{word:?}");
                }
            }
        }
    }

    #[test]
    fn ttls() {
        assert_eq!(learned_ttl(5, 30, 3600), 30);
        assert_eq!(learned_ttl(300, 30, 3600), 300);
        assert_eq!(learned_ttl(86_400, 30, 3600), 3600);
        assert_eq!(learned_ttl(0x8000_0000, 30, 3600), 30);
    }
}
