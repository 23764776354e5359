//! The demo: build the lab, move the VIP on purpose, crash its owner, say what happened.

use std::path::PathBuf;
use std::time::Duration;

use crate::clock::secs;
use crate::lab::faults::Fault;
use crate::lab::{Lab, LabOptions, Progress, Setup};
use crate::scenario;

pub fn run(setup: Setup, self_exe: PathBuf, cap: Duration) -> anyhow::Result<()> {
    let progress = Progress::new(true);
    progress.step(&format!("building the lab for set-up {setup}"));
    let mut lab = Lab::build(LabOptions::new(setup, self_exe), progress.clone())?;
    let mut results = Vec::new();
    for (i, fault) in [Fault::Planned, Fault::Crash].into_iter().enumerate() {
        if i > 0 {
            progress.step("resetting: restoring the old owner, fresh SAs");
            lab.reset()?;
        }
        progress.step(&format!(
            "{}: {} the VIP's owner",
            fault.name(),
            match (fault, setup.cluster_manager()) {
                (Fault::Planned, crate::lab::ClusterManager::Pacemaker) => {
                    "crm_resource --move away from"
                }
                (Fault::Planned, _) => "keepalived stops gracefully on",
                (Fault::Crash, _) => "freeze, link down and kill everything on",
                _ => "fault on",
            }
        ));
        results.push(scenario::run(&mut lab, fault, cap)?);
    }
    progress.step("tearing down");
    let run_dir = lab.run_dir().to_path_buf();
    drop(lab);
    println!("set-up {setup}:");
    for o in &results {
        println!("  {}", o.summary());
        for line in &o.cleartext_seen {
            println!("    clear text: {line}");
        }
        if let Some(d) = o.recovery_minus_takeover() {
            println!(
                "    IPsec recovery after the VIP moved: {} (takeover {})",
                secs(d),
                o.takeover.map(secs).unwrap_or_default()
            );
        }
    }
    if std::env::var_os("VIPSEC_CHAOS_KEEP").is_some() {
        println!("run directory kept: {}", run_dir.display());
    }
    Ok(())
}
