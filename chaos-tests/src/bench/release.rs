//! `bench --release`: build the release binaries of this workspace and run the bench from
//! them, so that the agent, the probes and the mail servers in the nodes, and the bench
//! itself, are what operators run.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::lab::Progress;

/// Set on the release bench this one hands over to, so it does not build again.
const HANDED_OVER: &str = "VIPSEC_CHAOS_RELEASE_BUILT";

/// The workspace this binary was built from.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cargo() -> OsString {
    std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// The workspace's target directory, as cargo resolves it (CARGO_TARGET_DIR, config).
pub fn target_dir(workspace: &Path) -> anyhow::Result<PathBuf> {
    let out = Command::new(cargo())
        .current_dir(workspace)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("cargo metadata names no target directory"))
}

/// The command line without `flag`.
pub fn without_flag(args: impl IntoIterator<Item = OsString>, flag: &str) -> Vec<OsString> {
    args.into_iter().filter(|a| a != flag).collect()
}

/// Builds `vipsec` and `vipsec-chaos` in release mode, cargo's output going straight to the
/// terminal, then replaces this process with the release `vipsec-chaos` and the same
/// arguments less `--release`. Returns only in the release bench itself (with its own
/// path), or with an error.
pub fn build_and_hand_over(progress: &Progress) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    if std::env::var_os(HANDED_OVER).is_some() {
        return Ok(me);
    }
    let ws = workspace();
    progress.step(&format!(
        "building the release binaries: cargo build --release -p vipsec -p vipsec-chaos (in {})",
        ws.display()
    ));
    let status = Command::new(cargo())
        .current_dir(&ws)
        .args(["build", "--release", "-p", "vipsec", "-p", "vipsec-chaos"])
        .status()?;
    anyhow::ensure!(status.success(), "cargo build --release failed: {status}");
    let exe = target_dir(&ws)?.join("release").join("vipsec-chaos");
    anyhow::ensure!(exe.is_file(), "{} was not built", exe.display());
    progress.step(&format!("running the bench from {}", exe.display()));
    use std::os::unix::process::CommandExt;
    let err = Command::new(&exe)
        .args(without_flag(std::env::args_os().skip(1), "--release"))
        .env(HANDED_OVER, "1")
        .exec();
    Err(anyhow::anyhow!("{}: {err}", exe.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_goes_and_everything_else_stays() {
        let args = ["bench", "--release", "--runs", "2", "--cells", "1x1,2x2"].map(OsString::from);
        assert_eq!(
            without_flag(args, "--release"),
            ["bench", "--runs", "2", "--cells", "1x1,2x2"].map(OsString::from)
        );
    }
}
