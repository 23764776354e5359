//! `vipsec config show [--effective] FILE`: what the agent would run with.

use std::path::Path;

use super::CliError;
use super::render::table;
use crate::config::{Config, ConfigError};
use crate::config_reference::effective;

pub fn run(path: &Path, all: bool, json: bool) -> Result<(), CliError> {
    let config = match Config::load(path) {
        Ok(c) => c,
        // An invalid file has no effective values: say why, as `config check` does.
        Err(e @ ConfigError::Read { .. }) => return Err(CliError::Usage(e.to_string())),
        Err(ConfigError::Invalid { file, problems }) => {
            for p in &problems {
                eprintln!("{}: {}: {}", file.display(), p.key, p.reason);
            }
            return Err(CliError::Usage(format!(
                "{}: {} problem(s); `vipsec config check` lists them",
                file.display(),
                problems.len()
            )));
        }
    };
    let rows: Vec<_> = effective(&config)
        .into_iter()
        .filter(|r| all || !r.is_default)
        .collect();
    if json {
        let text = serde_json::to_string_pretty(&rows)
            .map_err(|e| CliError::Runtime(format!("cannot encode JSON: {e}")))?;
        println!("{text}");
        return Ok(());
    }
    let mut t = table(&["key", "value", "default"]);
    for r in rows {
        let default = match (&r.default, r.is_default) {
            (None, _) => "(required)".to_string(),
            (Some(_), true) => "=".to_string(),
            (Some(d), false) => d.clone(),
        };
        t.add_row(vec![r.key, r.value, default]);
    }
    println!("{t}");
    Ok(())
}
