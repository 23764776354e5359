//! `[log]`: the log filter and format.

use serde::{Deserialize, Serialize};

use super::Problems;

/// Logging to standard error (the journal under systemd).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// tracing EnvFilter syntax, e.g. `info,vipsec::keying=debug`; changeable at run time
    /// with `vipsec log-level`.
    #[serde(default = "default_log_filter")]
    pub filter: String,
    /// `json` for log shippers.
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: default_log_filter(),
            format: LogFormat::default(),
        }
    }
}

fn default_log_filter() -> String {
    "info".to_string()
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.filter) {
            p.bad("log.filter", format!("{:?}: {e}", self.filter));
        }
    }
}
