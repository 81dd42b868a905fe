//! The proxy's refusals: stable codes, statuses, client-safe messages and
//! keycap's own fields, and the headers keycap sends with them.
//!
//! Every refusal says whose fault it is (the agent's request, the key's
//! policy, or an upstream/keycap failure) through its status, and carries a
//! client-safe message. How the body is worded (the envelope: a vendor's
//! error format, or keycap's flat one) is chosen by the caller, see
//! `envelope`. A refusal never echoes the vault key, the real
//! credential, an internal address or an internal error; internal causes are
//! logged where they happen.

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;
use keycap_proto::Micros;
use serde_json::{json, Map, Value};

use crate::body::ProxyBody;
use crate::envelope::{Envelope, Refused};

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
    #[error("the request body arrived too slowly; nothing was forwarded")]
    BodyTimeout,
    #[error("too many requests without a credential are being read right now; retry shortly")]
    UnauthenticatedBusy,
    #[error("{message}")]
    Unpriceable { code: &'static str, message: String },
    /// A header that would make the vendor read the body differently from
    /// how keycap prices it (`body_headers`).
    #[error("{0}")]
    AmbiguousRequest(String),
    /// A `Keycap-Context` header that breaks its grammar or bounds.
    #[error("{0}")]
    InvalidContext(#[from] crate::context::ContextError),
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
    /// Every address the vendor's host resolved to is loopback, private,
    /// link-local or otherwise non-public, and the vendor was not
    /// registered under the control plane's --allow-private-upstreams.
    #[error("the vendor's host resolves only to non-public addresses; nothing was sent")]
    UpstreamAddressRefused,
    /// The vendor compressed its answer although keycap asked for
    /// `identity`: it cannot be checked for the credential.
    #[error("the vendor answered with a content encoding keycap did not ask for")]
    UpstreamResponseEncoded,
    #[error("the vendor did not answer in time")]
    UpstreamTimeout,
    #[error(
        "a request with this Idempotency-Key is already in flight; retry when it has finished"
    )]
    IdempotentRequestInFlight,
    /// The call reserves more than the key's `approval_above`: held for a
    /// person's decision (docs/approvals.md); nothing was reserved.
    #[error(
        "this call would reserve {quote} USD, above this key's approval threshold of \
         {threshold} USD; once a person approves it, repeat the identical request with \
         the header Keycap-Approval: {id}"
    )]
    ApprovalRequired {
        id: String,
        quote: Micros,
        threshold: Micros,
        expires_at: DateTime<Utc>,
        url: String,
    },
    /// A retry's `Keycap-Approval` could not be used; `code` says why
    /// (`approval::refusal_message`). Its reservation was released.
    #[error("{message}")]
    ApprovalRefused {
        code: &'static str,
        message: String,
        id: String,
    },
    /// The control plane could not hold the call or use its approval.
    #[error("approvals cannot be recorded right now; nothing was forwarded")]
    ApprovalUnavailable,
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
            Refusal::BodyTimeout => "request_body_timeout",
            Refusal::UnauthenticatedBusy => "unauthenticated_busy",
            Refusal::Unpriceable { code, .. } => code,
            Refusal::AmbiguousRequest(_) => "ambiguous_request",
            Refusal::InvalidContext(_) => "invalid_context",
            Refusal::PerCallCapExceeded { .. } => "per_call_cap_exceeded",
            Refusal::DailyCapExceeded { .. } => "daily_cap_exceeded",
            Refusal::LifetimeCapExceeded { .. } => "lifetime_cap_exceeded",
            Refusal::BudgetUnavailable => "budget_unavailable",
            Refusal::PolicyUnavailable => "policy_unavailable",
            Refusal::SpendNotRecorded => "spend_not_recorded",
            Refusal::ResponseTooLarge => "upstream_response_too_large",
            Refusal::UpstreamUnreachable => "upstream_unreachable",
            Refusal::UpstreamAddressRefused => "upstream_address_refused",
            Refusal::UpstreamResponseEncoded => "upstream_response_encoded",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::IdempotentRequestInFlight => "idempotent_request_in_flight",
            Refusal::ApprovalRequired { .. } => "approval_required",
            Refusal::ApprovalRefused { code, .. } => code,
            Refusal::ApprovalUnavailable => "approval_unavailable",
            Refusal::Internal => "internal",
        }
    }

    /// The reason the audit ledger records this refusal under when the
    /// key is known (`refusals`): its code, for a refusal by the key's
    /// policy (revoked, expired, allowlist, network, zone, rate, caps) or
    /// by pricing. Others (a malformed request, an upstream or keycap
    /// failure) are not the key's refusals and are not recorded.
    pub fn ledger_reason(&self) -> Option<&'static str> {
        match self {
            Refusal::KeyExpired
            | Refusal::KeyRevoked
            | Refusal::EndpointNotAllowed(_)
            | Refusal::ZoneMismatch(_)
            | Refusal::IpNotAllowed(_)
            | Refusal::RateLimited(_)
            | Refusal::Unpriceable { .. }
            | Refusal::PerCallCapExceeded { .. }
            | Refusal::DailyCapExceeded { .. }
            | Refusal::LifetimeCapExceeded { .. } => Some(self.code()),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::InvalidTarget(_)
            | Refusal::Unpriceable { .. }
            | Refusal::AmbiguousRequest(_)
            | Refusal::InvalidContext(_)
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
            // Not a 429: the same request sent again without an approval
            // is held again, so an SDK's automatic retries must not fire.
            Refusal::ApprovalRequired { .. } | Refusal::ApprovalRefused { .. } => {
                StatusCode::FORBIDDEN
            }
            Refusal::ApprovalUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::UnauthenticatedBusy => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::DailyCapExceeded { .. } | Refusal::RateLimited(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Refusal::BudgetUnavailable | Refusal::PolicyUnavailable | Refusal::SpendNotRecorded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::ResponseTooLarge => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamUnreachable
            | Refusal::UpstreamAddressRefused
            | Refusal::UpstreamResponseEncoded => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::IdempotentRequestInFlight => StatusCode::CONFLICT,
            Refusal::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// keycap's own fields of this refusal, beside its code and message:
    /// what a client needs to act on it (`cap_usd`, `remaining_usd`,
    /// `resets_at`, ...). Every envelope carries them at a documented path.
    pub fn fields(&self) -> Map<String, Value> {
        let usd = |m: &Micros| serde_json::to_value(m.to_json_usd()).unwrap_or_default();
        let mut f = Map::new();
        match self {
            Refusal::DailyCapExceeded {
                cap,
                remaining,
                resets_at,
            } => {
                f.insert("cap_usd".into(), usd(cap));
                f.insert("remaining_usd".into(), usd(remaining));
                f.insert(
                    "resets_at".into(),
                    json!(resets_at.to_rfc3339_opts(SecondsFormat::Secs, true)),
                );
            }
            Refusal::LifetimeCapExceeded { cap, remaining } => {
                f.insert("cap_usd".into(), usd(cap));
                f.insert("remaining_usd".into(), usd(remaining));
            }
            Refusal::PerCallCapExceeded { cost, cap } => {
                f.insert("cost_usd".into(), usd(cost));
                f.insert("per_call_cap_usd".into(), usd(cap));
            }
            Refusal::RateLimited(status) => {
                f.insert("limit_per_minute".into(), json!(status.limit));
                f.insert("retry_after_seconds".into(), json!(status.reset_secs()));
            }
            Refusal::ApprovalRequired {
                id,
                quote,
                threshold,
                expires_at,
                url,
            } => {
                f.insert("approval_id".into(), json!(id));
                f.insert("quote_usd".into(), usd(quote));
                f.insert("approval_above_usd".into(), usd(threshold));
                f.insert(
                    "expires_at".into(),
                    json!(expires_at.to_rfc3339_opts(SecondsFormat::Secs, true)),
                );
                f.insert("approval_url".into(), json!(url));
            }
            Refusal::ApprovalRefused { id, .. } => {
                f.insert("approval_id".into(), json!(id));
            }
            _ => {}
        }
        f
    }

    /// Whether a retry is bound to be refused the same way: a spent cap
    /// does not come back before its reset (a lifetime cap: ever).
    pub fn retry_is_futile(&self) -> bool {
        matches!(
            self,
            Refusal::DailyCapExceeded { .. }
                | Refusal::LifetimeCapExceeded { .. }
                | Refusal::ApprovalRequired { .. }
                | Refusal::ApprovalRefused { .. }
        )
    }

    /// The refusal as an HTTP response, its body in `envelope` (see
    /// `envelope`: the key's vendor's, or the one answered before a key is
    /// known). The headers are keycap's whatever the envelope, plus the
    /// ones the envelope adds for its vendor's SDK.
    pub fn into_response(self, now: DateTime<Utc>, envelope: Envelope) -> Response<ProxyBody> {
        let message = self.to_string();
        let fields = self.fields();
        let wire = envelope(&Refused {
            status: self.status(),
            code: self.code(),
            message: &message,
            fields: &fields,
            retry_is_futile: self.retry_is_futile(),
        });
        let retry_after = match &self {
            Refusal::DailyCapExceeded { resets_at, .. } => {
                Some((*resets_at - now).num_seconds().max(1))
            }
            Refusal::RateLimited(status) => Some(status.reset_secs() as i64),
            Refusal::BudgetUnavailable
            | Refusal::PolicyUnavailable
            | Refusal::SpendNotRecorded
            | Refusal::ApprovalUnavailable
            | Refusal::UnauthenticatedBusy => Some(1),
            _ => None,
        };
        let mut resp = Response::new(crate::body::full(Full::new(Bytes::from(
            serde_json::to_vec(&wire.body).unwrap_or_default(),
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
        if self.status() == StatusCode::UNAUTHORIZED {
            h.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"keycap\""),
            );
        }
        if self.retry_is_futile() {
            // The Stainless SDKs (OpenAI's, Anthropic's) and generic HTTP
            // clients read this; Stripe's SDK reads its own header, which
            // the Stripe envelope adds.
            h.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        for (name, value) in wire.headers {
            h.insert(name, value);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope;
    use http_body_util::BodyExt;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T23:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    async fn answer(r: Refusal, e: Envelope) -> (Response<()>, Value) {
        let (parts, body) = r.into_response(now(), e).into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        (
            Response::from_parts(parts, ()),
            serde_json::from_slice(&bytes).unwrap(),
        )
    }

    fn cap() -> Refusal {
        Refusal::DailyCapExceeded {
            cap: Micros(30_000_000),
            remaining: Micros(5_000_000),
            resets_at: now() + chrono::Duration::hours(1),
        }
    }

    #[tokio::test]
    async fn a_cap_refusal_says_when_to_come_back_and_not_to_retry_before() {
        let (resp, body) = answer(cap(), envelope::flat).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "3600");
        assert_eq!(resp.headers()["x-should-retry"], "false");
        assert_eq!(
            body,
            json!({"error": "daily_cap_exceeded", "message": cap().to_string(),
                   "cap_usd": 30.0, "remaining_usd": 5.0, "resets_at": "2026-11-24T00:00:00Z"})
        );
        // Stripe's SDK reads its own header, which its envelope adds.
        assert!(resp.headers().get("stripe-should-retry").is_none());
        let stripe = crate::pricing::envelope_for(keycap_proto::profile::Profile::Stripe);
        let (resp, body) = answer(cap(), stripe).await;
        assert_eq!(resp.headers()["stripe-should-retry"], "false");
        assert_eq!(resp.headers()["x-should-retry"], "false");
        assert_eq!(body["error"]["code"], "daily_cap_exceeded");
        assert_eq!(body["error"]["remaining_usd"], 5.0);
        assert_eq!(body["error"]["resets_at"], "2026-11-24T00:00:00Z");
    }

    #[tokio::test]
    async fn a_401_names_its_scheme_and_only_caps_forbid_a_retry() {
        for r in [
            Refusal::InvalidKey,
            Refusal::KeyRevoked,
            Refusal::KeyExpired,
        ] {
            let code = r.code();
            let (resp, body) = answer(r, envelope::before_authentication).await;
            assert_eq!(resp.status(), 401);
            assert_eq!(
                resp.headers()["www-authenticate"],
                "Bearer realm=\"keycap\""
            );
            assert!(resp.headers().get("x-should-retry").is_none());
            assert!(resp.headers().get("stripe-should-retry").is_none());
            assert_eq!(body["error"]["code"], code);
            assert_eq!(body["code"], code, "Twilio's place for it");
        }
        let (resp, _) = answer(Refusal::UpstreamTimeout, envelope::flat).await;
        assert!(resp.headers().get("www-authenticate").is_none());
        assert!(resp.headers().get("x-should-retry").is_none());
        let lifetime = Refusal::LifetimeCapExceeded {
            cap: Micros(1),
            remaining: Micros::ZERO,
        };
        let (resp, body) = answer(lifetime, envelope::flat).await;
        assert_eq!(resp.status(), 403);
        assert_eq!(resp.headers()["x-should-retry"], "false");
        assert!(resp.headers().get("retry-after").is_none());
        assert!(body.get("resets_at").is_none());
    }
}
