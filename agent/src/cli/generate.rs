//! `vipsec generate man|completions DIR` (hidden): the man pages and shell completions,
//! generated from the clap definition so that they always match the binary. The package
//! build (tools/package) runs it.

use std::path::{Path, PathBuf};

use clap::{CommandFactory, Subcommand};
use clap_complete::Shell;

use super::{Cli, CliError};

#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// One man page per command (vipsec.1, vipsec-config-check.1, ...).
    Man {
        /// Directory to write the pages to (created when missing).
        dir: PathBuf,
    },
    /// bash (vipsec.bash), zsh (_vipsec) and fish (vipsec.fish) completions.
    Completions {
        /// Directory to write the scripts to (created when missing).
        dir: PathBuf,
    },
}

pub fn run(command: GenerateCommand) -> Result<(), CliError> {
    match command {
        GenerateCommand::Man { dir } => man(&dir),
        GenerateCommand::Completions { dir } => completions(&dir),
    }
}

fn create(dir: &Path) -> Result<(), CliError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::Runtime(format!("{}: cannot create: {e}", dir.display())))
}

fn man(dir: &Path) -> Result<(), CliError> {
    create(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
        .map_err(|e| CliError::Runtime(format!("{}: cannot write man pages: {e}", dir.display())))
}

fn completions(dir: &Path) -> Result<(), CliError> {
    create(dir)?;
    let mut cmd = Cli::command();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, "vipsec", dir).map_err(|e| {
            CliError::Runtime(format!(
                "{}: cannot write {shell} completions: {e}",
                dir.display()
            ))
        })?;
    }
    Ok(())
}
