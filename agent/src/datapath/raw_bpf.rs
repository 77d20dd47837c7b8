//! The bpf syscall for what aya keeps to itself: BPF_LINK_UPDATE on cgroup
//! and tcx links (the kernel swaps the program behind a link in one step, so an
//! upgrade never leaves a connection unjudged or judged twice), and
//! BPF_OBJ_GET and BPF_OBJ_PIN on the link fds its typed links do not hand
//! out, the interface of a tcx link, and a map-of-maps made only to wait
//! for running programs ([`ProgramsBarrier`]).

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `union bpf_attr` for BPF_OBJ_PIN and BPF_OBJ_GET (the fields up to
/// `path_fd`).
#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` for BPF_MAP_CREATE (the fields up to `map_name`).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `union bpf_attr` for BPF_MAP_UPDATE_ELEM.
#[repr(C)]
struct MapUpdateAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for BPF_LINK_UPDATE.
#[repr(C)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// The bpf syscall. Returns the kernel's result (an fd for commands that
/// make one).
///
/// # Safety
/// `attr` is a `#[repr(C)]` prefix of `union bpf_attr` for `command`, every
/// byte initialised (padding fields zero), and the pointers in it stay
/// valid for the call.
pub unsafe fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: as the caller promises; the kernel reads attr and may write
    // its output fields.
    let result = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            std::ptr::from_mut(attr),
            size_of::<T>(),
        )
    };
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Opens a pinned BPF object (here: a link).
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        ..ObjAttr::default()
    };
    // SAFETY: ObjAttr is BPF_OBJ_GET's prefix; the path outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr)? };
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes `link` run `program` from now on, in one step.
pub fn replace_program(link: BorrowedFd<'_>, program: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: program.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: LinkUpdateAttr is BPF_LINK_UPDATE's attr; no pointers.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// `struct bpf_link_info` of `link` as words: type, id, prog_id, then the
/// union, 8-aligned (from word 4), whose member depends on the type.
pub fn link_info(link: BorrowedFd<'_>) -> io::Result<[u32; 16]> {
    let mut info = [0u32; 16];
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: InfoAttr is BPF_OBJ_GET_INFO_BY_FD's attr; the kernel writes
    // at most info_len bytes to `info`, which outlives the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    Ok(info)
}

/// The interface a tcx link is attached to; 0 once the interface is gone
/// (the union's tcx member starts with the ifindex).
pub fn tcx_link_ifindex(link: BorrowedFd<'_>) -> io::Result<u32> {
    const BPF_LINK_TYPE_TCX: u32 = 11;
    let info = link_info(link)?;
    if info[0] != BPF_LINK_TYPE_TCX {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "not a tcx link"));
    }
    Ok(info[4])
}

/// Pins the BPF object behind `fd` (one more pin of the same link).
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = c_path(path)?;
    let mut attr = ObjAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        ..ObjAttr::default()
    };
    // SAFETY: ObjAttr is BPF_OBJ_PIN's prefix; the path outlives the call.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
}

/// Waits until every program that was running has returned. The kernel
/// does exactly that (`synchronize_rcu`) after each update of a map-of-maps
/// element, before the syscall returns (kernel/bpf/syscall.c,
/// `maybe_wait_bpf_programs`), so that its caller knows no program still
/// uses the old value; this array of one map is updated for that wait
/// alone. A program that read a value (a counting half) before the wait
/// has finished with it after.
pub struct ProgramsBarrier {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl ProgramsBarrier {
    pub fn new() -> io::Result<Self> {
        const BPF_MAP_TYPE_ARRAY: u32 = 2;
        const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
        let create = |map_type, inner_map_fd, name: &[u8]| {
            let mut attr = MapCreateAttr {
                map_type,
                key_size: 4,
                value_size: 4,
                max_entries: 1,
                inner_map_fd,
                ..MapCreateAttr::default()
            };
            attr.map_name[..name.len()].copy_from_slice(name);
            // SAFETY: MapCreateAttr is BPF_MAP_CREATE's prefix; no pointers.
            let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr)? };
            // SAFETY: BPF_MAP_CREATE returned a new fd that nothing else owns.
            Ok::<_, io::Error>(unsafe { OwnedFd::from_raw_fd(fd as i32) })
        };
        let inner = create(BPF_MAP_TYPE_ARRAY, 0, b"tg_barrier_in")?;
        let outer = create(
            BPF_MAP_TYPE_ARRAY_OF_MAPS,
            inner.as_raw_fd() as u32,
            b"tg_barrier",
        )?;
        Ok(Self { outer, inner })
    }

    /// Returns once every program running at the call has returned (an RCU
    /// grace period: milliseconds).
    pub fn wait(&self) -> io::Result<()> {
        let key = 0u32;
        let value = self.inner.as_raw_fd() as u32;
        let mut attr = MapUpdateAttr {
            map_fd: self.outer.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(&key) as u64,
            value: std::ptr::from_ref(&value) as u64,
            flags: 0,
        };
        // SAFETY: MapUpdateAttr is BPF_MAP_UPDATE_ELEM's attr; key and
        // value outlive the call.
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
    }
}
