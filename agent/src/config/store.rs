//! `[store]`: the cluster store that records who owns each VIP.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Problems;

#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// In-process store for a single machine; no server needed.
    #[default]
    Embedded,
    Etcd,
}

/// The cluster store that records who owns each VIP (etcd in a cluster).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `etcd` in any cluster; `embedded` only for a single machine (ownership then stays
    /// local).
    #[serde(default)]
    pub backend: StoreBackend,
    /// etcd client URLs (`http://` or `https://`); list every member: a request that fails
    /// or waits out `store.request_timeout` moves the agent to the next one.
    #[serde(default = "default_etcd_endpoints")]
    pub endpoints: Vec<String>,
    /// Key prefix of everything the agent stores (ownership, holders, move timelines,
    /// policies); change it to run several independent vipsec clusters on one etcd.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// How long a record survives its node: each hosted VIP has a lease of its own, renewed
    /// every sixth to third of this (in step with the node's other leases) while the VIP is here and never after it leaves. Shorter:
    /// front-ends learn of a crash sooner; too short for the etcd round trip and a busy
    /// node loses ownership spuriously. Minimum 1s.
    #[serde(default = "default_lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// One etcd request; a request that fails or waits this long moves the agent to the
    /// next member. At most half of `store.lease_ttl` (two renewals must fit in a lease).
    #[serde(default = "default_store_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a watch on etcd may stay quiet (nothing moving) before the agent asks the
    /// member for the watch's progress; no answer within `store.request_timeout` moves the
    /// agent to the next member. This is how a member that died without closing the
    /// connection is found. (HTTP/2 pings are not used for it: etcd closes a connection
    /// pinged more often than its `--grpc-keepalive-min-time`, 5s by default.)
    #[serde(default = "default_keepalive_interval", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// etcd user (etcd authentication with a password); with client certificates the
    /// certificate's common name is the user instead.
    pub username: Option<String>,
    /// File holding the etcd password (mode 0600), so the secret never sits in this config.
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) that etcd's server certificates must be signed by.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's `--client-cert-auth`; with `store.tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Accept plain `http://` endpoints off this machine (a lab): ownership records and
    /// the cluster-wide policy then travel unauthenticated and in clear text.
    #[serde(default)]
    pub allow_insecure: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: StoreBackend::default(),
            endpoints: default_etcd_endpoints(),
            prefix: default_prefix(),
            lease_ttl: default_lease_ttl(),
            request_timeout: default_store_timeout(),
            keepalive_interval: default_keepalive_interval(),
            username: None,
            password_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            allow_insecure: false,
        }
    }
}

/// Whether an endpoint URL's host is this machine (loopback).
fn loopback_endpoint(ep: &str) -> bool {
    let rest = ep.split_once("://").map_or(ep, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(h) = host_port.strip_prefix('[') {
        h.split(']').next().unwrap_or("")
    } else {
        host_port.split(':').next().unwrap_or("")
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn default_etcd_endpoints() -> Vec<String> {
    vec!["http://127.0.0.1:2379".to_string()]
}
fn default_prefix() -> String {
    "/vipsec/".to_string()
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(2)
}
fn default_store_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_keepalive_interval() -> Duration {
    Duration::from_secs(1)
}

/// An IPv6 host in a URL without brackets (`http://2001:db8::1:2379`): the URL parser of
/// the etcd client refuses it only at connect time, with an obscure message.
fn unbracketed_ipv6_host(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    (!host_port.starts_with('[') && host_port.matches(':').count() > 1)
        .then(|| format!("{url:?}: an IPv6 address needs brackets (http://[2001:db8::1]:2379)"))
}

impl StoreConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        if self.backend == StoreBackend::Etcd {
            if self.endpoints.is_empty() {
                p.bad("store.endpoints", "etcd needs at least one endpoint");
            }
            for (i, ep) in self.endpoints.iter().enumerate() {
                if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                    p.bad(
                        format!("store.endpoints[{i}]"),
                        format!("{ep:?} must start with http:// or https://"),
                    );
                } else if let Some(e) = unbracketed_ipv6_host(ep) {
                    p.bad(format!("store.endpoints[{i}]"), e);
                } else if ep.starts_with("http://")
                    && !loopback_endpoint(ep)
                    && !self.allow_insecure
                {
                    p.bad(
                        format!("store.endpoints[{i}]"),
                        format!(
                            "{ep:?} is plain HTTP to another machine: who owns each VIP, and \
                             the stored policy that decides what is encrypted cluster-wide, \
                             would travel unauthenticated and in clear text. Use https:// \
                             with store.tls_ca (and store.tls_cert/tls_key), or set \
                             store.allow_insecure = true for a lab"
                        ),
                    );
                }
            }
            if self.password_file.is_some() && self.username.is_none() {
                p.bad("store.password_file", "set store.username too");
            }
            if self.tls_cert.is_some() != self.tls_key.is_some() {
                p.bad(
                    "store.tls_key",
                    "store.tls_cert and store.tls_key must be set together",
                );
            }
        }
        if !self.prefix.starts_with('/') || !self.prefix.ends_with('/') {
            p.bad(
                "store.prefix",
                format!("{:?} must start and end with '/'", self.prefix),
            );
        }
        if self.lease_ttl < Duration::from_secs(1) {
            p.bad(
                "store.lease_ttl",
                format!("{:?} is below etcd's minimum of 1s", self.lease_ttl),
            );
        }
        p.positive("store.keepalive_interval", self.keepalive_interval);
        if self.request_timeout.is_zero() {
            p.bad("store.request_timeout", "must be greater than zero");
        } else if self.request_timeout.saturating_mul(2) > self.lease_ttl {
            // A renewal that waits out its timeout is retried at once; two must fit in a
            // lease, or one slow answer during an election lets the record lapse.
            p.bad(
                "store.request_timeout",
                format!(
                    "{} is more than half of store.lease_ttl ({}): a lease must outlast two \
                     renewals that each wait out the timeout",
                    humantime::format_duration(self.request_timeout),
                    humantime::format_duration(self.lease_ttl)
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn ipv6_etcd_hosts_need_brackets() {
        assert!(unbracketed_ipv6_host("http://2001:db8::1:2379").is_some());
        assert!(unbracketed_ipv6_host("http://[2001:db8::1]:2379").is_none());
        assert!(unbracketed_ipv6_host("http://u:p@192.0.2.1:2379").is_none());
    }

    #[test]
    fn plain_http_to_another_machine_needs_allow_insecure() {
        let base = "node = \"be1\"\n[store]\nbackend = \"etcd\"\n";
        for (endpoints, extra, ok) in [
            ("http://127.0.0.1:2379", "", true),
            ("http://localhost:2379", "", true),
            ("http://[::1]:2379", "", true),
            ("https://192.0.2.5:2379", "", true),
            ("http://192.0.2.5:2379", "", false),
            ("http://user:pw@192.0.2.5:2379", "", false),
            ("http://[2001:db8::5]:2379", "", false),
            ("http://etcd.example:2379", "", false),
            ("http://192.0.2.5:2379", "allow_insecure = true\n", true),
        ] {
            let r = Config::parse(&format!("{base}endpoints = [\"{endpoints}\"]\n{extra}"));
            assert_eq!(r.is_ok(), ok, "{endpoints} {extra}: {r:?}");
            if let Err(p) = r {
                assert_eq!(p[0].key, "store.endpoints[0]");
                assert!(p[0].reason.contains("allow_insecure"), "{}", p[0].reason);
            }
        }
    }

    #[test]
    fn a_request_timeout_that_a_lease_cannot_outlast_twice_is_refused() {
        let base = "node = \"be1\"\n[store]\nbackend = \"etcd\"\n";
        for (extra, ok) in [
            ("lease_ttl = \"2s\"\nrequest_timeout = \"1s\"", true),
            ("lease_ttl = \"2s\"\nrequest_timeout = \"1500ms\"", false),
            ("lease_ttl = \"10s\"\nrequest_timeout = \"3s\"", true),
            ("request_timeout = \"0s\"", false),
        ] {
            let r = Config::parse(&format!("{base}{extra}\n"));
            assert_eq!(r.is_ok(), ok, "{extra}: {r:?}");
            if let Err(p) = r {
                assert_eq!(p[0].key, "store.request_timeout");
            }
        }
        let p = Config::parse(&format!("{base}request_timeout = \"1500ms\"\n")).unwrap_err();
        assert!(
            p[0].reason.contains("1s 500ms") && p[0].reason.contains("2s"),
            "{}",
            p[0].reason
        );
    }
}
