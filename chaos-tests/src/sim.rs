//! A reconnect storm past what this machine can host: many front-ends' real runtimes (core,
//! lanes, pacer, fences) in one process on paused time, against a model of the new owner's
//! charon. Nothing but the IKE exchange itself is modelled; everything the agent decides and
//! paces is the agent's own code.
//!
//! The responder model is calibrated from the lab (`docs/bench/storm.md`): the new owner
//! builds an IKE_SA in about 25 ms of CPU, on two cores, and finishes every exchange it
//! started, also those whose initiator already gave up. That last part is what makes a storm
//! collapse: abandoned exchanges take the time the next attempts needed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Semaphore, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use vipsec::addrwatch::holder::HolderAnswer;
use vipsec::addrwatch::memory::{FixedHolder, MemoryAddresses};
use vipsec::config::Config;
use vipsec::failover::{NoticeKind, SaRef};
use vipsec::kernel::memory::MemoryKernel;
use vipsec::keying::memory::{MemoryKeying, Responder};
use vipsec::model::{Vip, VipRole};
use vipsec::runtime::{Backends, Starting};
use vipsec::store::embedded::EmbeddedStore;
use vipsec::store::policies::LocalPolicies;
use vipsec::store::{OwnershipStore, StoreError};
use vipsec::timeline::{MoveTimeline, NodeMarks};

/// The storm control a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// The defaults: concurrency that follows the answers (1 to 4), a timed-out attempt
    /// followed for one more timeout, the jitter window.
    Adaptive,
    /// Before the adaptive work: one initiation in flight, a timed-out attempt abandoned.
    Fixed,
    /// No storm control at all: no jitter, no rate limit, no concurrency limit.
    Off,
}

impl Control {
    pub fn as_str(self) -> &'static str {
        match self {
            Control::Adaptive => "adaptive",
            Control::Fixed => "fixed",
            Control::Off => "off",
        }
    }

    fn reconnect(self) -> &'static str {
        match self {
            Control::Adaptive => "",
            Control::Fixed => "max_concurrency = 1\n",
            Control::Off => {
                "jitter = \"0s\"\nrate = 1000000\nburst = 1000000\nconcurrency = 1000000\nmax_concurrency = 1000000\n"
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimPlan {
    pub front_ends: usize,
    pub vips: usize,
    pub control: Control,
    /// The responder's CPU per IKE_SA, and how many it builds at once.
    pub cost: Duration,
    pub workers: usize,
    /// IKE_SA_INITs waiting beyond this are lost (the responder's UDP receive buffer).
    pub queue: usize,
    /// Half-open IKE_SAs one front-end may have with the responder; more are ignored
    /// (strongSwan's `charon.block_threshold`, 5 by default: a front-end's initiations all
    /// come from one address).
    pub per_peer: usize,
    /// `keying.initiate_timeout` and `failover.retry_max` on the front-ends.
    pub initiate_timeout: Duration,
    pub retry_max: Duration,
    /// Stop following the storm this long after the move.
    pub horizon: Duration,
    /// `failover.reconnect.jitter` on the front-ends (storm control on), if not the default.
    pub jitter: Option<Duration>,
}

impl SimPlan {
    /// The lab's settings of `docs/bench/storm.md`.
    pub fn lab(front_ends: usize, vips: usize, control: Control) -> SimPlan {
        SimPlan {
            front_ends,
            vips,
            control,
            cost: Duration::from_millis(25),
            workers: 2,
            // Linux's default UDP receive buffer (208 KiB) holds about 256 IKE_SA_INITs.
            queue: 256,
            per_peer: 5,
            initiate_timeout: Duration::from_millis(500),
            retry_max: Duration::from_millis(500),
            horizon: Duration::from_secs(120),
            jitter: None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimResult {
    pub plan: SimPlan,
    /// Front-end × VIP pairs protected again within the horizon, of all.
    pub recovered: usize,
    pub pairs: usize,
    /// From the move to each pair's first IKE_SA with the new owner.
    pub median: Option<Duration>,
    pub p99: Option<Duration>,
    pub max: Option<Duration>,
    /// IKE_SAs the new owner built, and how many of them nobody was waiting for.
    pub built: u64,
    pub wasted: u64,
    /// IKE_SA_INITs lost at the full queue or ignored over the per-peer limit.
    pub lost: u64,
    /// Renegotiation cycles that reached their deadline.
    pub gave_up: u64,
    /// Wall-clock time the simulation took.
    pub took: std::time::Duration,
}

/// The new owner's charon: `workers` IKE_SAs at a time, `cost` each, first come first
/// served.
struct Owner {
    workers: Arc<Semaphore>,
    queue: usize,
    waiting: std::sync::atomic::AtomicUsize,
    per_peer: usize,
    /// Half-open IKE_SAs per front-end.
    half_open: Mutex<HashMap<usize, usize>>,
    lost: AtomicU64,
    cost: Duration,
    built: AtomicU64,
    wasted: AtomicU64,
    /// The first IKE_SA delivered per (front-end, VIP).
    delivered: Mutex<HashMap<(usize, Vip), Instant>>,
}

/// One front-end's view of the owner.
struct Link {
    owner: Arc<Owner>,
    front_end: usize,
}

impl Responder for Link {
    fn submit(&self, vip: Vip) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        let (owner, fe) = (self.owner.clone(), self.front_end);
        {
            let mut half_open = owner.half_open.lock().unwrap();
            let mine = half_open.entry(fe).or_default();
            if *mine >= owner.per_peer {
                owner.lost.fetch_add(1, Ordering::Relaxed);
                return rx;
            }
            if owner.waiting.fetch_add(1, Ordering::Relaxed) >= owner.queue {
                owner.waiting.fetch_sub(1, Ordering::Relaxed);
                owner.lost.fetch_add(1, Ordering::Relaxed);
                return rx;
            }
            *mine += 1;
        }
        tokio::spawn(async move {
            let permit = owner.workers.clone().acquire_owned().await;
            owner.waiting.fetch_sub(1, Ordering::Relaxed);
            tokio::time::sleep(owner.cost).await;
            drop(permit);
            if let Some(n) = owner.half_open.lock().unwrap().get_mut(&fe) {
                *n -= 1;
            }
            owner.built.fetch_add(1, Ordering::Relaxed);
            if tx.send(()).is_ok() {
                owner
                    .delivered
                    .lock()
                    .unwrap()
                    .entry((fe, vip))
                    .or_insert_with(Instant::now);
            } else {
                owner.wasted.fetch_add(1, Ordering::Relaxed);
            }
        });
        rx
    }
}

/// The cluster store without move timelines: thousands of front-ends' marks are not what
/// the simulation measures, and merging them on every poll would be most of its work.
struct OwnersOnly {
    store: EmbeddedStore,
    /// What be1 says in its holder marks: each of its VIPs serves every front-end.
    holders: Vec<(Vip, String, u32)>,
}

#[async_trait]
impl OwnershipStore for OwnersOnly {
    fn kind(&self) -> &'static str {
        "embedded"
    }
    fn describe(&self) -> String {
        "simulation".into()
    }
    async fn run(&self, sink: vipsec::InputSink, cancel: CancellationToken) {
        // The crowd the front-ends size their jitter by, as an etcd store would tell it.
        let _ = sink
            .send(vipsec::failover::Input::HoldersSnapshot(
                self.holders.clone(),
            ))
            .await;
        self.store.run(sink, cancel).await
    }
    async fn publish(&self, vip: Vip) -> Result<vipsec::model::VipOwner, StoreError> {
        self.store.publish(vip).await
    }
    async fn current(
        &self,
        vip: Vip,
    ) -> Result<(Option<vipsec::model::VipOwner>, u64), StoreError> {
        self.store.current(vip).await
    }
    async fn mark_draining(&self, vip: Vip) -> Result<(), StoreError> {
        self.store.mark_draining(vip).await
    }
    async fn withdraw(&self, vip: Vip) -> Result<(), StoreError> {
        self.store.withdraw(vip).await
    }
    async fn publish_marks(&self, _marks: &NodeMarks) -> Result<(), StoreError> {
        Ok(())
    }
    async fn moves(&self, _vip: Option<Vip>) -> Result<Vec<MoveTimeline>, StoreError> {
        Ok(Vec::new())
    }
}

fn vip(i: usize) -> Vip {
    let i = i as u32;
    Vip::V4(std::net::Ipv4Addr::from(
        u32::from(std::net::Ipv4Addr::new(10, 200, 0, 0)) + i,
    ))
}

fn front_end_config(plan: &SimPlan, n: usize) -> String {
    let mut c = format!(
        "node = \"fe{n}\"\n\
         [keying]\ninitiate_timeout = \"{}ms\"\n\
         [failover]\nretry_initial = \"50ms\"\nretry_max = \"{}ms\"\n\
         [failover.reconnect]\n{}",
        plan.initiate_timeout.as_millis(),
        plan.retry_max.as_millis(),
        plan.control.reconnect()
    );
    if let (Some(j), true) = (plan.jitter, plan.control != Control::Off) {
        c.push_str(&format!("jitter = \"{}ms\"\n", j.as_millis()));
    }
    for i in 0..plan.vips {
        c.push_str(&format!(
            "[[peer_vip]]\naddress = \"{}\"\nconnection = \"c{i}\"\n",
            vip(i)
        ));
    }
    c
}

/// Runs one storm: every VIP owned by `be1`, then all taken by `be2` at once; every
/// front-end renegotiates toward `be2`.
pub fn run(plan: &SimPlan) -> anyhow::Result<SimResult> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    let started = std::time::Instant::now();
    rt.block_on(storm(plan.clone())).map(|mut r| {
        r.took = started.elapsed();
        r
    })
}

async fn storm(plan: SimPlan) -> anyhow::Result<SimResult> {
    let store = EmbeddedStore::new("be1".into());
    for i in 0..plan.vips {
        store.publish(vip(i)).await?;
    }
    let owner = Arc::new(Owner {
        workers: Arc::new(Semaphore::new(plan.workers)),
        queue: plan.queue,
        waiting: std::sync::atomic::AtomicUsize::new(0),
        per_peer: plan.per_peer,
        half_open: Mutex::new(HashMap::new()),
        lost: AtomicU64::new(0),
        cost: plan.cost,
        built: AtomicU64::new(0),
        wasted: AtomicU64::new(0),
        delivered: Mutex::new(HashMap::new()),
    });
    let gave_up = Arc::new(AtomicU64::new(0));
    let cancel = CancellationToken::new();
    let mut runtimes = Vec::new();
    for n in 0..plan.front_ends {
        let config = Config::parse(&front_end_config(&plan, n))
            .map_err(|p| anyhow::anyhow!("simulated front-end config: {p:?}"))?;
        let sas = (0..plan.vips)
            .map(|i| SaRef {
                vip: vip(i),
                role: VipRole::Peer,
                ike_id: i as u64 + 1,
            })
            .collect();
        let link = Arc::new(Link {
            owner: owner.clone(),
            front_end: n,
        });
        let keying = MemoryKeying::new(sas).answered_by(link, plan.control == Control::Adaptive);
        let backends = Backends {
            store: Arc::new(OwnersOnly {
                store: store.for_node(&format!("fe{n}")),
                holders: (0..plan.vips)
                    .map(|i| (vip(i), "be1".to_string(), plan.front_ends as u32))
                    .collect(),
            }),
            watcher: Arc::new(MemoryAddresses::default()),
            holder: Arc::new(FixedHolder(HolderAnswer::Unknown("simulation".into()))),
            // The owners' records tell the front-ends everything; the probe is never asked.
            ike_probe: Arc::new(vipsec::keying::memory::MemoryIkeProbe::default()),
            keying: Arc::new(keying),
            kernel: Arc::new(MemoryKernel::default()),
            policies: Arc::new(LocalPolicies::new("simulation", Vec::new())),
        };
        let starting = Starting::new(config, backends, None, cancel.clone()).await?;
        let mut events = starting.handle().subscribe();
        let g = gave_up.clone();
        tokio::spawn(async move {
            while let Ok(e) = events.recv().await {
                if e.notice.kind == NoticeKind::RenegotiationFailed {
                    g.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        runtimes.push(starting.launch());
    }
    // Every front-end has learnt the first owner before the move.
    for r in &runtimes {
        r.handle()
            .wait_status(Duration::from_secs(60), |s| {
                s.peers.iter().all(|p| p.epoch == 1)
            })
            .await
            .ok_or_else(|| anyhow::anyhow!("a front-end never learnt the first owner"))?;
    }
    let moved_at = Instant::now();
    let be2 = store.for_node("be2");
    for i in 0..plan.vips {
        be2.publish(vip(i)).await?;
    }
    let pairs = plan.front_ends * plan.vips;
    let deadline = moved_at + plan.horizon;
    while Instant::now() < deadline && owner.delivered.lock().unwrap().len() < pairs {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut times: Vec<Duration> = owner
        .delivered
        .lock()
        .unwrap()
        .values()
        .map(|t| t.saturating_duration_since(moved_at))
        .collect();
    times.sort();
    let pick = |q: f64| -> Option<Duration> {
        if times.is_empty() {
            return None;
        }
        // Unrecovered pairs count as the slowest: a percentile over all pairs.
        let rank = ((q * pairs as f64).ceil() as usize).clamp(1, pairs);
        times.get(rank - 1).copied()
    };
    let result = SimResult {
        recovered: times.len(),
        pairs,
        median: pick(0.5),
        p99: pick(0.99),
        max: if times.len() == pairs {
            times.last().copied()
        } else {
            None
        },
        built: owner.built.load(Ordering::Relaxed),
        wasted: owner.wasted.load(Ordering::Relaxed),
        lost: owner.lost.load(Ordering::Relaxed),
        gave_up: gave_up.load(Ordering::Relaxed),
        took: std::time::Duration::ZERO,
        plan,
    };
    cancel.cancel();
    for r in runtimes {
        let _ = r.wait().await;
    }
    Ok(result)
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("—".into(), |d| format!("{:.2}", d.as_secs_f64()))
}

/// A Markdown table of runs.
pub fn markdown(results: &[SimResult]) -> String {
    let mut s = String::from(
        "| front-ends × VIPs | storm control | jitter at most | timeout / retry max | recovered | median s | p99 s | max s | IKE_SAs built (wasted) | requests lost | gave up | sim took |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in results {
        s.push_str(&format!(
            "| {} × {} | {} | {} | {} / {} ms | {}/{} | {} | {} | {} | {} ({}) | {} | {} | {:.0} s |\n",
            r.plan.front_ends,
            r.plan.vips,
            r.plan.control.as_str(),
            match (r.plan.control, r.plan.jitter) {
                (Control::Off, _) => "—".to_string(),
                (_, Some(j)) => format!("{} ms", j.as_millis()),
                (_, None) => "200 ms".to_string(),
            },
            r.plan.initiate_timeout.as_millis(),
            r.plan.retry_max.as_millis(),
            r.recovered,
            r.pairs,
            secs(r.median),
            secs(r.p99),
            secs(r.max),
            r.built,
            r.wasted,
            r.lost,
            r.gave_up,
            r.took.as_secs_f64()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lab's 20 front-ends × 3 VIPs on the model: with storm control every pair comes
    /// back and no cycle gives up (the collapse without it is the bench's to show).
    #[test]
    fn a_small_storm_recovers_every_pair_with_storm_control() {
        let mut plan = SimPlan::lab(20, 3, Control::Adaptive);
        plan.cost = Duration::from_millis(50);
        let r = run(&plan).expect("simulation runs");
        assert_eq!((r.recovered, r.pairs, r.gave_up), (60, 60, 0), "{r:?}");
        assert!(r.built >= 60);
    }
}
