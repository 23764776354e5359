//! Scenario tests of the failover core, driven with paused tokio time. The `Node` harness
//! plays the runtime: it keeps the timers the core starts and fires them as time advances.
//! The scenarios are grouped by what they exercise, one file each.

mod back_end;
mod front_end;
mod guard;
mod idle;
mod ike_probe;
mod keying;
mod retries;

use std::net::IpAddr;
use std::time::Duration;

use tokio::time::{self, Instant};

use super::*;
use crate::model::{Mode, TrafficCounters, VipOwner, VipRole};

const VIP: &str = "192.0.2.100";

fn vip() -> IpAddr {
    VIP.parse().unwrap()
}

fn owner(node: &str, epoch: u64) -> Option<VipOwner> {
    Some(VipOwner {
        node: node.into(),
        epoch,
        taken_at_ms: 0,
        draining: false,
    })
}

fn settings(cluster_store: bool, mode: Mode) -> CoreSettings {
    CoreSettings {
        node: "me".into(),
        mode,
        fast_idle_timeout: Duration::from_secs(2),
        normal_idle_timeout: Duration::from_secs(300),
        retry: RetrySchedule {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(1),
            deadline: Duration::from_secs(10),
            cooldown: Duration::from_secs(5),
        },
        owner_wait: Duration::from_secs(3),
        drain_hold: Duration::from_secs(10),
        fail_secure: true,
        cluster_store,
        split_brain_grace: Duration::from_secs(1),
        trust_kernel_when_store_down: true,
        takeover_probe: Some(Duration::from_millis(30)),
        // Its own tests turn it on (`ike_probe.rs`): the others follow the attempts alone.
        ike_probe: None,
        max_concurrency: 4,
    }
}

/// A traffic sample of the peer VIP's SAs: `out` packets sent and `inn` received so far.
fn sample(out: u64, inn: u64) -> Input {
    Input::CountersSampled {
        vip: vip(),
        counters: TrafficCounters {
            bytes_in: inn * 60,
            bytes_out: out * 60,
            packets_in: inn,
            packets_out: out,
        },
    }
}

fn peer_sa(id: u64) -> SaRef {
    SaRef {
        vip: vip(),
        role: VipRole::Peer,
        ike_id: id,
    }
}

struct Node {
    core: FailoverCore,
    timers: Vec<(Instant, Timer)>,
}

impl Node {
    fn front_end(cluster_store: bool, mode: Mode) -> Node {
        let core = FailoverCore::new(settings(cluster_store, mode), &[], &[(vip(), true)]);
        Node {
            core,
            timers: Vec::new(),
        }
    }

    fn back_end() -> Node {
        let core = FailoverCore::new(settings(true, Mode::Normal), &[(vip(), false)], &[]);
        Node {
            core,
            timers: Vec::new(),
        }
    }

    fn take_timers(&mut self, actions: &[Action]) {
        for a in actions {
            if let Action::StartTimer { timer, after } = a {
                self.timers.push((Instant::now() + *after, *timer));
            }
        }
    }

    fn feed(&mut self, input: Input) -> Vec<Action> {
        let actions = self.core.handle(Instant::now(), input);
        self.take_timers(&actions);
        actions
    }

    fn start(&mut self) -> Vec<Action> {
        let actions = self.core.start(Instant::now());
        self.take_timers(&actions);
        actions
    }

    /// Advances paused time by `d`, firing the timers that fall due on the way.
    async fn advance(&mut self, d: Duration) -> Vec<Action> {
        let end = Instant::now() + d;
        let mut all = Vec::new();
        loop {
            self.timers.sort_by_key(|(at, _)| *at);
            let due = self.timers.first().filter(|(at, _)| *at <= end).copied();
            let Some((at, timer)) = due else { break };
            self.timers.remove(0);
            time::advance(at.saturating_duration_since(Instant::now())).await;
            all.extend(self.feed(Input::TimerFired(timer)));
        }
        time::advance(end.saturating_duration_since(Instant::now())).await;
        all
    }

    /// Advances paused time to the next timer and fires it; returns the wait and actions.
    async fn next_timer(&mut self) -> (Duration, Vec<Action>) {
        self.timers.sort_by_key(|(at, _)| *at);
        let (at, timer) = self.timers.remove(0);
        let waited = at.saturating_duration_since(Instant::now());
        time::advance(waited).await;
        (waited, self.feed(Input::TimerFired(timer)))
    }

    /// A front-end with the daemon up, the store synced to `owner` and one SA up.
    fn established(cluster_store: bool, mode: Mode, owner_rec: Option<VipOwner>) -> Node {
        let mut n = Node::front_end(cluster_store, mode);
        n.start();
        n.feed(Input::StoreHealth {
            healthy: true,
            detail: String::new(),
        });
        n.feed(Input::OwnerSnapshot(vec![(vip(), owner_rec)]));
        n.feed(Input::KeyingUp {
            established: vec![peer_sa(1)],
        });
        assert!(n.core.peers()[&vip()].renegotiation.is_none());
        n
    }
}

fn initiates(actions: &[Action]) -> Vec<u32> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Initiate { attempt, .. } => Some(*attempt),
            _ => None,
        })
        .collect()
}

fn has(actions: &[Action], want: &Action) -> bool {
    actions.contains(want)
}

fn notices(actions: &[Action]) -> Vec<NoticeKind> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Notify(n) => Some(n.kind),
            _ => None,
        })
        .collect()
}

fn notice(actions: &[Action], kind: NoticeKind) -> Notice {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Notify(n) if n.kind == kind => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {kind:?} in {actions:#?}"))
}
