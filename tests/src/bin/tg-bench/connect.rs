//! Connect and sendto cost: nothing, Tollgate (observe, enforce at each
//! size, a destination allowed by a learned name, enforce with
//! `--allowed-flows first`), nftables sets and iptables chains of the same
//! rules, and the floor: programs that only return 1 on the same hooks.
//!
//! Each row is many rounds of one short turn of the baseline and one of
//! the subject, which side goes first alternating (as the packet hook's
//! comparison does): the drift of a shared machine moves both turns of a
//! round alike, and the median round is what the targets judge, so that a
//! row does not flip between runs on a few bad turns.
//!
//! Tollgate's rows also take one more turn of the subject with the
//! kernel's run-time statistics on (bpf_stats.rs): every program of the
//! agent's pinned links that ran in it, and beside each, a program that
//! only returns 1 on the same hook, attached alone to a cgroup of its own,
//! over a turn of the same load.

use tollgate_tests::{AgentProcess, TempFile, TestCgroup, TestEnv};

use crate::{
    Netns, Place, Plan,
    bpf_stats::{
        EmptyPrograms, PinnedProgram, alternate, pinned_cgroup_programs, process_cpu_ns, stats_of,
    },
    learned,
    load::{LoadResult, Workload},
    report::{ConnectRow, HookCost, ProgramCosts, Report},
    rules,
};

/// The subjects, as the report names their rows.
pub const OBSERVE: &str = "Tollgate observe";
pub const ENFORCE: &str = "Tollgate enforce";
pub const FIRST: &str = "Tollgate enforce, allowed-flows first";
pub const NFTABLES: &str = "nftables set";
pub const IPTABLES: &str = "iptables chain";
/// Programs that only return 1 on every hook the agent attaches to: what
/// any design with these hooks costs before it decides anything.
pub const EMPTY: &str = "empty programs on Tollgate's hooks";

/// Every row, into the report.
pub fn measure(plan: &Plan, report: &mut Report) {
    // Dropped in reverse: the empty programs (declared below), the
    // namespaces, the baseline cgroup, then the agent's cgroup and bpffs.
    let env = TestEnv::new("bench");
    let outside = TestCgroup::new("bench-base");
    let plain = Netns::new("plain");
    let nft = Netns::new("nft");
    let ipt = Netns::new("ipt");
    let glob = env.cgroup.relative.clone();
    let baseline = Place {
        cgroup: &outside.path,
        netns: &plain,
    };
    let tollgate = Place {
        cgroup: &env.cgroup.path,
        netns: &plain,
    };
    let largest = plan.sizes.iter().copied().max().unwrap_or(0);
    let all_prefixes = rules::prefixes(largest.max(100));
    let policy_file = |mode: &str, n: usize| {
        TempFile::new(
            &format!("bench-{mode}-{n}.yaml"),
            &rules::policy("bench", &glob, mode, &all_prefixes[..n]),
        )
    };
    let links = env.datapath_options().pin_dir().join("links");

    let first = policy_file("observe", 100);
    let agent = AgentProcess::start(&env, &["--policy", first.path.to_str().unwrap()]);
    let programs = pinned_cgroup_programs(&links);
    assert!(
        !programs.is_empty(),
        "no cgroup links of the agent's in {}",
        links.display()
    );
    let floor = EmptyPrograms::attach("bench-floor", programs.iter().map(|p| p.hook));
    let subject = Subject {
        plan,
        baseline,
        place: tollgate,
        floor: &floor,
        floor_place: Place {
            cgroup: &floor.cgroup.path,
            netns: &plain,
        },
    };
    for workload in [Workload::Tcp, Workload::Udp] {
        eprintln!("tg-bench: {workload:?}: Tollgate observe, 100 rules");
        env.ctl(&["apply", "-f", first.path.to_str().unwrap()]).ok();
        report.connect(subject.tollgate(workload, OBSERVE, 100, &agent, &programs));
        eprintln!("tg-bench: {workload:?}: empty programs on the same hooks");
        report.connect(subject.other(workload, EMPTY, 0, subject.floor_place));
        for &n in &plan.sizes {
            eprintln!("tg-bench: {workload:?}: Tollgate enforce, {n} rules");
            let file = policy_file("enforce", n);
            env.ctl(&["apply", "-f", file.path.to_str().unwrap()]).ok();
            report.connect(subject.tollgate(workload, ENFORCE, n, &agent, &programs));
        }
        for &n in &plan.sizes {
            eprintln!("tg-bench: {workload:?}: nftables set, {n} rules");
            nft.exec("nft", &["-f", "-"], "flush ruleset\n");
            nft.exec("nft", &["-f", "-"], &rules::nftables(&all_prefixes[..n]));
            let place = Place {
                cgroup: &outside.path,
                netns: &nft,
            };
            report.connect(subject.other(workload, NFTABLES, n, place));
            eprintln!("tg-bench: {workload:?}: iptables chain, {n} rules");
            ipt.exec(
                "iptables-restore",
                &[],
                &rules::iptables(&all_prefixes[..n]),
            );
            let place = Place {
                cgroup: &outside.path,
                netns: &ipt,
            };
            report.connect(subject.other(workload, IPTABLES, n, place));
        }
    }
    drop(agent);

    // Loopback allowed by a name rule, with 1k addresses learned for it.
    let by_name = TempFile::new(
        "bench-by-name.yaml",
        &rules::policy_by_name("bench", &glob, &all_prefixes[..100]),
    );
    let agent = AgentProcess::start(&env, &["--policy", by_name.path.to_str().unwrap()]);
    let programs = pinned_cgroup_programs(&links);
    learned::install(&env, learned::LEARNED_IN_COMPARISON);
    for workload in [Workload::Tcp, Workload::Udp] {
        eprintln!("tg-bench: {workload:?}: Tollgate enforce, 100 rules, loopback by name");
        report.connect(subject.tollgate(workload, learned::SUBJECT, 100, &agent, &programs));
    }
    drop(agent);

    // The same rules with the other way of reporting allowed flows, beside
    // the default's row at that size.
    let n = plan.sizes[plan.sizes.len().min(3) - 1];
    let file = policy_file("enforce", n);
    let agent = AgentProcess::start(
        &env,
        &[
            "--policy",
            file.path.to_str().unwrap(),
            "--allowed-flows",
            "first",
        ],
    );
    let programs = pinned_cgroup_programs(&links);
    for workload in [Workload::Tcp, Workload::Udp] {
        eprintln!("tg-bench: {workload:?}: Tollgate enforce, --allowed-flows first, {n} rules");
        report.connect(subject.tollgate(workload, FIRST, n, &agent, &programs));
    }
    drop(agent);
    drop(floor);
    env.cleanup_pins();
}

/// How a row is measured, and where its loads run.
struct Subject<'a> {
    plan: &'a Plan,
    baseline: Place<'a>,
    /// Where Tollgate's subject runs: the agent's cgroup.
    place: Place<'a>,
    /// Empty programs on the agent's hooks, and where their load runs.
    floor: &'a EmptyPrograms,
    floor_place: Place<'a>,
}

impl Subject<'_> {
    /// The subject at `place` against the baseline, in rounds.
    fn turns(&self, workload: Workload, place: Place) -> (Vec<LoadResult>, Vec<LoadResult>) {
        let turn = |place| crate::load(place, workload, self.plan.connect_seconds, 0);
        alternate(
            self.plan.connect_rounds,
            || turn(self.baseline),
            || turn(place),
        )
    }

    /// A row of another subject than Tollgate (its rules in the
    /// namespace of `place`).
    fn other(
        &self,
        workload: Workload,
        subject: &'static str,
        rules: usize,
        place: Place,
    ) -> ConnectRow {
        let (base, with) = self.turns(workload, place);
        ConnectRow::new(workload, subject, rules, &base, &with, None)
    }

    /// A row of Tollgate as `agent` runs it now, with its programs' time.
    fn tollgate(
        &self,
        workload: Workload,
        subject: &'static str,
        rules: usize,
        agent: &AgentProcess,
        programs: &[PinnedProgram],
    ) -> ConnectRow {
        let (base, with) = self.turns(workload, self.place);
        let costs = self.program_costs(workload, agent, programs);
        ConnectRow::new(workload, subject, rules, &base, &with, Some(costs))
    }

    /// One turn of the subject with the kernel's statistics on, over the
    /// agent's `programs`, then one of the same load over the empty
    /// programs on the hooks of those that ran.
    fn program_costs(
        &self,
        workload: Workload,
        agent: &AgentProcess,
        programs: &[PinnedProgram],
    ) -> ProgramCosts {
        let seconds = self.plan.seconds;
        let ids: Vec<u32> = programs.iter().map(|p| p.id).collect();
        let cpu_before = process_cpu_ns(agent.pid());
        let (result, stats) = stats_of(&ids, || crate::load(self.place, workload, seconds, 0));
        let agent_cpu_ns = process_cpu_ns(agent.pid()).saturating_sub(cpu_before);
        let ran: Vec<_> = programs
            .iter()
            .zip(stats)
            .filter(|(_, stats)| stats.runs > 0)
            .collect();
        let floor_ids: Vec<u32> = ran
            .iter()
            .filter_map(|(p, _)| self.floor.id(p.hook))
            .collect();
        let (_, floor_stats) = stats_of(&floor_ids, || {
            crate::load(self.floor_place, workload, seconds, 0)
        });
        let ops = result.ops.max(1) as f64;
        ProgramCosts {
            programs: ran
                .into_iter()
                .map(|(p, stats)| HookCost {
                    program: p.name.clone(),
                    hook: p.hook,
                    stats,
                    empty_program: self
                        .floor
                        .id(p.hook)
                        .and_then(|id| floor_ids.iter().position(|f| *f == id))
                        .map(|i| floor_stats[i].clone()),
                    previous_ns_per_run: None,
                })
                .collect(),
            op_ns: result.seconds * 1e9 / ops,
            agent_cpu_ns_per_op: agent_cpu_ns as f64 / ops,
            turn_seconds: result.seconds,
        }
    }
}
