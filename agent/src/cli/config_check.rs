//! `vipsec config check FILE`.

use std::path::Path;

use super::CliError;
use crate::config::{Config, ConfigError};

pub fn run(path: &Path) -> Result<(), CliError> {
    match Config::load(path) {
        Ok(c) => {
            println!(
                "{}: ok (node {}, {} hosted VIP(s), {} peer VIP(s))",
                path.display(),
                c.node,
                c.hosted_vips.len(),
                c.peer_vips.len()
            );
            Ok(())
        }
        Err(e @ ConfigError::Read { .. }) => Err(CliError::Usage(e.to_string())),
        Err(ConfigError::Invalid { file, problems }) => {
            for p in &problems {
                println!("{}: {}: {}", file.display(), p.key, p.reason);
            }
            Err(CliError::Usage(format!(
                "{}: {} problem(s)",
                file.display(),
                problems.len()
            )))
        }
    }
}
