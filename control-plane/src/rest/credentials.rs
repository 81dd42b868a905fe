//! `/vault/vendors/{name}/credentials`: a vendor's credential versions over
//! REST, the same operations as gRPC's `CredentialService` (stage, list,
//! probe, promote). Answers carry each version's state, age and probe
//! result, never the credential; the answer shapes are shared with the CLI
//! (built there from the gRPC messages).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use keycap_proto::pb;
use keycap_proto::time::from_proto;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{admin, parse_body, rfc3339, ErrorAnswers};
use crate::answers::ConfirmationAnswer;
use crate::credential::{parse_grace, parse_version, CredentialVersion};
use crate::domain;
use crate::error::ApiError;
use crate::scope::Operation;
use crate::service::{Control, CredentialView};

pub fn routes() -> Router<Arc<Control>> {
    Router::new()
        .route("/vault/vendors/{name}/credentials", post(stage).get(list))
        .route(
            "/vault/vendors/{name}/credentials/{version}/probe",
            post(probe),
        )
        .route(
            "/vault/vendors/{name}/credentials/{version}/promote",
            post(promote),
        )
}

/// `POST /vault/vendors/{name}/credentials`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StageCredentialBody {
    /// The vendor's real credential, as `PUT /vault/vendors/{name}` takes it.
    pub credential: String,
}

/// `POST /vault/vendors/{name}/credentials/{version}/promote`; the body is
/// optional.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteCredentialBody {
    /// How long the version active before stays usable ("1h"); absent: 10
    /// minutes; "0s": retired at once. At most 7 days.
    #[serde(default)]
    pub grace: Option<String>,
    /// How long to wait for the proxies to serve the version; absent or 0:
    /// the control plane's default.
    #[serde(default)]
    pub ack_timeout_ms: u64,
}

/// A probe's result: never the vendor's body, never the credential.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ProbeAnswer {
    /// The vendor accepted the credential (a 2xx answer).
    pub ok: bool,
    /// The vendor's HTTP status; null when no answer came.
    pub status: Option<i64>,
    /// Why the probe failed; empty when it passed.
    pub error: String,
    #[schema(format = DateTime)]
    pub at: String,
}

/// One credential version; never its material.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CredentialAnswer {
    pub version: i64,
    /// `staged`, `active`, `previous` (in grace) or `retired` (material
    /// erased).
    pub state: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    /// Seconds since it was staged.
    pub age_seconds: i64,
    #[schema(format = DateTime)]
    pub promoted_at: Option<String>,
    /// For `previous`: when it retires (until then a promote rolls back).
    #[schema(format = DateTime)]
    pub grace_until: Option<String>,
    #[schema(format = DateTime)]
    pub retired_at: Option<String>,
    /// The last probe; null if never probed.
    pub probe: Option<ProbeAnswer>,
    /// Active, and older than the vendor's `rotate_after`.
    pub rotation_due: bool,
}

impl CredentialAnswer {
    pub fn new(c: &CredentialVersion, rotation_due: bool) -> Self {
        CredentialAnswer {
            version: c.version,
            state: c.state.as_str().to_string(),
            created_at: rfc3339(c.created_at),
            age_seconds: (Utc::now() - c.created_at).num_seconds().max(0),
            promoted_at: c.promoted_at.map(rfc3339),
            grace_until: c.grace_until.map(rfc3339),
            retired_at: c.retired_at.map(rfc3339),
            probe: c.probe.as_ref().map(|p| ProbeAnswer {
                ok: p.ok,
                status: p.status,
                error: p.error.clone(),
                at: rfc3339(p.at),
            }),
            rotation_due,
        }
    }
}

impl From<&CredentialView> for CredentialAnswer {
    fn from(v: &CredentialView) -> Self {
        CredentialAnswer::new(&v.credential, v.rotation_due)
    }
}

fn time(t: &Option<prost_types::Timestamp>) -> Option<String> {
    t.as_ref().and_then(from_proto).map(rfc3339)
}

impl From<&pb::CredentialVersion> for CredentialAnswer {
    fn from(c: &pb::CredentialVersion) -> Self {
        CredentialAnswer {
            version: c.version,
            state: c.state.clone(),
            created_at: time(&c.created_at).unwrap_or_default(),
            age_seconds: c.age_seconds,
            promoted_at: time(&c.promoted_at),
            grace_until: time(&c.grace_until),
            retired_at: time(&c.retired_at),
            probe: c.probe.as_ref().map(|p| ProbeAnswer {
                ok: p.ok,
                status: (p.status != 0).then_some(i64::from(p.status)),
                error: p.error.clone(),
                at: time(&p.at).unwrap_or_default(),
            }),
            rotation_due: c.rotation_due,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CredentialList {
    pub vendor: String,
    /// Newest first.
    pub credentials: Vec<CredentialAnswer>,
}

#[derive(Serialize, ToSchema)]
pub struct PromoteAnswer {
    /// The version now active.
    pub credential: CredentialAnswer,
    /// The version active before: `previous` until its grace ends, or
    /// `retired`; null when the version was already active.
    pub previous: Option<CredentialAnswer>,
    pub confirmation: ConfirmationAnswer,
}

/// Adds a credential version to the vendor without using it; the answer
/// names its `version` (scopes `vendors:write` and `credentials:write`).
#[utoipa::path(post, path = "/vault/vendors/{name}/credentials", tag = "vendors",
    operation_id = "stage_credential",
    params(("name" = String, Path, description = "The vendor's name")),
    request_body = StageCredentialBody,
    responses((status = 201, description = "The staged version", body = CredentialAnswer), ErrorAnswers))]
async fn stage(
    State(c): State<Arc<Control>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<CredentialAnswer>), ApiError> {
    let caller = admin(&c, &headers, Operation::StageCredential).await?;
    let b: StageCredentialBody = parse_body(&body)?;
    let staged = c
        .stage_credential(&caller.vendors, &name, &b.credential)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CredentialAnswer::new(&staged, false)),
    ))
}

/// The vendor's credential versions, newest first: state, age, probe
/// result; never the credential (scope `vendors:read`).
#[utoipa::path(get, path = "/vault/vendors/{name}/credentials", tag = "vendors",
    operation_id = "list_credentials",
    params(("name" = String, Path, description = "The vendor's name")),
    responses((status = 200, description = "The versions", body = CredentialList), ErrorAnswers))]
async fn list(
    State(c): State<Arc<Control>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<CredentialList>, ApiError> {
    let caller = admin(&c, &headers, Operation::ListCredentials).await?;
    let all = c.list_credentials(&caller.vendors, &name).await?;
    Ok(Json(CredentialList {
        vendor: name,
        credentials: all.iter().map(CredentialAnswer::from).collect(),
    }))
}

/// Makes one cheap authenticated read against the vendor with this version
/// and records the result (scope `credentials:write`).
#[utoipa::path(post, path = "/vault/vendors/{name}/credentials/{version}/probe", tag = "vendors",
    operation_id = "probe_credential",
    params(("name" = String, Path, description = "The vendor's name"),
        ("version" = i64, Path, description = "The credential version")),
    responses((status = 200, description = "The version with its probe result", body = CredentialAnswer), ErrorAnswers))]
async fn probe(
    State(c): State<Arc<Control>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<CredentialAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::ProbeCredential).await?;
    let version = parse_version(&version)?;
    let probed = c.probe_credential(&caller.vendors, &name, version).await?;
    Ok(Json(CredentialAnswer::new(&probed, false)))
}

/// Makes this version the one every proxy injects, once they acknowledge
/// it; the version active before stays usable for `grace`, and promoting
/// it again within that window rolls back (scopes `vendors:write` and
/// `credentials:write`).
#[utoipa::path(post, path = "/vault/vendors/{name}/credentials/{version}/promote", tag = "vendors",
    operation_id = "promote_credential",
    params(("name" = String, Path, description = "The vendor's name"),
        ("version" = i64, Path, description = "The credential version")),
    request_body(content = Option<PromoteCredentialBody>, description = "Optional"),
    responses((status = 200, description = "The active version, the previous one, and the proxies' confirmation", body = PromoteAnswer), ErrorAnswers))]
async fn promote(
    State(c): State<Arc<Control>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<PromoteAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::PromoteCredential).await?;
    let version = parse_version(&version)?;
    let b: PromoteCredentialBody = if body.is_empty() {
        PromoteCredentialBody::default()
    } else {
        parse_body(&body)?
    };
    let grace = parse_grace(b.grace.as_deref().unwrap_or(""))?;
    let timeout = domain::parse_ack_timeout_ms(b.ack_timeout_ms)?;
    let (promotion, confirmation) = c
        .promote_credential(&caller.vendors, &name, version, grace, timeout)
        .await?;
    Ok(Json(PromoteAnswer {
        credential: CredentialAnswer::new(&promotion.active, false),
        previous: promotion
            .previous
            .as_ref()
            .map(|p| CredentialAnswer::new(p, false)),
        confirmation: (&confirmation).into(),
    }))
}
