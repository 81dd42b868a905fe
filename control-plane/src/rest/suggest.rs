//! `GET /vault/keys/{id}/suggest`: an enforcing policy suggested from what a
//! key was seen doing, the same operation as gRPC's
//! `SuggestService.SuggestPolicy` (docs/observe.md). `suggested` is a
//! create-key body (without `expires_in` and `agent_run_label`, which are
//! the new key's to choose).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::Router;
use keycap_proto::{pb, Micros};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{admin, query, Answer, ErrorAnswers, QueryResult};
use crate::answers::{rfc3339, Usd};
use crate::error::ApiError;
use crate::scope::Operation;
use crate::service::Control;

pub fn routes() -> Router<Arc<Control>> {
    Router::new().route("/vault/keys/{id}/suggest", get(suggest))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SuggestQuery {
    /// Percent added to the observed maxima (default 25, at most 1000).
    #[serde(default)]
    pub margin_percent: Option<u32>,
}

/// The suggested policy, as `POST /vault/keys` takes it.
#[derive(Serialize, ToSchema)]
pub struct SuggestedKeyBody {
    pub vendor: String,
    /// `METHOD /path` templates of the calls seen, ids collapsed to `*`.
    pub allowed_endpoints: Vec<String>,
    pub daily_usd_cap: Usd,
    pub per_call_usd_cap: Usd,
}

/// What the suggestion was drawn from: the key's forwarded calls.
#[derive(Serialize, ToSchema)]
pub struct ObservedUsageAnswer {
    pub calls: u64,
    pub days: u64,
    /// The largest settled spend of one UTC day.
    pub max_daily_usd: Usd,
    /// The largest single reservation.
    pub max_call_usd: Usd,
    pub first_at: Option<String>,
    pub last_at: Option<String>,
    /// Only the most recent 10000 entries were read.
    pub truncated: bool,
}

#[derive(Serialize, ToSchema)]
pub struct SuggestAnswer {
    pub key_id: String,
    pub suggested: SuggestedKeyBody,
    /// The margin added to the observed maxima, in percent.
    pub margin_percent: u32,
    pub observed: ObservedUsageAnswer,
}

impl SuggestAnswer {
    /// From the gRPC answer, so REST and the CLI print one shape.
    pub fn from_pb(key_id: &str, r: &pb::SuggestPolicyResponse) -> Self {
        let o = r.observed.unwrap_or_default();
        let time = |t: &Option<prost_types::Timestamp>| {
            t.as_ref()
                .and_then(keycap_proto::time::from_proto)
                .map(rfc3339)
        };
        SuggestAnswer {
            key_id: key_id.to_string(),
            suggested: SuggestedKeyBody {
                vendor: r.vendor.clone(),
                allowed_endpoints: r.allowed_endpoints.clone(),
                daily_usd_cap: Usd(Micros(r.daily_cap_micros)),
                per_call_usd_cap: Usd(Micros(r.per_call_cap_micros)),
            },
            margin_percent: r.margin_percent,
            observed: ObservedUsageAnswer {
                calls: o.calls,
                days: o.days,
                max_daily_usd: Usd(Micros(o.max_daily_micros)),
                max_call_usd: Usd(Micros(o.max_call_micros)),
                first_at: time(&o.first_at),
                last_at: time(&o.last_at),
                truncated: o.truncated,
            },
        }
    }
}

/// An enforcing policy suggested from the key's forwarded calls in the
/// audit ledger: endpoints as templates, daily and per-call caps from the
/// observed maxima plus a margin (scopes `keys:read` and `audit:read`).
/// 409 `conflict` when the key has no forwarded calls yet.
#[utoipa::path(get, path = "/vault/keys/{id}/suggest", tag = "keys", operation_id = "suggest_policy",
    params(("id" = String, Path, description = "The key's id"), SuggestQuery),
    responses((status = 200, description = "The suggested policy", body = SuggestAnswer), ErrorAnswers))]
pub(super) async fn suggest(
    State(c): State<Arc<Control>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    q: QueryResult<SuggestQuery>,
) -> Result<Answer<SuggestAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::SuggestPolicy).await?;
    let q = query(q)?;
    let s = c.suggest_policy(&caller, &id, q.margin_percent).await?;
    Ok(Answer::ok(SuggestAnswer::from_pb(
        &id,
        &crate::grpc::suggestion_to_pb(&s),
    )))
}
