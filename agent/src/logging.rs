//! Structured logs with a filter that can be replaced at run time (`vipsec log-level`).

use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogFormat;

/// Changes the live log filter.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log filter {filter:?}: {reason}")]
    InvalidFilter { filter: String, reason: String },
    #[error("cannot install the new filter: {0}")]
    Reload(String),
}

impl LogControl {
    pub fn current(&self) -> String {
        self.current.lock().expect("log filter lock").clone()
    }

    /// Replaces the filter, e.g. `debug` or `info,vipsec::keying=trace`.
    pub fn set(&self, filter: &str) -> Result<String, LogError> {
        let new = EnvFilter::try_new(filter).map_err(|e| LogError::InvalidFilter {
            filter: filter.to_string(),
            reason: e.to_string(),
        })?;
        self.handle
            .reload(new)
            .map_err(|e| LogError::Reload(e.to_string()))?;
        *self.current.lock().expect("log filter lock") = filter.to_string();
        tracing::info!(filter, "log filter changed");
        Ok(filter.to_string())
    }
}

/// Installs the global subscriber; logs go to stderr.
pub fn init(filter: &str, format: LogFormat) -> Result<LogControl, LogError> {
    let env = EnvFilter::try_new(filter).map_err(|e| LogError::InvalidFilter {
        filter: filter.to_string(),
        reason: e.to_string(),
    })?;
    let (layer, handle) = reload::Layer::new(env);
    let registry = tracing_subscriber::registry().with(layer);
    let result = match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(true),
            )
            .try_init(),
    };
    result.map_err(|e| LogError::Reload(e.to_string()))?;
    Ok(LogControl {
        handle,
        current: Mutex::new(filter.to_string()),
    })
}
