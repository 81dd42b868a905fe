//! OpenAI pricing.
//!
//! Owns the OpenAI price table (per-model token prices, shipped in
//! `prices/openai.json` and replaceable by an operator's file) and the cost of
//! OpenAI calls: `POST /v1/chat/completions` reserves an upper bound of its
//! token cost and settles from the `usage` the response reports, streamed or
//! not; `GET` calls are free.
//!
//! It must never under-reserve a call it lets through: the input bound is the
//! body's byte length (a token is at least one byte) plus a per-image bound,
//! the output bound is the requested or model maximum times the number of
//! choices, and any request feature whose cost it cannot bound (audio, files,
//! web search, an unknown model, any other POST) is refused. A successful
//! response without readable usage settles at the reservation, never at 0.
//! Prices are integer micro-dollars per million tokens; a float never holds
//! one.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{
    clip, free_quote, json_body, positive_int, settle_fixed, settle_reported, unreadable,
    PriceModel, PriceRequest, PricingError, Quote, QuoteKind, Settlement, StreamSettler,
};
use crate::sse::SseReader;
use keycap_proto::prices::TokenPrices;

const BUILTIN_TABLE: &str = include_str!("../../prices/openai.json");

/// The OpenAI price table shipped with this build.
pub fn builtin_prices() -> TokenPrices {
    TokenPrices::from_json(BUILTIN_TABLE).expect("the built-in OpenAI price table is valid")
}

/// OpenAI accepts at most this many choices (`n`) per request.
const MAX_CHOICES: u64 = 128;

/// The OpenAI price model over a (shared, possibly operator-supplied) table.
#[derive(Debug, Clone)]
pub struct OpenAiPricing {
    prices: Arc<TokenPrices>,
}

impl OpenAiPricing {
    pub fn new(prices: Arc<TokenPrices>) -> Self {
        OpenAiPricing { prices }
    }

    fn quote_chat(&self, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
        let body = json_body(req, "chat completions")?;
        let obj = body
            .as_object()
            .ok_or_else(|| unreadable("request body must be a JSON object"))?;
        let model = match obj.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.as_str(),
            _ => return Err(unreadable("request needs a \"model\" string")),
        };
        let (priced_as, price) = self.prices.lookup(model).ok_or_else(|| {
            PricingError::UnknownModel(format!(
                "model {:?} is not in keycap's price table (as of {}); the operator must add a price for it",
                clip(model),
                self.prices.as_of()
            ))
        })?;

        let streaming = match obj.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(unreadable("\"stream\" must be true or false")),
        };
        refuse_unbounded_features(obj)?;

        // Both limits may be sent; the larger one bounds the output either way.
        let requested_out = [
            positive_int(obj, "max_completion_tokens")?,
            positive_int(obj, "max_tokens")?,
        ]
        .into_iter()
        .flatten()
        .max();
        let max_out =
            requested_out.map_or(price.max_output_tokens, |r| r.min(price.max_output_tokens));
        // Every choice is billed for its own output.
        let choices = positive_int(obj, "n")?.unwrap_or(1);
        if choices > MAX_CHOICES {
            return Err(unreadable(format!("\"n\" must be at most {MAX_CHOICES}")));
        }
        let output_max = max_out.saturating_mul(choices);

        // Images are billed by size, not by the bytes of their URL, so each
        // one adds the model's per-image maximum to the input bound.
        let images = count_images(obj)?;
        let image_tokens = if images == 0 {
            0
        } else {
            let per_image = price.image_input_tokens_max.ok_or_else(|| {
                unreadable(format!(
                    "keycap cannot bound the cost of image input for model {:?}",
                    clip(model)
                ))
            })?;
            per_image.saturating_mul(images)
        };
        let body_len = u64::try_from(req.body.len()).unwrap_or(u64::MAX);
        let input_max = body_len.saturating_add(image_tokens);

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
        Ok(Quote {
            reserve,
            detail,
            streaming,
            kind: QuoteKind::OpenAiChat {
                model: model.to_string(),
                price: price.clone(),
            },
            forward_body: None,
        })
    }
}

/// Refuses request features billed outside input and output text tokens.
fn refuse_unbounded_features(obj: &serde_json::Map<String, Value>) -> Result<(), PricingError> {
    let present = |k: &str| obj.get(k).is_some_and(|v| !v.is_null());
    if present("audio") {
        return Err(unreadable("keycap cannot price audio output"));
    }
    if let Some(m) = obj.get("modalities").filter(|v| !v.is_null()) {
        let text_only = m
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x.as_str() == Some("text")));
        if !text_only {
            return Err(unreadable("keycap can only price text output modalities"));
        }
    }
    if present("web_search_options") {
        return Err(unreadable("keycap cannot price web search calls"));
    }
    Ok(())
}

/// Counts image parts in the messages; refuses parts it cannot bound.
fn count_images(obj: &serde_json::Map<String, Value>) -> Result<u64, PricingError> {
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| unreadable("request needs a \"messages\" array"))?;
    let mut images = 0u64;
    for msg in messages {
        let parts = match msg.get("content") {
            Some(Value::Array(parts)) => parts,
            _ => continue,
        };
        for part in parts {
            match part.get("type").and_then(Value::as_str) {
                Some("text") | Some("refusal") => {}
                Some("image_url") => images += 1,
                Some(other) => {
                    return Err(unreadable(format!(
                        "keycap cannot price {:?} message content",
                        clip(other)
                    )))
                }
                None => return Err(unreadable("message content part has no type")),
            }
        }
    }
    Ok(images)
}

/// Token counts a response reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Usage {
    input: u64,
    cached: u64,
    output: u64,
}

impl Usage {
    /// Reads an OpenAI `usage` object; `None` unless both counts are present
    /// and are non-negative integers.
    fn from_value(usage: &Value) -> Option<Usage> {
        let input = usage.get("prompt_tokens")?.as_u64()?;
        let output = usage.get("completion_tokens")?.as_u64()?;
        let cached = usage
            .get("prompt_tokens_details")
            .and_then(|d| d.get("cached_tokens"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        Some(Usage {
            input,
            cached,
            output,
        })
    }
}

fn settle_usage(quote: &Quote, status: u16, usage: Option<Usage>) -> Settlement {
    let QuoteKind::OpenAiChat { model, price } = &quote.kind else {
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

impl PriceModel for OpenAiPricing {
    fn quote(&self, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
        match (req.method, req.path) {
            ("POST", "/v1/chat/completions") => self.quote_chat(req),
            ("GET" | "HEAD", _) => Ok(free_quote(false)),
            (method, path) => Err(unreadable(format!(
                "keycap cannot price {} {} for profile openai",
                clip(method),
                clip(path)
            ))),
        }
    }

    fn settle(&self, quote: &Quote, status: u16, body: &[u8]) -> Settlement {
        let usage = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.get("usage").and_then(Usage::from_value));
        settle_usage(quote, status, usage)
    }

    fn stream_settler(&self, quote: &Quote) -> Box<dyn StreamSettler> {
        Box::new(ChatStreamSettler {
            quote: quote.clone(),
            reader: SseReader::new(),
            usage: None,
        })
    }
}

/// Watches a streamed chat completion for the chunk that carries `usage`
/// (the last one, when the client set `stream_options.include_usage`).
struct ChatStreamSettler {
    quote: Quote,
    reader: SseReader,
    usage: Option<Usage>,
}

impl StreamSettler for ChatStreamSettler {
    fn feed(&mut self, chunk: &[u8]) {
        if !matches!(self.quote.kind, QuoteKind::OpenAiChat { .. }) {
            return;
        }
        for data in self.reader.feed(chunk) {
            // Most chunks are content deltas; skip parsing those that cannot
            // carry usage.
            if !data.contains("\"usage\"") {
                continue;
            }
            if let Some(u) = serde_json::from_str::<Value>(&data)
                .ok()
                .and_then(|v| v.get("usage").and_then(Usage::from_value))
            {
                self.usage = Some(u);
            }
        }
    }

    fn finish(self: Box<Self>, status: u16) -> Settlement {
        settle_usage(&self.quote, status, self.usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::ceil_cost;
    use crate::pricing::ModelPrice;
    use crate::pricing::Outcome;
    use keycap_proto::Micros;

    const JSON: Option<&str> = Some("application/json");

    fn pricing() -> OpenAiPricing {
        OpenAiPricing::new(Arc::new(builtin_prices()))
    }

    fn chat(body: &str) -> PriceRequest<'_> {
        PriceRequest {
            headers: crate::pricing::no_headers(),
            method: "POST",
            path: "/v1/chat/completions",
            query: None,
            content_type: JSON,
            body: body.as_bytes(),
        }
    }

    fn quote(body: &str) -> Result<Quote, PricingError> {
        pricing().quote(&chat(body))
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
    fn reserve_is_body_bytes_plus_max_output() {
        let body =
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":100}"#;
        let q = quote(body).unwrap();
        let n = body.len() as u64;
        assert_eq!(
            q.reserve,
            Micros(ceil_cost(n, 2_500_000) + ceil_cost(100, 10_000_000))
        );
        assert_eq!(q.detail["input_tokens_max"], n);
        assert_eq!(q.detail["output_tokens_max"], 100);
        assert_eq!(q.detail["priced_as"], "gpt-4o");
        assert!(!q.streaming);
        match &q.kind {
            QuoteKind::OpenAiChat { model, price } => {
                assert_eq!(model, "gpt-4o");
                assert_eq!(price.input, Micros(2_500_000));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn output_bound_defaults_and_caps_at_model_max() {
        let base = r#""model":"gpt-4o-mini","messages":[]"#;
        let out = |extra: &str| {
            quote(&format!("{{{base}{extra}}}")).unwrap().detail["output_tokens_max"]
                .as_u64()
                .unwrap()
        };
        assert_eq!(out(""), 16384);
        assert_eq!(out(r#","max_tokens":null"#), 16384);
        assert_eq!(out(r#","max_tokens":10"#), 10);
        assert_eq!(out(r#","max_completion_tokens":20"#), 20);
        assert_eq!(out(r#","max_completion_tokens":20,"max_tokens":30"#), 30);
        assert_eq!(out(r#","max_tokens":1000000"#), 16384);
        assert_eq!(out(r#","max_tokens":10,"n":3"#), 30);
    }

    #[test]
    fn malformed_limits_are_refused() {
        for extra in [
            r#","max_tokens":0"#,
            r#","max_tokens":-1"#,
            r#","max_tokens":1.5"#,
            r#","max_tokens":10.0"#,
            r#","max_tokens":"10""#,
            r#","max_completion_tokens":true"#,
            r#","n":0"#,
            r#","n":129"#,
            r#","n":1.0"#,
            r#","stream":"yes""#,
        ] {
            let body = format!(r#"{{"model":"gpt-4o","messages":[]{extra}}}"#);
            assert_eq!(
                quote(&body).unwrap_err().code(),
                "unpriceable_request",
                "{extra}"
            );
        }
    }

    #[test]
    fn unreadable_bodies_and_unknown_models() {
        for body in [
            "",
            "nope",
            "[]",
            r#"{"messages":[]}"#,
            r#"{"model":"","messages":[]}"#,
            r#"{"model":5,"messages":[]}"#,
            r#"{"model":"gpt-4o"}"#,
            r#"{"model":"gpt-4o","messages":{}}"#,
        ] {
            assert_eq!(
                quote(body).unwrap_err().code(),
                "unpriceable_request",
                "{body}"
            );
        }
        let err = quote(r#"{"model":"gpt-9-ultra","messages":[]}"#).unwrap_err();
        assert_eq!(err.code(), "unknown_model");
        assert!(err.to_string().contains("gpt-9-ultra"));
        let long = format!(r#"{{"model":"{}","messages":[]}}"#, "x".repeat(5000));
        assert!(quote(&long).unwrap_err().to_string().len() < 300);
        let r = PriceRequest {
            headers: crate::pricing::no_headers(),
            content_type: Some("text/plain"),
            ..chat(r#"{"model":"gpt-4o","messages":[]}"#)
        };
        assert_eq!(
            pricing().quote(&r).unwrap_err().code(),
            "unpriceable_request"
        );
        let r = PriceRequest {
            headers: crate::pricing::no_headers(),
            content_type: None,
            ..chat(r#"{"model":"gpt-4o","messages":[]}"#)
        };
        assert!(pricing().quote(&r).is_ok());
    }

    #[test]
    fn streaming_flag() {
        assert!(
            quote(r#"{"model":"o3","messages":[],"stream":true}"#)
                .unwrap()
                .streaming
        );
        assert!(
            !quote(r#"{"model":"o3","messages":[],"stream":false}"#)
                .unwrap()
                .streaming
        );
        assert!(
            !quote(r#"{"model":"o3","messages":[],"stream":null}"#)
                .unwrap()
                .streaming
        );
    }

    #[test]
    fn images_add_their_bound_and_other_media_is_refused() {
        let body = r#"{"model":"gpt-4o","max_tokens":1,"messages":[{"role":"user","content":[
            {"type":"text","text":"what is this"},
            {"type":"image_url","image_url":{"url":"https://x/a.png"}},
            {"type":"image_url","image_url":{"url":"https://x/b.png"}}]}]}"#;
        let q = quote(body).unwrap();
        let input = body.len() as u64 + 2 * 1445;
        assert_eq!(q.detail["input_tokens_max"], input);
        assert_eq!(q.detail["images"], 2);
        assert_eq!(
            q.reserve,
            Micros(ceil_cost(input, 2_500_000) + ceil_cost(1, 10_000_000))
        );
        // o3-mini has no image bound in the table, so images are refused.
        let no_vision = body.replace("gpt-4o", "o3-mini");
        assert_eq!(quote(&no_vision).unwrap_err().code(), "unpriceable_request");
        for part in [
            r#"{"type":"input_audio","input_audio":{"data":"AA==","format":"wav"}}"#,
            r#"{"type":"file","file":{"file_id":"f"}}"#,
            r#"{"type":"video"}"#,
            r#"{"text":"untyped"}"#,
        ] {
            let body = format!(
                r#"{{"model":"gpt-4o","messages":[{{"role":"user","content":[{part}]}}]}}"#
            );
            assert_eq!(
                quote(&body).unwrap_err().code(),
                "unpriceable_request",
                "{part}"
            );
        }
    }

    #[test]
    fn features_billed_elsewhere_are_refused() {
        for extra in [
            r#","audio":{"voice":"alloy","format":"wav"}"#,
            r#","modalities":["text","audio"]"#,
            r#","modalities":"text""#,
            r#","web_search_options":{}"#,
        ] {
            let body = format!(r#"{{"model":"gpt-4o","messages":[]{extra}}}"#);
            assert_eq!(
                quote(&body).unwrap_err().code(),
                "unpriceable_request",
                "{extra}"
            );
        }
        assert!(
            quote(r#"{"model":"gpt-4o","messages":[],"modalities":["text"],"audio":null}"#).is_ok()
        );
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
            ("POST", "/v1/embeddings"),
            ("POST", "/v1/responses"),
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
    fn settles_from_usage() {
        let p = pricing();
        let q = quote(r#"{"model":"gpt-4o","messages":[],"max_tokens":500}"#).unwrap();
        let body = br#"{"id":"x","model":"gpt-4o-2024-08-06","usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;
        let s = p.settle(&q, 200, body);
        assert_eq!(s.outcome, Outcome::Settled);
        assert_eq!(
            s.cost,
            Micros(ceil_cost(12, 2_500_000) + ceil_cost(7, 10_000_000))
        );
        assert_eq!(s.cost, Micros(30 + 70));
        assert_eq!(s.detail["input_tokens"], 12);
        assert_eq!(s.detail["output_tokens"], 7);
        assert_eq!(s.detail["model"], "gpt-4o");
        assert!(s.cost <= q.reserve);
        assert!(s.detail.get("exceeded_reservation").is_none());
    }

    #[test]
    fn settlement_rounds_up_to_a_micro() {
        let p = pricing();
        let q = quote(r#"{"model":"gpt-4o-mini","messages":[]}"#).unwrap();
        // 1 token at $0.15/M is 0.15 micros: rounds up to 1, never 0.
        let s = p.settle(
            &q,
            200,
            br#"{"usage":{"prompt_tokens":1,"completion_tokens":0}}"#,
        );
        assert_eq!(s.cost, Micros(1));
        let s = p.settle(
            &q,
            200,
            br#"{"usage":{"prompt_tokens":0,"completion_tokens":0}}"#,
        );
        assert_eq!((s.cost, s.outcome), (Micros(0), Outcome::Settled));
    }

    #[test]
    fn cached_tokens_are_cheaper_but_bounded() {
        let p = pricing();
        let q = quote(r#"{"model":"gpt-4o","messages":[]}"#).unwrap();
        let body = br#"{"usage":{"prompt_tokens":1000,"completion_tokens":0,"prompt_tokens_details":{"cached_tokens":400}}}"#;
        let s = p.settle(&q, 200, body);
        // 600 * 2.50 + 400 * 1.25 per million.
        assert_eq!(s.cost, Micros(1_500 + 500));
        assert_eq!(s.detail["cached_input_tokens"], 400);
        // More cached than prompt tokens is clamped, not a negative count.
        let body = br#"{"usage":{"prompt_tokens":10,"completion_tokens":0,"prompt_tokens_details":{"cached_tokens":99}}}"#;
        assert_eq!(p.settle(&q, 200, body).cost, Micros(13));
    }

    #[test]
    fn settlement_never_exceeds_reservation_within_bounds() {
        // Exhaustive over small counts with prices chosen to round badly.
        let price = ModelPrice {
            input: Micros(333_333),
            cached_input: Some(Micros(111_111)),
            output: Micros(1_234_567),
            cache_write: None,
            cache_write_1h: None,
            max_output_tokens: 40,
            image_input_tokens_max: None,
        };
        for in_max in 0..40u64 {
            for out_max in 0..40u64 {
                let reserve = price.cost(in_max, 0, out_max).unwrap();
                for i in 0..=in_max {
                    for c in [0, i / 2, i] {
                        for o in [0, out_max / 3, out_max] {
                            let cost = price.cost(i, c, o).unwrap();
                            assert!(cost <= reserve, "{i},{c},{o} vs {in_max},{out_max}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn missing_usage_settles_at_reservation_failures_release() {
        let p = pricing();
        let q = quote(r#"{"model":"gpt-4o","messages":[]}"#).unwrap();
        assert!(q.reserve > Micros::ZERO);
        for body in [
            &b"{}"[..],
            b"not json",
            br#"{"usage":null}"#,
            br#"{"usage":{"prompt_tokens":5}}"#,
            br#"{"usage":{"prompt_tokens":-5,"completion_tokens":1}}"#,
            br#"{"usage":{"prompt_tokens":"5","completion_tokens":1}}"#,
        ] {
            let s = p.settle(&q, 200, body);
            assert_eq!(
                (s.cost, s.outcome),
                (q.reserve, Outcome::SettledAtReservation)
            );
        }
        for status in [400, 401, 404, 429, 500, 503] {
            let s = p.settle(
                &q,
                status,
                br#"{"usage":{"prompt_tokens":5,"completion_tokens":1}}"#,
            );
            assert_eq!(
                (s.cost, s.outcome),
                (Micros::ZERO, Outcome::Released),
                "{status}"
            );
        }
    }

    #[test]
    fn usage_beyond_bounds_is_recorded_at_true_cost() {
        let p = pricing();
        let q = quote(r#"{"model":"gpt-4o","messages":[],"max_tokens":1}"#).unwrap();
        let s = p.settle(
            &q,
            200,
            br#"{"usage":{"prompt_tokens":100000,"completion_tokens":100000}}"#,
        );
        assert!(s.cost > q.reserve);
        assert_eq!(s.outcome, Outcome::Settled);
        assert_eq!(s.detail["exceeded_reservation"], true);
    }

    const STREAM: &str = "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n\
        data: {\"id\":\"c\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
        data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":4,\"total_tokens\":24}}\n\n\
        data: [DONE]\n\n";

    #[test]
    fn stream_settles_from_final_usage_chunk_at_any_split() {
        let p = pricing();
        let q = quote(r#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#)
            .unwrap();
        assert!(q.streaming);
        let expected = Micros(ceil_cost(20, 2_500_000) + ceil_cost(4, 10_000_000));
        let bytes = STREAM.as_bytes();
        for cut in (0..bytes.len()).step_by(7) {
            let mut st = p.stream_settler(&q);
            st.feed(&bytes[..cut]);
            st.feed(&bytes[cut..]);
            let s = st.finish(200);
            assert_eq!(
                (s.cost, s.outcome),
                (expected, Outcome::Settled),
                "cut {cut}"
            );
            assert_eq!(s.detail["input_tokens"], 20);
        }
        let mut st = p.stream_settler(&q);
        for b in bytes {
            st.feed(std::slice::from_ref(b));
        }
        assert_eq!(st.finish(200).cost, expected);
    }

    #[test]
    fn stream_without_usage_or_cut_short() {
        let p = pricing();
        let q = quote(r#"{"model":"gpt-4o","messages":[],"stream":true}"#).unwrap();
        let no_usage = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n";
        let mut st = p.stream_settler(&q);
        st.feed(no_usage.as_bytes());
        let s = st.finish(200);
        assert_eq!(
            (s.cost, s.outcome),
            (q.reserve, Outcome::SettledAtReservation)
        );
        // The usage chunk arrives without its terminating blank line: the
        // event never completed, so it is not trusted.
        let cut = STREAM.find("data: [DONE]").unwrap() - 2;
        let mut st = p.stream_settler(&q);
        st.feed(&STREAM.as_bytes()[..cut]);
        assert_eq!(st.finish(200).outcome, Outcome::SettledAtReservation);
        let mut st = p.stream_settler(&q);
        st.feed(STREAM.as_bytes());
        assert_eq!(st.finish(500).outcome, Outcome::Released);
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
        st.feed(STREAM.as_bytes());
        let s = st.finish(200);
        assert_eq!((s.cost, s.outcome), (Micros::ZERO, Outcome::Settled));
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
