//! What the agent makes of the DNS answers the kernel reports: the messages
//! in them (a UDP payload, or what a TCP segment completes), the names of
//! the addresses each endpoint resolved (so flow records carry `dst.fqdn`),
//! and which FQDN patterns an answer the kernel left to the agent matches.
//! Pure logic: no BPF, no I/O.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashMapExt};
use tollgate_common::{dns::learned_ttl, dns_flags};
use tollgate_dns::tcp::Streams;

use tollgate_policy::model::FqdnPattern;

use crate::datapath::events::DnsMessage;

/// Names remembered at most; beyond, expired ones are dropped first, then
/// new answers are not remembered until room is made.
const MAX_NAMES: usize = 262_144;
/// A TCP stream without a segment for this long is given up.
const STREAM_IDLE: Duration = Duration::from_secs(30);

/// The name an endpoint resolved an address from, while the answer lives.
#[derive(Debug, Default)]
pub struct NameCache {
    names: HashMap<(u64, IpAddr), (Arc<str>, u64)>,
}

impl NameCache {
    /// Remembers that `cgroup_id` resolved `name` to `ip`, until `expires_ns`
    /// (CLOCK_MONOTONIC). A later answer replaces an earlier one.
    pub fn insert(
        &mut self,
        cgroup_id: u64,
        ip: IpAddr,
        name: Arc<str>,
        expires_ns: u64,
        now_ns: u64,
    ) {
        if self.names.len() >= MAX_NAMES && !self.names.contains_key(&(cgroup_id, ip)) {
            self.expire(now_ns);
            if self.names.len() >= MAX_NAMES {
                return;
            }
        }
        self.names.insert((cgroup_id, ip), (name, expires_ns));
    }

    /// The name `cgroup_id` resolved `ip` from, if that answer lives at `at_ns`.
    pub fn get(&self, cgroup_id: u64, ip: IpAddr, at_ns: u64) -> Option<&str> {
        let (name, expires_ns) = self.names.get(&(cgroup_id, ip.to_canonical()))?;
        (*expires_ns > at_ns).then_some(&**name)
    }

    pub fn expire(&mut self, now_ns: u64) {
        self.names.retain(|_, (_, expires_ns)| *expires_ns > now_ns);
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// How many learned addresses an endpoint may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Addresses learned from answers for one name.
    pub per_name: usize,
    /// Addresses in all.
    pub per_endpoint: usize,
}

/// Which limit made an address go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    PerName,
    PerEndpoint,
}

impl Limit {
    pub fn name(self) -> &'static str {
        match self {
            Self::PerName => "addresses_per_name",
            Self::PerEndpoint => "addresses_per_endpoint",
        }
    }
}

/// The addresses each endpoint learned for FQDN rules, as the agent saw
/// them learned, kept within [`Limits`]: when an answer takes an endpoint
/// over one, the addresses that would expire first go.
#[derive(Debug)]
pub struct LearnedAddresses {
    limits: Limits,
    /// cgroup id -> address -> (name, expiry)
    by_endpoint: HashMap<u64, HashMap<IpAddr, (Arc<str>, u64)>>,
}

impl LearnedAddresses {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            by_endpoint: HashMap::new(),
        }
    }

    /// Records that `cgroup_id` learned `ip` from an answer for `name`;
    /// returns the addresses it must forget to stay within the limits.
    pub fn learned(
        &mut self,
        cgroup_id: u64,
        ip: IpAddr,
        name: Arc<str>,
        expires_ns: u64,
    ) -> Vec<(IpAddr, Limit)> {
        let addresses = self.by_endpoint.entry(cgroup_id).or_default();
        addresses.insert(ip, (name.clone(), expires_ns));
        let mut forget = Vec::new();
        let same_name = addresses.values().filter(|(n, _)| *n == name).count();
        for _ in self.limits.per_name..same_name {
            let victim = first_to_expire(addresses, ip, |n| *n == name);
            forget.extend(victim.map(|v| (v, Limit::PerName)));
        }
        for _ in self.limits.per_endpoint..addresses.len() {
            let victim = first_to_expire(addresses, ip, |_| true);
            forget.extend(victim.map(|v| (v, Limit::PerEndpoint)));
        }
        forget
    }

    pub fn expire(&mut self, now_ns: u64) {
        for addresses in self.by_endpoint.values_mut() {
            addresses.retain(|_, (_, expires_ns)| *expires_ns > now_ns);
        }
        self.by_endpoint
            .retain(|_, addresses| !addresses.is_empty());
    }
}

/// Removes and returns the address of `addresses` (other than `keep`, the
/// one just learned) that expires first among those whose name passes.
fn first_to_expire(
    addresses: &mut HashMap<IpAddr, (Arc<str>, u64)>,
    keep: IpAddr,
    name_passes: impl Fn(&Arc<str>) -> bool,
) -> Option<IpAddr> {
    let victim = addresses
        .iter()
        .filter(|(ip, (name, _))| **ip != keep && name_passes(name))
        .min_by_key(|(ip, (_, expires_ns))| (*expires_ns, **ip))
        .map(|(ip, _)| *ip)?;
    addresses.remove(&victim);
    Some(victim)
}

/// The DNS messages of the kernel's DNS events.
#[derive(Debug, Default)]
pub struct Messages {
    streams: Streams,
}

impl Messages {
    /// The whole messages `event` carries or completes.
    pub fn of(&mut self, event: &DnsMessage, now: Instant) -> Vec<Vec<u8>> {
        if event.header.flags & dns_flags::TCP != 0 {
            self.streams.expire(now, STREAM_IDLE);
            if event.header.flags & dns_flags::TCP_SYN != 0 {
                let first_seq = event.header.tcp_seq.wrapping_add(1);
                self.streams
                    .open(event.header.socket_cookie, first_seq, now);
                return Vec::new();
            }
            self.streams.push(
                event.header.socket_cookie,
                event.header.tcp_seq,
                &event.payload,
                now,
            )
        } else if event.header.flags & dns_flags::CLIPPED != 0 {
            Vec::new() // longer than the kernel copies: nothing whole to read
        } else {
            vec![event.payload.clone()]
        }
    }
}

/// The ids of the patterns `name` (lowercase, dotted) matches, as the
/// kernel would find them (at most `max`, lowest id first).
pub fn matching_patterns(
    patterns: &BTreeMap<u32, FqdnPattern>,
    name: &str,
    max: usize,
) -> Vec<u32> {
    patterns
        .iter()
        .filter(|(_, pattern)| pattern.matches(name))
        .map(|(id, _)| *id)
        .take(max)
        .collect()
}

/// When an address learned from a record with `ttl`, received at `ts_ns`,
/// expires under the bounds (seconds) the kernel applies.
pub fn expiry_ns(ts_ns: u64, ttl: u32, (min, max): (u32, u32)) -> u64 {
    ts_ns + u64::from(learned_ttl(ttl, min, max)) * 1_000_000_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_policy::fqdn::parse_pattern;

    #[test]
    fn names_live_while_their_answer_does() {
        let mut cache = NameCache::default();
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        cache.insert(1, ip, "api.example.com".into(), 100, 0);
        assert_eq!(cache.get(1, ip, 50), Some("api.example.com"));
        assert_eq!(cache.get(2, ip, 50), None, "another endpoint's answer");
        assert_eq!(cache.get(1, ip, 100), None, "expired");
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(cache.get(1, mapped, 50), Some("api.example.com"));
        cache.expire(100);
        assert!(cache.is_empty());
    }

    #[test]
    fn patterns_match_as_documented() {
        let patterns: BTreeMap<u32, FqdnPattern> = [
            (1, "api.example.com"),
            (2, "*.example.com"),
            (3, "**.example.com"),
            (4, "*.azurecr.io"),
        ]
        .into_iter()
        .map(|(id, p)| (id, parse_pattern(p).unwrap()))
        .collect();
        let ids = |name: &str| matching_patterns(&patterns, name, 4);
        assert_eq!(ids("api.example.com"), [1, 2, 3]);
        assert_eq!(ids("a.b.example.com"), [3]);
        assert_eq!(ids("example.com"), Vec::<u32>::new());
        assert_eq!(ids("myregistry.azurecr.io"), [4]);
        assert_eq!(ids("x.myregistry.azurecr.io"), Vec::<u32>::new());
        assert_eq!(ids("evilazurecr.io"), Vec::<u32>::new());
        assert_eq!(ids("azurecr.io.evil.com"), Vec::<u32>::new());
        assert_eq!(matching_patterns(&patterns, "api.example.com", 2), [1, 2]);
    }

    #[test]
    fn limits_forget_what_expires_first() {
        let mut learned = LearnedAddresses::new(Limits {
            per_name: 2,
            per_endpoint: 3,
        });
        let ip = |last: u8| IpAddr::from([10, 0, 0, last]);
        let cdn: Arc<str> = "cdn.example.com".into();
        let api: Arc<str> = "api.example.com".into();
        assert!(learned.learned(1, ip(1), cdn.clone(), 100).is_empty());
        assert!(learned.learned(1, ip(2), cdn.clone(), 300).is_empty());
        // A third address of the name: the one expiring first goes.
        assert_eq!(
            learned.learned(1, ip(3), cdn.clone(), 200),
            [(ip(1), Limit::PerName)]
        );
        // Other endpoints have limits of their own.
        assert!(learned.learned(2, ip(1), cdn.clone(), 100).is_empty());
        assert!(learned.learned(1, ip(4), api.clone(), 150).is_empty());
        // Four addresses for endpoint 1: over its limit of three.
        assert_eq!(
            learned.learned(1, ip(5), api.clone(), 400),
            [(ip(4), Limit::PerEndpoint)]
        );
        // Refreshing an address it holds is not a new one.
        assert!(learned.learned(1, ip(5), api, 500).is_empty());
        learned.expire(250);
        assert_eq!(learned.by_endpoint[&1].len(), 2);
        assert!(!learned.by_endpoint.contains_key(&2));
    }

    #[test]
    fn expiry_applies_the_bounds() {
        assert_eq!(expiry_ns(1_000, 5, (30, 3600)), 1_000 + 30_000_000_000);
        assert_eq!(expiry_ns(0, 100_000, (30, 3600)), 3_600_000_000_000);
    }
}
