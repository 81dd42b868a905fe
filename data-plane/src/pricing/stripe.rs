//! Stripe pricing.
//!
//! Owns the cost of Stripe calls: creating a PaymentIntent or a Charge
//! (`POST /v1/payment_intents`, `POST /v1/charges`) reserves exactly the
//! `amount` the request states, converted to micro-dollars; every other call
//! is free. A 2xx settles at that amount, anything else is released.
//!
//! It must never forward a charge it could not read: a missing, duplicated,
//! negative or non-integer `amount`, a missing `currency`, parameters it cannot
//! see (in the query, or in a body format it does not parse) are errors, not
//! zero quotes. A currency other than USD is priced only through a configured
//! rate, converted with exact integer arithmetic and rounded up.

use std::collections::BTreeMap;

use keycap_proto::{Micros, MICROS_PER_USD};
use serde_json::json;

use super::{
    clip, free_quote, media_type, mul_div_ceil, PriceModel, PriceRequest, PricingError, Quote,
    QuoteKind,
};

/// Currencies whose Stripe amounts are whole units (no minor unit).
const ZERO_DECIMAL: [&str; 16] = [
    "bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
    "xaf", "xof", "xpf",
];
/// Currencies whose Stripe amounts are thousandths of a unit.
const THREE_DECIMAL: [&str; 5] = ["bhd", "jod", "kwd", "omr", "tnd"];

/// Most fractional digits a configured rate may have. Eighteen is far more
/// than any real rate needs and keeps every product inside i128.
const MAX_RATE_SCALE: u32 = 18;

/// USD per major unit of a currency, held exactly as `num / 10^scale`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rate {
    num: i128,
    scale: u32,
    text: String,
}

impl Rate {
    fn parse(text: &str) -> Option<Rate> {
        let (int, frac) = text.split_once('.').unwrap_or((text, ""));
        let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if int.is_empty()
            || !digits(int)
            || !digits(frac)
            || (text.contains('.') && frac.is_empty())
        {
            return None;
        }
        let frac = frac.trim_end_matches('0');
        let scale = u32::try_from(frac.len()).ok()?;
        if scale > MAX_RATE_SCALE || int.trim_start_matches('0').len() > 12 {
            return None;
        }
        let num: i128 = format!("{int}{frac}").parse().ok()?;
        // A zero rate would make every charge in that currency free.
        (num > 0).then(|| Rate {
            num,
            scale,
            text: text.to_string(),
        })
    }
}

/// The Stripe price model, with the vendor's configured currency rates.
#[derive(Debug, Clone)]
pub struct StripePricing {
    rates: BTreeMap<String, Rate>,
}

impl StripePricing {
    /// `currency_rates`: lowercase currency code -> decimal USD per major
    /// unit. A malformed entry is a configuration error, raised here rather
    /// than on the first charge in that currency.
    pub fn new(currency_rates: &BTreeMap<String, String>) -> Result<Self, PricingError> {
        let mut rates = BTreeMap::new();
        for (code, text) in currency_rates {
            let code_ok = code.len() == 3 && code.bytes().all(|b| b.is_ascii_lowercase());
            if !code_ok {
                return Err(PricingError::Config(format!(
                    "currency rate key {:?} must be a lowercase three-letter code",
                    clip(code)
                )));
            }
            let rate = Rate::parse(text).ok_or_else(|| {
                PricingError::Config(format!(
                    "currency rate for {code} must be a positive decimal number of USD, got {:?}",
                    clip(text)
                ))
            })?;
            if code == "usd" && (rate.num, rate.scale) != (1, 0) {
                return Err(PricingError::Config("the rate for usd must be 1".into()));
            }
            rates.insert(code.clone(), rate);
        }
        Ok(StripePricing { rates })
    }

    /// Micro-dollars for `amount` minor units of `currency`, rounded up.
    fn to_micros(
        &self,
        amount: i64,
        currency: &str,
    ) -> Result<(Micros, Option<&str>), PricingError> {
        let exponent = minor_unit_exponent(currency);
        let too_large = || PricingError::Unreadable("amount is too large to price".into());
        if currency == "usd" {
            let micros = mul_div_ceil(i128::from(amount), i128::from(MICROS_PER_USD), 100)
                .ok_or_else(too_large)?;
            return Ok((Micros(micros), None));
        }
        let rate = self.rates.get(currency).ok_or_else(|| {
            PricingError::Currency(format!(
                "currency {currency:?} is not supported: a USD rate for it must be configured on the vendor"
            ))
        })?;
        // amount / 10^exponent units * num / 10^scale USD/unit * 10^6 micros/USD
        let divisor = 10i128.pow(exponent + rate.scale);
        let micros = mul_div_ceil(
            i128::from(amount),
            rate.num * i128::from(MICROS_PER_USD),
            divisor,
        )
        .ok_or_else(too_large)?;
        Ok((Micros(micros), Some(rate.text.as_str())))
    }
}

/// How many decimal places Stripe's minor unit has for a currency.
fn minor_unit_exponent(currency: &str) -> u32 {
    if ZERO_DECIMAL.contains(&currency) {
        0
    } else if THREE_DECIMAL.contains(&currency) {
        3
    } else {
        2
    }
}

fn unreadable(msg: impl Into<String>) -> PricingError {
    PricingError::Unreadable(msg.into())
}

/// The `amount` and `currency` fields of a charge request, as text.
#[derive(Default)]
struct ChargeFields {
    amount: Option<String>,
    currency: Option<String>,
}

impl ChargeFields {
    fn set(slot: &mut Option<String>, name: &str, value: String) -> Result<(), PricingError> {
        // Which duplicate the vendor honours is not something to guess when
        // money depends on it.
        if slot.replace(value).is_some() {
            return Err(unreadable(format!(
                "parameter {name} is given more than once"
            )));
        }
        Ok(())
    }

    fn from_form(body: &[u8]) -> Result<Self, PricingError> {
        let mut f = ChargeFields::default();
        // Pairs decode exactly as `form_urlencoded::parse` decodes them, but
        // a value only when its name is one pricing reads: a charge body is
        // mostly descriptions and metadata, and decoding every value was
        // most of the quote's cost.
        for pair in body.split(|&b| b == b'&') {
            let name_end = pair.iter().position(|&b| b == b'=').unwrap_or(pair.len());
            let Some((name, _)) = form_urlencoded::parse(&pair[..name_end]).next() else {
                continue;
            };
            let (slot, name) = match &*name {
                "amount" => (&mut f.amount, "amount"),
                "currency" => (&mut f.currency, "currency"),
                _ => continue,
            };
            let value = form_urlencoded::parse(pair)
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            Self::set(slot, name, value)?;
        }
        Ok(f)
    }

    fn from_json(body: &[u8]) -> Result<Self, PricingError> {
        let v: serde_json::Value = serde_json::from_slice(body)
            .map_err(|_| unreadable("request body is not valid JSON"))?;
        let obj = v
            .as_object()
            .ok_or_else(|| unreadable("request body must be a JSON object"))?;
        let amount = match obj.get("amount") {
            None | Some(serde_json::Value::Null) => None,
            // Only a JSON integer: 10.0 or "10" would be read differently by
            // different parsers.
            Some(serde_json::Value::Number(n)) if n.is_u64() || n.is_i64() => Some(n.to_string()),
            Some(_) => return Err(bad_amount()),
        };
        let currency = match obj.get("currency") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(unreadable("currency must be a string")),
        };
        Ok(ChargeFields { amount, currency })
    }
}

fn bad_amount() -> PricingError {
    unreadable("amount must be a non-negative integer number of the currency's minor unit")
}

impl PriceModel for StripePricing {
    fn quote(&self, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
        let priced =
            req.method == "POST" && matches!(req.path, "/v1/payment_intents" | "/v1/charges");
        if !priced {
            return Ok(free_quote(false));
        }
        if req.query.is_some_and(|q| !q.is_empty()) {
            return Err(unreadable(format!(
                "keycap prices POST {} from the request body; send its parameters in the body, not the query string",
                req.path
            )));
        }
        let fields = match media_type(req.content_type).as_deref() {
            None | Some("application/x-www-form-urlencoded") => ChargeFields::from_form(req.body)?,
            Some("application/json") => ChargeFields::from_json(req.body)?,
            Some(other) => {
                return Err(unreadable(format!(
                    "cannot read the amount from a {} body; use application/x-www-form-urlencoded",
                    clip(other)
                )))
            }
        };
        let amount_text = fields
            .amount
            .ok_or_else(|| unreadable(format!("POST {} needs an amount", req.path)))?;
        if amount_text.is_empty() || !amount_text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad_amount());
        }
        let amount: i64 = amount_text
            .parse()
            .map_err(|_| unreadable("amount is too large to price"))?;
        let currency = fields
            .currency
            .ok_or_else(|| unreadable(format!("POST {} needs a currency", req.path)))?
            .to_ascii_lowercase();
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(unreadable(format!(
                "currency {:?} is not a three-letter currency code",
                clip(&currency)
            )));
        }
        let (reserve, rate) = self.to_micros(amount, &currency)?;
        let mut detail = json!({ "amount": amount, "currency": currency });
        if let Some(rate) = rate {
            detail["usd_rate"] = rate.into();
        }
        Ok(Quote {
            reserve,
            detail,
            streaming: false,
            kind: QuoteKind::Stripe { amount, currency },
            forward_body: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::Outcome;
    use super::*;

    const FORM: Option<&str> = Some("application/x-www-form-urlencoded");

    fn pricing(rates: &[(&str, &str)]) -> StripePricing {
        let map = rates
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        StripePricing::new(&map).unwrap()
    }

    fn req<'a>(
        method: &'a str,
        path: &'a str,
        ct: Option<&'a str>,
        body: &'a [u8],
    ) -> PriceRequest<'a> {
        PriceRequest {
            headers: crate::pricing::no_headers(),
            method,
            path,
            query: None,
            content_type: ct,
            body,
        }
    }

    fn quote_form(p: &StripePricing, body: &str) -> Result<Quote, PricingError> {
        p.quote(&req("POST", "/v1/payment_intents", FORM, body.as_bytes()))
    }

    #[test]
    fn usd_reserves_exact_amount() {
        let p = pricing(&[]);
        let q = quote_form(&p, "amount=1999&currency=usd&description=x").unwrap();
        assert_eq!(q.reserve, Micros(19_990_000));
        assert_eq!(q.detail, json!({"amount": 1999, "currency": "usd"}));
        assert_eq!(
            q.kind,
            QuoteKind::Stripe {
                amount: 1999,
                currency: "usd".into()
            }
        );
        assert!(!q.streaming);
        let q = p
            .quote(&req("POST", "/v1/charges", FORM, b"currency=USD&amount=1"))
            .unwrap();
        assert_eq!(q.reserve, Micros(10_000));
        assert_eq!(
            quote_form(&p, "amount=0&currency=usd").unwrap().reserve,
            Micros(0)
        );
    }

    #[test]
    fn form_decoding_matches_stripes() {
        let p = pricing(&[]);
        // Encoded keys and values decode before matching, as Stripe does.
        let q = quote_form(&p, "%61mount=%35%30&currency=us%64").unwrap();
        assert_eq!(q.reserve, Micros(500_000));
        // Nested parameters are not the top-level amount.
        assert!(quote_form(&p, "amount_details[tip][amount]=5&currency=usd").is_err());
        // Values pricing does not read may be anything, even invalid UTF-8.
        let q = quote_form(
            &p,
            "description=%FF%FE+x&amount=5&metadata[a]=%&currency=usd",
        );
        assert_eq!(q.unwrap().reserve, Micros(50_000));
        // Leading zeros are still an integer.
        assert_eq!(
            quote_form(&p, "amount=007&currency=usd").unwrap().reserve,
            Micros(70_000)
        );
    }

    #[test]
    fn unreadable_amounts_are_refused() {
        let p = pricing(&[]);
        for body in [
            "currency=usd",
            "amount=&currency=usd",
            "amount=-5&currency=usd",
            "amount=%2D5&currency=usd",
            "amount=+5&currency=usd",
            "amount=5.00&currency=usd",
            "amount=1e3&currency=usd",
            "amount=%205&currency=usd",
            "amount=five&currency=usd",
            "amount=99999999999999999999&currency=usd",
            "amount=5&amount=500000&currency=usd",
            "%61mount=5&amount=500000&currency=usd",
            "amount=5&cur%72ency=usd&currency=jpy",
            "amount=5&currency=usd&currency=jpy",
            "amount=5",
            "amount=5&currency=",
            "amount=5&currency=dollars",
        ] {
            let err = quote_form(&p, body).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{body}: {err}");
        }
    }

    #[test]
    fn overflowing_amounts_are_refused_not_wrapped() {
        let p = pricing(&[("eur", "1000000")]);
        let max = i64::MAX.to_string();
        let err = quote_form(&p, &format!("amount={max}&currency=usd")).unwrap_err();
        assert_eq!(err.code(), "unpriceable_request");
        let err = quote_form(&p, &format!("amount={max}&currency=eur")).unwrap_err();
        assert_eq!(err.code(), "unpriceable_request");
    }

    #[test]
    fn json_bodies() {
        let p = pricing(&[]);
        let json_ct = Some("application/json; charset=utf-8");
        let q = p
            .quote(&req(
                "POST",
                "/v1/charges",
                json_ct,
                br#"{"amount":250,"currency":"usd"}"#,
            ))
            .unwrap();
        assert_eq!(q.reserve, Micros(2_500_000));
        for body in [
            r#"{"amount":2.5,"currency":"usd"}"#,
            r#"{"amount":250.0,"currency":"usd"}"#,
            r#"{"amount":"250","currency":"usd"}"#,
            r#"{"amount":-1,"currency":"usd"}"#,
            r#"{"amount":250}"#,
            r#"{"amount":250,"currency":5}"#,
            r#"{"currency":"usd"}"#,
            r#"[250]"#,
            r#"amount=250&currency=usd"#,
        ] {
            let r = p.quote(&req("POST", "/v1/charges", json_ct, body.as_bytes()));
            assert_eq!(r.unwrap_err().code(), "unpriceable_request", "{body}");
        }
    }

    #[test]
    fn missing_content_type_is_read_as_form_other_types_refused() {
        let p = pricing(&[]);
        let q = p
            .quote(&req("POST", "/v1/charges", None, b"amount=3&currency=usd"))
            .unwrap();
        assert_eq!(q.reserve, Micros(30_000));
        let err = p
            .quote(&req(
                "POST",
                "/v1/charges",
                Some("multipart/form-data; boundary=x"),
                b"--x\r\n",
            ))
            .unwrap_err();
        assert_eq!(err.code(), "unpriceable_request");
    }

    #[test]
    fn parameters_in_query_are_refused() {
        let p = pricing(&[]);
        let r = PriceRequest {
            headers: crate::pricing::no_headers(),
            query: Some("amount=1"),
            ..req(
                "POST",
                "/v1/payment_intents",
                FORM,
                b"amount=100000&currency=usd",
            )
        };
        assert_eq!(p.quote(&r).unwrap_err().code(), "unpriceable_request");
        let r = PriceRequest {
            headers: crate::pricing::no_headers(),
            query: Some(""),
            ..req(
                "POST",
                "/v1/payment_intents",
                FORM,
                b"amount=1&currency=usd",
            )
        };
        assert_eq!(p.quote(&r).unwrap().reserve, Micros(10_000));
    }

    #[test]
    fn other_currencies_need_a_rate() {
        let p = pricing(&[]);
        let err = quote_form(&p, "amount=100&currency=eur").unwrap_err();
        assert_eq!(err.code(), "currency_not_supported");
        assert!(err.to_string().contains("eur"), "{err}");
        assert!(err.to_string().contains("rate"), "{err}");
    }

    #[test]
    fn converts_with_minor_unit_exponents_rounding_up() {
        let p = pricing(&[
            ("eur", "1.08"),
            ("jpy", "0.0067"),
            ("kwd", "3.25"),
            ("gbp", "1.2700001"),
            ("vnd", "0.00003937"),
        ]);
        let r = |body: &str| quote_form(&p, body).unwrap().reserve;
        // 1.00 EUR = 1.08 USD.
        assert_eq!(r("amount=100&currency=eur"), Micros(1_080_000));
        // 0.01 EUR = 0.0108 USD.
        assert_eq!(r("amount=1&currency=eur"), Micros(10_800));
        // JPY has no minor unit: 1000 means 1000 yen = 6.70 USD.
        assert_eq!(r("amount=1000&currency=jpy"), Micros(6_700_000));
        // KWD has three: 1500 means 1.500 KWD = 4.875 USD.
        assert_eq!(r("amount=1500&currency=kwd"), Micros(4_875_000));
        // 0.01 GBP = 0.012700001 USD = 12700.001 micros, rounded up.
        assert_eq!(r("amount=1&currency=gbp"), Micros(12_701));
        // 1 VND = 39.37 micros, rounded up; never 0 for a non-zero charge.
        assert_eq!(r("amount=1&currency=vnd"), Micros(40));
        let q = quote_form(&p, "amount=100&currency=EUR").unwrap();
        assert_eq!(
            q.detail,
            json!({"amount": 100, "currency": "eur", "usd_rate": "1.08"})
        );
    }

    #[test]
    fn exponent_tables() {
        assert_eq!(minor_unit_exponent("jpy"), 0);
        assert_eq!(minor_unit_exponent("krw"), 0);
        assert_eq!(minor_unit_exponent("xpf"), 0);
        assert_eq!(minor_unit_exponent("bhd"), 3);
        assert_eq!(minor_unit_exponent("tnd"), 3);
        assert_eq!(minor_unit_exponent("usd"), 2);
        assert_eq!(minor_unit_exponent("eur"), 2);
    }

    #[test]
    fn rate_configuration_is_validated() {
        for (code, rate) in [
            ("eur", "1,08"),
            ("eur", "-1.08"),
            ("eur", "0"),
            ("eur", "0.000"),
            ("eur", "1."),
            ("eur", ".5"),
            ("eur", "1e2"),
            ("eur", " 1.08"),
            ("eur", "0.0000000000000000001"),
            ("EUR", "1.08"),
            ("euro", "1.08"),
            ("usd", "2"),
        ] {
            let map = [(code.to_string(), rate.to_string())].into();
            let err = StripePricing::new(&map).unwrap_err();
            assert_eq!(err.code(), "pricing_misconfigured", "{code}={rate}");
        }
        assert!(StripePricing::new(&[("usd".into(), "1.000".into())].into()).is_ok());
        assert_eq!(
            Rate::parse("1.0800").map(|r| (r.num, r.scale)),
            Some((108, 2))
        );
    }

    #[test]
    fn every_other_call_is_free() {
        let p = pricing(&[]);
        for (m, path) in [
            ("GET", "/v1/payment_intents"),
            ("GET", "/v1/charges"),
            ("POST", "/v1/customers"),
            ("POST", "/v1/payment_intents/pi_1/confirm"),
            ("POST", "/v1/charges/"),
            ("DELETE", "/v1/customers/cus_1"),
        ] {
            let q = p.quote(&req(m, path, FORM, b"amount=-1")).unwrap();
            assert_eq!(q.reserve, Micros::ZERO, "{m} {path}");
            assert_eq!(q.kind, QuoteKind::Free);
        }
    }

    #[test]
    fn settles_at_amount_on_success_else_releases() {
        let p = pricing(&[]);
        let q = quote_form(&p, "amount=1999&currency=usd").unwrap();
        let s = p.settle(&q, 200, b"{}");
        assert_eq!((s.cost, s.outcome), (Micros(19_990_000), Outcome::Settled));
        assert_eq!(s.detail["amount"], 1999);
        assert_eq!(s.detail["currency"], "usd");
        for status in [400, 402, 404, 409, 429, 500, 502] {
            let s = p.settle(&q, status, b"{\"error\":{}}");
            assert_eq!(
                (s.cost, s.outcome),
                (Micros::ZERO, Outcome::Released),
                "{status}"
            );
            assert_eq!(
                s.detail["amount"], 1999,
                "the audit still says what was refused"
            );
            assert_eq!(s.detail["status"], status);
        }
        let free = p.quote(&req("GET", "/v1/customers", None, b"")).unwrap();
        let s = p.settle(&free, 200, b"{}");
        assert_eq!((s.cost, s.outcome), (Micros::ZERO, Outcome::Settled));
        let mut st = p.stream_settler(&q);
        st.feed(b"data: {}\n\n");
        assert_eq!(st.finish(200).cost, Micros(19_990_000));
        assert_eq!(p.stream_settler(&q).finish(500).outcome, Outcome::Released);
    }
}
