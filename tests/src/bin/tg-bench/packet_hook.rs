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
//! The kernel's own statistics (`BPF_ENABLE_STATS`, see bpf_stats.rs) give
//! the program's mean run time, over one extra turn of the subject after
//! the compared turns, so the clock reads they add per run do not count in
//! the ratio. What they report includes reading the clock around each run,
//! so the same turn with a program that only returns 1 gives the floor to
//! read the figure against.

use std::fs::File;

use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType},
};
use tollgate_agent::datapath::PACKET_PROGRAM;
use tollgate_tests::{TestCgroup, TestEnv};

use crate::{
    Netns, Place, Plan,
    bpf_stats::{CgroupHook, EmptyPrograms, alternate, load_object, stats_of, stats_over},
    load::Workload,
    report::{PacketHookRow, Report},
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
    let empty = EmptyPrograms::attach("pkthook-empty", [CgroupHook::SKB_EGRESS]);
    let empty_id = empty.id(CgroupHook::SKB_EGRESS).unwrap();
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
            let (_, mut floor) = stats_of(&[empty_id], || {
                crate::load(floor, workload, plan.seconds, 0)
            });
            let floor = floor.pop().unwrap();
            PacketHookRow::new(workload, &base, &with, stats, floor)
        })
        .collect()
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
