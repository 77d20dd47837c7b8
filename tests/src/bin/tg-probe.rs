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
//! Server: `tg-probe serve PORT...` listens on [::]:PORT (dual-stack TCP),
//! prints `listening`, and accepts until killed.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
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
        _ => fail(
            "usage: tg-probe [--cgroup DIR] [--count N] connect tcp|udp ADDR:PORT | sendto ADDR:PORT | serve PORT...",
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
