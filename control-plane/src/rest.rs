//! REST/JSON front end under `/vault/*`, for automation platforms that
//! cannot speak gRPC (a Make.com HTTP module, n8n, Zapier). Same operations
//! as the gRPC admin API, same admin tokens and scopes (`scope::required`);
//! `POST /vault/keys` also takes an issuer token (children of its key only).
//! Bodies are parsed here into validated domain inputs; every failure is a
//! JSON error body with a stable code. Responses never carry a vendor
//! credential; a vault key or admin token secret appears only in the
//! response that minted it.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use chrono::{DateTime, SecondsFormat, Utc};
use keycap_proto::Micros;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::domain::{self, invalid, AuditQuery, KeyFilter, Vendor};
use crate::error::ApiError;
use crate::grpc::next_page_token;
use crate::ledger;
use crate::scope::Operation;
use crate::service::{
    AdminPrincipal, Confirmation, Control, KeyView, NewAdminToken, NewIssuerToken, NewKey,
    PutVendor, VendorView,
};

mod webhooks;
pub use webhooks::{CreateWebhookBody, DeliveryJson, WebhookJson};

type Ctl = State<Arc<Control>>;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.code(), "message": self.to_string()});
        match &self {
            ApiError::Invalid(i) => body["field"] = json!(i.field),
            ApiError::MissingScope(s) => body["scope"] = json!(s.as_str()),
            ApiError::VendorNotAllowed(v) => body["vendor"] = json!(v),
            _ => {}
        }
        (self.http_status(), Json(body)).into_response()
    }
}

pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/vault/vendors", get(list_vendors))
        .route(
            "/vault/vendors/{name}",
            put(put_vendor).get(get_vendor).delete(delete_vendor),
        )
        .route(
            "/vault/vendors/{name}/prices/import",
            post(import_vendor_prices).layer(DefaultBodyLimit::max(MAX_PRICE_FILE_BYTES)),
        )
        .route("/vault/keys", post(create_key).get(list_keys))
        .route("/vault/keys/revoke", post(revoke_run))
        .route("/vault/keys/{id}", get(get_key).delete(revoke_key))
        .route(
            "/vault/keys/{id}/issuer-tokens",
            post(create_issuer_token).get(list_issuer_tokens),
        )
        .route("/vault/issuer-tokens/{id}", delete(revoke_issuer_token))
        .route(
            "/vault/admin-tokens",
            post(create_admin_token).get(list_admin_tokens),
        )
        .route("/vault/admin-tokens/{id}", delete(revoke_admin_token))
        .route("/vault/spend", get(spend))
        .route("/vault/audit", get(audit))
        .route("/vault/audit/verify", get(verify_audit))
        .route("/vault/audit/checkpoints", get(list_checkpoints))
        .route("/vault/audit/export", get(export_audit))
        .merge(webhooks::routes())
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/livez", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route(
            "/vault/{*rest}",
            axum::routing::any(|| async {
                ApiError::NotFound("no such endpoint".to_string()).into_response()
            }),
        )
        .with_state(control)
}

/// Ready when the database answers a query, within two seconds.
async fn readyz(State(c): State<Arc<Control>>) -> Response {
    let answered = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        c.store().latest_version(),
    )
    .await;
    match answered {
        Ok(Ok(_)) => Json(json!({"status": "ok"})).into_response(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: the database refused a query");
            unready()
        }
        Err(_) => {
            tracing::warn!("readiness: the database did not answer within 2 s");
            unready()
        }
    }
}

fn unready() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"status": "database_unavailable"})),
    )
        .into_response()
}

/// Authenticates the admin token and checks the scopes `op` needs.
async fn admin(
    c: &Control,
    headers: &HeaderMap,
    op: Operation,
) -> Result<AdminPrincipal, ApiError> {
    let auth = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    c.authorize(auth, op).await
}

/// Parses a JSON body with a client-facing error that names what is wrong.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(invalid("body", "a JSON body is required").into());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::from(invalid("body", format!("invalid JSON: {e}"))))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn usd(m: Micros) -> Value {
    serde_json::to_value(m.to_json_usd()).unwrap_or(Value::Null)
}

/// A USD amount from JSON: a number or a decimal string, parsed exactly.
fn usd_field(field: &'static str, v: &Value) -> Result<Micros, ApiError> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return Err(invalid(field, "must be a number of US dollars").into()),
    };
    Micros::parse_usd(&text).map_err(|e| ApiError::from(invalid(field, e.to_string())))
}

/// A vendor as written: no proxy has loaded this configuration yet.
fn vendor_json(v: &Vendor) -> Value {
    let mut out = vendor_fields(v);
    out["proxy_errors"] = json!([]);
    out
}

fn vendor_view_json(view: &VendorView) -> Value {
    let mut out = vendor_fields(&view.vendor);
    out["proxy_errors"] = view
        .proxy_errors
        .iter()
        .map(|e| json!({"node_id": e.node_id, "error": e.error, "at": rfc3339(e.at)}))
        .collect();
    out
}

fn vendor_fields(v: &Vendor) -> Value {
    json!({
        "name": v.name.as_str(),
        "profile": v.profile.as_str(),
        "base_url": v.base_url,
        "currency_rates": v.currency_rates,
        "prices": serde_json::from_str::<Value>(&v.prices).unwrap_or(Value::Null),
        "created_at": rfc3339(v.created_at),
        "updated_at": rfc3339(v.updated_at),
        "credential_set_at": rfc3339(v.credential_set_at),
        "rotate_after_seconds": v.rotate_after.map(|d| d.num_seconds()),
        "rotation_due_at": v.rotation_due_at().map(rfc3339),
        "rotation_overdue": v.rotation_overdue(Utc::now()),
    })
}

fn key_json(v: &KeyView) -> Value {
    let k = &v.key;
    json!({
        "id": k.id,
        "key_prefix": k.key_prefix,
        "vendor": k.vendor.as_str(),
        "status": v.status.as_str(),
        "allowed_endpoints": k.allowed_endpoints,
        "daily_usd_cap": usd(k.daily_cap),
        "daily_cap_micros": k.daily_cap.0,
        "per_call_usd_cap": k.per_call_cap.map(usd),
        "lifetime_usd_cap": k.lifetime_cap.map(usd),
        "spent_today_usd": usd(v.spend.spent_day),
        "spent_today_micros": v.spend.spent_day.0,
        "remaining_today_usd": usd(v.remaining_today),
        "remaining_today_micros": v.remaining_today.0,
        "calls_today": v.spend.calls_day,
        "spent_lifetime_usd": usd(v.spend.spent_lifetime),
        "expires_at": rfc3339(k.expires_at),
        "created_at": rfc3339(k.created_at),
        "revoked_at": k.revoked_at.map(rfc3339),
        "agent_run_label": k.agent_run_label,
        "metadata": k.metadata,
        "rate_limit_per_minute": k.limits.rate_limit_per_minute,
        "allowed_cidrs": k.limits.cidr_strings(),
        "zone": k.limits.zone,
        "parent_id": k.parent_id,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutVendorBody {
    profile: String,
    base_url: String,
    #[serde(default)]
    credential: Option<String>,
    #[serde(default)]
    currency_rates: BTreeMap<String, String>,
    /// The operator's price table, as a JSON object in the profile's table
    /// format; absent or null for the shipped prices.
    #[serde(default)]
    prices: Option<Value>,
    /// How long a credential may be used before it is due for rotation
    /// ("90d"); absent: never.
    #[serde(default)]
    rotate_after: Option<String>,
    /// How long to wait for the proxies to serve the change; absent or 0:
    /// the control plane's default.
    #[serde(default)]
    ack_timeout_ms: u64,
}

/// `PUT /vault/vendors/{name}`'s body, validated. Public for the fuzz
/// checks in `check`.
pub fn put_vendor_body(name: &str, body: &[u8]) -> Result<PutVendor, ApiError> {
    Ok(put_vendor_request(name, body)?.0)
}

/// `PUT /vault/vendors/{name}`'s body and how long it waits for proxies.
fn put_vendor_request(
    name: &str,
    body: &[u8],
) -> Result<(PutVendor, Option<std::time::Duration>), ApiError> {
    let b: PutVendorBody = parse_body(body)?;
    let put = PutVendor::new(
        name,
        &b.profile,
        &b.base_url,
        b.credential.as_deref(),
        &b.currency_rates,
        &b.prices.map(|p| p.to_string()).unwrap_or_default(),
    )?
    .with_rotate_after(b.rotate_after.as_deref().unwrap_or(""))?;
    Ok((put, domain::parse_ack_timeout_ms(b.ack_timeout_ms)?))
}

async fn put_vendor(
    State(c): Ctl,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = admin(&c, &headers, Operation::PutVendor).await?;
    let (put, timeout) = put_vendor_request(&name, &body)?;
    caller.require(c.vendor_put_operation(&put).await?)?;
    let (v, created, confirmation) = c.put_vendor(&caller.vendors, put, timeout).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut out = vendor_json(&v);
    out["confirmation"] = confirmation_json(&confirmation);
    Ok((status, Json(out)).into_response())
}

/// The largest LiteLLM price file the import takes (REST body, gRPC
/// message): the whole file is about 3.5 MB; the body limit of every other
/// route stays axum's 2 MB.
pub const MAX_PRICE_FILE_BYTES: usize = 16 * 1024 * 1024;

/// `POST /vault/vendors/{name}/prices/import`: the body is LiteLLM's price
/// file as published.
async fn import_vendor_prices(
    State(c): Ctl,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::ImportVendorPrices).await?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::from(invalid("body", "must be UTF-8 JSON text")))?;
    let (v, report) = c.import_vendor_prices(&caller.vendors, &name, text).await?;
    Ok(Json(json!({
        "vendor": vendor_json(&v),
        "report": report,
    })))
}

async fn get_vendor(
    State(c): Ctl,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::GetVendor).await?;
    Ok(Json(vendor_view_json(
        &c.get_vendor(&caller.vendors, &name).await?,
    )))
}

async fn list_vendors(State(c): Ctl, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::ListVendors).await?;
    let vs = c.list_vendors(&caller.vendors).await?;
    Ok(Json(
        json!({"vendors": vs.iter().map(vendor_view_json).collect::<Vec<_>>()}),
    ))
}

async fn delete_vendor(
    State(c): Ctl,
    Path(name): Path<String>,
    headers: HeaderMap,
    q: Result<Query<AckTimeoutQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::DeleteVendor).await?;
    let Query(q) = q.map_err(|e| ApiError::from(invalid("query", e.body_text())))?;
    let timeout = domain::parse_ack_timeout_ms(q.ack_timeout_ms)?;
    let confirmation = c.delete_vendor(&caller.vendors, &name, timeout).await?;
    Ok(Json(
        json!({"deleted": name, "confirmation": confirmation_json(&confirmation)}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeyBody {
    vendor: String,
    daily_usd_cap: Value,
    #[serde(default)]
    per_call_usd_cap: Option<Value>,
    #[serde(default)]
    lifetime_usd_cap: Option<Value>,
    allowed_endpoints: Vec<String>,
    expires_in: Value,
    agent_run_label: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    /// Calls per minute through one proxy; absent, null or 0: no limit.
    #[serde(default)]
    rate_limit_per_minute: Option<Value>,
    #[serde(default)]
    allowed_cidrs: Vec<String>,
    #[serde(default)]
    zone: Option<String>,
    /// The key to mint this one under; absent or null for a root key.
    #[serde(default)]
    parent_id: Option<String>,
    /// How long to wait for the proxies to serve the key; absent or 0: the
    /// control plane's default.
    #[serde(default)]
    ack_timeout_ms: u64,
}

/// A key's limits from a create body; a rate that is not a whole number is
/// refused naming its field.
fn key_limits(b: &CreateKeyBody) -> Result<domain::KeyLimits, ApiError> {
    let rate = match &b.rate_limit_per_minute {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n.as_i64().ok_or_else(|| {
            invalid(
                "rate_limit_per_minute",
                "must be 0 (no limit) or a positive whole number",
            )
        })?,
        Some(_) => {
            return Err(invalid(
                "rate_limit_per_minute",
                "must be 0 (no limit) or a positive whole number",
            )
            .into())
        }
    };
    Ok(domain::KeyLimits::parse(
        rate,
        &b.allowed_cidrs,
        b.zone.as_deref().unwrap_or(""),
    )?)
}

/// `expires_in` from JSON: a duration like "2h" or whole seconds.
fn expires_in_field(v: &Value) -> Result<std::time::Duration, ApiError> {
    let wrong = || {
        invalid(
            "expires_in",
            "must be a duration like \"2h\" or whole seconds",
        )
    };
    Ok(match v {
        Value::String(s) => domain::parse_expires_in(s)?,
        Value::Number(n) => {
            let secs = n.as_u64().ok_or_else(wrong)?;
            domain::check_lifetime(std::time::Duration::from_secs(secs))?
        }
        _ => return Err(wrong().into()),
    })
}

/// `POST /vault/keys`'s body, validated. Public for the fuzz checks in
/// `check`.
pub fn create_key_body(body: &[u8]) -> Result<NewKey, ApiError> {
    Ok(create_key_request(body)?.0)
}

/// `POST /vault/keys`'s body and how long it waits for proxies.
/// `POST /vault/keys`'s body, validated (the dashboard's mint form posts
/// the same fields).
pub(crate) fn create_key_request(
    body: &[u8],
) -> Result<(NewKey, Option<std::time::Duration>), ApiError> {
    let b: CreateKeyBody = parse_body(body)?;
    let expires_in = expires_in_field(&b.expires_in)?;
    let limits = key_limits(&b)?;
    let timeout = domain::parse_ack_timeout_ms(b.ack_timeout_ms)?;
    let key = NewKey::new(
        &b.vendor,
        &b.allowed_endpoints,
        usd_field("daily_usd_cap", &b.daily_usd_cap)?,
        b.per_call_usd_cap
            .as_ref()
            .map(|v| usd_field("per_call_usd_cap", v))
            .transpose()?,
        b.lifetime_usd_cap
            .as_ref()
            .map(|v| usd_field("lifetime_usd_cap", v))
            .transpose()?,
        expires_in,
        &b.agent_run_label,
        b.metadata,
        limits,
        b.parent_id.as_deref(),
    )?;
    Ok((key, timeout))
}

async fn create_key(State(c): Ctl, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    let auth = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let minter = c.authorize_mint(auth).await?;
    let (new, timeout) = create_key_request(&body)?;
    let (view, secret, confirmation) = c.mint_key(&minter, new, timeout).await?;
    let mut out = key_json(&view);
    out["key"] = json!(secret);
    out["confirmation"] = confirmation_json(&confirmation);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn get_key(
    State(c): Ctl,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::GetKey).await?;
    Ok(Json(key_json(&c.get_key(&caller.vendors, &id).await?)))
}

#[derive(Deserialize)]
struct ListKeysQuery {
    agent_run_label: Option<String>,
    vendor: Option<String>,
    #[serde(default)]
    include_inactive: bool,
}

async fn list_keys(
    State(c): Ctl,
    headers: HeaderMap,
    q: Result<Query<ListKeysQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::ListKeys).await?;
    let Query(q) = q.map_err(|e| ApiError::from(invalid("query", e.body_text())))?;
    let keys = c
        .list_keys(
            &caller.vendors,
            &KeyFilter {
                agent_run_label: q.agent_run_label,
                vendor: q.vendor,
                include_inactive: q.include_inactive,
            },
        )
        .await?;
    Ok(Json(
        json!({"keys": keys.iter().map(key_json).collect::<Vec<_>>()}),
    ))
}

/// Which proxies confirmed a change (see `service::Confirmation`).
fn confirmation_json(c: &Confirmation) -> Value {
    json!({
        "version": c.version,
        "all_confirmed": c.unconfirmed.is_empty(),
        "confirmed_nodes": c.confirmed,
        "unconfirmed_nodes": c.unconfirmed,
        "unconfirmed_lease_usd": usd(c.unconfirmed_lease),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckTimeoutQuery {
    #[serde(default)]
    ack_timeout_ms: u64,
}

async fn revoke_key(
    State(c): Ctl,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<AckTimeoutQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::RevokeKey).await?;
    let Query(q) = q.map_err(|e| ApiError::from(invalid("query", e.body_text())))?;
    let timeout = domain::parse_ack_timeout_ms(q.ack_timeout_ms)?;
    let (key, confirmation) = c.revoke_key(&caller.vendors, &id, timeout).await?;
    let mut out = key_json(&key);
    out["confirmation"] = confirmation_json(&confirmation);
    Ok(Json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRunBody {
    agent_run_label: String,
    #[serde(default)]
    ack_timeout_ms: u64,
}

async fn revoke_run(
    State(c): Ctl,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::RevokeRun).await?;
    let b: RevokeRunBody = parse_body(&body)?;
    let timeout = domain::parse_ack_timeout_ms(b.ack_timeout_ms)?;
    let (ids, confirmation) = c
        .revoke_run(&caller.vendors, &b.agent_run_label, timeout)
        .await?;
    Ok(Json(json!({
        "agent_run_label": b.agent_run_label,
        "revoked": ids.len(),
        "revoked_ids": ids,
        "confirmation": confirmation_json(&confirmation),
    })))
}

// --- admin tokens -------------------------------------------------------------

fn admin_token_json(t: &domain::AdminToken) -> Value {
    json!({
        "id": t.id,
        "name": t.name,
        "token_prefix": t.token_prefix,
        "scopes": t.scopes.names(),
        "vendors": t.vendors.list(),
        "status": t.status(Utc::now()).as_str(),
        "created_at": rfc3339(t.created_at),
        "expires_at": t.expires_at.map(rfc3339),
        "revoked_at": t.revoked_at.map(rfc3339),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAdminTokenBody {
    name: String,
    scopes: Vec<String>,
    /// Absent or empty: every vendor.
    #[serde(default)]
    vendors: Vec<String>,
    /// Absent or null: never expires.
    #[serde(default)]
    expires_in: Option<Value>,
}

async fn create_admin_token(
    State(c): Ctl,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = admin(&c, &headers, Operation::CreateAdminToken).await?;
    let b: CreateAdminTokenBody = parse_body(&body)?;
    let expires_in = match &b.expires_in {
        None | Some(Value::Null) => None,
        Some(v) => Some(expires_in_field(v)?),
    };
    let new = NewAdminToken::new(&b.name, &b.scopes, &b.vendors, expires_in)?;
    let (token, secret) = c.create_admin_token(&caller, new).await?;
    let mut out = admin_token_json(&token);
    out["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

#[derive(Deserialize)]
struct ListAdminTokensQuery {
    #[serde(default)]
    include_inactive: bool,
}

async fn list_admin_tokens(
    State(c): Ctl,
    headers: HeaderMap,
    q: Result<Query<ListAdminTokensQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::ListAdminTokens).await?;
    let Query(q) = q.map_err(|e| ApiError::from(invalid("query", e.body_text())))?;
    let tokens = c.list_admin_tokens(&caller, q.include_inactive).await?;
    Ok(Json(
        json!({"admin_tokens": tokens.iter().map(admin_token_json).collect::<Vec<_>>()}),
    ))
}

async fn revoke_admin_token(
    State(c): Ctl,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::RevokeAdminToken).await?;
    Ok(Json(admin_token_json(
        &c.revoke_admin_token(&caller, &id).await?,
    )))
}

// --- issuer tokens ------------------------------------------------------------

fn issuer_token_json(t: &domain::IssuerToken) -> Value {
    json!({
        "id": t.id,
        "key_id": t.key_id,
        "name": t.name,
        "token_prefix": t.token_prefix,
        "status": t.status(Utc::now()).as_str(),
        "created_at": rfc3339(t.created_at),
        "expires_at": t.expires_at.map(rfc3339),
        "revoked_at": t.revoked_at.map(rfc3339),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateIssuerTokenBody {
    name: String,
    /// Absent or null: lives as long as its key.
    #[serde(default)]
    expires_in: Option<Value>,
}

async fn create_issuer_token(
    State(c): Ctl,
    Path(key_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let caller = admin(&c, &headers, Operation::CreateIssuerToken).await?;
    let b: CreateIssuerTokenBody = parse_body(&body)?;
    let expires_in = match &b.expires_in {
        None | Some(Value::Null) => None,
        Some(v) => Some(expires_in_field(v)?),
    };
    let new = NewIssuerToken::new(&b.name, expires_in)?;
    let (token, secret) = c.create_issuer_token(&caller, &key_id, new).await?;
    let mut out = issuer_token_json(&token);
    out["token"] = json!(secret);
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

async fn list_issuer_tokens(
    State(c): Ctl,
    Path(key_id): Path<String>,
    headers: HeaderMap,
    q: Result<Query<ListAdminTokensQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::ListIssuerTokens).await?;
    let Query(q) = q.map_err(|e| ApiError::from(invalid("query", e.body_text())))?;
    let tokens = c
        .list_issuer_tokens(&caller, &key_id, q.include_inactive)
        .await?;
    Ok(Json(
        json!({"issuer_tokens": tokens.iter().map(issuer_token_json).collect::<Vec<_>>()}),
    ))
}

async fn revoke_issuer_token(
    State(c): Ctl,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::RevokeIssuerToken).await?;
    Ok(Json(issuer_token_json(
        &c.revoke_issuer_token(&caller, &id).await?,
    )))
}

#[derive(Deserialize)]
struct SpendQuery {
    agent_run_label: Option<String>,
}

async fn spend(
    State(c): Ctl,
    headers: HeaderMap,
    q: Result<Query<SpendQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::SpendSummary).await?;
    let Query(q) = q.map_err(|e| ApiError::from(invalid("query", e.body_text())))?;
    let label = q
        .agent_run_label
        .ok_or_else(|| invalid("agent_run_label", "query parameter is required"))?;
    let s = c.spend_summary(&caller.vendors, &label).await?;
    Ok(Json(json!({
        "agent_run_label": label,
        "total_usd": usd(s.total),
        "total_micros": s.total.0,
        "calls": s.calls,
        "vendors": s.vendors.iter().map(|(v, total, calls)| json!({
            "vendor": v, "total_usd": usd(*total), "total_micros": total.0, "calls": calls,
        })).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
struct AuditParams {
    key_id: Option<String>,
    agent_run_label: Option<String>,
    vendor: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
    /// Only the entries of the call with this trace id.
    trace_id: Option<String>,
    /// `key=value`: only entries whose context has this key with this value.
    context: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyParams {
    /// Start at this seq, trusting the prev_hash stored with it.
    from: Option<i64>,
}

#[derive(Serialize)]
struct VerifyAnswer {
    ok: bool,
    checked: u64,
    legacy: u64,
    head_seq: Option<i64>,
    head_hash: Option<String>,
    broken: Option<BrokenAnswer>,
    checkpoint_seq: Option<i64>,
}

#[derive(Serialize)]
struct BrokenAnswer {
    seq: i64,
    reason: &'static str,
    message: &'static str,
}

async fn verify_audit(
    State(c): Ctl,
    headers: HeaderMap,
    q: Result<Query<VerifyParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<VerifyAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::VerifyAudit).await?;
    let Query(p) = q.map_err(|e| ApiError::from(invalid("query", e.body_text())))?;
    let v = c.verify_audit(&caller.vendors, p.from).await?;
    Ok(Json(VerifyAnswer {
        ok: v.ok(),
        checked: v.checked,
        legacy: v.legacy,
        head_seq: v.head.map(|(seq, _)| seq),
        head_hash: v.head.map(|(_, h)| hex::encode(h)),
        broken: v.broken.map(|b| BrokenAnswer {
            seq: b.seq,
            reason: b.reason.as_str(),
            message: b.reason.describe(),
        }),
        checkpoint_seq: v.checkpoint_seq,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportParams {
    /// `jsonl` (default) or `csv`.
    format: Option<String>,
    /// RFC 3339: entries at or after this time.
    from: Option<String>,
    /// RFC 3339: entries before this time.
    to: Option<String>,
}

async fn export_audit(
    State(c): Ctl,
    headers: HeaderMap,
    q: Result<Query<ExportParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let caller = admin(&c, &headers, Operation::QueryAudit).await?;
    let Query(p) = q.map_err(|e| ApiError::from(invalid("query", e.body_text())))?;
    let format = ledger::export::Format::parse(p.format.as_deref().unwrap_or("jsonl"))
        .ok_or_else(|| ApiError::from(invalid("format", "must be jsonl or csv")))?;
    let since = p
        .from
        .as_deref()
        .map(|s| parse_time("from", s))
        .transpose()?;
    let until = p.to.as_deref().map(|s| parse_time("to", s)).transpose()?;
    let records = c.export_audit(&caller.vendors, format, since, until)?;
    // Errors after the first byte can only end the stream early: the
    // answer is already 200. The record count or a verify run tells.
    let body = axum::body::Body::from_stream(futures_util::TryStreamExt::map_err(records, |e| {
        tracing::error!(error = %e, "audit export stopped");
        std::io::Error::other("audit export stopped")
    }));
    Ok(([(http::header::CONTENT_TYPE, format.content_type())], body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointParams {
    limit: Option<u32>,
}

#[derive(Serialize)]
struct CheckpointAnswer {
    seq: i64,
    hash: String,
    at: String,
    public_key: String,
    signature: String,
}

async fn list_checkpoints(
    State(c): Ctl,
    headers: HeaderMap,
    q: Result<Query<CheckpointParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::ListCheckpoints).await?;
    let Query(p) = q.map_err(|e| ApiError::from(invalid("query", e.body_text())))?;
    let cps = c
        .ledger_checkpoints(&caller.vendors, p.limit.unwrap_or(100))
        .await?;
    let items: Vec<CheckpointAnswer> = cps
        .into_iter()
        .map(|cp| CheckpointAnswer {
            seq: cp.seq,
            hash: hex::encode(cp.hash),
            at: cp.at.to_rfc3339_opts(SecondsFormat::Micros, true),
            public_key: hex::encode(cp.public_key),
            signature: hex::encode(cp.signature),
        })
        .collect();
    Ok(Json(json!({ "checkpoints": items })))
}

fn parse_time(field: &'static str, s: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| invalid(field, "must be an RFC 3339 time like 2026-11-22T10:00:00Z").into())
}

async fn audit(
    State(c): Ctl,
    headers: HeaderMap,
    q: Result<Query<AuditParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let caller = admin(&c, &headers, Operation::QueryAudit).await?;
    let Query(p) = q.map_err(|e| ApiError::from(invalid("query", e.body_text())))?;
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(invalid("limit", "must be between 1 and 1000").into());
    }
    let query = AuditQuery {
        trace_id: p
            .trace_id
            .as_deref()
            .map(domain::parse_trace_filter)
            .transpose()?,
        context: p
            .context
            .as_deref()
            .map(domain::parse_context_filter)
            .transpose()?,
        key_id: p.key_id,
        agent_run_label: p.agent_run_label,
        vendor: p.vendor,
        vendors: None,
        since: p
            .since
            .as_deref()
            .map(|s| parse_time("since", s))
            .transpose()?,
        until: p
            .until
            .as_deref()
            .map(|s| parse_time("until", s))
            .transpose()?,
        before_seq: p
            .cursor
            .as_deref()
            .map(|s| {
                s.parse::<i64>()
                    .map_err(|_| invalid("cursor", "not a cursor from a previous page"))
            })
            .transpose()?,
        limit,
    };
    let entries = c.query_audit(&caller.vendors, &query).await?;
    let items: Vec<Value> = entries
        .iter()
        .map(|e| {
            let ev = &e.event;
            json!({
                "seq": e.seq,
                "event_id": ev.event_id,
                "key_id": ev.key_id,
                "agent_run_label": e.agent_run_label,
                "vendor": ev.vendor,
                "method": ev.method,
                "path": ev.path,
                "upstream_status": ev.upstream_status,
                "reserved_usd": usd(ev.reserved),
                "reserved_micros": ev.reserved.0,
                "cost_usd": usd(ev.cost),
                "cost_micros": ev.cost.0,
                "outcome": ev.outcome.as_str(),
                "at": ev.at.to_rfc3339_opts(SecondsFormat::Micros, true),
                "node_id": ev.node_id,
                "lease_id": ev.lease_id,
                "day": ev.day,
                "detail": serde_json::from_str::<Value>(&ev.detail_json).unwrap_or(Value::Null),
                "trace_id": ev.trace_id,
                "context": ev.context,
                "prev_hash": e.prev_hash.map(hex::encode),
                "hash": e.hash.map(hex::encode),
            })
        })
        .collect();
    Ok(Json(json!({
        "entries": items,
        "next_cursor": next_page_token(&entries, limit).map(|s| s.to_string()),
    })))
}
