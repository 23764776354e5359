//! Connecting to the agent's API over its Unix socket or TCP with TLS.

use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use vipsec_proto::v1::agent_client::AgentClient;

use super::CliError;
use crate::config::ApiEndpoint;

pub struct Target {
    pub endpoint: String,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

fn read(path: &PathBuf) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
}

pub async fn connect(t: &Target) -> Result<AgentClient<Channel>, CliError> {
    let endpoint =
        ApiEndpoint::parse(&t.endpoint).map_err(|e| CliError::Usage(format!("--endpoint {e}")))?;
    let channel = match endpoint {
        ApiEndpoint::Unix(path) => {
            let shown = path.display().to_string();
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(|e| {
                    CliError::Runtime(format!(
                        "cannot reach the agent at unix://{shown}: {} (is it running?)",
                        source_text(&e)
                    ))
                })?
        }
        ApiEndpoint::Tcp(addr) => {
            let host = addr
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']))
                .unwrap_or(&addr)
                .to_string();
            let mut tls = ClientTlsConfig::new().domain_name(host);
            if let Some(ca) = &t.tls_ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(c), Some(k)) = (&t.tls_cert, &t.tls_key) {
                tls = tls.identity(Identity::from_pem(read(c)?, read(k)?));
            }
            Endpoint::from_shared(format!("https://{addr}"))
                .map_err(|e| CliError::Usage(format!("--endpoint {:?}: {e}", t.endpoint)))?
                .tls_config(tls)
                .map_err(|e| CliError::Usage(format!("TLS: {e}")))?
                .connect()
                .await
                .map_err(|e| {
                    CliError::Runtime(format!(
                        "cannot reach the agent at {}: {}",
                        t.endpoint,
                        source_text(&e)
                    ))
                })?
        }
    };
    Ok(AgentClient::new(channel))
}

fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s = format!("{s}: {inner}");
        cur = inner.source();
    }
    s
}
