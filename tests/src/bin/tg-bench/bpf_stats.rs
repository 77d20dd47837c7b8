//! What the comparisons that read the kernel's own figures share: turns of
//! a baseline and a subject that alternate, the kernel's run-time
//! statistics of programs over one turn, and programs that only return 1,
//! attached to a cgroup of their own, whose statistics over the same load
//! are the floor to read a program's against.
//!
//! The statistics (`BPF_ENABLE_STATS`, what the sysctl
//! `kernel.bpf_stats_enabled` switches) are on only for the turns that read
//! them, so the clock reads they add per run do not count in the compared
//! turns. They are switched on by a file descriptor, not the sysctl:
//! closing it (also when the process dies) switches them back off. What
//! they report includes reading the clock around each run, hence the
//! floor.

use std::{
    collections::HashMap,
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::loaded_programs,
    sys::{Stats, enable_stats},
};
use tollgate_agent::datapath::{bpf_object, raw_bpf};
use tollgate_tests::{TestCgroup, TestEnv};

use crate::{load::LoadResult, report::ProgramStats};

/// `rounds` rounds of a turn of the baseline and one of the subject, each
/// side's results in the order run. Which side goes first alternates, so
/// that neither always runs just after the other.
pub fn alternate(
    rounds: usize,
    mut baseline: impl FnMut() -> LoadResult,
    mut subject: impl FnMut() -> LoadResult,
) -> (Vec<LoadResult>, Vec<LoadResult>) {
    let mut base = Vec::with_capacity(rounds);
    let mut with = Vec::with_capacity(rounds);
    for round in 0..rounds {
        if round % 2 == 0 {
            base.push(baseline());
            with.push(subject());
        } else {
            with.push(subject());
            base.push(baseline());
        }
    }
    (base, with)
}

/// The BPF object, its maps created (and pinned by name) in `env`'s
/// private bpffs; no program loaded yet.
pub fn load_object(env: &TestEnv) -> Ebpf {
    assert!(
        !bpf_object().is_empty(),
        "no BPF object embedded: build it with `cargo xtask build`"
    );
    let maps = env.bpffs.root().join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    EbpfLoader::new()
        .default_map_pin_directory(&maps)
        .load(bpf_object())
        .expect("the BPF object's maps")
}

/// Runs `load` with the kernel's run-time statistics on, and returns what
/// `counts` (a program's run count and run time) grew by over it.
pub fn stats_over(
    counts: impl Fn() -> (u64, u64),
    load: impl FnOnce() -> LoadResult,
) -> ProgramStats {
    let (_, mut stats) = stats_of_many(|| vec![counts()], load);
    stats.pop().expect("one program's")
}

/// Runs `load` with the kernel's run-time statistics on; its result, and
/// for each program of `ids`, in order, what it ran over it.
pub fn stats_of(ids: &[u32], load: impl FnOnce() -> LoadResult) -> (LoadResult, Vec<ProgramStats>) {
    stats_of_many(
        || {
            let all = counts_by_id();
            ids.iter()
                .map(|id| all.get(id).copied().unwrap_or_default())
                .collect()
        },
        load,
    )
}

/// [`stats_of`] with the programs' counts read by `counts`.
fn stats_of_many(
    counts: impl Fn() -> Vec<(u64, u64)>,
    load: impl FnOnce() -> LoadResult,
) -> (LoadResult, Vec<ProgramStats>) {
    let on: OwnedFd = enable_stats(Stats::RunTime).expect("BPF_ENABLE_STATS");
    let before = counts();
    let result = load();
    let after = counts();
    drop(on);
    let stats = before
        .iter()
        .zip(&after)
        .map(|(&(runs_before, ns_before), &(runs_after, ns_after))| {
            ProgramStats::new(
                result.ops,
                runs_after.saturating_sub(runs_before),
                ns_after.saturating_sub(ns_before),
            )
        })
        .collect();
    (result, stats)
}

/// The run count and run time (ns) so far of every program loaded on the
/// host, by id.
fn counts_by_id() -> HashMap<u32, (u64, u64)> {
    loaded_programs()
        .filter_map(Result::ok)
        .map(|info| {
            (
                info.id(),
                (
                    info.run_count(),
                    u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
                ),
            )
        })
        .collect()
}

/// A cgroup hook: the program type it takes and its attach type (the
/// kernel's numbers, `enum bpf_prog_type` and `enum bpf_attach_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct CgroupHook {
    pub prog_type: u32,
    pub attach_type: u32,
}

impl CgroupHook {
    /// `cgroup_skb` egress, where the packet hook runs.
    pub const SKB_EGRESS: Self = Self {
        prog_type: 8,
        attach_type: 1,
    };
}

/// A program attached to a cgroup by a link pinned in a bpffs.
#[derive(Clone, Debug)]
pub struct PinnedProgram {
    /// The link's pin's file name (the agent names them after the program
    /// that serves the hook best, e.g. `tollgate_connect4`).
    pub name: String,
    pub id: u32,
    pub hook: CgroupHook,
}

/// The programs behind the cgroup links pinned in `links_dir` (the
/// agent's: `<pin dir>/links`), by name. Other links are left out.
pub fn pinned_cgroup_programs(links_dir: &Path) -> Vec<PinnedProgram> {
    let types: HashMap<u32, u32> = loaded_programs()
        .filter_map(Result::ok)
        .map(|info| (info.id(), info.program_type() as u32))
        .collect();
    let mut programs: Vec<PinnedProgram> = std::fs::read_dir(links_dir)
        .map(|entries| entries.flatten().collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|entry| {
            let link = raw_bpf::open_pinned(&entry.path()).ok()?;
            let info = cgroup_link_info(link.as_fd()).ok()?;
            Some(PinnedProgram {
                name: entry.file_name().to_string_lossy().into_owned(),
                id: info.prog_id,
                hook: CgroupHook {
                    prog_type: *types.get(&info.prog_id)?,
                    attach_type: info.attach_type,
                },
            })
        })
        .collect();
    programs.sort_by(|a, b| a.name.cmp(&b.name));
    programs
}

/// What the kernel tells of a cgroup link.
struct CgroupLinkInfo {
    prog_id: u32,
    attach_type: u32,
}

/// The program and attach type of a cgroup link (`struct bpf_link_info`:
/// the union's cgroup member is the cgroup's id, u64, then the attach type).
fn cgroup_link_info(link: BorrowedFd<'_>) -> io::Result<CgroupLinkInfo> {
    const BPF_LINK_TYPE_CGROUP: u32 = 3;
    let info = raw_bpf::link_info(link)?;
    if info[0] != BPF_LINK_TYPE_CGROUP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a cgroup link",
        ));
    }
    Ok(CgroupLinkInfo {
        prog_id: info[2],
        attach_type: info[6],
    })
}

/// Programs that only return 1 (`r0 = 1; exit`), one on each of some
/// cgroup hooks, attached (by links) to a cgroup of their own; loaded with
/// the bpf syscall (aya loads programs from objects only).
pub struct EmptyPrograms {
    /// First to drop: closing a link detaches its program.
    links: Vec<OwnedFd>,
    /// Each hook's program, and its id.
    programs: Vec<(CgroupHook, u32, OwnedFd)>,
    pub cgroup: TestCgroup,
}

/// `union bpf_attr` for BPF_LINK_CREATE, up to `flags`.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

impl EmptyPrograms {
    /// One program on each of `hooks` (each once), in a new cgroup named
    /// after `name` (unique per process).
    pub fn attach(name: &str, hooks: impl IntoIterator<Item = CgroupHook>) -> Self {
        const BPF_LINK_CREATE: libc::c_long = 28;
        let cgroup = TestCgroup::new(name);
        let mut empty = Self {
            links: Vec::new(),
            programs: Vec::new(),
            cgroup,
        };
        let cgroup_dir = File::open(&empty.cgroup.path).unwrap();
        for hook in hooks {
            if empty.programs.iter().any(|(h, ..)| *h == hook) {
                continue;
            }
            let program = tollgate_tests::allow_all_program(
                hook.prog_type,
                hook.attach_type,
                *b"tg_bench_empty\0\0",
            );
            let mut attr = LinkCreateAttr {
                prog_fd: program.as_raw_fd() as u32,
                target_fd: cgroup_dir.as_raw_fd() as u32,
                attach_type: hook.attach_type,
                flags: 0,
            };
            // SAFETY: LinkCreateAttr is BPF_LINK_CREATE's attr up to flags;
            // no pointers.
            let fd = unsafe { raw_bpf::bpf(BPF_LINK_CREATE, &mut attr) }
                .unwrap_or_else(|e| panic!("attaching an empty program to {hook:?}: {e}"));
            // SAFETY: a new fd from the kernel, owned by nothing else.
            let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            let id = cgroup_link_info(link.as_fd())
                .expect("the empty program's link")
                .prog_id;
            empty.links.push(link);
            empty.programs.push((hook, id, program));
        }
        empty
    }

    /// The id of the program on `hook`, if it has one.
    pub fn id(&self, hook: CgroupHook) -> Option<u32> {
        self.programs
            .iter()
            .find(|(h, ..)| *h == hook)
            .map(|(_, id, _)| *id)
    }
}

/// CPU time (ns) the process `pid` has used so far, all its threads.
pub fn process_cpu_ns(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}
