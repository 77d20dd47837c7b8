//! A test client and server with exact errno reporting.
//!
//! Client: `tg-probe [--cgroup DIR] [--count N] connect tcp|udp ADDR:PORT`
//!         `tg-probe [--cgroup DIR] [--count N] sendto ADDR:PORT` (unconnected UDP)
//! Prints `pid=<pid>`, then `ok` or `errno=<n>` per attempt.
//! With --cgroup it first moves itself into that cgroup, so every socket call
//! it makes is judged by the programs attached there.
//!
//!         `tg-probe [--cgroup DIR] [--count N] resolve-connect udp|tcp RESOLVER NAME A|AAAA PORT`
//!         asks RESOLVER (ADDR:PORT) for NAME over UDP or TCP, then connects
//!         by TCP to the first address of the answer at once; `{}` in NAME
//!         is replaced by the attempt's number (from 0). Prints `ok`,
//!         `errno=<n>`, or `noaddress` per attempt.
//!
//! Forged DNS answers (each prints `ok`, `errno=<n>` or `noaddress`):
//!         `tg-probe [--cgroup DIR] await-answer PORT CONNECT_PORT` binds
//!         UDP 0.0.0.0:PORT, prints `listening`, takes the first datagram
//!         within 5 s as a DNS answer and connects by TCP to its first
//!         address on CONNECT_PORT.
//!         `tg-probe [--cgroup DIR] [--count N] forge-answer FROM TO:PORT ID NAME ADDRESS`
//!         sends, from a raw socket with IP_HDRINCL, a UDP datagram from
//!         FROM:53 to TO:PORT holding an answer (id ID) that NAME has the
//!         A record ADDRESS.
//!         `tg-probe [--cgroup DIR] own-netns-resolve RESOLVER NAME ADDRESS CONNECT_PORT`
//!         makes a network namespace of its own, gives its loopback
//!         RESOLVER and answers there, from a UDP socket on RESOLVER:53,
//!         every query with ADDRESS; asks it for NAME, goes back to its
//!         first namespace and connects by TCP to the answer on CONNECT_PORT.
//!
//! Packets for a receiver to see (`tg-probe catch` there tells whether they
//! came); each attempt prints `ok` or `errno=<n>` of its socket() or sendto:
//!         `tg-probe [--cgroup DIR] [--count N] raw PROTO ADDR|ADDR:PORT MARKER`
//!         sends one packet from socket(AF_INET or AF_INET6, SOCK_RAW, PROTO)
//!         (the kernel writes the IP header). PROTO is udp, tcp, sctp, icmp,
//!         icmpv6, gre or a number. The payload: for udp/tcp/sctp (PORT
//!         required) that protocol's header from port 40000 to PORT (UDP,
//!         TCP SYN, SCTP common header), then MARKER; for icmp/icmpv6 an echo
//!         request carrying MARKER; otherwise MARKER alone. An IPv6 ADDR:PORT
//!         is written [ADDR]:PORT.
//!         `tg-probe [--cgroup DIR] [--count N] raw-hdrincl PROTO ADDR|ADDR:PORT MARKER`
//!         the same from socket(AF_INET, SOCK_RAW, IPPROTO_RAW), writing the
//!         IPv4 header itself (source 0.0.0.0: the kernel fills it in).
//!         `tg-probe [--cgroup DIR] [--count N] ping ADDR MARKER`
//!         an echo request carrying MARKER from an ICMP echo socket
//!         (SOCK_DGRAM, IPPROTO_ICMP or IPPROTO_ICMPV6), then up to 2 s for
//!         the reply: `ok` when it came, `errno=110` (ETIMEDOUT) when not.
//!         `tg-probe [--cgroup DIR] [--count N] packet IFACE ADDR:PORT MARKER [--qdisc-bypass]`
//!         one Ethernet frame from an AF_PACKET socket bound to IFACE: to
//!         ff:ff:ff:ff:ff:ff from IFACE's MAC, IPv4 from IFACE's first IPv4
//!         address to ADDR, UDP from port 40000 to PORT, then MARKER. With
//!         --qdisc-bypass the socket sets PACKET_QDISC_BYPASS first.
//!
//! Server: `tg-probe serve PORT...` listens on [::]:PORT (dual-stack TCP),
//! prints `listening`, and accepts until killed.
//!         `tg-probe catch MARKER` watches every interface of its network
//!         namespace (AF_PACKET, ETH_P_ALL), prints `listening`, then
//!         `caught <ip-protocol> <dst-port-or-0>` for every IPv4 or IPv6
//!         packet received (never one sent from here) that contains MARKER,
//!         until killed. (IPv6: the next-header field of the fixed header.)

use std::{
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut count = 1;
    loop {
        match args.first().map(String::as_str) {
            Some("--cgroup") => {
                let dir = args[1].clone();
                std::fs::write(
                    format!("{dir}/cgroup.procs"),
                    std::process::id().to_string(),
                )
                .unwrap_or_else(|e| fail(&format!("joining {dir}: {e}")));
                args.drain(..2);
            }
            Some("--count") => {
                count = args[1]
                    .parse()
                    .unwrap_or_else(|_| fail("--count takes a number"));
                args.drain(..2);
            }
            _ => break,
        }
    }
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["serve", ports @ ..] => serve(ports),
        ["connect", protocol, addr] => attempts(count, || connect(protocol, parse(addr))),
        ["sendto", addr] => attempts(count, || sendto(parse(addr))),
        ["resolve-connect", transport, resolver, name, qtype, port] => {
            let port: u16 = port.parse().unwrap_or_else(|_| fail("PORT is a number"));
            let mut round = 0;
            attempts(count, || {
                let name = name.replace("{}", &round.to_string());
                round += 1;
                match resolve(transport, parse(resolver), &name, qtype)? {
                    Some(ip) => connect("tcp", SocketAddr::new(ip, port)),
                    None => Err(std::io::Error::from_raw_os_error(NO_ADDRESS)),
                }
            })
        }
        ["raw", protocol, target, marker] => {
            let protocol = ip_protocol(protocol);
            let (ip, port) = ip_target(protocol, target);
            let mut seq = 0;
            attempts(count, || {
                seq += 1;
                raw(protocol, ip, port, marker.as_bytes(), seq)
            })
        }
        ["raw-hdrincl", protocol, target, marker] => {
            let protocol = ip_protocol(protocol);
            let (ip, port) = ip_target(protocol, target);
            let IpAddr::V4(ip) = ip else {
                fail("raw-hdrincl is IPv4 only")
            };
            let mut seq = 0;
            attempts(count, || {
                seq += 1;
                raw_hdrincl(protocol, ip, port, marker.as_bytes(), seq)
            })
        }
        ["ping", addr, marker] => {
            let ip: IpAddr = addr
                .parse()
                .unwrap_or_else(|_| fail(&format!("{addr:?} is not an address")));
            let mut seq = 0;
            attempts(count, || {
                seq += 1;
                ping(ip, marker.as_bytes(), seq)
            })
        }
        ["packet", iface, addr, marker, options @ ..] => {
            let bypass = match options {
                [] => false,
                ["--qdisc-bypass"] => true,
                _ => fail("packet takes only --qdisc-bypass after MARKER"),
            };
            let SocketAddr::V4(addr) = parse(addr) else {
                fail("packet is IPv4 only")
            };
            let mut seq = 0;
            attempts(count, || {
                seq += 1;
                packet(iface, addr, marker.as_bytes(), bypass, seq)
            })
        }
        ["catch", marker] => catch(marker.as_bytes()),
        ["await-answer", port, connect_port] => {
            let port: u16 = port.parse().unwrap_or_else(|_| fail("PORT is a number"));
            let connect_port: u16 = connect_port
                .parse()
                .unwrap_or_else(|_| fail("CONNECT_PORT is a number"));
            attempts(1, || await_answer(port, connect_port))
        }
        ["forge-answer", from, to, id, name, address] => {
            let from: Ipv4Addr = from
                .parse()
                .unwrap_or_else(|_| fail("FROM is an IPv4 address"));
            let SocketAddr::V4(to) = parse(to) else {
                fail("forge-answer is IPv4 only")
            };
            let id: u16 = id.parse().unwrap_or_else(|_| fail("ID is a number"));
            let address: Ipv4Addr = address
                .parse()
                .unwrap_or_else(|_| fail("ADDRESS is an IPv4 address"));
            let answer = dns_answer(id, name, address);
            attempts(count, || forge_answer(from, to, &answer))
        }
        ["own-netns-resolve", resolver, name, address, connect_port] => {
            let resolver: Ipv4Addr = resolver
                .parse()
                .unwrap_or_else(|_| fail("RESOLVER is an IPv4 address"));
            let address: Ipv4Addr = address
                .parse()
                .unwrap_or_else(|_| fail("ADDRESS is an IPv4 address"));
            let connect_port: u16 = connect_port
                .parse()
                .unwrap_or_else(|_| fail("CONNECT_PORT is a number"));
            attempts(1, || {
                own_netns_resolve(resolver, name, address, connect_port)
            })
        }
        _ => fail(
            "usage: tg-probe [--cgroup DIR] [--count N] connect tcp|udp ADDR:PORT | sendto ADDR:PORT \
             | resolve-connect udp|tcp RESOLVER NAME A|AAAA PORT | raw PROTO ADDR[:PORT] MARKER \
             | raw-hdrincl PROTO ADDR[:PORT] MARKER | ping ADDR MARKER \
             | packet IFACE ADDR:PORT MARKER [--qdisc-bypass] | serve PORT... | catch MARKER \
             | await-answer PORT CONNECT_PORT | forge-answer FROM TO:PORT ID NAME ADDRESS \
             | own-netns-resolve RESOLVER NAME ADDRESS CONNECT_PORT",
        ),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("tg-probe: {message}");
    std::process::exit(2)
}

fn parse(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|_| fail(&format!("{addr:?} is not ADDR:PORT")))
}

fn attempts(count: usize, mut attempt: impl FnMut() -> std::io::Result<()>) {
    let mut out = std::io::stdout().lock();
    writeln!(out, "pid={}", std::process::id()).unwrap();
    for _ in 0..count {
        match attempt() {
            Ok(()) => writeln!(out, "ok").unwrap(),
            Err(e) if e.raw_os_error() == Some(NO_ADDRESS) => writeln!(out, "noaddress").unwrap(),
            Err(e) => writeln!(out, "errno={}", e.raw_os_error().unwrap_or(-1)).unwrap(),
        }
    }
}

fn connect(protocol: &str, addr: SocketAddr) -> std::io::Result<()> {
    match protocol {
        "tcp" => TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(drop),
        "udp" => {
            let bind: SocketAddr = if addr.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            UdpSocket::bind(bind)?.connect(addr)
        }
        other => fail(&format!("unknown protocol {other}")),
    }
}

/// Stands for "the answer had no address" among errnos (none is this big).
const NO_ADDRESS: i32 = 1 << 20;

/// The first address of `name`'s answer from `resolver`.
fn resolve(
    transport: &str,
    resolver: SocketAddr,
    name: &str,
    qtype: &str,
) -> std::io::Result<Option<std::net::IpAddr>> {
    use hickory_proto::{
        op::{Message, Query},
        rr::{Name, RData, RecordType},
    };
    let rtype = match qtype {
        "A" => RecordType::A,
        "AAAA" => RecordType::AAAA,
        other => fail(&format!("unknown query type {other}")),
    };
    let name = Name::from_ascii(name).unwrap_or_else(|e| fail(&format!("{name}: {e}")));
    let mut query = Message::query();
    query.metadata.id = std::process::id() as u16;
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(name, rtype));
    let bytes = query.to_vec().expect("a query encodes");
    let answer = match transport {
        "udp" => {
            let socket = UdpSocket::bind(if resolver.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            })?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.connect(resolver)?;
            socket.send(&bytes)?;
            let mut buffer = vec![0; 65_535];
            let len = socket.recv(&mut buffer)?;
            buffer.truncate(len);
            buffer
        }
        "tcp" => {
            use std::io::Read;
            let mut stream = TcpStream::connect_timeout(&resolver, Duration::from_secs(2))?;
            stream.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            stream.write_all(&framed)?;
            let mut len = [0; 2];
            stream.read_exact(&mut len)?;
            let mut buffer = vec![0; u16::from_be_bytes(len) as usize];
            stream.read_exact(&mut buffer)?;
            buffer
        }
        other => fail(&format!("unknown transport {other}")),
    };
    let answer = Message::from_vec(&answer).unwrap_or_else(|e| fail(&format!("answer: {e}")));
    Ok(answer.answers.iter().find_map(|record| match &record.data {
        RData::A(a) => Some(std::net::IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(std::net::IpAddr::V6(aaaa.0)),
        _ => None,
    }))
}

fn sendto(addr: SocketAddr) -> std::io::Result<()> {
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    UdpSocket::bind(bind)?
        .send_to(b"tollgate probe", addr)
        .map(drop)
}

fn serve(ports: &[&str]) {
    let listeners: Vec<TcpListener> = ports
        .iter()
        .map(|port| {
            TcpListener::bind(format!("[::]:{port}"))
                .unwrap_or_else(|e| fail(&format!("binding port {port}: {e}")))
        })
        .collect();
    println!("listening");
    std::io::stdout().flush().unwrap();
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    drop(stream)
                }
            })
        })
        .collect();
    for handle in handles {
        let _ = handle.join();
    }
}

const UDP: u8 = 17;
const TCP: u8 = 6;
const SCTP: u8 = 132;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;
/// The source port of every transport header the probe writes itself.
const SOURCE_PORT: u16 = 40000;

/// An IP protocol by name or number.
fn ip_protocol(name: &str) -> u8 {
    match name {
        "udp" => UDP,
        "tcp" => TCP,
        "sctp" => SCTP,
        "icmp" => ICMP,
        "icmpv6" => ICMPV6,
        "gre" => 47,
        number => number
            .parse()
            .unwrap_or_else(|_| fail(&format!("unknown protocol {number}"))),
    }
}

/// ADDR or ADDR:PORT ([ADDR]:PORT for IPv6); a port exactly for the
/// protocols with ports.
fn ip_target(protocol: u8, target: &str) -> (IpAddr, u16) {
    let (ip, port) = match target.parse::<SocketAddr>() {
        Ok(addr) => (addr.ip(), Some(addr.port())),
        Err(_) => match target.parse::<IpAddr>() {
            Ok(ip) => (ip, None),
            Err(_) => fail(&format!("{target:?} is not ADDR or ADDR:PORT")),
        },
    };
    match (has_ports(protocol), port) {
        (true, Some(port)) => (ip, port),
        (true, None) => fail(&format!("protocol {protocol} needs ADDR:PORT")),
        (false, Some(_)) => fail(&format!("protocol {protocol} has no ports")),
        (false, None) => (ip, 0),
    }
}

fn has_ports(protocol: u8) -> bool {
    matches!(protocol, UDP | TCP | SCTP)
}

/// What follows the IP header: the transport header the probe writes for
/// `protocol`, then `marker`.
fn transport_bytes(protocol: u8, port: u16, marker: &[u8], seq: u16) -> Vec<u8> {
    let mut bytes = Vec::new();
    match protocol {
        UDP => {
            bytes.extend_from_slice(&SOURCE_PORT.to_be_bytes());
            bytes.extend_from_slice(&port.to_be_bytes());
            bytes.extend_from_slice(&((8 + marker.len()) as u16).to_be_bytes());
            // No checksum (IPv4); over IPv6 the kernel writes it (IPV6_CHECKSUM).
            bytes.extend_from_slice(&[0, 0]);
        }
        TCP => {
            bytes.extend_from_slice(&SOURCE_PORT.to_be_bytes());
            bytes.extend_from_slice(&port.to_be_bytes());
            bytes.extend_from_slice(&u32::from(seq).to_be_bytes()); // sequence
            bytes.extend_from_slice(&[0; 4]); // acknowledgment
            bytes.extend_from_slice(&[5 << 4, 0x02]); // 20 bytes, SYN
            bytes.extend_from_slice(&u16::MAX.to_be_bytes()); // window
            bytes.extend_from_slice(&[0; 4]); // checksum, urgent pointer
        }
        SCTP => {
            bytes.extend_from_slice(&SOURCE_PORT.to_be_bytes());
            bytes.extend_from_slice(&port.to_be_bytes());
            bytes.extend_from_slice(&[0; 8]); // verification tag, checksum
        }
        ICMP | ICMPV6 => {
            let kind = if protocol == ICMP { 8 } else { 128 };
            bytes.extend_from_slice(&[kind, 0, 0, 0]);
            bytes.extend_from_slice(&(std::process::id() as u16).to_be_bytes());
            bytes.extend_from_slice(&seq.to_be_bytes());
        }
        _ => {}
    }
    bytes.extend_from_slice(marker);
    if protocol == ICMP {
        // The kernel computes ICMPv6 checksums of raw sockets, not ICMP's.
        let sum = checksum(&bytes);
        bytes[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    bytes
}

/// The Internet checksum of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 header for `payload_len` bytes of `protocol`; the checksum is
/// computed (the kernel overwrites it under IP_HDRINCL anyway).
fn ipv4_header(
    protocol: u8,
    source: Ipv4Addr,
    dest: Ipv4Addr,
    payload_len: usize,
    seq: u16,
) -> Vec<u8> {
    let mut header = vec![0x45, 0];
    header.extend_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    header.extend_from_slice(&(std::process::id() as u16).wrapping_add(seq).to_be_bytes());
    header.extend_from_slice(&[0, 0, 64, protocol, 0, 0]); // no fragments, TTL 64
    header.extend_from_slice(&source.octets());
    header.extend_from_slice(&dest.octets());
    let sum = checksum(&header);
    header[10..12].copy_from_slice(&sum.to_be_bytes());
    header
}

fn socket(domain: i32, kind: i32, protocol: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: no pointers.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_int_option(fd: &OwnedFd, level: i32, name: i32, value: i32) -> std::io::Result<()> {
    // SAFETY: the option is a c_int, as the kernel reads it.
    let result = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `ip` (port 0) as a sockaddr_in or sockaddr_in6.
fn sockaddr_of(ip: IpAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match ip {
        IpAddr::V4(ip) => {
            // SAFETY: sockaddr_storage is large and aligned enough for any sockaddr.
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from_ne_bytes(ip.octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        IpAddr::V6(ip) => {
            // SAFETY: as above.
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = ip.octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn send_to(
    fd: &OwnedFd,
    bytes: &[u8],
    addr: *const libc::sockaddr,
    len: libc::socklen_t,
) -> std::io::Result<()> {
    // SAFETY: `bytes` and `addr` (of `len` bytes) are valid for the call.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            addr,
            len,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn send_to_ip(fd: &OwnedFd, bytes: &[u8], ip: IpAddr) -> std::io::Result<()> {
    let (addr, len) = sockaddr_of(ip);
    send_to(
        fd,
        bytes,
        (&addr as *const libc::sockaddr_storage).cast(),
        len,
    )
}

fn raw(protocol: u8, ip: IpAddr, port: u16, marker: &[u8], seq: u16) -> std::io::Result<()> {
    let domain = if ip.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = socket(domain, libc::SOCK_RAW, protocol.into())?;
    if ip.is_ipv6() {
        // UDP over IPv6 needs a checksum; TCP's is only right this way too.
        // (The kernel always computes ICMPv6's; SCTP's is not this kind.)
        match protocol {
            UDP => set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM, 6)?,
            TCP => set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_CHECKSUM, 16)?,
            _ => {}
        }
    }
    send_to_ip(&fd, &transport_bytes(protocol, port, marker, seq), ip)
}

fn raw_hdrincl(
    protocol: u8,
    ip: Ipv4Addr,
    port: u16,
    marker: &[u8],
    seq: u16,
) -> std::io::Result<()> {
    let fd = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
    let transport = transport_bytes(protocol, port, marker, seq);
    let mut packet = ipv4_header(protocol, Ipv4Addr::UNSPECIFIED, ip, transport.len(), seq);
    packet.extend_from_slice(&transport);
    send_to_ip(&fd, &packet, IpAddr::V4(ip))
}

/// One echo request from an ICMP echo socket; `ok` once its reply came.
fn ping(ip: IpAddr, marker: &[u8], seq: u16) -> std::io::Result<()> {
    let (domain, protocol, request, reply) = match ip {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP, 8, 0),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6, 128, 129),
    };
    let fd = socket(domain, libc::SOCK_DGRAM, protocol)?;
    // The kernel sets the identifier (the socket's) and the checksum.
    let mut message = vec![request, 0, 0, 0, 0, 0];
    message.extend_from_slice(&seq.to_be_bytes());
    message.extend_from_slice(marker);
    send_to_ip(&fd, &message, ip)?;
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut buffer = vec![0u8; 65_536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, left.as_millis().max(1) as i32) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if ready == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::ETIMEDOUT));
        }
        // SAFETY: `buffer` is valid for its length.
        let len = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if len < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::WouldBlock
                || error.kind() == std::io::ErrorKind::Interrupted
            {
                continue;
            }
            return Err(error);
        }
        // The socket hands over only replies to its own identifier; this
        // attempt's has its sequence number.
        let answer = &buffer[..len as usize];
        if answer.len() >= 8 && answer[0] == reply && answer[6..8] == seq.to_be_bytes() {
            return Ok(());
        }
    }
}

/// IFACE's MAC address, from sysfs.
fn mac_of(iface: &str) -> [u8; 6] {
    let path = format!("/sys/class/net/{iface}/address");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| fail(&format!("{path}: {e}")));
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|byte| {
            u8::from_str_radix(byte, 16).unwrap_or_else(|_| fail(&format!("{path}: {text:?}")))
        })
        .collect();
    bytes
        .try_into()
        .unwrap_or_else(|_| fail(&format!("{path}: {text:?} is no Ethernet address")))
}

/// The first IPv4 address of `iface` that getifaddrs lists.
fn first_ipv4_of(iface: &str) -> Option<Ipv4Addr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs made.
        let ifa = unsafe { &*entry };
        // SAFETY: ifa_name is a C string; ifa_addr, when set, a sockaddr of
        // its family.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if !ifa.ifa_addr.is_null()
            && name.to_bytes() == iface.as_bytes()
            && i32::from(unsafe { (*ifa.ifa_addr).sa_family }) == libc::AF_INET
        {
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            found = Some(Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()));
            break;
        }
        entry = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs, no longer used.
    unsafe { libc::freeifaddrs(list) };
    found
}

/// One broadcast Ethernet frame carrying IPv4/UDP to `addr`, from an
/// AF_PACKET socket bound to `iface`.
fn packet(
    iface: &str,
    addr: std::net::SocketAddrV4,
    marker: &[u8],
    bypass: bool,
    seq: u16,
) -> std::io::Result<()> {
    let name = std::ffi::CString::new(iface).unwrap_or_else(|_| fail("IFACE has a NUL"));
    // SAFETY: a C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        fail(&format!("no interface {iface}"));
    }
    let mac = mac_of(iface);
    let source =
        first_ipv4_of(iface).unwrap_or_else(|| fail(&format!("{iface} has no IPv4 address")));
    let ethertype = (libc::ETH_P_IP as u16).to_be();
    let fd = socket(libc::AF_PACKET, libc::SOCK_RAW, ethertype.into())?;
    if bypass {
        set_int_option(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1)?;
    }
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut link: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    link.sll_family = libc::AF_PACKET as u16;
    link.sll_protocol = ethertype;
    link.sll_ifindex = index as i32;
    let link_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `link` is a sockaddr_ll of `link_len` bytes.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&link as *const libc::sockaddr_ll).cast(),
            link_len,
        )
    } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    let transport = transport_bytes(UDP, addr.port(), marker, seq);
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&ipv4_header(UDP, source, *addr.ip(), transport.len(), seq));
    frame.extend_from_slice(&transport);
    link.sll_halen = 6;
    link.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    send_to(
        &fd,
        &frame,
        (&link as *const libc::sockaddr_ll).cast(),
        link_len,
    )
}

/// Reports every IP packet received in this namespace that carries `marker`.
fn catch(marker: &[u8]) -> ! {
    if marker.is_empty() {
        fail("MARKER must not be empty");
    }
    let fd = socket(
        libc::AF_PACKET,
        libc::SOCK_RAW,
        (libc::ETH_P_ALL as u16).to_be().into(),
    )
    .unwrap_or_else(|e| fail(&format!("AF_PACKET socket: {e}")));
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening").unwrap();
    out.flush().unwrap();
    let mut buffer = vec![0u8; 1 << 18];
    loop {
        // SAFETY: all-zero is a valid sockaddr_ll.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: `buffer` and `from` are valid for their lengths.
        let len = unsafe {
            libc::recvfrom(
                fd.as_raw_fd(),
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut from_len,
            )
        };
        if len < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            fail(&format!("receiving: {error}"));
        }
        // Sent from this namespace (lo shows each packet going out and in).
        if from.sll_pkttype == libc::PACKET_OUTGOING {
            continue;
        }
        let frame = &buffer[..len as usize];
        if !frame.windows(marker.len()).any(|window| window == marker) {
            continue;
        }
        // Ethernet and loopback frames start with a 14-byte Ethernet header.
        let link_header = match from.sll_hatype {
            libc::ARPHRD_ETHER | libc::ARPHRD_LOOPBACK => 14,
            _ => 0,
        };
        let Some(packet) = frame.get(link_header..) else {
            continue;
        };
        let (protocol, transport) = match u16::from_be(from.sll_protocol) as i32 {
            libc::ETH_P_IP if packet.len() >= 20 => {
                (packet[9], packet.get(usize::from(packet[0] & 0x0f) * 4..))
            }
            libc::ETH_P_IPV6 if packet.len() >= 40 => (packet[6], packet.get(40..)),
            _ => continue,
        };
        let port = match transport {
            Some(transport) if has_ports(protocol) && transport.len() >= 4 => {
                u16::from_be_bytes([transport[2], transport[3]])
            }
            _ => 0,
        };
        writeln!(out, "caught {protocol} {port}").unwrap();
        out.flush().unwrap();
    }
}

/// A DNS answer message: NAME has the A record ADDRESS (TTL 300).
fn dns_answer(id: u16, name: &str, address: Ipv4Addr) -> Vec<u8> {
    use hickory_proto::{
        op::{Message, MessageType, Query},
        rr::{Name, RData, Record, RecordType, rdata::A},
    };
    let name = Name::from_ascii(name).unwrap_or_else(|e| fail(&format!("{name}: {e}")));
    let mut message = Message::query();
    message.metadata.id = id;
    message.metadata.message_type = MessageType::Response;
    message.metadata.recursion_desired = true;
    message.metadata.recursion_available = true;
    message.add_query(Query::query(name.clone(), RecordType::A));
    message.add_answer(Record::from_rdata(name, 300, RData::A(A(address))));
    message.to_vec().expect("an answer encodes")
}

/// One UDP datagram from FROM:53, IP header and all.
fn forge_answer(from: Ipv4Addr, to: std::net::SocketAddrV4, answer: &[u8]) -> std::io::Result<()> {
    let fd = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
    let mut udp = Vec::with_capacity(8 + answer.len());
    udp.extend_from_slice(&53u16.to_be_bytes());
    udp.extend_from_slice(&to.port().to_be_bytes());
    udp.extend_from_slice(&((8 + answer.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]); // no checksum (IPv4)
    udp.extend_from_slice(answer);
    let mut packet = ipv4_header(libc::IPPROTO_UDP as u8, from, *to.ip(), udp.len(), 0);
    packet.extend_from_slice(&udp);
    send_to_ip(&fd, &packet, IpAddr::V4(*to.ip()))
}

fn await_answer(port: u16, connect_port: u16) -> std::io::Result<()> {
    let socket = UdpSocket::bind(("0.0.0.0", port))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    println!("listening");
    std::io::stdout().flush().unwrap();
    let mut buffer = vec![0; 65_535];
    let len = socket.recv(&mut buffer)?;
    buffer.truncate(len);
    match first_address(&buffer) {
        Some(ip) => connect("tcp", SocketAddr::new(ip, connect_port)),
        None => Err(std::io::Error::from_raw_os_error(NO_ADDRESS)),
    }
}

fn first_address(answer: &[u8]) -> Option<IpAddr> {
    use hickory_proto::{op::Message, rr::RData};
    let answer = Message::from_vec(answer).unwrap_or_else(|e| fail(&format!("answer: {e}")));
    answer.answers.iter().find_map(|record| match &record.data {
        RData::A(a) => Some(IpAddr::V4(a.0)),
        RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
        _ => None,
    })
}

/// The attack of a process that may make network namespaces: a resolver
/// of its own at the trusted resolver's address, in a namespace of its
/// own, whose answers reach its sockets as if they came from the real one.
fn own_netns_resolve(
    resolver: Ipv4Addr,
    name: &str,
    address: Ipv4Addr,
    connect_port: u16,
) -> std::io::Result<()> {
    let first = std::fs::File::open("/proc/self/ns/net")?;
    // SAFETY: no pointers; this process has one thread so far.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    for args in [
        &["link", "set", "lo", "up"][..],
        &["addr", "add", &format!("{resolver}/32"), "dev", "lo"][..],
    ] {
        let status = std::process::Command::new("ip").args(args).status()?;
        if !status.success() {
            fail(&format!("ip {args:?} failed in the new namespace"));
        }
    }
    let server = UdpSocket::bind((resolver, 53))?;
    let forged_name = name.to_owned();
    std::thread::spawn(move || {
        let mut buffer = vec![0; 65_535];
        while let Ok((len, from)) = server.recv_from(&mut buffer) {
            let id = u16::from_be_bytes([buffer[0], buffer[1]]);
            let _ = server.send_to(&dns_answer(id, &forged_name, address), from);
            let _ = len;
        }
    });
    let answer = resolve("udp", SocketAddr::new(resolver.into(), 53), name, "A")?;
    // SAFETY: a namespace file this process opened; setns affects the
    // calling thread, the one that connects next.
    if unsafe { libc::setns(first.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    match answer {
        Some(ip) => connect("tcp", SocketAddr::new(ip, connect_port)),
        None => Err(std::io::Error::from_raw_os_error(NO_ADDRESS)),
    }
}
