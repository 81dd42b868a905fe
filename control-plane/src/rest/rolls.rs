//! `POST /vault/keys/{id}/roll`: a vault key roll over REST, the same
//! operation as gRPC's `RollKey`. Answered like a creation (`id`, `key`,
//! `confirmation`) with the successor, plus the rolled key.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use serde::Deserialize;
use utoipa::ToSchema;

use super::{admin, parse_body, Answer, ErrorAnswers};
use crate::answers::RolledKeyAnswer;
use crate::domain;
use crate::error::ApiError;
use crate::scope::Operation;
use crate::service::Control;

pub fn routes() -> Router<Arc<Control>> {
    Router::new().route("/vault/keys/{id}/roll", post(roll))
}

/// `POST /vault/keys/{id}/roll`; the body may be left out.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"grace": "10m"}))]
pub struct RollKeyBody {
    /// How long the rolled key keeps working: "10m", "90s", "1h"; at most
    /// 24h. Absent: 10m.
    #[serde(default)]
    pub grace: Option<String>,
    /// How long to wait for the proxies to serve the successor; absent or
    /// 0: the control plane's default.
    #[serde(default)]
    pub ack_timeout_ms: u64,
}

/// Rolls a key: mints a successor with the same policy that spends the same
/// budget (spend and leases are shared, never reset), answered like a
/// creation once the proxies serve it. The rolled key keeps working for
/// `grace`, then is revoked with the proxies' confirmation. A key is rolled
/// once (`key_already_rolled`); roll its successor next.
#[utoipa::path(
    post,
    path = "/vault/keys/{id}/roll",
    tag = "keys",
    operation_id = "roll_key",
    params(("id" = String, Path, description = "The key to roll")),
    request_body(content = Option<RollKeyBody>, description = "Optional"),
    responses(
        (status = 201, description = "Rolled", body = RolledKeyAnswer),
        ErrorAnswers,
    ),
)]
pub async fn roll(
    State(c): State<Arc<Control>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer<RolledKeyAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::RollKey).await?;
    let b: RollKeyBody = if body.iter().all(u8::is_ascii_whitespace) {
        RollKeyBody::default()
    } else {
        parse_body(&body)?
    };
    let grace = domain::roll::parse_grace(b.grace.as_deref().unwrap_or(""))?;
    let timeout = domain::parse_ack_timeout_ms(b.ack_timeout_ms)?;
    let rolled = c.roll_key(&caller.vendors, &id, grace, timeout).await?;
    Ok(Answer::created(RolledKeyAnswer {
        info: (&rolled.successor).into(),
        key: rolled.secret,
        confirmation: (&rolled.confirmation).into(),
        rolled: (&rolled.rolled).into(),
    }))
}
