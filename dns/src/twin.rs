//! The userspace twin of the kernel's DNS answer parser.
//!
//! It runs [`tollgate_common::dns`] exactly as the BPF program does: on a
//! zeroed `[u8; MESSAGE_MAX]` buffer holding the message, with the message's
//! real length. What it returns is what the kernel learns, so tests and the
//! agent can see the kernel's view of an answer without loading a program.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tollgate_common::dns::{
    self, Error, FoundAddress, FoundAddresses, MESSAGE_MAX, NAME_BUF, Unsupported,
};
use tollgate_common::family;

/// What the kernel reads from an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub id: u16,
    /// The question name, lowercase and dotted, without the trailing dot;
    /// the root is ".".
    pub name: String,
    /// The question name in wire form, lowercase, root label included: the
    /// key of the kernel's FQDN name lookups.
    pub wire_name: Vec<u8>,
    pub qtype: u16,
    pub rcode: u8,
    /// A and AAAA records of class IN in the answer section, in order, with
    /// their TTLs as sent (see [`dns::learned_ttl`] for what is kept).
    pub addresses: Vec<(IpAddr, u32)>,
}

/// Parses `message` as the kernel does.
pub fn parse(message: &[u8]) -> Result<Answer, Error> {
    if message.len() > MESSAGE_MAX {
        // The kernel passes the real length, and the parser refuses it.
        return Err(Error::Unsupported(Unsupported::TooLarge));
    }
    // Boxed: 4 KiB is fine on a thread's stack but not worth risking on a
    // fuzzer's or an async task's.
    let mut msg = Box::new([0u8; MESSAGE_MAX]);
    msg[..message.len()].copy_from_slice(message);
    let len = message.len();

    let mut name = [0u8; NAME_BUF];
    let (header, question) = dns::question(&msg, len, &mut name)?;
    let mut found = FoundAddresses::default();
    let count = dns::answer_addresses(&msg, len, &header, &question, &mut found)?;

    let wire_name = name[..usize::from(question.name_len)].to_vec();
    Ok(Answer {
        id: header.id,
        name: dotted(&wire_name),
        wire_name,
        qtype: question.qtype,
        rcode: header.rcode,
        addresses: found.addresses[..count].iter().map(address).collect(),
    })
}

fn address(found: &FoundAddress) -> (IpAddr, u32) {
    let ip = if found.family == family::INET6 {
        IpAddr::V6(Ipv6Addr::from(found.addr))
    } else {
        let [a, b, c, d, ..] = found.addr;
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    };
    (ip, found.ttl)
}

/// A name in wire form as text: labels joined by '.', without the trailing
/// dot ("." for the root). Bytes that are not printable ASCII, and '.' and
/// '\' within a label, are written `\DDD` as in RFC 1035 master files, so
/// distinct names stay distinct. Stops at the root label, at a compression
/// pointer or at the end of `wire`, whichever comes first.
pub fn dotted(wire: &[u8]) -> String {
    join_labels(WireLabels { wire, at: 0 })
}

/// The labels of a wire-form name, up to the root label, a compression
/// pointer or the end of the buffer.
struct WireLabels<'a> {
    wire: &'a [u8],
    at: usize,
}

impl<'a> Iterator for WireLabels<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(
            *self
                .wire
                .get(self.at)
                .filter(|&&b| b != 0 && b & 0xc0 == 0)?,
        );
        let start = self.at + 1;
        let end = (start + len).min(self.wire.len());
        self.at = start + len;
        Some(&self.wire[start..end])
    }
}

/// Labels as dotted text, escaped as [`dotted`] says; shared with the
/// general decoder so both spell a name the same way.
pub(crate) fn join_labels<'a>(labels: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut text = String::new();
    for label in labels {
        if !text.is_empty() {
            text.push('.');
        }
        for &b in label {
            if b.is_ascii_graphic() && b != b'.' && b != b'\\' {
                text.push(char::from(b));
            } else {
                // Writing to a String cannot fail.
                let _ = write!(text, "\\{b:03}");
            }
        }
    }
    if text.is_empty() {
        text.push('.');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_names() {
        assert_eq!(dotted(b"\x00"), ".");
        assert_eq!(dotted(b""), ".");
        assert_eq!(dotted(b"\x03www\x07Example\x03com\x00"), "www.Example.com");
        assert_eq!(dotted(b"\x01a\x00trailing"), "a");
        assert_eq!(dotted(b"\x03a.b\x02\\c\x00"), "a\\046b.\\092c");
        assert_eq!(dotted(b"\x04 \x7f\xff-\x00"), "\\032\\127\\255-");
        // Cut short: what is there.
        assert_eq!(dotted(b"\x05ab"), "ab");
        // A pointer ends the name.
        assert_eq!(dotted(b"\x01x\xc0\x0c"), "x");
    }

    #[test]
    fn parses_like_the_kernel() {
        let message = [
            0x12, 0x34, 0x81, 0x80, 0, 1, 0, 2, 0, 0, 0, 0, // header
            3, b'W', b'w', b'W', 2, b'e', b'X', 0, 0, 28, 0, 1, // WwW.eX AAAA IN
            0xc0, 12, 0, 28, 0, 1, 0xff, 0xff, 0xff, 0xff, 0, 16, //
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, //
            0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4, 192, 0, 2, 1,
        ];
        let answer = parse(&message).unwrap();
        assert_eq!(answer.id, 0x1234);
        assert_eq!(answer.name, "www.ex");
        assert_eq!(answer.wire_name, b"\x03www\x02ex\x00");
        assert_eq!(answer.qtype, 28);
        assert_eq!(answer.rcode, 0);
        assert_eq!(
            answer.addresses,
            vec![
                ("2001:db8::1".parse().unwrap(), u32::MAX),
                ("192.0.2.1".parse().unwrap(), 5),
            ]
        );
    }

    #[test]
    fn longer_than_the_kernel_copies_is_too_large() {
        let message = vec![0u8; MESSAGE_MAX + 1];
        assert_eq!(
            parse(&message),
            Err(Error::Unsupported(Unsupported::TooLarge))
        );
    }
}
