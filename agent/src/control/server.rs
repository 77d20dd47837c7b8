//! Where the API listens: a unix socket (mode 0600) by default, TCP with
//! mutual TLS, or plain TCP behind an explicit flag for local development.

use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tollgate_proto::v1::{
    agent_service_server::AgentServiceServer, flow_service_server::FlowServiceServer,
    policy_service_server::PolicyServiceServer,
};
use tonic::{
    Request, Status,
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
    #[error("TLS configuration: {0}")]
    Tls(#[from] tonic::transport::Error),
}

/// A bound listener, ready to serve.
pub enum Bound {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener, Option<ServerTlsConfig>),
}

/// Binds every listener before the agent reports ready, so clients that
/// connect after that find it.
pub async fn bind(listen: &Listen) -> Result<Bound, ServeError> {
    match listen {
        Listen::Unix(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| ServeError::Io {
                    path: dir.to_owned(),
                    source,
                })?;
            }
            // A socket left by an agent that died; nobody listens on it.
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(ServeError::Io {
                        path: path.clone(),
                        source: e,
                    });
                }
                _ => {}
            }
            let listener = UnixListener::bind(path).map_err(|source| ServeError::Bind {
                addr: path.display().to_string(),
                source,
            })?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
                |source| ServeError::Io {
                    path: path.clone(),
                    source,
                },
            )?;
            Ok(Bound::Unix(listener, path.clone()))
        }
        Listen::MutualTls { addr, tls } => {
            let read = |path: &Path| {
                std::fs::read(path).map_err(|source| ServeError::Io {
                    path: path.to_owned(),
                    source,
                })
            };
            // A certificate that is presented must chain to the CA (else the
            // handshake fails); a missing one is refused per call with
            // UNAUTHENTICATED, which a client can show, by `require_client_cert`.
            let config = ServerTlsConfig::new()
                .identity(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?))
                .client_ca_root(Certificate::from_pem(read(&tls.client_ca)?))
                .client_auth_optional(true);
            let listener = bind_tcp(addr).await?;
            Ok(Bound::Tcp(listener, Some(config)))
        }
        Listen::Insecure(addr) => {
            let listener = bind_tcp(addr).await?;
            Ok(Bound::Tcp(listener, None))
        }
    }
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
fn routes(builder: &mut Server, api: Api, require_certificate: bool) -> Router {
    let check = move |request: Request<()>| {
        if !require_certificate || request.peer_certs().is_some_and(|certs| !certs.is_empty()) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "a client certificate signed by the agent's client CA is required",
            ))
        }
    };
    builder
        .add_service(PolicyServiceServer::with_interceptor(api.clone(), check))
        .add_service(FlowServiceServer::with_interceptor(api.clone(), check))
        .add_service(AgentServiceServer::with_interceptor(api, check))
}

/// Serves until `shutdown`; a unix socket is removed afterwards.
pub async fn serve(bound: Bound, api: Api, shutdown: CancellationToken) -> Result<(), ServeError> {
    match bound {
        Bound::Unix(listener, path) => {
            let result = routes(&mut Server::builder(), api, false)
                .serve_with_incoming_shutdown(
                    UnixListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                )
                .await;
            let _ = std::fs::remove_file(&path);
            result?;
        }
        Bound::Tcp(listener, tls) => {
            let mut builder = Server::builder();
            let require_certificate = tls.is_some();
            if let Some(tls) = tls {
                builder = builder.tls_config(tls)?;
            }
            routes(&mut builder, api, require_certificate)
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
