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
//! costs more than plain input), at the long-context prices when the input
//! bound is past their threshold, and with the US-only inference surcharge
//! unless the request pins `inference_geo` to `global` (the workspace's
//! default may be `us`). The output bound is `max_tokens`, which Anthropic
//! requires and which includes any extended-thinking budget. Whatever adds
//! billed tokens the body does not hold is refused: server tools billed per
//! use (web search, code execution), Anthropic-defined client tools whose
//! hidden prompts it cannot bound, remote MCP servers (`mcp_servers`), a
//! code-execution `container`, compaction, fast mode, a 1M-token context
//! beta for a model the table has no long-context prices for, and document
//! (PDF) input. A successful response without readable usage settles at the
//! reservation, never at 0.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{
    clip, free_quote, json_body, positive_int, settle_fixed, settle_reported, unreadable,
    PriceModel, PriceRequest, PricingError, Quote, QuoteKind, Settlement, StreamSettler,
    TokenBilling, TokenUse,
};
use crate::sse::SseReader;
use keycap_proto::prices::{ModelPrice, TokenPrices};

/// Tokens Anthropic adds to a request's input when it defines tools (its
/// tool-use system prompt is documented at a few hundred tokens per model;
/// this bound sits well above all of them).
pub const TOOL_PROMPT_TOKENS_MAX: u64 = 1_000;

/// The Anthropic price table shipped with this build.
pub fn builtin_prices() -> TokenPrices {
    TokenPrices::from_json(keycap_proto::prices::shipped::ANTHROPIC)
        .expect("the built-in Anthropic price table is valid")
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
        refuse_unbounded_features(obj)?;
        refuse_unpriced_long_context(req, price, model)?;
        let billing = TokenBilling {
            uplift: match inference_geo(obj)? {
                Some(Geo::Global) => None,
                // The workspace's default geo applies when the request
                // names none, and it may be `us`.
                Some(Geo::Us) | None => price.uplifts.inference_geo_us,
            },
            long_cache_writes: false,
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
        // Every input token at the dearest input price, plus the output bound.
        let reserve = price
            .bound(input_max, output_max, billing.uplift)
            .ok_or_else(|| unreadable("request is too large to price"))?;
        let mut detail = json!({
            "model": model,
            "priced_as": priced_as,
            "input_tokens_max": input_max,
            "output_tokens_max": output_max,
            "images": images,
        });
        if price
            .long_context
            .as_ref()
            .is_some_and(|l| input_max > l.above_input_tokens)
        {
            detail["long_context"] = true.into();
        }
        if let Some(u) = billing.uplift {
            detail["uplift_millionths"] = u.millionths().into();
        }
        Ok(Quote {
            reserve,
            detail,
            streaming,
            kind: QuoteKind::AnthropicMessages {
                model: model.to_string(),
                price: price.clone(),
                billing,
            },
            forward_body: None,
        })
    }
}

/// Where a request asks its inference to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Geo {
    Global,
    Us,
}

fn inference_geo(obj: &serde_json::Map<String, Value>) -> Result<Option<Geo>, PricingError> {
    match obj.get("inference_geo") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(g)) if g == "global" => Ok(Some(Geo::Global)),
        Some(Value::String(g)) if g == "us" => Ok(Some(Geo::Us)),
        Some(other) => Err(unreadable(format!(
            "keycap cannot price inference_geo {}: only \"global\" and \"us\" are priced",
            clip(&other.to_string())
        ))),
    }
}

/// Refuses request fields that add billed tokens or fees the body does not
/// state.
fn refuse_unbounded_features(obj: &serde_json::Map<String, Value>) -> Result<(), PricingError> {
    let present = |k: &str| obj.get(k).is_some_and(|v| !v.is_null());
    if present("mcp_servers") {
        return Err(unreadable(
            "keycap cannot price \"mcp_servers\": the remote servers' tool definitions and \
             results are added to the input, and their size is not in the request",
        ));
    }
    if present("container") {
        return Err(unreadable(
            "keycap cannot price a \"container\": code execution and skills are billed by \
             the container and add content the request does not hold",
        ));
    }
    match obj.get("speed") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "standard" => {}
        Some(other) => {
            return Err(unreadable(format!(
                "keycap cannot price speed {}: fast mode bills a multiple of the table's prices",
                clip(&other.to_string())
            )))
        }
    }
    if let Some(cm) = obj.get("context_management").filter(|v| !v.is_null()) {
        let edits = cm
            .get("edits")
            .and_then(Value::as_array)
            .ok_or_else(|| unreadable("\"context_management.edits\" must be an array"))?;
        for edit in edits {
            let kind = edit.get("type").and_then(Value::as_str).unwrap_or("");
            // Clearing old tool results or thinking only removes input.
            if !(kind.starts_with("clear_tool_uses_") || kind.starts_with("clear_thinking_")) {
                return Err(unreadable(format!(
                    "keycap cannot price context_management edit {:?}: compaction runs a \
                     summarising pass billed on top of the call",
                    clip(kind)
                )));
            }
        }
    }
    Ok(())
}

/// Refuses the 1M-token context beta for a model whose long-context prices
/// the table does not hold: past 200k input tokens such a call is billed
/// at premium prices keycap would not know.
fn refuse_unpriced_long_context(
    req: &PriceRequest<'_>,
    price: &ModelPrice,
    model: &str,
) -> Result<(), PricingError> {
    if price.long_context.is_some() {
        return Ok(());
    }
    let asks = req
        .headers
        .get_all("anthropic-beta")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|beta| beta.trim().starts_with("context-1m"));
    if asks {
        return Err(unreadable(format!(
            "keycap cannot price the 1M-token context beta for model {:?}: its price table \
             has no long-context prices",
            clip(model)
        )));
    }
    Ok(())
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
                Some("container_upload") => {
                    return Err(unreadable(
                        "keycap cannot price a \"container_upload\": files loaded into a code \
                         execution container",
                    ))
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
    /// Where the inference ran, when the response says.
    geo: Option<Geo>,
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
        match usage.get("inference_geo").and_then(Value::as_str) {
            Some("us") => self.geo = Some(Geo::Us),
            Some("global") => self.geo = Some(Geo::Global),
            _ => {}
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

    /// The cost at `price`: with the US-only surcharge when the response
    /// says the call ran in the US, without it when it says it ran
    /// globally, and as reserved when it does not say.
    fn cost(&self, price: &ModelPrice, billing: &TokenBilling) -> Option<keycap_proto::Micros> {
        let uplift = match self.geo {
            Some(Geo::Us) => price.uplifts.inference_geo_us,
            Some(Geo::Global) => None,
            None => billing.uplift,
        };
        let classes = TokenUse {
            input: self.input,
            cache_read: self.cache_read,
            cache_write: self.cache_write,
            cache_write_long: self.cache_write_1h,
            output: self.output,
        };
        price.charge(&classes, uplift)
    }
}

fn settle_usage(quote: &Quote, status: u16, usage: Option<Usage>) -> Settlement {
    let QuoteKind::AnthropicMessages {
        model,
        price,
        billing,
    } = &quote.kind
    else {
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
        if let Some(g) = u.geo {
            detail["inference_geo"] = match g {
                Geo::Us => "us",
                Geo::Global => "global",
            }
            .into();
        }
        (u.cost(price, billing), detail)
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

/// Anthropic's refusal envelope: `{"type": "error", "error": {"type",
/// "message", "details": {"error_code"}, ...}}`. anthropic-python picks its
/// exception by status (`RateLimitError`, `AuthenticationError`,
/// `PermissionDeniedError`, `BadRequestError`, ...), reads keycap's code as
/// `e.error_code` (from `error.details.error_code`) and keeps the body as
/// `e.body`, so keycap's fields are `e.body["error"]["remaining_usd"]`, ....
pub fn refusal_envelope(r: &crate::envelope::Refused<'_>) -> crate::envelope::Wire {
    let mut error = crate::envelope::keycap_error(r);
    error.insert("type".into(), error_type(r.status).into());
    error.insert("details".into(), json!({ "error_code": r.code }));
    crate::envelope::Wire::body(json!({ "type": "error", "error": error }))
}

/// Anthropic's name for the kind of error a status stands for.
fn error_type(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        409 => "conflict_error",
        429 => "rate_limit_error",
        504 => "timeout_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

#[cfg(test)]
mod envelope_tests {
    use super::*;
    use crate::envelope::Refused;

    #[test]
    fn refusals_are_anthropic_errors_with_keycaps_code() {
        let fields = json!({"remaining_usd": 5}).as_object().unwrap().clone();
        let r = |status: u16| Refused {
            status: http::StatusCode::from_u16(status).unwrap(),
            code: "key_revoked",
            message: "revoked",
            fields: &fields,
            retry_is_futile: false,
        };
        assert_eq!(
            refusal_envelope(&r(401)).body,
            json!({"type": "error", "error": {"type": "authentication_error",
                   "code": "key_revoked", "message": "revoked", "remaining_usd": 5,
                   "details": {"error_code": "key_revoked"}}})
        );
        for (status, kind) in [
            (400, "invalid_request_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (409, "conflict_error"),
            (413, "invalid_request_error"),
            (429, "rate_limit_error"),
            (502, "api_error"),
            (503, "api_error"),
            (504, "timeout_error"),
        ] {
            assert_eq!(refusal_envelope(&r(status)).body["error"]["type"], kind);
        }
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
            "claude-opus-4-6",
            "claude-opus-4-7-20260416",
            "claude-opus-5-5",
            "claude-sonnet-4-5",
            "claude-sonnet-4-5-20250929",
            "claude-sonnet-4-6",
            "claude-haiku-4-5-20251001",
            "claude-haiku-5-5",
        ] {
            assert!(t.lookup(m).is_some(), "{m}");
        }
        assert_eq!(
            t.lookup("claude-opus-4-7-20260416").unwrap().0,
            "claude-opus-4-7"
        );
        assert_eq!(
            t.lookup("claude-sonnet-4-5-20250929").unwrap().0,
            "claude-sonnet-4-5"
        );
        // A differently priced sibling never falls back to another model,
        // and models LiteLLM no longer lists are gone.
        for m in [
            "claude-sonnet-4-7",
            "claude-opus",
            "claude-2.1",
            "claude-sonnet-4-",
            "claude-sonnet-4-20250514",
            "claude-3-5-haiku-20241022",
        ] {
            assert!(t.lookup(m).is_none(), "{m}");
        }
        assert!(t.source().is_some_and(|s| s.contains("LiteLLM")));
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

    /// `SONNET` on `model` with `extra` members.
    fn on(model: &str, extra: &str) -> String {
        SONNET.replace("claude-sonnet-4-5", model).replacen(
            "\"max_tokens\"",
            &format!("{extra}\"max_tokens\""),
            1,
        )
    }

    #[test]
    fn what_adds_billed_tokens_the_body_does_not_state_is_refused() {
        for (extra, says) in [
            (
                r#""mcp_servers":[{"type":"url","url":"https://mcp.example.com/sse","name":"x"}],"#,
                "mcp_servers",
            ),
            (r#""container":"container_1","#, "container"),
            (
                r#""container":{"skills":[{"type":"anthropic","skill_id":"pptx"}]},"#,
                "container",
            ),
            (
                r#""context_management":{"edits":[{"type":"compact_20260112"}]},"#,
                "compact_20260112",
            ),
            (r#""context_management":{"edits":"x"},"#, "edits"),
            (r#""speed":"fast","#, "fast"),
            (r#""inference_geo":"eu","#, "inference_geo"),
            (
                r#""tools":[{"type":"web_fetch_20250910","name":"web_fetch"}],"#,
                "web_fetch",
            ),
            (
                r#""tools":[{"type":"code_execution_20250825","name":"code_execution"}],"#,
                "code_execution",
            ),
        ] {
            let err = quote(&on("claude-sonnet-4-5", extra)).unwrap_err();
            assert_eq!(err.code(), "unpriceable_request", "{extra}");
            assert!(err.to_string().contains(says), "{extra}: {err}");
        }
        let upload = SONNET.replace(
            r#""content":"Hello, Claude""#,
            r#""content":[{"type":"container_upload","file_id":"file_1"}]"#,
        );
        assert!(quote(&upload)
            .unwrap_err()
            .to_string()
            .contains("container_upload"));
        // Clearing old tool results or thinking only removes input.
        for fine in [
            r#""context_management":{"edits":[{"type":"clear_tool_uses_20250919"}]},"#,
            r#""context_management":{"edits":[{"type":"clear_thinking_20251015"}]},"#,
            r#""speed":"standard","#,
            r#""mcp_servers":null,"container":null,"#,
        ] {
            assert!(quote(&on("claude-sonnet-4-5", fine)).is_ok(), "{fine}");
        }
    }

    #[test]
    fn us_only_inference_is_reserved_unless_the_request_pins_global() {
        let t = builtin_prices();
        let (_, opus) = t.lookup("claude-opus-4-6").unwrap();
        let us = opus
            .uplifts
            .inference_geo_us
            .expect("opus 4.6 bills US-only inference more");
        let p = pricing();
        // Without inference_geo the workspace's default applies, which may
        // be "us": reserved with the surcharge, as with "us" itself.
        for extra in ["", r#""inference_geo":"us","#] {
            let body = on("claude-opus-4-6", extra);
            let q = quote(&body).unwrap();
            let n = body.len() as u64;
            assert_eq!(q.reserve, opus.bound(n, 1024, Some(us)).unwrap(), "{extra}");
            assert!(q.reserve > opus.bound(n, 1024, None).unwrap());
            assert_eq!(q.detail["uplift_millionths"], us.millionths());
        }
        let global = on("claude-opus-4-6", r#""inference_geo":"global","#);
        let q = quote(&global).unwrap();
        assert_eq!(
            q.reserve,
            opus.bound(global.len() as u64, 1024, None).unwrap()
        );
        // Settled by where the response says it ran, else as reserved.
        let q = quote(&on("claude-opus-4-6", "")).unwrap();
        let usage =
            |geo: &str| format!(r#"{{"usage":{{"input_tokens":100,"output_tokens":10{geo}}}}}"#);
        let counts = TokenUse {
            input: 100,
            output: 10,
            ..TokenUse::default()
        };
        for (geo, uplift) in [
            (r#","inference_geo":"us""#, Some(us)),
            (r#","inference_geo":"global""#, None),
            ("", Some(us)),
        ] {
            let s = p.settle(&q, 200, usage(geo).as_bytes());
            assert_eq!(s.cost, opus.charge(&counts, uplift).unwrap(), "{geo}");
        }
        // A model without the surcharge is never charged it.
        let (_, sonnet) = t.lookup("claude-sonnet-4-5").unwrap();
        assert_eq!(sonnet.uplifts.inference_geo_us, None);
        let q = quote(SONNET).unwrap();
        let s = p.settle(&q, 200, usage(r#","inference_geo":"us""#).as_bytes());
        assert_eq!(s.cost, sonnet.charge(&counts, None).unwrap());
    }

    #[test]
    fn long_context_is_priced_where_the_table_has_it_and_refused_where_it_does_not() {
        let t = builtin_prices();
        let (_, haiku) = t.lookup("claude-haiku-5-5").unwrap();
        let long = haiku
            .long_context
            .as_ref()
            .expect("haiku 5.5 bills long inputs more");
        let big = on("claude-haiku-5-5", "").replace(
            "Hello, Claude",
            &"x".repeat(usize::try_from(long.above_input_tokens).unwrap()),
        );
        let q = quote(&big).unwrap();
        assert_eq!(q.detail["long_context"], true);
        let uplift = haiku.uplifts.inference_geo_us;
        assert_eq!(
            q.reserve,
            haiku.bound(big.len() as u64, 1024, uplift).unwrap()
        );
        assert!(
            q.reserve > {
                let base = ModelPrice {
                    long_context: None,
                    ..haiku.clone()
                };
                base.bound(big.len() as u64, 1024, uplift).unwrap()
            }
        );
        // The 1M-token context beta bills long inputs at prices the table
        // has only for some models.
        let beta = |model: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(
                "anthropic-beta",
                http::HeaderValue::from_static("prompt-caching-2024-07-31, context-1m-2025-08-07"),
            );
            let body = on(model, "");
            pricing().quote(&PriceRequest {
                headers: &headers,
                ..messages(&body)
            })
        };
        let err = beta("claude-sonnet-4-5").unwrap_err();
        assert!(err.to_string().contains("1M-token context"), "{err}");
        assert!(beta("claude-haiku-5-5").is_ok());
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
