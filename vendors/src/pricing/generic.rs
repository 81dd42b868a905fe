//! Generic pricing: any HTTP API, priced by the operator's rules.
//!
//! Owns quoting and settling by `keycap_proto::prices::GenericRules`: the
//! first rule whose endpoint pattern matches the request prices it; a rule
//! has a fixed cost, or a fixed reservation and a place in the response (a
//! header, or a JSON pointer into the body) that states the real cost.
//!
//! Quotes are never streamed: a response, SSE included, is read whole
//! (up to the proxy's response limit) before it is settled.
//!
//! It must never forward a request no rule matches (refused as
//! unpriceable), nor a write whose query string names a parameter its rule
//! does not list in `query_params`, and never settle a successful response whose stated cost
//! it cannot read at 0: that settles at the reservation, flagged. A 4xx/5xx
//! releases the reservation.

use http::HeaderMap;
use keycap_proto::prices::generic::{Cost, CostUnit, GenericRules};
use keycap_proto::Micros;
use serde_json::{json, Value};

use super::{
    clip, free_quote, is_success, unreadable, PriceModel, PriceRequest, PriceResponse,
    PricingError, Quote, QuoteKind, Settlement,
};

/// The generic price model over one vendor's rules.
#[derive(Debug, Clone)]
pub struct GenericPricing {
    rules: GenericRules,
}

impl GenericPricing {
    pub fn new(rules: GenericRules) -> Self {
        GenericPricing { rules }
    }

    /// Settles from what the response states, given its headers and (for
    /// a JSON pointer) its body.
    fn settle_from(
        &self,
        quote: &Quote,
        status: u16,
        headers: &HeaderMap,
        body: Option<&[u8]>,
    ) -> Settlement {
        let QuoteKind::Generic { rule } = quote.kind else {
            return super::settle_fixed(quote, status);
        };
        if !is_success(status) {
            return Settlement::released(quote, status);
        }
        let stated = match &self.rules.rules[rule].cost {
            Cost::Fixed(_) => return super::settle_fixed(quote, status),
            Cost::Header { name, unit } => headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .and_then(|t| unit.parse(t)),
            Cost::JsonPointer { pointer, unit } => body
                .and_then(|b| super::parse_json(b).ok())
                .and_then(|v| v.pointer(pointer).and_then(|c| stated_value(c, *unit))),
        };
        let Some(cost) = stated else {
            return Settlement::at_reservation(
                quote,
                status,
                "the response does not state its cost where the rule says",
            );
        };
        let mut s = super::settle_fixed(quote, status);
        s.cost = cost;
        s.detail["cost_source"] = "response".into();
        if cost > quote.reserve {
            s.detail["exceeded_reservation"] = true.into();
        }
        s
    }
}

/// A cost in a JSON body: a string, or a number written as one.
fn stated_value(v: &Value, unit: CostUnit) -> Option<Micros> {
    match v {
        Value::String(s) => unit.parse(s),
        // Read through its shortest decimal text ("0.25"), which is exact
        // for any price of up to 15 significant digits.
        Value::Number(n) => unit.parse(&n.to_string()),
        _ => None,
    }
}

impl PriceModel for GenericPricing {
    fn check_write_query(&self, req: &PriceRequest<'_>) -> Result<(), PricingError> {
        // The vendor is the operator's: only the query parameters its rule
        // names are known to be harmless on a write.
        let allowed = self
            .rules
            .rule_for(req.method, req.path)
            .map_or(&[][..], |(_, r)| r.query_params.as_slice());
        super::write_query_within(req, |name, _| allowed.iter().any(|a| a == name))
    }

    fn quote(&self, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
        let Some((i, rule)) = self.rules.rule_for(req.method, req.path) else {
            return Err(unreadable(format!(
                "no pricing rule of this vendor matches {} {}",
                clip(req.method),
                clip(req.path)
            )));
        };
        if rule.reserve == Micros::ZERO && matches!(rule.cost, Cost::Fixed(_)) {
            return Ok(free_quote(false));
        }
        let source = match &rule.cost {
            Cost::Fixed(_) => json!("fixed"),
            Cost::Header { name, .. } => json!({ "header": name }),
            Cost::JsonPointer { pointer, .. } => json!({ "json_pointer": pointer }),
        };
        Ok(Quote {
            reserve: rule.reserve,
            detail: json!({
                "rule": rule.endpoint.to_string(),
                "cost_from": source,
            }),
            streaming: false,
            kind: QuoteKind::Generic { rule: i },
            forward_body: None,
        })
    }

    fn settle(&self, quote: &Quote, status: u16, body: &[u8]) -> Settlement {
        self.settle_from(quote, status, super::no_headers(), Some(body))
    }

    fn settle_response(&self, quote: &Quote, resp: &PriceResponse<'_>) -> Settlement {
        self.settle_from(quote, resp.status, resp.headers, Some(resp.body))
    }

    fn rule_of(&self, req: &PriceRequest<'_>) -> String {
        match self.rules.rule_for(req.method, req.path) {
            Some((_, rule)) => rule.endpoint.to_string(),
            None => format!("{} {}", req.method, req.path),
        }
    }
}

/// A generic vendor's refusals are keycap's flat body
/// (`{"error": code, "message", ...fields}`): there is no vendor SDK to
/// please, and automation platforms read the fields at the top level.
pub fn refusal_envelope(r: &crate::envelope::Refused<'_>) -> crate::envelope::Wire {
    crate::envelope::flat(r)
}

#[cfg(test)]
mod tests {
    use super::super::Outcome;
    use super::*;

    fn pricing() -> GenericPricing {
        GenericPricing::new(
            GenericRules::from_json(
                r#"{"currency": "usd", "rules": [
                    {"endpoint": "POST /v1/renders", "cost": {"fixed": "0.05"}},
                    {"endpoint": "POST /v1/jobs/*", "reserve": "1.00",
                     "cost": {"header": {"name": "x-request-cost", "unit": "usd"}}},
                    {"endpoint": "POST /v1/generate", "reserve": "0.50",
                     "cost": {"json_pointer": {"pointer": "/usage/cost", "unit": "usd"}}},
                    {"endpoint": "GET /*", "cost": {"fixed": "0"}}
                ]}"#,
            )
            .unwrap(),
        )
    }

    fn req<'a>(method: &'a str, path: &'a str) -> PriceRequest<'a> {
        PriceRequest {
            method,
            path,
            query: None,
            content_type: None,
            headers: super::super::no_headers(),
            body: b"",
        }
    }

    fn resp<'a>(status: u16, headers: &'a HeaderMap, body: &'a [u8]) -> PriceResponse<'a> {
        PriceResponse {
            status,
            headers,
            body,
        }
    }

    #[test]
    fn the_first_matching_rule_prices_and_unmatched_calls_are_refused() {
        let p = pricing();
        let q = p.quote(&req("POST", "/v1/renders")).unwrap();
        assert_eq!(q.reserve, Micros(50_000));
        assert_eq!(q.detail["rule"], "POST /v1/renders");
        assert_eq!(
            p.quote(&req("POST", "/v1/jobs/42")).unwrap().reserve,
            Micros(1_000_000)
        );
        assert_eq!(
            p.quote(&req("GET", "/v1/jobs/42")).unwrap().kind,
            QuoteKind::Free
        );
        let err = p.quote(&req("POST", "/v1/other")).unwrap_err();
        assert_eq!(err.code(), "unpriceable_request");
        assert!(err.to_string().contains("POST /v1/other"), "{err}");
        assert_eq!(p.rule_of(&req("POST", "/v1/jobs/42")), "POST /v1/jobs/*");
    }

    #[test]
    fn costs_are_read_from_the_response_where_the_rule_says() {
        let p = pricing();
        let none = HeaderMap::new();
        let fixed = p.quote(&req("POST", "/v1/renders")).unwrap();
        let s = p.settle_response(&fixed, &resp(201, &none, b""));
        assert_eq!((s.cost, s.outcome), (Micros(50_000), Outcome::Settled));

        let job = p.quote(&req("POST", "/v1/jobs/1")).unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-request-cost", "0.37".parse().unwrap());
        let s = p.settle_response(&job, &resp(200, &h, b"{}"));
        assert_eq!((s.cost, s.outcome), (Micros(370_000), Outcome::Settled));
        assert_eq!(s.detail["cost_source"], "response");
        h.insert("x-request-cost", "2.50".parse().unwrap());
        let s = p.settle_response(&job, &resp(200, &h, b"{}"));
        assert_eq!(s.cost, Micros(2_500_000));
        assert_eq!(s.detail["exceeded_reservation"], true);
        let s = p.settle_response(&job, &resp(200, &none, b"{}"));
        assert_eq!(
            (s.cost, s.outcome),
            (Micros(1_000_000), Outcome::SettledAtReservation)
        );
        let s = p.settle_response(&job, &resp(503, &h, b"{}"));
        assert_eq!((s.cost, s.outcome), (Micros::ZERO, Outcome::Released));

        let gen = p.quote(&req("POST", "/v1/generate")).unwrap();
        for (body, cost) in [
            (&br#"{"usage":{"cost":"0.12"}}"#[..], Some(120_000)),
            (br#"{"usage":{"cost":0.12}}"#, Some(120_000)),
            (br#"{"usage":{"cost":1e-2}}"#, Some(10_000)),
            // Finer than a micro-dollar: not a price keycap can hold.
            (br#"{"usage":{"cost":0.0000001}}"#, None),
            (br#"{"usage":{}}"#, None),
            (b"not json", None),
            // Named twice, the cost is not read as one of them.
            (br#"{"usage":{"cost":"0.01","cost":"9.00"}}"#, None),
            (
                br#"{"usage":{"cost":"0.01"},"usage":{"cost":"9.00"}}"#,
                None,
            ),
        ] {
            let s = p.settle_response(&gen, &resp(200, &none, body));
            match cost {
                Some(c) => assert_eq!((s.cost, s.outcome), (Micros(c), Outcome::Settled)),
                None => assert_eq!(s.outcome, Outcome::SettledAtReservation),
            }
        }
    }
}
