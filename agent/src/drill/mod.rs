//! Failover drills: ask the cluster manager in use to move a VIP to a node, then wait for
//! the move's timeline in the store and judge it against the recovery target.
//!
//! The commands are built here (pure, unit-tested) and run with a deadline; the agent's
//! own binary and API endpoint are passed down (`VIPSEC`, `VIPSEC_ENDPOINT`) so a handover
//! script that drains through the agent reaches this very agent.

mod plan;
mod run;

pub use plan::{DrillError, DrillPlan, agent_env, judge, plan, run_command};
pub use run::{DrillOutcome, DrillRequest, Drills, wait_for_move};
