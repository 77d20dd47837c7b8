//! Validated policies: what the compiler and the reference evaluator work on.
//! Only `validate` makes these, so every value here is known to be good.

use std::{collections::BTreeMap, sync::Arc};

use ipnet::IpNet;
pub use smallvec::{SmallVec, smallvec};

use tollgate_common::protocol;

/// `namespace/name`, or `name` for a policy without a namespace.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    pub namespace: Option<String>,
    pub name: String,
}

impl std::fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{namespace}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Policy {
    pub key: PolicyKey,
    pub mode: PolicyMode,
    pub default_action: Action,
    pub selector: Selector,
    /// Shared by every copy: the store, each plan and the enforcer hold the
    /// same policy, and at 100k rules a copy each was most of the agent's
    /// memory.
    pub rules: Arc<[Rule]>,
}

/// Which endpoints a policy applies to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Selector {
    /// Pods, when the policy has a podSelector or namespaceSelector.
    pub pods: Option<PodSelector>,
    /// Cgroup path globs (hosts without Kubernetes).
    pub cgroups: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PodSelector {
    pub pods: LabelSelector,
    /// None: pods of the policy's own namespace.
    pub namespaces: Option<LabelSelector>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct LabelSelector {
    pub match_labels: BTreeMap<String, String>,
    pub match_expressions: Vec<LabelRequirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LabelRequirement {
    In { key: String, values: Vec<String> },
    NotIn { key: String, values: Vec<String> },
    Exists { key: String },
    DoesNotExist { key: String },
}

/// A policy holds one per rule for as long as it is in force, so a rule is
/// compact: nearly every rule has one destination and a port or two, which
/// sit inline, and its name is shared with the names flow records use. (At
/// the bench's 100k rules, an allocation for each list and name made the
/// agent's RSS 75 MiB rather than 61.)
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The rule's `name`, or `egress[<index>]`.
    pub name: Arc<str>,
    pub action: Action,
    /// Empty: any destination.
    pub to: SmallVec<[Peer; 1]>,
    /// Empty: any port and protocol.
    pub ports: SmallVec<[PortSpec; 2]>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// `net` minus every prefix in `except` (each inside `net`, longer).
    Cidr {
        net: IpNet,
        except: Box<[IpNet]>,
    },
    Fqdn(FqdnPattern),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortSpec {
    pub ports: PortRange,
    pub protocol: Protocol,
}

impl PortSpec {
    pub const ANY: Self = Self {
        ports: PortRange::ANY,
        protocol: Protocol::Any,
    };

    pub fn matches(&self, port: u16, protocol: u8) -> bool {
        self.ports.first <= port && port <= self.ports.last && self.protocol.matches(protocol)
    }
}

impl Peer {
    /// Whether an address is in this peer, for an endpoint that learned it
    /// from DNS answers for the patterns `learned`.
    pub fn contains(&self, ip: std::net::IpAddr, learned: &[&FqdnPattern]) -> bool {
        match self {
            Peer::Cidr { net, except } => {
                net.contains(&ip) && !except.iter().any(|e| e.contains(&ip))
            }
            Peer::Fqdn(pattern) => learned.contains(&pattern),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
}

/// A policy's mode: the global one, or an override.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum PolicyMode {
    #[default]
    Inherit,
    Observe,
    Enforce,
}

/// The IP protocol a port rule applies to. `Any` with no port matches
/// every protocol; with a port, it matches the protocols that have ports
/// (TCP, UDP, SCTP, UDP-Lite, DCCP), since every other protocol is judged
/// with port 0, which no port range holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    #[default]
    Any,
    Tcp,
    Udp,
    Sctp,
    Icmp,
    Icmpv6,
}

impl Protocol {
    /// Whether an IP protocol number is covered.
    pub fn matches(self, protocol: u8) -> bool {
        self.number().is_none_or(|number| number == protocol)
    }

    /// The IP protocol number, None for any.
    pub fn number(self) -> Option<u8> {
        match self {
            Protocol::Any => None,
            Protocol::Tcp => Some(protocol::TCP),
            Protocol::Udp => Some(protocol::UDP),
            Protocol::Sctp => Some(protocol::SCTP),
            Protocol::Icmp => Some(protocol::ICMP),
            Protocol::Icmpv6 => Some(protocol::ICMPV6),
        }
    }

    /// Whether packets of the protocol have ports for rules to match.
    pub fn has_ports(self) -> bool {
        self.number().is_none_or(protocol::has_ports)
    }
}

/// An inclusive port range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ANY: Self = Self {
        first: 0,
        last: u16::MAX,
    };

    pub const fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }
}

/// A DNS name rule, lowercased, without a trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FqdnPattern {
    /// `api.example.com`
    Exact(String),
    /// `*.example.com`: exactly one more label; holds `example.com`.
    OneLabel(String),
    /// `**.example.com`: one or more labels; holds `example.com`.
    AnyLabels(String),
}

impl FqdnPattern {
    /// The name the pattern is built on.
    pub fn name(&self) -> &str {
        match self {
            Self::Exact(name) | Self::OneLabel(name) | Self::AnyLabels(name) => name,
        }
    }

    /// Whether `name` (lowercase, dotted, no trailing dot) matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => name == exact,
            Self::OneLabel(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            Self::AnyLabels(suffix) => name
                .strip_suffix(suffix.as_str())
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|labels| !labels.is_empty() && !labels.split('.').any(str::is_empty)),
        }
    }
}

impl std::fmt::Display for FqdnPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::OneLabel(name) => write!(f, "*.{name}"),
            Self::AnyLabels(name) => write!(f, "**.{name}"),
        }
    }
}
