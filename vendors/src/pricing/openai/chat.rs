//! Chat completions (`POST /v1/chat/completions`).
//!
//! The input bound is the body's byte length plus the model's per-image
//! bound for each image; the output bound is the requested (or the model's)
//! maximum times the number of choices, plus the length of a predicted
//! output (`prediction`): OpenAI bills every prediction token it does not
//! use as output, beyond the completion's own limit. Settled from the
//! `usage` the response reports, streamed or not.
//!
//! A stream reports usage only in a last chunk the client asks for with
//! `stream_options.include_usage`. When the client has not asked, keycap
//! forwards the request with it set (every other byte as sent) and holds
//! that chunk back, so the client sees the stream it asked for and the call
//! still settles at its real cost. With `include_usage` OpenAI also puts
//! `"usage": null` in every other chunk; those are passed on unchanged
//! (clients that did not ask for usage ignore the field).

use std::ops::Range;

use bytes::Bytes;
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
use crate::sse::{Framed, SseFramer, SseReader};
use keycap_proto::prices::TokenPrices;

/// OpenAI accepts at most this many choices (`n`) per request.
const MAX_CHOICES: u64 = 128;

/// Most bytes of one event held back from the client while keycap tells
/// whether it is the usage chunk (a few hundred bytes); a larger event is
/// not that chunk and passes through as it arrives.
const MAX_HELD_EVENT_BYTES: usize = 64 * 1024;

pub(super) fn quote(
    pricing: &OpenAiPricing,
    req: &PriceRequest<'_>,
) -> Result<Quote, PricingError> {
    let prices: &TokenPrices = &pricing.prices;
    let obj = request_object(req, "chat completions")?;
    let model = model_name(&obj)?;
    let (priced_as, price) = token_model(prices, model)?;
    let streaming = stream_flag(&obj)?;
    refuse_unbounded_features(&obj)?;
    let billing = pricing.billing(price, &obj)?;

    // Both limits may be sent; the larger one bounds the output either way.
    let requested_out = [
        positive_int(&obj, "max_completion_tokens")?,
        positive_int(&obj, "max_tokens")?,
    ]
    .into_iter()
    .flatten()
    .max();
    let max_out = requested_out.map_or(price.max_output_tokens, |r| r.min(price.max_output_tokens));
    // Every choice is billed for its own output.
    let choices = positive_int(&obj, "n")?.unwrap_or(1);
    if choices > MAX_CHOICES {
        return Err(unreadable(format!("\"n\" must be at most {MAX_CHOICES}")));
    }
    let prediction = prediction_tokens_max(&obj, choices)?;
    let output_max = max_out.saturating_mul(choices).saturating_add(prediction);

    let images = count_images(&obj)?;
    let image_tokens = image_tokens_max(price, model, images)?;

    let forward_body = if streaming && !client_asked_for_usage(&obj) {
        Some(with_usage_requested(req.body)?)
    } else {
        None
    };
    // Bounded by whichever body is longer, the agent's or the one forwarded.
    let body_len = forward_body
        .as_ref()
        .map_or(req.body.len(), |b| b.len().max(req.body.len()));
    let body_len = u64::try_from(body_len).unwrap_or(u64::MAX);
    let input_max = body_len.saturating_add(image_tokens);

    let bound = TokenBound {
        model,
        priced_as,
        input_max,
        output_max,
        images,
    };
    let (reserve, mut detail) = token_reservation(price, &bound, billing)?;
    let hide_usage = forward_body.is_some();
    if hide_usage {
        detail["stream_usage_requested"] = true.into();
    }
    if prediction > 0 {
        detail["prediction_tokens_max"] = prediction.into();
    }
    Ok(Quote {
        reserve,
        detail,
        streaming,
        kind: QuoteKind::OpenAiChat {
            model: model.to_string(),
            price: price.clone(),
            hide_usage,
            billing,
        },
        forward_body,
    })
}

/// The most output tokens a predicted output (`prediction`) can add: its
/// JSON text's length, as a token is at least one byte of its text. OpenAI
/// bills the prediction tokens a completion does not use as output, on top
/// of the completion itself; it takes no prediction with several choices.
fn prediction_tokens_max(obj: &JsonObject, choices: u64) -> Result<u64, PricingError> {
    let prediction = match obj.get("prediction") {
        None | Some(Value::Null) => return Ok(0),
        Some(p) => p,
    };
    if prediction.get("type").and_then(Value::as_str) != Some("content") {
        return Err(unreadable(
            "keycap can only price a \"prediction\" of type \"content\"",
        ));
    }
    if choices > 1 {
        return Err(unreadable(
            "keycap cannot price a \"prediction\" with \"n\" above 1",
        ));
    }
    // Re-encoding never shortens text: escapes only lengthen it.
    Ok(u64::try_from(prediction.to_string().len()).unwrap_or(u64::MAX))
}

/// Refuses request features billed outside input and output text tokens.
fn refuse_unbounded_features(obj: &JsonObject) -> Result<(), PricingError> {
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
    check_service_tier(obj)
}

/// Counts image parts in the messages; refuses parts it cannot bound.
fn count_images(obj: &JsonObject) -> Result<u64, PricingError> {
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

fn client_asked_for_usage(obj: &JsonObject) -> bool {
    obj.get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true)
}

/// The request body with `stream_options.include_usage` set to true. Only
/// the `stream_options` member is rewritten (or, when absent, added after
/// the last member); every other byte is forwarded as the client sent it,
/// so no number or string is re-encoded.
fn with_usage_requested(body: &[u8]) -> Result<Bytes, PricingError> {
    let members =
        top_level_members(body).ok_or_else(|| unreadable("request body is not valid JSON"))?;
    let mut found: Option<Range<usize>> = None;
    for m in &members {
        let key: String = serde_json::from_slice(&body[m.key.clone()])
            .map_err(|_| unreadable("request body is not valid JSON"))?;
        if key == "stream_options" {
            if found.is_some() {
                return Err(unreadable("\"stream_options\" is given twice"));
            }
            found = Some(m.value.clone());
        }
    }
    let mut out = Vec::with_capacity(body.len() + 48);
    match found {
        Some(at) => {
            let mut options = match serde_json::from_slice::<Value>(&body[at.clone()]) {
                Ok(Value::Object(o)) => o,
                Ok(Value::Null) => serde_json::Map::new(),
                _ => return Err(unreadable("\"stream_options\" must be an object")),
            };
            options.insert("include_usage".into(), Value::Bool(true));
            out.extend_from_slice(&body[..at.start]);
            out.extend_from_slice(Value::Object(options).to_string().as_bytes());
            out.extend_from_slice(&body[at.end..]);
        }
        None => {
            // A chat request always has members (model, messages).
            let at = members
                .last()
                .map(|m| m.value.end)
                .ok_or_else(|| unreadable("request needs a \"model\" string"))?;
            out.extend_from_slice(&body[..at]);
            out.extend_from_slice(br#","stream_options":{"include_usage":true}"#);
            out.extend_from_slice(&body[at..]);
        }
    }
    Ok(Bytes::from(out))
}

/// Where one member of a JSON object sits in the text: its key (quotes
/// included) and its value.
#[derive(Debug, PartialEq, Eq)]
struct Member {
    key: Range<usize>,
    value: Range<usize>,
}

/// The members of the JSON object `b`, in order, by position. `None` if `b`
/// is not an object; it is called only on text `serde_json` has accepted,
/// so it checks structure, not every detail of JSON.
fn top_level_members(b: &[u8]) -> Option<Vec<Member>> {
    let ws = |mut i: usize| {
        while b
            .get(i)
            .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
        {
            i += 1;
        }
        i
    };
    let mut i = ws(0);
    if *b.get(i)? != b'{' {
        return None;
    }
    let mut members = Vec::new();
    i = ws(i + 1);
    if *b.get(i)? == b'}' {
        return Some(members);
    }
    loop {
        if *b.get(i)? != b'"' {
            return None;
        }
        let key_end = string_end(b, i)?;
        let colon = ws(key_end);
        if *b.get(colon)? != b':' {
            return None;
        }
        let start = ws(colon + 1);
        let end = value_end(b, start)?;
        members.push(Member {
            key: i..key_end,
            value: start..end,
        });
        i = ws(end);
        match *b.get(i)? {
            b',' => i = ws(i + 1),
            b'}' => return Some(members),
            _ => return None,
        }
    }
}

/// One past the closing quote of the string that opens at `b[i]`.
fn string_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some(j + 1),
            _ => j += 1,
        }
    }
    None
}

/// One past the end of the value that starts at `b[i]`.
fn value_end(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let end = (i..b.len())
                .find(|&j| matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(b.len());
            (end > i).then_some(end)
        }
    }
}

fn read_usage(usage: &Value) -> Option<TokenUsage> {
    TokenUsage::read(
        usage,
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
    )
}

pub(super) fn settle(quote: &Quote, status: u16, body: &[u8]) -> Settlement {
    settle_body_tokens(quote, status, body, read_usage)
}

pub(super) fn stream_settler(quote: &Quote) -> Box<dyn StreamSettler> {
    Box::new(chat_stream_settler(quote))
}

fn chat_stream_settler(quote: &Quote) -> ChatStreamSettler {
    let hide_usage = matches!(
        quote.kind,
        QuoteKind::OpenAiChat {
            hide_usage: true,
            ..
        }
    );
    ChatStreamSettler {
        quote: quote.clone(),
        reader: SseReader::new(),
        usage: None,
        framer: hide_usage.then(|| SseFramer::with_limit(MAX_HELD_EVENT_BYTES)),
    }
}

/// Watches a streamed chat completion for the chunk that carries `usage`
/// (the last one, when `stream_options.include_usage` is set) and, when
/// keycap asked for it, keeps that chunk from the client.
struct ChatStreamSettler {
    quote: Quote,
    reader: SseReader,
    usage: Option<TokenUsage>,
    /// Present when keycap asked for the usage chunk: cuts the stream into
    /// whole events, so that one can be held back.
    framer: Option<SseFramer>,
}

impl ChatStreamSettler {
    /// Reads one event's data; true if it is the usage chunk (empty
    /// `choices`, a `usage` object).
    fn observe(&mut self, data: &str) -> bool {
        // Most chunks are content deltas; skip parsing those that cannot
        // carry usage.
        if !data.contains("\"usage\"") {
            return false;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return false;
        };
        let Some(usage) = v.get("usage").filter(|u| u.is_object()) else {
            return false;
        };
        if let Some(u) = read_usage(usage) {
            self.usage = Some(u);
        }
        v.get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
    }

    /// What the client is sent for these pieces: all of them but the
    /// usage chunk.
    fn release(&mut self, pieces: Vec<Framed>) -> Bytes {
        let mut out: Vec<Bytes> = Vec::with_capacity(pieces.len());
        for piece in pieces {
            match piece {
                Framed::Event(bytes) => {
                    let mut usage_chunk = false;
                    for data in self.reader.feed(&bytes) {
                        usage_chunk |= self.observe(&data);
                    }
                    if !usage_chunk {
                        out.push(bytes);
                    }
                }
                Framed::Passed(bytes) => {
                    for data in self.reader.feed(&bytes) {
                        self.observe(&data);
                    }
                    out.push(bytes);
                }
            }
        }
        match out.len() {
            0 => Bytes::new(),
            1 => out.pop().unwrap_or_default(),
            _ => Bytes::from(out.concat()),
        }
    }
}

impl StreamSettler for ChatStreamSettler {
    fn feed(&mut self, chunk: &[u8]) {
        for data in self.reader.feed(chunk) {
            self.observe(&data);
        }
    }

    fn pass(&mut self, chunk: Bytes) -> Bytes {
        let pieces = match self.framer.as_mut() {
            Some(framer) => framer.push(&chunk),
            None => {
                self.feed(&chunk);
                return chunk;
            }
        };
        self.release(pieces)
    }

    fn end_of_stream(&mut self) -> Bytes {
        match self.framer.as_mut().map(SseFramer::finish) {
            Some(pieces) => self.release(pieces),
            None => Bytes::new(),
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
    use crate::pricing::{ceil_cost, ModelPrice, Outcome, PriceModel};
    use keycap_proto::Micros;

    fn chat(body: &str) -> PriceRequest<'_> {
        post("/v1/chat/completions", body)
    }

    fn quote(body: &str) -> Result<Quote, PricingError> {
        pricing().quote(&chat(body))
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
            QuoteKind::OpenAiChat { model, price, .. } => {
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
    fn a_predicted_output_is_reserved_as_output_it_may_be_billed_for() {
        let plain = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"Rename x to n"}],"max_completion_tokens":100}"#;
        let prediction = r#"{"type":"content","content":"let x = 1;\nprint(x);"}"#;
        let body = plain.replacen(
            "\"max_completion_tokens\"",
            &format!("\"prediction\":{prediction},\"max_completion_tokens\""),
            1,
        );
        let q = quote(&body).unwrap();
        let n = body.len() as u64;
        // Its tokens are read as input and, those the completion does not
        // use, billed as output beyond max_completion_tokens.
        let extra = prediction.len() as u64;
        assert_eq!(q.detail["prediction_tokens_max"], extra);
        assert_eq!(q.detail["output_tokens_max"], 100 + extra);
        assert_eq!(
            q.reserve,
            Micros(ceil_cost(n, 2_500_000) + ceil_cost(100 + extra, 10_000_000))
        );
        // A completion billed for every rejected prediction token settles
        // within the reservation.
        let usage = format!(
            r#"{{"usage":{{"prompt_tokens":{n},"completion_tokens":{},"completion_tokens_details":{{"rejected_prediction_tokens":{extra}}}}}}}"#,
            100 + extra
        );
        let s = pricing().settle(&q, 200, usage.as_bytes());
        assert_eq!(s.cost, q.reserve);
        assert!(s.detail.get("exceeded_reservation").is_none(), "{s:?}");
        for (bad, says) in [
            (r#"{"type":"text","content":"x"}"#, "content"),
            (r#""x""#, "content"),
        ] {
            let body = plain.replacen(
                "\"max_completion_tokens\"",
                &format!("\"prediction\":{bad},\"max_completion_tokens\""),
                1,
            );
            let err = quote(&body).unwrap_err();
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
        let several = body.replacen(
            "\"max_completion_tokens\"",
            "\"n\":2,\"max_completion_tokens\"",
            1,
        );
        let err = quote(&several).unwrap_err();
        assert!(err.to_string().contains("\"n\""), "{err}");
        assert!(quote(&plain.replacen('{', r#"{"prediction":null,"#, 1)).is_ok());
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
            max_output_tokens: 40,
            ..ModelPrice::default()
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
        assert_eq!(st.pass(Bytes::from_static(no_usage.as_bytes())), no_usage);
        assert!(st.end_of_stream().is_empty());
        let s = st.finish(200);
        assert_eq!(
            (s.cost, s.outcome),
            (q.reserve, Outcome::SettledAtReservation)
        );
        // The usage chunk arrives without its terminating blank line: the
        // event never completed, so it is not trusted (and its bytes reach
        // the client, which discards an unfinished event itself).
        let cut = STREAM.find("data: [DONE]").unwrap() - 2;
        let mut st = p.stream_settler(&q);
        let mut seen = st
            .pass(Bytes::copy_from_slice(&STREAM.as_bytes()[..cut]))
            .to_vec();
        seen.extend_from_slice(&st.end_of_stream());
        assert_eq!(seen, &STREAM.as_bytes()[..cut]);
        assert_eq!(st.finish(200).outcome, Outcome::SettledAtReservation);
        let mut st = p.stream_settler(&q);
        st.pass(Bytes::from_static(STREAM.as_bytes()));
        assert_eq!(st.finish(500).outcome, Outcome::Released);
    }

    /// `STREAM` without its usage chunk: what a client that did not ask for
    /// usage is shown.
    fn stream_without_usage_chunk() -> String {
        let start = STREAM.find("data: {\"id\":\"c\",\"choices\":[],").unwrap();
        let end = STREAM.find("data: [DONE]").unwrap();
        format!("{}{}", &STREAM[..start], &STREAM[end..])
    }

    #[test]
    fn a_stream_without_include_usage_asks_for_it() {
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"caf\u00e9 {\"stream_options\":1}"}],"temperature":0.70,"seed":123456789012345678901234567890,"stream":true}"#;
        let q = quote(body).unwrap();
        assert!(q.streaming);
        let sent = q
            .forward_body
            .as_deref()
            .expect("a body with include_usage");
        let expected = format!(
            "{},\"stream_options\":{{\"include_usage\":true}}}}",
            &body[..body.len() - 1]
        );
        assert_eq!(String::from_utf8_lossy(sent), expected);
        assert!(matches!(
            q.kind,
            QuoteKind::OpenAiChat {
                hide_usage: true,
                ..
            }
        ));
        assert_eq!(q.detail["stream_usage_requested"], true);
        // The input bound covers the longer, forwarded body.
        assert_eq!(q.detail["input_tokens_max"], sent.len() as u64);

        let forwarded = |body: &str| {
            let q = quote(body).unwrap();
            q.forward_body
                .map(|b| String::from_utf8(b.to_vec()).unwrap())
        };
        for (body, sent) in [
            (
                "{\n  \"model\": \"gpt-4o\",\n  \"messages\": [],\n  \"stream\": true\n}\n",
                "{\n  \"model\": \"gpt-4o\",\n  \"messages\": [],\n  \"stream\": true,\"stream_options\":{\"include_usage\":true}\n}\n",
            ),
            (
                r#"{"stream":true,"stream_options":{"include_obfuscation":false},"model":"gpt-4o","messages":[]}"#,
                r#"{"stream":true,"stream_options":{"include_obfuscation":false,"include_usage":true},"model":"gpt-4o","messages":[]}"#,
            ),
            (
                r#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options": {"include_usage": false}}"#,
                r#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options": {"include_usage":true}}"#,
            ),
            (
                r#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options":null}"#,
                r#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
            (
                r#"{"model":"gpt-4o","messages":[],"stream":true,"stream\u005foptions":{}}"#,
                r#"{"model":"gpt-4o","messages":[],"stream":true,"stream\u005foptions":{"include_usage":true}}"#,
            ),
            (
                r#"{"model":"gpt-4o","messages":[],"metadata":{"stream_options":"x"},"stream":true}"#,
                r#"{"model":"gpt-4o","messages":[],"metadata":{"stream_options":"x"},"stream":true,"stream_options":{"include_usage":true}}"#,
            ),
        ] {
            assert_eq!(forwarded(body).as_deref(), Some(sent), "{body}");
            let v: Value = serde_json::from_str(sent).unwrap();
            assert_eq!(v["stream_options"]["include_usage"], true);
        }
        // Nothing changes when the client asked for usage or is not
        // streaming.
        for body in [
            r#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"model":"gpt-4o","messages":[],"stream":false}"#,
            r#"{"model":"gpt-4o","messages":[]}"#,
        ] {
            let q = quote(body).unwrap();
            assert_eq!(q.forward_body, None, "{body}");
            assert!(matches!(
                q.kind,
                QuoteKind::OpenAiChat {
                    hide_usage: false,
                    ..
                }
            ));
        }
        for body in [
            r#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options":"on"}"#,
            r#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options":{},"stream_options":{}}"#,
        ] {
            assert_eq!(
                quote(body).unwrap_err().code(),
                "unpriceable_request",
                "{body}"
            );
        }
    }

    #[test]
    fn members_are_found_by_position() {
        let body = br#" { "a" : "x\"}{[" , "b\\":[1,{"c":"]"}], "d":-1.5e3,"e":{},"f":null } "#;
        let members = top_level_members(body).unwrap();
        let text = |r: &Range<usize>| std::str::from_utf8(&body[r.clone()]).unwrap();
        let got: Vec<(&str, &str)> = members
            .iter()
            .map(|m| (text(&m.key), text(&m.value)))
            .collect();
        assert_eq!(
            got,
            [
                (r#""a""#, r#""x\"}{[""#),
                (r#""b\\""#, r#"[1,{"c":"]"}]"#),
                (r#""d""#, "-1.5e3"),
                (r#""e""#, "{}"),
                (r#""f""#, "null"),
            ]
        );
        assert_eq!(top_level_members(b"{}"), Some(vec![]));
        for bad in [
            &b"[]"[..],
            b"",
            b"{",
            b"{\"a\"}",
            b"{\"a\":}",
            b"{\"a\":1,}",
            b"{\"a\":\"x}",
        ] {
            assert_eq!(
                top_level_members(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Feeds `stream` in `chunks`-sized pieces; what the client is sent.
    fn client_view(st: &mut dyn StreamSettler, stream: &[u8], chunk: usize) -> String {
        let mut seen = Vec::new();
        for c in stream.chunks(chunk) {
            seen.extend_from_slice(&st.pass(Bytes::copy_from_slice(c)));
        }
        seen.extend_from_slice(&st.end_of_stream());
        String::from_utf8(seen).unwrap()
    }

    #[test]
    fn the_usage_chunk_keycap_asked_for_is_hidden_and_settles_the_call() {
        let p = pricing();
        let q = quote(r#"{"model":"gpt-4o","messages":[],"stream":true}"#).unwrap();
        let expected = Micros(ceil_cost(20, 2_500_000) + ceil_cost(4, 10_000_000));
        let crlf = STREAM.replace("\n", "\r\n");
        let crlf_hidden = stream_without_usage_chunk().replace("\n", "\r\n");
        for (stream, hidden) in [
            (STREAM.to_string(), stream_without_usage_chunk()),
            (crlf, crlf_hidden),
        ] {
            for chunk in 1..=stream.len() {
                let mut st = p.stream_settler(&q);
                assert_eq!(
                    client_view(st.as_mut(), stream.as_bytes(), chunk),
                    hidden,
                    "{chunk}"
                );
                let s = st.finish(200);
                assert_eq!((s.cost, s.outcome), (expected, Outcome::Settled), "{chunk}");
            }
        }
        // A client that asked for usage sees every byte.
        let q = quote(r#"{"model":"gpt-4o","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        let mut st = p.stream_settler(&q);
        assert_eq!(client_view(st.as_mut(), STREAM.as_bytes(), 7), STREAM);
        assert_eq!(st.finish(200).cost, expected);
    }

    #[test]
    fn only_the_usage_chunk_is_hidden() {
        let p = pricing();
        let q = quote(r#"{"model":"gpt-4o","messages":[],"stream":true}"#).unwrap();
        // Usage on a chunk that still has choices, a null usage, comments
        // and events without data all pass.
        let stream = ": keep-alive\n\n\
            event: note\n\n\
            data: {\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1}}\n\n\
            data: {\"choices\":[],\"usage\":null}\n\n\
            data: [DONE]\n\n";
        let mut st = p.stream_settler(&q);
        assert_eq!(client_view(st.as_mut(), stream.as_bytes(), 5), stream);
        assert_eq!(st.finish(200).outcome, Outcome::Settled);
    }

    #[test]
    fn a_large_event_is_not_held_without_bound() {
        let q = quote(r#"{"model":"gpt-4o","messages":[],"stream":true}"#).unwrap();
        let mut st = chat_stream_settler(&q);
        let big = format!(
            "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(4 * MAX_HELD_EVENT_BYTES)
        );
        let stream = format!(
            "{big}{}",
            &STREAM[STREAM.find("data: {\"id\":\"c\",\"choices\":[],").unwrap()..]
        );
        let mut seen = Vec::new();
        for c in stream.as_bytes().chunks(4096) {
            seen.extend_from_slice(&st.pass(Bytes::copy_from_slice(c)));
            let held = st.framer.as_ref().map_or(0, SseFramer::held);
            assert!(held <= MAX_HELD_EVENT_BYTES, "{held} bytes held");
        }
        seen.extend_from_slice(&st.end_of_stream());
        // The large event came through whole; the usage chunk after it did not.
        assert_eq!(
            String::from_utf8(seen).unwrap(),
            format!("{big}data: [DONE]\n\n")
        );
        let s = Box::new(st).finish(200);
        assert_eq!(s.outcome, Outcome::Settled);
        assert_eq!(s.detail["input_tokens"], 20);
    }
}
