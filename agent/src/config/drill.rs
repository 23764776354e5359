//! `[drill]`: how `vipsec drill` asks the cluster manager for a planned move.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Problems;

/// How `vipsec drill` asks the cluster manager to move a VIP.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DrillIntegration {
    /// The current owner steps down through the handover command (`drill.handover`).
    Keepalived,
    /// `crm_resource --move --resource R --node NODE`, then `--clear`.
    Pacemaker,
    /// `drill.command`, with `{vip}` and `{to}` replaced.
    Command,
}

/// `vipsec drill`: how a planned move is asked of the cluster manager, and its target.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DrillConfig {
    /// Drills are refused when absent.
    pub integration: Option<DrillIntegration>,
    /// For `command`: the program and its arguments; `{vip}` and `{to}` are replaced.
    #[serde(default)]
    pub command: Vec<String>,
    /// For `keepalived`: the handover command run on the owner (`{vip}`, `{to}` replaced).
    #[serde(default = "default_drill_handover")]
    pub handover: Vec<String>,
    /// The recovery target: from the VIP's release (or the first mark) to first traffic.
    #[serde(default = "default_drill_target", with = "humantime_serde")]
    pub target: Duration,
    /// For `pacemaker`: the resource that holds the VIP.
    pub resource: Option<String>,
}

impl Default for DrillConfig {
    fn default() -> Self {
        DrillConfig {
            integration: None,
            command: Vec::new(),
            handover: default_drill_handover(),
            target: default_drill_target(),
            resource: None,
        }
    }
}

fn default_drill_handover() -> Vec<String> {
    vec!["vipsec-handover".into(), "{vip}".into()]
}

fn default_drill_target() -> Duration {
    Duration::from_secs(1)
}

impl DrillConfig {
    pub(super) fn validate(&self, p: &mut Problems) {
        if self.target.is_zero() {
            p.bad("drill.target", "must be greater than zero");
        }
        match self.integration {
            Some(DrillIntegration::Command) if self.command.is_empty() => p.bad(
                "drill.command",
                "integration \"command\" needs the command to run, e.g. [\"/usr/local/bin/move-vip\", \"{vip}\", \"{to}\"]",
            ),
            Some(DrillIntegration::Keepalived) if self.handover.is_empty() => p.bad(
                "drill.handover",
                "integration \"keepalived\" needs the handover command",
            ),
            Some(DrillIntegration::Pacemaker)
                if self.resource.as_deref().is_none_or(|r| r.trim().is_empty()) =>
            {
                p.bad(
                    "drill.resource",
                    "integration \"pacemaker\" needs the resource that holds the VIP",
                )
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::config::tests::FRONTEND;

    #[test]
    fn drill_section_is_checked() {
        let c = Config::parse(FRONTEND).unwrap();
        assert_eq!(c.drill.integration, None);
        assert_eq!(c.drill.target, Duration::from_secs(1));
        assert_eq!(c.drill.handover, ["vipsec-handover", "{vip}"]);
        let ok = format!(
            "{FRONTEND}\n[drill]\nintegration = \"command\"\ncommand = [\"move\", \"{{vip}}\", \"{{to}}\"]\ntarget = \"800ms\"\n"
        );
        let c = Config::parse(&ok).unwrap();
        assert_eq!(c.drill.integration, Some(DrillIntegration::Command));
        assert_eq!(c.drill.target, Duration::from_millis(800));
        let text = format!("{FRONTEND}\n[drill]\nintegration = \"command\"\ntarget = \"0s\"\n");
        let keys: Vec<_> = Config::parse(&text)
            .unwrap_err()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(keys, ["drill.target", "drill.command"]);
        let text = format!("{FRONTEND}\n[drill]\nintegration = \"pacemaker\"\n");
        assert_eq!(Config::parse(&text).unwrap_err()[0].key, "drill.resource");
        let text = format!("{FRONTEND}\n[drill]\nintegration = \"pcs\"\n");
        assert_eq!(
            Config::parse(&text).unwrap_err()[0].key,
            "drill.integration"
        );
        let text = format!("{FRONTEND}\n[drill]\ntarge = \"1s\"\n");
        assert_eq!(Config::parse(&text).unwrap_err()[0].key, "drill.targe");
    }
}
