//! REST/JSON front end under `/vault/*`, for automation platforms that
//! cannot speak gRPC (a Make.com HTTP module, n8n, Zapier). Same operations
//! as the gRPC admin API, same admin tokens and scopes (`scope::required`);
//! `POST /vault/keys` also takes an issuer token (children of its key only).
//! Bodies are parsed here into validated domain inputs; every failure is a
//! JSON error body with a stable code. Responses never carry a vendor
//! credential; a vault key or admin token secret appears only in the
//! response that minted it.
//!
//! Every request and answer body is a typed struct deriving `ToSchema`, and
//! every handler carries its `#[utoipa::path]`: `ApiDoc` collects them into
//! the OpenAPI document served at `GET /openapi.json` (checked in at
//! `docs/openapi.json`). A route added to `router` without a documented
//! handler fails `every_route_is_documented`.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

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
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, IntoResponses, OpenApi, ToSchema};

use crate::answers::*;
use crate::domain::{self, invalid, AuditQuery, KeyFilter};
use crate::error::ApiError;
use crate::grpc::next_page_token;
use crate::ledger;
use crate::scope::Operation;
use crate::service::{AdminPrincipal, Control, NewAdminToken, NewIssuerToken, NewKey, PutVendor};

pub mod approvals;
mod credentials;
mod hooks;
mod observe;
mod rolls;
mod simulate;
mod suggest;
pub mod webhooks;
pub use credentials::{CredentialAnswer, CredentialList, ProbeAnswer, PromoteAnswer};
pub use observe::EnforceKeyBody;
pub use rolls::RollKeyBody;
pub use simulate::SimulateAnswer;
pub use suggest::SuggestAnswer;
pub use webhooks::{CreateWebhookBody, DeliveryJson, WebhookJson};

type Ctl = State<Arc<Control>>;

/// The body of every error answer of the REST mapping (see
/// docs/api-conventions.md and docs/errors.md).
#[derive(Serialize, ToSchema)]
#[schema(example = json!({"error": "invalid_request", "field": "daily_usd_cap", "message": "daily_usd_cap: must be a number of US dollars"}))]
pub struct ErrorBody {
    /// The stable error code: `invalid_request`, `not_found`, `conflict`,
    /// `unauthenticated`, `missing_scope`, `vendor_not_allowed`,
    /// `issuer_scope` or `internal`.
    pub error: String,
    /// For `invalid_request`: the input that was refused, as this API
    /// spells it (a JSON body field, a query parameter, `body` or `query`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// What is wrong, for a person to read.
    pub message: String,
    /// For `missing_scope`: the scope the token lacks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// For `vendor_not_allowed`: the vendor the token may not act on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = ErrorBody {
            error: self.code().to_string(),
            field: None,
            message: self.to_string(),
            scope: None,
            vendor: None,
        };
        match &self {
            ApiError::Invalid(i) => body.field = Some(i.field.to_string()),
            ApiError::MissingScope(s) => body.scope = Some(s.as_str().to_string()),
            ApiError::VendorNotAllowed(v) => body.vendor = Some(v.clone()),
            _ => {}
        }
        let mut resp = (self.http_status(), Json(body)).into_response();
        if let ApiError::RateLimited { retry_after_secs } = self {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, retry_after_secs.into());
        }
        resp
    }
}

/// The error answers every documented operation may give, all in the one
/// `ErrorBody` shape.
#[derive(IntoResponses)]
#[allow(dead_code)] // describes answers; never built
pub(crate) enum ErrorAnswers {
    /// An input was refused (`invalid_request`; `field` names it).
    #[response(status = 400)]
    Invalid(ErrorBody),
    /// Missing or wrong token (`unauthenticated`).
    #[response(status = 401)]
    Unauthenticated(ErrorBody),
    /// The token may not do this (`missing_scope`, `vendor_not_allowed`,
    /// `issuer_scope`).
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// No such vendor, key or token, or not visible to this token
    /// (`not_found`).
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The change contradicts what is stored (`conflict`).
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// A failure inside keycap (`internal`); details are in its log only.
    #[response(status = 500)]
    Internal(ErrorBody),
}

/// An answer sent as a JSON object with its keys in sorted order, as the
/// REST mapping has always written them (`serde_json::Value`'s map is
/// sorted), so a typed answer is byte for byte the body it replaced.
struct Answer<T>(StatusCode, T);

impl<T: Serialize> Answer<T> {
    fn ok(body: T) -> Self {
        Answer(StatusCode::OK, body)
    }

    fn created(body: T) -> Self {
        Answer(StatusCode::CREATED, body)
    }
}

impl<T: Serialize> IntoResponse for Answer<T> {
    fn into_response(self) -> Response {
        match serde_json::to_value(&self.1) {
            Ok(v) => (self.0, Json(v)).into_response(),
            Err(e) => {
                tracing::error!(error = %e, "an answer did not serialize");
                ApiError::Internal.into_response()
            }
        }
    }
}

/// A US dollar amount as a request gives it: a JSON number or a decimal
/// string, parsed exactly (never through a float).
fn usd_input_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Number, Type::String]))
        .description(Some(
            "US dollars: a number or a decimal string such as \"12.50\"",
        ))
        .examples([json!("12.50")])
        .into()
}

/// Like `usd_input_schema`, also null (absent: no such cap).
pub(crate) fn optional_usd_input_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([
            Type::Number,
            Type::String,
            Type::Null,
        ]))
        .description(Some(
            "US dollars: a number or a decimal string; absent or null for no such cap",
        ))
        .into()
}

/// A duration as a request gives it.
fn duration_input_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Integer]))
        .description(Some(
            "A duration like \"90s\", \"15m\", \"2h\", \"7d\" (or a sum such as \"1h30m\"), or whole seconds",
        ))
        .examples([json!("2h")])
        .into()
}

/// Like `duration_input_schema`, also null.
fn optional_duration_input_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([
            Type::String,
            Type::Integer,
            Type::Null,
        ]))
        .description(Some(
            "A duration like \"2h\" or whole seconds; absent or null for no expiry of its own",
        ))
        .into()
}

/// Calls per minute as a request gives it.
fn rate_input_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Integer, Type::Null]))
        .description(Some(
            "Calls per minute through one proxy; absent, null or 0: no limit",
        ))
        .into()
}

/// Bearer admin tokens on every operation.
struct AdminTokenAuth;

impl utoipa::Modify for AdminTokenAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An admin token (`kcadm_...`); `POST /vault/keys` also takes an issuer token (`kciss_...`)",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI 3.1 document of the REST mapping.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "keycap REST API",
        description = "The REST/JSON mapping of keycap's admin API under /vault/*: vendors, vault keys, issuer and admin tokens, the audit ledger and spend. Every error answer is an ErrorBody with a stable code (docs/errors.md); money and status names follow docs/api-conventions.md.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        list_vendors, put_vendor, get_vendor, delete_vendor, import_vendor_prices,
        create_key, list_keys, revoke_run, get_key, revoke_key,
        create_issuer_token, list_issuer_tokens, revoke_issuer_token,
        create_admin_token, list_admin_tokens, revoke_admin_token,
        spend, audit, verify_audit, list_checkpoints, export_audit, openapi_json,
        webhooks::create, webhooks::list, webhooks::read, webhooks::remove, webhooks::test,
        webhooks::deliveries, simulate::simulate,
        hooks::create, hooks::list, hooks::read, hooks::remove, hooks::add_secret,
        hooks::remove_secret,
        approvals::list, approvals::read, approvals::approve, approvals::deny,
        suggest::suggest,
        credentials::stage, credentials::list, credentials::probe, credentials::promote,
        rolls::roll,
        observe::enforce,
    ),
    components(schemas(ErrorBody)),
    modifiers(&AdminTokenAuth),
    security(("admin_token" = [])),
    tags(
        (name = "vendors", description = "Vendors and their real credentials (never shown)"),
        (name = "keys", description = "Vault keys and their issuer tokens"),
        (name = "webhooks", description = "Alert webhook endpoints and their deliveries (docs/webhooks.md)"),
        (name = "hooks", description = "Inbound hooks: vendor webhooks verified at the proxy and relayed (docs/inbound-hooks.md)"),
        (name = "approvals", description = "Calls held for a person's approval (docs/approvals.md)"),
        (name = "admin-tokens", description = "Admin tokens and their scopes"),
        (name = "audit", description = "The hash-chained audit ledger and spend"),
        (name = "meta", description = "This document"),
    ),
)]
pub struct ApiDoc;

/// The document as served and as checked in at docs/openapi.json: pretty
/// JSON with a final newline.
pub fn openapi_document() -> String {
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serializes");
    text.push('\n');
    text
}

static OPENAPI_DOCUMENT: LazyLock<String> = LazyLock::new(openapi_document);

/// `GET /openapi.json`: this document; no token needed.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    operation_id = "openapi",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of the REST mapping", content_type = "application/json", body = Object)),
)]
async fn openapi_json() -> Response {
    (
        [(http::header::CONTENT_TYPE, "application/json")],
        OPENAPI_DOCUMENT.as_str(),
    )
        .into_response()
}

pub fn router(control: Arc<Control>) -> Router {
    Router::new()
        .route("/openapi.json", get(openapi_json))
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
        .merge(simulate::routes())
        .merge(hooks::routes())
        .merge(approvals::routes())
        .merge(suggest::routes())
        .merge(credentials::routes())
        .merge(rolls::routes())
        .merge(observe::routes())
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/livez", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route(
            "/vault/{*rest}",
            axum::routing::any(|| async {
                ApiError::NotFound("no such endpoint".to_string()).into_response()
            }),
        )
        .route_layer(axum::middleware::from_fn(rest_span))
        .with_state(control)
}

/// One server span per REST call, continuing the caller's W3C trace from
/// its `traceparent` (an admin's revocation joins the admin's trace), named
/// by the route template (`DELETE /vault/keys/{id}`), never the raw path
/// or query. Health probes get none.
async fn rest_span(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    if !route.starts_with("/vault") {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let span = tracing::info_span!(
        "rest call",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    keycap_telemetry::continue_trace(&span, req.headers());
    let resp = tracing::Instrument::instrument(next.run(req), span.clone()).await;
    span.record("http.response.status_code", resp.status().as_u16());
    resp
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

/// Query parameters, or an `invalid_request` naming the query.
fn query<T>(q: Result<Query<T>, axum::extract::rejection::QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::from(invalid("query", e.body_text())))
}

type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

/// A USD amount from JSON: a number or a decimal string, parsed exactly.
pub(crate) fn usd_field(field: &'static str, v: &Value) -> Result<Micros, ApiError> {
    let text = match v {
        Value::Number(n) => n.to_string(),
        Value::String(s) => s.clone(),
        _ => return Err(invalid(field, "must be a number of US dollars").into()),
    };
    Micros::parse_usd(&text).map_err(|e| ApiError::from(invalid(field, e.to_string())))
}

// --- vendors ------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"profile": "stripe", "base_url": "https://api.stripe.com", "credential": "sk_live_..."}))]
pub struct PutVendorBody {
    /// The vendor profile (`openai`, `anthropic`, `stripe`, ...).
    profile: String,
    /// The vendor's API base URL; `https://` unless the control plane
    /// allows private upstreams.
    base_url: String,
    /// The real API key; required when the vendor is created, absent to
    /// keep the stored one.
    #[serde(default)]
    credential: Option<String>,
    /// Exchange rates to USD, as decimal strings.
    #[serde(default)]
    currency_rates: BTreeMap<String, String>,
    /// The operator's price table, as a JSON object in the profile's table
    /// format; absent or null for the shipped prices.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    prices: Option<Value>,
    /// Forward the agent's W3C trace context to the vendor; absent: off.
    #[serde(default)]
    forward_trace_context: bool,
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
    .forwarding_trace_context(b.forward_trace_context)
    .with_rotate_after(b.rotate_after.as_deref().unwrap_or(""))?;
    Ok((put, domain::parse_ack_timeout_ms(b.ack_timeout_ms)?))
}

/// Creates or replaces a vendor (scopes `vendors:write`, and
/// `credentials:write` to set its credential).
#[utoipa::path(
    put,
    path = "/vault/vendors/{name}",
    tag = "vendors",
    operation_id = "put_vendor",
    params(("name" = String, Path, description = "The vendor's name, the proxy's first path segment")),
    request_body = PutVendorBody,
    responses(
        (status = 200, description = "Replaced", body = PutVendorAnswer),
        (status = 201, description = "Created", body = PutVendorAnswer),
        ErrorAnswers,
    ),
)]
async fn put_vendor(
    State(c): Ctl,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer<PutVendorAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::PutVendor).await?;
    let (put, timeout) = put_vendor_request(&name, &body)?;
    caller.require(c.vendor_put_operation(&put).await?)?;
    let (v, created, confirmation) = c.put_vendor(&caller.vendors, put, timeout).await?;
    let versions = c.list_credentials(&caller.vendors, v.name.as_str()).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(Answer(
        status,
        PutVendorAnswer {
            vendor: VendorAnswer::written_with_versions(&v, &versions),
            confirmation: (&confirmation).into(),
        },
    ))
}

/// The largest LiteLLM price file the import takes (REST body, gRPC
/// message): the whole file is about 3.5 MB; the body limit of every other
/// route stays axum's 2 MB.
pub const MAX_PRICE_FILE_BYTES: usize = 16 * 1024 * 1024;

/// Replaces a vendor's price table with the prices of LiteLLM's price file
/// (`model_prices_and_context_window.json` as published), for the models of
/// this vendor's profile.
#[utoipa::path(
    post,
    path = "/vault/vendors/{name}/prices/import",
    tag = "vendors",
    operation_id = "import_vendor_prices",
    params(("name" = String, Path, description = "The vendor's name")),
    request_body(content = Object, description = "LiteLLM's price file, as published", content_type = "application/json"),
    responses(
        (status = 200, description = "The vendor with its new prices, and what was priced and skipped", body = ImportAnswer),
        ErrorAnswers,
    ),
)]
async fn import_vendor_prices(
    State(c): Ctl,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer<ImportAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::ImportVendorPrices).await?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::from(invalid("body", "must be UTF-8 JSON text")))?;
    let (v, report) = c.import_vendor_prices(&caller.vendors, &name, text).await?;
    Ok(Answer::ok(ImportAnswer {
        vendor: VendorAnswer::written(&v),
        report: report.into(),
    }))
}

/// One vendor, with the proxies that cannot load it.
#[utoipa::path(
    get,
    path = "/vault/vendors/{name}",
    tag = "vendors",
    operation_id = "get_vendor",
    params(("name" = String, Path, description = "The vendor's name")),
    responses((status = 200, description = "The vendor", body = VendorAnswer), ErrorAnswers),
)]
async fn get_vendor(
    State(c): Ctl,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Answer<VendorAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::GetVendor).await?;
    Ok(Answer::ok(VendorAnswer::view(
        &c.get_vendor(&caller.vendors, &name).await?,
    )))
}

/// Every vendor this token may see.
#[utoipa::path(
    get,
    path = "/vault/vendors",
    tag = "vendors",
    operation_id = "list_vendors",
    responses((status = 200, description = "The vendors", body = VendorList), ErrorAnswers),
)]
async fn list_vendors(State(c): Ctl, headers: HeaderMap) -> Result<Answer<VendorList>, ApiError> {
    let caller = admin(&c, &headers, Operation::ListVendors).await?;
    let vs = c.list_vendors(&caller.vendors).await?;
    Ok(Answer::ok(VendorList {
        vendors: vs.iter().map(VendorAnswer::view).collect(),
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AckTimeoutQuery {
    /// How long to wait for the proxies to confirm; absent or 0: the
    /// control plane's default.
    #[serde(default)]
    ack_timeout_ms: u64,
}

/// Deletes a vendor with its credential; refused while keys name it.
#[utoipa::path(
    delete,
    path = "/vault/vendors/{name}",
    tag = "vendors",
    operation_id = "delete_vendor",
    params(("name" = String, Path, description = "The vendor's name"), AckTimeoutQuery),
    responses((status = 200, description = "Deleted", body = DeletedVendor), ErrorAnswers),
)]
async fn delete_vendor(
    State(c): Ctl,
    Path(name): Path<String>,
    headers: HeaderMap,
    q: QueryResult<AckTimeoutQuery>,
) -> Result<Answer<DeletedVendor>, ApiError> {
    let caller = admin(&c, &headers, Operation::DeleteVendor).await?;
    let q = query(q)?;
    let timeout = domain::parse_ack_timeout_ms(q.ack_timeout_ms)?;
    let confirmation = c.delete_vendor(&caller.vendors, &name, timeout).await?;
    Ok(Answer::ok(DeletedVendor {
        deleted: name,
        confirmation: (&confirmation).into(),
    }))
}

// --- keys ---------------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"vendor": "openai", "daily_usd_cap": "5", "allowed_endpoints": ["POST /v1/chat/completions"], "expires_in": "1h", "agent_run_label": "agent/7"}))]
pub struct CreateKeyBody {
    /// The vendor the key spends at.
    vendor: String,
    #[schema(schema_with = usd_input_schema)]
    daily_usd_cap: Value,
    #[serde(default)]
    #[schema(schema_with = optional_usd_input_schema)]
    per_call_usd_cap: Option<Value>,
    #[serde(default)]
    #[schema(schema_with = optional_usd_input_schema)]
    lifetime_usd_cap: Option<Value>,
    /// `METHOD /path` patterns with `*` globs, e.g. `POST /v1/chat/completions`.
    allowed_endpoints: Vec<String>,
    #[schema(schema_with = duration_input_schema)]
    expires_in: Value,
    /// The agent run the key belongs to; revoke a whole run by it.
    agent_run_label: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    /// Calls per minute through one proxy; absent, null or 0: no limit.
    #[serde(default)]
    #[schema(schema_with = rate_input_schema)]
    rate_limit_per_minute: Option<Value>,
    /// Client addresses allowed to use the key (CIDRs); empty: any.
    #[serde(default)]
    allowed_cidrs: Vec<String>,
    /// Only proxies of this zone serve the key; absent: any.
    #[serde(default)]
    zone: Option<String>,
    /// The key to mint this one under; absent or null for a root key.
    #[serde(default)]
    parent_id: Option<String>,
    /// How long to wait for the proxies to serve the key; absent or 0: the
    /// control plane's default.
    #[serde(default)]
    ack_timeout_ms: u64,
    /// Calls reserving more than this need a person's approval
    /// (docs/approvals.md); absent, null or 0: none (a child keeps its
    /// parent's, or a lower one).
    #[serde(default)]
    #[schema(schema_with = optional_usd_input_schema)]
    approval_above_usd: Option<Value>,
    /// `enforce` (absent: the default) or `observe` (docs/observe.md): the
    /// caps, endpoints and rate limit then only mark the calls they would
    /// refuse, and `observe_ceiling_usd` is what the key may spend a day.
    #[serde(default)]
    mode: Option<String>,
    /// Observe mode's hard daily ceiling; required with `"mode": "observe"`.
    #[serde(default)]
    #[schema(schema_with = optional_usd_input_schema)]
    observe_ceiling_usd: Option<Value>,
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
            .filter(|v| !v.is_null())
            .map(|v| usd_field("per_call_usd_cap", v))
            .transpose()?,
        b.lifetime_usd_cap
            .as_ref()
            .filter(|v| !v.is_null())
            .map(|v| usd_field("lifetime_usd_cap", v))
            .transpose()?,
        expires_in,
        &b.agent_run_label,
        b.metadata,
        limits,
        b.parent_id.as_deref(),
    )?
    .with_approval_above(
        b.approval_above_usd
            .as_ref()
            .filter(|v| !v.is_null())
            .map(|v| usd_field("approval_above_usd", v))
            .transpose()?,
    )?
    .with_mode(
        b.mode.as_deref().unwrap_or(""),
        b.observe_ceiling_usd
            .as_ref()
            .filter(|v| !v.is_null())
            .map(|v| usd_field("observe_ceiling_usd", v))
            .transpose()?,
    )?;
    Ok((key, timeout))
}

/// Mints a vault key (scope `keys:issue`, or an issuer token for a child
/// of its key). The answer carries the secret, this once.
#[utoipa::path(
    post,
    path = "/vault/keys",
    tag = "keys",
    operation_id = "create_key",
    request_body = CreateKeyBody,
    responses((status = 201, description = "Minted", body = CreatedKeyAnswer), ErrorAnswers),
)]
async fn create_key(
    State(c): Ctl,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer<CreatedKeyAnswer>, ApiError> {
    let auth = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let minter = c.authorize_mint(auth).await?;
    let (new, timeout) = create_key_request(&body)?;
    let (view, secret, confirmation) = c.mint_key(&minter, new, timeout).await?;
    Ok(Answer::created(CreatedKeyAnswer {
        info: (&view).into(),
        key: secret,
        confirmation: (&confirmation).into(),
    }))
}

/// One key with today's spend.
#[utoipa::path(
    get,
    path = "/vault/keys/{id}",
    tag = "keys",
    operation_id = "get_key",
    params(("id" = String, Path, description = "The key's id")),
    responses((status = 200, description = "The key", body = KeyAnswer), ErrorAnswers),
)]
async fn get_key(
    State(c): Ctl,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Answer<KeyAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::GetKey).await?;
    Ok(Answer::ok((&c.get_key(&caller.vendors, &id).await?).into()))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListKeysQuery {
    /// Only the keys of this agent run.
    agent_run_label: Option<String>,
    /// Only the keys of this vendor.
    vendor: Option<String>,
    /// Also expired and revoked keys.
    #[serde(default)]
    include_inactive: bool,
}

/// The keys this token may see, active ones unless asked otherwise.
#[utoipa::path(
    get,
    path = "/vault/keys",
    tag = "keys",
    operation_id = "list_keys",
    params(ListKeysQuery),
    responses((status = 200, description = "The keys", body = KeyList), ErrorAnswers),
)]
async fn list_keys(
    State(c): Ctl,
    headers: HeaderMap,
    q: QueryResult<ListKeysQuery>,
) -> Result<Answer<KeyList>, ApiError> {
    let caller = admin(&c, &headers, Operation::ListKeys).await?;
    let q = query(q)?;
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
    Ok(Answer::ok(KeyList {
        keys: keys.iter().map(KeyAnswer::from).collect(),
    }))
}

/// Revokes a key; answers once the proxies confirmed they stopped serving
/// it, or the wait ended (`confirmation` tells which).
#[utoipa::path(
    delete,
    path = "/vault/keys/{id}",
    tag = "keys",
    operation_id = "revoke_key",
    params(("id" = String, Path, description = "The key's id"), AckTimeoutQuery),
    responses((status = 200, description = "Revoked", body = RevokedKeyAnswer), ErrorAnswers),
)]
async fn revoke_key(
    State(c): Ctl,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: QueryResult<AckTimeoutQuery>,
) -> Result<Answer<RevokedKeyAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::RevokeKey).await?;
    let q = query(q)?;
    let timeout = domain::parse_ack_timeout_ms(q.ack_timeout_ms)?;
    let (key, confirmation) = c.revoke_key(&caller.vendors, &id, timeout).await?;
    Ok(Answer::ok(RevokedKeyAnswer {
        info: (&key).into(),
        confirmation: (&confirmation).into(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"agent_run_label": "agent/7"}))]
pub struct RevokeRunBody {
    agent_run_label: String,
    /// How long to wait for the proxies to confirm; absent or 0: the
    /// control plane's default.
    #[serde(default)]
    ack_timeout_ms: u64,
}

/// Revokes every key of an agent run.
#[utoipa::path(
    post,
    path = "/vault/keys/revoke",
    tag = "keys",
    operation_id = "revoke_run",
    request_body = RevokeRunBody,
    responses((status = 200, description = "Revoked", body = RunRevocationAnswer), ErrorAnswers),
)]
async fn revoke_run(
    State(c): Ctl,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer<RunRevocationAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::RevokeRun).await?;
    let b: RevokeRunBody = parse_body(&body)?;
    let timeout = domain::parse_ack_timeout_ms(b.ack_timeout_ms)?;
    let (ids, confirmation) = c
        .revoke_run(&caller.vendors, &b.agent_run_label, timeout)
        .await?;
    Ok(Answer::ok(RunRevocationAnswer {
        agent_run_label: b.agent_run_label,
        revoked: ids.len(),
        revoked_ids: ids,
        confirmation: (&confirmation).into(),
    }))
}

// --- admin tokens -------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "make issuer", "scopes": ["keys:issue", "keys:revoke"], "vendors": ["stripe"], "expires_in": "30d"}))]
pub struct CreateAdminTokenBody {
    name: String,
    /// Scope names (`keys:issue`, `audit:read`, `admin`, ...; see
    /// docs/scopes.md).
    scopes: Vec<String>,
    /// Absent or empty: every vendor.
    #[serde(default)]
    vendors: Vec<String>,
    /// Absent or null: never expires.
    #[serde(default)]
    #[schema(schema_with = optional_duration_input_schema)]
    expires_in: Option<Value>,
}

/// Mints an admin token, at most as powerful as the caller's (scope
/// `tokens:write`). The answer carries the secret, this once.
#[utoipa::path(
    post,
    path = "/vault/admin-tokens",
    tag = "admin-tokens",
    operation_id = "create_admin_token",
    request_body = CreateAdminTokenBody,
    responses((status = 201, description = "Minted", body = CreatedAdminTokenAnswer), ErrorAnswers),
)]
async fn create_admin_token(
    State(c): Ctl,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer<CreatedAdminTokenAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::CreateAdminToken).await?;
    let b: CreateAdminTokenBody = parse_body(&body)?;
    let expires_in = match &b.expires_in {
        None | Some(Value::Null) => None,
        Some(v) => Some(expires_in_field(v)?),
    };
    let new = NewAdminToken::new(&b.name, &b.scopes, &b.vendors, expires_in)?;
    let (token, secret) = c.create_admin_token(&caller, new).await?;
    Ok(Answer::created(CreatedAdminTokenAnswer {
        info: (&token).into(),
        token: secret,
    }))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct IncludeInactiveQuery {
    /// Also expired and revoked tokens.
    #[serde(default)]
    include_inactive: bool,
}

/// The admin tokens (scope `tokens:read`).
#[utoipa::path(
    get,
    path = "/vault/admin-tokens",
    tag = "admin-tokens",
    operation_id = "list_admin_tokens",
    params(IncludeInactiveQuery),
    responses((status = 200, description = "The admin tokens", body = AdminTokenList), ErrorAnswers),
)]
async fn list_admin_tokens(
    State(c): Ctl,
    headers: HeaderMap,
    q: QueryResult<IncludeInactiveQuery>,
) -> Result<Answer<AdminTokenList>, ApiError> {
    let caller = admin(&c, &headers, Operation::ListAdminTokens).await?;
    let q = query(q)?;
    let tokens = c.list_admin_tokens(&caller, q.include_inactive).await?;
    Ok(Answer::ok(AdminTokenList {
        admin_tokens: tokens.iter().map(AdminTokenAnswer::from).collect(),
    }))
}

/// Revokes an admin token (scope `tokens:write`).
#[utoipa::path(
    delete,
    path = "/vault/admin-tokens/{id}",
    tag = "admin-tokens",
    operation_id = "revoke_admin_token",
    params(("id" = String, Path, description = "The admin token's id")),
    responses((status = 200, description = "Revoked", body = AdminTokenAnswer), ErrorAnswers),
)]
async fn revoke_admin_token(
    State(c): Ctl,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Answer<AdminTokenAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::RevokeAdminToken).await?;
    Ok(Answer::ok(
        (&c.revoke_admin_token(&caller, &id).await?).into(),
    ))
}

// --- issuer tokens ------------------------------------------------------------

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "make checkout", "expires_in": "30d"}))]
pub struct CreateIssuerTokenBody {
    name: String,
    /// Absent or null: lives as long as its key.
    #[serde(default)]
    #[schema(schema_with = optional_duration_input_schema)]
    expires_in: Option<Value>,
}

/// Mints an issuer token for a key: it mints child keys of that key, within
/// its caps, and nothing else.
#[utoipa::path(
    post,
    path = "/vault/keys/{id}/issuer-tokens",
    tag = "keys",
    operation_id = "create_issuer_token",
    params(("id" = String, Path, description = "The key's id")),
    request_body = CreateIssuerTokenBody,
    responses((status = 201, description = "Minted", body = CreatedIssuerTokenAnswer), ErrorAnswers),
)]
async fn create_issuer_token(
    State(c): Ctl,
    Path(key_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer<CreatedIssuerTokenAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::CreateIssuerToken).await?;
    let b: CreateIssuerTokenBody = parse_body(&body)?;
    let expires_in = match &b.expires_in {
        None | Some(Value::Null) => None,
        Some(v) => Some(expires_in_field(v)?),
    };
    let new = NewIssuerToken::new(&b.name, expires_in)?;
    let (token, secret) = c.create_issuer_token(&caller, &key_id, new).await?;
    Ok(Answer::created(CreatedIssuerTokenAnswer {
        info: (&token).into(),
        token: secret,
    }))
}

/// A key's issuer tokens.
#[utoipa::path(
    get,
    path = "/vault/keys/{id}/issuer-tokens",
    tag = "keys",
    operation_id = "list_issuer_tokens",
    params(("id" = String, Path, description = "The key's id"), IncludeInactiveQuery),
    responses((status = 200, description = "The issuer tokens", body = IssuerTokenList), ErrorAnswers),
)]
async fn list_issuer_tokens(
    State(c): Ctl,
    Path(key_id): Path<String>,
    headers: HeaderMap,
    q: QueryResult<IncludeInactiveQuery>,
) -> Result<Answer<IssuerTokenList>, ApiError> {
    let caller = admin(&c, &headers, Operation::ListIssuerTokens).await?;
    let q = query(q)?;
    let tokens = c
        .list_issuer_tokens(&caller, &key_id, q.include_inactive)
        .await?;
    Ok(Answer::ok(IssuerTokenList {
        issuer_tokens: tokens.iter().map(IssuerTokenAnswer::from).collect(),
    }))
}

/// Revokes an issuer token.
#[utoipa::path(
    delete,
    path = "/vault/issuer-tokens/{id}",
    tag = "keys",
    operation_id = "revoke_issuer_token",
    params(("id" = String, Path, description = "The issuer token's id")),
    responses((status = 200, description = "Revoked", body = IssuerTokenAnswer), ErrorAnswers),
)]
async fn revoke_issuer_token(
    State(c): Ctl,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Answer<IssuerTokenAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::RevokeIssuerToken).await?;
    Ok(Answer::ok(
        (&c.revoke_issuer_token(&caller, &id).await?).into(),
    ))
}

// --- audit and spend ----------------------------------------------------------

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SpendQuery {
    /// Alone: the run's spend per vendor (the summary). With any of the
    /// others: only that run's entries in the report.
    agent_run_label: Option<String>,
    /// Comma-separated: any of `run_label`, `key`, `vendor`, `day`.
    group_by: Option<String>,
    /// RFC 3339 time or UTC day `YYYY-MM-DD`: entries at or after it.
    from: Option<String>,
    /// RFC 3339 time or UTC day `YYYY-MM-DD`: entries before it.
    to: Option<String>,
    /// The top N groups by spend; default every group up to 10000.
    top: Option<u32>,
}

/// A report bound: an RFC 3339 time, or a UTC day (its midnight).
fn parse_bound(field: &'static str, s: &str) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(day) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(day.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            invalid(
                field,
                "must be an RFC 3339 time like 2026-11-22T10:00:00Z or a day like 2026-11-22",
            )
            .into()
        })
}

/// What an agent run spent, in total and per vendor; or, with `group_by`,
/// `from`, `to` or `top`, a spend report over the ledger (scope
/// `audit:read`).
#[utoipa::path(
    get,
    path = "/vault/spend",
    tag = "audit",
    operation_id = "spend",
    params(SpendQuery),
    responses((status = 200, description = "The run's spend, or the report", body = SpendResult), ErrorAnswers),
)]
async fn spend(
    State(c): Ctl,
    headers: HeaderMap,
    q: QueryResult<SpendQuery>,
) -> Result<Answer<SpendResult>, ApiError> {
    let caller = admin(&c, &headers, Operation::SpendSummary).await?;
    let q = query(q)?;
    let report = q.group_by.is_some() || q.from.is_some() || q.to.is_some() || q.top.is_some();
    if !report {
        let label = q.agent_run_label.ok_or_else(|| {
            invalid(
                "agent_run_label",
                "query parameter is required (or group_by, from, to, top for a report)",
            )
        })?;
        let s = c.spend_summary(&caller.vendors, &label).await?;
        return Ok(Answer::ok(SpendResult::Summary(SpendAnswer {
            agent_run_label: label,
            total_usd: Usd(s.total),
            total_micros: s.total.0,
            calls: s.calls,
            vendors: s
                .vendors
                .iter()
                .map(|(vendor, total, calls)| VendorSpendAnswer {
                    vendor: vendor.clone(),
                    total_usd: Usd(*total),
                    total_micros: total.0,
                    calls: *calls,
                })
                .collect(),
        })));
    }
    if q.top == Some(0) {
        return Err(invalid("top", "must be between 1 and 10000").into());
    }
    let since = q
        .from
        .as_deref()
        .map(|s| parse_bound("from", s))
        .transpose()?;
    let until = q.to.as_deref().map(|s| parse_bound("to", s)).transpose()?;
    let query = domain::SpendReportQuery {
        group_by: domain::SpendDimension::parse_list(q.group_by.as_deref())?,
        since,
        until,
        agent_run_label: q.agent_run_label,
        vendors: None,
        top: q.top.unwrap_or(0),
    };
    let r = c.spend_report(&caller.vendors, &query).await?;
    let time = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true));
    Ok(Answer::ok(SpendResult::Report(SpendReportAnswer {
        group_by: query.group_by.iter().map(|d| d.as_str()).collect(),
        from: time(since),
        to: time(until),
        groups: r
            .groups
            .into_iter()
            .map(|g| SpendGroupAnswer {
                agent_run_label: g.agent_run_label,
                key_id: g.key_id,
                vendor: g.vendor,
                day: g.day,
                total_usd: Usd(g.total),
                total_micros: g.total.0,
                calls: g.calls,
                refused_calls: g.refused_calls,
                would_refuse_calls: g.would_refuse_calls,
                would_refuse_usd: Usd(g.would_refuse),
            })
            .collect(),
        total_usd: Usd(r.total),
        total_micros: r.total.0,
        calls: r.calls,
        refused_calls: r.refused_calls,
        more: r.more,
        would_refuse_calls: r.would_refuse_calls,
        would_refuse_usd: Usd(r.would_refuse),
    })))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditParams {
    key_id: Option<String>,
    agent_run_label: Option<String>,
    vendor: Option<String>,
    /// RFC 3339: entries at or after this time.
    since: Option<String>,
    /// RFC 3339: entries before this time.
    until: Option<String>,
    /// Entries per page, 1 to 1000 (default 100).
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Only the entries of the call with this trace id.
    trace_id: Option<String>,
    /// `key=value`: only entries whose context has this key with this value.
    context: Option<String>,
    /// Only entries with this outcome (`refused`: the recorded refusals).
    outcome: Option<String>,
    /// Only refusal entries refused with this error code.
    refusal_reason: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct VerifyParams {
    /// Start at this seq, trusting the prev_hash stored with it.
    from: Option<i64>,
    /// A checkpoint kept from earlier, `SEQ:HASH` (hash as 64 hex digits):
    /// the entry `SEQ` must still be in the ledger with that hash.
    checkpoint: Option<String>,
}

/// Recomputes the audit ledger's hash chain and holds its end against the
/// latest checkpoint keycap signed, and against a checkpoint the caller
/// kept, if given (scope `audit:read`).
#[utoipa::path(
    get,
    path = "/vault/audit/verify",
    tag = "audit",
    operation_id = "verify_audit",
    params(VerifyParams),
    responses((status = 200, description = "The verdict; `ok` false names the first broken entry", body = VerifyAnswer), ErrorAnswers),
)]
async fn verify_audit(
    State(c): Ctl,
    headers: HeaderMap,
    q: QueryResult<VerifyParams>,
) -> Result<Json<VerifyAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::VerifyAudit).await?;
    let p = query(q)?;
    // Empty, as an unset gRPC field: no kept checkpoint.
    let held = p.checkpoint.as_deref().filter(|s| !s.is_empty());
    let v = c.verify_audit(&caller.vendors, p.from, held).await?;
    Ok(Json(VerifyAnswer {
        ok: v.ok(),
        checked: v.checked,
        legacy: v.legacy,
        head_seq: v.head.map(|(seq, _)| seq),
        head_hash: v.head.map(|(_, h)| hex::encode(h)),
        broken: v.broken.map(|b| BrokenAnswer {
            seq: b.seq,
            reason: b.reason.as_str().to_string(),
            message: b.reason.describe().to_string(),
        }),
        checkpoint_seq: v.checkpoint_seq,
    }))
}

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ExportParams {
    /// `jsonl` (default) or `csv`.
    format: Option<String>,
    /// RFC 3339: entries at or after this time.
    from: Option<String>,
    /// RFC 3339: entries before this time.
    to: Option<String>,
}

/// Streams the audit ledger, oldest first, as JSON lines or CSV (scope
/// `audit:read`).
#[utoipa::path(
    get,
    path = "/vault/audit/export",
    tag = "audit",
    operation_id = "export_audit",
    params(ExportParams),
    responses(
        (status = 200, description = "The entries, one per line", content(
            (String = "application/jsonl"),
            (String = "text/csv; charset=utf-8"),
        )),
        ErrorAnswers,
    ),
)]
async fn export_audit(
    State(c): Ctl,
    headers: HeaderMap,
    q: QueryResult<ExportParams>,
) -> Result<Response, ApiError> {
    let caller = admin(&c, &headers, Operation::QueryAudit).await?;
    let p = query(q)?;
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

#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct CheckpointParams {
    /// At most this many, newest first (default 100).
    limit: Option<u32>,
}

/// The ledger's signed checkpoints, newest first: those signed by a key
/// keycap's master key opens, the ones verify trusts (scope `audit:read`).
#[utoipa::path(
    get,
    path = "/vault/audit/checkpoints",
    tag = "audit",
    operation_id = "list_checkpoints",
    params(CheckpointParams),
    responses((status = 200, description = "The checkpoints", body = CheckpointList), ErrorAnswers),
)]
async fn list_checkpoints(
    State(c): Ctl,
    headers: HeaderMap,
    q: QueryResult<CheckpointParams>,
) -> Result<Answer<CheckpointList>, ApiError> {
    let caller = admin(&c, &headers, Operation::ListCheckpoints).await?;
    let p = query(q)?;
    let cps = c
        .ledger_checkpoints(&caller.vendors, p.limit.unwrap_or(100))
        .await?;
    Ok(Answer::ok(CheckpointList {
        checkpoints: cps
            .into_iter()
            .map(|cp| CheckpointAnswer {
                seq: cp.seq,
                hash: hex::encode(cp.hash),
                at: cp.at.to_rfc3339_opts(SecondsFormat::Micros, true),
                public_key: hex::encode(cp.public_key),
                signature: hex::encode(cp.signature),
            })
            .collect(),
    }))
}

fn parse_time(field: &'static str, s: &str) -> Result<DateTime<Utc>, ApiError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| invalid(field, "must be an RFC 3339 time like 2026-11-22T10:00:00Z").into())
}

/// The audit ledger, newest first, a page at a time (scope `audit:read`).
#[utoipa::path(
    get,
    path = "/vault/audit",
    tag = "audit",
    operation_id = "query_audit",
    params(AuditParams),
    responses((status = 200, description = "A page of entries", body = AuditPage), ErrorAnswers),
)]
async fn audit(
    State(c): Ctl,
    headers: HeaderMap,
    q: QueryResult<AuditParams>,
) -> Result<Answer<AuditPage>, ApiError> {
    let caller = admin(&c, &headers, Operation::QueryAudit).await?;
    let p = query(q)?;
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
        outcome: p
            .outcome
            .as_deref()
            .map(domain::Outcome::parse)
            .transpose()?,
        refusal_reason: p.refusal_reason,
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
    Ok(Answer::ok(AuditPage {
        entries: entries.iter().map(AuditEntryAnswer::from).collect(),
        next_cursor: next_page_token(&entries, limit).map(|s| s.to_string()),
    }))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use axum::body::Body;
    use keycap_proto::secret::{self, SecretKind};
    use tower::ServiceExt;

    use super::*;
    use crate::crypto::Sealer;
    use crate::store::{SqliteStore, Store};

    /// The command that rewrites docs/openapi.json from the handlers.
    const REGENERATE: &str = "scripts/gen-openapi";

    const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

    async fn rest_router() -> Router {
        let store = SqliteStore::in_memory().await.unwrap();
        store.migrate().await.unwrap();
        let store: Arc<dyn Store> = Arc::new(store);
        let control = Control::new(
            store,
            Sealer::from_key_text(&Sealer::generate_key_text()).unwrap(),
            &secret::generate(SecretKind::FleetToken, "test"),
            "test",
            Duration::from_secs(1),
            domain::UpstreamPolicy::PublicHttps,
        )
        .await
        .unwrap();
        router(control)
    }

    async fn call(router: &Router, method: &str, path: &str) -> (StatusCode, Vec<u8>) {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, body.to_vec())
    }

    /// Whether the router has a handler for `method` at `path` (a concrete
    /// path): not a 405, and not the `/vault/*` fallback's "no such
    /// endpoint".
    async fn routed(router: &Router, method: &str, path: &str) -> bool {
        let (status, body) = call(router, method, path).await;
        let fallback = status == StatusCode::NOT_FOUND
            && serde_json::from_slice::<Value>(&body)
                .is_ok_and(|b| b["message"] == "no such endpoint");
        status != StatusCode::METHOD_NOT_ALLOWED && !fallback
    }

    /// `/vault/keys/{id}` as a path the router matches.
    fn concrete(template: &str) -> String {
        template
            .split('/')
            .map(|seg| if seg.starts_with('{') { "p1" } else { seg })
            .collect::<Vec<_>>()
            .join("/")
    }

    /// Every path given to `.route(` in the control plane's sources that
    /// the REST mapping serves (`/vault/...` and `/openapi.json`), catch-alls
    /// aside. Read from the sources because axum cannot list its routes.
    fn routed_paths() -> BTreeSet<String> {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let mut paths = BTreeSet::new();
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for piece in text.split(".route(").skip(1) {
                let Some(literal) = piece.trim_start().strip_prefix('"') else {
                    continue;
                };
                let path = &literal[..literal.find('"').unwrap()];
                if (path.starts_with("/vault/") || path == "/openapi.json") && !path.contains("{*")
                {
                    paths.insert(path.to_string());
                }
            }
        }
        paths
    }

    /// Every (METHOD, path template) the document describes.
    fn documented() -> BTreeSet<(String, String)> {
        let doc: Value = serde_json::from_str(&openapi_document()).unwrap();
        let mut ops = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in METHODS {
                if item.get(method.to_lowercase()).is_some() {
                    ops.insert((method.to_string(), path.clone()));
                }
            }
        }
        ops
    }

    #[tokio::test]
    async fn every_route_is_documented() {
        let router = rest_router().await;
        let paths = routed_paths();
        assert!(paths.len() >= 15, "the source scan found {paths:?}");
        let documented = documented();
        let mut missing = Vec::new();
        for path in &paths {
            for method in METHODS {
                if routed(&router, method, &concrete(path)).await
                    && !documented.contains(&(method.to_string(), path.clone()))
                {
                    missing.push(format!("{method} {path}"));
                }
            }
        }
        assert!(
            missing.is_empty(),
            "routes without an OpenAPI operation: {missing:?}. Give each handler a \
             #[utoipa::path], add it to ApiDoc's paths, then run {REGENERATE}"
        );
    }

    #[tokio::test]
    async fn every_documented_operation_is_routed() {
        let router = rest_router().await;
        for (method, path) in documented() {
            assert!(
                routed(&router, &method, &concrete(&path)).await,
                "{method} {path} is documented but not routed"
            );
        }
    }

    #[tokio::test]
    async fn the_served_document_is_the_checked_in_one() {
        let router = rest_router().await;
        let (status, served) = call(&router, "GET", "/openapi.json").await;
        assert_eq!(status, StatusCode::OK);
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
        let checked_in = std::fs::read(&file).unwrap_or_default();
        assert!(
            served == checked_in,
            "docs/openapi.json differs from the document GET /openapi.json serves: \
             run {REGENERATE} and commit docs/openapi.json"
        );
        let doc: Value = serde_json::from_slice(&served).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
    }

    #[tokio::test]
    async fn typed_answers_write_their_keys_sorted_as_json_did() {
        #[derive(Serialize)]
        struct Inner {
            zone: Option<String>,
            id: &'static str,
        }
        #[derive(Serialize)]
        struct Outer {
            #[serde(flatten)]
            info: Inner,
            key: &'static str,
            confirmation: ConfirmationAnswer,
        }
        let resp = Answer::created(Outer {
            info: Inner {
                zone: None,
                id: "key_1",
            },
            key: "kc_test_x",
            confirmation: ConfirmationAnswer {
                version: 3,
                all_confirmed: true,
                confirmed_nodes: vec!["n1".into()],
                unconfirmed_nodes: vec![],
                unconfirmed_lease_usd: Usd(Micros(1_500_000)),
            },
        })
        .into_response();
        assert_eq!(resp.status(), StatusCode::CREATED);
        let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"confirmation":{"all_confirmed":true,"confirmed_nodes":["n1"],"unconfirmed_lease_usd":1.5,"unconfirmed_nodes":[],"version":3},"id":"key_1","key":"kc_test_x","zone":null}"#
        );
    }

    #[tokio::test]
    async fn every_error_answer_is_the_one_documented_error_schema() {
        let doc: Value = serde_json::from_str(&openapi_document()).unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                if path == "/openapi.json" {
                    continue;
                }
                for code in ["400", "401", "403", "404", "409", "500"] {
                    assert_eq!(
                        responses[code]["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/ErrorBody",
                        "{method} {path} {code}"
                    );
                }
            }
        }
        // And an error the router gives is that shape.
        let router = rest_router().await;
        let (status, body) = call(&router, "GET", "/vault/keys").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            body,
            json!({"error": "unauthenticated", "message": "missing or invalid token"})
        );
    }
}
