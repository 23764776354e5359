//! `[metrics]`: the Prometheus endpoint.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Prometheus metrics (deploy/README.md, "Metrics", lists them).
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address for the Prometheus `/metrics` endpoint, e.g. `127.0.0.1:9641`; bind to
    /// loopback or a management network. Disabled when absent.
    pub listen: Option<SocketAddr>,
}
