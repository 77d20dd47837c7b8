//! A test client and server with exact errno reporting.
//!
//! Client: `tg-probe [--cgroup DIR] [--count N] connect tcp|udp ADDR:PORT`
//!         `tg-probe [--cgroup DIR] [--count N] sendto ADDR:PORT` (unconnected UDP)
//! Prints `pid=<pid>`, then `ok` or `errno=<n>` per attempt.
//! With --cgroup it first moves itself into that cgroup, so every socket call
//! it makes is judged by the programs attached there.
//!
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
