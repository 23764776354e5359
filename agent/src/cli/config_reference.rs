//! `vipsec config reference`: every configuration key with its type, default and meaning,
//! as markdown (docs/config-reference.md is this output).

use super::CliError;

pub fn run() -> Result<(), CliError> {
    print!("{}", crate::config_reference::markdown());
    Ok(())
}
