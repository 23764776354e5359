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
//! The probe goes on for a probation of one idle timeout after the renegotiation brought an
//! SA back: in a planned move the old holder, draining, refuses new SAs, but one can still
//! come up with it in the instant before its address goes, and then nobody can tell the
//! front-end (a DELETE cannot leave from an address that is gone). Silence and an answer
//! after that SA came up say it was with the holder before: it is dropped and replaced at
//! once, instead of after the idle timeout.
//!
//! An answer without silence before it says nothing new (the old holder still answering,
//! or the attempt under way reaching a live one), so while a renegotiation lasts the
//! probes then slow down, doubling up to 16 intervals, until the next silence; to two
//! intervals only while the peer refuses the SAs it brings (a drained holder that still
//! has the address): the attempts then wait the retry backoff, and the probe is what
//! notices the address move.

use std::time::Duration;

use tokio::time::Instant;

use super::{Action, FailoverCore, Notice, NoticeKind, Out};
use crate::model::Vip;

/// After this many answers in a row the interval between probes stops doubling.
const MAX_BACKOFF_SHIFT: u32 = 4;
/// ... and while the peer refuses the renegotiation's SAs.
const REFUSED_BACKOFF_SHIFT: u32 = 1;

impl FailoverCore {
    /// With a cluster store the probe stands in only while the store is known to be
    /// unreachable. While its health is still unknown (the agent starting) the store's
    /// answer is a round trip away, and probing then would send one IKE_SA_INIT for every
    /// peer VIP at once: a responder counts each as half-open while it answers, and from
    /// `charon.cookie_threshold_ip` (3) of them asks that address for COOKIEs for its
    /// calm-down of 10 s, through the next takeover.
    pub(super) fn probes_ike(&self) -> bool {
        self.settings.ike_probe.is_some()
            && (!self.settings.cluster_store || self.store_healthy == Some(false))
    }

    /// An attempt toward `vip` started: probe beside it, unless a probe already runs.
    pub(super) fn start_ike_probe(&mut self, out: &mut Out, vip: Vip) {
        let (probes, Some(window)) = (self.probes_ike(), self.settings.ike_probe) else {
            return;
        };
        let Some(p) = self.peers.get_mut(&vip) else {
            return;
        };
        if !probes || p.renegotiation.is_none() || p.probing.asked {
            return;
        }
        p.probing.asked = true;
        out.push(Action::ProbeIke {
            vip,
            after: Duration::ZERO,
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
        p.probing.asked = false;
        let renegotiating = p.renegotiation.is_some();
        let on_probation = p.probation_until.is_some_and(|t| now < t) && !p.sas.is_empty();
        if !probes || !(renegotiating || on_probation) {
            // Nothing left to learn from the port: start afresh next time.
            p.probing = Default::default();
            p.probation_until = None;
            return;
        }
        p.probing.asked = true;
        if !answered {
            p.probing.silent_at = Some(now);
            p.probing.answers = 0;
            // A silent probe has already waited its window.
            out.push(Action::ProbeIke {
                vip,
                after: Duration::ZERO,
                window,
            });
            return;
        }
        // A renegotiation may last; a probation is one idle timeout and must not miss the
        // silence it is there for. Nor may a renegotiation whose peer refuses its SAs (a
        // draining holder, whose going is the news): its probes slow down to twice the
        // interval only, enough to catch a hand-over's gap of a few hundred ms.
        let shift = match (renegotiating, p.refused) {
            (false, _) => 0,
            (true, 0) => p.probing.answers.min(MAX_BACKOFF_SHIFT),
            (true, _) => p.probing.answers.min(REFUSED_BACKOFF_SHIFT),
        };
        p.probing.answers += 1;
        out.push(Action::ProbeIke {
            vip,
            after: window.saturating_mul(1 << shift),
            window,
        });
        let Some(silent_at) = p.probing.silent_at.take() else {
            return;
        };
        // Somebody new holds the VIP: whatever the one before refused says nothing of it.
        p.refused = 0;
        let epoch = p.epoch;
        let Some(r) = p.renegotiation.as_mut() else {
            // On probation: an SA that came up before the silence is with the old holder.
            let stale = p.sas.values().any(|sa| sa.since <= silent_at);
            if stale {
                out.push(Action::Notify(
                    Notice::new(NoticeKind::PeerAnswers, Some(vip))
                        .epoch(epoch)
                        .detail(format!(
                            "{vip}'s IKE port went silent and answers again since the SA came \
                             up: that SA is with the holder before"
                        )),
                ));
                let reason = "the VIP's holder changed after the SA came up".to_string();
                self.renegotiate(out, now, vip, reason, true);
                for a in out.iter_mut() {
                    if let Action::Initiate { vip: v, news, .. } = a
                        && *v == vip
                    {
                        *news = true;
                    }
                }
            }
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
            out.push(Action::DropSilencedSas { vip });
        }
        r.news = true;
        let attempts = r.attempts;
        out.push(Action::Notify(
            Notice::new(NoticeKind::PeerAnswers, Some(vip))
                .epoch(epoch)
                .detail(format!(
                    "{vip}'s IKE port answers again after silence; attempt {} now",
                    attempts + 1
                )),
        ));
        // A retry timer still pending is void: `advance` moves the generation on.
        self.kick(out, vip);
    }
}
