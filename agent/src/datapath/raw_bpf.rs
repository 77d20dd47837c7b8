//! The bpf syscall for what aya keeps to itself: BPF_LINK_UPDATE on cgroup
//! and tcx links (the kernel swaps the program behind a link in one step, so an
//! upgrade never leaves a connection unjudged or judged twice), and
//! BPF_OBJ_GET and BPF_OBJ_PIN on the link fds its typed links do not hand
//! out, and the interface of a tcx link.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

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

/// The interface a tcx link is attached to; 0 once the interface is gone
/// (`struct bpf_link_info`: type, id, prog_id, then the union, 8-aligned,
/// whose tcx member starts with the ifindex).
pub fn tcx_link_ifindex(link: BorrowedFd<'_>) -> io::Result<u32> {
    const BPF_LINK_TYPE_TCX: u32 = 11;
    let mut info = [0u32; 16];
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: InfoAttr is BPF_OBJ_GET_INFO_BY_FD's attr; the kernel writes
    // at most info_len bytes to `info`, which outlives the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
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
