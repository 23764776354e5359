//! Prometheus metrics and the `/metrics` endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use vipsec_proto::v1 as pb;

use crate::failover::{Notice, NoticeKind};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VipLabel {
    pub vip: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabel {
    pub step: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabel {
    pub task: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartLabel {
    pub part: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailoverLabel {
    pub vip: String,
    pub outcome: String,
}

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    pub events: Family<EventLabel, Counter>,
    pub failovers: Family<FailoverLabel, Counter>,
    pub renegotiation_seconds: Family<VipLabel, Histogram>,
    pub idle_peers: Family<VipLabel, Counter>,
    pub fail_secure_engaged: Family<VipLabel, Gauge>,
    pub fail_secure_transitions: Family<EventLabel, Counter>,
    pub store_healthy: Gauge,
    pub keying_up: Gauge,
    pub vip_present: Family<VipLabel, Gauge>,
    pub vip_epoch: Family<VipLabel, Gauge>,
    /// 1 while a hosted VIP is here and another node holds its record (split brain).
    pub split_brain: Family<VipLabel, Gauge>,
    pub actions_fenced: Counter,
    pub action_failures: Family<EventLabel, Counter>,
    pub move_step_seconds: Family<StepLabel, Histogram>,
    pub move_seconds: Histogram,
    /// Initiations waiting in the reconnect pacer.
    pub initiations_queued: Gauge,
    /// From an initiation being asked for to its start (jitter, rate and concurrency).
    pub initiation_queue_wait: Histogram,
    /// Restarts of the agent's own tasks after they stopped, failed or panicked.
    pub task_restarts: Family<TaskLabel, Counter>,
    /// 1 while a health part is healthy, by the verdict `vipsec health` gives; read from
    /// the status at each scrape.
    pub health_part_healthy: Family<PartLabel, Gauge>,
    /// When a health part last turned healthy or unhealthy, in Unix seconds, so an alert
    /// can tell how long an outage has lasted without waiting out a `for:`.
    pub health_part_since: Family<PartLabel, Gauge<f64, AtomicU64>>,
    /// `store.lease_ttl`: an outage longer than a lease is what an operator must hear about.
    pub store_lease_ttl: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vipsec");
        let events = Family::<EventLabel, Counter>::default();
        registry.register("events", "Failover events by kind", events.clone());
        let failovers = Family::<FailoverLabel, Counter>::default();
        registry.register(
            "failovers",
            "Renegotiations toward a peer VIP by outcome",
            failovers.clone(),
        );
        let renegotiation_seconds = Family::<VipLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
            ])
        });
        registry.register(
            "renegotiation_duration_seconds",
            "From the failover trigger to the new SA being up",
            renegotiation_seconds.clone(),
        );
        let idle_peers = Family::<VipLabel, Counter>::default();
        registry.register(
            "idle_peers_detected",
            "Peers declared dead by the idle detector",
            idle_peers.clone(),
        );
        let fail_secure_engaged = Family::<VipLabel, Gauge>::default();
        registry.register(
            "fail_secure_engaged",
            "1 while the VIP's clear-text guard is held in the kernel (every protected flow refused outside IPsec)",
            fail_secure_engaged.clone(),
        );
        let fail_secure_transitions = Family::<EventLabel, Counter>::default();
        registry.register(
            "fail_secure_transitions",
            "Guard installs and repairs (engage) and removals (release)",
            fail_secure_transitions.clone(),
        );
        let store_healthy = Gauge::default();
        registry.register(
            "store_healthy",
            "1 while the ownership store answers",
            store_healthy.clone(),
        );
        let keying_up = Gauge::default();
        registry.register(
            "keying_up",
            "1 while the keying daemon answers",
            keying_up.clone(),
        );
        let vip_present = Family::<VipLabel, Gauge>::default();
        registry.register(
            "vip_present",
            "1 while a hosted VIP is on this node",
            vip_present.clone(),
        );
        let vip_epoch = Family::<VipLabel, Gauge>::default();
        registry.register(
            "vip_epoch",
            "Highest ownership epoch seen per VIP",
            vip_epoch.clone(),
        );
        let split_brain = Family::<VipLabel, Gauge>::default();
        registry.register(
            "split_brain",
            "1 while a hosted VIP is on this node but recorded as another node's",
            split_brain.clone(),
        );
        let actions_fenced = Counter::default();
        registry.register(
            "actions_fenced",
            "Actions dropped because their epoch was superseded",
            actions_fenced.clone(),
        );
        let action_failures = Family::<EventLabel, Counter>::default();
        registry.register(
            "action_failures",
            "Actions that failed, by kind",
            action_failures.clone(),
        );
        const MOVE_BUCKETS: [f64; 13] = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0,
        ];
        let move_step_seconds =
            Family::<StepLabel, Histogram>::new_with_constructor(|| Histogram::new(MOVE_BUCKETS));
        // Every step from the start, at zero: dashboards show each one before the first move.
        for (step, _, _) in crate::timeline::STEPS {
            let _ = move_step_seconds.get_or_create(&StepLabel { step: step.into() });
        }
        registry.register(
            "move_step_seconds",
            "Time between two marks of a VIP move (recorded by the new owner)",
            move_step_seconds.clone(),
        );
        let move_seconds = Histogram::new(MOVE_BUCKETS);
        registry.register(
            "move_seconds",
            "A VIP move from its release (or first mark) to first traffic on the new SA",
            move_seconds.clone(),
        );
        let initiations_queued = Gauge::default();
        registry.register(
            "initiations_queued",
            "Initiations waiting for their turn in the reconnect pacer",
            initiations_queued.clone(),
        );
        let initiation_queue_wait = Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
        ]);
        registry.register(
            "initiation_queue_wait_seconds",
            "Time an initiation waited in the reconnect pacer (jitter, rate, concurrency)",
            initiation_queue_wait.clone(),
        );
        let task_restarts = Family::<TaskLabel, Counter>::default();
        registry.register(
            "task_restarts",
            "Restarts of the agent's own tasks (address watcher, store, keying, ...) after they stopped, failed or panicked",
            task_restarts.clone(),
        );
        let health_part_healthy = Family::<PartLabel, Gauge>::default();
        registry.register(
            "health_part_healthy",
            "1 while the health part (store, keying, kernel, ownership, guard, runtime) is healthy, as `vipsec health` judges it",
            health_part_healthy.clone(),
        );
        let health_part_since = Family::<PartLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "health_part_since_timestamp_seconds",
            "When the health part last turned healthy or unhealthy (Unix time)",
            health_part_since.clone(),
        );
        let store_lease_ttl = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "store_lease_ttl_seconds",
            "The ownership records' lease (store.lease_ttl)",
            store_lease_ttl.clone(),
        );
        Metrics {
            health_part_healthy,
            health_part_since,
            store_lease_ttl,
            task_restarts,
            move_step_seconds,
            move_seconds,
            registry,
            events,
            failovers,
            renegotiation_seconds,
            idle_peers,
            fail_secure_engaged,
            fail_secure_transitions,
            store_healthy,
            keying_up,
            vip_present,
            vip_epoch,
            split_brain,
            actions_fenced,
            action_failures,
            initiations_queued,
            initiation_queue_wait,
        }
    }

    /// Creates every per-VIP series at start-up, so dashboards show zeros rather than gaps.
    pub fn init_vips(&self, hosted: &[std::net::IpAddr], peers: &[std::net::IpAddr]) {
        for vip in peers {
            let label = VipLabel {
                vip: vip.to_string(),
            };
            let _ = self.renegotiation_seconds.get_or_create(&label);
            let _ = self.idle_peers.get_or_create(&label);
            let _ = self.fail_secure_engaged.get_or_create(&label);
            for outcome in ["recovered", "gave-up"] {
                let _ = self.failovers.get_or_create(&FailoverLabel {
                    vip: vip.to_string(),
                    outcome: outcome.into(),
                });
            }
        }
        for vip in hosted {
            let label = VipLabel {
                vip: vip.to_string(),
            };
            let _ = self.split_brain.get_or_create(&label);
            let _ = self.vip_present.get_or_create(&label);
            let _ = self.vip_epoch.get_or_create(&label);
        }
    }

    /// Sets the health parts from the status `vipsec health` and the gRPC health service
    /// judge, so the metrics never disagree with them.
    pub fn set_health(&self, status: &pb::Status) {
        for part in crate::health::parts(status) {
            let label = PartLabel {
                part: part.name.into(),
            };
            self.health_part_healthy
                .get_or_create(&label)
                .set(i64::from(part.healthy));
        }
        let backends = [
            ("store", &status.store),
            ("keying", &status.keying),
            ("kernel", &status.kernel),
            ("ownership", &status.ownership),
            ("runtime", &status.runtime),
        ];
        for (part, health) in backends {
            if let Some(since) = health.as_ref().and_then(|h| h.since.as_ref()) {
                let at = since.seconds as f64 + f64::from(since.nanos) / 1e9;
                self.health_part_since
                    .get_or_create(&PartLabel { part: part.into() })
                    .set(at);
            }
        }
    }

    /// Whether the VIP's guard is held in the kernel, as the last check read it.
    pub fn set_guard_held(&self, vip: std::net::IpAddr, held: bool) {
        self.fail_secure_engaged
            .get_or_create(&VipLabel {
                vip: vip.to_string(),
            })
            .set(i64::from(held));
    }

    /// Counts a failover event.
    pub fn record(&self, n: &Notice) {
        self.events
            .get_or_create(&EventLabel {
                kind: n.kind.as_str().into(),
            })
            .inc();
        let vip = VipLabel {
            vip: n.vip.map(|v| v.to_string()).unwrap_or_default(),
        };
        match n.kind {
            NoticeKind::RenegotiationFinished => {
                let label = FailoverLabel {
                    vip: vip.vip.clone(),
                    outcome: "recovered".into(),
                };
                self.failovers.get_or_create(&label).inc();
                if let Some(d) = n.duration {
                    self.renegotiation_seconds
                        .get_or_create(&vip)
                        .observe(d.as_secs_f64());
                }
            }
            NoticeKind::RenegotiationFailed => {
                let label = FailoverLabel {
                    vip: vip.vip.clone(),
                    outcome: "gave-up".into(),
                };
                self.failovers.get_or_create(&label).inc();
            }
            NoticeKind::IdlePeerDetected => {
                self.idle_peers.get_or_create(&vip).inc();
            }
            // The gauge follows the kernel (`set_guard_held`), not these events.
            NoticeKind::FailSecureEngaged => {
                self.fail_secure_transitions
                    .get_or_create(&EventLabel {
                        kind: "engage".into(),
                    })
                    .inc();
            }
            NoticeKind::FailSecureReleased => {
                self.fail_secure_transitions
                    .get_or_create(&EventLabel {
                        kind: "release".into(),
                    })
                    .inc();
            }
            NoticeKind::StoreUp => {
                self.store_healthy.set(1);
            }
            NoticeKind::StoreDown => {
                self.store_healthy.set(0);
            }
            NoticeKind::KeyingUp => {
                self.keying_up.set(1);
            }
            NoticeKind::KeyingDown => {
                self.keying_up.set(0);
            }
            NoticeKind::VipAcquired => {
                self.vip_present.get_or_create(&vip).set(1);
            }
            NoticeKind::VipReleased => {
                self.vip_present.get_or_create(&vip).set(0);
            }
            NoticeKind::OwnerChanged => {
                self.vip_epoch.get_or_create(&vip).set(n.epoch as i64);
            }
            NoticeKind::SplitBrain => {
                self.split_brain.get_or_create(&vip).set(1);
            }
            NoticeKind::SplitBrainCleared => {
                self.split_brain.get_or_create(&vip).set(0);
            }
            NoticeKind::ActionFenced => {
                self.actions_fenced.inc();
            }
            NoticeKind::ActionFailed => {
                let kind = n.detail.split(':').next().unwrap_or("unknown").to_string();
                self.action_failures
                    .get_or_create(&EventLabel { kind })
                    .inc();
            }
            _ => {}
        }
    }

    /// Records a finished move's steps (each one whose two marks are there).
    pub fn record_move(&self, t: &crate::timeline::MoveTimeline) {
        for (step, from, to) in crate::timeline::STEPS {
            if let Some(d) = t.between(from, to) {
                self.move_step_seconds
                    .get_or_create(&StepLabel { step: step.into() })
                    .observe(d.as_secs_f64());
            }
        }
        if let Some(d) = t.recovery() {
            self.move_seconds.observe(d.as_secs_f64());
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Reads the agent's status at a scrape, for the health parts.
pub type StatusSource = Arc<dyn Fn() -> pb::Status + Send + Sync>;

/// Serves `GET /metrics` until cancelled.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    status: StatusSource,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, status) = (metrics.clone(), status.clone());
            async move {
                metrics.set_health(&status());
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics endpoint listening");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_move_feeds_its_step_histograms() {
        use crate::timeline::{Mark, MoveTimeline};
        let m = Metrics::new();
        let node = |s: &str| s.to_string();
        let t = MoveTimeline {
            vip: "192.0.2.100".parse().unwrap(),
            epoch: 2,
            from_node: Some(node("be1")),
            to_node: node("be2"),
            marks: [
                (Mark::Released, (node("be1"), 1000)),
                (Mark::Usable, (node("be2"), 1600)),
                (Mark::EpochRecorded, (node("be2"), 1602)),
                (Mark::FirstTraffic, (node("fe1"), 1900)),
            ]
            .into_iter()
            .collect(),
        };
        m.record_move(&t);
        let text = m.encode();
        assert!(
            text.contains(
                "vipsec_move_step_seconds_bucket{le=\"1.0\",step=\"released_to_usable\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "vipsec_move_step_seconds_count{step=\"first_ike_sa_init_to_child_sa_installed\"} 0"
            ),
            "a step without its marks is not observed: {text}"
        );
        assert!(text.contains("vipsec_move_seconds_sum 0.9"), "{text}");
    }

    #[test]
    fn health_parts_follow_the_health_verdict_with_their_since() {
        let m = Metrics::new();
        let health = |healthy| {
            Some(pb::BackendHealth {
                kind: "etcd".into(),
                healthy,
                detail: String::new(),
                since: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 500_000_000,
                }),
            })
        };
        let status = pb::Status {
            store: health(false),
            keying: health(true),
            ..Default::default()
        };
        m.set_health(&status);
        let text = m.encode();
        assert!(
            text.contains("vipsec_health_part_healthy{part=\"store\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("vipsec_health_part_healthy{part=\"keying\"} 1"),
            "{text}"
        );
        // A part an older status does not carry counts as healthy, as in `vipsec health`.
        assert!(
            text.contains("vipsec_health_part_healthy{part=\"runtime\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "vipsec_health_part_since_timestamp_seconds{part=\"store\"} 1700000000.5"
            ),
            "{text}"
        );
        assert!(
            !text.contains("vipsec_health_part_since_timestamp_seconds{part=\"runtime\"}"),
            "no since without a report: {text}"
        );
    }

    #[test]
    fn renegotiations_feed_the_histogram_and_counters() {
        let m = Metrics::new();
        let vip = "192.0.2.100".parse().ok();
        m.record(
            &Notice::new(NoticeKind::RenegotiationFinished, vip)
                .duration(Duration::from_millis(80)),
        );
        m.record(&Notice::new(NoticeKind::FailSecureEngaged, vip));
        // The guard gauge follows the kernel's word, not the engage event.
        m.set_guard_held(vip.unwrap(), true);
        let text = m.encode();
        assert!(
            text.contains("vipsec_failovers_total{vip=\"192.0.2.100\",outcome=\"recovered\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "vipsec_renegotiation_duration_seconds_bucket{le=\"0.1\",vip=\"192.0.2.100\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("vipsec_fail_secure_engaged{vip=\"192.0.2.100\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("vipsec_fail_secure_transitions_total{kind=\"engage\"} 1"),
            "{text}"
        );
    }
}
