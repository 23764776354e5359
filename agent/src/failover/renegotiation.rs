//! Bringing protection toward a peer VIP back: a renegotiation waits for the keying daemon
//! or for a new owner record, initiates, retries on a bounded schedule, gives up for a
//! cooldown and starts a new cycle.

use tokio::time::Instant;

use super::{
    Action, FailoverCore, FailoverOutcome, FailoverSummary, Notice, NoticeKind, Out, OwnerWait,
    Renegotiation, Timer,
};
use crate::model::Vip;

impl FailoverCore {
    pub(super) fn waits_for_owner_record(&self, vip: Vip) -> bool {
        self.settings.cluster_store
            && self.store_healthy == Some(true)
            && self
                .peers
                .get(&vip)
                .is_some_and(|p| p.synced && p.owner.as_ref().is_none_or(|o| o.draining))
    }

    /// Starts bringing protection toward `vip` back, or hurries a running attempt. Whatever
    /// prompted it is news that ends a streak of refusals.
    pub(super) fn renegotiate(
        &mut self,
        out: &mut Out,
        now: Instant,
        vip: Vip,
        reason: String,
        drop_stale: bool,
    ) {
        self.peers.get_mut(&vip).expect("known peer").refused = 0;
        self.start_renegotiation(out, now, vip, reason, drop_stale);
    }

    /// Renegotiates after the peer deleted the last SA right after it came up (`refused`
    /// counts the streak): the first attempt waits the retry backoff for that many.
    pub(super) fn renegotiate_refused(
        &mut self,
        out: &mut Out,
        now: Instant,
        vip: Vip,
        reason: String,
    ) {
        self.start_renegotiation(out, now, vip, reason, false);
    }

    fn start_renegotiation(
        &mut self,
        out: &mut Out,
        now: Instant,
        vip: Vip,
        reason: String,
        drop_stale: bool,
    ) {
        let p = self.peers.get_mut(&vip).expect("known peer");
        if drop_stale && !p.sas.is_empty() {
            p.sas.clear();
            out.push(Action::DropStaleSas { vip });
        }
        p.idle.reset();
        if let Some(r) = p.renegotiation.as_mut() {
            if r.in_flight {
                // The attempt under way was aimed at whoever held the VIP before this news
                // (often nobody: the VIP in transit). Abort it rather than wait out its
                // timeout, and start over toward the VIP's new owner.
                r.in_flight = false;
                r.retry_now = false;
                if !out.iter().any(|a| a.drops(vip)) {
                    out.push(Action::DropStaleSas { vip });
                }
            }
            self.kick(out, vip);
            return;
        }
        p.renegotiation = Some(Renegotiation {
            started: now,
            reason: reason.clone(),
            attempts: p.late_attempt.unwrap_or(0),
            in_flight: false,
            owner_wait: OwnerWait::NotYet,
            waiting_for_keying: false,
            retry_now: false,
            attempt_started: now,
            news: false,
        });
        p.last_failover = Some(FailoverSummary {
            started: now,
            duration: None,
            reason: reason.clone(),
            outcome: FailoverOutcome::Running,
            attempts: 0,
        });
        let epoch = p.epoch;
        let owner = p.owner.clone();
        let refused = p.refused;
        let mut detail = reason;
        if refused > 0 {
            // The peer deleted the last SA(s) right after they came up: it refuses them
            // for now. Wait as after as many failed attempts; news of a new owner or the
            // VIP answering after silence still starts the next attempt at once (through
            // `advance`, whose attempt moves the generation past this timer).
            let after = self.settings.retry.delay_after(refused);
            p.generation += 1;
            out.push(Action::StartTimer {
                timer: Timer::Retry {
                    vip,
                    generation: p.generation,
                },
                after,
            });
            detail = format!(
                "{detail}; the peer refused {refused} SA(s) in a row, next attempt in {}",
                humantime::format_duration(after)
            );
        }
        out.push(Action::Notify(
            Notice::new(NoticeKind::RenegotiationStarted, Some(vip))
                .owner(owner.as_ref())
                .epoch(epoch)
                .detail(detail),
        ));
        if refused == 0 {
            self.advance(out, vip);
        } else {
            // Without a record, the probe is what says the refusing holder left.
            self.start_ike_probe(out, vip);
        }
    }

    /// Decides the next step of a renegotiation: wait for the daemon, wait for an owner,
    /// or initiate now.
    fn advance(&mut self, out: &mut Out, vip: Vip) {
        let keying_up = self.keying_up == Some(true);
        let wait_owner = self.waits_for_owner_record(vip);
        let owner_wait = self.settings.owner_wait;
        let crowd = self.crowd_at_once(vip);
        let p = self.peers.get_mut(&vip).expect("known peer");
        let Some(r) = p.renegotiation.as_mut() else {
            return;
        };
        if r.in_flight {
            r.retry_now = true;
            return;
        }
        if !keying_up {
            r.waiting_for_keying = true;
            return;
        }
        r.waiting_for_keying = false;
        if wait_owner {
            match r.owner_wait {
                OwnerWait::NotYet if r.attempts == 0 => {
                    r.owner_wait = OwnerWait::Waiting;
                    p.generation += 1;
                    let timer = Timer::OwnerWait {
                        vip,
                        generation: p.generation,
                    };
                    out.push(Action::StartTimer {
                        timer,
                        after: owner_wait,
                    });
                    return;
                }
                OwnerWait::Waiting => return,
                _ => {}
            }
        }
        if r.attempts > 0 && !out.iter().any(|a| a.drops(vip)) {
            // A timed-out attempt leaves a half-open IKE_SA that charon keeps
            // retransmitting in the background; clear it so attempts never pile up.
            out.push(Action::DropStaleSas { vip });
        }
        r.attempts += 1;
        r.in_flight = true;
        r.attempt_started = self.now;
        p.generation += 1;
        out.push(Action::Initiate {
            vip,
            attempt: r.attempts,
            crowd,
            news: std::mem::take(&mut r.news),
        });
        self.start_ike_probe(out, vip);
    }

    /// Initiations expected to reach `vip`'s new owner at once: the crowd of front-end
    /// pairs moving with it, each front-end sending at most `max_concurrency` of its own
    /// at a time. Front-ends are taken to follow as many of the moving VIPs as this one:
    /// one node with 100 VIPs is a crowd of 4, not of 100 (no jitter), and 1,000 such
    /// nodes a crowd of 4,000. 0: unknown.
    pub(super) fn crowd_at_once(&self, vip: Vip) -> u32 {
        let pairs = self.crowds.crowd(vip);
        let mine = self.crowds.together(vip, |v| self.peers.contains_key(v));
        let at_once = mine.min(self.settings.max_concurrency);
        let scaled = u64::from(pairs) * u64::from(at_once) / u64::from(mine);
        if pairs > 0 { (scaled as u32).max(1) } else { 0 }
    }

    /// Something changed that makes an immediate attempt worthwhile.
    pub(super) fn kick(&mut self, out: &mut Out, vip: Vip) {
        self.advance(out, vip);
    }

    pub(super) fn initiate_finished(
        &mut self,
        out: &mut Out,
        now: Instant,
        vip: Vip,
        attempt: u32,
        result: Result<(), String>,
    ) {
        let retry = self.settings.retry;
        let Some(p) = self.peers.get_mut(&vip) else {
            return;
        };
        if p.late_attempt == Some(attempt) {
            p.late_attempt = None;
        }
        let Some(r) = p.renegotiation.as_mut() else {
            return;
        };
        // Not this renegotiation's attempt under way: one of an ended renegotiation (whose
        // number this one continues from until its own first attempt), or one aborted.
        if attempt != r.attempts || !r.in_flight {
            return;
        }
        r.in_flight = false;
        match result {
            Ok(()) => self.finish(out, now, vip),
            Err(e) => {
                let elapsed = now.saturating_duration_since(r.started);
                if elapsed >= retry.deadline {
                    let attempts = r.attempts;
                    let started = r.started;
                    let reason = r.reason.clone();
                    p.renegotiation = None;
                    p.generation += 1;
                    p.last_failover = Some(FailoverSummary {
                        started,
                        duration: Some(elapsed),
                        reason,
                        outcome: FailoverOutcome::GaveUp,
                        attempts,
                    });
                    out.push(Action::Notify(
                        Notice::new(NoticeKind::RenegotiationFailed, Some(vip))
                            .duration(elapsed)
                            .detail(format!(
                                "gave up after {attempts} attempts: {e}; next cycle in {:?}",
                                retry.cooldown
                            )),
                    ));
                    let timer = Timer::Cooldown {
                        vip,
                        generation: p.generation,
                    };
                    out.push(Action::StartTimer {
                        timer,
                        after: retry.cooldown,
                    });
                } else if r.retry_now {
                    r.retry_now = false;
                    self.advance(out, vip);
                } else {
                    p.generation += 1;
                    // The backoff counts from the start of the failed attempt: an attempt
                    // that already waited out its timeout on a silent peer is retried at once.
                    let spent = now.saturating_duration_since(r.attempt_started);
                    let after = retry
                        .delay_after(r.attempts)
                        .saturating_sub(spent)
                        .min(retry.deadline - elapsed);
                    let timer = Timer::Retry {
                        vip,
                        generation: p.generation,
                    };
                    out.push(Action::StartTimer { timer, after });
                }
            }
        }
    }

    pub(super) fn finish(&mut self, out: &mut Out, now: Instant, vip: Vip) {
        let probation = self.probes_ike().then(|| now + self.idle_timeout());
        let p = self.peers.get_mut(&vip).expect("known peer");
        let Some(r) = p.renegotiation.take() else {
            return;
        };
        if r.in_flight {
            p.late_attempt = Some(r.attempts);
        }
        p.probation_until = probation;
        p.generation += 1;
        let took = now.saturating_duration_since(r.started);
        p.last_failover = Some(FailoverSummary {
            started: r.started,
            duration: Some(took),
            reason: r.reason.clone(),
            outcome: FailoverOutcome::Recovered,
            attempts: r.attempts,
        });
        out.push(Action::Notify(
            Notice::new(NoticeKind::RenegotiationFinished, Some(vip))
                .owner(p.owner.as_ref())
                .epoch(p.epoch)
                .duration(took)
                .detail(format!("{} after {} attempt(s)", r.reason, r.attempts)),
        ));
    }

    pub(super) fn retry_timer(&mut self, out: &mut Out, vip: Vip, generation: u64) {
        if self
            .peers
            .get(&vip)
            .is_some_and(|p| p.generation == generation)
        {
            self.advance(out, vip);
        }
    }

    pub(super) fn owner_wait_timer(&mut self, out: &mut Out, vip: Vip, generation: u64) {
        let Some(p) = self.peers.get_mut(&vip) else {
            return;
        };
        if p.generation != generation {
            return;
        }
        if let Some(r) = p.renegotiation.as_mut()
            && r.owner_wait == OwnerWait::Waiting
        {
            // No new owner showed up: try the VIP anyway, whoever answers.
            r.owner_wait = OwnerWait::Expired;
            self.advance(out, vip);
        }
    }

    pub(super) fn cooldown_timer(
        &mut self,
        out: &mut Out,
        now: Instant,
        vip: Vip,
        generation: u64,
    ) {
        let Some(p) = self.peers.get(&vip) else {
            return;
        };
        if p.generation == generation && p.sas.is_empty() && p.renegotiation.is_none() {
            self.renegotiate(out, now, vip, "new cycle after giving up".into(), false);
        }
    }

    pub(super) fn vacant_timer(&mut self, out: &mut Out, now: Instant, vip: Vip, generation: u64) {
        let Some(p) = self.peers.get(&vip) else {
            return;
        };
        if p.vacancies == generation
            && p.owner.is_none()
            && !p.sas.is_empty()
            && p.renegotiation.is_none()
        {
            let reason = format!(
                "no owner recorded for {}",
                humantime::format_duration(self.settings.owner_wait)
            );
            self.renegotiate(out, now, vip, reason, true);
            // `owner_wait` has already passed: initiate toward whoever answers.
            if let Some(r) = self
                .peers
                .get_mut(&vip)
                .and_then(|p| p.renegotiation.as_mut())
                && r.owner_wait == OwnerWait::Waiting
            {
                r.owner_wait = OwnerWait::Expired;
                self.advance(out, vip);
            }
        }
    }
}
