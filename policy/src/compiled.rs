//! What the compiler produces: rule sets in the shape the kernel's maps
//! hold them (a longest-prefix list per set, port rules in precedence
//! order), in plain Rust. The datapath writes them; [`SetRules::decide`]
//! is the kernel's decision (agent-ebpf `decide.rs`) over them, so tests
//! can hold the compiler to the reference evaluator without a kernel.

use std::{collections::BTreeMap, sync::Arc};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::model::{Action, FqdnPattern, PolicyMode, PortRange, Protocol};

/// One port rule of a prefix, in the order the kernel tries them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRuleSpec {
    pub ports: PortRange,
    pub protocol: Protocol,
    pub action: Action,
    pub mode: PolicyMode,
    /// Reported with every decision this rule makes; never 0 (that is "default").
    pub rule_id: u32,
    /// Precedence within the set, lower first: denies (strongest mode
    /// first), then allows. Every list holds its rules in this order.
    pub order: u32,
}

/// The datapath entries of one rule set.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SetRules {
    pub default_action: Action,
    pub default_mode: PolicyMode,
    /// The rule id the kernel counts the default's hits under: that of the
    /// default of the policy owning it (the first whose mode decides, when
    /// several do).
    pub default_hits_id: u32,
    /// Each prefix lists every rule that applies to it: the lookup of the
    /// longest matching prefix alone must decide.
    pub v4: Vec<(Ipv4Net, Vec<PortRuleSpec>)>,
    pub v6: Vec<(Ipv6Net, Vec<PortRuleSpec>)>,
    /// FQDN pattern id -> the rules for addresses an endpoint of the set
    /// learned for that pattern.
    pub fqdn: Vec<(u32, Vec<PortRuleSpec>)>,
}

/// Everything one generation holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    /// Shared with the compiler's cache, and with the datapath, which
    /// recognises an unchanged set by its contents.
    pub sets: Vec<Arc<SetRules>>,
    /// cgroup id -> index into `sets`.
    pub endpoints: BTreeMap<u64, u32>,
    /// Every FQDN pattern the sets use, by id. Ids are the agent's, stable
    /// while a pattern is in use, and never 0.
    pub fqdn_patterns: BTreeMap<u32, FqdnPattern>,
}

impl SetRules {
    /// What the kernel decides for this set (agent-ebpf `decide.rs`, in
    /// plain Rust) under the global mode `global` (observe or enforce),
    /// for an endpoint that learned the destination for the FQDN patterns
    /// `learned`: the port rules of the longest prefix containing the
    /// destination and of those patterns, taken by precedence, else the
    /// default. Returns the action, the mode of what decided and its rule
    /// id (0 for the default).
    pub fn decide(
        &self,
        ip: std::net::IpAddr,
        port: u16,
        protocol: u8,
        global: PolicyMode,
        learned: &[u32],
    ) -> (Action, PolicyMode, u32) {
        let longest = match ip {
            std::net::IpAddr::V4(ip) => self
                .v4
                .iter()
                .filter(|(net, _)| net.contains(&ip))
                .max_by_key(|(net, _)| net.prefix_len())
                .map(|(_, l)| l),
            std::net::IpAddr::V6(ip) => self
                .v6
                .iter()
                .filter(|(net, _)| net.contains(&ip))
                .max_by_key(|(net, _)| net.prefix_len())
                .map(|(_, l)| l),
        };
        let by_name = self
            .fqdn
            .iter()
            .filter(|(id, _)| learned.contains(id))
            .map(|(_, l)| l);
        let enforced = |mode: PolicyMode| {
            mode == PolicyMode::Enforce
                || (mode == PolicyMode::Inherit && global == PolicyMode::Enforce)
        };
        // Within a list, everything after its first matching allow comes later.
        let matching: Vec<&PortRuleSpec> = longest
            .into_iter()
            .chain(by_name)
            .flat_map(|list| {
                let mut matching = list.iter().filter(|rule| {
                    rule.ports.first <= port
                        && port <= rule.ports.last
                        && rule.protocol.matches(protocol)
                });
                let mut taken = Vec::new();
                for rule in matching.by_ref() {
                    taken.push(rule);
                    if rule.action == Action::Allow {
                        break;
                    }
                }
                taken
            })
            .collect();
        let first = |keep: &dyn Fn(&PortRuleSpec) -> bool| {
            matching
                .iter()
                .filter(|r| keep(r))
                .min_by_key(|r| r.order)
                .map(|r| (r.mode, r.rule_id))
        };
        let enforced_deny = first(&|r| r.action == Action::Deny && enforced(r.mode));
        let deny = first(&|r| r.action == Action::Deny);
        let allow = first(&|r| r.action == Action::Allow);
        let default = (
            self.default_action,
            self.default_mode,
            tollgate_common::RULE_ID_DEFAULT,
        );
        match (enforced_deny, deny, allow) {
            (Some((mode, id)), _, _) => (Action::Deny, mode, id),
            (None, Some(_), None)
                if self.default_action == Action::Deny && enforced(self.default_mode) =>
            {
                default
            }
            (None, Some((mode, id)), _) => (Action::Deny, mode, id),
            (None, None, Some((mode, id))) => (Action::Allow, mode, id),
            (None, None, None) => default,
        }
    }
}
