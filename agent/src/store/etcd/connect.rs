//! How to reach etcd: endpoints, credentials and TLS from the config, read once at start so
//! a missing file is reported at once, and error texts scrubbed of the password.

use std::path::Path;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::config::StoreConfig;

/// Twice etcd's default `--grpc-keepalive-min-time`: etcd closes a connection whose pings
/// come more often while it has nothing to send ("too_many_pings"), and one that comes a
/// little early still counts as on time there.
const PING_INTERVAL: Duration = Duration::from_secs(10);

pub struct ConnectSettings {
    endpoints: Vec<String>,
    user: Option<(String, String)>,
    tls: Option<TlsOptions>,
    timeout: Duration,
}

fn read(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))
}

impl ConnectSettings {
    pub fn from_config(c: &StoreConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(!c.endpoints.is_empty(), "store.endpoints is empty");
        let user = match (&c.username, &c.password_file) {
            (Some(u), Some(f)) => {
                let raw = read("store.password_file", f)?;
                let password = String::from_utf8(raw).map_err(|_| {
                    anyhow::anyhow!("store.password_file {}: not UTF-8", f.display())
                })?;
                // A trailing newline from `echo secret > file` is not part of the password.
                let password = password.trim_end_matches(['\n', '\r']).to_string();
                Some((u.clone(), password))
            }
            (Some(_), None) => {
                anyhow::bail!("store.username is set but store.password_file is not")
            }
            (None, Some(_)) => {
                anyhow::bail!("store.password_file is set but store.username is not")
            }
            (None, None) => None,
        };
        let tls = if c.tls_ca.is_some() || c.tls_cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &c.tls_ca {
                tls = tls.ca_certificate(Certificate::from_pem(read("store.tls_ca", ca)?));
            }
            match (&c.tls_cert, &c.tls_key) {
                (Some(cert), Some(key)) => {
                    tls = tls.identity(Identity::from_pem(
                        read("store.tls_cert", cert)?,
                        read("store.tls_key", key)?,
                    ));
                }
                (None, None) => {}
                _ => anyhow::bail!("store.tls_cert and store.tls_key must be set together"),
            }
            Some(tls)
        } else {
            None
        };
        Ok(ConnectSettings {
            endpoints: c.endpoints.clone(),
            user,
            tls,
            timeout: c.request_timeout,
        })
    }

    /// Endpoints for status and logs, with any `user:password@` removed.
    pub fn describe(&self) -> String {
        self.endpoints
            .iter()
            .map(|e| strip_userinfo(e))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Removes the password from a text that is about to be logged or reported.
    pub fn scrub(&self, text: &str) -> String {
        match &self.user {
            Some((_, pw)) if !pw.is_empty() => text.replace(pw.as_str(), "<redacted>"),
            _ => text.to_string(),
        }
    }

    /// One member's endpoint for logs, without credentials.
    pub fn member_name(&self, index: usize) -> String {
        strip_userinfo(&self.endpoints[index % self.endpoints.len().max(1)])
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// A client of one member, `endpoints[index % len]`.
    ///
    /// One member at a time, not the client's balanced channel over all of them: the
    /// balanced channel keeps sending a share of requests to a member that is down or
    /// has no leader, and each of those fails or waits out its timeout, for as long as
    /// the member stays away. With one member, the first failure moves everything (the
    /// requests, the watch, the keep-alives) to the next member at once.
    pub async fn connect_member(&self, index: usize) -> Result<Client, String> {
        let endpoint = &self.endpoints[index % self.endpoints.len()];
        self.connect_to(std::slice::from_ref(endpoint)).await
    }

    pub async fn connect(&self) -> Result<Client, String> {
        self.connect_to(&self.endpoints).await
    }

    async fn connect_to(&self, endpoints: &[String]) -> Result<Client, String> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.timeout)
            // HTTP/2 pings, a backstop for a request stuck on a dead connection; not more
            // often than etcd accepts (see `liveness`, which finds a dead member sooner).
            .with_keep_alive(PING_INTERVAL, self.timeout)
            .with_keep_alive_while_idle(true)
            // A member that lost its leader (partitioned, or mid-election) ends our watch
            // and keep-alive streams at once, so they move to a member that has one,
            // instead of waiting on a member that will never deliver.
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if let Some((u, p)) = &self.user {
            options = options.with_user(u.clone(), p.clone());
        }
        if let Some(tls) = &self.tls {
            options = options.with_tls(tls.clone());
        }
        match tokio::time::timeout(
            self.timeout.saturating_mul(2),
            Client::connect(endpoints, Some(options)),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(self.scrub(&format!("connect to {}: {e}", self.describe()))),
            Err(_) => Err(format!(
                "connect to {}: no answer within {:?}",
                self.describe(),
                self.timeout.saturating_mul(2)
            )),
        }
    }
}

fn strip_userinfo(endpoint: &str) -> String {
    match endpoint.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => endpoint.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_drops_credentials_from_urls() {
        assert_eq!(
            strip_userinfo("https://root:s3cret@10.0.0.1:2379"),
            "https://10.0.0.1:2379"
        );
        assert_eq!(
            strip_userinfo("http://127.0.0.1:2379"),
            "http://127.0.0.1:2379"
        );
    }
}
