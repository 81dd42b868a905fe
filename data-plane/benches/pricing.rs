//! The pricing step on realistic calls, per vendor profile: `quote` on a
//! 4 KiB request body (what runs before every forward), `settle_response`
//! on a typical response body, and, for the LLM vendors, settling a
//! streamed response fed event by event through `pass`, as the proxy does.
//!
//! `cargo bench -p keycap-proxy --bench pricing`; results in BENCHMARKS.md.
//! The goal is a quote under 20 us for a 4 KiB JSON body.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::{HeaderMap, HeaderValue};
use keycap_proxy::pricing::{
    model_for, no_headers, Catalog, Outcome, PriceModel, PriceRequest, PriceResponse, Quote,
};
use serde_json::json;

/// Request bodies are padded to exactly this many bytes.
const BODY_BYTES: usize = 4096;

/// Prose for message text, email bodies and metadata: plain ASCII words
/// that need no escaping, so padding adds exactly its length.
const WORDS: &[&str] = &[
    "the",
    "quarterly",
    "invoice",
    "for",
    "account",
    "shows",
    "three",
    "open",
    "items",
    "and",
    "one",
    "credit",
    "note",
    "please",
    "summarise",
    "what",
    "changed",
    "since",
    "last",
    "month",
    "then",
    "draft",
    "a",
    "short",
    "reply",
    "to",
    "customer",
    "explaining",
    "late",
    "fee",
];

fn prose(len: usize) -> String {
    let mut s = String::with_capacity(len + 16);
    for w in WORDS.iter().cycle() {
        if s.len() >= len {
            break;
        }
        s.push_str(w);
        s.push(' ');
    }
    s.truncate(len);
    s
}

/// `build(pad)` with `pad` sized so the whole body is exactly `BODY_BYTES`.
fn exactly_4k(build: impl Fn(&str) -> String) -> Vec<u8> {
    let base = build("").len();
    let body = build(&prose(BODY_BYTES - base));
    assert_eq!(body.len(), BODY_BYTES);
    body.into_bytes()
}

/// One vendor's call: the request it prices and the response it settles.
struct Call {
    name: &'static str,
    profile: &'static str,
    path: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    response: Vec<u8>,
    /// A streamed response, split at event boundaries.
    stream: Option<Vec<Bytes>>,
}

fn stripe_form() -> Call {
    let body = exactly_4k(|pad| {
        let mut b = String::from(
            "amount=4999&currency=usd&customer=cus_Pq3Xb9LmT2vK&payment_method=pm_card_visa\
             &confirm=true&capture_method=automatic&receipt_email=billing%40example.com\
             &shipping[name]=Jenny+Rosen&shipping[address][line1]=1234+Main+Street\
             &shipping[address][city]=San+Francisco&shipping[address][postal_code]=94111\
             &shipping[address][country]=US",
        );
        for i in 0..20 {
            b.push_str(&format!(
                "&metadata[line_{i}]=SKU-{:05}+x{}",
                1000 + i * 37,
                i % 4 + 1
            ));
        }
        b.push_str("&description=");
        b.push_str(&pad.replace(' ', "+"));
        b
    });
    Call {
        name: "stripe_form",
        profile: "stripe",
        path: "/v1/payment_intents",
        content_type: "application/x-www-form-urlencoded",
        body,
        response: stripe_response(),
        stream: None,
    }
}

fn stripe_json() -> Call {
    let body = exactly_4k(|pad| {
        let metadata: serde_json::Map<String, serde_json::Value> = (0..20)
            .map(|i| {
                (
                    format!("line_{i}"),
                    json!(format!("SKU-{:05} x{}", 1000 + i * 37, i % 4 + 1)),
                )
            })
            .collect();
        json!({
            "amount": 4999,
            "currency": "usd",
            "customer": "cus_Pq3Xb9LmT2vK",
            "payment_method": "pm_card_visa",
            "confirm": true,
            "receipt_email": "billing@example.com",
            "shipping": {"name": "Jenny Rosen", "address": {"line1": "1234 Main Street",
                "city": "San Francisco", "postal_code": "94111", "country": "US"}},
            "metadata": metadata,
            "description": pad,
        })
        .to_string()
    });
    Call {
        name: "stripe_json",
        profile: "stripe",
        path: "/v1/payment_intents",
        content_type: "application/json",
        body,
        response: stripe_response(),
        stream: None,
    }
}

fn stripe_response() -> Vec<u8> {
    json!({
        "id": "pi_3MtwBwLkdIwHu7ix28a3tqPa", "object": "payment_intent", "amount": 4999,
        "amount_capturable": 0, "amount_received": 4999, "capture_method": "automatic",
        "client_secret": "pi_3MtwBwLkdIwHu7ix28a3tqPa_secret_YrKJUKribcBjcG8HVhfZluoGH",
        "confirmation_method": "automatic", "created": 1_680_800_504, "currency": "usd",
        "customer": "cus_Pq3Xb9LmT2vK", "latest_charge": "ch_3MtwBwLkdIwHu7ix2Cw2rLkB",
        "livemode": false, "metadata": {"order_id": "6735"}, "payment_method": "pm_1MtwBwLkdIwHu7ix",
        "payment_method_types": ["card"], "status": "succeeded"
    })
    .to_string()
    .into_bytes()
}

/// Six user/assistant exchanges, then the padded user message.
fn chat_messages(pad: &str) -> Vec<serde_json::Value> {
    let mut m = Vec::new();
    for i in 0..6 {
        m.push(json!({"role": "user", "content": prose(180 + i * 20)}));
        m.push(json!({"role": "assistant", "content": prose(240 + i * 10)}));
    }
    m.push(json!({"role": "user", "content": pad}));
    m
}

fn openai() -> Call {
    let body = exactly_4k(|pad| {
        let mut messages = vec![json!({"role": "system", "content": prose(300)})];
        messages.extend(chat_messages(pad));
        json!({
            "model": "gpt-4o-mini",
            "messages": messages,
            "max_completion_tokens": 1024,
            "temperature": 0.2,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
        .to_string()
    });
    let text = prose(900);
    let response = json!({
        "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion",
        "created": 1_741_570_283, "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
            "refusal": null, "annotations": []}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1117, "completion_tokens": 212, "total_tokens": 1329,
            "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
        "service_tier": "default", "system_fingerprint": "fp_06737a9306"
    });
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        json!({"id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG", "object": "chat.completion.chunk",
            "created": 1_741_570_283, "model": "gpt-4o-mini-2024-07-18",
            "system_fingerprint": "fp_06737a9306",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            "usage": null})
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        json!(null),
    )];
    for w in text.split_inclusive(' ') {
        events.push(chunk(json!({"content": w}), json!(null)));
    }
    events.push(chunk(json!({}), json!("stop")));
    let mut usage = response.clone();
    usage["object"] = json!("chat.completion.chunk");
    usage["choices"] = json!([]);
    events.push(usage);
    let mut stream: Vec<Bytes> = events
        .iter()
        .map(|e| Bytes::from(format!("data: {e}\n\n")))
        .collect();
    stream.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Call {
        name: "openai",
        profile: "openai",
        path: "/v1/chat/completions",
        content_type: "application/json",
        body,
        response: response.to_string().into_bytes(),
        stream: Some(stream),
    }
}

fn anthropic() -> Call {
    let body = exactly_4k(|pad| {
        json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 1024,
            "system": prose(300),
            "stream": true,
            "tools": [{"name": "lookup_invoice", "description": "Fetch an invoice by number",
                "input_schema": {"type": "object", "properties": {"number": {"type": "string"}},
                    "required": ["number"]}}],
            "messages": chat_messages(pad),
        })
        .to_string()
    });
    let text = prose(900);
    let usage = json!({"input_tokens": 1093, "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0, "output_tokens": 205, "service_tier": "standard"});
    let response = json!({
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
        "model": "claude-sonnet-4-5-20250929", "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": null, "usage": usage,
    });
    let event = |name: &str, data: serde_json::Value| {
        Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
    };
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    let mut stream = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
            "model": "claude-sonnet-4-5-20250929", "content": [], "stop_reason": null,
            "stop_sequence": null, "usage": start_usage}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    for w in text.split_inclusive(' ') {
        stream.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta",
            "index": 0, "delta": {"type": "text_delta", "text": w}}),
        ));
    }
    stream.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    stream.push(event(
        "message_delta",
        json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
        "usage": {"output_tokens": 205}}),
    ));
    stream.push(event("message_stop", json!({"type": "message_stop"})));
    Call {
        name: "anthropic",
        profile: "anthropic",
        path: "/v1/messages",
        content_type: "application/json",
        body,
        response: response.to_string().into_bytes(),
        stream: Some(stream),
    }
}

fn resend() -> Call {
    let body = exactly_4k(|pad| {
        json!({
            "from": "Acme Billing <billing@acme.example>",
            "to": ["jenny.rosen@example.com", "accounts@example.com"],
            "cc": "finance@acme.example",
            "reply_to": "support@acme.example",
            "subject": "Your invoice INV-2026-0042 is ready",
            "html": format!("<html><body><h1>Invoice INV-2026-0042</h1><p>{pad}</p></body></html>"),
            "tags": [{"name": "category", "value": "invoice"}],
        })
        .to_string()
    });
    Call {
        name: "resend",
        profile: "resend",
        path: "/emails",
        content_type: "application/json",
        body,
        response: br#"{"id":"49a3999c-0ce1-4ea6-ab68-afcd6dc2e794"}"#.to_vec(),
        stream: None,
    }
}

fn twilio() -> Call {
    // An SMS body is at most 1600 characters; the rest of the 4 KiB is the
    // callback URL and other parameters Twilio accepts.
    let body = exactly_4k(|pad| {
        let text: String = pad.chars().take(1500).collect();
        let rest: String = pad.chars().skip(1500).collect();
        form_urlencoded::Serializer::new(String::new())
            .append_pair("To", "+447700900123")
            .append_pair("From", "+15005550006")
            .append_pair("Body", &text)
            .append_pair(
                "StatusCallback",
                &format!("https://hooks.example.com/sms?note={rest}"),
            )
            .finish()
    });
    Call {
        name: "twilio",
        profile: "twilio",
        path: "/2010-04-01/Accounts/AC00000000000000000000000000000000/Messages.json",
        content_type: "application/x-www-form-urlencoded",
        body,
        response: br#"{"sid":"SM00000000000000000000000000000000","status":"queued","num_segments":"10","price":null,"price_unit":"USD"}"#.to_vec(),
        stream: None,
    }
}

/// The generic profile's rules for the bench: a cost from the JSON body.
const GENERIC_RULES: &str = r#"{"currency": "usd", "rules": [
    {"endpoint": "POST /v1/renders", "cost": {"fixed": "0.05"}},
    {"endpoint": "POST /v1/generate", "reserve": "0.50",
     "cost": {"json_pointer": {"pointer": "/usage/cost", "unit": "usd"}}}
]}"#;

fn generic() -> Call {
    let body = exactly_4k(|pad| json!({"prompt": pad}).to_string());
    Call {
        name: "generic",
        profile: "generic",
        path: "/v1/generate",
        content_type: "application/json",
        body,
        response: br#"{"id":"gen_1","usage":{"cost":"0.12","seconds":3}}"#.to_vec(),
        stream: None,
    }
}

struct Priced {
    call: Call,
    model: Arc<dyn PriceModel>,
    quote: Quote,
}

fn priced(call: Call) -> Priced {
    let prices = if call.profile == "generic" {
        GENERIC_RULES
    } else {
        ""
    };
    let model = model_for(
        call.profile,
        &BTreeMap::new(),
        &Catalog::builtin(),
        prices,
        "",
    )
    .unwrap();
    let quote = model
        .quote(&request(&call))
        .unwrap_or_else(|e| panic!("{}: {e}", call.name));
    assert!(quote.reserve.0 > 0, "{}: {quote:?}", call.name);
    Priced { call, model, quote }
}

fn request(call: &Call) -> PriceRequest<'_> {
    PriceRequest {
        method: "POST",
        path: call.path,
        query: None,
        content_type: Some(call.content_type),
        headers: no_headers(),
        body: &call.body,
    }
}

fn content_type(ct: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static(ct));
    h
}

fn pricing(c: &mut Criterion) {
    let calls: Vec<Priced> = [
        stripe_form(),
        stripe_json(),
        openai(),
        anthropic(),
        resend(),
        twilio(),
        generic(),
    ]
    .into_iter()
    .map(priced)
    .collect();
    let json_headers = content_type("application/json");
    let sse_headers = content_type("text/event-stream");

    let mut group = c.benchmark_group("quote");
    for p in &calls {
        group.throughput(Throughput::Bytes(p.call.body.len() as u64));
        group.bench_function(p.call.name, |b| {
            b.iter(|| p.model.quote(black_box(&request(&p.call))).unwrap())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("settle_response");
    for p in &calls {
        let resp = PriceResponse {
            status: 200,
            headers: &json_headers,
            body: &p.call.response,
        };
        let s = p.model.settle_response(&p.quote, &resp);
        assert_eq!(s.outcome, Outcome::Settled, "{}: {s:?}", p.call.name);
        group.throughput(Throughput::Bytes(p.call.response.len() as u64));
        group.bench_function(p.call.name, |b| {
            b.iter(|| p.model.settle_response(&p.quote, black_box(&resp)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("stream_settle");
    for p in &calls {
        let Some(stream) = &p.call.stream else {
            continue;
        };
        let settle = || {
            let mut settler = p.model.stream_settler_for(&p.quote, &sse_headers);
            for chunk in stream {
                black_box(settler.pass(chunk.clone()));
            }
            black_box(settler.end_of_stream());
            settler.finish(200)
        };
        let s = settle();
        assert_eq!(s.outcome, Outcome::Settled, "{}: {s:?}", p.call.name);
        let bytes: usize = stream.iter().map(Bytes::len).sum();
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(format!("{} ({} events)", p.call.name, stream.len()), |b| {
            b.iter(settle)
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Two shared cores: short runs, enough samples for a stable median.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = pricing
}
criterion_main!(benches);
