//! `[api]`: the Unix socket the agent always serves and the optional TLS listener.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Problems;

pub const DEFAULT_API_ENDPOINT: &str = "unix:///run/vipsec/agent.sock";

/// The agent's API, which the `vipsec` client commands use.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The Unix socket the CLI, the cluster manager's scripts and the probes reach the
    /// agent on: `unix:///path` (created 0600, root only, in a directory of the agent's
    /// user that nobody else can write; created 0700 when missing, a link or a shared
    /// sticky directory such as /tmp refused). Always served.
    #[serde(default = "default_api_endpoint")]
    pub endpoint: String,
    /// A TCP listener in addition to the socket, for remote management: `tcp://host:port`,
    /// TLS required (`api.tls_cert`, `api.tls_key`). Changes (drain, mode, drills,
    /// policies, log level) over TCP need client certificates (`api.tls_client_ca`);
    /// without it TCP serves reads only.
    pub tcp: Option<String>,
    /// Server certificate (PEM) of the TCP listener; set together with `api.tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA.
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            endpoint: default_api_endpoint(),
            tcp: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

fn default_api_endpoint() -> String {
    DEFAULT_API_ENDPOINT.to_string()
}

/// Where the API listens (daemon) or connects (CLI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiEndpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl ApiEndpoint {
    pub fn parse(s: &str) -> Result<ApiEndpoint, String> {
        if let Some(path) = s.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{s:?}: the socket path must be absolute (unix:///run/...)"
                ));
            }
            Ok(ApiEndpoint::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s
            .strip_prefix("tcp://")
            .or_else(|| s.strip_prefix("https://"))
        {
            let Some((host, port)) = addr.rsplit_once(':') else {
                return Err(format!("{s:?}: expected tcp://HOST:PORT"));
            };
            if port.parse::<u16>().is_err() || host.is_empty() {
                return Err(format!("{s:?}: expected tcp://HOST:PORT"));
            }
            // An IPv6 host goes in brackets (tcp://[2001:db8::1]:7443): unbracketed, the
            // port cannot be told from the address, and the https:// URI the client builds
            // would be invalid.
            if let Some(inner) = host.strip_prefix('[') {
                if inner
                    .strip_suffix(']')
                    .and_then(|h| h.parse::<std::net::Ipv6Addr>().ok())
                    .is_none()
                {
                    return Err(format!(
                        "{s:?}: {host:?} is not a bracketed IPv6 address ([2001:db8::1])"
                    ));
                }
            } else if host.contains(':') {
                return Err(format!(
                    "{s:?}: an IPv6 address needs brackets: tcp://[{host}]:{port}"
                ));
            }
            Ok(ApiEndpoint::Tcp(addr.to_string()))
        } else {
            Err(format!("{s:?}: expected unix:///path or tcp://host:port"))
        }
    }
}

impl ApiConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        match ApiEndpoint::parse(&self.endpoint) {
            Err(e) => p.bad("api.endpoint", e),
            Ok(ApiEndpoint::Tcp(_)) => p.bad(
                "api.endpoint",
                format!(
                    "{:?} is TCP; api.endpoint is the Unix socket that vipsec health, the cluster manager's scripts and the probes use, and it is always served: keep it unix:// and put the TCP listener in api.tcp",
                    self.endpoint
                ),
            ),
            Ok(ApiEndpoint::Unix(_)) => {}
        }
        if let Some(tcp) = &self.tcp {
            match ApiEndpoint::parse(tcp) {
                Err(e) => p.bad("api.tcp", e),
                Ok(ApiEndpoint::Unix(_)) => p.bad(
                    "api.tcp",
                    format!("{tcp:?} is a Unix socket; api.tcp is a tcp://host:port listener"),
                ),
                Ok(ApiEndpoint::Tcp(_)) => {
                    if self.tls_cert.is_none() || self.tls_key.is_none() {
                        p.bad(
                            "api.tcp",
                            format!("{tcp:?} needs TLS: set api.tls_cert and api.tls_key"),
                        );
                    }
                }
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            p.bad(
                "api.tls_key",
                "api.tls_cert and api.tls_key must be set together",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn ipv6_listeners_need_brackets() {
        for bad in [
            "tcp://2001:db8::1:7443",
            "tcp://[2001:db8::1:7443",
            "tcp://[vip.example]:7443",
            "tcp://[2001:db8::1]",
        ] {
            assert!(ApiEndpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_unix_socket_is_always_served_and_tcp_comes_in_addition() {
        let base = "node = \"be1\"\n[api]\n";
        let p = Config::parse(&format!("{base}endpoint = \"tcp://0.0.0.0:7443\"\n")).unwrap_err();
        assert_eq!(p[0].key, "api.endpoint");
        assert!(p[0].reason.contains("api.tcp"), "{}", p[0].reason);
        let p = Config::parse(&format!("{base}tcp = \"tcp://0.0.0.0:7443\"\n")).unwrap_err();
        assert_eq!(p[0].key, "api.tcp");
        assert!(p[0].reason.contains("api.tls_cert"), "{}", p[0].reason);
        let p = Config::parse(&format!("{base}tcp = \"unix:///run/x.sock\"\n")).unwrap_err();
        assert_eq!(p[0].key, "api.tcp");
        let c = Config::parse(&format!(
            "{base}tcp = \"tcp://0.0.0.0:7443\"\ntls_cert = \"/c.pem\"\ntls_key = \"/k.pem\"\n"
        ))
        .unwrap();
        assert_eq!(c.api.endpoint, DEFAULT_API_ENDPOINT);
        assert_eq!(c.api.tcp.as_deref(), Some("tcp://0.0.0.0:7443"));
    }
}
