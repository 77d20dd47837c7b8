//! Syslog, RFC 5424 messages over UDP (one per datagram, cut to a size the
//! receiver takes), TCP (RFC 6587: octet counting, or a newline after each
//! message) or TLS (RFC 5425), with a CEF or JSON payload.
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

/// How messages are delimited on a TCP or TLS stream (RFC 6587).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SyslogFraming {
    /// `<length> <message>` (RFC 6587 3.4.1, the only framing RFC 5425
    /// allows for TLS): messages may hold anything.
    #[default]
    OctetCounting,
    /// `<message>\n` (RFC 6587 3.4.2), which receivers such as syslog-ng's
    /// `network()` source need. The formats escape line breaks inside
    /// values, so a newline ends exactly one record.
    Newline,
}

/// Whether a message went out whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Encoded {
    Whole,
    /// Cut to the sink's `maxMessageBytes`.
    Truncated,
}

/// The `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - ` header and the
/// payload: one complete message, cut to `max_bytes` when given (UDP: a
/// datagram the receiver would cut or drop anyway).
pub fn encode(
    facility: u8,
    max_bytes: Option<usize>,
    meta: &RecordMeta,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> Encoded {
    let start = out.len();
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
    match max_bytes {
        Some(max) if out.len() - start > max => {
            let kept = cut_point(&out[start..], max);
            out.truncate(start + kept);
            Encoded::Truncated
        }
        _ => Encoded::Whole,
    }
}

/// The length of the longest prefix of `message` within `max` bytes that
/// ends neither inside a UTF-8 character nor on a lone escaping backslash
/// (a CEF value would then escape whatever a receiver appends).
fn cut_point(message: &[u8], max: usize) -> usize {
    let mut end = max.min(message.len());
    // Continuation bytes are 0b10xxxxxx: back off to a character's start.
    while end > 0 && end < message.len() && message[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    let backslashes = message[..end]
        .iter()
        .rev()
        .take_while(|&&b| b == b'\\')
        .count();
    end - backslashes % 2
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
    framing: SyslogFraming,
    tls: Option<TlsConnector>,
    connection: Option<Connection>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl SyslogSender {
    /// `ca_file`: PEM certificates the TLS server's must chain to (needed for tls://).
    /// `framing`: for TCP and TLS.
    pub fn new(
        address: SyslogAddress,
        framing: SyslogFraming,
        ca_file: Option<&Path>,
    ) -> io::Result<Self> {
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
            framing,
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
            Connection::Tcp(stream) => write_framed(stream, self.framing, messages).await,
            Connection::Tls(stream) => write_framed(stream.as_mut(), self.framing, messages).await,
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

/// Writes the batch in one go, each message framed.
async fn write_framed<W: tokio::io::AsyncWrite + Unpin>(
    stream: &mut W,
    framing: SyslogFraming,
    messages: &[Vec<u8>],
) -> io::Result<()> {
    let mut buffer = Vec::with_capacity(messages.iter().map(|m| m.len() + 8).sum());
    for message in messages {
        frame(framing, message, &mut buffer);
    }
    stream.write_all(&buffer).await?;
    stream.flush().await
}

fn frame(framing: SyslogFraming, message: &[u8], out: &mut Vec<u8>) {
    match framing {
        SyslogFraming::OctetCounting => {
            use std::io::Write;
            let _ = write!(out, "{} ", message.len());
            out.extend_from_slice(message);
        }
        SyslogFraming::Newline => {
            out.extend_from_slice(message);
            out.push(b'\n');
        }
    }
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
        assert_eq!(
            encode(16, None, &meta, b"CEF:0|x", &mut out),
            Encoded::Whole
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "<132>1 2026-11-24T08:00:00.123456Z aks-node-0 tollgate {} flow - CEF:0|x",
                std::process::id()
            )
        );
        let mut out = Vec::new();
        let _ = encode(
            16,
            None,
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

    #[test]
    fn long_messages_are_cut_to_the_limit_at_a_clean_point() {
        let meta = RecordMeta {
            kind: "flow",
            time: "2026-11-24T08:00:00.123456789Z",
            unix_nanos: 0,
            node: "n",
            severity: Severity::Info,
            seq: Some(1),
        };
        let header = {
            let mut out = Vec::new();
            let _ = encode(16, None, &meta, b"", &mut out);
            out.len()
        };
        let payload = "CEF:0|x|sproc=é\\\\ab".as_bytes();
        let whole = header + payload.len();
        let mut out = b"earlier records stay".to_vec();
        assert_eq!(
            encode(16, Some(whole), &meta, payload, &mut out),
            Encoded::Whole
        );
        assert_eq!(out.len(), 20 + whole);
        // Cutting inside `é` keeps neither of its bytes; cutting after the
        // first of a `\\` pair drops the lone escape.
        for (max, kept) in [
            (header + 15, "CEF:0|x|sproc=".len()),
            (header + 16, "CEF:0|x|sproc=é".len()),
            (header + 17, "CEF:0|x|sproc=é".len()),
            (header + 18, "CEF:0|x|sproc=é\\\\".len()),
            (header + 19, "CEF:0|x|sproc=é\\\\a".len()),
        ] {
            let mut out = Vec::new();
            assert_eq!(
                encode(16, Some(max), &meta, payload, &mut out),
                Encoded::Truncated,
                "{max}"
            );
            assert_eq!(out.len(), header + kept, "cut at {max}");
            assert!(std::str::from_utf8(&out).is_ok());
        }
    }

    #[test]
    fn tcp_framing_octet_counting_or_newline() {
        let mut out = Vec::new();
        frame(SyslogFraming::OctetCounting, b"<134>1 a", &mut out);
        frame(SyslogFraming::OctetCounting, b"<134>1 bc", &mut out);
        assert_eq!(out, b"8 <134>1 a9 <134>1 bc");
        let mut out = Vec::new();
        frame(SyslogFraming::Newline, b"<134>1 a", &mut out);
        frame(SyslogFraming::Newline, b"<134>1 bc", &mut out);
        assert_eq!(out, b"<134>1 a\n<134>1 bc\n");
    }
}
