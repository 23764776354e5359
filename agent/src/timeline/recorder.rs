//! Derives this node's marks of each move from what the failover core is told and what it
//! asks for. Pure: the caller passes the wall-clock time and publishes what comes back.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::failover::{Action, Input};
use crate::model::{TrafficCounters, Vip, VipOwner, VipRole};

use super::{Mark, NodeMarks};

/// A release older than this is not attached to a later owner change: the VIP came back
/// or was never taken over, and a move hours later is a different one.
const RELEASE_KEPT_MS: u64 = 10 * 60 * 1000;

/// A move as this front-end follows it, from learning the new owner to first traffic.
#[derive(Debug, Clone)]
struct FrontMove {
    epoch: u64,
    /// Counters when the CHILD_SA came up: traffic is growth beyond them.
    baseline: Option<TrafficCounters>,
    /// When the move was learnt, if an initiation handed to the keying daemon before then
    /// was still out (the daemon retransmits its IKE_SA_INIT to the VIP's address).
    carried: Option<u64>,
    /// Those initiations: once all of them failed, nothing was carried.
    carried_attempts: BTreeSet<u32>,
}

/// What the recorder learnt of a VIP's owners.
#[derive(Debug, Clone, Default)]
struct Known {
    /// The last owner seen (kept after the record is withdrawn: the next move is from it).
    node: Option<String>,
    epoch: u64,
}

pub struct Recorder {
    node: String,
    hosted: BTreeSet<Vip>,
    peers: BTreeSet<Vip>,
    keep: usize,
    known: BTreeMap<Vip, Known>,
    synced: BTreeSet<Vip>,
    /// Old owner: when the VIP was drained or left, and the epoch it had then.
    pending_release: BTreeMap<Vip, (u64, u64)>,
    /// New owner: when the address appeared, until the new epoch is known.
    pending_usable: BTreeMap<Vip, u64>,
    fronts: BTreeMap<Vip, FrontMove>,
    last_counters: BTreeMap<Vip, TrafficCounters>,
    /// Initiations handed to the keying daemon that have not returned: (VIP, attempt).
    in_flight: BTreeSet<(Vip, u32)>,
    history: BTreeMap<Vip, VecDeque<NodeMarks>>,
}

/// Whether a counter grew past its baseline; a counter below it belongs to a new SA
/// (the sum restarted), so any count is growth.
fn grew(cur: u64, base: u64) -> bool {
    if cur >= base { cur > base } else { cur > 0 }
}

impl Recorder {
    /// `keep`: how many moves per VIP stay in memory.
    pub fn new(node: impl Into<String>, hosted: &[Vip], peers: &[Vip], keep: usize) -> Self {
        Recorder {
            node: node.into(),
            hosted: hosted.iter().copied().collect(),
            peers: peers.iter().copied().collect(),
            keep: keep.max(1),
            known: BTreeMap::new(),
            synced: BTreeSet::new(),
            pending_release: BTreeMap::new(),
            pending_usable: BTreeMap::new(),
            fronts: BTreeMap::new(),
            last_counters: BTreeMap::new(),
            in_flight: BTreeSet::new(),
            history: BTreeMap::new(),
        }
    }

    /// This node's marks of the VIP's last moves, oldest first.
    pub fn history(&self, vip: Vip) -> Vec<NodeMarks> {
        self.history
            .get(&vip)
            .map(|h| h.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// This node's marks of every VIP's last moves.
    pub fn all_history(&self) -> Vec<NodeMarks> {
        self.history.values().flatten().cloned().collect()
    }

    /// Observes an input before the core handles it; returns this node's marks of every
    /// move that gained one (all of its marks so far: publishing them replaces the last).
    pub fn observe_input(&mut self, now_ms: u64, input: &Input) -> Vec<NodeMarks> {
        let mut out = Vec::new();
        match input {
            Input::OwnerSnapshot(records) => {
                for (vip, owner) in records {
                    self.owner_seen(&mut out, now_ms, *vip, owner.as_ref(), true);
                }
            }
            Input::OwnerChanged { vip, owner } => {
                self.owner_seen(&mut out, now_ms, *vip, owner.as_ref(), false)
            }
            Input::VipAppeared(vip) if self.hosted.contains(vip) => {
                self.pending_usable.insert(*vip, now_ms);
                self.pending_release.remove(vip);
            }
            Input::VipDisappeared(vip) | Input::Drain(vip) if self.hosted.contains(vip) => {
                let epoch = self.known.get(vip).map_or(0, |k| k.epoch);
                // A drain and then the address leaving: the drain is the release.
                self.pending_release.entry(*vip).or_insert((now_ms, epoch));
                if matches!(input, Input::VipDisappeared(_)) {
                    self.pending_usable.remove(vip);
                }
            }
            Input::InitiateStarted { vip, attempt } => {
                self.in_flight.insert((*vip, *attempt));
                if let Some(f) = self.fronts.get(vip) {
                    let epoch = f.epoch;
                    self.front_mark(&mut out, *vip, epoch, Mark::FirstIkeSaInit, now_ms);
                }
            }
            Input::InitiateFinished {
                vip,
                attempt,
                result,
            } => {
                self.in_flight.remove(&(*vip, *attempt));
                if result.is_err()
                    && let Some(f) = self.fronts.get_mut(vip)
                    && f.carried_attempts.remove(attempt)
                    && f.carried_attempts.is_empty()
                {
                    f.carried = None;
                }
            }
            Input::SaUp(sa) if sa.role == VipRole::Peer => {
                if let Some(f) = self.fronts.get_mut(&sa.vip) {
                    let epoch = f.epoch;
                    if f.baseline.is_none() {
                        f.baseline =
                            Some(self.last_counters.get(&sa.vip).copied().unwrap_or_default());
                    }
                    if let Some(learnt) = f.carried {
                        self.carried_initiation(sa.vip, epoch, learnt);
                    }
                    self.front_mark(&mut out, sa.vip, epoch, Mark::ChildSaInstalled, now_ms);
                }
            }
            Input::CountersSampled { vip, counters } => {
                if let Some(f) = self.fronts.get(vip)
                    && let Some(base) = f.baseline
                    && grew(counters.bytes_in, base.bytes_in)
                    && grew(counters.bytes_out, base.bytes_out)
                {
                    let epoch = f.epoch;
                    self.front_mark(&mut out, *vip, epoch, Mark::FirstTraffic, now_ms);
                    // This front-end's part of the move is over.
                    self.fronts.remove(vip);
                }
                self.last_counters.insert(*vip, *counters);
            }
            _ => {}
        }
        out
    }

    /// Observes an action the core asked for.
    pub fn observe_action(&mut self, now_ms: u64, action: &Action) -> Vec<NodeMarks> {
        let mut out = Vec::new();
        if let Action::Initiate { vip, .. } = action
            && let Some(f) = self.fronts.get(vip)
        {
            let epoch = f.epoch;
            self.front_mark(&mut out, *vip, epoch, Mark::InitiationQueued, now_ms);
        }
        out
    }

    fn owner_seen(
        &mut self,
        out: &mut Vec<NodeMarks>,
        now_ms: u64,
        vip: Vip,
        owner: Option<&VipOwner>,
        snapshot: bool,
    ) {
        let first_sync = snapshot && self.synced.insert(vip);
        let Some(o) = owner else {
            return;
        };
        let known = self.known.entry(vip).or_default();
        if o.epoch <= known.epoch {
            return;
        }
        let from = known.node.clone();
        known.node = Some(o.node.clone());
        known.epoch = o.epoch;
        let to = o.node.clone();
        if first_sync {
            // At start-up the record is where things stand, not a move.
            self.fronts.remove(&vip);
            return;
        }

        if self.hosted.contains(&vip) {
            if o.node == self.node {
                self.pending_release.remove(&vip);
                let usable = self.pending_usable.remove(&vip);
                let mut marks = vec![(Mark::EpochRecorded, o.taken_at_ms)];
                marks.extend(usable.map(|at| (Mark::Usable, at)));
                self.record(out, vip, o.epoch, from.clone(), &to, &marks);
            } else if let Some((at, epoch)) = self.pending_release.remove(&vip)
                && epoch < o.epoch
                && o.taken_at_ms.saturating_sub(at) < RELEASE_KEPT_MS
            {
                let me = Some(self.node.clone());
                self.record(out, vip, o.epoch, me, &to, &[(Mark::Released, at)]);
            }
        }
        if self.peers.contains(&vip) {
            let carried_attempts: BTreeSet<u32> = self
                .in_flight
                .range((vip, 0)..=(vip, u32::MAX))
                .map(|(_, attempt)| *attempt)
                .collect();
            self.fronts.insert(
                vip,
                FrontMove {
                    epoch: o.epoch,
                    baseline: None,
                    carried: (!carried_attempts.is_empty()).then_some(now_ms),
                    carried_attempts,
                },
            );
            // Create the entry so later marks know from and to.
            self.entry(vip, o.epoch, from, &to);
        }
    }

    /// The CHILD_SA came up before this move's own initiation left the pacer: the new
    /// owner answered an IKE_SA_INIT that was already out when the move was learnt. For
    /// this move, that initiation was queued and handed over when the move was learnt,
    /// whatever was marked for the one still waiting in the pacer.
    fn carried_initiation(&mut self, vip: Vip, epoch: u64, learnt: u64) {
        let Some(e) = self
            .history
            .get_mut(&vip)
            .and_then(|h| h.iter_mut().find(|e| e.epoch == epoch))
        else {
            return;
        };
        if !e.marks.contains_key(&Mark::FirstIkeSaInit) {
            e.marks.insert(Mark::InitiationQueued, learnt);
            e.marks.insert(Mark::FirstIkeSaInit, learnt);
        }
    }

    fn front_mark(&mut self, out: &mut Vec<NodeMarks>, vip: Vip, epoch: u64, m: Mark, at: u64) {
        let Some(e) = self
            .history
            .get(&vip)
            .and_then(|h| h.iter().find(|e| e.epoch == epoch))
        else {
            return;
        };
        let (from, to) = (e.from_node.clone(), e.to_node.clone());
        self.record(out, vip, epoch, from, &to, &[(m, at)]);
    }

    fn entry(&mut self, vip: Vip, epoch: u64, from: Option<String>, to: &str) -> &mut NodeMarks {
        let h = self.history.entry(vip).or_default();
        let i = match h.iter().position(|e| e.epoch == epoch) {
            Some(i) => i,
            None => {
                h.push_back(NodeMarks {
                    vip,
                    epoch,
                    node: self.node.clone(),
                    from_node: from,
                    to_node: to.to_string(),
                    marks: BTreeMap::new(),
                });
                while h.len() > self.keep {
                    h.pop_front();
                }
                h.len() - 1
            }
        };
        &mut h[i]
    }

    /// Adds marks not yet recorded; reports the move when one was new.
    fn record(
        &mut self,
        out: &mut Vec<NodeMarks>,
        vip: Vip,
        epoch: u64,
        from: Option<String>,
        to: &str,
        marks: &[(Mark, u64)],
    ) {
        let e = self.entry(vip, epoch, from, to);
        let mut changed = false;
        for (m, at) in marks {
            if !e.marks.contains_key(m) {
                e.marks.insert(*m, *at);
                changed = true;
            }
        }
        if changed {
            let e = e.clone();
            out.retain(|o| !(o.vip == vip && o.epoch == epoch));
            out.push(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::SaRef;
    use crate::timeline::MoveTimeline;

    const VIP: &str = "192.0.2.100";

    fn vip() -> Vip {
        VIP.parse().unwrap()
    }

    fn owner(node: &str, epoch: u64, at: u64) -> Input {
        Input::OwnerChanged {
            vip: vip(),
            owner: Some(VipOwner {
                node: node.into(),
                epoch,
                taken_at_ms: at,
                draining: false,
            }),
        }
    }

    /// The owner's own record, marked draining while it hands the VIP over.
    fn draining(node: &str, epoch: u64) -> Input {
        Input::OwnerChanged {
            vip: vip(),
            owner: Some(VipOwner {
                node: node.into(),
                epoch,
                taken_at_ms: 1,
                draining: true,
            }),
        }
    }

    fn snapshot(node: &str, epoch: u64) -> Input {
        Input::OwnerSnapshot(vec![(
            vip(),
            Some(VipOwner {
                node: node.into(),
                epoch,
                taken_at_ms: 1,
                draining: false,
            }),
        )])
    }

    fn sa_up() -> Input {
        Input::SaUp(SaRef {
            vip: vip(),
            role: VipRole::Peer,
            ike_id: 9,
        })
    }

    fn counters(bytes_in: u64, bytes_out: u64) -> Input {
        Input::CountersSampled {
            vip: vip(),
            counters: TrafficCounters {
                bytes_in,
                bytes_out,
                packets_in: 1,
                packets_out: 1,
            },
        }
    }

    fn started() -> Input {
        Input::InitiateStarted {
            vip: vip(),
            attempt: 1,
        }
    }

    fn initiate() -> Action {
        Action::Initiate {
            vip: vip(),
            attempt: 1,
            crowd: 1,
            news: false,
        }
    }

    enum Step {
        In(u64, Input),
        Act(u64, Action),
    }

    /// Feeds a script; returns the last published marks per move, as the store keeps them.
    fn run(r: &mut Recorder, script: Vec<Step>) -> Vec<NodeMarks> {
        let mut published: BTreeMap<u64, NodeMarks> = BTreeMap::new();
        for step in script {
            let out = match step {
                Step::In(t, i) => r.observe_input(t, &i),
                Step::Act(t, a) => r.observe_action(t, &a),
            };
            for m in out {
                published.insert(m.epoch, m);
            }
        }
        published.into_values().collect()
    }

    fn back_end(node: &str) -> Recorder {
        Recorder::new(node, &[vip()], &[], 8)
    }

    fn front_end(node: &str) -> Recorder {
        Recorder::new(node, &[], &[vip()], 8)
    }

    use Step::{Act, In};

    fn front_end_script(learnt: u64) -> Vec<Step> {
        vec![
            In(0, snapshot("be1", 3)),
            In(5, counters(1000, 1000)),
            In(
                101,
                Input::OwnerChanged {
                    vip: vip(),
                    owner: None,
                },
            ),
            In(learnt, owner("be2", 4, 600)),
            Act(learnt, initiate()),
            // The pacer's wait before the initiation reaches the keying daemon.
            In(learnt + 12, started()),
            In(learnt + 30, sa_up()),
            // The old SA's sum before the new one carried anything: no traffic yet.
            In(learnt + 40, counters(0, 0)),
            // Only one direction: a request with no answer yet.
            In(learnt + 290, counters(0, 120)),
            In(learnt + 540, counters(300, 240)),
            In(learnt + 790, counters(900, 480)),
        ]
    }

    #[test]
    fn planned_move_gives_all_seven_marks_in_order() {
        let mut be1 = back_end("be1");
        let old = run(
            &mut be1,
            vec![
                In(0, Input::VipAppeared(vip())),
                In(1, owner("be1", 3, 1)),
                In(100, Input::Drain(vip())),
                In(100, draining("be1", 3)),
                In(
                    101,
                    Input::OwnerChanged {
                        vip: vip(),
                        owner: None,
                    },
                ),
                In(590, Input::VipDisappeared(vip())),
                In(605, owner("be2", 4, 600)),
            ],
        );
        let mut be2 = back_end("be2");
        let new = run(
            &mut be2,
            vec![
                In(0, snapshot("be1", 3)),
                In(598, Input::VipAppeared(vip())),
                In(603, owner("be2", 4, 600)),
            ],
        );
        let mut fe1 = front_end("fe1");
        let fe = run(&mut fe1, front_end_script(604));

        // be1's first move (acquiring epoch 3) plus its release of epoch 4.
        assert_eq!(old.len(), 2);
        assert_eq!(old[1].marks, BTreeMap::from([(Mark::Released, 100)]));
        assert_eq!(old[1].from_node.as_deref(), Some("be1"));
        assert_eq!(
            new[0].marks,
            BTreeMap::from([(Mark::Usable, 598), (Mark::EpochRecorded, 600)])
        );
        assert_eq!(new[0].from_node.as_deref(), Some("be1"));

        let t = MoveTimeline::merge(&[old[1].clone(), new[0].clone(), fe[0].clone()]).unwrap();
        assert!(t.complete(), "{}", t.summary());
        let at: Vec<u64> = Mark::ALL.iter().map(|m| t.at(*m).unwrap()).collect();
        assert_eq!(at, vec![100, 598, 600, 604, 616, 634, 1144]);
        assert_eq!(
            t.between(Mark::InitiationQueued, Mark::FirstIkeSaInit),
            Some(std::time::Duration::from_millis(12)),
            "the pacer's wait is a step of its own"
        );
        assert_eq!(t.marks[&Mark::Released].0, "be1");
        assert_eq!(t.marks[&Mark::FirstTraffic].0, "fe1");
        assert_eq!(
            (t.from_node.as_deref(), t.to_node.as_str()),
            (Some("be1"), "be2")
        );
    }

    #[test]
    fn crash_has_no_release_but_the_rest() {
        // be1 dies: nothing from it. be2 takes the VIP after VRRP's master-down timer.
        let mut be2 = back_end("be2");
        let new = run(
            &mut be2,
            vec![
                In(0, snapshot("be1", 3)),
                In(3000, Input::VipAppeared(vip())),
                In(3004, owner("be2", 4, 3002)),
            ],
        );
        let mut fe1 = front_end("fe1");
        let fe = run(
            &mut fe1,
            vec![
                In(0, snapshot("be1", 3)),
                In(5, counters(1000, 1000)),
                // The idle detector tried before the new owner was known: not this move.
                Act(1500, initiate()),
                In(3005, owner("be2", 4, 3002)),
                Act(3005, initiate()),
                In(3007, started()),
                In(3040, sa_up()),
                In(3250, counters(200, 200)),
            ],
        );
        let t = MoveTimeline::merge(&[new[0].clone(), fe[0].clone()]).unwrap();
        assert_eq!(t.missing(), vec![Mark::Released]);
        assert_eq!(t.at(Mark::InitiationQueued), Some(3005));
        assert_eq!(t.at(Mark::FirstIkeSaInit), Some(3007));
        assert_eq!(t.at(Mark::FirstTraffic), Some(3250));
        assert_eq!(t.from_node.as_deref(), Some("be1"));
        assert_eq!(t.recovery(), Some(std::time::Duration::from_millis(250)));
    }

    fn attempt(n: u32) -> (Action, Input, Input) {
        let act = Action::Initiate {
            vip: vip(),
            attempt: n,
            crowd: 1,
            news: false,
        };
        let started = Input::InitiateStarted {
            vip: vip(),
            attempt: n,
        };
        let finished = Input::InitiateFinished {
            vip: vip(),
            attempt: n,
            result: Err("timed out".into()),
        };
        (act, started, finished)
    }

    /// fe1's queued, first IKE_SA_INIT and CHILD_SA marks of the move to be2 (learnt at
    /// 3005 with attempt 2 out since 2001, attempt 3 queued at 3006), after `then`.
    fn marks_with_attempt_out(then: impl FnOnce(Input, Input) -> Vec<Step>) -> [u64; 3] {
        let (act2, started2, finished2) = attempt(2);
        let (act3, started3, _) = attempt(3);
        let mut script = vec![
            In(0, snapshot("be1", 3)),
            Act(2000, act2),
            In(2001, started2),
            In(3005, owner("be2", 4, 3002)),
            Act(3006, act3),
        ];
        script.extend(then(finished2, started3));
        let fe = run(&mut front_end("fe1"), script);
        let t = MoveTimeline::merge(&[fe[0].clone()]).unwrap();
        [
            Mark::InitiationQueued,
            Mark::FirstIkeSaInit,
            Mark::ChildSaInstalled,
        ]
        .map(|m| {
            t.at(m)
                .unwrap_or_else(|| panic!("no {m:?}: {}", t.summary()))
        })
    }

    #[test]
    fn an_initiation_already_out_when_the_move_is_learnt_counts_if_it_is_answered() {
        // The new owner answers the retransmission of the attempt out before the next
        // attempt leaves the pacer.
        let answered = marks_with_attempt_out(|_, started3| {
            vec![
                In(3040, sa_up()),
                In(3090, started3),
                In(3250, counters(200, 200)),
            ]
        });
        assert_eq!(answered, [3005, 3005, 3040]);

        // The same, but the attempt out fails and the next one makes the SA.
        let next = marks_with_attempt_out(|finished2, started3| {
            vec![In(3020, finished2), In(3030, started3), In(3070, sa_up())]
        });
        assert_eq!(next, [3006, 3030, 3070]);
    }

    #[test]
    fn an_initiation_out_when_the_move_is_learnt_that_fails_is_not_counted_for_a_later_sa() {
        // Attempt 2 was out when the move was learnt and fails; an SA then comes up that
        // no initiation of this move made (the pacer skips the queued one as not needed).
        let (act2, started2, finished2) = attempt(2);
        let (act3, _, _) = attempt(3);
        let fe = run(
            &mut front_end("fe1"),
            vec![
                In(0, snapshot("be1", 3)),
                Act(2000, act2),
                In(2001, started2),
                In(3005, owner("be2", 4, 3002)),
                Act(3006, act3),
                In(3020, finished2),
                In(3040, sa_up()),
            ],
        );
        let t = MoveTimeline::merge(&[fe[0].clone()]).unwrap();
        assert_eq!(t.at(Mark::InitiationQueued), Some(3006), "{}", t.summary());
        assert_eq!(t.at(Mark::FirstIkeSaInit), None, "{}", t.summary());
        assert_eq!(t.at(Mark::ChildSaInstalled), Some(3040), "{}", t.summary());
    }

    #[test]
    fn move_without_front_ends_has_back_end_marks_only() {
        let mut be1 = back_end("be1");
        let old = run(
            &mut be1,
            vec![
                In(0, snapshot("be1", 3)),
                In(10, Input::VipDisappeared(vip())),
                In(700, owner("be2", 4, 690)),
            ],
        );
        let mut be2 = back_end("be2");
        let new = run(
            &mut be2,
            vec![
                In(0, snapshot("be1", 3)),
                In(680, Input::VipAppeared(vip())),
                In(695, owner("be2", 4, 690)),
            ],
        );
        let t = MoveTimeline::merge(&[old[0].clone(), new[0].clone()]).unwrap();
        assert_eq!(
            t.missing(),
            vec![
                Mark::InitiationQueued,
                Mark::FirstIkeSaInit,
                Mark::ChildSaInstalled,
                Mark::FirstTraffic
            ]
        );
        assert_eq!(t.recovery(), None);
        assert_eq!(
            t.between(Mark::Released, Mark::Usable).unwrap().as_millis(),
            670
        );
    }

    #[test]
    fn start_up_snapshot_and_stale_records_are_no_moves() {
        let mut fe1 = front_end("fe1");
        let out = run(
            &mut fe1,
            vec![
                In(0, snapshot("be1", 3)),
                Act(1, initiate()),
                In(2, sa_up()),
                In(3, owner("be0", 2, 0)),
                In(300, counters(10, 10)),
            ],
        );
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn a_release_that_came_back_is_not_attached_to_a_later_move() {
        let mut be1 = back_end("be1");
        let out = run(
            &mut be1,
            vec![
                In(0, snapshot("be1", 3)),
                In(10, Input::Drain(vip())),
                // The drain hold ran out and the VIP stayed: republished, same node.
                In(5000, owner("be1", 4, 5000)),
                In(9000, owner("be2", 5, 9000)),
            ],
        );
        assert!(
            out.iter().all(|m| m.epoch != 5),
            "released attached to epoch 5: {out:?}"
        );
    }

    #[test]
    fn history_keeps_the_last_moves() {
        let mut be2 = Recorder::new("be2", &[vip()], &[], 2);
        for e in 1..=5 {
            be2.observe_input(e * 10, &Input::VipAppeared(vip()));
            be2.observe_input(e * 10 + 1, &owner("be2", e, e * 10));
            be2.observe_input(e * 10 + 2, &Input::VipDisappeared(vip()));
        }
        let h: Vec<u64> = be2.history(vip()).iter().map(|m| m.epoch).collect();
        assert_eq!(h, vec![4, 5]);
    }
}
