//! Domain types to protobuf messages.

use std::time::{Duration, SystemTime};

use vipsec_proto::v1 as pb;

use crate::failover::NoticeKind;
use crate::model::{ChildSaInfo, IkeSaInfo, Mode, VipOwner};
use crate::runtime::EventRecord;
use crate::runtime::guard::GuardView;
use crate::runtime::status::{FailoverView, HealthView, SaStateView, StatusView};

pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or_default()
}

pub fn mode(m: Mode) -> pb::Mode {
    match m {
        Mode::Normal => pb::Mode::Normal,
        Mode::Fast => pb::Mode::Fast,
    }
}

fn health(h: &HealthView) -> pb::BackendHealth {
    pb::BackendHealth {
        kind: h.kind.clone(),
        healthy: h.healthy,
        detail: h.detail.clone(),
        since: Some(timestamp(h.since)),
    }
}

fn owner(o: &VipOwner) -> pb::OwnerRecord {
    pb::OwnerRecord {
        node: o.node.clone(),
        epoch: o.epoch,
        taken_at: Some(timestamp(o.taken_at())),
    }
}

fn sa_state(s: SaStateView) -> i32 {
    (match s {
        SaStateView::Down => pb::SaState::Down,
        SaStateView::Connecting => pb::SaState::Connecting,
        SaStateView::Established => pb::SaState::Established,
    }) as i32
}

fn failover(f: &FailoverView) -> pb::FailoverRecord {
    pb::FailoverRecord {
        started_at: Some(timestamp(f.started_at)),
        duration: f.duration.map(duration),
        reason: f.reason.clone(),
        outcome: f.outcome.clone(),
        attempts: f.attempts,
    }
}

fn guard(g: &GuardView) -> pb::VipGuard {
    pb::VipGuard {
        state: g.state.as_str().to_string(),
        flows: g.flows,
        installed: g.installed,
        source: g.source.clone(),
        held_since: g.held_since.map(timestamp),
        detail: g.detail.clone(),
    }
}

pub fn status(s: &StatusView) -> pb::Status {
    pb::Status {
        node: s.node.clone(),
        mode: mode(s.mode) as i32,
        idle_timeout: Some(duration(s.idle_timeout)),
        store: Some(health(&s.store)),
        keying: Some(health(&s.keying)),
        kernel: Some(health(&s.kernel)),
        ownership: Some(health(&s.ownership)),
        runtime: Some(health(&s.runtime)),
        fail_secure: Some(pb::FailSecure {
            enabled: s.fail_secure.enabled,
            engaged: s.fail_secure.engaged,
            since: s.fail_secure.since.map(timestamp),
            flows: s.fail_secure.flows,
        }),
        initiations_queued: s.initiations_queued,
        hosted_vips: s
            .hosted
            .iter()
            .map(|h| pb::HostedVip {
                address: h.address.to_string(),
                present_locally: h.present,
                owner: h.owner.as_ref().map(owner),
                epoch: h.epoch,
                draining: h.draining,
                guarded: h.guarded,
                ownership: h.ownership.clone(),
                ownership_reason: h.ownership_reason.clone(),
                split_brain: h.split_brain,
                also_held_by: h.also_held_by.clone(),
                guard: Some(guard(&h.guard)),
            })
            .collect(),
        peer_vips: s
            .peers
            .iter()
            .map(|p| pb::PeerVip {
                address: p.address.to_string(),
                connection: p.connection.clone(),
                child: p.child.clone(),
                owner: p.owner.as_ref().map(owner),
                epoch: p.epoch,
                ike_state: sa_state(p.ike_state),
                child_state: sa_state(p.child_state),
                established_since: p.established_since.map(timestamp),
                renegotiating: p.renegotiating,
                last_failover: p.last_failover.as_ref().map(failover),
                guard: Some(guard(&p.guard)),
            })
            .collect(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    }
}

fn child(c: &ChildSaInfo) -> pb::ChildSa {
    pb::ChildSa {
        name: c.name.clone(),
        unique_id: c.unique_id,
        state: c.state.clone(),
        mode: c.mode.clone(),
        protocol: c.protocol.clone(),
        encap: c.encap,
        spi_in: c.spi_in.clone(),
        spi_out: c.spi_out.clone(),
        bytes_in: c.bytes_in,
        bytes_out: c.bytes_out,
        packets_in: c.packets_in,
        packets_out: c.packets_out,
        use_in_secs: c.use_in_secs,
        use_out_secs: c.use_out_secs,
        install_secs: c.install_secs,
        local_ts: c.local_ts.clone(),
        remote_ts: c.remote_ts.clone(),
    }
}

pub fn ike_sa(s: &IkeSaInfo) -> pb::IkeSa {
    pb::IkeSa {
        name: s.name.clone(),
        unique_id: s.unique_id,
        state: s.state.clone(),
        local_host: s.local_host.clone(),
        remote_host: s.remote_host.clone(),
        local_id: s.local_id.clone(),
        remote_id: s.remote_id.clone(),
        initiator_spi: s.initiator_spi.clone(),
        responder_spi: s.responder_spi.clone(),
        initiator: s.initiator,
        established_secs: s.established_secs,
        children: s.children.iter().map(child).collect(),
        local_port: s.local_port as u32,
        remote_port: s.remote_port as u32,
    }
}

pub fn event_kind(k: NoticeKind) -> pb::EventKind {
    use pb::EventKind as E;
    match k {
        NoticeKind::VipAcquired => E::VipAcquired,
        NoticeKind::VipReleased => E::VipReleased,
        NoticeKind::OwnerChanged => E::OwnerChanged,
        NoticeKind::SaUp => E::SaUp,
        NoticeKind::SaDeleted => E::SaDeleted,
        NoticeKind::RenegotiationStarted => E::RenegotiationStarted,
        NoticeKind::RenegotiationFinished => E::RenegotiationFinished,
        NoticeKind::RenegotiationFailed => E::RenegotiationFailed,
        NoticeKind::IdlePeerDetected => E::IdlePeerDetected,
        NoticeKind::FailSecureEngaged => E::FailSecureEngaged,
        NoticeKind::FailSecureReleased => E::FailSecureReleased,
        NoticeKind::KeyingDown => E::KeyingDown,
        NoticeKind::KeyingUp => E::KeyingUp,
        NoticeKind::StoreDown => E::StoreDown,
        NoticeKind::StoreUp => E::StoreUp,
        NoticeKind::ModeChanged => E::ModeChanged,
        NoticeKind::Drained => E::Drained,
        NoticeKind::StaleRecordIgnored => E::StaleRecordIgnored,
        NoticeKind::ActionFailed => E::ActionFailed,
        NoticeKind::SplitBrain => E::SplitBrain,
        NoticeKind::SplitBrainCleared => E::SplitBrainCleared,
        NoticeKind::SaRefused => E::SaRefused,
        NoticeKind::ActionFenced => E::ActionFenced,
        NoticeKind::PolicyApplied => E::PolicyApplied,
        NoticeKind::PolicyRefused => E::PolicyRefused,
        NoticeKind::Takeover => E::Takeover,
        NoticeKind::TakeoverRefused => E::TakeoverRefused,
        NoticeKind::PeerAnswers => E::PeerAnswers,
    }
}

/// A move timeline, marks in the order of the steps.
pub fn move_timeline(t: &crate::timeline::MoveTimeline) -> pb::Move {
    pb::Move {
        vip: t.vip.to_string(),
        epoch: t.epoch,
        from_node: t.from_node.clone().unwrap_or_default(),
        to_node: t.to_node.clone(),
        marks: t
            .marks
            .iter()
            .map(|(m, (node, at))| pb::MoveMark {
                step: m.as_str().into(),
                node: node.clone(),
                at: Some(timestamp(
                    SystemTime::UNIX_EPOCH + Duration::from_millis(*at),
                )),
            })
            .collect(),
        complete: t.complete(),
        recovery: t.recovery().map(duration),
    }
}

pub fn event(e: &EventRecord) -> pb::Event {
    let n = &e.notice;
    let kind = match &e.moved {
        Some(_) => pb::EventKind::MoveCompleted,
        None => event_kind(n.kind),
    };
    pb::Event {
        timestamp: Some(timestamp(e.at)),
        kind: kind as i32,
        r#move: e.moved.as_deref().map(move_timeline),
        vip: n.vip.map(|v| v.to_string()).unwrap_or_default(),
        owner: n.owner.clone().unwrap_or_default(),
        epoch: n.epoch,
        duration: n.duration.map(duration),
        detail: n.detail.clone(),
        node: e.node.clone(),
    }
}
