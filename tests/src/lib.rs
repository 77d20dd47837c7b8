//! Harness for the root integration tests.
//!
//! Each test owns a [`TestEnv`]: its own cgroup (where its client processes
//! run and where the programs attach), its own private bpffs mount (where the
//! pins go), and its own network namespaces with veth test hosts (where every
//! connection goes, allowed or not). Dropping the environment removes all of
//! it, also when the test panics.

pub mod kube;
pub mod node;
pub mod receiver;
pub mod rsyslog;

use std::{
    io::{BufRead, BufReader},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tollgate_agent::{
    cgroups,
    datapath::{Datapath, DatapathOptions, Event, EventReader},
    mounts,
};
use tollgate_common::FlowEvent;

/// A binary of the workspace, built beside the test binaries by
/// `cargo xtask test` (target/<profile>/deps/<test> -> target/<profile>/<name>).
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // Test binaries live in <profile>/deps, tg-bench in <profile>.
    let dir = exe.parent().expect("target dir");
    let dir = if dir.ends_with("deps") {
        dir.parent().expect("profile dir")
    } else {
        dir
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo xtask test`",
        path.display()
    );
    path
}

pub fn agent_binary() -> PathBuf {
    workspace_binary("tollgate-agent")
}

/// The probe client/server (src/bin/tg-probe.rs).
pub fn probe_binary() -> PathBuf {
    workspace_binary("tg-probe")
}

/// Runs a command that must succeed.
pub fn sh(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A cgroup of the test's own, removed on drop after its processes are killed.
pub struct TestCgroup {
    pub path: PathBuf,
    pub id: u64,
    /// Path relative to the cgroup2 mount, as flow records show it.
    pub relative: String,
}

impl TestCgroup {
    /// A cgroup directly below the cgroup2 mount, removed on drop.
    pub fn new(name: &str) -> Self {
        let mount = mounts::cgroup2_mount(None).expect("cgroup2 is mounted");
        let relative = format!("/tgtest-{name}-{}", std::process::id());
        let path = mount.join(&relative[1..]);
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        let id = cgroups::cgroup_id(&path).unwrap();
        Self { path, id, relative }
    }
}

impl TestCgroup {
    /// Makes a cgroup (and its parents) below this one, removed with it.
    pub fn child(&self, name: &str) -> PathBuf {
        let path = self.path.join(name);
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        path
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Probes exit on their own; a leftover from a failed test is killed.
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        // Children first: a cgroup with children cannot be removed.
        let mut dirs = vec![self.path.clone()];
        let mut i = 0;
        while i < dirs.len() {
            if let Ok(entries) = std::fs::read_dir(&dirs[i]) {
                dirs.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
            i += 1;
        }
        for dir in dirs.iter().rev() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A host policy for cgroups matching `cgroup_glob`: allows `host`:8080/TCP
/// (rule "web") and denies the rest. `mode` may be empty (the global mode).
pub fn host_policy(name: &str, cgroup_glob: &str, mode: &str, host: Ipv4Addr) -> String {
    format!(
        "apiVersion: policy.tollgate.dev/v1alpha1
kind: EgressPolicy
metadata:
  name: {name}
spec:
  cgroupSelector:
    paths: [\"{cgroup_glob}\"]
  mode: \"{mode}\"
  egress:
  - name: web
    to: [{{cidr: {host}/32}}]
    ports: [{{port: 8080, protocol: TCP}}]
"
    )
}

/// A probe result for "the DNS answer had no address" (not an errno).
pub const NO_ADDRESS: i32 = -1;

/// A file of the test's own, removed on drop.
#[must_use]
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(name: &str, contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!("tollgate-{name}-{}", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        Self { path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The capabilities deploy/daemonset.yaml adds for the agent (its
/// container's `capabilities.add`), as setpriv names them: `+bpf,...`.
pub fn daemonset_capabilities() -> String {
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml"),
    )
    .expect("deploy/daemonset.yaml");
    let list = manifest
        .lines()
        .find_map(|line| line.trim().strip_prefix("add: ["))
        .and_then(|rest| rest.strip_suffix(']'))
        .expect("the DaemonSet adds capabilities in one `add: [...]` line");
    list.split(',')
        .map(|cap| format!("+{}", cap.trim().trim_matches('"').to_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

/// A `setpriv` command line that leaves the command it runs exactly the
/// capabilities `caps` (`+bpf,+net_admin`), for [`AgentProcess::try_start_under`].
pub fn with_only_capabilities(caps: &str) -> Vec<String> {
    let set = format!("-all,{caps}");
    [
        "setpriv",
        "--bounding-set",
        &set,
        "--inh-caps",
        &set,
        "--ambient-caps",
        &set,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// A bpffs instance mounted for one test, so its pins never touch the host's.
pub struct PrivateBpffs {
    pub mount: PathBuf,
}

impl PrivateBpffs {
    fn new(name: &str) -> Self {
        let mount = PathBuf::from(format!("/run/tollgate-tests/{name}-{}", std::process::id()));
        std::fs::create_dir_all(&mount).unwrap();
        sh("mount", &["-t", "bpf", "bpf", mount.to_str().unwrap()]);
        Self { mount }
    }

    /// The agent's `--bpffs-root` inside this mount.
    pub fn root(&self) -> PathBuf {
        self.mount.join("tollgate")
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        // Removing the pins first detaches the links at once.
        let _ = tollgate_agent::datapath::cleanup(&self.root());
        let _ = Command::new("umount").arg(&self.mount).status();
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_dir("/run/tollgate-tests");
    }
}

/// A named network namespace of a test's own (`ip netns add`), removed on
/// drop.
pub struct TestNetns {
    pub name: String,
}

impl TestNetns {
    pub fn new(name: &str) -> Self {
        sh("ip", &["netns", "add", name]);
        Self { name: name.into() }
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A host in its own network namespace, reached over a veth pair:
/// 10.231.<index>.2 and fd00:231:<index>::2 (the host side has .1 and ::1).
pub struct TestHost {
    pub netns: String,
    host_if: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    servers: Vec<Child>,
    files: Vec<PathBuf>,
}

/// What a test's DNS server answers: names with addresses, CNAMEs, and the
/// TTL of every record.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    pub addresses: Vec<(String, std::net::IpAddr)>,
    /// (alias, target); the target must be a name of the zone.
    pub cnames: Vec<(String, String)>,
    pub ttl: u32,
}

impl TestHost {
    /// `index` must be unique among the tests that run at the same time.
    fn new(name: &str, index: u8) -> Self {
        let netns = format!("tgt-{name}");
        let host_if = format!("tgh{index}");
        let peer_if = format!("tgp{index}");
        let host = Self {
            netns: netns.clone(),
            host_if: host_if.clone(),
            v4: Ipv4Addr::new(10, 231, index, 2),
            v6: format!("fd00:231:{index}::2").parse().unwrap(),
            servers: Vec::new(),
            files: Vec::new(),
        };
        // From here on, Drop removes whatever was made.
        sh("ip", &["netns", "add", &netns]);
        sh(
            "ip",
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
            ],
        );
        sh("ip", &["link", "set", &peer_if, "netns", &netns]);
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("10.231.{index}.1/24"),
                "dev",
                &host_if,
            ],
        );
        sh(
            "ip",
            &[
                "-6",
                "addr",
                "add",
                &format!("fd00:231:{index}::1/64"),
                "dev",
                &host_if,
                "nodad",
            ],
        );
        sh("ip", &["link", "set", &host_if, "up"]);
        let in_ns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", &netns, "ip"];
            full.extend_from_slice(args);
            sh("ip", &full);
        };
        in_ns(&[
            "addr",
            "add",
            &format!("10.231.{index}.2/24"),
            "dev",
            &peer_if,
        ]);
        in_ns(&[
            "-6",
            "addr",
            "add",
            &format!("fd00:231:{index}::2/64"),
            "dev",
            &peer_if,
            "nodad",
        ]);
        in_ns(&["link", "set", &peer_if, "up"]);
        in_ns(&["link", "set", "lo", "up"]);
        host
    }

    /// Starts a TCP listener (dual-stack) on each port inside the namespace.
    pub fn serve_tcp(&mut self, ports: &[u16]) {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(probe_binary())
            .arg("serve")
            .args(&ports)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the probe server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "listening", "probe server did not start");
        self.servers.push(child);
    }
}

impl TestHost {
    /// Starts `tg-probe catch MARKER` inside the host's namespace; returns
    /// once it listens. It reports every IP packet that arrives in the
    /// namespace (on any of its interfaces) carrying `marker`.
    pub fn catch(&self, marker: &str) -> Catcher {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .arg(probe_binary())
            .args(["catch", marker])
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting tg-probe catch");
        let lines = lines_of(child.stdout.take().unwrap());
        // From here on, Drop kills it.
        let catcher = Catcher { child, lines };
        match catcher.lines.recv_timeout(Duration::from_secs(5)) {
            Ok(line) if line == "listening" => catcher,
            other => panic!("tg-probe catch did not start: {other:?}"),
        }
    }
}

/// A running `tg-probe catch` (see [`TestHost::catch`]), killed on drop.
pub struct Catcher {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Catcher {
    /// The `caught <ip-protocol> <dst-port-or-0>` lines seen within `wait`
    /// (waits the whole `wait`), with any not yet returned by an earlier
    /// call.
    pub fn caught(&self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        let mut caught = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with("caught ") => caught.push(line),
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return caught,
                // Seeing nothing because the catcher died proves nothing.
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("tg-probe catch exited; it had caught {caught:?}")
                }
            }
        }
    }
}

impl Drop for Catcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// While held, every group may open ICMP echo sockets in the machine's
/// network namespace (`net.ipv4.ping_group_range`, which also governs
/// ICMPv6 echo sockets), as containerd sets it in pods. Shared by the tests
/// of one binary: the first holder widens the range, the last one restores
/// what was there.
pub struct PingSockets;

static PING_HOLDERS: std::sync::Mutex<(usize, String)> = std::sync::Mutex::new((0, String::new()));
const PING_GROUP_RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";

impl PingSockets {
    pub fn allow() -> Self {
        let mut holders = PING_HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
        if holders.0 == 0 {
            holders.1 = std::fs::read_to_string(PING_GROUP_RANGE).unwrap();
            std::fs::write(PING_GROUP_RANGE, "0 2147483647").unwrap();
        }
        holders.0 += 1;
        Self
    }
}

impl Drop for PingSockets {
    fn drop(&mut self) {
        let mut holders = PING_HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
        holders.0 -= 1;
        if holders.0 == 0 {
            let _ = std::fs::write(PING_GROUP_RANGE, holders.1.trim());
        }
    }
}

/// A marker unique to this call, for `tg-probe` to send and a [`Catcher`]
/// to look for: `TGMARK-<test>-<pid>-<counter>`.
pub fn marker(test: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("TGMARK-{test}-{}-{n}", std::process::id())
}

impl TestHost {
    /// Starts dnsmasq on this host's IPv4 address, port 53, answering
    /// `zone` and refusing everything else (it never forwards).
    pub fn serve_dns(&mut self, zone: &Zone) {
        self.serve_dns_on(zone, 53);
    }

    /// Serves `zone` on UDP and TCP `port` of the host's address.
    pub fn serve_dns_on(&mut self, zone: &Zone, port: u16) {
        let hosts = std::env::temp_dir().join(format!("tollgate-{}.hosts", self.netns));
        let lines: String = zone
            .addresses
            .iter()
            .map(|(name, ip)| format!("{ip} {name}\n"))
            .collect();
        std::fs::write(&hosts, lines).unwrap();
        self.files.push(hosts.clone());
        let mut command = Command::new("ip");
        command
            .args([
                "netns",
                "exec",
                &self.netns,
                "dnsmasq",
                "--keep-in-foreground",
            ])
            .args([
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
            ])
            .args(["--bind-interfaces", "--pid-file=", "--user=root"])
            .arg(format!("--port={port}"))
            .arg(format!("--listen-address={}", self.v4))
            .arg(format!("--local-ttl={}", zone.ttl))
            .arg(format!("--addn-hosts={}", hosts.display()))
            .args(
                zone.cnames
                    .iter()
                    .map(|(alias, target)| format!("--cname={alias},{target},{}", zone.ttl)),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.servers
            .push(command.spawn().expect("starting dnsmasq"));
        // Ready once it answers.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            let probe = Command::new("dig")
                .args([
                    "+time=1",
                    "+tries=1",
                    "+short",
                    "-p",
                    &port.to_string(),
                    &format!("@{}", self.v4),
                    "ready.invalid",
                ])
                .output()
                .expect("running dig");
            if probe.status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("dnsmasq on {} did not start", self.v4);
    }

    /// Makes this host own every address of `prefix` (IPv4), so that its
    /// listeners accept connections to any of them, and routes `prefix`
    /// to it.
    pub fn own_prefix(&mut self, prefix: &str) {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.netns,
                "ip",
                "route",
                "add",
                "local",
                prefix,
                "dev",
                "lo",
            ],
        );
        sh("ip", &["route", "add", prefix, "via", &self.v4.to_string()]);
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        for file in &self.files {
            let _ = std::fs::remove_file(file);
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// A directory of the test's own, removed with everything in it on drop.
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!("tollgate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self { path }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Everything one test owns. Fields drop in order: hosts, pins, cgroup,
/// state directory.
pub struct TestEnv {
    pub hosts: Vec<TestHost>,
    pub bpffs: PrivateBpffs,
    pub cgroup: TestCgroup,
    /// The agent's --state-dir; its control socket lives there too.
    pub state: TestDir,
}

impl TestEnv {
    /// `name` is short (it names a netns) and unique per test.
    pub fn new(name: &str) -> Self {
        let cgroup = TestCgroup::new(name);
        let bpffs = PrivateBpffs::new(name);
        let state = TestDir::new(&format!("state-{name}"));
        Self {
            hosts: Vec::new(),
            bpffs,
            cgroup,
            state,
        }
    }

    /// Pins, where the agent will look for its map `name`, a per-CPU array
    /// whose values are one byte: too small for what the programs that use
    /// it read and write, so the kernel's verifier refuses exactly those
    /// programs, as a kernel that lacks what they need would. (The agent
    /// reuses pinned maps by name, as it must across restarts.) A pin of
    /// that name already there is replaced; programs attached keep the map
    /// they were loaded with.
    pub fn pin_undersized_map(&self, name: &str) {
        let maps = self
            .bpffs
            .root()
            .join(format!("v{}", tollgate_common::PIN_LAYOUT_VERSION))
            .join("maps");
        std::fs::create_dir_all(&maps).unwrap();
        let path = maps.join(name);
        let _ = std::fs::remove_file(&path);
        sh(
            "bpftool",
            &[
                "map",
                "create",
                path.to_str().unwrap(),
                "type",
                "percpu_array",
                "key",
                "4",
                "value",
                "1",
                "entries",
                "1",
                "name",
                name,
            ],
        );
    }

    /// The agent's control socket, as tollgatectl's --agent.
    pub fn agent_address(&self) -> String {
        format!("unix:{}", self.state.path.join("agent.sock").display())
    }

    /// `tollgate-agent cleanup` for this test's pins: detaches the programs.
    /// The cgroups that have an entry in the datapath's endpoint map (only
    /// the live half has entries once a switch is complete).
    /// What the agent told the kernel of endpoints' network namespaces:
    /// cgroup id -> namespace cookie.
    pub fn endpoint_netns(&self) -> std::collections::BTreeMap<u64, u64> {
        self.pinned_hash_map(tollgate_common::map_names::ENDPOINT_NETNS)
    }

    /// The pinned map `name` of the agent's layout.
    fn pinned_map(&self, name: &str) -> aya::maps::MapData {
        let path = self.datapath_options().pin_dir().join("maps").join(name);
        aya::maps::MapData::from_pin(&path).unwrap_or_else(|e| panic!("the pinned map {name}: {e}"))
    }

    /// The entries of the pinned hash map `name` of the agent's layout.
    pub fn pinned_hash_map<K: aya::Pod + Ord, V: aya::Pod>(
        &self,
        name: &str,
    ) -> std::collections::BTreeMap<K, V> {
        let map = aya::maps::Map::HashMap(self.pinned_map(name));
        let map: aya::maps::HashMap<_, K, V> = map.try_into().unwrap();
        map.iter().map(|entry| entry.unwrap()).collect()
    }

    /// The set id of each entry of the pinned IPv4 rules map.
    pub fn v4_rule_set_ids(&self) -> Vec<u32> {
        use tollgate_common::{RuleKeyV4, RuleList, map_names};
        let map = aya::maps::Map::LpmTrie(self.pinned_map(map_names::RULES_V4));
        let rules: aya::maps::LpmTrie<_, RuleKeyV4, RuleList> = map.try_into().unwrap();
        rules
            .keys()
            .map(|key| u32::from_be(key.unwrap().data().set_id_be))
            .collect()
    }

    pub fn endpoint_cgroup_ids(&self) -> std::collections::BTreeSet<u64> {
        let endpoints: std::collections::BTreeMap<
            tollgate_common::EndpointKey,
            tollgate_common::EndpointValue,
        > = self.pinned_hash_map(tollgate_common::map_names::ENDPOINTS);
        endpoints.keys().map(|k| k.cgroup_id).collect()
    }

    pub fn cleanup_pins(&self) {
        let output = Command::new(agent_binary())
            .arg("cleanup")
            .arg("--bpffs-root")
            .arg(self.bpffs.root())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "cleanup: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Runs tollgatectl against this test's agent.
    pub fn ctl(&self, args: &[&str]) -> CtlRun {
        self.ctl_at(&self.agent_address(), args)
    }

    /// Runs tollgatectl against the agent at `agent`.
    pub fn ctl_at(&self, agent: &str, args: &[&str]) -> CtlRun {
        let output = Command::new(workspace_binary("tollgatectl"))
            .arg("--agent")
            .arg(agent)
            .args(args)
            .output()
            .expect("running tollgatectl");
        CtlRun {
            success: output.status.success(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Adds a test host with listeners on `tcp_ports`.
    pub fn add_host(&mut self, index: u8, tcp_ports: &[u16]) -> &TestHost {
        let name = format!(
            "{}-{}",
            self.cgroup.relative.trim_start_matches("/tgtest-"),
            index
        );
        let mut host = TestHost::new(&name, index);
        if !tcp_ports.is_empty() {
            host.serve_tcp(tcp_ports);
        }
        self.hosts.push(host);
        self.hosts.last().unwrap()
    }

    pub fn datapath_options(&self) -> DatapathOptions {
        DatapathOptions {
            bpffs_root: self.bpffs.root(),
            cgroup: self.cgroup.path.clone(),
        }
    }

    /// Loads the datapath, attached to this test's cgroup.
    pub fn open_datapath(&self) -> Datapath {
        Datapath::open(&self.datapath_options()).expect("opening the datapath")
    }

    /// Runs the probe inside this test's cgroup.
    pub fn probe(&self, args: &[&str]) -> ProbeRun {
        self.probe_in(&self.cgroup.path, args)
    }

    /// Runs the probe inside `cgroup` (this test's or one below it).
    pub fn probe_in(&self, cgroup: &Path, args: &[&str]) -> ProbeRun {
        let mut command = Command::new(probe_binary());
        command.arg("--cgroup").arg(cgroup).args(args);
        run_probe(command, args)
    }

    /// Runs the probe inside `cgroup` and the network namespace `netns`
    /// (a name under /run/netns), as a pod's process runs.
    pub fn probe_in_netns(&self, cgroup: &Path, netns: &str, args: &[&str]) -> ProbeRun {
        // Into the cgroup first: `ip netns exec` mounts a sysfs of the
        // namespace's over /sys, which hides the cgroup tree.
        let mut command = Command::new("sh");
        command
            .args([
                "-c",
                r#"echo $$ > "$1/cgroup.procs" && shift && exec ip netns exec "$@""#,
                "sh",
            ])
            .arg(cgroup)
            .arg(netns)
            .arg(probe_binary())
            .args(args);
        run_probe(command, args)
    }

    /// What the pinned `TG_POD_LINKS` map holds: the ifindexes of the
    /// links the frame hook is on, with the endpoint each is judged as.
    pub fn pod_links(&self) -> std::collections::BTreeMap<u32, u64> {
        self.pinned_hash_map(tollgate_common::map_names::POD_LINKS)
    }
}

fn run_probe(mut command: Command, args: &[&str]) -> ProbeRun {
    let output = command.output().expect("running the probe");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "probe {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    ProbeRun::parse(&stdout)
}

/// What a tollgatectl run printed.
#[derive(Debug)]
pub struct CtlRun {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CtlRun {
    /// The output of a run that must succeed.
    pub fn ok(self) -> String {
        assert!(
            self.success,
            "tollgatectl failed: {}{}",
            self.stdout, self.stderr
        );
        self.stdout
    }

    /// The error output of a run that must fail.
    pub fn failed(self) -> String {
        assert!(
            !self.success,
            "tollgatectl should have failed: {}",
            self.stdout
        );
        self.stderr
    }
}

/// What the probe printed: its pid, then one result per attempt.
#[derive(Debug)]
pub struct ProbeRun {
    pub pid: u32,
    /// `Ok(())` or the errno of the failed call.
    pub results: Vec<Result<(), i32>>,
}

impl ProbeRun {
    fn parse(stdout: &str) -> Self {
        let mut pid = 0;
        let mut results = Vec::new();
        for line in stdout.lines() {
            if let Some(p) = line.strip_prefix("pid=") {
                pid = p.parse().unwrap();
            } else if line == "ok" {
                results.push(Ok(()));
            } else if let Some(errno) = line.strip_prefix("errno=") {
                results.push(Err(errno.parse().unwrap()));
            } else if line == "noaddress" {
                results.push(Err(NO_ADDRESS));
            }
        }
        Self { pid, results }
    }

    /// The single result of a one-attempt run.
    pub fn result(&self) -> Result<(), i32> {
        assert_eq!(self.results.len(), 1, "{self:?}");
        self.results[0]
    }
}

/// Collects events until `want` have arrived or `timeout` passes.
pub async fn collect_events(
    reader: &mut EventReader,
    want: usize,
    timeout: Duration,
) -> Vec<FlowEvent> {
    let mut events = Vec::new();
    let mut read_now = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while events.len() < want {
        match tokio::time::timeout_at(deadline, reader.read(&mut read_now, 1024)).await {
            Ok(read) => {
                read.expect("reading events");
            }
            Err(_) => break,
        }
        events.extend(read_now.drain(..).filter_map(|event| match event {
            Event::Flow(flow) => Some(flow),
            Event::Dns(_) => None,
        }));
    }
    events
}

/// Waits briefly and returns whatever else arrived: for asserting that
/// nothing more was reported.
pub async fn no_more_events(reader: &mut EventReader) -> Vec<FlowEvent> {
    collect_events(reader, usize::MAX, Duration::from_millis(300)).await
}

/// A running `tollgate-agent`, with its output lines collected by threads.
pub struct AgentProcess {
    /// Log lines up to and including the one that reported ready.
    pub startup_log: Vec<String>,
    child: Child,
    stdout: std::sync::mpsc::Receiver<String>,
    /// Log lines after startup; collected all along, so the agent never
    /// writes into a closed pipe.
    stderr: std::sync::mpsc::Receiver<String>,
    /// The lines of `stderr` the waits have read so far.
    read: std::sync::Mutex<Vec<String>>,
}

impl AgentProcess {
    /// Starts the agent attached to the test's cgroup and pin root, and waits
    /// until it reports ready.
    pub fn start(env: &TestEnv, extra_args: &[&str]) -> Self {
        Self::try_start(env, extra_args)
            .unwrap_or_else(|log| panic!("the agent did not get ready; it logged: {log:#?}"))
    }

    /// Starts the agent; on failure, what it logged.
    pub fn try_start(env: &TestEnv, extra_args: &[&str]) -> Result<Self, Vec<String>> {
        Self::try_start_under(env, &[], extra_args)
    }

    /// Starts the agent under `wrapper` (a command that then runs the agent,
    /// like `setpriv ...`).
    pub fn try_start_under(
        env: &TestEnv,
        wrapper: &[&str],
        extra_args: &[&str],
    ) -> Result<Self, Vec<String>> {
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(agent_binary());
                command
            }
            None => Command::new(agent_binary()),
        };
        if !extra_args.contains(&"--listen") {
            command.arg("--listen").arg(env.agent_address());
        }
        if !extra_args.contains(&"--node") {
            command.args(["--node", node::NODE]);
        }
        let mut child = command
            .arg("--cgroup")
            .arg(&env.cgroup.path)
            .arg("--bpffs-root")
            .arg(env.bpffs.root())
            .arg("--state-dir")
            .arg(&env.state.path)
            .args(extra_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting tollgate-agent");
        let stdout = lines_of(child.stdout.take().unwrap());
        let stderr = lines_of(child.stderr.take().unwrap());
        let mut startup_log = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !startup_log
            .last()
            .is_some_and(|line: &String| line.contains("ready"))
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match stderr.recv_timeout(left) {
                Ok(line) => startup_log.push(line),
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(startup_log);
                }
            }
        }
        Ok(Self {
            startup_log,
            child,
            stdout,
            stderr,
            read: Default::default(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many startup log lines contain `needle`.
    pub fn startup_lines_with(&self, needle: &str) -> usize {
        self.startup_log
            .iter()
            .filter(|line| line.contains(needle))
            .count()
    }

    /// Reads the agent's log until a line contains `needle`; returns the
    /// lines read.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.read.lock().unwrap().push(line.clone());
                    let found = line.contains(needle);
                    seen.push(line);
                    if found {
                        return seen;
                    }
                }
                Err(_) => panic!("the agent did not log {needle:?} in time; it logged: {seen:#?}"),
            }
        }
    }

    /// Waits until every one of `needles` is in some log line, from the
    /// start (each line counts for every needle it contains).
    pub fn wait_until_logged(&self, needles: &[&str], timeout: Duration) {
        let mut missing: Vec<&str> = needles
            .iter()
            .copied()
            .filter(|needle| self.startup_lines_with(needle) == 0)
            .collect();
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while !missing.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.read.lock().unwrap().push(line.clone());
                    missing.retain(|needle| !line.contains(needle));
                    seen.push(line);
                }
                Err(_) => panic!("the agent did not log {missing:?} in time; it logged: {seen:#?}"),
            }
        }
    }

    /// Every log line so far that startup or a wait read, in order.
    pub fn log_read(&self) -> Vec<String> {
        let read = self.read.lock().unwrap();
        self.startup_log
            .iter()
            .chain(read.iter())
            .cloned()
            .collect()
    }

    /// The log lines written since last read, without waiting: for a
    /// failure message.
    pub fn log_so_far(&self) -> Vec<String> {
        self.stderr.try_iter().collect()
    }

    /// The next flow record the agent printed.
    pub fn next_record(&self, timeout: Duration) -> serde_json::Value {
        let line = self
            .stdout
            .recv_timeout(timeout)
            .expect("the agent printed no flow record in time");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Every flow record the agent prints until it prints none for `quiet`.
    pub fn records_until_quiet(&self, quiet: Duration) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| self.stdout.recv_timeout(quiet).ok())
            .map(|line| {
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
            })
            .collect()
    }

    /// SIGKILL: no chance to clean up anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status and everything logged after startup.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Vec<String>) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("signalling the agent");
        // A stop that hangs is a failure, not a stuck test run.
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the agent") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the agent did not stop within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends with the pipe; give it a moment to hand over the rest.
        let mut log = Vec::new();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(2)) {
            log.push(line);
        }
        (status, log)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn lines_of(stream: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A CA, a server certificate for localhost, and a client certificate, made
/// with openssl.
pub fn make_certificates(dir: &std::path::Path, ca_name: &str) {
    let run = |args: &[&str]| {
        let output = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"],
        &key[..],
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            &format!("/CN={ca_name}"),
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        run(&[
            &["req"],
            &key[..],
            &[
                "-keyout",
                &format!("{who}.key"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN={who}"),
            ],
        ]
        .concat());
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{who}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &format!("{who}.pem"),
            "-extfile",
            &format!("{who}.ext"),
        ]);
    }
}

/// A loopback TCP port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One scrape of the agent's metrics, or the text of a health endpoint:
/// (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let output = Command::new("curl")
        .args([
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            &format!("http://127.0.0.1:{port}{path}"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

/// The value of one sample line, e.g.
/// `tollgate_decisions_total{verdict="denied"}`; 0 when absent.
pub fn metric_sample(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A cgroup/connect4 program that allows everything (`r0 = 1; exit`),
/// loaded straight through the bpf syscall: what an older agent's program
/// stands in as in upgrade tests.
pub fn allow_all_connect4() -> std::os::fd::OwnedFd {
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    allow_all_program(
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET4_CONNECT,
        *b"tg_test_allow\0\0\0",
    )
}

/// A program of `prog_type` for `expected_attach_type` that only returns 1
/// (`r0 = 1; exit`), loaded straight through the bpf syscall (aya loads
/// programs from objects only).
pub fn allow_all_program(
    prog_type: u32,
    expected_attach_type: u32,
    name: [u8; 16],
) -> std::os::fd::OwnedFd {
    const BPF_PROG_LOAD: libc::c_long = 5;
    /// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
    #[repr(C)]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    // mov64 r0, 1; exit
    let instructions: [u64; 2] = [
        u64::from_le_bytes([0xb7, 0, 0, 0, 1, 0, 0, 0]),
        u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0]),
    ];
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: instructions.len() as u32,
        insns: instructions.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type,
    };
    // SAFETY: ProgLoadAttr is BPF_PROG_LOAD's prefix without padding; the
    // instructions and license outlive the call.
    let fd = unsafe { tollgate_agent::datapath::raw_bpf::bpf(BPF_PROG_LOAD, &mut attr) }
        .expect("loading the allow-all program");
    // SAFETY: a new fd from the kernel, owned by nothing else.
    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
}

/// How many programs are attached directly to `cgroup` for cgroup/connect4
/// (BPF_PROG_QUERY).
pub fn connect4_programs_attached(cgroup: &std::path::Path) -> u32 {
    use std::os::fd::AsRawFd;
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    /// `union bpf_attr` for BPF_PROG_QUERY, up to `prog_cnt`, padded.
    #[repr(C)]
    struct ProgQueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    let dir = std::fs::File::open(cgroup).unwrap();
    let mut attr = ProgQueryAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_INET4_CONNECT,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: 0,
        prog_cnt: 0,
        _pad: 0,
    };
    // SAFETY: ProgQueryAttr is BPF_PROG_QUERY's prefix, padding zeroed; with
    // no id buffer the kernel writes only prog_cnt and attach_flags.
    unsafe { tollgate_agent::datapath::raw_bpf::bpf(BPF_PROG_QUERY, &mut attr) }
        .expect("BPF_PROG_QUERY");
    attr.prog_cnt
}
