//! Packet hook cost on TCP and UDP sockets: `tollgate_packet` (the
//! `cgroup_skb` egress program) attached alone to a cgroup, against a
//! cgroup with nothing attached, in turns, both loads in one network
//! namespace. TCP stream and UDP datagram sockets were judged at connect or
//! sendmsg, so the program lets their packets go after reading the socket's
//! type and protocol; what that costs is what this measures: bulk TCP
//! throughput (64 KiB writes to one connection) and unconnected UDP sendto.
//! The effect is small beside the drift of a shared machine, so the turns
//! are short and many (the plan's `hook_seconds` and `hook_rounds`), and
//! which side goes first alternates.
//!
//! The kernel's own statistics (`BPF_ENABLE_STATS`, what the sysctl
//! `kernel.bpf_stats_enabled` switches) give the program's mean run time.
//! They are on only for one extra turn of the subject after the compared
//! turns, so the clock reads they add per run do not count in the ratio.
//! They are switched on by a file descriptor, not the sysctl: closing it
//! (also when the process dies) switches them back off. What they report
//! includes reading the clock around each run, so the same turn with a
//! program that only returns 1 gives the floor to read the figure against.

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, ProgramInfo},
    sys::{Stats, enable_stats},
};
use tollgate_agent::datapath::{PACKET_PROGRAM, bpf_object, raw_bpf};
use tollgate_tests::{TestCgroup, TestEnv};

use crate::{
    Netns, Place, Plan,
    load::{LoadResult, Workload},
    report::{PacketHookRow, ProgramStats, Report},
};

/// The loads measured, in this order.
pub const WORKLOADS: [Workload; 2] = [Workload::TcpStream, Workload::Udp];

/// Both comparisons, into the report.
pub fn measure(plan: &Plan, report: &mut Report) {
    for row in rows(plan) {
        report.packet_hook(row);
    }
}

/// Both comparisons.
pub fn rows(plan: &Plan) -> Vec<PacketHookRow> {
    // Dropped in reverse: the namespace, the baseline cgroup, the empty
    // program, then the hook (its link detached before its cgroup and
    // bpffs go).
    let hook = PacketHook::attach();
    let empty = EmptyProgram::attach(&hook.env.bpffs.mount.join("empty-program"));
    let outside = TestCgroup::new("pkthook-base");
    let netns = Netns::new("pkthook");
    let baseline = Place {
        cgroup: &outside.path,
        netns: &netns,
    };
    let subject = Place {
        cgroup: &hook.env.cgroup.path,
        netns: &netns,
    };
    let floor = Place {
        cgroup: &empty.cgroup.path,
        netns: &netns,
    };
    WORKLOADS
        .iter()
        .map(|&workload| {
            eprintln!("tg-bench: {workload:?}: packet hook alone vs no program");
            let turn = |place| crate::load(place, workload, plan.hook_seconds, 0);
            let (base, with) = alternate(plan.hook_rounds, || turn(baseline), || turn(subject));
            let stats = stats_over(
                || hook.counts(),
                || crate::load(subject, workload, plan.seconds, 0),
            );
            let floor = stats_over(
                || empty.counts(),
                || crate::load(floor, workload, plan.seconds, 0),
            );
            PacketHookRow::new(workload, &base, &with, stats, floor)
        })
        .collect()
}

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

/// `tollgate_packet` attached alone to a cgroup of its own, the object's
/// maps (created at load, pinned by name) in a private bpffs. The other
/// programs of the object are never loaded.
struct PacketHook {
    /// First to drop: closing the program's link detaches it.
    ebpf: Ebpf,
    /// The cgroup it is attached to, and the bpffs its maps are pinned in
    /// (unmounted on drop).
    env: TestEnv,
}

impl PacketHook {
    fn attach() -> Self {
        let env = TestEnv::new("pkthook");
        let mut ebpf = load_object(&env);
        let program: &mut CgroupSkb = ebpf
            .program_mut(PACKET_PROGRAM)
            .expect("tollgate_packet in the object")
            .try_into()
            .expect("tollgate_packet is a cgroup_skb program");
        program
            .load()
            .expect("the verifier accepts tollgate_packet");
        let cgroup = File::open(&env.cgroup.path).unwrap();
        program
            .attach(
                cgroup,
                CgroupSkbAttachType::Egress,
                CgroupAttachMode::default(),
            )
            .expect("attaching tollgate_packet");
        Self { ebpf, env }
    }

    /// The program's run count and run time (ns) so far.
    fn counts(&self) -> (u64, u64) {
        let program: &CgroupSkb = self
            .ebpf
            .program(PACKET_PROGRAM)
            .unwrap()
            .try_into()
            .unwrap();
        let info = program.info().expect("the program's info");
        (
            info.run_count(),
            u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
        )
    }
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
    let on: OwnedFd = enable_stats(Stats::RunTime).expect("BPF_ENABLE_STATS");
    let (runs_before, ns_before) = counts();
    let result = load();
    let (runs_after, ns_after) = counts();
    drop(on);
    ProgramStats::new(result.ops, runs_after - runs_before, ns_after - ns_before)
}

/// A `cgroup_skb` egress program that only returns 1 (`r0 = 1; exit`),
/// loaded with the bpf syscall (aya loads programs from objects only) and
/// attached to a cgroup of its own.
struct EmptyProgram {
    /// First to drop: closing the link detaches the program.
    _link: OwnedFd,
    _program: OwnedFd,
    /// Its pin in the private bpffs, where aya reads its info from.
    pin: PathBuf,
    cgroup: TestCgroup,
}

/// `union bpf_attr` for BPF_LINK_CREATE, up to `flags`.
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

impl EmptyProgram {
    fn attach(pin: &std::path::Path) -> Self {
        const BPF_LINK_CREATE: libc::c_long = 28;
        const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
        const BPF_CGROUP_INET_EGRESS: u32 = 1;
        let program = tollgate_tests::allow_all_program(
            BPF_PROG_TYPE_CGROUP_SKB,
            BPF_CGROUP_INET_EGRESS,
            *b"tg_bench_empty\0\0",
        );
        raw_bpf::pin(program.as_fd(), pin).expect("pinning the empty program");
        let cgroup = TestCgroup::new("pkthook-empty");
        let cgroup_dir = File::open(&cgroup.path).unwrap();
        let mut attr = LinkCreateAttr {
            prog_fd: program.as_raw_fd() as u32,
            target_fd: cgroup_dir.as_raw_fd() as u32,
            attach_type: BPF_CGROUP_INET_EGRESS,
            flags: 0,
        };
        // SAFETY: LinkCreateAttr is BPF_LINK_CREATE's attr up to flags; no
        // pointers.
        let fd = unsafe { raw_bpf::bpf(BPF_LINK_CREATE, &mut attr) }
            .expect("attaching the empty program");
        // SAFETY: as above.
        let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Self {
            _link: link,
            _program: program,
            pin: pin.to_owned(),
            cgroup,
        }
    }

    /// The program's run count and run time (ns) so far.
    fn counts(&self) -> (u64, u64) {
        let info = ProgramInfo::from_pin(&self.pin).expect("the empty program's info");
        (
            info.run_count(),
            u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
        )
    }
}

impl Drop for EmptyProgram {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pin);
    }
}
