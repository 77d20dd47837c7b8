//! Connecting to an agent's control API: `unix:PATH`, `https://HOST:PORT`
//! (mutual TLS) or `http://HOST:PORT` (an agent's --insecure-listen).

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Client credentials for https:// agents.
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Address(String),
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("connecting to {agent}: {source}")]
    Transport {
        agent: String,
        source: tonic::transport::Error,
    },
}

pub async fn connect(agent: &str, tls: &ClientTls) -> Result<Channel, ConnectError> {
    let transport = |source| ConnectError::Transport {
        agent: agent.to_owned(),
        source,
    };
    if let Some(path) = agent.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        // The URI is required by the API but unused: the connector decides.
        return Endpoint::from_static("http://agent.local")
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .map_err(transport);
    }
    if agent.starts_with("https://") {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| ConnectError::Read {
                path: path.clone(),
                source,
            })
        };
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &tls.ca {
            config = config.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        match (&tls.cert, &tls.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(read(cert)?, read(key)?))
            }
            (None, None) => {}
            _ => return Err(ConnectError::Address("--cert and --key go together".into())),
        }
        let endpoint = Endpoint::from_shared(agent.to_owned()).map_err(transport)?;
        return endpoint
            .tls_config(config)
            .map_err(transport)?
            .connect()
            .await
            .map_err(transport);
    }
    if agent.starts_with("http://") {
        let endpoint = Endpoint::from_shared(agent.to_owned()).map_err(transport)?;
        return endpoint.connect().await.map_err(transport);
    }
    Err(ConnectError::Address(format!(
        "{agent:?} is not unix:PATH, https://HOST:PORT or http://HOST:PORT"
    )))
}
