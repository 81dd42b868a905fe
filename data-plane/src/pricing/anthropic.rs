//! Anthropic pricing.
//!
//! Owns the cost of Anthropic calls: `POST /v1/messages` reserves an upper
//! bound of its token cost and settles from the `usage` the response
//! reports — the JSON body's, or for a streamed (SSE) response the one in
//! `message_start` completed by the last `message_delta`. Token counting
//! (`POST /v1/messages/count_tokens`) and `GET` calls are free.
//!
//! It must never under-reserve a call it lets through: the input bound is
//! the body's byte length (a token is at least one byte), plus a per-image
//! bound, plus the system prompt Anthropic adds for tool use; every input
//! token is reserved at the dearest input price the model has (a cache write
//! costs more than plain input). The output bound is `max_tokens`, which
//! Anthropic requires and which includes any extended-thinking budget.
//! Server tools billed per use (web search, code execution), Anthropic-
//! defined client tools whose hidden prompts it cannot bound, and document
//! (PDF) input are refused. A successful response without readable usage
//! settles at the reservation, never at 0.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{
    clip, free_quote, json_body, mul_div_ceil, positive_int, settle_fixed, settle_reported,
    unreadable, PriceModel, PriceRequest, PricingError, Quote, QuoteKind, Settlement,
    StreamSettler,
};
use crate::sse::SseReader;
use keycap_proto::prices::{ModelPrice, TokenPrices, TOKENS_PER_UNIT};

const BUILTIN_TABLE: &str = include_str!("../../prices/anthropic.json");

/// Tokens Anthropic adds to a request's input when it defines tools (its
/// tool-use system prompt is documented at a few hundred tokens per model;
/// this bound sits well above all of them).
pub const TOOL_PROMPT_TOKENS_MAX: u64 = 1_000;

/// The Anthropic price table shipped with this build.
pub fn builtin_prices() -> TokenPrices {
    TokenPrices::from_json(BUILTIN_TABLE).expect("the built-in Anthropic price table is valid")
}

/// The Anthropic price model over a (shared, possibly operator-supplied)
/// table.
#[derive(Debug, Clone)]
pub struct AnthropicPricing {
    prices: Arc<TokenPrices>,
}

impl AnthropicPricing {
    pub fn new(prices: Arc<TokenPrices>) -> Self {
        AnthropicPricing { prices }
    }

    fn quote_messages(&self, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
        let body = json_body(req, "messages")?;
        let obj = body
            .as_object()
            .ok_or_else(|| unreadable("request body must be a JSON object"))?;
        let model = obj
            .get("model")
            .and_then(Value::as_str)
            .ok_or_else(|| unreadable("\"model\" must be a string"))?;
        let (priced_as, price) = self.prices.lookup(model).ok_or_else(|| {
            PricingError::UnknownModel(format!(
                "model {:?} is not in keycap's Anthropic price table",
                clip(model)
            ))
        })?;
        let max_tokens = positive_int(obj, "max_tokens")?
            .ok_or_else(|| unreadable("\"max_tokens\" is required to bound the call's cost"))?;
        let streaming = match obj.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(unreadable("\"stream\" must be true or false")),
        };
        let tool_prompt = tool_prompt_bound(obj)?;
        let mut images = 0u64;
        for field in ["system", "messages"] {
            if let Some(v) = obj.get(field) {
                count_media(v, &mut images)?;
            }
        }
        let image_tokens = match (images, price.image_input_tokens_max) {
            (0, _) => 0,
            (n, Some(per_image)) => n.saturating_mul(per_image),
            (_, None) => {
                return Err(unreadable(format!(
                    "keycap cannot bound image input for model {:?}",
                    clip(model)
                )))
            }
        };
        let input_max = (req.body.len() as u64)
            .saturating_add(image_tokens)
            .saturating_add(tool_prompt);
        let output_max = max_tokens.min(price.max_output_tokens);
        let reserve = bound_cost(price, input_max, output_max)
            .ok_or_else(|| unreadable("request is too large to price"))?;
        Ok(Quote {
            reserve,
            detail: json!({
                "model": model,
                "priced_as": priced_as,
                "input_tokens_max": input_max,
                "output_tokens_max": output_max,
                "images": images,
            }),
            streaming,
            kind: QuoteKind::AnthropicMessages {
                model: model.to_string(),
                price: price.clone(),
            },
            forward_body: None,
        })
    }
}

/// Every input token at the dearest input price, plus the output bound.
fn bound_cost(price: &ModelPrice, input_max: u64, output_max: u64) -> Option<keycap_proto::Micros> {
    let input = mul_div_ceil(
        i128::from(input_max),
        i128::from(price.max_input_price().0),
        TOKENS_PER_UNIT,
    )?;
    let output = mul_div_ceil(
        i128::from(output_max),
        i128::from(price.output.0),
        TOKENS_PER_UNIT,
    )?;
    keycap_proto::Micros(input).checked_add(keycap_proto::Micros(output))
}

/// The hidden tool-use prompt's bound when the request defines tools; a
/// tool of any type other than a custom one (server tools billed per use,
/// Anthropic-defined client tools with their own hidden prompts) is refused.
fn tool_prompt_bound(obj: &serde_json::Map<String, Value>) -> Result<u64, PricingError> {
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => return Ok(0),
        Some(Value::Array(t)) => t,
        Some(_) => return Err(unreadable("\"tools\" must be an array")),
    };
    for tool in tools {
        match tool.get("type") {
            None | Some(Value::Null) => {}
            Some(Value::String(t)) if t == "custom" => {}
            Some(t) => {
                return Err(unreadable(format!(
                    "keycap cannot price tool type {}: only custom tools are priced",
                    clip(&t.to_string())
                )))
            }
        }
    }
    Ok(if tools.is_empty() {
        0
    } else {
        TOOL_PROMPT_TOKENS_MAX
    })
}

/// Counts image blocks anywhere in `v` (message content, tool results) and
/// refuses document blocks, whose page count the body does not state. The
/// model's own tool calls (`tool_use` inputs) are data, not media.
fn count_media(v: &Value, images: &mut u64) -> Result<(), PricingError> {
    match v {
        Value::Array(items) => items.iter().try_for_each(|i| count_media(i, images)),
        Value::Object(o) => {
            match o.get("type").and_then(Value::as_str) {
                Some("image") => *images += 1,
                Some("document") => {
                    return Err(unreadable("keycap cannot price document (PDF) input"))
                }
                Some("tool_use" | "server_tool_use") => return Ok(()),
                _ => {}
            }
            o.values().try_for_each(|x| count_media(x, images))
        }
        _ => Ok(()),
    }
}

/// Token counts an Anthropic response reports, by class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Usage {
    /// Input tokens not read from or written to the cache.
    input: u64,
    cache_read: u64,
    /// Cache writes at the five-minute price.
    cache_write: u64,
    /// Cache writes at the one-hour price (and any write whose duration the
    /// response does not say).
    cache_write_1h: u64,
    output: u64,
}

impl Usage {
    /// Applies the fields present in a `usage` object; a later object (a
    /// stream's `message_delta`) overrides an earlier one field by field.
    /// `None` if a present field is not a non-negative integer.
    fn apply(&mut self, usage: &Value) -> Option<()> {
        let field = |name: &str| -> Option<Option<u64>> {
            match usage.get(name) {
                None | Some(Value::Null) => Some(None),
                Some(v) => v.as_u64().map(Some),
            }
        };
        if let Some(n) = field("input_tokens")? {
            self.input = n;
        }
        if let Some(n) = field("cache_read_input_tokens")? {
            self.cache_read = n;
        }
        if let Some(n) = field("output_tokens")? {
            self.output = n;
        }
        if let Some(total) = field("cache_creation_input_tokens")? {
            // The split by duration, when the response gives it; whatever
            // it does not account for is priced as the dearer write.
            let split = usage.get("cache_creation");
            let part = |k: &str| {
                split
                    .and_then(|s| s.get(k))
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
            };
            let five = part("ephemeral_5m_input_tokens").min(total);
            self.cache_write = five;
            self.cache_write_1h = total - five;
        }
        Some(())
    }

    fn from_value(usage: &Value) -> Option<Usage> {
        usage.get("input_tokens")?;
        usage.get("output_tokens")?;
        let mut u = Usage::default();
        u.apply(usage)?;
        Some(u)
    }

    fn cost(&self, price: &ModelPrice) -> Option<keycap_proto::Micros> {
        let read = price.cached_input.unwrap_or(price.input);
        let write = price.cache_write.unwrap_or(price.input);
        let write_1h = price.cache_write_1h.unwrap_or(write).max(write);
        // One rounding for all input, as for the reservation's bound.
        let classes = [
            (self.input, price.input),
            (self.cache_read, read),
            (self.cache_write, write),
            (self.cache_write_1h, write_1h),
        ];
        let mut numer: i128 = 0;
        for (tokens, p) in classes {
            numer = numer.checked_add(i128::from(tokens).checked_mul(i128::from(p.0))?)?;
        }
        let input = mul_div_ceil(numer, 1, TOKENS_PER_UNIT)?;
        let output = mul_div_ceil(
            i128::from(self.output),
            i128::from(price.output.0),
            TOKENS_PER_UNIT,
        )?;
        keycap_proto::Micros(input).checked_add(keycap_proto::Micros(output))
    }
}

fn settle_usage(quote: &Quote, status: u16, usage: Option<Usage>) -> Settlement {
    let QuoteKind::AnthropicMessages { model, price } = &quote.kind else {
        return settle_fixed(quote, status);
    };
    settle_reported(quote, status, usage, |u| {
        let mut detail = json!({
            "model": model,
            "input_tokens": u.input,
            "output_tokens": u.output,
        });
        for (name, n) in [
            ("cache_read_input_tokens", u.cache_read),
            ("cache_write_input_tokens", u.cache_write),
            ("cache_write_1h_input_tokens", u.cache_write_1h),
        ] {
            if n > 0 {
                detail[name] = n.into();
            }
        }
        (u.cost(price), detail)
    })
}

impl PriceModel for AnthropicPricing {
    fn check_write_query(&self, req: &PriceRequest<'_>) -> Result<(), PricingError> {
        // Anthropic's SDKs send beta calls as `POST /v1/messages?beta=true`;
        // the betas themselves are named in the anthropic-beta header.
        super::write_query_within(req, |name, value| (name, value) == ("beta", "true"))
    }

    fn quote(&self, req: &PriceRequest<'_>) -> Result<Quote, PricingError> {
        match (req.method, req.path) {
            ("POST", "/v1/messages") => self.quote_messages(req),
            ("POST", "/v1/messages/count_tokens") | ("GET" | "HEAD", _) => Ok(free_quote(false)),
            (method, path) => Err(unreadable(format!(
                "keycap cannot price {} {} for profile anthropic",
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
        Box::new(MessageStreamSettler {
            quote: quote.clone(),
            reader: SseReader::new(),
            usage: None,
            finished: false,
        })
    }
}

/// Follows a streamed message: `message_start` carries the input usage,
/// each `message_delta` the cumulative output (and, from newer API
/// versions, updated input counts). Only a stream that reached a
/// `message_delta` with usage has a final count.
struct MessageStreamSettler {
    quote: Quote,
    reader: SseReader,
    usage: Option<Usage>,
    finished: bool,
}

impl StreamSettler for MessageStreamSettler {
    fn feed(&mut self, chunk: &[u8]) {
        if !matches!(self.quote.kind, QuoteKind::AnthropicMessages { .. }) {
            return;
        }
        for data in self.reader.feed(chunk) {
            if !data.contains("\"usage\"") {
                continue;
            }
            let Ok(event) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            match event.get("type").and_then(Value::as_str) {
                Some("message_start") => {
                    self.usage = event.pointer("/message/usage").and_then(Usage::from_value);
                }
                Some("message_delta") => {
                    let (Some(u), Some(delta)) = (self.usage.as_mut(), event.get("usage")) else {
                        continue;
                    };
                    if u.apply(delta).is_some() && delta.get("output_tokens").is_some() {
                        self.finished = true;
                    } else {
                        // A usage object it cannot read: the count is lost.
                        self.usage = None;
                    }
                }
                _ => {}
            }
        }
    }

    fn finish(self: Box<Self>, status: u16) -> Settlement {
        let usage = self.usage.filter(|_| self.finished);
        settle_usage(&self.quote, status, usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::ceil_cost;
    use crate::pricing::Outcome;
    use keycap_proto::Micros;

    const JSON: Option<&str> = Some("application/json");

    fn pricing() -> AnthropicPricing {
        AnthropicPricing::new(Arc::new(builtin_prices()))
    }

    fn messages(body: &str) -> PriceRequest<'_> {
        PriceRequest {
            headers: crate::pricing::no_headers(),
            method: "POST",
            path: "/v1/messages",
            query: None,
            content_type: JSON,
            body: body.as_bytes(),
        }
    }

    fn quote(body: &str) -> Result<Quote, PricingError> {
        pricing().quote(&messages(body))
    }

    const SONNET: &str = r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"Hello, Claude"}]}"#;

    #[test]
    fn builtin_table_prices_current_models_and_snapshots() {
        let t = builtin_prices();
        for m in [
            "claude-opus-4-5",
            "claude-opus-4-1",
            "claude-sonnet-4-5",
            "claude-sonnet-4-5-20250929",
            "claude-sonnet-4-20250514",
            "claude-haiku-4-5-20251001",
            "claude-3-5-haiku-20241022",
        ] {
            assert!(t.lookup(m).is_some(), "{m}");
        }
        assert_eq!(
            t.lookup("claude-sonnet-4-20250514").unwrap().0,
            "claude-sonnet-4"
        );
        assert_eq!(
            t.lookup("claude-sonnet-4-5-20250929").unwrap().0,
            "claude-sonnet-4-5"
        );
        // A differently priced sibling never falls back to another model.
        for m in [
            "claude-sonnet-4-6",
            "claude-opus",
            "claude-2.1",
            "claude-sonnet-4-",
        ] {
            assert!(t.lookup(m).is_none(), "{m}");
        }
        let (_, p) = t.lookup("claude-sonnet-4-5").unwrap();
        assert_eq!(p.input, Micros(3_000_000));
        assert_eq!(p.cache_write, Some(Micros(3_750_000)));
        assert_eq!(p.cache_write_1h, Some(Micros(6_000_000)));
        assert_eq!(p.cached_input, Some(Micros(300_000)));
        assert_eq!(p.output, Micros(15_000_000));
        assert_eq!(p.max_input_price(), Micros(6_000_000));
        assert!(!t.has_default());
    }

    #[test]
    fn reserve_is_body_bytes_at_the_dearest_input_price_plus_max_tokens() {
        let q = quote(SONNET).unwrap();
        let n = SONNET.len() as u64;
        assert_eq!(
            q.reserve,
            Micros(ceil_cost(n, 6_000_000) + ceil_cost(1024, 15_000_000))
        );
        assert_eq!(q.detail["input_tokens_max"], n);
        assert_eq!(q.detail["output_tokens_max"], 1024);
        assert_eq!(q.detail["priced_as"], "claude-sonnet-4-5");
        assert!(!q.streaming);
        assert!(matches!(q.kind, QuoteKind::AnthropicMessages { .. }));
        // The model's own limit caps an oversized max_tokens.
        let big = SONNET.replace("1024", "1000000");
        assert_eq!(quote(&big).unwrap().detail["output_tokens_max"], 64000);
        let streamed = SONNET.replace("\"max_tokens\"", "\"stream\":true,\"max_tokens\"");
        assert!(quote(&streamed).unwrap().streaming);
    }

    #[test]
    fn images_and_tools_add_their_bounds_and_the_unboundable_is_refused() {
        let image = r#"{"type":"image","source":{"type":"url","url":"https://example.com/a.png"}}"#;
        let body = format!(
            r#"{{"model":"claude-haiku-4-5","max_tokens":10,"messages":[{{"role":"user","content":[{image},{{"type":"tool_result","tool_use_id":"t","content":[{image}]}}]}}]}}"#
        );
        let q = quote(&body).unwrap();
        assert_eq!(q.detail["images"], 2);
        assert_eq!(q.detail["input_tokens_max"], body.len() as u64 + 3200);

        let tools = SONNET.replace(
            "\"messages\"",
            r#""tools":[{"name":"get_weather","input_schema":{"type":"object"}}],"messages""#,
        );
        let q = quote(&tools).unwrap();
        assert_eq!(
            q.detail["input_tokens_max"],
            tools.len() as u64 + TOOL_PROMPT_TOKENS_MAX
        );
        // A tool_use block's input is the model's data, not media.
        let tool_use = SONNET.replace(
            r#""content":"Hello, Claude""#,
            r#""content":[{"type":"tool_use","id":"t","name":"x","input":{"type":"document"}}]"#,
        );
        assert_eq!(quote(&tool_use).unwrap().detail["images"], 0);

        for (what, body) in [
            (
                "server tool",
                SONNET.replace(
                    "\"messages\"",
                    r#""tools":[{"type":"web_search_20250305","name":"web_search"}],"messages""#,
                ),
            ),
            (
                "client tool with a hidden prompt",
                SONNET.replace(
                    "\"messages\"",
                    r#""tools":[{"type":"bash_20250124","name":"bash"}],"messages""#,
                ),
            ),
            (
                "document",
                SONNET.replace(
                    r#""content":"Hello, Claude""#,
                    r#""content":[{"type":"document","source":{"type":"url","url":"https://example.com/a.pdf"}}]"#,
                ),
            ),
        ] {
            let err = quote(&body).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{what}");
        }
    }

    #[test]
    fn bad_requests_are_refused_before_forwarding() {
        let cases = [
            ("not json", "unpriceable_request"),
            ("[]", "unpriceable_request"),
            (r#"{"max_tokens":10,"messages":[]}"#, "unpriceable_request"),
            (
                r#"{"model":"claude-sonnet-4-5","messages":[]}"#,
                "unpriceable_request",
            ),
            (
                r#"{"model":"claude-sonnet-4-5","max_tokens":0,"messages":[]}"#,
                "unpriceable_request",
            ),
            (
                r#"{"model":"claude-sonnet-4-5","max_tokens":1.5,"messages":[]}"#,
                "unpriceable_request",
            ),
            (
                r#"{"model":"claude-sonnet-4-5","max_tokens":10,"stream":"yes"}"#,
                "unpriceable_request",
            ),
            (
                r#"{"model":"claude-sonnet-4-5","max_tokens":10,"tools":{}}"#,
                "unpriceable_request",
            ),
            (
                r#"{"model":"claude-next","max_tokens":10,"messages":[]}"#,
                "unknown_model",
            ),
        ];
        for (body, code) in cases {
            assert_eq!(quote(body).unwrap_err().code(), code, "{body}");
        }
        let form = PriceRequest {
            headers: crate::pricing::no_headers(),
            content_type: Some("application/x-www-form-urlencoded"),
            ..messages(SONNET)
        };
        assert!(pricing().quote(&form).is_err());
        for (method, path) in [("POST", "/v1/messages/batches"), ("POST", "/v1/complete")] {
            let r = PriceRequest {
                headers: crate::pricing::no_headers(),
                method,
                path,
                ..messages(SONNET)
            };
            assert_eq!(
                pricing().quote(&r).unwrap_err().code(),
                "unpriceable_request"
            );
        }
        for (method, path) in [("POST", "/v1/messages/count_tokens"), ("GET", "/v1/models")] {
            let r = PriceRequest {
                headers: crate::pricing::no_headers(),
                method,
                path,
                ..messages(SONNET)
            };
            assert_eq!(pricing().quote(&r).unwrap().reserve, Micros::ZERO);
        }
    }

    #[test]
    fn settles_from_usage_by_token_class() {
        let q = quote(SONNET).unwrap();
        let body = r#"{"id":"msg_1","type":"message","usage":{"input_tokens":10,"cache_creation_input_tokens":100,"cache_read_input_tokens":1000,"output_tokens":20,"cache_creation":{"ephemeral_5m_input_tokens":60,"ephemeral_1h_input_tokens":40}}}"#;
        let s = pricing().settle(&q, 200, body.as_bytes());
        let numer = 10 * 3_000_000i128 + 1000 * 300_000 + 60 * 3_750_000 + 40 * 6_000_000;
        let input = i64::try_from((numer + 999_999) / 1_000_000).unwrap();
        assert_eq!(s.cost, Micros(input + ceil_cost(20, 15_000_000)));
        assert_eq!(s.outcome, Outcome::Settled);
        assert_eq!(s.detail["cache_read_input_tokens"], 1000);
        assert_eq!(s.detail["cache_write_input_tokens"], 60);
        assert_eq!(s.detail["cache_write_1h_input_tokens"], 40);
        assert!(s.cost <= q.reserve);

        // Without the split, every write is priced as the dearer one.
        let unsplit =
            r#"{"usage":{"input_tokens":0,"cache_creation_input_tokens":100,"output_tokens":0}}"#;
        let s = pricing().settle(&q, 200, unsplit.as_bytes());
        assert_eq!(s.cost, Micros(ceil_cost(100, 6_000_000)));
    }

    #[test]
    fn failures_release_and_missing_usage_settles_at_reservation() {
        let q = quote(SONNET).unwrap();
        for status in [400, 401, 429, 500, 529] {
            let s = pricing().settle(&q, status, br#"{"type":"error"}"#);
            assert_eq!(
                (s.cost, s.outcome),
                (Micros::ZERO, Outcome::Released),
                "{status}"
            );
        }
        for body in [
            &b"{}"[..],
            b"not json",
            br#"{"usage":{"input_tokens":-1,"output_tokens":2}}"#,
        ] {
            let s = pricing().settle(&q, 200, body);
            assert_eq!(s.cost, q.reserve);
            assert_eq!(s.outcome, Outcome::SettledAtReservation);
        }
    }

    #[test]
    fn usage_beyond_the_bounds_is_recorded_at_true_cost_and_flagged() {
        let q = quote(SONNET).unwrap();
        let body = r#"{"usage":{"input_tokens":5000,"output_tokens":5000}}"#;
        let s = pricing().settle(&q, 200, body.as_bytes());
        assert!(s.cost > q.reserve);
        assert_eq!(s.detail["exceeded_reservation"], true);
    }

    /// A streamed message as Anthropic sends it.
    pub(crate) fn stream_body(input: u64, output: u64) -> String {
        let events = [
            (
                "message_start",
                json!({"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-5","stop_reason":null,"usage":{"input_tokens":input,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":1}}}),
            ),
            (
                "content_block_start",
                json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}),
            ),
            ("ping", json!({"type":"ping"})),
            (
                "content_block_delta",
                json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}),
            ),
            (
                "content_block_stop",
                json!({"type":"content_block_stop","index":0}),
            ),
            (
                "message_delta",
                json!({"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":output}}),
            ),
            ("message_stop", json!({"type":"message_stop"})),
        ];
        events
            .iter()
            .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
            .collect()
    }

    #[test]
    fn stream_settles_from_start_and_final_delta_at_any_split() {
        let q = quote(&SONNET.replace("\"max_tokens\"", "\"stream\":true,\"max_tokens\"")).unwrap();
        let body = stream_body(25, 15);
        let want = Micros(ceil_cost(25, 3_000_000) + ceil_cost(15, 15_000_000));
        for split in [1, 7, 64, body.len()] {
            let mut settler = pricing().stream_settler(&q);
            for piece in body.as_bytes().chunks(split) {
                settler.feed(piece);
            }
            let s = settler.finish(200);
            assert_eq!(
                (s.cost, s.outcome),
                (want, Outcome::Settled),
                "split {split}"
            );
            assert_eq!(s.detail["output_tokens"], 15);
        }
    }

    #[test]
    fn a_stream_cut_before_its_final_delta_settles_at_reservation() {
        let q = quote(&SONNET.replace("\"max_tokens\"", "\"stream\":true,\"max_tokens\"")).unwrap();
        let body = stream_body(25, 15);
        let cut = body.find("event: message_delta").unwrap();
        let mut settler = pricing().stream_settler(&q);
        settler.feed(&body.as_bytes()[..cut]);
        let s = settler.finish(200);
        assert_eq!(
            (s.cost, s.outcome),
            (q.reserve, Outcome::SettledAtReservation)
        );
        // An error event mid-stream leaves no final count either.
        let mut settler = pricing().stream_settler(&q);
        settler.feed(&body.as_bytes()[..cut]);
        settler.feed(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\"}}\n\n");
        assert_eq!(settler.finish(200).outcome, Outcome::SettledAtReservation);
    }
}
