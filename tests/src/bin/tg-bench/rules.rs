//! The rule sets compared: `n` destination prefixes, half IPv4 and half
//! IPv6, allowed on TCP 443, plus loopback allowed on any port (the
//! benchmark's own traffic), written as a Tollgate policy, an nftables set
//! and a linear iptables chain. Prefixes are pseudo-random but the same in
//! every run.

use std::fmt::Write;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// `n` distinct prefixes, none covering loopback.
pub fn prefixes(n: usize) -> Vec<IpNet> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let net = if out.len() % 2 == 0 {
            // 10.0.0.0/8 and beyond, /24s, never 127/8.
            let bits = (next() as u32) & 0xffff_ff00;
            if bits >> 24 == 127 || bits >> 24 == 0 {
                continue;
            }
            IpNet::V4(Ipv4Net::new(bits.into(), 24).unwrap())
        } else {
            // /64s in 2001:db8::/32.
            let bits = (0x2001_0db8_u128 << 96) | (u128::from(next() as u32) << 64);
            IpNet::V6(Ipv6Net::new(bits.into(), 64).unwrap())
        };
        if seen.insert(net) {
            out.push(net);
        }
    }
    out
}

/// A policy selecting `cgroup_glob` with one rule per prefix, then
/// loopback; `mode` observe or enforce.
pub fn policy(name: &str, cgroup_glob: &str, mode: &str, prefixes: &[IpNet]) -> String {
    let mut yaml = format!(
        "apiVersion: policy.tollgate.dev/v1alpha1\nkind: EgressPolicy\nmetadata:\n  name: {name}\n\
         spec:\n  cgroupSelector:\n    paths: [\"{cgroup_glob}\"]\n  mode: {mode}\n  egress:\n"
    );
    for (i, net) in prefixes.iter().enumerate() {
        let _ = writeln!(
            yaml,
            "  - {{name: r{i}, to: [{{cidr: \"{net}\"}}], ports: [{{port: 443, protocol: TCP}}]}}"
        );
    }
    yaml.push_str("  - {name: loopback, to: [{cidr: 127.0.0.0/8}]}\n");
    yaml
}

/// [`policy`], with loopback allowed by a name rule (`*.bench.test`)
/// instead of its prefix: connections to loopback are then allowed by the
/// addresses the endpoint learned for the name.
pub fn policy_by_name(name: &str, cgroup_glob: &str, prefixes: &[IpNet]) -> String {
    policy(name, cgroup_glob, "enforce", prefixes).replace(
        "  - {name: loopback, to: [{cidr: 127.0.0.0/8}]}\n",
        "  - {name: loopback, to: [{fqdn: \"*.bench.test\"}]}\n",
    )
}

/// An nftables ruleset (for `nft -f`) with the prefixes in two interval
/// sets, looked up once per packet in the output hook: what a careful
/// operator would write.
pub fn nftables(prefixes: &[IpNet]) -> String {
    let join = |v4: bool| {
        prefixes
            .iter()
            .filter(|p| matches!(p, IpNet::V4(_)) == v4)
            .map(|p| format!("{p} . 443"))
            // Loopback is in the set too: every packet pays one lookup.
            .chain(v4.then(|| "127.0.0.0/8 . 0-65535".to_owned()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let element = |list: String| {
        if list.is_empty() {
            String::new()
        } else {
            format!("elements = {{ {list} }}")
        }
    };
    format!(
        "table inet tgbench {{\n\
         set allow4 {{ type ipv4_addr . inet_service; flags interval; {} }}\n\
         set allow6 {{ type ipv6_addr . inet_service; flags interval; {} }}\n\
         chain output {{ type filter hook output priority 0; policy drop;\n\
         ip daddr . th dport @allow4 accept\n\
         ip6 daddr . th dport @allow6 accept\n\
         }}\n}}\n",
        element(join(true)),
        element(join(false)),
    )
}

/// An iptables-restore script: one ACCEPT rule per IPv4 prefix, in order,
/// loopback last, so every loopback packet walks the whole chain, as the
/// chains NetworkPolicy implementations generate are walked.
pub fn iptables(prefixes: &[IpNet]) -> String {
    let mut script =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT DROP [0:0]\n");
    for net in prefixes.iter().filter(|p| matches!(p, IpNet::V4(_))) {
        let _ = writeln!(script, "-A OUTPUT -d {net} -p tcp --dport 443 -j ACCEPT");
    }
    script.push_str("-A OUTPUT -d 127.0.0.0/8 -j ACCEPT\nCOMMIT\n");
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_distinct_mixed_and_avoid_loopback() {
        let nets = prefixes(1000);
        assert_eq!(nets.len(), 1000);
        assert_eq!(
            nets.iter().filter(|n| matches!(n, IpNet::V6(_))).count(),
            500
        );
        let loopback: IpNet = "127.0.0.1/32".parse().unwrap();
        assert!(nets.iter().all(|n| !n.contains(&loopback)));
        assert_eq!(prefixes(10), prefixes(10), "the same every run");
    }
}
