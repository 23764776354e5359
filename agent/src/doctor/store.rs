//! The cluster store: etcd reachable with the configured TLS and credentials, the owner
//! records under the prefix readable, and how long a read takes.

use std::time::{Duration, Instant};

use etcd_client::GetOptions;

use super::Finding;
use crate::config::{Config, StoreBackend};
use crate::store::etcd::KeyLayout;
use crate::store::etcd::connect::ConnectSettings;
use crate::store::etcd::keys::decode_owner;

/// What reading the owner records found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreFacts {
    pub endpoints: String,
    pub round_trip: Duration,
    pub prefix: String,
    /// Every key under the owners' range, with why it cannot be read when it cannot.
    pub records: Vec<(String, Result<(), String>)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreProblem {
    /// A credential or certificate file could not be read.
    Settings(String),
    Unreachable {
        endpoints: String,
        error: String,
    },
}

pub async fn check(config: &Config) -> Vec<Finding> {
    match config.store.backend {
        StoreBackend::Embedded => vec![Finding::ok(
            "store",
            "embedded store: ownership is known to this machine only (single-machine setup; use etcd for a cluster)",
        )],
        StoreBackend::Etcd => findings(&probe(config).await),
    }
}

/// Connects and reads the owners' range once.
pub async fn probe(config: &Config) -> Result<StoreFacts, StoreProblem> {
    let settings = ConnectSettings::from_config(&config.store)
        .map_err(|e| StoreProblem::Settings(format!("{e:#}")))?;
    let endpoints = settings.describe();
    let unreachable = |error: String| StoreProblem::Unreachable {
        endpoints: endpoints.clone(),
        error,
    };
    let mut client = settings.connect().await.map_err(&unreachable)?;
    let keys = KeyLayout::new(&config.store.prefix);
    let started = Instant::now();
    // The client may connect lazily: the first read is what proves etcd answers.
    let wait = config.store.request_timeout.saturating_mul(2);
    let resp = tokio::time::timeout(
        wait,
        client.get(keys.owners(), Some(GetOptions::new().with_prefix())),
    )
    .await
    .map_err(|_| unreachable(format!("no answer to a read within {wait:?}")))?
    .map_err(|e| unreachable(settings.scrub(&e.to_string())))?;
    let round_trip = started.elapsed();
    let records = resp
        .kvs()
        .iter()
        .map(|kv| {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let ok = keys
                .vip_of(kv.key())
                .and_then(|_| decode_owner(kv.value()).map(|_| ()));
            (key, ok)
        })
        .collect();
    Ok(StoreFacts {
        endpoints,
        round_trip,
        prefix: keys.owners(),
        records,
    })
}

pub fn findings(probe: &Result<StoreFacts, StoreProblem>) -> Vec<Finding> {
    let facts = match probe {
        Ok(f) => f,
        Err(StoreProblem::Settings(e)) => {
            return vec![Finding::error(
                "store",
                format!("cannot read the store settings: {e}"),
                "fix store.password_file / store.tls_* so the files exist and are readable by root",
            )];
        }
        Err(StoreProblem::Unreachable { endpoints, error }) => {
            return vec![Finding::error(
                "store",
                format!("etcd at {endpoints} is unreachable: {error}"),
                "start etcd, check store.endpoints, the TLS files and credentials, and that the firewall lets this node reach the etcd client port",
            )];
        }
    };
    let owners = facts.records.iter().filter(|(_, r)| r.is_ok()).count();
    let mut out = vec![Finding::ok(
        "store",
        format!(
            "etcd at {} answers: {owners} owner record(s) under {}, read in {:.1} ms",
            facts.endpoints,
            facts.prefix,
            facts.round_trip.as_secs_f64() * 1000.0
        ),
    )];
    let corrupt: Vec<String> = facts
        .records
        .iter()
        .filter_map(|(k, r)| r.as_ref().err().map(|e| format!("{k} ({e})")))
        .collect();
    out.push(if corrupt.is_empty() {
        Finding::ok("store.records", "every owner record is readable")
    } else {
        Finding::warning(
            "store.records",
            format!(
                "{} unreadable record(s), ignored by the agents: {}",
                corrupt.len(),
                corrupt.join("; ")
            ),
            "delete them (`etcdctl del KEY`); the owner publishes a fresh record at its next move",
        )
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Severity;

    #[test]
    fn unreachable_is_an_error_and_corrupt_records_are_named() {
        let f = findings(&Err(StoreProblem::Unreachable {
            endpoints: "http://127.0.0.1:1".into(),
            error: "connection refused".into(),
        }));
        assert_eq!(f[0].severity, Severity::Error);
        assert!(f[0].summary.contains("127.0.0.1:1"));

        let f = findings(&Ok(StoreFacts {
            endpoints: "http://e:2379".into(),
            round_trip: Duration::from_millis(2),
            prefix: "/vipsec/vips/".into(),
            records: vec![
                ("/vipsec/vips/192.0.2.1".into(), Ok(())),
                ("/vipsec/vips/bad".into(), Err("not an IP".into())),
            ],
        }));
        assert_eq!(f[0].severity, Severity::Ok);
        assert!(f[0].summary.contains("1 owner record"), "{f:?}");
        assert_eq!(f[1].severity, Severity::Warning);
        assert!(f[1].summary.contains("/vipsec/vips/bad"));
    }
}
