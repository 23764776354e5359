//! One drill from start to end: the checks, the cluster manager's commands, the wait for
//! the move's timeline and the verdict.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::info;

use super::plan::{DrillError, agent_env, judge, plan, run_command};
use crate::model::Vip;
use crate::runtime::AgentHandle;
use crate::timeline::MoveTimeline;

const POLL: Duration = Duration::from_millis(200);

/// How long a clean-up command may take.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);

/// A checked request: the VIP, the node that should take it, the wait for the move.
#[derive(Debug, Clone)]
pub struct DrillRequest {
    pub vip: Vip,
    pub to: String,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct DrillOutcome {
    pub timeline: Option<MoveTimeline>,
    pub met_target: bool,
    pub target: Duration,
    pub detail: String,
}

/// The node's drills: one at a time, since two would race each other's commands and judge
/// each other's moves.
#[derive(Clone, Default)]
pub struct Drills {
    running: Arc<AtomicBool>,
}

/// Clears the running flag however the drill ends (an error, a dropped request).
struct Slot(Arc<AtomicBool>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

impl Drills {
    pub async fn run(
        &self,
        handle: &AgentHandle,
        req: DrillRequest,
    ) -> Result<DrillOutcome, DrillError> {
        let DrillRequest { vip, to, timeout } = req;
        let config = handle.config();
        if to == config.node {
            return Err(DrillError::SameNode { to, vip });
        }
        let status = handle.status();
        let hosted = status.hosted.iter().find(|h| h.address == vip);
        let peer = status.peers.iter().find(|p| p.address == vip);
        let (owner, epoch) = match (hosted, peer) {
            (Some(h), _) => (h.owner.clone(), h.epoch),
            (None, Some(p)) => (p.owner.clone(), p.epoch),
            (None, None) => return Err(DrillError::UnknownVip(vip)),
        };
        let owner_here = hosted.is_some_and(|h| h.present)
            && owner.as_ref().is_some_and(|o| o.node == config.node);
        let plan = plan(
            &config.drill,
            vip,
            &to,
            owner_here,
            owner.as_ref().map(|o| o.node.as_str()),
        )?;
        if self
            .running
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(DrillError::Busy);
        }
        let _slot = Slot(self.running.clone());
        let deadline = tokio::time::Instant::now() + timeout;
        let env = agent_env(&config.api.endpoint);
        info!(%vip, %to, epoch, "drill: moving the VIP");
        for argv in &plan.moves {
            run_command(argv, &env, timeout).await?;
        }
        let t = wait_for_move(handle, vip, epoch, deadline).await;
        let mut cleanup_notes = Vec::new();
        for argv in &plan.cleanup {
            if let Err(e) = run_command(argv, &env, CLEANUP_TIMEOUT).await {
                cleanup_notes.push(format!("clean-up failed: {e}"));
            }
        }
        let target = config.drill.target;
        let (met_target, mut detail) =
            judge(t.as_ref(), &to, target, plan.target_chosen_by_manager);
        for n in cleanup_notes {
            detail = format!("{detail}; {n}");
        }
        info!(%vip, %to, met_target, %detail, "drill finished");
        Ok(DrillOutcome {
            timeline: t,
            met_target,
            target,
            detail,
        })
    }
}

/// Waits for a move of `vip` past `epoch` until its timeline is complete or the deadline;
/// returns the newest such move as it then stands.
pub async fn wait_for_move(
    handle: &AgentHandle,
    vip: Vip,
    epoch: u64,
    deadline: tokio::time::Instant,
) -> Option<MoveTimeline> {
    let mut last = None;
    loop {
        if let Ok(moves) = handle.recorded_moves(vip).await
            && let Some(t) = moves
                .into_iter()
                .filter(|t| t.epoch > epoch)
                .max_by_key(|t| t.epoch)
        {
            let complete = t.complete();
            last = Some(t);
            if complete {
                return last;
            }
        }
        if tokio::time::Instant::now() + POLL > deadline {
            return last;
        }
        tokio::time::sleep(POLL).await;
    }
}
