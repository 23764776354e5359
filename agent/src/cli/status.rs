//! `vipsec status [--json]`.

use serde_json::{Value, json};
use vipsec_proto::v1 as pb;

use super::CliError;
use super::client::{Target, connect};
use super::render::{self, ago, or_dash, rfc3339, sa_state, table};

pub async fn run(t: &Target, as_json: bool) -> Result<(), CliError> {
    let mut client = connect(t).await?;
    let s = client
        .get_status(pb::GetStatusRequest {})
        .await?
        .into_inner();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&s)).unwrap_or_default()
        );
    } else {
        print_table(&s);
    }
    Ok(())
}

fn health_json(h: Option<&pb::BackendHealth>) -> Value {
    match h {
        None => Value::Null,
        Some(h) => {
            json!({"kind": h.kind, "healthy": h.healthy, "detail": h.detail, "since": rfc3339(h.since.as_ref())})
        }
    }
}

fn owner_json(o: Option<&pb::OwnerRecord>) -> Value {
    match o {
        None => Value::Null,
        Some(o) => {
            json!({"node": o.node, "epoch": o.epoch, "taken_at": rfc3339(o.taken_at.as_ref())})
        }
    }
}

fn guard_json(g: Option<&pb::VipGuard>) -> Value {
    match g {
        None => Value::Null,
        Some(g) => json!({
            "state": g.state,
            "flows": g.flows,
            "installed": g.installed,
            "source": g.source,
            "held_since": rfc3339(g.held_since.as_ref()),
            "detail": g.detail,
        }),
    }
}

/// The guard column: its state, with how much of it the kernel holds when not all.
fn guard_cell(g: Option<&pb::VipGuard>) -> String {
    match g {
        None => "-".into(),
        Some(g) if g.state == "held" || g.state == "off" => match g.source.as_str() {
            "policy-missing" => format!("{} (policy missing)", g.state),
            _ => g.state.clone(),
        },
        Some(g) => format!("{} ({}/{})", g.state.to_uppercase(), g.installed, g.flows),
    }
}

pub fn to_json(s: &pb::Status) -> Value {
    let fs = s.fail_secure.unwrap_or_default();
    json!({
        "node": s.node,
        "version": s.version,
        "mode": render::mode(s.mode),
        "idle_timeout_ms": render::millis(s.idle_timeout.as_ref()),
        "store": health_json(s.store.as_ref()),
        "keying": health_json(s.keying.as_ref()),
        "kernel": health_json(s.kernel.as_ref()),
        "ownership": health_json(s.ownership.as_ref()),
        "runtime": health_json(s.runtime.as_ref()),
        "fail_secure": {"enabled": fs.enabled, "engaged": fs.engaged, "since": rfc3339(fs.since.as_ref()), "flows": fs.flows},
        "initiations_queued": s.initiations_queued,
        "hosted_vips": s.hosted_vips.iter().map(|h| json!({
            "address": h.address,
            "present_locally": h.present_locally,
            "owner": owner_json(h.owner.as_ref()),
            "epoch": h.epoch,
            "draining": h.draining,
            "guarded": h.guarded,
            "ownership": h.ownership,
            "ownership_reason": h.ownership_reason,
            "split_brain": h.split_brain,
            "also_held_by": h.also_held_by,
            "guard": guard_json(h.guard.as_ref()),
        })).collect::<Vec<_>>(),
        "peer_vips": s.peer_vips.iter().map(|p| json!({
            "address": p.address,
            "connection": p.connection,
            "child": p.child,
            "owner": owner_json(p.owner.as_ref()),
            "epoch": p.epoch,
            "ike_state": sa_state(p.ike_state),
            "child_state": sa_state(p.child_state),
            "established_since": rfc3339(p.established_since.as_ref()),
            "renegotiating": p.renegotiating,
            "guard": guard_json(p.guard.as_ref()),
            "last_failover": p.last_failover.as_ref().map(|f| json!({
                "started_at": rfc3339(f.started_at.as_ref()),
                "duration_ms": render::millis(f.duration.as_ref()),
                "reason": f.reason,
                "outcome": f.outcome,
                "attempts": f.attempts,
            })),
        })).collect::<Vec<_>>(),
    })
}

fn print_table(s: &pb::Status) {
    let idle = render::duration(s.idle_timeout.as_ref())
        .map(render::short)
        .unwrap_or_default();
    println!(
        "node {}   mode {} (idle timeout {idle})   vipsec {}",
        s.node,
        render::mode(s.mode),
        s.version
    );
    println!();
    let mut t = table(&["backend", "kind", "health", "since", "detail"]);
    for (name, h) in [
        ("store", &s.store),
        ("keying", &s.keying),
        ("kernel", &s.kernel),
        ("ownership", &s.ownership),
        ("runtime", &s.runtime),
    ] {
        let h = h.clone().unwrap_or_default();
        let health = if h.healthy { "ok" } else { "DOWN" };
        t.add_row(vec![
            name,
            &h.kind,
            health,
            &ago(h.since.as_ref()),
            or_dash(&h.detail),
        ]);
    }
    println!("{t}");
    let fs = s.fail_secure.unwrap_or_default();
    let fs_line = match (fs.enabled, fs.engaged) {
        (false, _) => "disabled".to_string(),
        (true, false) => "enabled, guard NOT held for every VIP (see below)".to_string(),
        (true, true) => format!(
            "guard held since {} ({} policies or rules in the kernel)",
            ago(fs.since.as_ref()),
            fs.flows
        ),
    };
    println!("\nfail-secure: {fs_line}");
    if s.initiations_queued > 0 {
        println!("initiations queued: {}", s.initiations_queued);
    }
    if !s.hosted_vips.is_empty() {
        println!();
        let mut t = table(&[
            "hosted vip",
            "here",
            "owner",
            "epoch",
            "taken",
            "draining",
            "clear-text guard",
            "ownership",
        ]);
        for h in &s.hosted_vips {
            let (owner, taken) = match &h.owner {
                Some(o) => (o.node.clone(), ago(o.taken_at.as_ref())),
                None => ("-".into(), "-".into()),
            };
            let here = if h.present_locally { "yes" } else { "no" };
            let draining = if h.draining { "yes" } else { "no" };
            let guard = guard_cell(h.guard.as_ref());
            t.add_row(vec![
                h.address.clone(),
                here.into(),
                owner,
                h.epoch.to_string(),
                taken,
                draining.into(),
                guard,
                if h.split_brain {
                    "SPLIT BRAIN".to_string()
                } else {
                    h.ownership.clone()
                },
            ]);
        }
        println!("{t}");
        // Say why for every VIP that does not accept SAs while it is here.
        for h in s
            .hosted_vips
            .iter()
            .filter(|h| h.present_locally && h.ownership != "owner")
        {
            println!("  {}: {}", h.address, h.ownership_reason);
        }
        for h in s.hosted_vips.iter().filter(|h| !h.also_held_by.is_empty()) {
            println!(
                "  {}: also held by {} (as marked in the store)",
                h.address,
                h.also_held_by.join(", ")
            );
        }
    }
    if !s.peer_vips.is_empty() {
        println!();
        let mut t = table(&[
            "peer vip",
            "connection",
            "owner",
            "epoch",
            "ike",
            "child",
            "established",
            "clear-text guard",
            "last failover",
        ]);
        for p in &s.peer_vips {
            let owner = p
                .owner
                .as_ref()
                .map(|o| o.node.clone())
                .unwrap_or_else(|| "-".into());
            let last = match &p.last_failover {
                None => "-".into(),
                Some(f) => match render::duration(f.duration.as_ref()) {
                    Some(d) => {
                        format!(
                            "{} in {} ({}, {})",
                            f.outcome,
                            render::short(d),
                            f.reason,
                            ago(f.started_at.as_ref())
                        )
                    }
                    None => format!("{} ({})", f.outcome, f.reason),
                },
            };
            let ike = if p.renegotiating && p.ike_state != pb::SaState::Established as i32 {
                format!("{} (renegotiating)", sa_state(p.ike_state))
            } else {
                sa_state(p.ike_state).to_string()
            };
            t.add_row(vec![
                p.address.clone(),
                format!("{}/{}", p.connection, p.child),
                owner,
                p.epoch.to_string(),
                ike,
                sa_state(p.child_state).to_string(),
                ago(p.established_since.as_ref()),
                guard_cell(p.guard.as_ref()),
                last,
            ]);
        }
        println!("{t}");
    }
}
