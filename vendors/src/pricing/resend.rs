//! Resend pricing.
//!
//! Owns the cost of sending email through Resend: `POST /emails` and
//! `POST /emails/batch` reserve one unit price per recipient (`to` + `cc` +
//! `bcc`, each a string or a list of strings), read from the request body;
//! a 2xx settles at that amount, anything else is released. Sending a
//! broadcast is refused (its audience size is not in the request); every
//! other call (reading emails, domains, audiences) is free.
//!
//! It must never forward an email it could not count: a missing or empty
//! `to`, a recipient field of the wrong type, a body that is not JSON, or a
//! batch that is not a JSON array of emails is refused before forwarding.
//! The unit price comes from `prices/resend.json` (dated).

use keycap_proto::prices::ResendPrices;
use keycap_proto::Micros;
use serde_json::{json, Value};

use super::{
    free_quote, json_body, unreadable, PriceModel, PriceRequest, PricingError, Quote, QuoteKind,
};

const BUILTIN_TABLE: &str = include_str!("../../prices/resend.json");

/// The price shipped with this build.
pub fn builtin_prices() -> ResendPrices {
    ResendPrices::from_json(BUILTIN_TABLE).expect("the built-in Resend price is valid")
}

/// The Resend price model.
#[derive(Debug, Clone)]
pub struct ResendPricing {
    prices: ResendPrices,
}

impl ResendPricing {
    pub fn new(prices: ResendPrices) -> Self {
        ResendPricing { prices }
    }
}

/// Resend accepts at most this many addresses in one recipient field, and
/// this many emails in one batch.
const MAX_PER_FIELD: usize = 50;
const MAX_BATCH: usize = 100;

/// Recipients of one email object: `to` (required, non-empty) + `cc` + `bcc`.
fn recipients(email: &Value) -> Result<u64, PricingError> {
    let obj = email
        .as_object()
        .ok_or_else(|| unreadable("each email must be a JSON object"))?;
    let mut total = 0u64;
    for field in ["to", "cc", "bcc"] {
        let n = match obj.get(field) {
            None | Some(Value::Null) => 0,
            Some(Value::String(s)) if !s.trim().is_empty() => 1,
            Some(Value::Array(list))
                if list.len() <= MAX_PER_FIELD
                    && list
                        .iter()
                        .all(|a| a.as_str().is_some_and(|s| !s.trim().is_empty())) =>
            {
                list.len()
            }
            Some(_) => {
                return Err(unreadable(format!(
                    "\"{field}\" must be an address or a list of at most {MAX_PER_FIELD} addresses"
                )))
            }
        };
        if field == "to" && n == 0 {
            return Err(unreadable("\"to\" must name at least one recipient"));
        }
        total += n as u64;
    }
    Ok(total)
}

impl PriceModel for ResendPricing {
    fn quote(&self, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
        let batch = match (req.method, req.path) {
            ("POST", "/emails") => false,
            ("POST", "/emails/batch") => true,
            ("POST", p) if p.starts_with("/broadcasts/") && p.ends_with("/send") => {
                return Err(unreadable(
                    "keycap cannot price a broadcast: its audience size is not in the request",
                ))
            }
            _ => return Ok(free_quote(false)),
        };
        let body = json_body(req, "emails")?;
        let (emails, count) = if batch {
            let list = body
                .as_array()
                .filter(|l| !l.is_empty() && l.len() <= MAX_BATCH)
                .ok_or_else(|| {
                    unreadable(format!(
                        "a batch must be a JSON array of 1 to {MAX_BATCH} emails"
                    ))
                })?;
            let mut n = 0;
            for email in list {
                n += recipients(email)?;
            }
            (list.len() as u64, n)
        } else {
            (1, recipients(&body)?)
        };
        let reserve = i64::try_from(count)
            .ok()
            .and_then(|n| self.prices.per_recipient.0.checked_mul(n))
            .map(Micros)
            .ok_or_else(|| unreadable("too many recipients to price"))?;
        Ok(Quote {
            reserve,
            detail: json!({
                "emails": emails,
                "recipients": count,
                "per_recipient_micros": self.prices.per_recipient.0,
            }),
            streaming: false,
            kind: QuoteKind::Resend { recipients: count },
            forward_body: None,
        })
    }
}

/// Resend's refusal envelope: `{"statusCode", "name", "message"}`, plus
/// keycap's `error` object. resend-python picks its exception from the
/// status and `name`: `RateLimitError` for 429 (`daily_quota_exceeded` for
/// a daily cap, `rate_limit_exceeded` otherwise), `MissingApiKeyError` for
/// 401 (its message is the SDK's own), `ValidationError` for 400,
/// `ApplicationError` for 500, and `ResendError` with `error_type`
/// `restricted_api_key` for 403 (a key not allowed this call; the SDK has
/// no class for it). Its exceptions carry the status as `code`, not
/// keycap's: keycap's code and fields are in the body's `error`.
pub fn refusal_envelope(r: &crate::envelope::Refused<'_>) -> crate::envelope::Wire {
    crate::envelope::Wire::body(json!({
        "statusCode": r.status.as_u16(),
        "name": error_name(r),
        "message": r.message,
        "error": crate::envelope::keycap_error(r),
    }))
}

/// Resend's name for the kind of error (`name`).
fn error_name(r: &crate::envelope::Refused<'_>) -> &'static str {
    match r.status.as_u16() {
        429 if r.code == "daily_cap_exceeded" => "daily_quota_exceeded",
        429 => "rate_limit_exceeded",
        401 => "missing_api_key",
        403 => "restricted_api_key",
        404 => "not_found",
        409 => "concurrent_idempotent_requests",
        500..=599 => "application_error",
        _ => "validation_error",
    }
}

#[cfg(test)]
mod envelope_tests {
    use super::*;
    use crate::envelope::Refused;

    #[test]
    fn refusals_are_resend_errors_named_for_its_sdk() {
        let fields = json!({"remaining_usd": 5}).as_object().unwrap().clone();
        let r = |status: u16, code: &'static str| Refused {
            status: http::StatusCode::from_u16(status).unwrap(),
            code,
            message: "no",
            fields: &fields,
            retry_is_futile: false,
        };
        assert_eq!(
            refusal_envelope(&r(429, "daily_cap_exceeded")).body,
            json!({"statusCode": 429, "name": "daily_quota_exceeded", "message": "no",
                   "error": {"code": "daily_cap_exceeded", "message": "no", "remaining_usd": 5}})
        );
        for (status, code, name) in [
            (429, "rate_limited", "rate_limit_exceeded"),
            (401, "key_revoked", "missing_api_key"),
            (403, "endpoint_not_allowed", "restricted_api_key"),
            (400, "unpriceable_request", "validation_error"),
            (404, "unknown_vendor", "not_found"),
            (
                409,
                "idempotent_request_in_flight",
                "concurrent_idempotent_requests",
            ),
            (502, "upstream_unreachable", "application_error"),
        ] {
            assert_eq!(refusal_envelope(&r(status, code)).body["name"], name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::Outcome;
    use super::*;

    const JSON: Option<&str> = Some("application/json");

    fn pricing() -> ResendPricing {
        ResendPricing::new(builtin_prices())
    }

    fn post<'a>(path: &'a str, body: &'a str) -> PriceRequest<'a> {
        PriceRequest {
            headers: crate::pricing::no_headers(),
            method: "POST",
            path,
            query: None,
            content_type: JSON,
            body: body.as_bytes(),
        }
    }

    #[test]
    fn builtin_price_loads() {
        let p = builtin_prices();
        assert_eq!(p.per_recipient, Micros(900));
        assert!(!p.as_of.is_empty());
    }

    #[test]
    fn an_email_costs_one_unit_per_recipient() {
        let p = pricing();
        let q = p
            .quote(&post(
                "/emails",
                r#"{"from":"a@x.dev","to":["b@x.dev","c@x.dev"],"cc":"d@x.dev","bcc":["e@x.dev"],"subject":"hi","html":"<p>hi</p>"}"#,
            ))
            .unwrap();
        assert_eq!(q.reserve, Micros(4 * 900));
        assert_eq!(q.detail["recipients"], 4);
        let one = p
            .quote(&post(
                "/emails",
                r#"{"from":"a@x.dev","to":"b@x.dev","subject":"s"}"#,
            ))
            .unwrap();
        assert_eq!(one.reserve, Micros(900));
        let s = p.settle(&q, 200, b"{\"id\":\"e1\"}");
        assert_eq!((s.cost, s.outcome), (Micros(3600), Outcome::Settled));
        for status in [400, 403, 422, 429, 500] {
            let s = p.settle(&q, status, b"{}");
            assert_eq!(
                (s.cost, s.outcome),
                (Micros::ZERO, Outcome::Released),
                "{status}"
            );
        }
    }

    #[test]
    fn a_batch_sums_its_emails() {
        let q = pricing()
            .quote(&post(
                "/emails/batch",
                r#"[{"from":"a@x.dev","to":"b@x.dev"},{"from":"a@x.dev","to":["c@x.dev","d@x.dev"],"bcc":"e@x.dev"}]"#,
            ))
            .unwrap();
        assert_eq!(q.reserve, Micros(4 * 900));
        assert_eq!(q.detail["emails"], 2);
    }

    #[test]
    fn uncountable_emails_are_refused_and_other_calls_are_free() {
        let p = pricing();
        let fifty_one = format!(r#"{{"to":[{}]}}"#, vec!["\"a@x.dev\""; 51].join(","));
        for (path, body) in [
            ("/emails", "not json"),
            ("/emails", "[]"),
            ("/emails", r#"{"from":"a@x.dev"}"#),
            ("/emails", r#"{"to":[]}"#),
            ("/emails", r#"{"to":""}"#),
            ("/emails", r#"{"to":5}"#),
            ("/emails", r#"{"to":"b@x.dev","cc":[1]}"#),
            ("/emails", fifty_one.as_str()),
            ("/emails/batch", "[]"),
            ("/emails/batch", r#"{"to":"b@x.dev"}"#),
            ("/emails/batch", r#"[{"to":"b@x.dev"},{"from":"a@x.dev"}]"#),
            ("/broadcasts/b1/send", "{}"),
        ] {
            let err = p.quote(&post(path, body)).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{path} {body}");
        }
        let form = PriceRequest {
            headers: crate::pricing::no_headers(),
            content_type: Some("application/x-www-form-urlencoded"),
            ..post("/emails", r#"{"to":"b@x.dev"}"#)
        };
        assert!(p.quote(&form).is_err());
        for (method, path) in [
            ("GET", "/emails/e1"),
            ("GET", "/domains"),
            ("POST", "/audiences"),
        ] {
            let r = PriceRequest {
                headers: crate::pricing::no_headers(),
                method,
                ..post(path, "")
            };
            assert_eq!(
                p.quote(&r).unwrap().reserve,
                Micros::ZERO,
                "{method} {path}"
            );
        }
    }
}
