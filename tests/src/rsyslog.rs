//! rsyslog as a syslog receiver, started by a test on a loopback port (TCP,
//! TCP that takes newline framing only, TLS, or UDP), writing each message
//! it parsed as one line of its fields:
//! `<protocol version>|<hostname>|<app name>|<msgid>|<pri>|<msg>`.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::TestDir;

pub struct Rsyslog {
    pub port: u16,
    dir: TestDir,
    child: Child,
}

/// What rsyslog listens with.
enum Input<'a> {
    Tcp,
    /// TCP with octet-counted framing off, as receivers that split the
    /// stream at newlines only (syslog-ng's `network()`).
    TcpNewlineOnly,
    /// With the server certificate and key in this directory.
    Tls(&'a std::path::Path),
    /// UDP, taking datagrams of up to this many bytes.
    Udp(usize),
}

impl Rsyslog {
    pub fn start_tcp(name: &str) -> Self {
        Self::start(name, Input::Tcp)
    }

    pub fn start_tcp_newline_only(name: &str) -> Self {
        Self::start(name, Input::TcpNewlineOnly)
    }

    /// TLS with the server certificate and key (PEM) in `certs` (made by
    /// `make_certificates`: server.pem, server.key).
    pub fn start_tls(name: &str, certs: &std::path::Path) -> Self {
        Self::start(name, Input::Tls(certs))
    }

    /// UDP; rsyslog takes datagrams of up to `max_message_bytes`.
    pub fn start_udp(name: &str, max_message_bytes: usize) -> Self {
        Self::start(name, Input::Udp(max_message_bytes))
    }

    fn start(name: &str, input: Input) -> Self {
        let dir = TestDir::new(&format!("rsyslog-{name}"));
        let port = match input {
            Input::Udp(_) => free_udp_port(),
            _ => free_port(),
        };
        let d = dir.path.display();
        let (global_tls, module_tls) = match input {
            Input::Tls(certs) => (
                format!(
                    " defaultNetstreamDriver=\"gtls\" defaultNetstreamDriverCAFile=\"{c}/ca.pem\" \
                     defaultNetstreamDriverCertFile=\"{c}/server.pem\" defaultNetstreamDriverKeyFile=\"{c}/server.key\"",
                    c = certs.display()
                ),
                " streamDriver.name=\"gtls\" streamDriver.mode=\"1\" streamDriver.authMode=\"anon\"",
            ),
            _ => (String::new(), ""),
        };
        let (max_message_size, listener) = match input {
            Input::Udp(max) => (
                format!(" maxMessageSize=\"{max}\""),
                format!(
                    "module(load=\"imudp\")\n\
                     input(type=\"imudp\" port=\"{port}\" address=\"127.0.0.1\" ruleset=\"out\")\n"
                ),
            ),
            _ => (
                String::new(),
                format!(
                    "module(load=\"imtcp\"{module_tls})\n\
                     input(type=\"imtcp\" port=\"{port}\" address=\"127.0.0.1\" ruleset=\"out\"{})\n",
                    if matches!(input, Input::TcpNewlineOnly) {
                        " supportOctetCountedFraming=\"off\""
                    } else {
                        ""
                    }
                ),
            ),
        };
        let conf = format!(
            "global(workDirectory=\"{d}\"{global_tls}{max_message_size})\n\
             {listener}\
             template(name=\"fields\" type=\"string\" string=\"%protocol-version%|%hostname%|%app-name%|%msgid%|%pri%|%msg%\\n\")\n\
             ruleset(name=\"out\") {{ action(type=\"omfile\" file=\"{d}/received.log\" template=\"fields\" flushOnTXEnd=\"on\" asyncWriting=\"off\") }}\n"
        );
        std::fs::write(dir.path.join("rsyslog.conf"), conf).unwrap();
        let child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(dir.path.join("rsyslog.conf"))
            .arg("-i")
            .arg(dir.path.join("rsyslog.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting rsyslogd (scripts/setup.sh installs it)");
        let receiver = Self { port, dir, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let listening = || match input {
            Input::Udp(_) => udp_port_bound(port),
            _ => std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok(),
        };
        while !listening() {
            assert!(
                Instant::now() < deadline,
                "rsyslogd did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        receiver
    }

    pub fn output(&self) -> PathBuf {
        self.dir.path.join("received.log")
    }

    /// The lines rsyslog wrote, once there are at least `count` (or the
    /// timeout passed).
    pub fn wait_for_lines(&self, count: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines: Vec<String> = std::fs::read_to_string(self.output())
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect();
            if lines.len() >= count || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_udp_port() -> u16 {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether something listens on this UDP port (binding it fails).
fn udp_port_bound(port: u16) -> bool {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_err()
}

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
