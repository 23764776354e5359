//! `vipsec agent --config FILE`: the daemon, in the foreground.

use std::path::Path;
use std::sync::Arc;

use super::CliError;
use crate::config::Config;

pub async fn run(path: &Path) -> Result<(), CliError> {
    let config = Config::load(path).map_err(|e| CliError::Usage(e.to_string()))?;
    let log = crate::logging::init(&config.log.filter, config.log.format)
        .map_err(|e| CliError::Usage(format!("{}: log.filter: {e}", path.display())))?;
    tracing::info!(node = %config.node, config = %path.display(), version = env!("CARGO_PKG_VERSION"), "vipsec agent starting");
    crate::agent::run_until_signal(config, Some(Arc::new(log)))
        .await
        .map_err(|e| CliError::Runtime(format!("{e:#}")))
}
