//! The load worker: a process that joins a cgroup and a network namespace,
//! then makes loopback TCP connections (connect, then close with RST so no
//! TIME_WAIT piles up), unconnected UDP sends or 64 KiB writes to one TCP
//! stream as fast as it can, or at a given rate, for a while, and reports
//! how many and how long each took. A load may also cross to a receiver
//! in another namespace (`LoadSpec::remote`): then it goes to the
//! receiver's address there, over whatever links the two namespaces.

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// connect() to a loopback listener, then close.
    Tcp,
    /// sendto() on an unconnected UDP socket to a loopback receiver.
    Udp,
    /// Bulk throughput: 64 KiB write()s to one loopback TCP connection,
    /// drained by a reader thread whose socket is outside the cgroup.
    #[serde(rename = "tcp-stream")]
    TcpStream,
}

impl Workload {
    /// The name the worker takes on its command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::TcpStream => "tcp-stream",
        }
    }
}

/// One write of the `tcp-stream` workload.
pub const STREAM_WRITE: usize = 64 * 1024;

/// What one worker run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadResult {
    pub ops: u64,
    /// Payload bytes the operations carried (`tcp-stream` only: ops are
    /// its writes).
    #[serde(default)]
    pub bytes: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Per operation, nanoseconds.
    pub p50_ns: u64,
    pub p99_ns: u64,
}

impl LoadResult {
    pub fn ops_per_second(&self) -> f64 {
        self.ops as f64 / self.seconds
    }

    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.seconds
    }
}

pub struct LoadSpec<'a> {
    pub cgroup: &'a str,
    /// The network namespace the load's sockets are made in.
    pub netns: &'a str,
    pub workload: Workload,
    pub seconds: f64,
    /// Operations per second to aim at; 0: as fast as possible.
    pub rate: u64,
    /// The receiver's network namespace and the address it serves on
    /// there, when it is not on the load's loopback.
    pub remote: Option<(&'a str, Ipv4Addr)>,
}

/// Moves the calling thread into the network namespace `name` (under
/// /run/netns). Sockets it makes from then on are made there; those made
/// before stay where they were.
fn enter_netns(name: &str) {
    let netns = std::fs::File::open(format!("/run/netns/{name}"))
        .unwrap_or_else(|e| panic!("netns {name}: {e}"));
    nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
}

/// Keeps this process, and the receiver thread it starts, on one CPU (the
/// last it may use). The sender, the receiver and the loopback's softirq
/// then never wait on a wakeup across CPUs: on 2 shared cores, that is what
/// swung a 0.25 s turn of TCP connects by ±40% around its median. Subject
/// and baseline turns run alike, and the agent has the other CPUs.
fn pin_to_one_cpu() {
    use nix::{sched::CpuSet, unistd::Pid};
    let this = Pid::from_raw(0);
    let allowed = nix::sched::sched_getaffinity(this).expect("sched_getaffinity");
    let Some(cpu) = (0..CpuSet::count())
        .rev()
        .find(|&cpu| allowed.is_set(cpu).unwrap_or(false))
    else {
        return;
    };
    let mut one = CpuSet::new();
    one.set(cpu).expect("a CPU the set can hold");
    nix::sched::sched_setaffinity(this, &one).expect("sched_setaffinity");
}

/// Runs in the worker process: joins the namespace and the cgroup, runs
/// the load and prints the result as JSON.
pub fn run(spec: &LoadSpec) {
    pin_to_one_cpu();
    // The receiver's namespace first, while this process has one thread.
    let (receiver_netns, serve_on) = spec.remote.unwrap_or((spec.netns, Ipv4Addr::LOCALHOST));
    enter_netns(receiver_netns);
    // Receivers first, outside the cgroup: a socket belongs to the cgroup
    // its creator was in (an accepted one to its listener's), so only the
    // load's own sockets are in the cgroup.
    let target = match spec.workload {
        Workload::Tcp => serve_tcp(serve_on),
        Workload::Udp => serve_udp(serve_on),
        Workload::TcpStream => serve_stream(serve_on),
    };
    // Then the load's own namespace, for this thread (the load's): the
    // receivers' sockets stay in the namespace they were made in.
    if spec.remote.is_some() {
        enter_netns(spec.netns);
    }
    std::fs::write(
        format!("{}/cgroup.procs", spec.cgroup),
        std::process::id().to_string(),
    )
    .unwrap_or_else(|e| panic!("joining {}: {e}", spec.cgroup));
    let result = match spec.workload {
        Workload::Tcp => measure(spec, || connect_close(target)),
        Workload::Udp => {
            // To a receiver elsewhere, from whatever address the route
            // picks: a loopback source would not leave the namespace.
            let local = if spec.remote.is_some() {
                Ipv4Addr::UNSPECIFIED
            } else {
                Ipv4Addr::LOCALHOST
            };
            let socket = UdpSocket::bind((local, 0)).unwrap();
            measure(spec, || socket.send_to(b"tollgate bench", target).map(drop))
        }
        Workload::TcpStream => {
            let mut stream = TcpStream::connect(target).unwrap();
            let buffer = vec![0x5a_u8; STREAM_WRITE];
            let mut result = measure(spec, || stream.write_all(&buffer));
            result.bytes = (result.ops - result.errors) * STREAM_WRITE as u64;
            result
        }
    };
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, &result).unwrap();
    writeln!(out).unwrap();
}

/// A listener on `addr` that accepts and drops, on its own thread.
fn serve_tcp(addr: Ipv4Addr) -> SocketAddr {
    use std::os::fd::AsRawFd;
    let listener = TcpListener::bind((addr, 0)).unwrap();
    // A deep backlog: std's 128 overflows when the acceptor falls behind a
    // burst, and a dropped SYN costs the client a 1 s retransmit, which
    // would measure TCP's timer, not the connect path.
    // SAFETY: listen() on a socket we own.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 65_535) }, 0);
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    addr
}

/// A listener on `addr` whose one connection a thread drains until it
/// closes.
fn serve_stream(addr: Ipv4Addr) -> SocketAddr {
    use std::io::Read;
    let listener = TcpListener::bind((addr, 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut buffer = vec![0_u8; 4 * STREAM_WRITE];
        while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {}
    });
    addr
}

/// A receiver on `addr` whose buffer the kernel fills and then drops
/// into: sends never fail for want of a reader, and no ICMP
/// port-unreachable is made.
fn serve_udp(addr: Ipv4Addr) -> SocketAddr {
    let socket = UdpSocket::bind((addr, 0)).unwrap();
    let addr = socket.local_addr().unwrap();
    std::mem::forget(socket);
    addr
}

fn connect_close(target: SocketAddr) -> std::io::Result<()> {
    let stream = TcpStream::connect(target)?;
    // Close with RST: no TIME_WAIT, so ports never run out.
    socket_linger_zero(&stream);
    Ok(())
}

fn socket_linger_zero(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a linger struct of the size given.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(result, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

fn measure(spec: &LoadSpec, mut op: impl FnMut() -> std::io::Result<()>) -> LoadResult {
    let duration = Duration::from_secs_f64(spec.seconds);
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut errors = 0;
    let started = Instant::now();
    // Rate: ops go in slices of 1 ms, each with its share.
    let per_slice = (spec.rate / 1000).max(1);
    let mut slice_start = started;
    'run: loop {
        for _ in 0..if spec.rate == 0 { 64 } else { per_slice } {
            let before = Instant::now();
            if op().is_err() {
                errors += 1;
            }
            latencies.push(before.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32);
            if before.duration_since(started) >= duration {
                break 'run;
            }
        }
        if spec.rate != 0 {
            slice_start += Duration::from_millis(1);
            if let Some(wait) = slice_start.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .map_or(0, u64::from)
    };
    LoadResult {
        ops: latencies.len() as u64,
        bytes: 0,
        errors,
        seconds,
        p50_ns: percentile(0.50),
        p99_ns: percentile(0.99),
    }
}
