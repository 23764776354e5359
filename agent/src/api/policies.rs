//! `GetPolicies` and `ApplyPolicy`: the cluster-wide policies as this node sees them, and
//! the one way an operator changes them.

use vipsec_proto::v1 as pb;

use super::error::ApiError;
use crate::model::VipRole;
use crate::policy::{ParsedPolicy, Policy};
use crate::runtime::AgentHandle;
use crate::runtime::policies::Policies;
use crate::store::StoreError;

fn policies(handle: &AgentHandle) -> Result<&Policies, ApiError> {
    handle.policies().ok_or_else(|| {
        ApiError::FailedPrecondition(
            "policies are not managed on this node (policy.managed = false)".into(),
        )
    })
}

pub fn get(handle: &AgentHandle) -> Result<pb::GetPoliciesResponse, ApiError> {
    let view = policies(handle)?.view();
    let vips = view
        .vips
        .iter()
        .map(|v| {
            let role = match v.role {
                VipRole::Hosted => pb::VipRole::Hosted,
                VipRole::Peer => pb::VipRole::Peer,
            } as i32;
            let (stored_policy, stored_version) = v.stored.clone().unwrap_or_default();
            pb::VipPolicyState {
                vip: v.vip.to_string(),
                role,
                state: v.state.as_str().to_string(),
                detail: v.state.detail(),
                policy: v
                    .policy
                    .as_ref()
                    .map(|p| p.name.clone())
                    .unwrap_or_default(),
                version: v.version,
                source: v.source.clone(),
                document_json: v.policy.as_ref().map(Policy::to_json).unwrap_or_default(),
                stored_policy,
                stored_version,
            }
        })
        .collect();
    let documents = view
        .documents
        .iter()
        .map(|d| pb::StoredPolicyDocument {
            name: d.stored.name.clone(),
            version: d.stored.version,
            source: d.stored.source.clone(),
            document_json: d.stored.raw.clone(),
            problem: d.problem.clone().unwrap_or_default(),
            unknown_fields: d.unknown_fields.clone(),
        })
        .collect();
    Ok(pb::GetPoliciesResponse {
        synced: view.synced,
        vips,
        documents,
    })
}

/// Parses a document as JSON when it looks like JSON, else as TOML.
pub fn parse(text: &str) -> Result<ParsedPolicy, ApiError> {
    let parsed = if text.trim_start().starts_with('{') {
        Policy::parse_json(text)
    } else {
        Policy::parse_toml(text)
    };
    let parsed = parsed.map_err(|e| ApiError::InvalidArgument(format!("policy refused: {e}")))?;
    if !parsed.unknown_fields.is_empty() {
        return Err(ApiError::InvalidArgument(format!(
            "policy refused: unknown fields {} (this vipsec does not know them)",
            parsed.unknown_fields.join(", ")
        )));
    }
    Ok(parsed)
}

pub async fn apply(
    handle: &AgentHandle,
    req: pb::ApplyPolicyRequest,
) -> Result<pb::ApplyPolicyResponse, ApiError> {
    let p = policies(handle)?;
    let parsed = parse(&req.document)?;
    let name = parsed.policy.name.clone();
    let current = p
        .view()
        .documents
        .into_iter()
        .find(|d| d.stored.name == name);
    if let Some(cur) = current.as_ref().filter(|d| !d.unknown_fields.is_empty()) {
        // An older agent must not strip a newer one's features.
        return Err(ApiError::FailedPrecondition(format!(
            "policy {name:?} version {} was written by a newer vipsec (fields {}); this version will not overwrite it",
            cur.stored.version,
            cur.unknown_fields.join(", ")
        )));
    }
    let expected = if req.create_only {
        0
    } else if req.expected_version != 0 {
        req.expected_version
    } else {
        current.as_ref().map_or(0, |d| d.stored.version)
    };
    let stored = p
        .store()
        .put(&name, &parsed.policy.to_json(), expected)
        .await
        .map_err(|e| match e {
            StoreError::Unavailable(m) => ApiError::Unavailable(m),
            other => ApiError::FailedPrecondition(other.to_string()),
        })?;
    tracing::info!(policy = %name, version = stored.version, source = %stored.source, "policy stored");
    Ok(pb::ApplyPolicyResponse {
        name: stored.name,
        version: stored.version,
        source: stored.source,
    })
}
