//! `/vault/approvals`: calls held for a person's approval
//! (docs/approvals.md) over REST, the same operations as gRPC's
//! `ApprovalService`. Reading needs `keys:read`; approving or denying needs
//! `approvals:decide` and a reason.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use keycap_proto::time::from_proto;
use keycap_proto::{pb, Micros};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{admin, parse_body, rfc3339, ErrorAnswers};
use crate::answers::Usd;
use crate::approval::{Approval, ApprovalFilter, ApprovalState};
use crate::domain::invalid;
use crate::error::ApiError;
use crate::scope::Operation;
use crate::service::Control;

pub fn routes() -> Router<Arc<Control>> {
    Router::new()
        .route("/vault/approvals", get(list))
        .route("/vault/approvals/{id}", get(read))
        .route("/vault/approvals/{id}/approve", post(approve))
        .route("/vault/approvals/{id}/deny", post(deny))
}

/// A call held for approval.
#[derive(Serialize, ToSchema)]
pub struct ApprovalAnswer {
    /// `apr_...`
    pub id: String,
    pub key_id: String,
    pub agent_run_label: String,
    pub vendor: String,
    pub method: String,
    /// The vendor's path with its query.
    pub path: String,
    /// Hex SHA-256 of the request's canonical form; the retry must match.
    pub fingerprint: String,
    /// The reservation quoted; a retry may reserve at most this.
    pub quote_usd: Usd,
    pub quote_micros: i64,
    /// `pending`, `approved`, `denied`, `expired` or `used`.
    pub state: String,
    #[schema(format = DateTime)]
    pub requested_at: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
    /// The admin token that decided, "<id> (<name>)"; null while pending.
    pub decided_by: Option<String>,
    pub reason: Option<String>,
    #[schema(format = DateTime)]
    pub decided_at: Option<String>,
    #[schema(format = DateTime)]
    pub consumed_at: Option<String>,
    /// The proxy that held it.
    pub node_id: String,
    /// The dashboard's page for it.
    pub approval_url: String,
}

impl ApprovalAnswer {
    pub fn of(a: &Approval, url: String) -> Self {
        let d = a.decision.as_ref();
        ApprovalAnswer {
            id: a.id.clone(),
            key_id: a.key_id.clone(),
            agent_run_label: a.agent_run_label.clone(),
            vendor: a.vendor.clone(),
            method: a.method.clone(),
            path: a.path.clone(),
            fingerprint: hex::encode(a.fingerprint),
            quote_usd: Usd(a.quote),
            quote_micros: a.quote.0,
            state: a.state(Utc::now()).as_str().to_string(),
            requested_at: rfc3339(a.requested_at),
            expires_at: rfc3339(a.expires_at),
            decided_by: d.map(|d| d.by.clone()),
            reason: d.map(|d| d.reason.clone()),
            decided_at: d.map(|d| rfc3339(d.at)),
            consumed_at: a.consumed_at.map(rfc3339),
            node_id: a.node_id.clone(),
            approval_url: url,
        }
    }
}

/// The same shape from the gRPC answer (for the CLI).
impl From<&pb::Approval> for ApprovalAnswer {
    fn from(a: &pb::Approval) -> Self {
        let time =
            |t: &Option<prost_types::Timestamp>| t.as_ref().and_then(from_proto).map(rfc3339);
        let text = |s: &str| (!s.is_empty()).then(|| s.to_string());
        ApprovalAnswer {
            id: a.id.clone(),
            key_id: a.key_id.clone(),
            agent_run_label: a.agent_run_label.clone(),
            vendor: a.vendor.clone(),
            method: a.method.clone(),
            path: a.path.clone(),
            fingerprint: a.fingerprint.clone(),
            quote_usd: Usd(Micros(a.quote_micros)),
            quote_micros: a.quote_micros,
            state: a.state.clone(),
            requested_at: time(&a.requested_at).unwrap_or_default(),
            expires_at: time(&a.expires_at).unwrap_or_default(),
            decided_by: text(&a.decided_by),
            reason: text(&a.reason),
            decided_at: time(&a.decided_at),
            consumed_at: time(&a.consumed_at),
            node_id: a.node_id.clone(),
            approval_url: a.approval_url.clone(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ApprovalList {
    /// Newest first.
    pub approvals: Vec<ApprovalAnswer>,
}

/// `POST /vault/approvals/{id}/approve` and `.../deny`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecideBody {
    /// Why (1-500 characters): stored with the decision and carried by
    /// the forwarded call's audit entry.
    pub reason: String,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ApprovalsQuery {
    /// `pending`, `approved`, `denied`, `expired` or `used`; absent: all.
    #[serde(default)]
    pub state: Option<String>,
    /// Only this key's.
    #[serde(default)]
    pub key_id: Option<String>,
    /// At most this many, newest first: 1 to 1000 (default 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// Calls held for approval, newest first (scope `keys:read`).
#[utoipa::path(get, path = "/vault/approvals", tag = "approvals", operation_id = "list_approvals",
    params(ApprovalsQuery),
    responses((status = 200, description = "The approvals", body = ApprovalList), ErrorAnswers))]
async fn list(
    State(c): State<Arc<Control>>,
    headers: HeaderMap,
    q: Result<Query<ApprovalsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ApprovalList>, ApiError> {
    let caller = admin(&c, &headers, Operation::ListApprovals).await?;
    let Query(q) = q.map_err(|e| ApiError::from(invalid("query", e.body_text())))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(invalid("limit", "must be between 1 and 1000").into());
    }
    let filter = ApprovalFilter {
        state: q.state.as_deref().map(ApprovalState::parse).transpose()?,
        key_id: q.key_id,
        limit,
    };
    let all = c.list_approvals(&caller.vendors, &filter).await?;
    Ok(Json(ApprovalList {
        approvals: all
            .iter()
            .map(|a| ApprovalAnswer::of(a, c.approval_url(&a.id)))
            .collect(),
    }))
}

/// One held call (scope `keys:read`).
#[utoipa::path(get, path = "/vault/approvals/{id}", tag = "approvals", operation_id = "get_approval",
    params(("id" = String, Path, description = "The approval's id (`apr_...`)")),
    responses((status = 200, description = "The approval", body = ApprovalAnswer), ErrorAnswers))]
async fn read(
    State(c): State<Arc<Control>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<ApprovalAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::GetApproval).await?;
    let a = c.get_approval(&caller.vendors, &id).await?;
    Ok(Json(ApprovalAnswer::of(&a, c.approval_url(&a.id))))
}

async fn decide(
    c: &Control,
    headers: &HeaderMap,
    id: &str,
    body: &[u8],
    approve: bool,
) -> Result<Json<ApprovalAnswer>, ApiError> {
    let caller = admin(c, headers, Operation::DecideApproval).await?;
    let b: DecideBody = parse_body(body)?;
    let a = c.decide_approval(&caller, id, approve, &b.reason).await?;
    Ok(Json(ApprovalAnswer::of(&a, c.approval_url(&a.id))))
}

/// Approves a pending call with a reason (scope `approvals:decide`); the
/// agent's identical retry with `Keycap-Approval` is then forwarded once.
/// `conflict` once decided or expired.
#[utoipa::path(post, path = "/vault/approvals/{id}/approve", tag = "approvals",
    operation_id = "approve_approval",
    params(("id" = String, Path, description = "The approval's id (`apr_...`)")),
    request_body = DecideBody,
    responses((status = 200, description = "The approval, approved", body = ApprovalAnswer), ErrorAnswers))]
async fn approve(
    State(c): State<Arc<Control>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ApprovalAnswer>, ApiError> {
    decide(&c, &headers, &id, &body, true).await
}

/// Denies a pending call with a reason (scope `approvals:decide`).
/// `conflict` once decided or expired.
#[utoipa::path(post, path = "/vault/approvals/{id}/deny", tag = "approvals",
    operation_id = "deny_approval",
    params(("id" = String, Path, description = "The approval's id (`apr_...`)")),
    request_body = DecideBody,
    responses((status = 200, description = "The approval, denied", body = ApprovalAnswer), ErrorAnswers))]
async fn deny(
    State(c): State<Arc<Control>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<ApprovalAnswer>, ApiError> {
    decide(&c, &headers, &id, &body, false).await
}
