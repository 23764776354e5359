//! Probing a peer VIP's IKE port while a renegotiation has no owner record to go by.
//!
//! With a cluster store a front-end hears of the new owner from its record. Without one
//! (the embedded store, or the cluster store unreachable) it only sees its attempts fail:
//! an attempt sent while the VIP is in transit goes nowhere and costs a whole
//! `initiate_timeout`, and after a few of them the pacer pauses. So while it renegotiates,
//! the front-end also asks the VIP's IKE port (`keying::ike_probe`). Silence means nobody
//! holds the VIP now; an answer after silence means somebody new does, and the next
//! attempt goes at once, replacing one that was sent into the silence.
//!
//! An answer without silence before it says nothing new (the old holder still answering,
//! or the attempt under way reaching a live one), so the probes then slow down, doubling
//! up to 16 intervals, until the next silence.

use tokio::time::Instant;

use super::{Action, FailoverCore, Notice, NoticeKind, Out};
use crate::model::Vip;

/// After this many answers in a row the interval between probes stops doubling.
const MAX_BACKOFF_SHIFT: u32 = 4;

impl FailoverCore {
    fn probes_ike(&self) -> bool {
        self.settings.ike_probe.is_some()
            && !(self.settings.cluster_store && self.store_healthy == Some(true))
    }

    /// An attempt toward `vip` started: probe beside it, unless a probe already runs.
    pub(super) fn start_ike_probe(&mut self, out: &mut Out, vip: Vip) {
        let (probes, Some(window)) = (self.probes_ike(), self.settings.ike_probe) else {
            return;
        };
        let Some(r) = self
            .peers
            .get_mut(&vip)
            .and_then(|p| p.renegotiation.as_mut())
        else {
            return;
        };
        if !probes || r.probing.asked {
            return;
        }
        r.probing.asked = true;
        out.push(Action::ProbeIke {
            vip,
            after: std::time::Duration::ZERO,
            window,
        });
    }

    pub(super) fn ike_probed(&mut self, out: &mut Out, now: Instant, vip: Vip, answered: bool) {
        let probes = self.probes_ike();
        let Some(window) = self.settings.ike_probe else {
            return;
        };
        let Some(p) = self.peers.get_mut(&vip) else {
            return;
        };
        // The renegotiation is over (or a new one has its own probe): stop here.
        let Some(r) = p.renegotiation.as_mut() else {
            return;
        };
        r.probing.asked = false;
        if !probes {
            return;
        }
        r.probing.asked = true;
        if !answered {
            r.probing.silent_at = Some(now);
            r.probing.answers = 0;
            // A silent probe has already waited its window.
            out.push(Action::ProbeIke {
                vip,
                after: std::time::Duration::ZERO,
                window,
            });
            return;
        }
        let shift = r.probing.answers.min(MAX_BACKOFF_SHIFT);
        r.probing.answers += 1;
        out.push(Action::ProbeIke {
            vip,
            after: window.saturating_mul(1 << shift),
            window,
        });
        let Some(silent_at) = r.probing.silent_at.take() else {
            return;
        };
        let sent_into_silence = r.in_flight && r.attempt_started <= silent_at;
        if r.in_flight && !sent_into_silence {
            // Started after the silence ended: it is on its way to the new holder.
            return;
        }
        if sent_into_silence {
            r.in_flight = false;
            r.retry_now = false;
            out.push(Action::DropStaleSas { vip });
        }
        r.news = true;
        let attempts = r.attempts;
        out.push(Action::Notify(
            Notice::new(NoticeKind::PeerAnswers, Some(vip))
                .epoch(p.epoch)
                .detail(format!(
                    "{vip}'s IKE port answers again after silence; attempt {} now",
                    attempts + 1
                )),
        ));
        // A retry timer still pending is void: `advance` moves the generation on.
        self.kick(out, vip);
    }
}
