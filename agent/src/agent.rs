//! The agent as one process: the runtime with the API server in front of it.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::config::Config;
use crate::logging::LogControl;
use crate::runtime::{AgentHandle, Backends, Runtime, Starting};

/// The longest readiness waits for the store's and the keying daemon's first reports.
const FIRST_REPORTS: Duration = Duration::from_secs(10);

/// A started agent.
pub struct Agent {
    pub handle: AgentHandle,
    runtime: Runtime,
}

impl Agent {
    /// Puts the guard in place, opens the API, then starts the backends and the core loop.
    pub async fn start(
        config: Config,
        backends: Backends,
        log: Option<Arc<LogControl>>,
        cancel: CancellationToken,
    ) -> anyhow::Result<Agent> {
        let starting = Starting::new(config, backends, log, cancel.clone()).await?;
        let handle = starting.handle().clone();
        starting.serve_metrics(Arc::new(move || {
            crate::api::convert::status(&handle.status())
        }));
        let api = crate::api::bind(&starting.handle().config().api).await?;
        starting.essential(
            "api",
            crate::api::serve(api, starting.handle().clone(), cancel).instrument(info_span!("api")),
        );
        let runtime = starting.launch();
        Ok(Agent {
            handle: runtime.handle().clone(),
            runtime,
        })
    }

    /// Waits for cancellation and every task, and removes the API socket. An error when an
    /// essential task took the agent down.
    pub async fn wait(self) -> anyhow::Result<()> {
        let result = self.runtime.wait().await;
        crate::api::cleanup(&self.handle.config().api);
        result?;
        info!("agent stopped");
        Ok(())
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run_until_signal(config: Config, log: Option<Arc<LogControl>>) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM that arrives while the agent starts must still stop it cleanly.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let cancel = CancellationToken::new();
    let backends = Backends::from_config(&config).await?;
    let agent = Agent::start(config, backends, log, cancel.clone()).await?;
    info!("agent running");
    // `systemctl start vipsec && vipsec health` should say how the store and the keying
    // daemon are, not that they are still being asked: readiness waits for their first
    // reports, good or bad, but not for ever (a store that cannot be reached is reported
    // as such within its dial timeout; this bound is only for one that hangs).
    let reported = agent
        .handle
        .wait_status(FIRST_REPORTS, |s| s.store.reported && s.keying.reported)
        .await;
    if reported.is_none() {
        warn!(
            waited = ?FIRST_REPORTS,
            "the store or the keying daemon has not reported yet; ready anyway"
        );
    }
    // Under systemd (vipsec.service is Type=notify) the start job ends here, once the guard
    // has had its first pass, the API socket is bound and the store and keying daemon
    // have reported: `systemctl start vipsec` returns when the agent answers, and units
    // ordered after it find it answering. Without NOTIFY_SOCKET (a shell, Pacemaker, a
    // container) this does nothing.
    notify_service_manager(sd_notify::NotifyState::Ready);
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
        _ = cancel.cancelled() => {}
    }
    notify_service_manager(sd_notify::NotifyState::Stopping);
    cancel.cancel();
    agent.wait().await
}

fn notify_service_manager(state: sd_notify::NotifyState) {
    if let Err(e) = sd_notify::notify(&[state]) {
        warn!(error = %e, "could not notify the service manager (NOTIFY_SOCKET)");
    }
}
