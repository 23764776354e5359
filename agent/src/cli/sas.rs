//! `vipsec sas [VIP] [--json]`.

use serde_json::{Value, json};
use vipsec_proto::v1 as pb;

use super::CliError;
use super::client::{Target, connect};
use super::render::table;

pub async fn run(t: &Target, vip: Option<String>, as_json: bool) -> Result<(), CliError> {
    let mut client = connect(t).await?;
    let r = client
        .list_sas(pb::ListSasRequest {
            vip: vip.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(&to_json(&r)).unwrap_or_default()
        );
        return Ok(());
    }
    let mut tab = table(&[
        "vip",
        "role",
        "ike_sa",
        "state",
        "local",
        "remote",
        "child",
        "spi in/out",
        "bytes in/out",
        "pkts in/out",
    ]);
    let mut rows = 0;
    let mut add = |vip: &str, role: &str, sa: &pb::IkeSa| {
        let ike = format!("{}#{}", sa.name, sa.unique_id);
        let local = format!("{}[{}]", sa.local_host, sa.local_port);
        let remote = format!("{}[{}]", sa.remote_host, sa.remote_port);
        if sa.children.is_empty() {
            tab.add_row(vec![
                vip.into(),
                role.into(),
                ike.clone(),
                sa.state.clone(),
                local.clone(),
                remote.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for c in &sa.children {
            tab.add_row(vec![
                vip.to_string(),
                role.to_string(),
                ike.clone(),
                sa.state.clone(),
                local.clone(),
                remote.clone(),
                format!("{}#{} {}", c.name, c.unique_id, c.state),
                format!("{}/{}", c.spi_in, c.spi_out),
                format!("{}/{}", c.bytes_in, c.bytes_out),
                format!("{}/{}", c.packets_in, c.packets_out),
            ]);
        }
        rows += 1;
    };
    for g in &r.vips {
        for sa in &g.sas {
            add(&g.vip, role(g.role), sa);
        }
    }
    for sa in &r.unmapped {
        add("-", "unmapped", sa);
    }
    if rows == 0 {
        println!("no SAs");
    } else {
        println!("{tab}");
    }
    Ok(())
}

fn role(r: i32) -> &'static str {
    match pb::VipRole::try_from(r) {
        Ok(pb::VipRole::Hosted) => "hosted",
        Ok(pb::VipRole::Peer) => "peer",
        _ => "unknown",
    }
}

fn sa_json(sa: &pb::IkeSa) -> Value {
    json!({
        "name": sa.name,
        "unique_id": sa.unique_id,
        "state": sa.state,
        "local_host": sa.local_host,
        "local_port": sa.local_port,
        "remote_host": sa.remote_host,
        "remote_port": sa.remote_port,
        "local_id": sa.local_id,
        "remote_id": sa.remote_id,
        "initiator_spi": sa.initiator_spi,
        "responder_spi": sa.responder_spi,
        "initiator": sa.initiator,
        "established_secs": sa.established_secs,
        "children": sa.children.iter().map(|c| json!({
            "name": c.name,
            "unique_id": c.unique_id,
            "state": c.state,
            "mode": c.mode,
            "protocol": c.protocol,
            "encap": c.encap,
            "spi_in": c.spi_in,
            "spi_out": c.spi_out,
            "bytes_in": c.bytes_in,
            "bytes_out": c.bytes_out,
            "packets_in": c.packets_in,
            "packets_out": c.packets_out,
            "use_in_secs": c.use_in_secs,
            "use_out_secs": c.use_out_secs,
            "install_secs": c.install_secs,
            "local_ts": c.local_ts,
            "remote_ts": c.remote_ts,
        })).collect::<Vec<_>>(),
    })
}

pub fn to_json(r: &pb::ListSasResponse) -> Value {
    json!({
        "vips": r.vips.iter().map(|g| json!({
            "vip": g.vip,
            "role": role(g.role),
            "sas": g.sas.iter().map(sa_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "unmapped": r.unmapped.iter().map(sa_json).collect::<Vec<_>>(),
    })
}
