//! How records name IP protocols (`protocol` in flow records): `tcp`,
//! `udp`, `sctp`, `icmp`, `icmpv6`, and `ip-N` for any other number. The
//! agent writes these names, the formats map them back to numbers, and the
//! advisor reads them from recordings: one table for all three.

use std::borrow::Cow;

use tollgate_common::protocol;

/// A record's `protocol` for an IP protocol number.
pub fn name(number: u8) -> Cow<'static, str> {
    match number {
        protocol::TCP => Cow::Borrowed("tcp"),
        protocol::UDP => Cow::Borrowed("udp"),
        protocol::SCTP => Cow::Borrowed("sctp"),
        protocol::ICMP => Cow::Borrowed("icmp"),
        protocol::ICMPV6 => Cow::Borrowed("icmpv6"),
        other => Cow::Owned(format!("ip-{other}")),
    }
}

/// The IP protocol number of a record's `protocol`: the inverse of [`name`].
pub fn number(name: &str) -> Option<u8> {
    match name {
        "tcp" => Some(protocol::TCP),
        "udp" => Some(protocol::UDP),
        "sctp" => Some(protocol::SCTP),
        "icmp" => Some(protocol::ICMP),
        "icmpv6" => Some(protocol::ICMPV6),
        other => other.strip_prefix("ip-")?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_are_inverse() {
        for n in 0..=u8::MAX {
            assert_eq!(number(&name(n)), Some(n), "{n}");
        }
        assert_eq!(name(6), "tcp");
        assert_eq!(name(132), "sctp");
        assert_eq!(name(47), "ip-47");
        assert_eq!(number("ip-999"), None);
        assert_eq!(number("gre"), None);
    }
}
