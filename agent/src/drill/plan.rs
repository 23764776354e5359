//! The pure half of a drill: the cluster manager's commands for a move, running one with a
//! deadline, and the verdict on the move's timeline.

use std::time::Duration;

use crate::config::{DrillConfig, DrillIntegration};
use crate::model::Vip;
use crate::timeline::MoveTimeline;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DrillError {
    #[error("no drill integration configured (set [drill] integration in the agent's config)")]
    NotConfigured,
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    CommandFailed(String),
    /// The request names this node as the one to take the VIP.
    #[error("{to} is this node; name the node that should take {vip}")]
    SameNode { to: String, vip: Vip },
    #[error("{0} is not a VIP this node hosts or talks to")]
    UnknownVip(Vip),
    #[error("a drill is already running on this node; wait for its report")]
    Busy,
}

/// The commands one drill runs: `moves` to start the move, `cleanup` once it is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillPlan {
    pub moves: Vec<Vec<String>>,
    pub cleanup: Vec<Vec<String>>,
    /// keepalived cannot pick the node that takes over: check it afterwards.
    pub target_chosen_by_manager: bool,
}

fn fill(argv: &[String], vip: Vip, to: &str) -> Vec<String> {
    argv.iter()
        .map(|a| a.replace("{vip}", &vip.to_string()).replace("{to}", to))
        .collect()
}

/// The commands for a drill of `vip` to `to` with this config. `owner_here` says whether
/// this node holds the VIP now; `owner` names who does, for the message when it does not.
pub fn plan(
    c: &DrillConfig,
    vip: Vip,
    to: &str,
    owner_here: bool,
    owner: Option<&str>,
) -> Result<DrillPlan, DrillError> {
    match c.integration {
        None => Err(DrillError::NotConfigured),
        Some(DrillIntegration::Keepalived) => {
            if !owner_here {
                return Err(DrillError::Refused(match owner {
                    Some(o) => format!(
                        "with keepalived the owner must step down: run the drill on {o}, the VIP's owner"
                    ),
                    None => format!(
                        "with keepalived the owner must step down: run the drill on the node that holds {vip} (none is recorded now)"
                    ),
                }));
            }
            Ok(DrillPlan {
                moves: vec![fill(&c.handover, vip, to)],
                cleanup: Vec::new(),
                target_chosen_by_manager: true,
            })
        }
        Some(DrillIntegration::Pacemaker) => {
            let r = c.resource.clone().unwrap_or_default();
            let crm = |args: &[&str]| -> Vec<String> {
                std::iter::once("crm_resource")
                    .chain(args.iter().copied())
                    .map(String::from)
                    .collect()
            };
            Ok(DrillPlan {
                moves: vec![crm(&["--move", "--resource", &r, "--node", to])],
                // --move leaves a location constraint behind: lift it so Pacemaker may
                // place the resource freely again.
                cleanup: vec![crm(&["--clear", "--resource", &r])],
                target_chosen_by_manager: false,
            })
        }
        Some(DrillIntegration::Command) => Ok(DrillPlan {
            moves: vec![fill(&c.command, vip, to)],
            cleanup: Vec::new(),
            target_chosen_by_manager: false,
        }),
    }
}

/// Runs one command with a deadline; its output is returned for the report.
pub async fn run_command(
    argv: &[String],
    env: &[(String, String)],
    timeout: Duration,
) -> Result<String, DrillError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| DrillError::CommandFailed("empty command".into()))?;
    let shown = argv.join(" ");
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output())
        .await
        .map_err(|_| DrillError::CommandFailed(format!("{shown}: no result within {timeout:?}")))?
        .map_err(|e| DrillError::CommandFailed(format!("{shown}: {e}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(DrillError::CommandFailed(format!(
            "{shown}: {}: {}",
            out.status,
            text.trim()
        )));
    }
    Ok(text)
}

/// The environment a handover script needs to reach this agent.
pub fn agent_env(api_endpoint: &str) -> Vec<(String, String)> {
    let mut env = vec![("VIPSEC_ENDPOINT".to_string(), api_endpoint.to_string())];
    if let Ok(exe) = std::env::current_exe() {
        env.push(("VIPSEC".into(), exe.display().to_string()));
    }
    env
}

/// Judges a drill's timeline: whether it met the target, and what to tell the operator.
pub fn judge(
    t: Option<&MoveTimeline>,
    to: &str,
    target: Duration,
    manager_chose: bool,
) -> (bool, String) {
    let Some(t) = t else {
        return (
            false,
            "no move of the VIP was seen before the timeout".into(),
        );
    };
    let mut notes = Vec::new();
    if t.to_node != to {
        notes.push(if manager_chose {
            format!(
                "the VIP went to {}, not {to}: keepalived picks the node that takes over (the highest priority)",
                t.to_node
            )
        } else {
            format!("the VIP went to {}, not {to}", t.to_node)
        });
    }
    if !t.complete() {
        let missing: Vec<&str> = t.missing().iter().map(|m| m.as_str()).collect();
        notes.push(format!(
            "timeline incomplete, missing {}",
            missing.join(", ")
        ));
    }
    let met = match t.recovery() {
        Some(d) => {
            let ms = d.as_millis();
            if d <= target {
                notes.push(format!(
                    "recovery {ms} ms within the target of {} ms",
                    target.as_millis()
                ));
            } else {
                notes.push(format!(
                    "recovery {ms} ms exceeds the target of {} ms",
                    target.as_millis()
                ));
            }
            d <= target && t.to_node == to
        }
        None => false,
    };
    (met, notes.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::Mark;

    fn vip() -> Vip {
        "192.0.2.100".parse().unwrap()
    }

    fn config(text: &str) -> DrillConfig {
        let c = crate::config::Config::parse(&format!("node = \"be1\"\n[drill]\n{text}\n"))
            .unwrap_or_else(|p| panic!("{p:?}"));
        c.drill
    }

    #[test]
    fn pacemaker_moves_then_clears_the_constraint() {
        let c = config("integration = \"pacemaker\"\nresource = \"vip100\"");
        let p = plan(&c, vip(), "be2", false, Some("be1")).unwrap();
        assert_eq!(
            p.moves,
            [[
                "crm_resource",
                "--move",
                "--resource",
                "vip100",
                "--node",
                "be2"
            ]]
        );
        assert_eq!(
            p.cleanup,
            [["crm_resource", "--clear", "--resource", "vip100"]]
        );
        assert!(!p.target_chosen_by_manager);
    }

    #[test]
    fn command_fills_vip_and_target() {
        let c =
            config("integration = \"command\"\ncommand = [\"mv-vip\", \"--ip={vip}\", \"{to}\"]");
        let p = plan(&c, vip(), "be2", true, None).unwrap();
        assert_eq!(p.moves, [["mv-vip", "--ip=192.0.2.100", "be2"]]);
    }

    #[test]
    fn keepalived_runs_only_on_the_owner() {
        let c = config("integration = \"keepalived\"");
        let e = plan(&c, vip(), "be2", false, Some("be3")).unwrap_err();
        assert!(
            e.to_string()
                .contains("run the drill on be3, the VIP's owner"),
            "{e}"
        );
        let p = plan(&c, vip(), "be2", true, Some("be1")).unwrap();
        assert_eq!(p.moves, [["vipsec-handover", "192.0.2.100"]]);
        assert!(p.target_chosen_by_manager);
        assert_eq!(
            plan(&DrillConfig::default(), vip(), "be2", true, None),
            Err(DrillError::NotConfigured)
        );
    }

    #[test]
    fn judge_reports_target_node_and_missing_marks() {
        let n = |s: &str| s.to_string();
        let mut t = MoveTimeline {
            vip: vip(),
            epoch: 5,
            from_node: Some(n("be1")),
            to_node: n("be3"),
            marks: Mark::ALL
                .iter()
                .enumerate()
                .map(|(i, m)| (*m, (n("x"), 1000 + 100 * i as u64)))
                .collect(),
        };
        let (met, detail) = judge(Some(&t), "be2", Duration::from_secs(1), true);
        assert!(!met);
        assert!(
            detail.contains("went to be3, not be2: keepalived picks"),
            "{detail}"
        );
        t.to_node = n("be2");
        let (met, detail) = judge(Some(&t), "be2", Duration::from_secs(1), true);
        assert!(met, "{detail}");
        assert!(detail.contains("recovery 600 ms within"), "{detail}");
        t.marks.remove(&Mark::FirstTraffic);
        let (met, detail) = judge(Some(&t), "be2", Duration::from_secs(1), true);
        assert!(!met);
        assert!(detail.contains("missing first-traffic"), "{detail}");
        assert!(!judge(None, "be2", Duration::from_secs(1), true).0);
    }

    #[tokio::test]
    async fn a_failing_command_says_why() {
        let argv = vec![
            "sh".to_string(),
            "-c".into(),
            "echo no peer >&2; exit 3".into(),
        ];
        let e = run_command(&argv, &[], Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no peer"), "{e}");
        let ok = run_command(&["true".to_string()], &[], Duration::from_secs(5)).await;
        assert_eq!(ok, Ok(String::new()));
    }
}
