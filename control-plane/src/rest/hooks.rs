//! `/vault/hooks`: inbound hooks over REST (docs/inbound-hooks.md) —
//! vendor webhooks keycap verifies at the proxy's `/hooks/{id}` and relays.
//! Not `/vault/webhooks`, the alert webhooks keycap sends. Bodies and
//! answers are typed structs; a vendor signing secret is never answered,
//! and keycap's relay secret only in the answer that registered the hook.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{admin, parse_body, rfc3339, ErrorAnswers};
use crate::error::ApiError;
use crate::hooks::{HookRequest, HookView};
use crate::scope::Operation;
use crate::service::Control;

pub fn routes() -> Router<Arc<Control>> {
    Router::new()
        .route("/vault/hooks", post(create).get(list))
        .route("/vault/hooks/{id}", get(read).delete(remove))
        .route("/vault/hooks/{id}/secrets", post(add_secret))
        .route(
            "/vault/hooks/{id}/secrets/{fingerprint}",
            delete(remove_secret),
        )
}

/// `POST /vault/hooks`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateHookBody {
    /// `stripe`, `twilio` or `resend`.
    pub vendor: String,
    /// The vendor's signing secret: Stripe `whsec_...`, the Twilio auth
    /// token, Resend (Svix) `whsec_<base64>`.
    pub signing_secret: String,
    /// Where verified events are relayed (POST, same body and type).
    pub destination_url: String,
    /// The URL the vendor calls, as it sees it; required for Twilio, which
    /// signs it. Ending in `/`: the proxy's base, `hooks/{id}` is added.
    #[serde(default)]
    pub public_url: Option<String>,
    /// How far a signed timestamp may stray: seconds or a duration (`5m`);
    /// default 300 seconds.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub tolerance: Option<serde_json::Value>,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HookJson {
    pub id: String,
    pub vendor: String,
    /// The path to give the vendor, on the proxy.
    pub path: String,
    pub destination_url: String,
    pub public_url: String,
    pub tolerance_secs: i64,
    /// Each vendor signing secret's fingerprint (`sha256:` + 12 hex
    /// digits); two during a roll.
    pub secrets: Vec<String>,
    pub description: String,
    pub created_at: String,
}

impl From<&HookView> for HookJson {
    fn from(h: &HookView) -> Self {
        let e = &h.endpoint;
        HookJson {
            id: e.id.clone(),
            vendor: e.vendor.as_str().to_string(),
            path: e.path(),
            destination_url: e.destination_url.clone(),
            public_url: e.public_url.clone(),
            tolerance_secs: e.tolerance_secs,
            secrets: h.secret_fingerprints.clone(),
            description: e.description.clone(),
            created_at: rfc3339(e.created_at),
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedHook {
    pub hook: HookJson,
    /// The path to give the vendor, on the proxy: `/hooks/{id}`.
    pub path: String,
    /// keycap's secret for the `Keycap-Signature` on relayed events, for
    /// the destination to verify them: shown here only.
    pub relay_secret: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HookList {
    pub hooks: Vec<HookJson>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HookDeleted {
    pub deleted: bool,
}

/// `POST /vault/hooks/{id}/secrets`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddHookSecretBody {
    pub signing_secret: String,
}

/// Inbound hooks relay events about no vendor key: a token restricted to
/// some vendors may not manage them.
async fn caller(c: &Control, headers: &HeaderMap, op: Operation) -> Result<(), ApiError> {
    admin(c, headers, op).await?.vendors.check_all()
}

fn tolerance_text(v: Option<serde_json::Value>) -> Result<String, ApiError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(String::new()),
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
        Some(_) => {
            Err(crate::domain::invalid("tolerance", "seconds or a duration such as \"5m\"").into())
        }
    }
}

/// Registers an inbound hook; the answer carries the path to give the
/// vendor and keycap's relay secret, once (scopes `webhooks:write` and
/// `credentials:write`).
#[utoipa::path(post, path = "/vault/hooks", tag = "hooks", operation_id = "create_hook",
    request_body = CreateHookBody,
    responses((status = 201, description = "The hook, its path and relay secret", body = CreatedHook), ErrorAnswers))]
async fn create(
    State(c): State<Arc<Control>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<CreatedHook>), ApiError> {
    caller(&c, &headers, Operation::CreateHook).await?;
    let b: CreateHookBody = parse_body(&body)?;
    let req = HookRequest {
        vendor: b.vendor,
        signing_secret: b.signing_secret,
        destination_url: b.destination_url,
        public_url: b.public_url.unwrap_or_default(),
        tolerance: tolerance_text(b.tolerance)?,
        description: b.description.unwrap_or_default(),
    };
    let (view, relay_secret) = c.create_hook(&req).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedHook {
            path: view.endpoint.path(),
            hook: HookJson::from(&view),
            relay_secret,
        }),
    ))
}

/// Every inbound hook (scope `webhooks:read`).
#[utoipa::path(get, path = "/vault/hooks", tag = "hooks", operation_id = "list_hooks",
    responses((status = 200, description = "The hooks", body = HookList), ErrorAnswers))]
async fn list(
    State(c): State<Arc<Control>>,
    headers: HeaderMap,
) -> Result<Json<HookList>, ApiError> {
    caller(&c, &headers, Operation::ListHooks).await?;
    let all = c.list_hooks().await?;
    Ok(Json(HookList {
        hooks: all.iter().map(HookJson::from).collect(),
    }))
}

/// One inbound hook, never a secret (scope `webhooks:read`).
#[utoipa::path(get, path = "/vault/hooks/{id}", tag = "hooks", operation_id = "get_hook",
    params(("id" = String, Path, description = "The hook's id (`hk_...`)")),
    responses((status = 200, description = "The hook", body = HookJson), ErrorAnswers))]
async fn read(
    State(c): State<Arc<Control>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<HookJson>, ApiError> {
    caller(&c, &headers, Operation::ListHooks).await?;
    Ok(Json(HookJson::from(&c.get_hook(&id).await?)))
}

/// Deletes an inbound hook: its events then meet a 404 (scope
/// `webhooks:write`).
#[utoipa::path(delete, path = "/vault/hooks/{id}", tag = "hooks", operation_id = "delete_hook",
    params(("id" = String, Path, description = "The hook's id (`hk_...`)")),
    responses((status = 200, description = "Deleted", body = HookDeleted), ErrorAnswers))]
async fn remove(
    State(c): State<Arc<Control>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<HookDeleted>, ApiError> {
    caller(&c, &headers, Operation::DeleteHook).await?;
    c.delete_hook(&id).await?;
    Ok(Json(HookDeleted { deleted: true }))
}

/// Adds a vendor signing secret (a roll: events signed with either verify
/// until the old one is removed; scopes `webhooks:write`,
/// `credentials:write`).
#[utoipa::path(post, path = "/vault/hooks/{id}/secrets", tag = "hooks", operation_id = "add_hook_secret",
    params(("id" = String, Path, description = "The hook's id (`hk_...`)")),
    request_body = AddHookSecretBody,
    responses((status = 200, description = "The hook", body = HookJson), ErrorAnswers))]
async fn add_secret(
    State(c): State<Arc<Control>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<HookJson>, ApiError> {
    caller(&c, &headers, Operation::RollHookSecret).await?;
    let b: AddHookSecretBody = parse_body(&body)?;
    Ok(Json(HookJson::from(
        &c.add_hook_secret(&id, &b.signing_secret).await?,
    )))
}

/// Removes the vendor signing secret with this fingerprint; the last one
/// stays (scopes `webhooks:write`, `credentials:write`).
#[utoipa::path(delete, path = "/vault/hooks/{id}/secrets/{fingerprint}", tag = "hooks",
    operation_id = "remove_hook_secret",
    params(("id" = String, Path, description = "The hook's id (`hk_...`)"),
        ("fingerprint" = String, Path, description = "The secret's fingerprint (`sha256:...`)")),
    responses((status = 200, description = "The hook", body = HookJson), ErrorAnswers))]
async fn remove_secret(
    State(c): State<Arc<Control>>,
    Path((id, fingerprint)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<HookJson>, ApiError> {
    caller(&c, &headers, Operation::RollHookSecret).await?;
    Ok(Json(HookJson::from(
        &c.remove_hook_secret(&id, &fingerprint).await?,
    )))
}
