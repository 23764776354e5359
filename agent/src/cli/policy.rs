//! `vipsec policy show|apply|check`: the cluster-wide policies.

use std::path::Path;

use serde_json::json;
use vipsec_proto::v1 as pb;

use super::CliError;
use super::client::{Target, connect};
use super::render::table;
use crate::policy::Policy;

fn role(r: i32) -> &'static str {
    match pb::VipRole::try_from(r) {
        Ok(pb::VipRole::Hosted) => "hosted",
        Ok(pb::VipRole::Peer) => "peer",
        _ => "?",
    }
}

fn read(file: &Path) -> Result<String, CliError> {
    std::fs::read_to_string(file).map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))
}

pub async fn show(t: &Target, json: bool) -> Result<(), CliError> {
    let mut client = connect(t).await?;
    let r = client
        .get_policies(pb::GetPoliciesRequest {})
        .await?
        .into_inner();
    if json {
        let doc = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or(json!(s));
        let out = json!({
            "synced": r.synced,
            "vips": r.vips.iter().map(|v| json!({
                "vip": v.vip,
                "role": role(v.role),
                "state": v.state,
                "detail": v.detail,
                "policy": v.policy,
                "version": v.version,
                "source": v.source,
                "document": if v.document_json.is_empty() { json!(null) } else { doc(&v.document_json) },
                "stored_policy": v.stored_policy,
                "stored_version": v.stored_version,
            })).collect::<Vec<_>>(),
            "documents": r.documents.iter().map(|d| json!({
                "name": d.name,
                "version": d.version,
                "source": d.source,
                "document": doc(&d.document_json),
                "problem": if d.problem.is_empty() { json!(null) } else { json!(d.problem) },
                "unknown_fields": d.unknown_fields,
                "read_only": !d.unknown_fields.is_empty(),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return Ok(());
    }
    if !r.synced {
        println!("(the agent has not read the store yet)");
    }
    let mut t = table(&[
        "vip", "role", "policy", "version", "state", "source", "traffic",
    ]);
    for v in &r.vips {
        let traffic = Policy::parse_json(&v.document_json)
            .map(|p| {
                p.policy
                    .traffic()
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_else(|_| "-".into());
        t.add_row(vec![
            v.vip.clone(),
            role(v.role).into(),
            if v.policy.is_empty() {
                "-".into()
            } else {
                v.policy.clone()
            },
            v.version.to_string(),
            v.state.clone(),
            v.source.clone(),
            traffic,
        ]);
    }
    println!("{t}");
    for v in r.vips.iter().filter(|v| !v.detail.is_empty()) {
        println!("  {}: {}", v.vip, v.detail);
    }
    if !r.documents.is_empty() {
        println!();
        let mut t = table(&["stored policy", "version", "source", "status"]);
        for d in &r.documents {
            let status = if !d.unknown_fields.is_empty() {
                format!(
                    "read-only: written by a newer vipsec ({})",
                    d.unknown_fields.join(", ")
                )
            } else if !d.problem.is_empty() {
                format!("refused: {}", d.problem)
            } else {
                "ok".into()
            };
            t.add_row(vec![
                d.name.clone(),
                d.version.to_string(),
                d.source.clone(),
                status,
            ]);
        }
        println!("{t}");
    }
    Ok(())
}

pub async fn apply(
    t: &Target,
    file: &Path,
    expect_version: Option<u64>,
    create: bool,
) -> Result<(), CliError> {
    let document = read(file)?;
    // Refuse locally first: a bad policy never leaves this machine.
    crate::api::parse_policy(&document)
        .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
    let mut client = connect(t).await?;
    let r = client
        .apply_policy(pb::ApplyPolicyRequest {
            document,
            expected_version: expect_version.unwrap_or(0),
            create_only: create,
        })
        .await?
        .into_inner();
    println!(
        "stored policy {} version {} ({})",
        r.name, r.version, r.source
    );
    Ok(())
}

pub fn check(file: &Path) -> Result<(), CliError> {
    let document = read(file)?;
    let parsed = crate::api::parse_policy(&document)
        .map_err(|e| CliError::Usage(format!("{}: {e}", file.display())))?;
    let p = parsed.policy;
    let traffic: Vec<String> = p.traffic().iter().map(|e| e.to_string()).collect();
    println!("{}: policy {:?} is valid", file.display(), p.name);
    println!(
        "  vips:          {}",
        p.vips
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("  traffic:       {}", traffic.join(" "));
    println!("  ike proposals: {}", p.ike_proposals.join(", "));
    println!("  esp proposals: {}", p.esp_proposals.join(", "));
    Ok(())
}
