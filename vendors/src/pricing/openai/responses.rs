//! The Responses API (`POST /v1/responses`).
//!
//! Reserved like a chat completion: the input bound is the body's byte
//! length (instructions, input items and tool definitions are all in it)
//! plus the model's per-image bound for each `input_image`; the output
//! bound is `max_output_tokens` or the model's maximum (reasoning tokens
//! count as output tokens, within the same limit). Settled from the
//! `usage` of the response, or of a stream's `response.completed` (or
//! `response.incomplete` / `response.failed`) event.
//!
//! Whatever could add input the body does not hold is refused: prior
//! context (`previous_response_id`, `conversation`, a stored `prompt`, an
//! `item_reference`, a reasoning item without its `encrypted_content`),
//! server-side compaction (`context_management`: a summarising pass billed
//! on top), file input, and every tool but function and custom tools
//! (built-in tools are billed per call, per file or per container, or feed
//! back content of unknown size). A `background` response answers before
//! it has run, without usage, so it settles at its reservation.

use serde_json::Value;

use super::{
    check_service_tier, image_tokens_max, model_name, request_object, settle_body_tokens,
    settle_tokens, stream_flag, token_model, token_reservation, JsonObject, OpenAiPricing,
    TokenBound, TokenUsage,
};
use crate::pricing::{
    clip, positive_int, unreadable, PriceRequest, PricingError, Quote, QuoteKind, Settlement,
    StreamSettler,
};
use crate::sse::SseReader;
use keycap_proto::prices::TokenPrices;

pub(super) fn quote(
    pricing: &OpenAiPricing,
    req: &PriceRequest<'_>,
) -> Result<Quote, PricingError> {
    let prices: &TokenPrices = &pricing.prices;
    let obj = request_object(req, "responses")?;
    refuse_stored_context(&obj)?;
    let model = model_name(&obj)?;
    let (priced_as, price) = token_model(prices, model)?;
    let streaming = stream_flag(&obj)?;
    check_service_tier(&obj)?;
    check_tools(&obj)?;
    let billing = pricing.billing(price, &obj)?;
    let images = count_input_images(&obj)?;

    let output_max = positive_int(&obj, "max_output_tokens")?
        .map_or(price.max_output_tokens, |r| r.min(price.max_output_tokens));
    let image_tokens = image_tokens_max(price, model, images)?;
    let body_len = u64::try_from(req.body.len()).unwrap_or(u64::MAX);
    let input_max = body_len.saturating_add(image_tokens);
    let bound = TokenBound {
        model,
        priced_as,
        input_max,
        output_max,
        images,
    };
    let (reserve, detail) = token_reservation(price, &bound, billing)?;
    Ok(Quote {
        reserve,
        detail,
        streaming,
        kind: QuoteKind::OpenAiResponses {
            model: model.to_string(),
            price: price.clone(),
            billing,
        },
        forward_body: None,
    })
}

/// Refuses requests that make OpenAI read stored context into the input.
fn refuse_stored_context(obj: &JsonObject) -> Result<(), PricingError> {
    for (field, what) in [
        ("previous_response_id", "a previous response"),
        ("conversation", "a stored conversation"),
        ("prompt", "a stored prompt template"),
    ] {
        if obj.get(field).is_some_and(|v| !v.is_null()) {
            return Err(unreadable(format!(
                "keycap cannot price \"{field}\": it adds {what} to the input, whose size the \
                 request does not state; send the context in \"input\" instead"
            )));
        }
    }
    if obj.get("context_management").is_some_and(|v| !v.is_null()) {
        return Err(unreadable(
            "keycap cannot price \"context_management\": server-side compaction runs a \
             summarising pass billed on top of the call, whose size the request does not state",
        ));
    }
    Ok(())
}

/// Allows function and custom tools only.
fn check_tools(obj: &JsonObject) -> Result<(), PricingError> {
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(unreadable("\"tools\" must be an array")),
    };
    for tool in tools {
        match tool.get("type").and_then(Value::as_str) {
            Some("function" | "custom") => {}
            Some(other) => {
                return Err(unreadable(format!(
                    "keycap cannot price the built-in tool {:?}: its cost is not bounded by the \
                     request; only function and custom tools are priced",
                    clip(other)
                )))
            }
            None => return Err(unreadable("each tool needs a \"type\" string")),
        }
    }
    Ok(())
}

/// Counts `input_image` parts in the input items; refuses items and parts
/// whose input it cannot bound.
fn count_input_images(obj: &JsonObject) -> Result<u64, PricingError> {
    match obj.get("input") {
        None | Some(Value::Null) | Some(Value::String(_)) => Ok(0),
        Some(Value::Array(items)) => items
            .iter()
            .try_fold(0u64, |n, item| Ok(n.saturating_add(item_images(item)?))),
        Some(_) => Err(unreadable(
            "\"input\" must be a string or an array of input items",
        )),
    }
}

fn item_images(item: &Value) -> Result<u64, PricingError> {
    let Some(item) = item.as_object() else {
        return Err(unreadable("each \"input\" item must be an object"));
    };
    let kind = match item.get("type") {
        Some(Value::String(t)) => t.as_str(),
        None | Some(Value::Null) if item.contains_key("role") => "message",
        _ => return Err(unreadable("each \"input\" item needs a \"type\" string")),
    };
    match kind {
        "message" => content_images(item.get("content")),
        "function_call" | "custom_tool_call" => Ok(0),
        "function_call_output" | "custom_tool_call_output" => content_images(item.get("output")),
        "reasoning" => {
            let carried = item
                .get("encrypted_content")
                .and_then(Value::as_str)
                .is_some_and(|c| !c.is_empty());
            if carried {
                Ok(0)
            } else {
                Err(unreadable(
                    "keycap cannot price a reasoning item without its \"encrypted_content\": \
                     OpenAI would read the stored reasoning, whose size the request does not state",
                ))
            }
        }
        "item_reference" => Err(unreadable(
            "keycap cannot price an \"item_reference\": the stored item's size is unknown",
        )),
        other => Err(unreadable(format!(
            "keycap cannot price input items of type {:?}",
            clip(other)
        ))),
    }
}

/// Counts images in a message's content or a tool call's output (a string,
/// or an array of content parts).
fn content_images(content: Option<&Value>) -> Result<u64, PricingError> {
    let parts = match content {
        None | Some(Value::Null) | Some(Value::String(_)) => return Ok(0),
        Some(Value::Array(parts)) => parts,
        Some(_) => {
            return Err(unreadable(
                "content must be a string or an array of content parts",
            ))
        }
    };
    let mut images = 0u64;
    for part in parts {
        match part.get("type").and_then(Value::as_str) {
            Some("input_text" | "output_text" | "refusal") => {}
            Some("input_image") => images += 1,
            Some("input_file") => return Err(unreadable(
                "keycap cannot price file input (\"input_file\"): its size in tokens is unknown",
            )),
            Some(other) => {
                return Err(unreadable(format!(
                    "keycap cannot price {:?} content",
                    clip(other)
                )))
            }
            None => return Err(unreadable("content part has no type")),
        }
    }
    Ok(images)
}

fn read_usage(usage: &Value) -> Option<TokenUsage> {
    TokenUsage::read(
        usage,
        "input_tokens",
        "output_tokens",
        "input_tokens_details",
    )
}

pub(super) fn settle(quote: &Quote, status: u16, body: &[u8]) -> Settlement {
    settle_body_tokens(quote, status, body, read_usage)
}

pub(super) fn stream_settler(quote: &Quote) -> Box<dyn StreamSettler> {
    Box::new(ResponseStreamSettler {
        quote: quote.clone(),
        reader: SseReader::new(),
        usage: None,
    })
}

/// The events that end a streamed response and carry its final usage.
const FINAL_EVENTS: [&str; 3] = [
    "response.completed",
    "response.incomplete",
    "response.failed",
];

/// Watches a streamed response for the event that ends it, whose
/// `response.usage` is the call's final count. Passes every byte on.
struct ResponseStreamSettler {
    quote: Quote,
    reader: SseReader,
    usage: Option<TokenUsage>,
}

impl StreamSettler for ResponseStreamSettler {
    fn feed(&mut self, chunk: &[u8]) {
        for data in self.reader.feed(chunk) {
            // Deltas are most of the stream; only a final event has usage.
            if !data.contains("\"usage\"") {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            let is_final = v
                .get("type")
                .and_then(Value::as_str)
                .is_some_and(|t| FINAL_EVENTS.contains(&t));
            if !is_final {
                continue;
            }
            if let Some(u) = v.pointer("/response/usage").and_then(read_usage) {
                self.usage = Some(u);
            }
        }
    }

    fn finish(self: Box<Self>, status: u16) -> Settlement {
        settle_tokens(&self.quote, status, self.usage)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::*;
    use crate::pricing::{ceil_cost, Outcome, PriceModel};
    use keycap_proto::Micros;

    fn quote(body: &str) -> Result<Quote, PricingError> {
        pricing().quote(&post("/v1/responses", body))
    }

    fn refused(body: &str) -> String {
        let err = quote(body).unwrap_err();
        assert_eq!(err.code(), "unpriceable_request", "{body}: {err}");
        err.to_string()
    }

    #[test]
    fn reserve_is_body_bytes_plus_max_output_tokens() {
        let body = r#"{"model":"gpt-4.1","instructions":"Be brief.","input":"Say hi","max_output_tokens":300}"#;
        let q = quote(body).unwrap();
        let n = body.len() as u64;
        assert_eq!(
            q.reserve,
            Micros(ceil_cost(n, 2_000_000) + ceil_cost(300, 8_000_000))
        );
        assert_eq!(q.detail["input_tokens_max"], n);
        assert_eq!(q.detail["output_tokens_max"], 300);
        assert_eq!(q.detail["priced_as"], "gpt-4.1");
        assert!(!q.streaming);
        assert!(q.forward_body.is_none());
        let QuoteKind::OpenAiResponses { model, price, .. } = &q.kind else {
            panic!("{:?}", q.kind)
        };
        assert_eq!(model, "gpt-4.1");
        assert_eq!(price.input, Micros(2_000_000));
        // No limit: the model's maximum; a larger one is capped to it.
        let out = |extra: &str| {
            quote(&format!(r#"{{"model":"o4-mini","input":"x"{extra}}}"#))
                .unwrap()
                .detail["output_tokens_max"]
                .as_u64()
                .unwrap()
        };
        assert_eq!(out(""), 100_000);
        assert_eq!(out(r#","max_output_tokens":null"#), 100_000);
        assert_eq!(out(r#","max_output_tokens":5000000"#), 100_000);
        assert_eq!(out(r#","max_output_tokens":16"#), 16);
        assert!(
            quote(r#"{"model":"o3","input":"x","stream":true}"#)
                .unwrap()
                .streaming
        );
    }

    #[test]
    fn input_items_that_are_in_the_body_are_priced() {
        let body = r#"{"model":"gpt-4o","max_output_tokens":50,
            "tools":[{"type":"function","name":"lookup","parameters":{"type":"object"}},
                     {"type":"custom","name":"shell"}],
            "input":[
              {"role":"developer","content":"You are terse."},
              {"type":"message","role":"user","content":[{"type":"input_text","text":"hi"}]},
              {"type":"message","role":"assistant","content":[{"type":"output_text","text":"hello","annotations":[]}]},
              {"type":"reasoning","id":"rs_1","summary":[],"encrypted_content":"gAAAAB..."},
              {"type":"function_call","call_id":"c1","name":"lookup","arguments":"{}"},
              {"type":"function_call_output","call_id":"c1","output":"42"},
              {"type":"custom_tool_call","call_id":"c2","name":"shell","input":"ls"},
              {"type":"custom_tool_call_output","call_id":"c2","output":"a b"}
            ],
            "previous_response_id":null,"store":false,"include":["reasoning.encrypted_content"]}"#;
        let q = quote(body).unwrap();
        assert_eq!(q.detail["input_tokens_max"], body.len() as u64);
        assert!(q.detail.get("images").is_none());
    }

    #[test]
    fn images_add_their_bound() {
        let body = r#"{"model":"gpt-4o","max_output_tokens":1,"input":[
            {"role":"user","content":[{"type":"input_text","text":"what is this"},
              {"type":"input_image","image_url":"https://x/a.png","detail":"high"},
              {"type":"input_image","file_id":"file-1"}]},
            {"type":"function_call_output","call_id":"c","output":[
              {"type":"input_image","image_url":"data:image/png;base64,AA=="}]}]}"#;
        let q = quote(body).unwrap();
        let input = body.len() as u64 + 3 * 1445;
        assert_eq!(q.detail["images"], 3);
        assert_eq!(q.detail["input_tokens_max"], input);
        assert_eq!(
            q.reserve,
            Micros(ceil_cost(input, 2_500_000) + ceil_cost(1, 10_000_000))
        );
        // o3-mini has no image bound: images are refused for it.
        assert!(refused(&body.replace("gpt-4o", "o3-mini")).contains("image input"));
    }

    #[test]
    fn a_background_response_settles_at_its_reservation() {
        // It answers queued, before it has run: no usage yet.
        let body = r#"{"model":"gpt-4.1","input":"Write a report.","background":true,"max_output_tokens":500}"#;
        let q = quote(body).unwrap();
        let queued = br#"{"id":"resp_1","object":"response","status":"queued","background":true,"usage":null}"#;
        let s = pricing().settle(&q, 200, queued);
        assert_eq!(
            (s.cost, s.outcome),
            (q.reserve, Outcome::SettledAtReservation)
        );
    }

    #[test]
    fn what_cannot_be_bounded_is_refused() {
        for (extra, says) in [
            (
                r#","previous_response_id":"resp_1""#,
                "previous_response_id",
            ),
            (r#","conversation":"conv_1""#, "conversation"),
            (r#","conversation":{"id":"conv_1"}"#, "conversation"),
            (r#","prompt":{"id":"pmpt_1","version":"2"}"#, "prompt"),
            (r#","tools":[{"type":"web_search"}]"#, "web_search"),
            (
                r#","tools":[{"type":"web_search_preview"}]"#,
                "web_search_preview",
            ),
            (
                r#","tools":[{"type":"file_search","vector_store_ids":["vs_1"]}]"#,
                "file_search",
            ),
            (
                r#","tools":[{"type":"code_interpreter","container":{"type":"auto"}}]"#,
                "code_interpreter",
            ),
            (
                r#","tools":[{"type":"image_generation"}]"#,
                "image_generation",
            ),
            (
                r#","tools":[{"type":"computer_use_preview","display_width":1024,"display_height":768,"environment":"browser"}]"#,
                "computer_use_preview",
            ),
            (
                r#","tools":[{"type":"mcp","server_label":"x","server_url":"https://x"}]"#,
                "mcp",
            ),
            (r#","tools":[{"type":"local_shell"}]"#, "local_shell"),
            (r#","tools":[{"name":"untyped"}]"#, "type"),
            (r#","tools":{}"#, "tools"),
            (r#","service_tier":"priority""#, "priority"),
            (
                r#","context_management":[{"type":"compaction","compact_threshold":200000}]"#,
                "context_management",
            ),
            (r#","max_output_tokens":0"#, "max_output_tokens"),
            (r#","max_output_tokens":"100""#, "max_output_tokens"),
            (r#","stream":"yes""#, "stream"),
        ] {
            let body = format!(r#"{{"model":"gpt-4o","input":"hi"{extra}}}"#);
            let err = refused(&body);
            assert!(err.contains(says), "{extra}: {err}");
        }
        for (input, says) in [
            (
                r#"[{"role":"user","content":[{"type":"input_file","file_id":"file-1"}]}]"#,
                "input_file",
            ),
            (
                r#"[{"type":"function_call_output","call_id":"c","output":[{"type":"input_file","file_url":"https://x/a.pdf"}]}]"#,
                "input_file",
            ),
            (
                r#"[{"type":"item_reference","id":"msg_1"}]"#,
                "item_reference",
            ),
            (
                r#"[{"type":"reasoning","id":"rs_1","summary":[]}]"#,
                "encrypted_content",
            ),
            (
                r#"[{"type":"reasoning","id":"rs_1","summary":[],"encrypted_content":""}]"#,
                "encrypted_content",
            ),
            (
                r#"[{"type":"web_search_call","id":"ws_1","status":"completed"}]"#,
                "web_search_call",
            ),
            (
                r#"[{"type":"computer_call_output","call_id":"c","output":{}}]"#,
                "computer_call_output",
            ),
            (
                r#"[{"role":"user","content":[{"type":"input_audio"}]}]"#,
                "input_audio",
            ),
            (
                r#"[{"role":"user","content":[{"text":"untyped"}]}]"#,
                "no type",
            ),
            (r#"[{"role":"user","content":7}]"#, "content"),
            (r#"["just a string"]"#, "object"),
            (r#"[{"content":"no role, no type"}]"#, "type"),
            (r#"{"role":"user"}"#, "input"),
            ("5", "input"),
        ] {
            let body = format!(r#"{{"model":"gpt-4o","input":{input}}}"#);
            let err = refused(&body);
            assert!(err.contains(says), "{input}: {err}");
        }
        for body in [
            "",
            "[]",
            r#"{"input":"hi"}"#,
            r#"{"model":"","input":"hi"}"#,
        ] {
            refused(body);
        }
        let err = quote(r#"{"model":"gpt-9-ultra","input":"hi"}"#).unwrap_err();
        assert_eq!(err.code(), "unknown_model");
        assert!(err.to_string().contains("gpt-9-ultra"));
    }

    const RESPONSE: &str = r#"{"id":"resp_1","object":"response","status":"completed","model":"gpt-4.1-2025-04-14",
        "output":[{"type":"message","id":"msg_1","status":"completed","role":"assistant",
                   "content":[{"type":"output_text","text":"Hi!","annotations":[]}]}],
        "usage":{"input_tokens":1200,"input_tokens_details":{"cached_tokens":1000},
                 "output_tokens":80,"output_tokens_details":{"reasoning_tokens":64},"total_tokens":1280}}"#;

    #[test]
    fn settles_from_usage_with_cached_input() {
        let p = pricing();
        let q = quote(r#"{"model":"gpt-4.1","input":"Say hi","max_output_tokens":300}"#).unwrap();
        let s = p.settle(&q, 200, RESPONSE.as_bytes());
        assert_eq!(s.outcome, Outcome::Settled);
        // 200 at 2.00/M + 1000 cached at 0.50/M, rounded once; 80 at 8.00/M.
        assert_eq!(s.cost, Micros(900 + 640));
        assert_eq!(s.detail["input_tokens"], 1200);
        assert_eq!(s.detail["cached_input_tokens"], 1000);
        assert_eq!(s.detail["output_tokens"], 80);
        assert_eq!(s.detail["model"], "gpt-4.1");
        assert!(s.cost <= q.reserve);
        assert!(s.detail.get("exceeded_reservation").is_none());

        for body in [
            "{}",
            "not json",
            r#"{"status":"queued","usage":null}"#,
            r#"{"usage":{"input_tokens":5}}"#,
            r#"{"usage":{"prompt_tokens":5,"completion_tokens":1}}"#,
        ] {
            let s = p.settle(&q, 200, body.as_bytes());
            assert_eq!(
                (s.cost, s.outcome),
                (q.reserve, Outcome::SettledAtReservation),
                "{body}"
            );
        }
        for status in [400, 404, 429, 500] {
            let s = p.settle(&q, status, RESPONSE.as_bytes());
            assert_eq!((s.cost, s.outcome), (Micros::ZERO, Outcome::Released));
        }
    }

    #[test]
    fn settlement_within_the_bounds_never_exceeds_the_reservation() {
        let p = pricing();
        let body = r#"{"model":"o4-mini","input":"Think hard.","max_output_tokens":1000}"#;
        let q = quote(body).unwrap();
        let bound = body.len() as u64;
        for input in [0, 1, bound / 2, bound] {
            for cached in [0, input / 3, input] {
                for output in [0, 1, 999, 1000] {
                    let resp = format!(
                        r#"{{"usage":{{"input_tokens":{input},"input_tokens_details":{{"cached_tokens":{cached}}},"output_tokens":{output}}}}}"#
                    );
                    let s = p.settle(&q, 200, resp.as_bytes());
                    assert_eq!(s.outcome, Outcome::Settled);
                    assert!(s.cost <= q.reserve, "{resp}: {s:?} > {q:?}");
                }
            }
        }
    }

    fn event(kind: &str, data: &str) -> String {
        format!("event: {kind}\ndata: {data}\n\n")
    }

    fn stream(final_event: &str, usage: &str) -> String {
        [
            event(
                "response.created",
                r#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_1","status":"in_progress","usage":null}}"#,
            ),
            event(
                "response.output_text.delta",
                r#"{"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hi"}"#,
            ),
            event(
                final_event,
                &format!(
                    r#"{{"type":"{final_event}","sequence_number":2,"response":{{"id":"resp_1","usage":{usage}}}}}"#
                ),
            ),
        ]
        .concat()
    }

    #[test]
    fn stream_settles_from_the_final_event_at_any_split() {
        let p = pricing();
        let q = quote(r#"{"model":"gpt-4o","input":"hi","stream":true}"#).unwrap();
        let usage = r#"{"input_tokens":20,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,"total_tokens":24}"#;
        let expected = Micros(ceil_cost(20, 2_500_000) + ceil_cost(4, 10_000_000));
        for kind in FINAL_EVENTS {
            let body = stream(kind, usage);
            let bytes = body.as_bytes();
            for cut in 0..bytes.len() {
                let mut st = p.stream_settler(&q);
                let mut seen = st
                    .pass(bytes::Bytes::copy_from_slice(&bytes[..cut]))
                    .to_vec();
                seen.extend_from_slice(&st.pass(bytes::Bytes::copy_from_slice(&bytes[cut..])));
                seen.extend_from_slice(&st.end_of_stream());
                assert_eq!(seen, bytes, "the client sees the stream unchanged");
                let s = st.finish(200);
                assert_eq!(
                    (s.cost, s.outcome),
                    (expected, Outcome::Settled),
                    "{kind} {cut}"
                );
                assert_eq!(s.detail["output_tokens"], 4);
            }
        }
    }

    #[test]
    fn stream_without_a_final_usage_settles_at_the_reservation() {
        let p = pricing();
        let q = quote(r#"{"model":"gpt-4o","input":"hi","stream":true}"#).unwrap();
        let failed_without_usage = stream("response.failed", "null");
        // A usage object on an event that does not end the response is not
        // the final count.
        let early = stream(
            "response.in_progress",
            r#"{"input_tokens":1,"output_tokens":1}"#,
        );
        let full = stream(
            "response.completed",
            r#"{"input_tokens":1,"output_tokens":1}"#,
        );
        let cut_short = &full[..full.len() - 1];
        for body in [failed_without_usage.as_str(), early.as_str(), cut_short] {
            let mut st = p.stream_settler(&q);
            st.feed(body.as_bytes());
            let s = st.finish(200);
            assert_eq!(
                (s.cost, s.outcome),
                (q.reserve, Outcome::SettledAtReservation),
                "{body}"
            );
        }
        let mut st = p.stream_settler(&q);
        st.feed(full.as_bytes());
        assert_eq!(st.finish(500).outcome, Outcome::Released);
    }
}
