//! OpenAI pricing.
//!
//! Owns the OpenAI price table (per-model token prices, embedding prices and
//! image prices, shipped in `prices/openai.json` and replaceable by an
//! operator's file) and the cost of the OpenAI calls agents make, one module
//! each: chat completions (`chat`), the Responses API (`responses`),
//! embeddings (`embeddings`) and image generation (`images`). `GET` calls
//! are free; any other call is refused.
//!
//! It must never under-reserve a call it lets through: a token-billed call
//! reserves its input bound (the body's byte length, as a token is at least
//! one byte, plus a per-image bound) at the dearest input price the model
//! has (a cache write costs more than plain input on newer models) and its
//! output bound (the requested or the model's maximum, plus a predicted
//! output's length) at the output price — the long-context prices when the
//! input bound is past their threshold, and the data-residency surcharge
//! when the vendor's base URL is a regional endpoint; embeddings reserve
//! their input alone; generated images their price or their token bound.
//! Whatever it cannot bound (built-in tools, files, stored context,
//! compaction, an unknown model, service tiers other than auto, default and
//! flex) is refused before anything leaves. A successful response without
//! readable usage settles at the reservation, never at 0. Prices are
//! integer micro-dollars; a float never holds one.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{
    clip, free_quote, json_body, settle_fixed, settle_reported, unreadable, PriceModel,
    PriceRequest, PricingError, Quote, QuoteKind, Settlement, StatusSettler, StreamSettler,
    TokenBilling, TokenUse,
};
use keycap_proto::prices::{ModelPrice, TokenPrices};
use keycap_proto::Micros;

mod chat;
mod embeddings;
mod images;
mod responses;

/// The OpenAI price table shipped with this build.
pub fn builtin_prices() -> TokenPrices {
    TokenPrices::from_json(keycap_proto::prices::shipped::OPENAI)
        .expect("the built-in OpenAI price table is valid")
}

/// The OpenAI price model over a (shared, possibly operator-supplied) table.
#[derive(Debug, Clone)]
pub struct OpenAiPricing {
    prices: Arc<TokenPrices>,
    /// The vendor's calls go to a data-residency endpoint, billed with the
    /// models' regional surcharge.
    regional: bool,
}

impl OpenAiPricing {
    pub fn new(prices: Arc<TokenPrices>) -> Self {
        OpenAiPricing {
            prices,
            regional: false,
        }
    }

    /// Prices the calls as made through a data-residency endpoint.
    pub fn regional(self, regional: bool) -> Self {
        OpenAiPricing { regional, ..self }
    }

    /// How a token-billed request of `price` is billed beyond its token
    /// counts: the surcharge it carries through this vendor, and whether
    /// its cache writes are long-lived.
    fn billing(&self, price: &ModelPrice, obj: &JsonObject) -> Result<TokenBilling, PricingError> {
        Ok(TokenBilling {
            uplift: if self.regional {
                price.uplifts.regional_processing
            } else {
                None
            },
            long_cache_writes: long_cache_writes(obj)?,
        })
    }
}

/// Whether `base_url` is one of OpenAI's data-residency hosts
/// (`eu.api.openai.com`, `us.api.openai.com`, ...), whose calls OpenAI
/// bills with a regional surcharge on the models that carry one.
pub fn is_regional_endpoint(base_url: &str) -> bool {
    let host = base_url
        .split_once("://")
        .map_or(base_url, |(_, rest)| rest)
        .split(['/', ':', '?', '#'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    host.strip_suffix(".api.openai.com")
        .is_some_and(|region| !region.is_empty() && !region.contains('.'))
}

type JsonObject = serde_json::Map<String, Value>;

/// A JSON request body that must be an object; `what` names the call.
fn request_object(req: &PriceRequest<'_>, what: &str) -> Result<JsonObject, PricingError> {
    match json_body(req, what)? {
        Value::Object(obj) => Ok(obj),
        _ => Err(unreadable("request body must be a JSON object")),
    }
}

/// The request's `model`.
fn model_name(obj: &JsonObject) -> Result<&str, PricingError> {
    match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Ok(m),
        _ => Err(unreadable("request needs a \"model\" string")),
    }
}

/// Whether the client asked for a streamed (SSE) response.
fn stream_flag(obj: &JsonObject) -> Result<bool, PricingError> {
    match obj.get("stream") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(unreadable("\"stream\" must be true or false")),
    }
}

fn unknown_model(prices: &TokenPrices, model: &str) -> PricingError {
    PricingError::UnknownModel(format!(
        "model {:?} is not in keycap's price table (as of {}); the operator must add a price for it",
        clip(model),
        prices.as_of()
    ))
}

/// The price of a model billed by input and output tokens (chat
/// completions, responses). A model the table prices as an embedding or
/// image model is refused, even when the table has a default: its prices
/// here would be meaningless.
fn token_model<'a>(
    prices: &'a TokenPrices,
    model: &str,
) -> Result<(&'a str, &'a ModelPrice), PricingError> {
    let elsewhere = if prices.lookup_embedding(model).is_some() {
        Some("POST /v1/embeddings")
    } else if prices.lookup_image(model).is_some() {
        Some("POST /v1/images/generations")
    } else {
        None
    };
    if let Some(endpoint) = elsewhere {
        return Err(unreadable(format!(
            "model {:?} is priced for {endpoint} only",
            clip(model)
        )));
    }
    prices
        .lookup(model)
        .ok_or_else(|| unknown_model(prices, model))
}

/// The most input tokens `images` input images can cost: images are billed
/// by size, not by the bytes of their URL, so each adds the model's
/// per-image maximum. Refused for a model with no such maximum.
fn image_tokens_max(price: &ModelPrice, model: &str, images: u64) -> Result<u64, PricingError> {
    if images == 0 {
        return Ok(0);
    }
    let per_image = price.image_input_tokens_max.ok_or_else(|| {
        unreadable(format!(
            "keycap cannot bound the cost of image input for model {:?}",
            clip(model)
        ))
    })?;
    Ok(per_image.saturating_mul(images))
}

/// The reservation for at most `input_max` input and `output_max` output
/// tokens, and the audit detail that says how it was bounded.
fn token_reservation(
    price: &ModelPrice,
    bound: &TokenBound<'_>,
    billing: TokenBilling,
) -> Result<(Micros, Value), PricingError> {
    let reserve = price
        .bound(bound.input_max, bound.output_max, billing.uplift)
        .ok_or_else(|| unreadable("request is too large to price"))?;
    let mut detail = json!({
        "model": bound.model,
        "priced_as": bound.priced_as,
        "input_tokens_max": bound.input_max,
        "output_tokens_max": bound.output_max,
    });
    if bound.images > 0 {
        detail["images"] = bound.images.into();
    }
    if price
        .long_context
        .as_ref()
        .is_some_and(|l| bound.input_max > l.above_input_tokens)
    {
        detail["long_context"] = true.into();
    }
    if let Some(u) = billing.uplift {
        detail["uplift_millionths"] = u.millionths().into();
    }
    Ok((reserve, detail))
}

/// What a token-billed request is bounded by.
struct TokenBound<'a> {
    model: &'a str,
    priced_as: &'a str,
    input_max: u64,
    output_max: u64,
    images: u64,
}

/// Service tiers billed at the table's prices: the standard tier, and flex
/// (billed below it, so recorded at an upper bound). Priority and any other
/// tier bill above the table.
fn check_service_tier(obj: &JsonObject) -> Result<(), PricingError> {
    match obj.get("service_tier") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(t)) if matches!(t.as_str(), "auto" | "default" | "flex") => Ok(()),
        Some(Value::String(t)) => Err(unreadable(format!(
            "keycap cannot price service_tier {:?}: the price table holds standard prices \
             (use \"auto\", \"default\" or \"flex\")",
            clip(t)
        ))),
        Some(_) => Err(unreadable("\"service_tier\" must be a string")),
    }
}

/// Whether the request asks for a prompt cache kept longer than OpenAI's
/// default (`prompt_cache_retention: "24h"`, or a `prompt_cache_options`
/// TTL other than the default 30 minutes): its cache writes are priced as
/// long-lived writes. A retention keycap cannot read is refused.
fn long_cache_writes(obj: &JsonObject) -> Result<bool, PricingError> {
    let retention = match obj.get("prompt_cache_retention") {
        None | Some(Value::Null) => false,
        Some(Value::String(r)) if r == "in_memory" => false,
        Some(Value::String(r)) if r == "24h" => true,
        Some(_) => return Err(unreadable(
            "keycap cannot price \"prompt_cache_retention\" other than \"in_memory\" or \"24h\"",
        )),
    };
    let ttl = match obj.get("prompt_cache_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => match o.get("ttl") {
            None | Some(Value::Null) => false,
            Some(Value::String(t)) => t != "30m",
            Some(_) => return Err(unreadable("\"prompt_cache_options.ttl\" must be a string")),
        },
        Some(_) => return Err(unreadable("\"prompt_cache_options\" must be an object")),
    };
    Ok(retention || ttl)
}

/// Token counts a response reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TokenUsage {
    input: u64,
    /// Input tokens served from the prompt cache (part of `input`).
    cached: u64,
    /// Input tokens written to the prompt cache (part of `input`).
    cache_write: u64,
    /// Output tokens, reasoning tokens included.
    output: u64,
}

impl TokenUsage {
    /// Reads a `usage` object whose counts are named `input` and `output`
    /// (`prompt_tokens`/`completion_tokens` for chat completions,
    /// `input_tokens`/`output_tokens` for responses), with the cached and
    /// cache-written input counts in `{details}.cached_tokens` and
    /// `{details}.cache_write_tokens`. `None` unless both counts are
    /// non-negative integers.
    fn read(usage: &Value, input: &str, output: &str, details: &str) -> Option<TokenUsage> {
        let detail = |name: &str| {
            usage
                .get(details)
                .and_then(|d| d.get(name))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        Some(TokenUsage {
            input: usage.get(input)?.as_u64()?,
            output: usage.get(output)?.as_u64()?,
            cached: detail("cached_tokens"),
            cache_write: detail("cache_write_tokens"),
        })
    }

    /// The counts by price class: reads and writes are part of the input
    /// count, and never more than it.
    fn by_class(&self, long_cache_writes: bool) -> TokenUse {
        let cached = self.cached.min(self.input);
        let written = self.cache_write.min(self.input - cached);
        let (cache_write, cache_write_long) = if long_cache_writes {
            (0, written)
        } else {
            (written, 0)
        };
        TokenUse {
            input: self.input - cached - written,
            cache_read: cached,
            cache_write,
            cache_write_long,
            output: self.output,
        }
    }
}

/// Settles a token-priced call (chat or responses) from the usage the
/// vendor reported, at the price and surcharge copied into its quote.
fn settle_tokens(quote: &Quote, status: u16, usage: Option<TokenUsage>) -> Settlement {
    let (QuoteKind::OpenAiChat {
        model,
        price,
        billing,
        ..
    }
    | QuoteKind::OpenAiResponses {
        model,
        price,
        billing,
    }) = &quote.kind
    else {
        return settle_fixed(quote, status);
    };
    settle_reported(quote, status, usage, |u| {
        let mut detail = json!({
            "model": model,
            "input_tokens": u.input,
            "output_tokens": u.output,
        });
        if u.cached > 0 {
            detail["cached_input_tokens"] = u.cached.into();
        }
        if u.cache_write > 0 {
            detail["cache_write_input_tokens"] = u.cache_write.into();
        }
        if let Some(up) = billing.uplift {
            detail["uplift_millionths"] = up.millionths().into();
        }
        let classes = u.by_class(billing.long_cache_writes);
        (price.charge(&classes, billing.uplift), detail)
    })
}

/// Settles a token-priced call from the `usage` object of its JSON body,
/// read by the endpoint's `read`.
fn settle_body_tokens(
    quote: &Quote,
    status: u16,
    body: &[u8],
    read: fn(&Value) -> Option<TokenUsage>,
) -> Settlement {
    let usage = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("usage").and_then(read));
    settle_tokens(quote, status, usage)
}

impl PriceModel for OpenAiPricing {
    fn check_write_query(&self, req: &PriceRequest<'_>) -> Result<(), PricingError> {
        // OpenAI's SDKs send their beta Responses calls as
        // `POST /v1/responses?beta=true`; nothing else in a write's query.
        super::write_query_within(req, |name, value| (name, value) == ("beta", "true"))
    }

    fn quote(&self, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
        match (req.method, req.path) {
            ("POST", "/v1/chat/completions") => chat::quote(self, req),
            ("POST", "/v1/responses") => responses::quote(self, req),
            ("POST", "/v1/embeddings") => embeddings::quote(&self.prices, req),
            ("POST", "/v1/images/generations") => images::quote(&self.prices, req),
            ("GET" | "HEAD", _) => Ok(free_quote(false)),
            (method, path) => Err(unreadable(format!(
                "keycap cannot price {} {} for profile openai",
                clip(method),
                clip(path)
            ))),
        }
    }

    fn settle(&self, quote: &Quote, status: u16, body: &[u8]) -> Settlement {
        match &quote.kind {
            QuoteKind::OpenAiChat { .. } => chat::settle(quote, status, body),
            QuoteKind::OpenAiResponses { .. } => responses::settle(quote, status, body),
            QuoteKind::OpenAiEmbeddings { .. } => embeddings::settle(quote, status, body),
            QuoteKind::OpenAiImages { .. } => images::settle(quote, status, body),
            _ => settle_fixed(quote, status),
        }
    }

    fn stream_settler(&self, quote: &Quote) -> Box<dyn StreamSettler> {
        match &quote.kind {
            QuoteKind::OpenAiChat { .. } => chat::stream_settler(quote),
            QuoteKind::OpenAiResponses { .. } => responses::stream_settler(quote),
            _ => Box::new(StatusSettler {
                quote: quote.clone(),
            }),
        }
    }
}

/// Requests and the shipped table, for the submodules' tests.
#[cfg(test)]
mod test_support {
    use super::*;

    pub const JSON: Option<&str> = Some("application/json");

    pub fn pricing() -> OpenAiPricing {
        OpenAiPricing::new(Arc::new(builtin_prices()))
    }

    /// A JSON POST to `path`.
    pub fn post<'a>(path: &'a str, body: &'a str) -> PriceRequest<'a> {
        PriceRequest {
            headers: crate::pricing::no_headers(),
            method: "POST",
            path,
            query: None,
            content_type: JSON,
            body: body.as_bytes(),
        }
    }
}

/// OpenAI's refusal envelope: `{"error": {"message", "type", "param",
/// "code", ...}}`. openai-python picks its exception by status
/// (`RateLimitError`, `AuthenticationError`, `PermissionDeniedError`,
/// `BadRequestError`, ...) and gives it the `error` object: keycap's code
/// is `e.code` and its fields `e.body["remaining_usd"]`, ....
pub fn refusal_envelope(r: &crate::envelope::Refused<'_>) -> crate::envelope::Wire {
    let mut error = crate::envelope::keycap_error(r);
    let kind = if r.status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    error.insert("type".into(), kind.into());
    error.insert("param".into(), Value::Null);
    crate::envelope::Wire::body(json!({ "error": error }))
}

#[cfg(test)]
mod envelope_tests {
    use super::*;
    use crate::envelope::Refused;

    #[test]
    fn refusals_are_openai_errors_with_keycaps_code() {
        let fields = json!({"remaining_usd": 5}).as_object().unwrap().clone();
        let wire = refusal_envelope(&Refused {
            status: http::StatusCode::TOO_MANY_REQUESTS,
            code: "daily_cap_exceeded",
            message: "over the cap",
            fields: &fields,
            retry_is_futile: true,
        });
        assert_eq!(
            wire.body,
            json!({"error": {"type": "invalid_request_error", "code": "daily_cap_exceeded",
                             "param": null, "message": "over the cap", "remaining_usd": 5}})
        );
        // x-should-retry, which this SDK obeys, is keycap's own header.
        assert!(wire.headers.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::pricing::{ceil_cost, Outcome};
    use keycap_proto::Micros;

    fn chat(body: &str) -> PriceRequest<'_> {
        post("/v1/chat/completions", body)
    }

    const TABLE: &str = r#"{
        "as_of": "2026-01-01", "currency": "usd", "unit": "per_million_tokens",
        "models": {
            "m": {"input": "1", "output": "3", "max_output_tokens": 100},
            "m-mini": {"input": "0.5", "output": "1", "max_output_tokens": 50},
            "gpt-4": {"input": "30", "output": "60", "max_output_tokens": 8192}
        }
    }"#;

    #[test]
    fn builtin_table_loads_and_has_expected_models() {
        let t = builtin_prices();
        for m in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1",
            "gpt-4.1-mini",
            "o3",
            "o4-mini",
            "gpt-5",
            "gpt-5-mini",
            "gpt-5-nano",
            "gpt-5-mini-2025-08-07",
            "gpt-5.6-sol",
        ] {
            assert!(t.lookup(m).is_some(), "{m}");
        }
        assert!(t.source().is_some_and(|s| s.contains("LiteLLM")));
        let (_, p) = t.lookup("gpt-4o").unwrap();
        assert_eq!(p.input, Micros(2_500_000));
        assert_eq!(p.output, Micros(10_000_000));
        assert_eq!(p.max_output_tokens, 16384);
        assert!(!t.has_default(), "no default entry ships by default");
        assert!(!t.as_of().is_empty());
    }

    #[test]
    fn lookup_exact_then_snapshot_then_default() {
        let t = builtin_prices();
        assert_eq!(t.lookup("gpt-4o-2024-08-06").unwrap().0, "gpt-4o");
        assert_eq!(t.lookup("gpt-4o-mini-2024-07-18").unwrap().0, "gpt-4o-mini");
        assert_eq!(t.lookup("gpt-4o-mini").unwrap().0, "gpt-4o-mini");
        assert_eq!(t.lookup("gpt-4.1-2025-04-14").unwrap().0, "gpt-4.1");
        assert_eq!(t.lookup("o3-2025-04-16").unwrap().0, "o3");
        // Differently priced variants do not fall back to their base.
        for m in [
            "gpt-4o-search-preview",
            "gpt-5-search-api",
            "gpt-5.5-cyber",
            "gpt-4o-x-2024-08-06",
            "gpt-4o-",
        ] {
            assert!(t.lookup(m).is_none(), "{m}");
        }
        // A snapshot priced apart from its base has its own entry.
        assert_eq!(
            t.lookup("gpt-4o-2024-05-13").unwrap().0,
            "gpt-4o-2024-05-13"
        );
        assert_eq!(t.lookup("o3-pro").unwrap().0, "o3-pro");
        let t = TokenPrices::from_json(TABLE).unwrap();
        assert_eq!(t.lookup("gpt-4-0613").unwrap().0, "gpt-4");
        assert!(t.lookup("gpt-4-06130").is_none());
        assert!(t.lookup("gpt-4-2024-8-06").is_none());
        let with_default = TABLE.replacen(
            "\"models\"",
            r#""default": {"input": "100", "output": "100", "max_output_tokens": 10}, "models""#,
            1,
        );
        let t = TokenPrices::from_json(&with_default).unwrap();
        assert_eq!(t.lookup("anything").unwrap().0, "default");
        assert_eq!(t.lookup("m").unwrap().0, "m");
    }

    #[test]
    fn table_validation() {
        let bad = [
            TABLE.replace("\"usd\"", "\"eur\""),
            TABLE.replace("per_million_tokens", "per_token"),
            TABLE.replace("\"1\"", "1"),
            TABLE.replace("\"1\"", "\"-1\""),
            TABLE.replace("\"1\"", "\"1.0000001\""),
            TABLE.replace("\"input\": \"1\"", "\"inptu\": \"1\""),
            TABLE.replace("\"max_output_tokens\": 100", "\"max_output_tokens\": 0"),
            TABLE.replace(
                "\"input\": \"1\"",
                "\"input\": \"1\", \"cached_input\": \"2\"",
            ),
            TABLE.replace("\"m\":", "\"default\":"),
            "{}".to_string(),
            "not json".to_string(),
        ];
        for text in bad {
            let err = PricingError::from(TokenPrices::from_json(&text).unwrap_err());
            assert_eq!(err.code(), "pricing_misconfigured", "{text}");
        }
    }

    #[test]
    fn load_reads_a_file() {
        let dir = std::env::temp_dir().join(format!("keycap-prices-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("openai.json");
        std::fs::write(&path, TABLE).unwrap();
        let t = crate::pricing::load_table(&path, TokenPrices::from_json).unwrap();
        assert_eq!(t.as_of(), "2026-01-01");
        std::fs::remove_file(&path).unwrap();
        assert!(crate::pricing::load_table(&path, TokenPrices::from_json).is_err());
        let _ = std::fs::remove_dir(&dir);
    }

    #[test]
    fn other_endpoints() {
        let p = pricing();
        for (m, path) in [
            ("GET", "/v1/models"),
            ("HEAD", "/v1/models"),
            ("GET", "/v1/files/f"),
        ] {
            let q = p
                .quote(&PriceRequest {
                    headers: crate::pricing::no_headers(),
                    method: m,
                    path,
                    ..chat("")
                })
                .unwrap();
            assert_eq!(q.reserve, Micros::ZERO);
            assert_eq!(q.kind, QuoteKind::Free);
            let s = p.settle(&q, 200, b"{}");
            assert_eq!((s.cost, s.outcome), (Micros::ZERO, Outcome::Settled));
        }
        for (m, path) in [
            ("POST", "/v1/images/edits"),
            ("POST", "/v1/audio/speech"),
            ("POST", "/v1/responses/resp_1/cancel"),
            ("POST", "/v1/chat/completions/"),
            ("DELETE", "/v1/files/f"),
            ("PUT", "/v1/chat/completions"),
        ] {
            let err = p
                .quote(&PriceRequest {
                    headers: crate::pricing::no_headers(),
                    method: m,
                    path,
                    ..chat(r#"{"model":"gpt-4o","messages":[]}"#)
                })
                .unwrap_err();
            assert_eq!(err.code(), "unpriceable_request");
            assert!(err.to_string().contains(path), "{err}");
            assert!(err.to_string().contains("profile openai"), "{err}");
        }
    }

    #[test]
    fn free_quote_stream_settles_at_zero() {
        let p = pricing();
        let q = p
            .quote(&PriceRequest {
                headers: crate::pricing::no_headers(),
                method: "GET",
                path: "/v1/models",
                ..chat("")
            })
            .unwrap();
        let mut st = p.stream_settler(&q);
        st.feed(
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":9}}\n\n",
        );
        let s = st.finish(200);
        assert_eq!((s.cost, s.outcome), (Micros::ZERO, Outcome::Settled));
    }

    #[test]
    fn models_priced_for_another_endpoint_are_refused_for_tokens() {
        let p = pricing();
        for (path, body, says) in [
            (
                "/v1/chat/completions",
                r#"{"model":"text-embedding-3-small","messages":[]}"#,
                "POST /v1/embeddings",
            ),
            (
                "/v1/responses",
                r#"{"model":"gpt-image-1","input":"hi"}"#,
                "POST /v1/images/generations",
            ),
        ] {
            let err = p.quote(&post(path, body)).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{err}");
            assert!(err.to_string().contains(says), "{err}");
        }
        // Even a table with a default does not price them as chat models.
        let with_default = r#"{"as_of": "2026-01-01", "currency": "usd", "unit": "per_million_tokens",
            "default": {"input": "100", "output": "100", "max_output_tokens": 10},
            "models": {}, "embeddings": {"e": {"input": "1"}}}"#;
        let p = OpenAiPricing::new(Arc::new(TokenPrices::from_json(with_default).unwrap()));
        let body = r#"{"model":"e","messages":[]}"#;
        assert_eq!(
            p.quote(&chat(body)).unwrap_err().code(),
            "unpriceable_request"
        );
        assert!(p.quote(&chat(r#"{"model":"x","messages":[]}"#)).is_ok());
    }

    /// A model billed the newer way: cache writes dearer than input, a
    /// long-context tier, a regional surcharge.
    const NEWER: &str = r#"{"as_of": "2026-12-01", "currency": "usd", "unit": "per_million_tokens",
        "models": {"sol": {"input": "4", "cached_input": "0.4", "cache_write": "5",
            "cache_write_1h": "10", "output": "20", "max_output_tokens": 1000,
            "long_context": {"above_input_tokens": 300, "input": "8", "cached_input": "0.8",
                "cache_write": "10", "cache_write_1h": "20", "output": "30"},
            "uplifts": {"regional_processing": "1.1"}}}}"#;

    fn newer(regional: bool) -> OpenAiPricing {
        OpenAiPricing::new(Arc::new(TokenPrices::from_json(NEWER).unwrap())).regional(regional)
    }

    const SOL: &str =
        r#"{"model":"sol","messages":[{"role":"user","content":"hi"}],"max_completion_tokens":10}"#;

    #[test]
    fn input_is_reserved_at_the_dearest_price_a_token_can_cost() {
        // A cache write (10/M for the longer retention) costs more than
        // plain input (4/M): every input token is reserved at it.
        let q = newer(false).quote(&chat(SOL)).unwrap();
        let n = SOL.len() as u64;
        assert_eq!(
            q.reserve,
            Micros(ceil_cost(n, 10_000_000) + ceil_cost(10, 20_000_000))
        );
    }

    #[test]
    fn cache_writes_settle_at_the_write_price_and_longer_retention_at_the_dearer_one() {
        let usage = br#"{"usage":{"prompt_tokens":100,"completion_tokens":10,
            "prompt_tokens_details":{"cached_tokens":20,"cache_write_tokens":30}}}"#;
        let p = newer(false);
        let q = p.quote(&chat(SOL)).unwrap();
        let s = p.settle(&q, 200, usage);
        // 50 plain at 4, 20 read at 0.4, 30 written at 5; 10 out at 20.
        let input = (50 * 4_000_000 + 20 * 400_000 + 30 * 5_000_000 + 999_999) / 1_000_000;
        assert_eq!(s.cost, Micros(input + ceil_cost(10, 20_000_000)));
        assert_eq!(s.detail["cache_write_input_tokens"], 30);
        // `SOL` with `extra` members.
        let with = |extra: &str| {
            SOL.replacen(
                "\"max_completion_tokens\"",
                &format!("{extra}, \"max_completion_tokens\""),
                1,
            )
        };
        let long_writes = |q: &Quote| {
            matches!(
                q.kind,
                QuoteKind::OpenAiChat {
                    billing: TokenBilling {
                        long_cache_writes: true,
                        ..
                    },
                    ..
                }
            )
        };
        for longer in [
            r#""prompt_cache_retention":"24h""#,
            r#""prompt_cache_options":{"ttl":"24h"}"#,
        ] {
            let q = p.quote(&chat(&with(longer))).unwrap();
            assert!(long_writes(&q), "{longer}");
            let s = p.settle(&q, 200, usage);
            let input = (50 * 4_000_000 + 20 * 400_000 + 30 * 10_000_000 + 999_999) / 1_000_000;
            assert_eq!(
                s.cost,
                Micros(input + ceil_cost(10, 20_000_000)),
                "{longer}"
            );
        }
        // The default retention and an explicit 30-minute TTL are the short
        // one.
        for short in [
            r#""prompt_cache_retention":"in_memory""#,
            r#""prompt_cache_options":{"ttl":"30m","mode":"explicit"}"#,
        ] {
            assert!(
                !long_writes(&p.quote(&chat(&with(short))).unwrap()),
                "{short}"
            );
        }
        for bad in [
            r#""prompt_cache_retention":"forever""#,
            r#""prompt_cache_options":"30m""#,
            r#""prompt_cache_options":{"ttl":30}"#,
        ] {
            let err = p.quote(&chat(&with(bad))).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{bad}");
            assert!(err.to_string().contains("prompt_cache"), "{err}");
        }
        // Reads and writes never count for more than the input reported.
        let odd = br#"{"usage":{"prompt_tokens":10,"completion_tokens":0,
            "prompt_tokens_details":{"cached_tokens":8,"cache_write_tokens":8}}}"#;
        let s = p.settle(&q, 200, odd);
        assert_eq!(
            s.cost,
            Micros((2 * 5_000_000 + 8 * 400_000 + 999_999) / 1_000_000)
        );
    }

    #[test]
    fn a_regional_endpoint_adds_the_models_surcharge_to_reservation_and_settlement() {
        let usage = br#"{"usage":{"prompt_tokens":100,"completion_tokens":10}}"#;
        let (global, regional) = (newer(false), newer(true));
        let qg = global.quote(&chat(SOL)).unwrap();
        let qr = regional.quote(&chat(SOL)).unwrap();
        let n = SOL.len() as u64;
        assert_eq!(
            qr.reserve,
            Micros(
                (i64::try_from(n).unwrap() * 11_000_000 + 999_999) / 1_000_000
                    + ceil_cost(10, 22_000_000)
            )
        );
        assert_eq!(qr.detail["uplift_millionths"], 1_100_000);
        assert!(qg.detail.get("uplift_millionths").is_none());
        assert_eq!(global.settle(&qg, 200, usage).cost, Micros(400 + 200));
        assert_eq!(regional.settle(&qr, 200, usage).cost, Micros(440 + 220));
        for (url, regional) in [
            ("https://eu.api.openai.com", true),
            ("https://us.api.openai.com/v1", true),
            ("https://JP.api.openai.com:443", true),
            ("https://api.openai.com", false),
            ("https://api.openai.com/v1", false),
            ("https://eu.api.openai.com.evil.example", false),
            ("https://a.b.api.openai.com", false),
            ("http://127.0.0.1:8080", false),
            ("", false),
        ] {
            assert_eq!(is_regional_endpoint(url), regional, "{url}");
        }
    }

    #[test]
    fn long_context_prices_apply_when_the_input_bound_passes_their_threshold() {
        let p = newer(false);
        let long = format!(
            r#"{{"model":"sol","messages":[{{"role":"user","content":"{}"}}],"max_completion_tokens":10}}"#,
            "x".repeat(400)
        );
        let q = p.quote(&chat(&long)).unwrap();
        let n = long.len() as u64;
        assert_eq!(q.detail["long_context"], true);
        assert_eq!(
            q.reserve,
            Micros(ceil_cost(n, 20_000_000) + ceil_cost(10, 30_000_000))
        );
        // Settled at the long prices only if the input reported passed it.
        let under = br#"{"usage":{"prompt_tokens":300,"completion_tokens":10}}"#;
        let over = br#"{"usage":{"prompt_tokens":301,"completion_tokens":10}}"#;
        assert_eq!(p.settle(&q, 200, under).cost, Micros(1200 + 200));
        assert_eq!(p.settle(&q, 200, over).cost, Micros(2408 + 300));
        assert!(p
            .quote(&chat(SOL))
            .unwrap()
            .detail
            .get("long_context")
            .is_none());
    }

    #[test]
    fn service_tiers_billed_above_the_table_are_refused() {
        let p = pricing();
        for tier in ["priority", "scale", "ultrafast", "fast"] {
            for (path, body) in [
                (
                    "/v1/chat/completions",
                    format!(r#"{{"model":"gpt-4o","messages":[],"service_tier":"{tier}"}}"#),
                ),
                (
                    "/v1/responses",
                    format!(r#"{{"model":"gpt-4o","input":"hi","service_tier":"{tier}"}}"#),
                ),
            ] {
                let err = p.quote(&post(path, &body)).unwrap_err();
                assert_eq!(err.code(), "unpriceable_request", "{path} {tier}");
                assert!(err.to_string().contains(tier), "{err}");
            }
        }
        let err = p
            .quote(&chat(
                r#"{"model":"gpt-4o","messages":[],"service_tier":1}"#,
            ))
            .unwrap_err();
        assert!(err.to_string().contains("service_tier"), "{err}");
    }

    #[test]
    fn priority_processing_is_refused() {
        let p = pricing();
        for (path, body) in [
            (
                "/v1/chat/completions",
                r#"{"model":"gpt-4o","messages":[],"service_tier":"priority"}"#,
            ),
            (
                "/v1/responses",
                r#"{"model":"gpt-4o","input":"hi","service_tier":"priority"}"#,
            ),
        ] {
            let err = p.quote(&post(path, body)).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{path}");
            assert!(err.to_string().contains("priority"), "{err}");
            for tier in ["auto", "default", "flex"] {
                let body = body.replace("priority", tier);
                assert!(p.quote(&post(path, &body)).is_ok(), "{path} {tier}");
            }
        }
    }

    #[test]
    fn huge_bodies_do_not_overflow() {
        let price = ModelPrice {
            input: Micros(i64::MAX),
            cached_input: None,
            output: Micros(i64::MAX),
            cache_write: None,
            cache_write_1h: None,
            max_output_tokens: u64::MAX,
            image_input_tokens_max: Some(u64::MAX),
            ..ModelPrice::default()
        };
        assert_eq!(price.cost(u64::MAX, 0, u64::MAX), None);
        assert_eq!(price.cost(1, 0, 0), Some(Micros(9_223_372_036_855)));
    }
}
