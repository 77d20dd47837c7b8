//! Syslog, RFC 5424 messages over UDP (one per datagram), TCP (octet
//! counting, RFC 6587) or TLS (RFC 5425), with a CEF or JSON payload.
//!
//! Syslog has no acknowledgements: what the kernel accepted on a TCP or TLS
//! connection that then breaks may be lost, and is not resent (the spool
//! covers the time the receiver is unreachable, not bytes in flight).

use std::{io, net::SocketAddr, path::Path, sync::Arc, time::Duration};

use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use tokio::{
    io::AsyncWriteExt,
    net::{TcpStream, UdpSocket},
};
use tokio_rustls::{TlsConnector, client::TlsStream, rustls};

use super::{RecordMeta, Severity};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyslogProtocol {
    Udp,
    Tcp,
    Tls,
}

/// `udp://host:port`, `tcp://host:port` or `tls://host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyslogAddress {
    pub protocol: SyslogProtocol,
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for SyslogAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("{text:?} is not udp://, tcp:// or tls://HOST:PORT"))?;
        let protocol = match scheme {
            "udp" => SyslogProtocol::Udp,
            "tcp" => SyslogProtocol::Tcp,
            "tls" => SyslogProtocol::Tls,
            _ => {
                return Err(format!(
                    "{text:?}: unknown scheme {scheme:?} (udp, tcp or tls)"
                ));
            }
        };
        let (host, port) = rest
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse().ok()?)))
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| format!("{text:?} needs HOST:PORT"))?;
        Ok(Self {
            protocol,
            host: host.to_owned(),
            port,
        })
    }
}

/// The `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - ` header and the
/// payload: one complete message.
pub fn encode(facility: u8, meta: &RecordMeta, payload: &[u8], out: &mut Vec<u8>) {
    use std::io::Write;
    let severity = match meta.severity {
        Severity::Warning => 4,
        Severity::Notice => 5,
        Severity::Info => 6,
    };
    // RFC 5424 allows at most six fractional digits; records have nine.
    let time = match meta.time.split_once('.') {
        Some((seconds, fraction)) => format!(
            "{seconds}.{}Z",
            &fraction[..fraction.len().min(7).saturating_sub(1)]
        ),
        None => meta.time.to_owned(),
    };
    let _ = write!(
        out,
        "<{}>1 {time} {} tollgate {} {} - ",
        u16::from(facility) * 8 + severity,
        printable_or_nil(meta.node),
        std::process::id(),
        meta.kind
    );
    out.extend_from_slice(payload);
}

/// Header fields are printable US-ASCII without spaces, else `-`.
fn printable_or_nil(field: &str) -> &str {
    if !field.is_empty() && field.bytes().all(|b| (33..=126).contains(&b)) {
        field
    } else {
        "-"
    }
}

enum Connection {
    Udp(UdpSocket),
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

pub struct SyslogSender {
    address: SyslogAddress,
    tls: Option<TlsConnector>,
    connection: Option<Connection>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl SyslogSender {
    /// `ca_file`: PEM certificates the TLS server's must chain to (needed for tls://).
    pub fn new(address: SyslogAddress, ca_file: Option<&Path>) -> io::Result<Self> {
        let tls = match address.protocol {
            SyslogProtocol::Tls => {
                let ca_file = ca_file.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "tls:// needs caFile")
                })?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("{}: {e}", ca_file.display()),
                    )
                })? {
                    let cert = cert.map_err(|e| {
                        io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("{}: {e}", ca_file.display()),
                        )
                    })?;
                    roots
                        .add(cert)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                }
                let config = rustls::ClientConfig::builder()
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                Some(TlsConnector::from(Arc::new(config)))
            }
            _ => None,
        };
        Ok(Self {
            address,
            tls,
            connection: None,
        })
    }

    /// Sends every message of the batch, in order; on error the connection
    /// is dropped (the next call connects again) and the batch is to be
    /// sent again.
    pub async fn send(&mut self, messages: &[Vec<u8>]) -> io::Result<()> {
        let result = self.send_on_connection(messages).await;
        if result.is_err() {
            self.connection = None;
        }
        result
    }

    async fn send_on_connection(&mut self, messages: &[Vec<u8>]) -> io::Result<()> {
        if self.connection.is_none() {
            self.connection = Some(
                tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "connecting to the syslog receiver")
                    })??,
            );
        }
        let connection = self.connection.as_mut().expect("connected above");
        match connection {
            Connection::Udp(socket) => {
                for message in messages {
                    socket.send(message).await?;
                }
                Ok(())
            }
            Connection::Tcp(stream) => write_framed(stream, messages).await,
            Connection::Tls(stream) => write_framed(stream.as_mut(), messages).await,
        }
    }

    async fn connect(&self) -> io::Result<Connection> {
        let target = (self.address.host.as_str(), self.address.port);
        match self.address.protocol {
            SyslogProtocol::Udp => {
                let peer: SocketAddr = tokio::net::lookup_host(target)
                    .await?
                    .next()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
                let local: SocketAddr = if peer.is_ipv4() {
                    "0.0.0.0:0".parse().expect("valid")
                } else {
                    "[::]:0".parse().expect("valid")
                };
                let socket = UdpSocket::bind(local).await?;
                socket.connect(peer).await?;
                Ok(Connection::Udp(socket))
            }
            SyslogProtocol::Tcp => Ok(Connection::Tcp(TcpStream::connect(target).await?)),
            SyslogProtocol::Tls => {
                let tcp = TcpStream::connect(target).await?;
                let name = ServerName::try_from(self.address.host.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let tls = self.tls.as_ref().expect("made for tls://");
                Ok(Connection::Tls(Box::new(tls.connect(name, tcp).await?)))
            }
        }
    }
}

/// Octet counting: `<length> <message>`, so messages may hold newlines.
async fn write_framed<W: tokio::io::AsyncWrite + Unpin>(
    stream: &mut W,
    messages: &[Vec<u8>],
) -> io::Result<()> {
    let mut buffer = Vec::with_capacity(messages.iter().map(|m| m.len() + 8).sum());
    for message in messages {
        buffer.extend_from_slice(message.len().to_string().as_bytes());
        buffer.push(b' ');
        buffer.extend_from_slice(message);
    }
    stream.write_all(&buffer).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            "tls://siem.example:6514".parse(),
            Ok(SyslogAddress {
                protocol: SyslogProtocol::Tls,
                host: "siem.example".into(),
                port: 6514
            })
        );
        assert_eq!(
            "udp://[fd00::1]:514".parse::<SyslogAddress>().unwrap().host,
            "fd00::1"
        );
        assert!("syslog.example:514".parse::<SyslogAddress>().is_err());
        assert!("http://x:1".parse::<SyslogAddress>().is_err());
        assert!("tcp://x".parse::<SyslogAddress>().is_err());
    }

    #[test]
    fn rfc5424_header() {
        let meta = RecordMeta {
            kind: "flow",
            time: "2026-11-24T08:00:00.123456789Z",
            unix_nanos: 0,
            node: "aks-node-0",
            severity: Severity::Warning,
            seq: Some(1),
        };
        let mut out = Vec::new();
        encode(16, &meta, b"CEF:0|x", &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "<132>1 2026-11-24T08:00:00.123456Z aks-node-0 tollgate {} flow - CEF:0|x",
                std::process::id()
            )
        );
        let mut out = Vec::new();
        encode(
            16,
            &RecordMeta {
                node: "bad name",
                severity: Severity::Info,
                ..meta
            },
            b"{}",
            &mut out,
        );
        assert!(
            String::from_utf8(out)
                .unwrap()
                .starts_with("<134>1 2026-11-24T08:00:00.123456Z - tollgate")
        );
    }
}
