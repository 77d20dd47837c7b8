//! The kernel side as the agent sees it: load or adopt the pinned programs
//! and maps, write rule sets, read counters and events.
//!
//! Everything lives under one versioned bpffs directory:
//!
//! ```text
//! <bpffs-root>/v<PIN_LAYOUT_VERSION>/maps/TG_*      pinned maps
//! <bpffs-root>/v<PIN_LAYOUT_VERSION>/links/<hook>   pinned cgroup links
//! ```
//!
//! Pinned links keep the programs attached while no agent runs, so
//! enforcement never lapses across a crash or restart. A starting agent
//! reuses the pinned maps and links it finds ("adopts" them) and attaches
//! only what is missing. When its programs differ from the attached ones
//! (an upgrade), it swaps them into the pinned links in one step each.
//! Links of an older layout version (other maps) keep enforcing until the
//! new maps hold the rules; `take_over_older_layouts` then swaps the new
//! programs into them, moves their pins here and removes the older layout.

mod counts;
pub mod events;
mod frames;
mod hits;
pub mod learned;
pub mod raw_bpf;
mod rules;
mod set_delta;

use std::{
    fs,
    io::ErrorKind,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, ProgramError, ProgramFd,
        ProgramInfo, SchedClassifier, links::FdLink, links::PinnedLink, loaded_programs,
    },
};
pub use counts::{AllowedCounts, Half};
pub use events::{Event, EventReader};
pub use frames::{AttachFailure, FRAME_PROGRAM, PodLink, remove_filters as remove_frame_filters};
pub use hits::{RuleHitCount, RuleHitsMap, monotonic_to_unix_ns};
pub use rules::{ListName, RuleSetError, wire_name};
use tollgate_common::{
    Config, EndpointKey, EndpointValue, FqdnName, FqdnNameIds, FqdnRuleKey, LearnedKey,
    LearnedValue, Mode, PIN_LAYOUT_VERSION, QueryKey, QueryValue, ResolverKey, RuleKeyV4,
    RuleKeyV6, RuleList, counter, map_names,
};

use crate::{cgroups, mounts};

/// The BPF object built by `cargo xtask build` (empty in host-only builds).
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate.bpf.o"));

/// The BPF object, for benchmarks that attach one of its programs alone.
pub fn bpf_object() -> &'static [u8] {
    BPF_OBJECT
}

/// The hooks, by the name of their pinned link (that of the program that
/// serves them best): four `cgroup/sock_addr` hooks and the `cgroup_skb`
/// egress hook that decide, and the `cgroup_skb` ingress hook that learns
/// from DNS answers.
pub const PROGRAMS: [&str; 6] = [
    "tollgate_connect4",
    "tollgate_connect6",
    "tollgate_sendmsg4",
    "tollgate_sendmsg6",
    PACKET_PROGRAM,
    DNS_PROGRAM,
];

/// Every program of the object, fallbacks included.
pub const ALL_PROGRAMS: [&str; 9] = [
    PROGRAMS[0],
    PROGRAMS[1],
    PROGRAMS[2],
    PROGRAMS[3],
    PACKET_PROGRAM,
    PACKET_PLAIN_PROGRAM,
    DNS_PROGRAM,
    DNS_FORWARD_PROGRAM,
    FRAME_PROGRAM,
];

/// Whether the agent cannot enforce without `program`, so does not start:
/// it serves a hook that decides, and no fallback stands in for it.
pub fn decides(program: &str) -> bool {
    program != DNS_PROGRAM && program != DNS_FORWARD_PROGRAM && program != PACKET_PROGRAM
}

/// Judges each packet of the sockets the sock_addr hooks do not see, and
/// records the DNS queries of UDP sockets.
pub const PACKET_PROGRAM: &str = "tollgate_packet";
/// The packet hook's fallback: judges the same, records no DNS query.
const PACKET_PLAIN_PROGRAM: &str = "tollgate_packet_plain";

const DNS_PROGRAM: &str = "tollgate_dns_ingress";
/// Hands DNS answers to the agent unparsed: the DNS hook's fallback.
const DNS_FORWARD_PROGRAM: &str = "tollgate_dns_forward";

/// The programs that can serve the hook of `link`, best first. Without one
/// of the deciding hooks nothing is enforced, so the agent does not start;
/// the DNS hook is optional: without it, FQDN rules learn nothing.
fn candidates(link: &'static str) -> &'static [&'static str] {
    match link {
        DNS_PROGRAM => &[DNS_PROGRAM, DNS_FORWARD_PROGRAM],
        "tollgate_connect4" => &["tollgate_connect4"],
        "tollgate_connect6" => &["tollgate_connect6"],
        "tollgate_sendmsg4" => &["tollgate_sendmsg4"],
        PACKET_PROGRAM => &[PACKET_PROGRAM, PACKET_PLAIN_PROGRAM],
        _ => &["tollgate_sendmsg6"],
    }
}

/// A feature the node runs without, because the kernel refused the program
/// that provides it. The agent starts all the same, and says so.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Degraded {
    /// What is missing, as the metric and readiness name it.
    pub feature: &'static str,
    /// The program the kernel refused.
    pub program: &'static str,
    /// The kernel's answer: the load error and the verifier's last lines.
    pub reason: String,
    /// What the node does instead.
    pub consequence: &'static str,
}

impl Degraded {
    fn refused(program: &'static str, error: &ProgramError) -> Self {
        let (feature, consequence) = match program {
            DNS_PROGRAM => (
                "dns-learning-in-kernel",
                "the agent learns FQDN rules' addresses from every DNS answer it is sent: \
                 a first connection can race the learning, and nothing is learned while \
                 the agent is down",
            ),
            PACKET_PROGRAM => (
                "dns-query-binding",
                "the packet hook records no DNS query, so an answer is tied to the socket \
                 that asked the resolver, not to the query's id and question",
            ),
            _ => (
                "dns-learning",
                "FQDN rules learn no addresses, so they allow nothing; \
                 CIDR rules are enforced as usual",
            ),
        };
        Self {
            feature,
            program,
            reason: refusal_summary(error),
            consequence,
        }
    }
}

/// The first line of a load error and the last lines of the verifier's
/// log, which say why; the whole log can run to megabytes.
fn refusal_summary(error: &ProgramError) -> String {
    const LAST_LINES: usize = 4;
    let text = error.to_string();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() <= LAST_LINES + 1 {
        return lines.join(" / ");
    }
    let mut kept = vec![lines[0], "..."];
    kept.extend(&lines[lines.len() - LAST_LINES..]);
    kept.join(" / ")
}

/// How one program fared with this kernel's verifier (`tollgate-agent verify`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProgramCheck {
    pub program: &'static str,
    pub loaded: bool,
    /// What the kernel reports (5.16 and later).
    pub verified_insns: Option<u32>,
    pub load_ms: f64,
    pub error: Option<String>,
}

/// Default parent of the versioned pin directory.
pub const DEFAULT_BPFFS_ROOT: &str = "/sys/fs/bpf/tollgate";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("this binary was built without the BPF object; build it with `cargo xtask build`")]
    NoBpfObject,
    #[error("cannot mount bpffs at {path}: {source}")]
    MountBpffs { path: PathBuf, source: nix::Error },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("waiting for running programs (a map-of-maps update): {0}")]
    Barrier(std::io::Error),
    #[error("the BPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the BPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("pinning link {path}: {source}")]
    PinLink {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("adopting pinned link {path}: {source}")]
    AdoptLink {
        path: PathBuf,
        source: aya::programs::links::LinkError,
    },
    #[error("replacing the program of pinned link {path}: {source}")]
    ReplaceProgram {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error(
        "the pinned programs under {pin_dir} are attached to cgroup id {pinned}, not to {requested} \
         (id {requested_id}); run `tollgate-agent cleanup` first to move them"
    )]
    AttachedElsewhere {
        pin_dir: PathBuf,
        pinned: u64,
        requested: PathBuf,
        requested_id: u64,
    },
    #[error(
        "the trusted resolvers listen on {ports:?}: at most {max} distinct ports are supported",
        max = tollgate_common::DNS_PORTS
    )]
    TooManyResolverPorts { ports: Vec<u16> },
    #[error(transparent)]
    Rules(#[from] rules::RuleSetError),
}

impl DatapathError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Where the datapath lives and what it is attached to.
#[derive(Clone, Debug)]
pub struct DatapathOptions {
    /// Parent of the versioned pin directory, on bpffs.
    pub bpffs_root: PathBuf,
    /// The cgroup v2 directory the programs attach to (normally the root).
    pub cgroup: PathBuf,
}

impl DatapathOptions {
    pub fn pin_dir(&self) -> PathBuf {
        pin_dir(&self.bpffs_root)
    }
}

fn pin_dir(bpffs_root: &Path) -> PathBuf {
    bpffs_root.join(format!("v{PIN_LAYOUT_VERSION}"))
}

/// The pin directories of other layout versions under `bpffs_root`.
fn older_pin_dirs(bpffs_root: &Path) -> Vec<PathBuf> {
    let current = pin_dir(bpffs_root);
    let Ok(entries) = fs::read_dir(bpffs_root) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            *path != current
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|name| {
                        name.strip_prefix('v')
                            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                    })
        })
        .collect();
    dirs.sort();
    dirs
}

/// How each hook came to be attached when the datapath was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Attached by this agent.
    New,
    /// Already attached by an earlier agent with the same program; its
    /// pinned link was adopted.
    Adopted,
    /// Attached by an earlier agent with another program (an upgrade):
    /// this agent's program was swapped into the pinned link.
    Replaced,
    /// Attached under an older layout version; that program enforces until
    /// `take_over_older_layouts` replaces it.
    Pending,
}

/// A hook still enforced by an older layout's link.
struct PendingTakeover {
    /// The hook's link name.
    link: &'static str,
    /// The program that takes it over.
    name: &'static str,
    program: ProgramFd,
    older_link: PathBuf,
}

/// Decision counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    pub audit: u64,
    pub allowed_deduplicated: u64,
    pub packets_deduplicated: u64,
    pub ringbuf_reserve_failed: u64,
    pub generation_retries: u64,
    pub generation_unstable: u64,
    pub dns_answers: u64,
    pub dns_addresses_learned: u64,
    pub dns_to_userspace: u64,
    pub dns_malformed: u64,
    pub dns_untrusted: u64,
    pub fqdn_slots_full: u64,
    pub fqdn_learn_failed: u64,
    pub dns_not_asked: u64,
    pub dns_via_loopback: u64,
    pub dns_foreign_netns: u64,
    pub dns_spoofed: u64,
    pub allowed_counts_full: u64,
}

/// The loaded (or adopted) datapath.
pub struct Datapath {
    pin_dir: PathBuf,
    config: Array<MapData, Config>,
    endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
    rules_v4: LpmTrie<MapData, RuleKeyV4, RuleList>,
    rules_v6: LpmTrie<MapData, RuleKeyV6, RuleList>,
    fqdn_rules: HashMap<MapData, FqdnRuleKey, RuleList>,
    fqdn_names_map: HashMap<MapData, FqdnName, FqdnNameIds>,
    /// What `fqdn_names_map` holds.
    fqdn_names: rules::FqdnNames,
    fqdn_learned: HashMap<MapData, LearnedKey, LearnedValue>,
    dns_trusted: HashMap<MapData, ResolverKey, u8>,
    endpoint_netns: HashMap<MapData, u64, u64>,
    dns_queries: HashMap<MapData, QueryKey, QueryValue>,
    /// What `endpoint_netns` holds.
    endpoint_netns_written: std::collections::BTreeMap<u64, u64>,
    counters: PerCpuArray<MapData, u64>,
    rule_hits: RuleHitsMap,
    events: Option<RingBuf<MapData>>,
    allowed_counts: Option<AllowedCounts>,
    /// The frame hook on pods' links, with the loaded object.
    frames: frames::FrameHook,
    attachments: Vec<(&'static str, Attachment)>,
    /// The program serving each attached hook, by link name.
    hooks: Loaded,
    degraded: Vec<Degraded>,
    pending: Vec<PendingTakeover>,
    bpffs_root: PathBuf,
    /// What this agent last wrote to `TG_CONFIG`.
    state: Config,
    /// What the rule maps hold, so a switch writes and deletes exactly
    /// what changes.
    written: rules::Written,
}

impl Datapath {
    /// Loads the programs and attaches them to `options.cgroup`, or adopts
    /// the ones an earlier agent pinned. Maps are always the pinned ones when
    /// they exist, so rules and counters survive restarts.
    pub fn open(options: &DatapathOptions) -> Result<Self, DatapathError> {
        if BPF_OBJECT.is_empty() {
            return Err(DatapathError::NoBpfObject);
        }
        ensure_bpffs(&options.bpffs_root)?;
        let pin_dir = options.pin_dir();
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for dir in [&maps_dir, &links_dir] {
            fs::create_dir_all(dir).map_err(DatapathError::io(dir))?;
        }

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(BPF_OBJECT)?;
        // Verified before anything in force changes: a program the kernel
        // refuses leaves the node as it was, or, if optional, degraded.
        let (loaded, degraded) = load_programs(&mut ebpf)?;
        let config: Array<MapData, Config> = take_map(&mut ebpf, map_names::CONFIG)?;
        let requested_id =
            cgroups::cgroup_id(&options.cgroup).map_err(DatapathError::io(&options.cgroup))?;
        let mut state = config.get(&0, 0).map_err(map_err(map_names::CONFIG))?;

        let any_link_pinned = PROGRAMS.iter().any(|name| links_dir.join(name).exists());
        if any_link_pinned
            && state.attached_cgroup_id != 0
            && state.attached_cgroup_id != requested_id
        {
            return Err(DatapathError::AttachedElsewhere {
                pin_dir,
                pinned: state.attached_cgroup_id,
                requested: options.cgroup.clone(),
                requested_id,
            });
        }

        let endpoints = take_map(&mut ebpf, map_names::ENDPOINTS)?;
        let rules_v4 = take_map(&mut ebpf, map_names::RULES_V4)?;
        let rules_v6 = take_map(&mut ebpf, map_names::RULES_V6)?;
        let fqdn_rules = take_map(&mut ebpf, map_names::FQDN_RULES)?;
        let fqdn_names_map = take_map(&mut ebpf, map_names::FQDN_NAMES)?;
        let fqdn_learned = take_map(&mut ebpf, map_names::FQDN_LEARNED)?;
        let dns_trusted = take_map(&mut ebpf, map_names::DNS_TRUSTED)?;
        let endpoint_netns: HashMap<MapData, u64, u64> =
            take_map(&mut ebpf, map_names::ENDPOINT_NETNS)?;
        let dns_queries = take_map(&mut ebpf, map_names::DNS_QUERIES)?;
        let endpoint_netns_written = endpoint_netns
            .iter()
            .collect::<Result<_, aya::maps::MapError>>()
            .map_err(map_err(map_names::ENDPOINT_NETNS))?;
        let counters = take_map(&mut ebpf, map_names::COUNTERS)?;
        let rule_hits = RuleHitsMap::new(take_map(&mut ebpf, map_names::RULE_HITS)?);
        let events = take_map(&mut ebpf, map_names::EVENTS)?;
        let allowed_counts = AllowedCounts::new(
            take_map(&mut ebpf, map_names::ALLOWED_COUNTS_A)?,
            take_map(&mut ebpf, map_names::ALLOWED_COUNTS_B)?,
        )?;
        let frames = frames::FrameHook::load(ebpf, &links_dir)?;
        // Unknown until the agent configures it: observe, never a surprise block.
        if Mode::from_u8(state.global_mode).is_none() {
            state.global_mode = Mode::Observe as u8;
        }
        state.attached_cgroup_id = requested_id;
        state.host_netns_cookie = crate::netns::socket_netns_cookie().unwrap_or(0);
        state.queries_recorded =
            u8::from(loaded.iter().any(|&(_, program)| program == PACKET_PROGRAM));
        let mut datapath = Self {
            pin_dir,
            config,
            endpoints,
            rules_v4,
            rules_v6,
            fqdn_rules,
            fqdn_names_map,
            fqdn_names: Default::default(),
            fqdn_learned,
            dns_trusted,
            endpoint_netns,
            dns_queries,
            endpoint_netns_written,
            counters,
            rule_hits,
            events: Some(events),
            allowed_counts: Some(allowed_counts),
            frames,
            attachments: Vec::new(),
            hooks: Vec::new(),
            degraded,
            pending: Vec::new(),
            bpffs_root: options.bpffs_root.clone(),
            state,
            written: Default::default(),
        };
        datapath.written = datapath.scan_written()?;
        datapath.fqdn_names = datapath.scan_names()?;
        // The configuration is in place before the first decision is made.
        datapath.write_config(state)?;
        let older_links = older_pin_dirs(&options.bpffs_root)
            .into_iter()
            .map(|dir| dir.join("links"))
            .collect::<Vec<_>>();
        (datapath.attachments, datapath.pending) = attach_or_adopt(
            &mut datapath.frames.ebpf,
            &loaded,
            &options.cgroup,
            &links_dir,
            &older_links,
        )?;
        datapath.hooks = loaded;
        Ok(datapath)
    }

    /// Loads every program of the object, fallbacks included, into maps
    /// pinned in a directory of their own under `bpffs_root` (removed
    /// after), attaches nothing, and reports how each fared.
    pub fn verify(bpffs_root: &Path) -> Result<Vec<ProgramCheck>, DatapathError> {
        if BPF_OBJECT.is_empty() {
            return Err(DatapathError::NoBpfObject);
        }
        ensure_bpffs(bpffs_root)?;
        let scratch_dir = bpffs_root.join(format!("verify-{}", std::process::id()));
        let maps_dir = scratch_dir.join("maps");
        fs::create_dir_all(&maps_dir).map_err(DatapathError::io(&maps_dir))?;
        let loaded = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(BPF_OBJECT);
        // The maps live as long as `ebpf` holds them: their pins go at once,
        // so that a check killed half way leaves nothing pinned.
        remove_layout(&scratch_dir)?;
        if fs::read_dir(bpffs_root).is_ok_and(|mut d| d.next().is_none()) {
            remove_dir_if_present(bpffs_root)?;
        }
        let mut ebpf = loaded?;
        let mut checks = Vec::with_capacity(ALL_PROGRAMS.len());
        for name in ALL_PROGRAMS {
            let mut program = HookProgram::get(&mut ebpf, name)?;
            let started = std::time::Instant::now();
            let result = program.load();
            let load_ms = started.elapsed().as_secs_f64() * 1000.0;
            checks.push(ProgramCheck {
                program: name,
                loaded: result.is_ok(),
                verified_insns: program
                    .info()
                    .ok()
                    .and_then(|info| info.verified_instruction_count()),
                load_ms,
                error: result.err().map(|e| refusal_summary(&e)),
            });
        }
        Ok(checks)
    }

    /// Completes an upgrade across layout versions, once this datapath's
    /// maps hold the rules: swaps this agent's programs into the older
    /// layout's links (so no connection goes unjudged), pins those links
    /// here, and removes every older layout's pins. Without older layouts,
    /// does nothing.
    pub fn take_over_older_layouts(&mut self) -> Result<(), DatapathError> {
        let links_dir = self.pin_dir.join("links");
        for pending in std::mem::take(&mut self.pending) {
            let replace = |source| DatapathError::ReplaceProgram {
                path: pending.older_link.clone(),
                source,
            };
            let link = raw_bpf::open_pinned(&pending.older_link).map_err(replace)?;
            raw_bpf::replace_program(link.as_fd(), pending.program.as_fd()).map_err(replace)?;
            let here = links_dir.join(pending.link);
            raw_bpf::pin(link.as_fd(), &here).map_err(DatapathError::io(&here))?;
            if let Some((_, attachment)) = self
                .attachments
                .iter_mut()
                .find(|(name, _)| *name == pending.name)
            {
                *attachment = Attachment::Replaced;
            }
        }
        for dir in older_pin_dirs(&self.bpffs_root) {
            remove_layout(&dir)?;
        }
        Ok(())
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn attachments(&self) -> &[(&'static str, Attachment)] {
        &self.attachments
    }

    /// The hooks a program of this agent serves, by link name: all of
    /// [`PROGRAMS`] unless the kernel refused every program of one.
    pub fn hook_links(&self) -> Vec<&'static str> {
        self.hooks.iter().map(|(link, _)| *link).collect()
    }

    /// The features this kernel refused the programs of.
    pub fn degraded(&self) -> &[Degraded] {
        &self.degraded
    }

    pub fn generation(&self) -> u32 {
        self.state.generation
    }

    pub fn global_mode(&self) -> Mode {
        Mode::from_u8(self.state.global_mode).unwrap_or(Mode::Observe)
    }

    pub fn set_global_mode(&mut self, mode: Mode) -> Result<(), DatapathError> {
        self.write_config(Config {
            global_mode: mode as u8,
            ..self.state
        })
    }

    /// Decisions of the packet hooks for the same flow and verdict are
    /// reported at most once per `interval`; zero reports every one.
    pub fn set_packet_report_interval(
        &mut self,
        interval: std::time::Duration,
    ) -> Result<(), DatapathError> {
        self.write_config(Config {
            packet_report_interval_ns: saturating_nanos(interval),
            ..self.state
        })
    }

    /// Allowed decisions for the same flow are reported at most once per
    /// `interval`; zero reports every one.
    pub fn set_allowed_report_interval(
        &mut self,
        interval: std::time::Duration,
    ) -> Result<(), DatapathError> {
        self.write_config(Config {
            allowed_report_interval_ns: saturating_nanos(interval),
            ..self.state
        })
    }

    /// Puts the frame hook on exactly the `wanted` pods' links (by the
    /// ifindex of the node's side), each judged as its endpoint where a
    /// frame has no socket. The links it could not be put on are returned;
    /// the others are in place.
    pub fn set_pod_links(
        &mut self,
        wanted: &std::collections::BTreeMap<u32, PodLink>,
    ) -> Result<Vec<AttachFailure>, DatapathError> {
        self.frames.set(wanted)
    }

    /// Where allowed decisions are counted now (None: they are not).
    pub fn allowed_counts_half(&self) -> Option<Half> {
        Half::of_config(self.state.allowed_counts)
    }

    /// Makes the programs count allowed decisions in `half` from now on
    /// (None: not at all).
    ///
    /// This runs every interval, not only at a switch, so it changes this
    /// field alone and leaves the rest as the kernel has it: a config
    /// written by another datapath handle since (a test's, an older
    /// agent's during a takeover) is never rolled back.
    pub fn set_allowed_counts_half(&mut self, half: Option<Half>) -> Result<(), DatapathError> {
        let allowed_counts = half.map_or(tollgate_common::allowed_counts::OFF, Half::config_value);
        let in_kernel = self.config.get(&0, 0).map_err(map_err(map_names::CONFIG))?;
        self.config
            .set(
                0,
                Config {
                    allowed_counts,
                    ..in_kernel
                },
                0,
            )
            .map_err(map_err(map_names::CONFIG))?;
        self.state.allowed_counts = allowed_counts;
        Ok(())
    }

    /// The counting halves; there is one handle, and the first caller gets
    /// it.
    pub fn take_allowed_counts(&mut self) -> Option<AllowedCounts> {
        self.allowed_counts.take()
    }

    /// The ring buffer reader; there is one, and the first caller gets it.
    pub fn take_event_reader(&mut self) -> std::io::Result<Option<EventReader>> {
        self.events.take().map(EventReader::new).transpose()
    }

    pub fn counters(&self) -> Result<Counters, DatapathError> {
        let sum = |index: u32| -> Result<u64, DatapathError> {
            let values = self
                .counters
                .get(&index, 0)
                .map_err(map_err(map_names::COUNTERS))?;
            Ok(values.iter().sum())
        };
        Ok(Counters {
            allowed: sum(counter::ALLOWED)?,
            denied: sum(counter::DENIED)?,
            audit: sum(counter::AUDIT)?,
            allowed_deduplicated: sum(counter::ALLOWED_DEDUPLICATED)?,
            packets_deduplicated: sum(counter::PACKETS_DEDUPLICATED)?,
            ringbuf_reserve_failed: sum(counter::RINGBUF_RESERVE_FAILED)?,
            generation_retries: sum(counter::GENERATION_RETRIES)?,
            generation_unstable: sum(counter::GENERATION_UNSTABLE)?,
            dns_answers: sum(counter::DNS_ANSWERS)?,
            dns_addresses_learned: sum(counter::DNS_ADDRESSES_LEARNED)?,
            dns_to_userspace: sum(counter::DNS_TO_USERSPACE)?,
            dns_malformed: sum(counter::DNS_MALFORMED)?,
            dns_untrusted: sum(counter::DNS_UNTRUSTED)?,
            fqdn_slots_full: sum(counter::FQDN_SLOTS_FULL)?,
            fqdn_learn_failed: sum(counter::FQDN_LEARN_FAILED)?,
            dns_not_asked: sum(counter::DNS_NOT_ASKED)?,
            dns_via_loopback: sum(counter::DNS_VIA_LOOPBACK)?,
            dns_foreign_netns: sum(counter::DNS_FOREIGN_NETNS)?,
            dns_spoofed: sum(counter::DNS_SPOOFED)?,
            allowed_counts_full: sum(counter::ALLOWED_COUNTS_FULL)?,
        })
    }

    /// The hits of each of `ids` (rule and default ids) that has a slot.
    pub fn rule_hits(
        &self,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<std::collections::BTreeMap<u32, RuleHitCount>, DatapathError> {
        self.rule_hits.read(ids)
    }

    /// Zeroes the hit counters of `ids`.
    pub fn zero_rule_hits(
        &mut self,
        ids: impl IntoIterator<Item = u32>,
    ) -> Result<(), DatapathError> {
        self.rule_hits.zero(ids)
    }

    /// Entries in force and capacity of the maps that rules fill.
    pub fn map_fill(&self) -> Result<Vec<(&'static str, usize, u32)>, DatapathError> {
        use aya::maps::IterableMap;
        let [endpoints, v4, v6, fqdn] = self
            .written
            .live_counts((self.state.generation & 1) as usize);
        let capacity = |name: &'static str, data: &MapData| -> Result<u32, DatapathError> {
            Ok(data.info().map_err(map_err(name))?.max_entries())
        };
        Ok(vec![
            (
                map_names::ENDPOINTS,
                endpoints,
                capacity(map_names::ENDPOINTS, self.endpoints.map())?,
            ),
            (
                map_names::RULES_V4,
                v4,
                capacity(map_names::RULES_V4, self.rules_v4.map())?,
            ),
            (
                map_names::RULES_V6,
                v6,
                capacity(map_names::RULES_V6, self.rules_v6.map())?,
            ),
            (
                map_names::FQDN_RULES,
                fqdn,
                capacity(map_names::FQDN_RULES, self.fqdn_rules.map())?,
            ),
            (
                map_names::FQDN_NAMES,
                self.fqdn_names.len(),
                capacity(map_names::FQDN_NAMES, self.fqdn_names_map.map())?,
            ),
        ])
    }

    /// Writes `next` to `TG_CONFIG`; the agent's copy changes only if the
    /// kernel's did.
    fn write_config(&mut self, next: Config) -> Result<(), DatapathError> {
        self.config
            .set(0, next, 0)
            .map_err(map_err(map_names::CONFIG))?;
        self.state = next;
        Ok(())
    }
}

fn saturating_nanos(interval: std::time::Duration) -> u64 {
    u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX)
}

/// Removes every pin under `bpffs_root`, of every layout version, which
/// detaches the programs once no agent holds them open, and deletes the
/// directories it created. Returns the paths removed.
pub fn cleanup(bpffs_root: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let mut removed = Vec::new();
    for dir in older_pin_dirs(bpffs_root)
        .into_iter()
        .chain([pin_dir(bpffs_root)])
    {
        removed.extend(remove_layout(&dir)?);
    }
    // The root is ours too, unless something else lives there.
    if fs::read_dir(bpffs_root).is_ok_and(|mut d| d.next().is_none()) {
        remove_dir_if_present(bpffs_root)?;
    }
    Ok(removed)
}

/// Unpins one layout version's links and maps and removes its directories.
fn remove_layout(pin_dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let mut removed = Vec::new();
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(DatapathError::Io {
                    path: dir,
                    source: e,
                });
            }
        };
        for entry in entries {
            let path = entry.map_err(DatapathError::io(&dir))?.path();
            fs::remove_file(&path).map_err(DatapathError::io(&path))?;
            removed.push(path);
        }
        remove_dir_if_present(&dir)?;
    }
    remove_dir_if_present(pin_dir)?;
    Ok(removed)
}

fn remove_dir_if_present(dir: &Path) -> Result<(), DatapathError> {
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(DatapathError::Io {
            path: dir.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Mounts bpffs at the standard place if `bpffs_root` is not on one already.
fn ensure_bpffs(bpffs_root: &Path) -> Result<(), DatapathError> {
    let mounts =
        mounts::bpffs_mounts().map_err(DatapathError::io(Path::new("/proc/self/mountinfo")))?;
    if mounts.iter().any(|m| bpffs_root.starts_with(m)) {
        return Ok(());
    }
    let target = Path::new("/sys/fs/bpf");
    if !bpffs_root.starts_with(target) {
        return Err(DatapathError::Io {
            path: bpffs_root.to_owned(),
            source: std::io::Error::new(ErrorKind::NotFound, "not on a mounted bpffs"),
        });
    }
    nix::mount::mount(
        Some("bpf"),
        target,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(|source| DatapathError::MountBpffs {
        path: target.to_owned(),
        source,
    })
}

/// The program loaded for each hook, by link name.
type Loaded = Vec<(&'static str, &'static str)>;

/// Loads the best program the kernel accepts for every hook. A refused
/// program of an optional hook is [`Degraded`]; of a deciding hook, an
/// error.
fn load_programs(ebpf: &mut Ebpf) -> Result<(Loaded, Vec<Degraded>), DatapathError> {
    let mut loaded = Vec::with_capacity(PROGRAMS.len());
    let mut degraded = Vec::new();
    for link in PROGRAMS {
        for &name in candidates(link) {
            match HookProgram::get(ebpf, name)?.load() {
                Ok(()) => {
                    loaded.push((link, name));
                    break;
                }
                Err(source)
                    if (link == DNS_PROGRAM || name == PACKET_PROGRAM) && is_refusal(&source) =>
                {
                    degraded.push(Degraded::refused(name, &source));
                }
                Err(source) => return Err(DatapathError::Program { name, source }),
            }
        }
    }
    Ok((loaded, degraded))
}

/// Whether a load failed because the kernel refuses the program (its
/// verifier, or a feature it lacks), not for want of memory, privileges or
/// time: only that is a reason to run without it rather than not start.
fn is_refusal(error: &ProgramError) -> bool {
    // The kernel's own "not supported" (not in libc): what BPF_PROG_LOAD
    // answers for a helper or feature a kernel's program type lacks.
    const ENOTSUPP: i32 = 524;
    match error {
        ProgramError::LoadError { io_error, .. } => matches!(
            io_error.raw_os_error(),
            Some(libc::EACCES | libc::EINVAL | libc::E2BIG | ENOTSUPP | libc::EOPNOTSUPP)
        ),
        _ => false,
    }
}

type Attached = (Vec<(&'static str, Attachment)>, Vec<PendingTakeover>);

/// Attaches each loaded program to its hook, or adopts the hook's pinned
/// link (swapping the program in if it differs).
fn attach_or_adopt(
    ebpf: &mut Ebpf,
    loaded: &Loaded,
    cgroup: &Path,
    links_dir: &Path,
    older_links_dirs: &[PathBuf],
) -> Result<Attached, DatapathError> {
    let cgroup_fd = fs::File::open(cgroup).map_err(DatapathError::io(cgroup))?;
    let mut attachments = Vec::with_capacity(loaded.len());
    let mut pending = Vec::new();
    for &(link, name) in loaded {
        let program_error = |source| DatapathError::Program { name, source };
        let mut program = HookProgram::get(ebpf, name)?;
        let link_path = links_dir.join(link);
        if link_path.exists() {
            attachments.push((name, adopt(&program, &link_path)?));
            continue;
        }
        if let Some(older_link) = older_links_dirs
            .iter()
            .map(|dir| dir.join(link))
            .find(|path| path.exists())
        {
            pending.push(PendingTakeover {
                link,
                name,
                program: program
                    .fd()
                    .and_then(|fd| fd.try_clone().map_err(Into::into))
                    .map_err(program_error)?,
                older_link,
            });
            attachments.push((name, Attachment::Pending));
            continue;
        }
        let attached = program.attach(&cgroup_fd).map_err(program_error)?;
        attached
            .pin(&link_path)
            .map_err(|source| DatapathError::PinLink {
                path: link_path.clone(),
                source,
            })?;
        attachments.push((name, Attachment::New));
    }
    Ok((attachments, pending))
}

/// One of the programs, whatever its kind.
enum HookProgram<'a> {
    SockAddr(&'a mut CgroupSockAddr),
    /// The packet hook (egress) and the DNS programs (ingress).
    Skb(&'a mut CgroupSkb, CgroupSkbAttachType),
    /// The frame hook, attached to pods' links (`frames`), not cgroups.
    Classifier(&'a mut SchedClassifier),
}

impl<'a> HookProgram<'a> {
    fn get(ebpf: &'a mut Ebpf, name: &'static str) -> Result<Self, DatapathError> {
        let program = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?;
        let kind_error = |source| DatapathError::Program { name, source };
        Ok(if name == FRAME_PROGRAM {
            Self::Classifier(program.try_into().map_err(kind_error)?)
        } else if name == PACKET_PROGRAM || name == PACKET_PLAIN_PROGRAM {
            Self::Skb(
                program.try_into().map_err(kind_error)?,
                CgroupSkbAttachType::Egress,
            )
        } else if name == DNS_PROGRAM || name == DNS_FORWARD_PROGRAM {
            Self::Skb(
                program.try_into().map_err(kind_error)?,
                CgroupSkbAttachType::Ingress,
            )
        } else {
            Self::SockAddr(program.try_into().map_err(kind_error)?)
        })
    }

    /// Loads, retrying the EAGAIN a busy verifier can give.
    fn load(&mut self) -> Result<(), ProgramError> {
        const ATTEMPTS: usize = 5;
        let mut load = || match self {
            Self::SockAddr(p) => p.load(),
            Self::Skb(p, _) => p.load(),
            Self::Classifier(p) => p.load(),
        };
        for _ in 1..ATTEMPTS {
            match load() {
                Err(ProgramError::LoadError { io_error, .. })
                    if io_error.raw_os_error() == Some(libc::EAGAIN) => {}
                result => return result,
            }
        }
        load()
    }

    fn fd(&self) -> Result<&ProgramFd, ProgramError> {
        match self {
            Self::SockAddr(p) => p.fd(),
            Self::Skb(p, _) => p.fd(),
            Self::Classifier(p) => p.fd(),
        }
    }

    fn info(&self) -> Result<ProgramInfo, ProgramError> {
        match self {
            Self::SockAddr(p) => p.info(),
            Self::Skb(p, _) => p.info(),
            Self::Classifier(p) => p.info(),
        }
    }

    /// Attaches with a link (so programs of others on the same cgroup
    /// coexist) and hands the link over for pinning.
    fn attach(&mut self, cgroup: &fs::File) -> Result<FdLink, ProgramError> {
        let link_error =
            |e: aya::programs::links::LinkError| ProgramError::IOError(std::io::Error::other(e));
        match self {
            Self::SockAddr(p) => {
                let id = p.attach(cgroup, CgroupAttachMode::default())?;
                p.take_link(id)?.try_into().map_err(link_error)
            }
            Self::Skb(p, attach_type) => {
                let id = p.attach(cgroup, *attach_type, CgroupAttachMode::default())?;
                p.take_link(id)?.try_into().map_err(link_error)
            }
            Self::Classifier(_) => Err(ProgramError::UnexpectedProgramType),
        }
    }
}

/// Keeps a pinned link, with `program` swapped in if the attached one
/// differs from it (by the kernel's tag, a hash of the instructions).
fn adopt(program: &HookProgram, link_path: &Path) -> Result<Attachment, DatapathError> {
    let adopt_error = |source| DatapathError::AdoptLink {
        path: link_path.to_owned(),
        source,
    };
    let replace_error = |source| DatapathError::ReplaceProgram {
        path: link_path.to_owned(),
        source,
    };
    // Opening the pin checks it is a real link.
    let link = FdLink::from(PinnedLink::from_pin(link_path).map_err(adopt_error)?);
    let attached_id = link.info().map_err(adopt_error)?.program_id();
    let ours = program
        .info()
        .map_err(|e| replace_error(std::io::Error::other(e)))?;
    let attached_tag = loaded_programs()
        .filter_map(Result::ok)
        .find(|info| info.id() == attached_id)
        .map(|info| info.tag());
    if attached_tag == Some(ours.tag()) {
        return Ok(Attachment::Adopted);
    }
    let link_fd = raw_bpf::open_pinned(link_path).map_err(replace_error)?;
    let program_fd = program
        .fd()
        .map_err(|e| replace_error(std::io::Error::other(e)))?;
    raw_bpf::replace_program(link_fd.as_fd(), program_fd.as_fd()).map_err(replace_error)?;
    Ok(Attachment::Replaced)
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(map_err(name))
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    move |source| DatapathError::Map { name, source }
}
