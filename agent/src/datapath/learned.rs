//! The FQDN learning side of the datapath as the agent sees it: which
//! resolvers are trusted, the bounds of a learned address's lifetime, and
//! the learned addresses themselves (installed by the agent for answers the
//! kernel leaves to it, read and expired by its garbage collection).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    net::SocketAddr,
    time::Duration,
};

use aya::maps::MapError;
use tollgate_common::{
    Config, DNS_PORTS, LearnedKey, LearnedSlot, LearnedValue, QueryKey, ResolverKey, family,
    map_names,
};

use super::{Datapath, DatapathError, map_err};

/// An address as the maps hold it: network order, IPv4 in the first four
/// bytes (the rest zero), with its family.
fn kernel_addr(ip: IpAddr) -> ([u8; 16], u8) {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&v4.octets());
            (addr, family::INET)
        }
        IpAddr::V6(v6) => (v6.octets(), family::INET6),
    }
}

/// The key of an address learned by an endpoint.
pub fn learned_key(cgroup_id: u64, ip: IpAddr) -> LearnedKey {
    let (addr, family) = kernel_addr(ip);
    LearnedKey {
        cgroup_id,
        addr,
        family,
        _pad: [0; 7],
    }
}

/// The address of a learned key.
pub fn learned_ip(key: &LearnedKey) -> IpAddr {
    if key.family == family::INET {
        IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]])
    } else {
        IpAddr::from(key.addr)
    }
}

fn resolver_key(resolver: SocketAddr) -> ResolverKey {
    let (addr, family) = kernel_addr(resolver.ip());
    ResolverKey {
        addr,
        port: resolver.port(),
        family,
        _pad: 0,
    }
}

/// Adds `pattern_ids` to a learned value the way the kernel does
/// (agent-ebpf `dns.rs`): a pattern's slot is extended, else a free or
/// expired slot is taken. Returns the patterns that found no slot.
pub fn merge_slots(
    value: &mut LearnedValue,
    pattern_ids: &[u32],
    now_ns: u64,
    expires_ns: u64,
) -> usize {
    let mut without_slot = 0;
    for &id in pattern_ids {
        if let Some(slot) = value.slots.iter_mut().find(|s| s.pattern_id == id) {
            slot.expires_ns = slot.expires_ns.max(expires_ns);
        } else if let Some(slot) = value
            .slots
            .iter_mut()
            .find(|s| s.pattern_id == 0 || s.expires_ns <= now_ns)
        {
            *slot = LearnedSlot {
                pattern_id: id,
                _pad: 0,
                expires_ns,
            };
        } else {
            without_slot += 1;
        }
    }
    without_slot
}

/// Whether no slot of `value` is alive at `now_ns`.
pub fn all_expired(value: &LearnedValue, now_ns: u64) -> bool {
    value
        .slots
        .iter()
        .all(|s| s.pattern_id == 0 || s.expires_ns <= now_ns)
}

impl Datapath {
    /// The network namespace of each endpoint whose namespace is known, by
    /// cgroup id: a DNS query from a socket of another namespace teaches
    /// nothing (agent-ebpf `dns.rs`). Endpoints left out are not checked.
    pub fn set_endpoint_netns(&mut self, wanted: &BTreeMap<u64, u64>) -> Result<(), DatapathError> {
        let stale: Vec<u64> = self
            .endpoint_netns_written
            .keys()
            .filter(|id| !wanted.contains_key(id))
            .copied()
            .collect();
        for id in stale {
            match self.endpoint_netns.remove(&id) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(map_names::ENDPOINT_NETNS)(e)),
            }
            self.endpoint_netns_written.remove(&id);
        }
        for (&id, &cookie) in wanted {
            if self.endpoint_netns_written.get(&id) != Some(&cookie) {
                self.endpoint_netns
                    .insert(id, cookie, 0)
                    .map_err(map_err(map_names::ENDPOINT_NETNS))?;
                self.endpoint_netns_written.insert(id, cookie);
            }
        }
        Ok(())
    }

    /// Whether the socket `socket_cookie` sent the query with message `id`
    /// for `name` (lowercase, dotted) of type `qtype`, as the packet hook
    /// recorded it; the query is used up. For the UDP answers the kernel
    /// leaves to the agent: the kernel checked their id, resolver and
    /// window, the agent checks their question. True where the packet
    /// hook records no queries (its fallback program).
    pub fn take_query(&mut self, socket_cookie: u64, id: u16, name: &str, qtype: u16) -> bool {
        if self.state.queries_recorded == 0 {
            return true;
        }
        let key = QueryKey {
            socket_cookie,
            id,
            _pad: [0; 6],
        };
        let Ok(query) = self.dns_queries.get(&key, 0) else {
            return false;
        };
        let asked =
            super::wire_name(name).is_some_and(|wire| wire == query.name) && query.qtype == qtype;
        if asked {
            let _ = self.dns_queries.remove(&key);
        }
        asked
    }

    /// The cookie of the host's network namespace as the programs have it
    /// (0: the kernel cannot tell it).
    pub fn host_netns_cookie(&self) -> u64 {
        self.state.host_netns_cookie
    }

    /// Makes the trusted resolvers exactly `resolvers`.
    pub fn set_trusted_resolvers(&mut self, resolvers: &[SocketAddr]) -> Result<(), DatapathError> {
        let ports: BTreeSet<u16> = resolvers.iter().map(SocketAddr::port).collect();
        if ports.len() > DNS_PORTS {
            return Err(DatapathError::TooManyResolverPorts {
                ports: ports.into_iter().collect(),
            });
        }
        let mut dns_ports = [0; DNS_PORTS];
        for (slot, port) in dns_ports.iter_mut().zip(&ports) {
            *slot = *port;
        }
        self.write_config(Config {
            dns_ports,
            ..self.state
        })?;
        let wanted: BTreeSet<ResolverKey> = resolvers.iter().map(|r| resolver_key(*r)).collect();
        let present: Vec<ResolverKey> = self
            .dns_trusted
            .keys()
            .collect::<Result<_, MapError>>()
            .map_err(map_err(map_names::DNS_TRUSTED))?;
        for key in &present {
            if !wanted.contains(key) {
                self.dns_trusted
                    .remove(key)
                    .map_err(map_err(map_names::DNS_TRUSTED))?;
            }
        }
        for key in &wanted {
            self.dns_trusted
                .insert(key, 1, 0)
                .map_err(map_err(map_names::DNS_TRUSTED))?;
        }
        Ok(())
    }

    /// A learned address lives for its answer's TTL, clamped to these.
    pub fn set_learned_ttl_bounds(
        &mut self,
        min: Duration,
        max: Duration,
    ) -> Result<(), DatapathError> {
        let seconds = |d: Duration| u32::try_from(d.as_secs()).unwrap_or(u32::MAX);
        self.write_config(Config {
            fqdn_ttl_min_s: seconds(min),
            fqdn_ttl_max_s: seconds(max),
            ..self.state
        })
    }

    pub fn learned_ttl_bounds(&self) -> (u32, u32) {
        (self.state.fqdn_ttl_min_s, self.state.fqdn_ttl_max_s)
    }

    /// Installs `ip` for the endpoint under `pattern_ids` until `expires_ns`
    /// (CLOCK_MONOTONIC), merged with what it holds. Returns how many
    /// patterns found no free slot.
    pub fn install_learned(
        &mut self,
        cgroup_id: u64,
        ip: IpAddr,
        pattern_ids: &[u32],
        now_ns: u64,
        expires_ns: u64,
    ) -> Result<usize, DatapathError> {
        let key = learned_key(cgroup_id, ip);
        let mut value = match self.fqdn_learned.get(&key, 0) {
            Ok(value) => value,
            Err(MapError::KeyNotFound) => LearnedValue::default(),
            Err(e) => return Err(map_err(map_names::FQDN_LEARNED)(e)),
        };
        let without_slot = merge_slots(&mut value, pattern_ids, now_ns, expires_ns);
        self.fqdn_learned
            .insert(key, value, 0)
            .map_err(map_err(map_names::FQDN_LEARNED))?;
        Ok(without_slot)
    }

    /// Every learned address with its slots.
    pub fn learned(&self) -> Result<Vec<(LearnedKey, LearnedValue)>, DatapathError> {
        self.fqdn_learned
            .iter()
            .collect::<Result<_, MapError>>()
            .map_err(map_err(map_names::FQDN_LEARNED))
    }

    /// The highest FQDN pattern id the names or a learned address (expired
    /// slots included) refer to; 0 when none does.
    pub fn highest_fqdn_pattern_id(&self) -> Result<u32, DatapathError> {
        let mut highest = self
            .fqdn_names
            .values()
            .flat_map(|ids| [ids.exact, ids.one_label, ids.any_labels])
            .max()
            .unwrap_or(0);
        for entry in self.fqdn_learned.iter() {
            let (_, value) = entry.map_err(map_err(map_names::FQDN_LEARNED))?;
            highest = value
                .slots
                .iter()
                .map(|s| s.pattern_id)
                .fold(highest, u32::max);
        }
        Ok(highest)
    }

    /// Forgets a learned address (an expired one, or one over a limit).
    pub fn remove_learned(&mut self, key: &LearnedKey) -> Result<(), DatapathError> {
        match self.fqdn_learned.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(map_names::FQDN_LEARNED)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_merge_as_the_kernel_merges_them() {
        let mut value = LearnedValue::default();
        assert_eq!(merge_slots(&mut value, &[7], 100, 1_000), 0);
        // The same pattern is extended, never shortened.
        assert_eq!(merge_slots(&mut value, &[7], 100, 500), 0);
        assert_eq!(value.slots[0].expires_ns, 1_000);
        assert_eq!(merge_slots(&mut value, &[9], 100, 2_000), 0);
        // Both slots taken and alive: a third pattern has no room.
        assert_eq!(merge_slots(&mut value, &[11], 100, 2_000), 1);
        // Once the first expired, its slot is taken over.
        assert_eq!(merge_slots(&mut value, &[11], 1_500, 3_000), 0);
        assert_eq!(value.slots[0].pattern_id, 11);
        assert!(!all_expired(&value, 2_500));
        assert!(all_expired(&value, 3_000));
    }

    #[test]
    fn keys_hold_addresses_as_the_kernel_does() {
        let key = learned_key(5, "10.1.2.3".parse().unwrap());
        assert_eq!(&key.addr[..4], &[10, 1, 2, 3]);
        assert!(key.addr[4..].iter().all(|b| *b == 0));
        assert_eq!(learned_ip(&key), "10.1.2.3".parse::<IpAddr>().unwrap());
        let key = learned_key(5, "fd00::1".parse().unwrap());
        assert_eq!(key.family, family::INET6);
        assert_eq!(learned_ip(&key), "fd00::1".parse::<IpAddr>().unwrap());
    }
}
