//! The frame hook on pods' links: `tollgate_frame` attached at tc ingress
//! on the node's side of each enforced pod's veth (agent-ebpf `frame.rs`),
//! and `TG_POD_LINKS`, which tells it whose link each is.
//!
//! Where the kernel has tcx (6.6), the program is attached by a link,
//! first among the interface's programs (so a CNI's program that ends the
//! processing runs after it), and the link is pinned as
//! `links/frame-<ifindex>`: it judges while no agent runs, and goes with
//! the interface. Before 6.6 it is a cls_bpf filter of the interface's
//! clsact qdisc, at priority [`FILTER_PRIORITY`], which the kernel keeps
//! until the interface goes or `cleanup` removes it.

use std::{
    collections::BTreeMap,
    fs,
    io::ErrorKind,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::FdLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
    util::KernelVersion,
};
use tollgate_common::map_names;

use super::{DatapathError, map_err, raw_bpf};

/// The program, as the kernel names it (tc filters are found by it).
pub const FRAME_PROGRAM: &str = "tollgate_frame";

/// The cls_bpf filter's place before tcx: first priority, a handle of
/// its own.
const FILTER_PRIORITY: u16 = 1;
const FILTER_HANDLE: u32 = 0x7467;

/// A pod's link as the node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLink {
    /// The node's side of the pod's veth.
    pub name: String,
    /// The cgroup whose policies judge the link's frames that have no
    /// socket: an endpoint of the pod.
    pub endpoint: u64,
}

/// A link the frame hook could not be attached to; the others are.
#[derive(Debug, thiserror::Error)]
#[error("attaching {FRAME_PROGRAM} to {name} (ifindex {ifindex}): {reason}")]
pub struct AttachFailure {
    pub ifindex: u32,
    pub name: String,
    pub reason: String,
}

pub(super) struct FrameHook {
    /// The object whose frame program is loaded (the cgroup hooks'
    /// programs are attached from it at open, and pinned).
    pub(super) ebpf: Ebpf,
    links_dir: PathBuf,
    pod_links: HashMap<MapData, u32, u64>,
    /// What `pod_links` holds and the program is attached to.
    attached: BTreeMap<u32, PodLink>,
    tcx: bool,
}

impl FrameHook {
    /// Loads the frame program of `ebpf`, attaching nothing yet.
    pub(super) fn load(mut ebpf: Ebpf, links_dir: &Path) -> Result<Self, DatapathError> {
        let pod_links: HashMap<MapData, u32, u64> =
            super::take_map(&mut ebpf, map_names::POD_LINKS)?;
        super::HookProgram::get(&mut ebpf, FRAME_PROGRAM)?
            .load()
            .map_err(|source| DatapathError::Program {
                name: FRAME_PROGRAM,
                source,
            })?;
        Ok(Self {
            ebpf,
            links_dir: links_dir.to_owned(),
            pod_links,
            // Empty until the first `set`, which attaches this agent's
            // program to every link wanted, replacing an earlier agent's.
            attached: BTreeMap::new(),
            tcx: KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)),
        })
    }

    /// Attaches the program to `wanted` links (by ifindex) it is not on
    /// yet, detaches it from the others, and writes the pods' endpoints.
    /// A link it cannot be attached to is reported and left out; the
    /// others are in place.
    pub(super) fn set(
        &mut self,
        wanted: &BTreeMap<u32, PodLink>,
    ) -> Result<Vec<AttachFailure>, DatapathError> {
        let mut failures = Vec::new();
        let stale: Vec<u32> = self
            .kernel_links()?
            .into_iter()
            .chain(self.attached.keys().copied())
            .filter(|ifindex| !wanted.contains_key(ifindex))
            .collect();
        for ifindex in stale {
            self.detach(ifindex)?;
        }
        for (&ifindex, link) in wanted {
            if self.attached.get(&ifindex) == Some(link) {
                continue;
            }
            let on_this_interface = self
                .attached
                .get(&ifindex)
                .is_some_and(|was| was.name == link.name);
            if !on_this_interface && let Err(reason) = self.attach(ifindex, &link.name) {
                failures.push(AttachFailure {
                    ifindex,
                    name: link.name.clone(),
                    reason,
                });
                continue;
            }
            self.pod_links
                .insert(ifindex, link.endpoint, 0)
                .map_err(map_err(map_names::POD_LINKS))?;
            self.attached.insert(ifindex, link.clone());
        }
        Ok(failures)
    }

    /// The links an agent left entries or pins for.
    fn kernel_links(&self) -> Result<Vec<u32>, DatapathError> {
        let mut links: Vec<u32> = self
            .pod_links
            .keys()
            .collect::<Result<_, MapError>>()
            .map_err(map_err(map_names::POD_LINKS))?;
        links.extend(pinned_frame_links(&self.links_dir));
        Ok(links)
    }

    fn attach(&mut self, ifindex: u32, name: &str) -> Result<(), String> {
        let pin = self.links_dir.join(pin_name(ifindex));
        let program = classifier(&mut self.ebpf).map_err(|e| e.to_string())?;
        if self.tcx {
            // A pin of an earlier agent: still on this interface, its
            // program is swapped for this one; gone with its interface
            // (and the index reused), it is replaced.
            if let Ok(fd) = raw_bpf::open_pinned(&pin) {
                if raw_bpf::tcx_link_ifindex(fd.as_fd()).ok() == Some(ifindex) {
                    let program_fd = program.fd().map_err(|e| e.to_string())?;
                    return raw_bpf::replace_program(fd.as_fd(), program_fd.as_fd())
                        .map_err(|e| e.to_string());
                }
                remove_pin(&pin).map_err(|e| e.to_string())?;
            }
            let id = program
                .attach_with_options(
                    name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(|e| e.to_string())?;
            let link: FdLink = program
                .take_link(id)
                .map_err(|e| e.to_string())?
                .try_into()
                .map_err(|e: aya::programs::links::LinkError| e.to_string())?;
            link.pin(&pin).map_err(|e| e.to_string())?;
            return Ok(());
        }
        match tc::qdisc_add_clsact(name) {
            Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
            other => other.map_err(|e| e.to_string())?,
        }
        let handle = TcHandle::from(FILTER_HANDLE);
        let options = NlOptions {
            priority: FILTER_PRIORITY,
            handle,
            classid: None,
        };
        let id = match program.attach_with_options(
            name,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(options),
        ) {
            Ok(id) => id,
            // An earlier agent's filter: its program is swapped for this one.
            Err(ProgramError::TcError(TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::EEXIST) =>
            {
                let existing = SchedClassifierLink::attached(
                    name,
                    TcAttachType::Ingress,
                    FILTER_PRIORITY,
                    handle,
                    None,
                )
                .map_err(|e| e.to_string())?;
                program
                    .attach_to_link(existing)
                    .map_err(|e| e.to_string())?
            }
            Err(e) => return Err(e.to_string()),
        };
        // The filter stays in the kernel on its own (dropping the link
        // would remove it); `detach` and `cleanup` remove it by name.
        std::mem::forget(program.take_link(id).map_err(|e| e.to_string())?);
        Ok(())
    }

    fn detach(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        match self.pod_links.remove(&ifindex) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(map_names::POD_LINKS)(e)),
        }
        let pin = self.links_dir.join(pin_name(ifindex));
        remove_pin(&pin).map_err(DatapathError::io(&pin))?;
        let attached = self.attached.remove(&ifindex);
        if !self.tcx {
            // Gone with its interface if that went (a pod deleted); an
            // earlier agent's is found by the interface's name.
            if let Some(name) = attached
                .map(|link| link.name)
                .or_else(|| interface_name(ifindex))
            {
                let _ = tc::qdisc_detach_program(&name, TcAttachType::Ingress, FRAME_PROGRAM);
            }
        }
        Ok(())
    }
}

fn classifier(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, DatapathError> {
    ebpf.program_mut(FRAME_PROGRAM)
        .ok_or(DatapathError::MissingProgram(FRAME_PROGRAM))?
        .try_into()
        .map_err(|source| DatapathError::Program {
            name: FRAME_PROGRAM,
            source,
        })
}

/// The name of this namespace's interface `ifindex`, if there is one.
fn interface_name(ifindex: u32) -> Option<String> {
    let mut name = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `name` has the IF_NAMESIZE bytes if_indextoname writes.
    let found = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
    if found.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into `name`.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    name.to_str().ok().map(str::to_owned)
}

fn pin_name(ifindex: u32) -> String {
    format!("frame-{ifindex}")
}

/// The ifindexes of the frame links pinned in `links_dir`.
fn pinned_frame_links(links_dir: &Path) -> Vec<u32> {
    fs::read_dir(links_dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            entry
                .ok()?
                .file_name()
                .to_str()?
                .strip_prefix("frame-")?
                .parse()
                .ok()
        })
        .collect()
}

fn remove_pin(pin: &Path) -> std::io::Result<()> {
    match fs::remove_file(pin) {
        Err(e) if e.kind() != ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes the frame filters (before tcx) from every interface of this
/// namespace; tcx links go with their pins. Returns the interfaces.
pub fn remove_filters() -> Vec<String> {
    let Ok(interfaces) = nix::net::if_::if_nameindex() else {
        return Vec::new();
    };
    interfaces
        .iter()
        .filter_map(|interface| interface.name().to_str().ok().map(str::to_owned))
        .filter(|name| tc::qdisc_detach_program(name, TcAttachType::Ingress, FRAME_PROGRAM).is_ok())
        .collect()
}
