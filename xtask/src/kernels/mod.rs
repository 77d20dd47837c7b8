//! `cargo xtask kernels`: a core set of the root tests inside Debian's older
//! kernels (6.1 from bookworm, 5.10 from bullseye), booted with qemu in
//! software emulation. The guest sees the host's root read-only over
//! virtio-fs, so it runs the very test executables and tools of this build.
//!
//! image.rs fetches a kernel and builds its initramfs (cached under
//! target/kernels), guest.rs boots it and collects the console, report.rs
//! turns the console into the report.

mod guest;
mod image;
mod report;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// A Debian kernel of the matrix: `name` as `--kernel` takes it, `suite`
/// the Debian release whose linux-image-cloud-amd64 provides it.
pub struct Kernel {
    pub name: &'static str,
    pub suite: &'static str,
}

pub const KERNELS: [Kernel; 2] = [
    Kernel {
        name: "6.1",
        suite: "bookworm",
    },
    Kernel {
        name: "5.10",
        suite: "bullseye",
    },
];

/// A root test of the tollgate-tests package: its integration test target
/// (tests/tests/<target>.rs) and its name there.
struct CoreTest {
    target: &'static str,
    name: &'static str,
}

/// What every kernel runs. Software emulation makes a test some ten times
/// slower than on the host, so this is one test per thing an old kernel can
/// break, not the suite.
const CORE_TESTS: [CoreTest; 16] = [
    // Every program loads and the verifier's work stays within budget.
    CoreTest {
        target: "fqdn",
        name: "every_program_verifies_well_inside_the_budget",
    },
    // The ingress program reads headers in place (direct packet access) and
    // leaves early by the trusted resolvers' ports.
    CoreTest {
        target: "fqdn",
        name: "a_resolver_on_another_port_is_trusted_on_that_port_alone",
    },
    // connect4 denies with EPERM and a rule allows.
    CoreTest {
        target: "datapath",
        name: "tcp_connect_is_denied_with_eperm_and_allowed_by_rule",
    },
    // sendmsg4/6 judge unconnected UDP.
    CoreTest {
        target: "datapath",
        name: "unconnected_udp_sendto_is_denied",
    },
    // connect6 reads user_ip6 word by word and maps ::ffff:a.b.c.d to IPv4.
    CoreTest {
        target: "datapath",
        name: "ipv4_mapped_ipv6_destinations_are_judged_as_ipv4",
    },
    // The packet hook reads skb->sk and bpf_sk_fullsock (5.1+) and judges
    // raw sockets by their own headers, IPv6 included.
    CoreTest {
        target: "datapath",
        name: "raw_sockets_reach_only_what_policy_allows",
    },
    // ICMP echo sockets, and what the kernel tells their sender.
    CoreTest {
        target: "datapath",
        name: "icmp_echo_sockets_reach_only_what_policy_allows",
    },
    // Audit mode and the event ring buffer (5.8+) to the agent.
    CoreTest {
        target: "datapath",
        name: "observe_mode_lets_denied_connections_through_as_audit",
    },
    // The DNS ingress program learns a name from a dnsmasq answer; the
    // cheapest test that shows it (one agent, one name) and its TTL.
    CoreTest {
        target: "fqdn",
        name: "learned_addresses_expire_with_their_ttl",
    },
    // Pinned links keep enforcing without the agent, and a restart
    // takes them over.
    CoreTest {
        target: "agent",
        name: "enforcement_holds_while_the_agent_is_killed_and_after_it_restarts",
    },
    // Detaching and unpinning leave nothing behind.
    CoreTest {
        target: "agent",
        name: "cleanup_detaches_and_removes_every_pin",
    },
    // An answer is bound to its query: the sock_addr hooks note the socket
    // (bpf_get_netns_cookie, 5.7), the packet hook records the question.
    CoreTest {
        target: "fqdn",
        name: "answers_from_a_network_namespace_of_the_endpoints_own_teach_nothing",
    },
    // The frame hook on a pod's link: skb->sk across the veth (inet frames
    // pass, packet sockets' are judged), cls_bpf before 6.6, tcx after.
    CoreTest {
        target: "pods",
        name: "a_pods_packet_sockets_reach_no_denied_destination",
    },
    // Per-rule hit counts: the per-CPU slot by rule id, exact by verdict,
    // across a switch and a restart, readable from the pin.
    CoreTest {
        target: "rules",
        name: "rules_count_their_hits_exactly_across_switches_and_restarts",
    },
    // Allowed flows counted in the kernel: the insert with BPF_NOEXIST and
    // the atomic add in the programs, the wait for running programs (a
    // map-of-maps update) in the agent, exact across switches and restarts.
    CoreTest {
        target: "agent",
        name: "kernel_counted_allowed_connections_are_each_reported_once",
    },
    // A refused DNS parser: the agent still enforces, says so, and learns
    // names through the fallback program.
    CoreTest {
        target: "fqdn",
        name: "a_refused_dns_parser_degrades_to_learning_in_the_agent_and_says_so",
    },
];

/// A test that cannot work on `kernel` only because that kernel lacks
/// `feature` (named with the version and commit that added it).
struct Skip {
    kernel: &'static str,
    target: &'static str,
    name: &'static str,
    feature: &'static str,
}

/// The verifier budget test checks the instruction count only where the
/// kernel reports it, from 5.16 on, and that every program loads
/// everywhere.
const SKIPS: [Skip; 2] = [
    Skip {
        kernel: "5.10",
        target: "fqdn",
        name: "answers_from_a_network_namespace_of_the_endpoints_own_teach_nothing",
        feature: "SO_NETNS_COOKIE (5.14): the agent cannot learn the host's namespace cookie, so the namespace check is off \
                  (loopback answers from non-loopback resolvers are refused instead)",
    },
    Skip {
        kernel: "5.10",
        target: "pods",
        name: "a_pods_packet_sockets_reach_no_denied_destination",
        feature: "memcg accounting of BPF maps (5.11): before it maps are charged to RLIMIT_MEMLOCK, and with the \
                  DaemonSet's capabilities (this test's) the agent cannot create its maps; AKS kernels are 5.15 or later",
    },
];

/// One test the guest runs, or that the report lists as skipped.
pub struct PlannedTest {
    /// `<target>::<name>`, as the report shows it.
    pub label: String,
    pub executable: PathBuf,
    pub name: String,
    pub skipped: Option<&'static str>,
}

pub fn kernels(root: &Path, names: &[String], filters: &[String]) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("booting the kernels and the root tests in them need root");
    }
    let selected: Vec<&Kernel> = if names.is_empty() {
        KERNELS.iter().collect()
    } else {
        names
            .iter()
            .map(|name| {
                KERNELS
                    .iter()
                    .find(|k| k.name == name)
                    .with_context(|| format!("no kernel {name} in the matrix"))
            })
            .collect::<anyhow::Result<_>>()?
    };
    install_host_packages()?;
    crate::build(root, false)?;
    let executables = test_executables(root)?;
    let tests = core_and_filtered(&executables, filters)?;
    let agent = root.join("target/debug/tollgate-agent");

    let mut reports = Vec::new();
    for kernel in selected {
        let started = std::time::Instant::now();
        let image = image::prepare(root, kernel)?;
        eprintln!(
            "[kernels] {} ready in {:.1} s; booting",
            image.release,
            started.elapsed().as_secs_f64()
        );
        let dir = root.join("target/kernels").join(kernel.name);
        let plan: Vec<PlannedTest> = tests
            .iter()
            .map(|(target, name)| PlannedTest {
                label: format!("{target}::{name}"),
                executable: executables[target].clone(),
                name: name.clone(),
                skipped: SKIPS
                    .iter()
                    .find(|s| s.kernel == kernel.name && s.target == target && s.name == name)
                    .map(|s| s.feature),
            })
            .collect();
        let plan_file = dir.join("plan");
        let lines: String =
            plan.iter()
                .filter(|t| t.skipped.is_none())
                .fold(String::new(), |mut out, t| {
                    let _ = writeln!(out, "{}\t{}\t{}", t.label, t.executable.display(), t.name);
                    out
                });
        std::fs::write(&plan_file, lines)?;
        let console = guest::boot(
            &image,
            &dir,
            &[
                ("TGK_ROOT", root),
                ("TGK_GUEST", &root.join("scripts/kernels-guest.sh")),
                ("TGK_PLAN", &plan_file),
                ("TGK_AGENT", &agent),
            ],
        )?;
        reports.push(report::KernelReport::new(kernel.name, &plan, &console));
    }
    report::finish(&root.join("target/kernels"), &reports)
}

/// What the host needs: qemu (with virtiofsd), a static busybox, cpio and
/// kmod for the initramfs. Not in setup.sh: the normal test path needs none
/// of it.
const HOST_PACKAGES: [&str; 4] = ["qemu-system-x86", "busybox-static", "cpio", "kmod"];

fn install_host_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .into_iter()
        .filter(|package| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", package])
                .output()
                .is_ok_and(|o| !String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("[kernels] installing {}", missing.join(" "));
    // Another apt (setup.sh, a person) may hold the lock for a while.
    let apt_get = || {
        let mut command = Command::new("apt-get");
        command.env("DEBIAN_FRONTEND", "noninteractive").args([
            "-qq",
            "-o",
            "DPkg::Lock::Timeout=600",
        ]);
        command
    };
    crate::run(apt_get().arg("update"))?;
    crate::run(
        apt_get()
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
}

/// The integration test executables of tollgate-tests by target name, from
/// cargo's build messages (the same build `cargo xtask test` makes).
fn test_executables(root: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let output = Command::new("cargo")
        .current_dir(root)
        .args(["test", "--workspace", "--no-run", "--message-format=json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the tests")?;
    if !output.status.success() {
        bail!("building the tests failed: {}", output.status);
    }
    let manifest = root.join("tests/Cargo.toml");
    let mut executables = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let message: serde_json::Value = serde_json::from_str(line)?;
        let target = &message["target"];
        if message["reason"] == "compiler-artifact"
            && message["manifest_path"].as_str() == manifest.to_str()
            && target["kind"] == serde_json::json!(["test"])
            && let (Some(name), Some(executable)) =
                (target["name"].as_str(), message["executable"].as_str())
        {
            executables.insert(name.to_owned(), PathBuf::from(executable));
        }
    }
    Ok(executables)
}

/// The core set, then every other test whose name contains one of
/// `filters` (as libtest matches them), as (target, name). Every core test
/// must exist: libtest runs no test for an unknown `--exact` name and
/// passes.
fn core_and_filtered(
    executables: &BTreeMap<String, PathBuf>,
    filters: &[String],
) -> anyhow::Result<Vec<(String, String)>> {
    let mut all = Vec::new();
    for (target, executable) in executables {
        let output = Command::new(executable)
            .args(["--list", "--include-ignored", "--format", "terse"])
            .output()
            .with_context(|| format!("listing the tests of {}", executable.display()))?;
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            if let Some(name) = line.strip_suffix(": test") {
                all.push((target.clone(), name.to_owned()));
            }
        }
    }
    let mut tests = Vec::new();
    for core in &CORE_TESTS {
        let test = (core.target.to_owned(), core.name.to_owned());
        if !all.contains(&test) {
            bail!("no test {}::{} in tollgate-tests", core.target, core.name);
        }
        tests.push(test);
    }
    for test in all {
        if filters.iter().any(|f| test.1.contains(f.as_str())) && !tests.contains(&test) {
            tests.push(test);
        }
    }
    Ok(tests)
}
