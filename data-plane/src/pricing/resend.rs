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
