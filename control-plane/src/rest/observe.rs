//! `POST /vault/keys/{id}/enforce`: a key in observe mode starts enforcing
//! in place over REST, the same operation as gRPC's `EnforceKey`
//! (docs/observe.md).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{admin, optional_usd_input_schema, parse_body, usd_field, Answer, ErrorAnswers};
use crate::answers::EnforcedKeyAnswer;
use crate::domain;
use crate::error::ApiError;
use crate::scope::Operation;
use crate::service::{Control, EnforceChange};

pub fn routes() -> Router<Arc<Control>> {
    Router::new().route("/vault/keys/{id}/enforce", post(enforce))
}

/// `POST /vault/keys/{id}/enforce`; the body may be left out, and each
/// field left out keeps the key's own.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"daily_usd_cap": "10", "per_call_usd_cap": "6.25", "allowed_endpoints": ["POST /v1/payment_intents"]}))]
pub struct EnforceKeyBody {
    #[serde(default)]
    #[schema(schema_with = optional_usd_input_schema)]
    pub daily_usd_cap: Option<Value>,
    #[serde(default)]
    #[schema(schema_with = optional_usd_input_schema)]
    pub per_call_usd_cap: Option<Value>,
    #[serde(default)]
    #[schema(schema_with = optional_usd_input_schema)]
    pub lifetime_usd_cap: Option<Value>,
    /// `METHOD /path` patterns with `*` globs; absent: the key's own.
    #[serde(default)]
    pub allowed_endpoints: Option<Vec<String>>,
    /// How long to wait for the proxies to enforce it; absent or 0: the
    /// control plane's default.
    #[serde(default)]
    pub ack_timeout_ms: u64,
}

/// Switches a key in observe mode to enforcing, in place: same id, secret
/// and budget (today's spend counts against the new daily cap). Answered
/// once every connected proxy enforces it. A key not in observe mode, or
/// revoked, is a `conflict`.
#[utoipa::path(
    post,
    path = "/vault/keys/{id}/enforce",
    tag = "keys",
    operation_id = "enforce_key",
    params(("id" = String, Path, description = "The key in observe mode")),
    request_body(content = Option<EnforceKeyBody>, description = "Optional"),
    responses(
        (status = 200, description = "Enforcing", body = EnforcedKeyAnswer),
        ErrorAnswers,
    ),
)]
pub async fn enforce(
    State(c): State<Arc<Control>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer<EnforcedKeyAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::EnforceKey).await?;
    let b: EnforceKeyBody = if body.iter().all(u8::is_ascii_whitespace) {
        EnforceKeyBody::default()
    } else {
        parse_body(&body)?
    };
    let usd = |field: &'static str, v: &Option<Value>| {
        v.as_ref()
            .filter(|v| !v.is_null())
            .map(|v| usd_field(field, v))
            .transpose()
    };
    let change = EnforceChange::new(
        usd("daily_usd_cap", &b.daily_usd_cap)?,
        usd("per_call_usd_cap", &b.per_call_usd_cap)?,
        usd("lifetime_usd_cap", &b.lifetime_usd_cap)?,
        b.allowed_endpoints.as_deref(),
    )?;
    let timeout = domain::parse_ack_timeout_ms(b.ack_timeout_ms)?;
    let (key, confirmation) = c
        .enforce_key(&caller.vendors, &id, &change, timeout)
        .await?;
    Ok(Answer::ok(EnforcedKeyAnswer {
        info: (&key).into(),
        confirmation: (&confirmation).into(),
    }))
}
