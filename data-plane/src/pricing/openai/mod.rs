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
//! one byte, plus a per-image bound) and its output bound (the requested or
//! the model's maximum) at the model's prices; embeddings reserve their
//! input alone; generated images their price or their token bound. Whatever
//! it cannot bound (built-in tools, files, stored context, an unknown model,
//! priority processing) is refused before anything leaves. A successful
//! response without readable usage settles at the reservation, never at 0.
//! Prices are integer micro-dollars; a float never holds one.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{
    clip, free_quote, json_body, settle_fixed, settle_reported, unreadable, PriceModel,
    PriceRequest, PricingError, Quote, QuoteKind, Settlement, StatusSettler, StreamSettler,
};
use keycap_proto::prices::{ModelPrice, TokenPrices};
use keycap_proto::Micros;

mod chat;
mod embeddings;
mod images;
mod responses;

const BUILTIN_TABLE: &str = include_str!("../../../prices/openai.json");

/// The OpenAI price table shipped with this build.
pub fn builtin_prices() -> TokenPrices {
    TokenPrices::from_json(BUILTIN_TABLE).expect("the built-in OpenAI price table is valid")
}

/// The OpenAI price model over a (shared, possibly operator-supplied) table.
#[derive(Debug, Clone)]
pub struct OpenAiPricing {
    prices: Arc<TokenPrices>,
}

impl OpenAiPricing {
    pub fn new(prices: Arc<TokenPrices>) -> Self {
        OpenAiPricing { prices }
    }
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
    model: &str,
    priced_as: &str,
    input_max: u64,
    output_max: u64,
    images: u64,
) -> Result<(Micros, Value), PricingError> {
    let reserve = price
        .cost(input_max, 0, output_max)
        .ok_or_else(|| unreadable("request is too large to price"))?;
    let mut detail = json!({
        "model": model,
        "priced_as": priced_as,
        "input_tokens_max": input_max,
        "output_tokens_max": output_max,
    });
    if images > 0 {
        detail["images"] = images.into();
    }
    Ok((reserve, detail))
}

/// Priority processing bills more per token than the table's prices.
fn refuse_priority_tier(obj: &JsonObject) -> Result<(), PricingError> {
    if obj.get("service_tier").and_then(Value::as_str) == Some("priority") {
        return Err(unreadable(
            "keycap cannot price service_tier \"priority\": the price table holds standard prices",
        ));
    }
    Ok(())
}

/// Token counts a response reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TokenUsage {
    input: u64,
    /// Input tokens served from the prompt cache (part of `input`).
    cached: u64,
    /// Output tokens, reasoning tokens included.
    output: u64,
}

impl TokenUsage {
    /// Reads a `usage` object whose counts are named `input` and `output`
    /// (`prompt_tokens`/`completion_tokens` for chat completions,
    /// `input_tokens`/`output_tokens` for responses), with the cached input
    /// count in `{details}.cached_tokens`. `None` unless both counts are
    /// non-negative integers.
    fn read(usage: &Value, input: &str, output: &str, details: &str) -> Option<TokenUsage> {
        Some(TokenUsage {
            input: usage.get(input)?.as_u64()?,
            output: usage.get(output)?.as_u64()?,
            cached: usage
                .get(details)
                .and_then(|d| d.get("cached_tokens"))
                .and_then(Value::as_u64)
                .unwrap_or(0),
        })
    }
}

/// Settles a token-billed call from the usage its response reported.
/// Settles a token-priced call (chat or responses) from the usage the
/// vendor reported, at the price copied into its quote.
fn settle_tokens(quote: &Quote, status: u16, usage: Option<TokenUsage>) -> Settlement {
    let (QuoteKind::OpenAiChat { model, price, .. } | QuoteKind::OpenAiResponses { model, price }) =
        &quote.kind
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
        (price.cost(u.input, u.cached, u.output), detail)
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
            ("POST", "/v1/chat/completions") => chat::quote(&self.prices, req),
            ("POST", "/v1/responses") => responses::quote(&self.prices, req),
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

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::pricing::Outcome;
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
        ] {
            assert!(t.lookup(m).is_some(), "{m}");
        }
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
            "o3-pro",
            "gpt-4o-x-2024-08-06",
            "gpt-4",
            "gpt-4o-",
        ] {
            assert!(t.lookup(m).is_none(), "{m}");
        }
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
                r#"{"model":"dall-e-3","input":"hi"}"#,
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
        };
        assert_eq!(price.cost(u64::MAX, 0, u64::MAX), None);
        assert_eq!(price.cost(1, 0, 0), Some(Micros(9_223_372_036_855)));
    }
}
