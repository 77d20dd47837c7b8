//! rsyslog as a syslog receiver, started by a test on a loopback port, plain
//! TCP or TLS, writing each message it parsed as one line of its fields:
//! `<protocol version>|<hostname>|<app name>|<msgid>|<pri>|<msg>`.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
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

impl Rsyslog {
    pub fn start_tcp(name: &str) -> Self {
        Self::start(name, None)
    }

    /// TLS with the server certificate and key (PEM) in `certs` (made by
    /// `make_certificates`: server.pem, server.key).
    pub fn start_tls(name: &str, certs: &std::path::Path) -> Self {
        Self::start(name, Some(certs))
    }

    fn start(name: &str, certs: Option<&std::path::Path>) -> Self {
        let dir = TestDir::new(&format!("rsyslog-{name}"));
        let port = free_port();
        let d = dir.path.display();
        let (global_tls, module_tls) = match certs {
            Some(certs) => (
                format!(
                    " defaultNetstreamDriver=\"gtls\" defaultNetstreamDriverCAFile=\"{c}/ca.pem\" \
                     defaultNetstreamDriverCertFile=\"{c}/server.pem\" defaultNetstreamDriverKeyFile=\"{c}/server.key\"",
                    c = certs.display()
                ),
                " streamDriver.name=\"gtls\" streamDriver.mode=\"1\" streamDriver.authMode=\"anon\"",
            ),
            None => (String::new(), ""),
        };
        let conf = format!(
            "global(workDirectory=\"{d}\"{global_tls})\n\
             module(load=\"imtcp\"{module_tls})\n\
             template(name=\"fields\" type=\"string\" string=\"%protocol-version%|%hostname%|%app-name%|%msgid%|%pri%|%msg%\\n\")\n\
             ruleset(name=\"out\") {{ action(type=\"omfile\" file=\"{d}/received.log\" template=\"fields\" flushOnTXEnd=\"on\" asyncWriting=\"off\") }}\n\
             input(type=\"imtcp\" port=\"{port}\" address=\"127.0.0.1\" ruleset=\"out\")\n"
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
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
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

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
