//! The proxy's refusals, as JSON bodies with stable codes.
//!
//! Every refusal says whose fault it is (the agent's request, the key's
//! policy, or an upstream/keycap failure) through its status, and carries a
//! client-safe message. A refusal never echoes the vault key, the real
//! credential, an internal address or an internal error; internal causes are
//! logged where they happen.

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use keycap_proto::Micros;
use serde_json::json;

use crate::body::ProxyBody;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    InvalidTarget(String),
    #[error("unknown vendor {0:?}")]
    UnknownVendor(String),
    #[error("missing or invalid vault key")]
    InvalidKey,
    #[error("this vault key has expired")]
    KeyExpired,
    #[error("this vault key has been revoked")]
    KeyRevoked,
    #[error("{0}")]
    EndpointNotAllowed(String),
    #[error("{0}")]
    ZoneMismatch(String),
    /// The client's own address (never a proxy's or an allowlist's).
    #[error("client address {0} is not in this key's allowed networks")]
    IpNotAllowed(std::net::IpAddr),
    #[error(
        "this key's rate limit of {} calls per minute is used up; retry in {} s",
        .0.limit,
        .0.reset_secs()
    )]
    RateLimited(crate::ratelimit::RateStatus),
    #[error("request body exceeds {0} bytes")]
    BodyTooLarge(usize),
    #[error("the request body could not be read (connection closed or bad chunked encoding)")]
    BodyUnreadable,
    #[error("{message}")]
    Unpriceable { code: &'static str, message: String },
    /// A header that would make the vendor read the body differently from
    /// how keycap prices it (`body_headers`).
    #[error("{0}")]
    AmbiguousRequest(String),
    #[error("this call would cost {cost} USD, above the key's per-call cap of {cap} USD")]
    PerCallCapExceeded { cost: Micros, cap: Micros },
    #[error("this call would exceed the key's daily cap")]
    DailyCapExceeded {
        cap: Micros,
        remaining: Micros,
        resets_at: DateTime<Utc>,
    },
    #[error("this call would exceed the key's lifetime cap, which never resets")]
    LifetimeCapExceeded { cap: Micros, remaining: Micros },
    #[error("budget for this key cannot be confirmed right now; nothing was forwarded")]
    BudgetUnavailable,
    #[error("this proxy has not received its policy yet; nothing was forwarded")]
    PolicyUnavailable,
    #[error("this proxy cannot record spend on its disk right now; nothing was forwarded")]
    SpendNotRecorded,
    #[error("the vendor's response was too large to price")]
    ResponseTooLarge,
    #[error("the vendor could not be reached")]
    UpstreamUnreachable,
    #[error("the vendor did not answer in time")]
    UpstreamTimeout,
    #[error(
        "a request with this Idempotency-Key is already in flight; retry when it has finished"
    )]
    IdempotentRequestInFlight,
    #[error("internal error")]
    Internal,
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::InvalidTarget(_) => "invalid_target",
            Refusal::UnknownVendor(_) => "unknown_vendor",
            Refusal::InvalidKey => "invalid_key",
            Refusal::KeyExpired => "key_expired",
            Refusal::KeyRevoked => "key_revoked",
            Refusal::EndpointNotAllowed(_) => "endpoint_not_allowed",
            Refusal::ZoneMismatch(_) => "zone_mismatch",
            Refusal::IpNotAllowed(_) => "ip_not_allowed",
            Refusal::RateLimited(_) => "rate_limited",
            Refusal::BodyTooLarge(_) => "body_too_large",
            Refusal::BodyUnreadable => "invalid_request_body",
            Refusal::Unpriceable { code, .. } => code,
            Refusal::AmbiguousRequest(_) => "ambiguous_request",
            Refusal::PerCallCapExceeded { .. } => "per_call_cap_exceeded",
            Refusal::DailyCapExceeded { .. } => "daily_cap_exceeded",
            Refusal::LifetimeCapExceeded { .. } => "lifetime_cap_exceeded",
            Refusal::BudgetUnavailable => "budget_unavailable",
            Refusal::PolicyUnavailable => "policy_unavailable",
            Refusal::SpendNotRecorded => "spend_not_recorded",
            Refusal::ResponseTooLarge => "upstream_response_too_large",
            Refusal::UpstreamUnreachable => "upstream_unreachable",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::IdempotentRequestInFlight => "idempotent_request_in_flight",
            Refusal::Internal => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::InvalidTarget(_)
            | Refusal::Unpriceable { .. }
            | Refusal::AmbiguousRequest(_)
            | Refusal::BodyUnreadable => StatusCode::BAD_REQUEST,
            Refusal::UnknownVendor(_) => StatusCode::NOT_FOUND,
            Refusal::InvalidKey | Refusal::KeyExpired | Refusal::KeyRevoked => {
                StatusCode::UNAUTHORIZED
            }
            // Lifetime exhaustion is final for this key: 403, not the 429
            // that tells clients to come back later.
            Refusal::EndpointNotAllowed(_)
            | Refusal::ZoneMismatch(_)
            | Refusal::IpNotAllowed(_)
            | Refusal::PerCallCapExceeded { .. }
            | Refusal::LifetimeCapExceeded { .. } => StatusCode::FORBIDDEN,
            Refusal::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::DailyCapExceeded { .. } | Refusal::RateLimited(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Refusal::BudgetUnavailable | Refusal::PolicyUnavailable | Refusal::SpendNotRecorded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::ResponseTooLarge => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::IdempotentRequestInFlight => StatusCode::CONFLICT,
            Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn into_response(self, now: DateTime<Utc>) -> Response<ProxyBody> {
        let mut body = json!({"error": self.code(), "message": self.to_string()});
        let mut retry_after = None;
        match &self {
            Refusal::DailyCapExceeded {
                cap,
                remaining,
                resets_at,
            } => {
                body["cap_usd"] = serde_json::to_value(cap.to_json_usd()).unwrap_or_default();
                body["remaining_usd"] =
                    serde_json::to_value(remaining.to_json_usd()).unwrap_or_default();
                body["resets_at"] = json!(resets_at.to_rfc3339_opts(SecondsFormat::Secs, true));
                let secs = (*resets_at - now).num_seconds().max(1);
                retry_after = Some(secs);
            }
            Refusal::LifetimeCapExceeded { cap, remaining } => {
                body["cap_usd"] = serde_json::to_value(cap.to_json_usd()).unwrap_or_default();
                body["remaining_usd"] =
                    serde_json::to_value(remaining.to_json_usd()).unwrap_or_default();
            }
            Refusal::PerCallCapExceeded { cost, cap } => {
                body["cost_usd"] = serde_json::to_value(cost.to_json_usd()).unwrap_or_default();
                body["per_call_cap_usd"] =
                    serde_json::to_value(cap.to_json_usd()).unwrap_or_default();
            }
            Refusal::RateLimited(status) => {
                body["limit_per_minute"] = json!(status.limit);
                body["retry_after_seconds"] = json!(status.reset_secs());
                retry_after = Some(status.reset_secs() as i64);
            }
            Refusal::BudgetUnavailable | Refusal::PolicyUnavailable | Refusal::SpendNotRecorded => {
                retry_after = Some(1)
            }
            _ => {}
        }
        let mut resp = Response::new(crate::body::full(Full::new(Bytes::from(
            serde_json::to_vec(&body).unwrap_or_default(),
        ))));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = retry_after {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Refusal::RateLimited(status) = &self {
            status.insert_headers(h);
        }
        if matches!(
            self,
            Refusal::DailyCapExceeded { .. } | Refusal::LifetimeCapExceeded { .. }
        ) {
            // Tells generic HTTP clients (and Stripe's) not to retry before
            // the reset named in the body (for a lifetime cap: ever).
            h.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        resp
    }
}
