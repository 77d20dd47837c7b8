//! Where the API listens: a unix socket (mode 0600) by default, TCP with
//! mutual TLS, or plain TCP behind an explicit flag for local development.

use std::{
    net::SocketAddr,
    os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use nix::sys::stat::{Mode, umask};
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tollgate_proto::v1::{
    agent_service_server::AgentServiceServer, flow_service_server::FlowServiceServer,
    policy_service_server::PolicyServiceServer,
};
use tonic::{
    Request, Status,
    service::interceptor::InterceptedService,
    transport::{Certificate, Identity, Server, ServerTlsConfig, server::Router},
};

use super::service::Api;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    /// TCP with mutual TLS: clients must present a certificate of `client_ca`.
    MutualTls {
        addr: SocketAddr,
        tls: TlsFiles,
    },
    /// Plain TCP, no authentication (--insecure-listen).
    Insecure(SocketAddr),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("listening on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("another agent listens on {path}")]
    InUse { path: PathBuf },
    #[error("TLS configuration: {0}")]
    Tls(#[from] tonic::transport::Error),
}

/// A bound listener with its server configuration, ready to serve.
pub struct Bound {
    listener: Listener,
    server: Server,
    require_certificate: bool,
}

enum Listener {
    /// With the socket's inode, so that only this socket is removed at stop.
    Unix(UnixListener, PathBuf, u64),
    Tcp(TcpListener),
}

/// Binds a listener and checks its TLS configuration before the agent
/// reports ready: clients that connect after that find it, and a bad
/// certificate or key stops the start.
pub async fn bind(listen: &Listen) -> Result<Bound, ServeError> {
    match listen {
        Listen::Unix(path) => bind_unix(path),
        Listen::MutualTls { addr, tls } => {
            let read = |path: &Path| {
                std::fs::read(path).map_err(|source| ServeError::Io {
                    path: path.to_owned(),
                    source,
                })
            };
            // A certificate that is presented must chain to the CA, else the
            // handshake fails; a call without one gets UNAUTHENTICATED from
            // `routes`, which a client can show.
            let config = ServerTlsConfig::new()
                .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?))
                .client_ca_root(Certificate::from_pem(read(&tls.client_ca)?))
                .client_auth_optional(true);
            let server = Server::builder().tls_config(config)?;
            Ok(Bound {
                listener: Listener::Tcp(bind_tcp(addr).await?),
                server,
                require_certificate: true,
            })
        }
        Listen::Insecure(addr) => Ok(Bound {
            listener: Listener::Tcp(bind_tcp(addr).await?),
            server: Server::builder(),
            require_certificate: false,
        }),
    }
}

fn bind_unix(path: &Path) -> Result<Bound, ServeError> {
    let io = |source| ServeError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ServeError::Io {
            path: dir.to_owned(),
            source,
        })?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ServeError::InUse {
                path: path.to_owned(),
            });
        }
        // Left by an agent that died: nobody listens on it.
        std::fs::remove_file(path).map_err(io)?;
    }
    // Created 0600 from the start: no moment in which others could connect.
    let previous = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(previous);
    let listener = bound.map_err(|source| ServeError::Bind {
        addr: path.display().to_string(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    let inode = std::fs::metadata(path).map_err(io)?.ino();
    Ok(Bound {
        listener: Listener::Unix(listener, path.to_owned(), inode),
        server: Server::builder(),
        require_certificate: false,
    })
}

async fn bind_tcp(addr: &SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// The services, unauthenticated (a 0600 unix socket: only root connects)
/// or requiring a verified client certificate on every call.
fn routes(server: &mut Server, api: Api, require_certificate: bool) -> Router {
    let check = move |request: Request<()>| {
        if !require_certificate || request.peer_certs().is_some_and(|certs| !certs.is_empty()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "a client certificate signed by the agent's client CA is required",
            ))
        }
    };
    let policies = PolicyServiceServer::new(api.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    server
        .add_service(InterceptedService::new(policies, check))
        .add_service(FlowServiceServer::with_interceptor(api.clone(), check))
        .add_service(AgentServiceServer::with_interceptor(api, check))
}

/// The largest policy set a call may carry or return: 100k rules in YAML
/// terms are about 5 MiB as protobuf, beyond tonic's 4 MiB default.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Serves until `shutdown` and open calls end; then removes its unix
/// socket, unless another agent has put its own there since.
pub async fn serve(bound: Bound, api: Api, shutdown: CancellationToken) -> Result<(), ServeError> {
    let Bound {
        listener,
        mut server,
        require_certificate,
    } = bound;
    let router = routes(&mut server, api, require_certificate);
    match listener {
        Listener::Unix(listener, path, inode) => {
            let result = router
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                )
                .await;
            if std::fs::metadata(&path).is_ok_and(|m| m.ino() == inode) {
                let _ = std::fs::remove_file(&path);
            }
            result?;
        }
        Listener::Tcp(listener) => {
            router
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                )
                .await?;
        }
    }
    Ok(())
}

/// `unix:PATH` or `tcp://ADDR` (the latter needs `tls`).
pub fn parse_listen(text: &str, tls: Option<TlsFiles>) -> Result<Listen, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        if !path.starts_with('/') {
            return Err(format!("{text:?}: the socket path must be absolute"));
        }
        return Ok(Listen::Unix(PathBuf::from(path)));
    }
    if let Some(addr) = text.strip_prefix("tcp://") {
        let addr: SocketAddr = addr
            .parse()
            .map_err(|_| format!("{text:?}: {addr:?} is not an address like 0.0.0.0:7443"))?;
        let tls = tls.ok_or_else(|| {
            format!("{text:?}: TCP needs mutual TLS (--tls-cert, --tls-key, --tls-client-ca); for a local test without it use --insecure-listen")
        })?;
        return Ok(Listen::MutualTls { addr, tls });
    }
    Err(format!("{text:?} is neither unix:PATH nor tcp://ADDR"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("unix:/run/t.sock", None),
            Ok(Listen::Unix("/run/t.sock".into()))
        );
        assert!(
            parse_listen("unix:t.sock", None)
                .unwrap_err()
                .contains("absolute")
        );
        assert!(
            parse_listen("tcp://0.0.0.0:7443", None)
                .unwrap_err()
                .contains("--insecure-listen")
        );
        let tls = TlsFiles {
            cert: "c".into(),
            key: "k".into(),
            client_ca: "ca".into(),
        };
        assert!(matches!(
            parse_listen("tcp://127.0.0.1:7443", Some(tls)),
            Ok(Listen::MutualTls { .. })
        ));
        assert!(parse_listen("http://x", None).is_err());
    }
}
