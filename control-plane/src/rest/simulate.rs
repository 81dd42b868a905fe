//! `POST /vault/simulate`: a dry run of one vendor call of a key, the same
//! operation as gRPC's `SimulateService.Simulate` (docs/simulate.md). The
//! answer is built from the gRPC message, so REST and the CLI print one
//! JSON shape.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Router;
use keycap_proto::{pb, Micros};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::{admin, parse_body, Answer, ErrorAnswers};
use crate::answers::{rfc3339, Usd};
use crate::domain::invalid;
use crate::error::ApiError;
use crate::scope::Operation;
use crate::service::simulate::DryRun;
use crate::service::Control;

pub fn routes() -> Router<Arc<Control>> {
    Router::new().route("/vault/simulate", post(simulate))
}

/// `POST /vault/simulate`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SimulateBody {
    /// The key whose call is simulated (`key_...`).
    pub key_id: String,
    pub request: SimulatedCallBody,
}

/// The call as the agent would send it through the proxy.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SimulatedCallBody {
    pub method: String,
    /// The path as the vendor sees it (`/v1/payment_intents`), with its
    /// query string if any; without the proxy's `/{vendor}` prefix.
    pub path: String,
    /// Header name to value, or to a list of values for a repeated header.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub headers: BTreeMap<String, Value>,
    /// The body: a string is sent as it is (a form body, say); any other
    /// JSON value is sent as its JSON text.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub body: Option<Value>,
}

impl SimulateBody {
    fn into_dry_run(self) -> Result<DryRun, ApiError> {
        let mut headers = Vec::new();
        for (name, value) in self.request.headers {
            match value {
                Value::String(v) => headers.push((name, v)),
                Value::Array(vs) => {
                    for v in vs {
                        let Value::String(v) = v else {
                            return Err(invalid(
                                "request.headers",
                                "each header value is a string or a list of strings",
                            )
                            .into());
                        };
                        headers.push((name.clone(), v));
                    }
                }
                _ => {
                    return Err(invalid(
                        "request.headers",
                        "each header value is a string or a list of strings",
                    )
                    .into())
                }
            }
        }
        let body = match self.request.body {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => s.into_bytes(),
            Some(other) => other.to_string().into_bytes(),
        };
        Ok(DryRun::new(
            &self.key_id,
            &self.request.method,
            &self.request.path,
            &headers,
            body,
        )?)
    }
}

/// Why the proxy would refuse the call.
#[derive(Serialize, ToSchema)]
pub struct SimulatedRefusal {
    /// The code the proxy answers (`endpoint_not_allowed`,
    /// `daily_cap_exceeded`, ...), or `quote_needs_lookup` when the call's
    /// price depends on a vendor object a dry run does not read.
    pub code: String,
    /// The rule that decided it: `key_status`, `vendor`,
    /// `allowed_endpoints`, `body_headers`, `pricing`, `price_lookup`,
    /// `per_call_cap`, `daily_cap`, `lifetime_cap`, `rate_limit`, or
    /// `observe_ceiling` (a key in observe mode at its ceiling).
    pub rule: String,
    pub message: String,
}

/// The quote the proxy's own pricing code makes for the call.
#[derive(Serialize, ToSchema)]
pub struct SimulatedQuoteAnswer {
    /// What the proxy would reserve before forwarding.
    pub reserve_usd: Usd,
    pub reserve_micros: i64,
    /// The quote's kind (`stripe`, `openai_chat`, `free`, ...).
    pub kind: String,
    /// The reservation rule it is priced by (`POST /v1/charges`).
    pub rule: String,
    /// The priced quantities, as the audit entry records them.
    #[schema(value_type = Object)]
    pub detail: Value,
    pub streaming: bool,
}

/// What the key's budget tree has left (caps minus settled spend, the
/// tightest level of the key and its ancestors).
#[derive(Serialize, ToSchema)]
pub struct SimulatedBudgetAnswer {
    pub daily_remaining_usd: Usd,
    /// Null: no lifetime cap in the tree.
    pub lifetime_remaining_usd: Option<Usd>,
    /// Of the daily remainder, what no proxy holds in a lease.
    pub unleased_usd: Usd,
    pub resets_at: String,
}

/// What keycap would do with the call. Nothing was forwarded or reserved.
#[derive(Serialize, ToSchema)]
pub struct SimulateAnswer {
    pub allowed: bool,
    /// Null when allowed.
    pub refusal: Option<SimulatedRefusal>,
    /// Null when the call was refused before it could be priced.
    pub quote: Option<SimulatedQuoteAnswer>,
    pub remaining: SimulatedBudgetAnswer,
    /// Checks a dry run cannot make (`network`, `zone`, `rate_limit`,
    /// `idempotency`): they depend on the caller or the proxy.
    pub not_checked: Vec<String>,
    /// For `quote_needs_lookup`: the vendor objects the proxy reads first.
    pub lookups: Vec<String>,
    /// For a key in observe mode (docs/observe.md): the first refusal
    /// enforcement would have answered, which observe mode forwards
    /// instead (`allowed` stays true); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_refuse: Option<SimulatedRefusal>,
}

impl From<&pb::SimulateResponse> for SimulateAnswer {
    fn from(r: &pb::SimulateResponse) -> Self {
        let budget = r.budget.unwrap_or_default();
        SimulateAnswer {
            allowed: r.allowed,
            refusal: (!r.refusal_code.is_empty()).then(|| SimulatedRefusal {
                code: r.refusal_code.clone(),
                rule: r.rule.clone(),
                message: r.message.clone(),
            }),
            quote: r.quote.as_ref().map(|q| SimulatedQuoteAnswer {
                reserve_usd: Usd(Micros(q.reserve_micros)),
                reserve_micros: q.reserve_micros,
                kind: q.kind.clone(),
                rule: q.rule.clone(),
                detail: serde_json::from_str(&q.detail_json).unwrap_or(Value::Null),
                streaming: q.streaming,
            }),
            remaining: SimulatedBudgetAnswer {
                daily_remaining_usd: Usd(Micros(budget.daily_remaining_micros)),
                lifetime_remaining_usd: budget
                    .has_lifetime_cap
                    .then_some(Usd(Micros(budget.lifetime_remaining_micros))),
                unleased_usd: Usd(Micros(budget.unleased_micros)),
                resets_at: budget
                    .resets_at
                    .as_ref()
                    .and_then(keycap_proto::time::from_proto)
                    .map(rfc3339)
                    .unwrap_or_default(),
            },
            not_checked: r.not_checked.clone(),
            lookups: r.lookups.clone(),
            would_refuse: (!r.would_refuse_code.is_empty()).then(|| SimulatedRefusal {
                code: r.would_refuse_code.clone(),
                rule: r.would_refuse_rule.clone(),
                message: r.would_refuse_message.clone(),
            }),
        }
    }
}

/// What keycap would do with one call of a key — allowed, or the refusal
/// code and rule; the price quote; what the key has left — without
/// forwarding or reserving anything (scope `keys:read`; at most 60 a minute
/// per token, then 429 `rate_limited` with `Retry-After`).
#[utoipa::path(post, path = "/vault/simulate", tag = "keys", operation_id = "simulate",
    request_body = SimulateBody,
    responses(
        (status = 200, description = "What the proxy would do", body = SimulateAnswer),
        (status = 429, description = "Too many dry runs from this token (`rate_limited`)", body = super::ErrorBody),
        ErrorAnswers,
    ))]
pub(super) async fn simulate(
    State(c): State<Arc<Control>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Answer<SimulateAnswer>, ApiError> {
    let caller = admin(&c, &headers, Operation::Simulate).await?;
    let run = parse_body::<SimulateBody>(&body)?.into_dry_run()?;
    let answer = c.simulate(&caller, run).await?;
    Ok(Answer::ok(SimulateAnswer::from(
        &crate::grpc::simulate_answer_to_pb(&answer),
    )))
}
