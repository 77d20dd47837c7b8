//! Frame hook cost on pods' TCP and UDP traffic: `tollgate_frame` (the tc
//! ingress program the agent attaches on the node's end of each pod's
//! veth) on one veth pair, against a second pair with no program, in
//! turns. Both pairs join the same two network namespaces of the
//! benchmark's own, a pod's and a node's, on subnets of their own
//! (10.233.<lane>.0/24: the pod's end .1, the node's .2); the load's
//! sender is in the pod's namespace and its receiver in the node's, so
//! what the sender's sockets send enters the node's namespace through the
//! node's end of the pair, where the program runs. Nothing leaves the two
//! namespaces.
//!
//! Frames of inet sockets were judged in the pod already (sock_addr hooks,
//! packet hook), so the program lets them go after two loads and a
//! comparison; what that costs ordinary traffic is what this measures:
//! bulk TCP throughput (64 KiB writes to one connection) and unconnected
//! UDP sendto, in short turns, which side goes first alternating, as the
//! packet hook's comparison does.
//!
//! The kernel's own statistics (`BPF_ENABLE_STATS`) over one more turn give
//! the program's mean run time, and the same turn over a third pair, with a
//! program that only returns 1 attached the same way, the floor to read it
//! against (see bpf_stats.rs). tcx takes a return other than TC_ACT_OK,
//! TC_ACT_SHOT or TC_ACT_REDIRECT as TC_ACT_UNSPEC ("on to what comes
//! next", `tcx_action_code`), so alone on its link that program lets
//! frames go the way `tollgate_frame` does.

use std::{fs::File, net::Ipv4Addr, os::fd::AsFd, path::Path};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType},
    util::KernelVersion,
};
use tollgate_agent::datapath::{FRAME_PROGRAM, raw_bpf};
use tollgate_tests::{TestEnv, sh};

use crate::{
    Netns, Place, Plan, Remote,
    bpf_stats::{alternate, load_object, stats_over},
    load::LoadResult,
    packet_hook::WORKLOADS,
    report::{PacketHookRow, Report},
};

/// Both comparisons, into the report.
pub fn measure(plan: &Plan, report: &mut Report) {
    for row in rows(plan) {
        report.frame_hook(row);
    }
}

/// Both comparisons.
pub fn rows(plan: &Plan) -> Vec<PacketHookRow> {
    // Dropped in reverse: the programs (their links detached), the
    // namespaces (their veths with them), then the cgroup and the bpffs.
    let env = TestEnv::new("framehook");
    let pod = Netns::new("frame-pod");
    let node = Netns::new("frame-node");
    let hooked = Lane::new(&pod, &node, 1, 'h');
    let plain = Lane::new(&pod, &node, 2, 'b');
    let floor_lane = Lane::new(&pod, &node, 3, 'e');
    let hook = FrameHook::attach(&env, &node, &hooked.node_if);
    let empty = EmptyProgram::attach(
        &env.bpffs.mount.join("empty-tc-program"),
        &node,
        &floor_lane,
    );
    // The load's sockets in a cgroup with nothing attached: only the frame
    // hook differs between the lanes.
    let place = Place {
        cgroup: &env.cgroup.path,
        netns: &pod,
    };
    let to = |lane: &Lane| Remote {
        netns: &node,
        addr: lane.node_addr,
    };
    WORKLOADS
        .iter()
        .map(|&workload| {
            eprintln!("tg-bench: {workload:?}: frame hook on the pod's link vs no program");
            let turn = |lane: &Lane, seconds: f64| -> LoadResult {
                crate::load_to(place, Some(to(lane)), workload, seconds, 0)
            };
            let (base, with) = alternate(
                plan.hook_rounds,
                || turn(&plain, plan.hook_seconds),
                || turn(&hooked, plan.hook_seconds),
            );
            let stats = stats_over(|| hook.counts(), || turn(&hooked, plan.seconds));
            let floor = stats_over(|| empty.counts(), || turn(&floor_lane, plan.seconds));
            PacketHookRow::new(workload, &base, &with, stats, floor)
        })
        .collect()
}

/// A veth pair from the pod's namespace to the node's, with addresses on
/// a subnet of its own.
struct Lane {
    /// The node's end, where a frame hook goes.
    node_if: String,
    node_addr: Ipv4Addr,
}

impl Lane {
    /// Made in the namespaces themselves (never in this process's), so
    /// they go with them.
    fn new(pod: &Netns, node: &Netns, index: u8, tag: char) -> Self {
        // At most 3 + 1 + 7 + 1 = 12 characters (interface names: 15).
        let name = |end: char| format!("tgf{tag}{}{end}", std::process::id());
        let (pod_if, node_if) = (name('p'), name('n'));
        sh(
            "ip",
            &[
                "link", "add", &pod_if, "netns", &pod.0, "type", "veth", "peer", "name", &node_if,
                "netns", &node.0,
            ],
        );
        let pod_addr = Ipv4Addr::new(10, 233, index, 1);
        let node_addr = Ipv4Addr::new(10, 233, index, 2);
        for (netns, interface, addr) in [(pod, &pod_if, pod_addr), (node, &node_if, node_addr)] {
            sh(
                "ip",
                &[
                    "-n",
                    &netns.0,
                    "addr",
                    "add",
                    &format!("{addr}/24"),
                    "dev",
                    interface,
                ],
            );
            sh("ip", &["-n", &netns.0, "link", "set", interface, "up"]);
        }
        Self { node_if, node_addr }
    }
}

/// Attaches `program` at tc ingress on `interface` of the namespace
/// `netns`, from a thread that enters it: aya finds the interface by name
/// in the caller's namespace, and the kernel by index. The link it makes
/// is kept by `program`; before tcx (6.6), a cls_bpf filter of a clsact
/// qdisc added for it.
fn attach_in(netns: &Netns, interface: &str, program: &mut SchedClassifier) {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let namespace = File::open(format!("/run/netns/{}", netns.0))
                    .unwrap_or_else(|e| panic!("netns {}: {e}", netns.0));
                nix::sched::setns(namespace.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns");
                if !KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) {
                    sh(
                        "tc",
                        &["-n", &netns.0, "qdisc", "add", "dev", interface, "clsact"],
                    );
                }
                program
                    .attach(interface, TcAttachType::Ingress)
                    .unwrap_or_else(|e| panic!("attaching at tc ingress of {interface}: {e}"));
            })
            .join()
            .expect("the attaching thread");
    });
}

/// The program's run count and run time (ns) so far.
fn counts(program: &SchedClassifier) -> (u64, u64) {
    let info = program.info().expect("the program's info");
    (
        info.run_count(),
        u64::try_from(info.run_time().as_nanos()).unwrap_or(u64::MAX),
    )
}

/// `tollgate_frame` attached alone on a pod's link, the object's maps
/// (created at load, pinned by name) in a private bpffs. The other
/// programs of the object are never loaded, and the pod links map is
/// empty: frames without an inet socket would pass too.
struct FrameHook {
    /// Dropping it closes the program's link, which detaches it.
    ebpf: Ebpf,
}

impl FrameHook {
    fn attach(env: &TestEnv, node: &Netns, interface: &str) -> Self {
        let mut ebpf = load_object(env);
        let program: &mut SchedClassifier = ebpf
            .program_mut(FRAME_PROGRAM)
            .expect("tollgate_frame in the object")
            .try_into()
            .expect("tollgate_frame is a sched_cls program");
        program.load().expect("the verifier accepts tollgate_frame");
        attach_in(node, interface, program);
        Self { ebpf }
    }

    fn counts(&self) -> (u64, u64) {
        counts(
            self.ebpf
                .program(FRAME_PROGRAM)
                .unwrap()
                .try_into()
                .unwrap(),
        )
    }
}

/// A sched_cls program that only returns 1 (`r0 = 1; exit`), loaded with
/// the bpf syscall and taken into aya through a pin (gone once taken), so
/// that it is attached as `tollgate_frame` is: on the node's end of its
/// own lane.
struct EmptyProgram {
    /// Dropping it closes the link, which detaches the program.
    program: SchedClassifier,
}

impl EmptyProgram {
    fn attach(pin: &Path, node: &Netns, lane: &Lane) -> Self {
        const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
        let loaded =
            tollgate_tests::allow_all_program(BPF_PROG_TYPE_SCHED_CLS, 0, *b"tg_bench_tc_nop\0");
        raw_bpf::pin(loaded.as_fd(), pin).expect("pinning the empty program");
        let taken = SchedClassifier::from_pin(pin);
        let _ = std::fs::remove_file(pin);
        let mut program = taken.expect("the empty program from its pin");
        attach_in(node, &lane.node_if, &mut program);
        Self { program }
    }

    fn counts(&self) -> (u64, u64) {
        counts(&self.program)
    }
}
