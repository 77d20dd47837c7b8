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
//! only what is missing.

mod events;
mod rules;

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink, links::PinnedLink},
};
pub use events::EventReader;
pub use rules::{
    Action, PolicyMode, PortRange, PortRuleSpec, Protocol, RuleSet, RuleSetError, SetRules,
};
use tollgate_common::{
    Config, EndpointKey, EndpointValue, Mode, PIN_LAYOUT_VERSION, RuleKeyV4, RuleKeyV6, RuleList,
    counter, map_names,
};

use crate::{cgroups, mounts};

/// The BPF object built by `cargo xtask build` (empty in host-only builds).
static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tollgate.bpf.o"));

/// The four hooks, by program name.
pub const PROGRAMS: [&str; 4] = [
    "tollgate_connect4",
    "tollgate_connect6",
    "tollgate_sendmsg4",
    "tollgate_sendmsg6",
];

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

/// How each hook came to be attached when the datapath was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// Attached by this agent.
    New,
    /// Already attached by an earlier agent; its pinned link was adopted.
    Adopted,
}

/// Decision counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    pub allowed: u64,
    pub denied: u64,
    pub audit: u64,
    pub allowed_deduplicated: u64,
    pub ringbuf_reserve_failed: u64,
    pub generation_retries: u64,
    pub generation_unstable: u64,
}

/// The loaded (or adopted) datapath.
pub struct Datapath {
    pin_dir: PathBuf,
    config: Array<MapData, Config>,
    endpoints: HashMap<MapData, EndpointKey, EndpointValue>,
    rules_v4: LpmTrie<MapData, RuleKeyV4, RuleList>,
    rules_v6: LpmTrie<MapData, RuleKeyV6, RuleList>,
    counters: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    attachments: Vec<(&'static str, Attachment)>,
    /// What this agent last wrote to `TG_CONFIG`.
    state: Config,
    /// Keys present in each generation half, so a switch deletes exactly them.
    halves: [rules::HalfContents; 2],
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
        let counters = take_map(&mut ebpf, map_names::COUNTERS)?;
        let events = take_map(&mut ebpf, map_names::EVENTS)?;
        // Unknown until the agent configures it: observe, never a surprise block.
        if Mode::from_u8(state.global_mode).is_none() {
            state.global_mode = Mode::Observe as u8;
        }
        state.attached_cgroup_id = requested_id;
        let mut datapath = Self {
            pin_dir,
            config,
            endpoints,
            rules_v4,
            rules_v6,
            counters,
            events: Some(events),
            attachments: Vec::new(),
            state,
            halves: Default::default(),
        };
        datapath.halves = datapath.scan_halves()?;
        // The configuration is in place before the first decision is made.
        datapath.write_config(state)?;
        datapath.attachments = attach_or_adopt(&mut ebpf, &options.cgroup, &links_dir)?;
        Ok(datapath)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn attachments(&self) -> &[(&'static str, Attachment)] {
        &self.attachments
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

    /// Allowed decisions for the same flow are reported at most once per
    /// `interval`; zero reports every one.
    pub fn set_allowed_report_interval(
        &mut self,
        interval: std::time::Duration,
    ) -> Result<(), DatapathError> {
        let interval_ns = u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX);
        self.write_config(Config {
            allowed_report_interval_ns: interval_ns,
            ..self.state
        })
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
            ringbuf_reserve_failed: sum(counter::RINGBUF_RESERVE_FAILED)?,
            generation_retries: sum(counter::GENERATION_RETRIES)?,
            generation_unstable: sum(counter::GENERATION_UNSTABLE)?,
        })
    }

    /// Entries in force and capacity of the maps that rules fill.
    pub fn map_fill(&self) -> Result<Vec<(&'static str, usize, u32)>, DatapathError> {
        use aya::maps::IterableMap;
        let live = &self.halves[(self.state.generation & 1) as usize];
        let capacity = |name: &'static str, data: &MapData| -> Result<u32, DatapathError> {
            Ok(data.info().map_err(map_err(name))?.max_entries())
        };
        Ok(vec![
            (
                map_names::ENDPOINTS,
                live.endpoint_count(),
                capacity(map_names::ENDPOINTS, self.endpoints.map())?,
            ),
            (
                map_names::RULES_V4,
                live.v4_count(),
                capacity(map_names::RULES_V4, self.rules_v4.map())?,
            ),
            (
                map_names::RULES_V6,
                live.v6_count(),
                capacity(map_names::RULES_V6, self.rules_v6.map())?,
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

/// Removes every pin under `bpffs_root` for this layout version, which
/// detaches the programs once no agent holds them open, and deletes the
/// directories it created. Returns the paths removed.
pub fn cleanup(bpffs_root: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let pin_dir = pin_dir(bpffs_root);
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
    remove_dir_if_present(&pin_dir)?;
    // The root is ours too, unless another layout version still lives there.
    if fs::read_dir(bpffs_root).is_ok_and(|mut d| d.next().is_none()) {
        remove_dir_if_present(bpffs_root)?;
    }
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

fn attach_or_adopt(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    links_dir: &Path,
) -> Result<Vec<(&'static str, Attachment)>, DatapathError> {
    let cgroup_fd = fs::File::open(cgroup).map_err(DatapathError::io(cgroup))?;
    let mut attachments = Vec::with_capacity(PROGRAMS.len());
    for name in PROGRAMS {
        let link_path = links_dir.join(name);
        if link_path.exists() {
            // The pin keeps the link; opening it checks it is a real link.
            PinnedLink::from_pin(&link_path).map_err(|source| DatapathError::AdoptLink {
                path: link_path.clone(),
                source,
            })?;
            attachments.push((name, Attachment::Adopted));
            continue;
        }
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })?;
        load_program(program).map_err(|source| DatapathError::Program { name, source })?;
        let link_id = program
            .attach(&cgroup_fd, CgroupAttachMode::default())
            .map_err(|source| DatapathError::Program { name, source })?;
        let link: FdLink = program
            .take_link(link_id)
            .map_err(|source| DatapathError::Program { name, source })?
            .try_into()
            .map_err(
                |source: aya::programs::links::LinkError| DatapathError::AdoptLink {
                    path: link_path.clone(),
                    source,
                },
            )?;
        link.pin(&link_path)
            .map_err(|source| DatapathError::PinLink {
                path: link_path.clone(),
                source,
            })?;
        attachments.push((name, Attachment::New));
    }
    Ok(attachments)
}

/// Loads a program. The verifier gives up with EAGAIN when a signal is
/// pending on the loading thread (a child exiting is enough); like libbpf,
/// try again a few times before calling that a failure.
fn load_program(program: &mut CgroupSockAddr) -> Result<(), aya::programs::ProgramError> {
    const ATTEMPTS: usize = 5;
    for _ in 1..ATTEMPTS {
        match program.load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) => {}
            result => return result,
        }
    }
    program.load()
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
