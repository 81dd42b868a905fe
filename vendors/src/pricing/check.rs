//! Invariant checks for every pricing parser that reads untrusted bytes.
//!
//! Test support, not part of the request path. Each `pub fn` here takes
//! arbitrary bytes, drives them through the shipped price models (request
//! bodies, response bodies, SSE streams) and panics when a money rule
//! breaks: a negative or unbound reservation, a settlement inconsistent
//! with the response status, a stream that settles or reaches the client
//! differently depending on how it was chunked. The fuzz targets in
//! `fuzz/fuzz_targets/` call one function each, and `tests/fuzz_seeds.rs`
//! runs them over the seed corpus on stable, so CI exercises the same
//! checks without a fuzzer.
//!
//! It must never be called by the proxy, and it holds no `cfg` and no
//! `unsafe`: the fuzz build and the test build check the same code.
//!
//! Adding a vendor parser: list its body-priced endpoints in
//! `FORM_ENDPOINTS` or `JSON_ENDPOINTS` and one valid call in
//! `SAMPLE_CALLS`; the existing targets then cover it (a test refuses a
//! profile listed in neither). Adding a target: a function here and a row
//! in `TARGETS`, `fuzz/fuzz_targets/<name>.rs` with a `[[bin]]` in
//! `fuzz/Cargo.toml`, and seeds in `fuzz/corpus/<name>/`.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use keycap_proto::profile::Profile;
use keycap_proto::Micros;
use serde_json::Value;

use super::stripe::StripeOp;
use super::{
    is_success, model_for, Catalog, Outcome, PriceModel, PriceRequest, PriceResponse, PricingError,
    Quote, QuoteKind, Settlement,
};
use crate::sse::SseReader;

/// A fuzz target's check: returns normally or panics on a broken invariant.
pub type Check = fn(&[u8]);

/// Every fuzz target, by the name of its file in `fuzz/fuzz_targets/` and
/// of its seed directory in `fuzz/corpus/`.
pub const TARGETS: &[(&str, Check)] = &[
    ("form_body", form_body),
    ("json_body", json_body),
    ("sse_stream", sse_stream),
    ("settle_body", settle_body),
    ("query_and_body", query_and_body),
];

/// An endpoint whose request body a profile reads to price the call.
#[derive(Debug, Clone, Copy)]
pub struct Endpoint {
    pub profile: &'static str,
    pub method: &'static str,
    pub path: &'static str,
    pub content_type: &'static str,
}

const FORM: &str = "application/x-www-form-urlencoded";
const JSON: &str = "application/json";

/// Endpoints priced from a form-encoded body (`form_body`).
pub const FORM_ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        profile: "stripe",
        method: "POST",
        path: "/v1/charges",
        content_type: FORM,
    },
    Endpoint {
        profile: "stripe",
        method: "POST",
        path: "/v1/payment_intents",
        content_type: FORM,
    },
    Endpoint {
        profile: "twilio",
        method: "POST",
        path: "/2010-04-01/Accounts/AC00000000000000000000000000000000/Messages.json",
        content_type: FORM,
    },
    Endpoint {
        profile: "stripe",
        method: "POST",
        path: "/v1/checkout/sessions",
        content_type: FORM,
    },
];

/// Endpoints priced from a JSON body (`json_body`).
pub const JSON_ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        profile: "stripe",
        method: "POST",
        path: "/v1/charges",
        content_type: JSON,
    },
    Endpoint {
        profile: "stripe",
        method: "POST",
        path: "/v1/payment_intents",
        content_type: JSON,
    },
    Endpoint {
        profile: "openai",
        method: "POST",
        path: "/v1/chat/completions",
        content_type: JSON,
    },
    Endpoint {
        profile: "anthropic",
        method: "POST",
        path: "/v1/messages",
        content_type: JSON,
    },
    Endpoint {
        profile: "resend",
        method: "POST",
        path: "/emails",
        content_type: JSON,
    },
    Endpoint {
        profile: "resend",
        method: "POST",
        path: "/emails/batch",
        content_type: JSON,
    },
    Endpoint {
        profile: "openai",
        method: "POST",
        path: "/v1/responses",
        content_type: JSON,
    },
    Endpoint {
        profile: "openai",
        method: "POST",
        path: "/v1/embeddings",
        content_type: JSON,
    },
    Endpoint {
        profile: "openai",
        method: "POST",
        path: "/v1/images/generations",
        content_type: JSON,
    },
];

/// A generic vendor's endpoint: its rules never read the request body, so
/// it is fuzzed through settlement only (`settle_body`, `sse_stream`).
pub const GENERIC_ENDPOINT: Endpoint = Endpoint {
    profile: "generic",
    method: "POST",
    path: "/v1/generate",
    content_type: JSON,
};

/// The generic profile has no shipped table: it is fuzzed with these rules
/// (a fixed cost, a cost from a header, a cost from a JSON pointer).
const GENERIC_RULES: &str = r#"{"currency": "usd", "rules": [
    {"endpoint": "POST /v1/renders", "cost": {"fixed": "0.05"}},
    {"endpoint": "POST /v1/jobs", "reserve": "1.00",
     "cost": {"header": {"name": "x-request-cost", "unit": "usd"}}},
    {"endpoint": "POST /v1/generate", "reserve": "0.50",
     "cost": {"json_pointer": {"pointer": "/usage/cost", "unit": "usd"}}}
]}"#;

/// A valid priced call: the quote that `settle_body` and `sse_stream`
/// settle fuzzed responses against.
#[derive(Debug, Clone, Copy)]
pub struct SampleCall {
    pub endpoint: Endpoint,
    pub body: &'static str,
}

/// One or more priced calls per profile. LLM calls ask for a stream (and,
/// for OpenAI, its usage report), as agents do.
pub const SAMPLE_CALLS: &[SampleCall] = &[
    SampleCall {
        endpoint: FORM_ENDPOINTS[0],
        body: "amount=2000&currency=usd&source=tok_visa",
    },
    SampleCall {
        endpoint: FORM_ENDPOINTS[1],
        body: "amount=1000&currency=eur&confirm=true",
    },
    SampleCall {
        endpoint: JSON_ENDPOINTS[2],
        body: r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hi"}],"max_completion_tokens":50,"stream":true,"stream_options":{"include_usage":true}}"#,
    },
    SampleCall {
        endpoint: JSON_ENDPOINTS[3],
        body: r#"{"model":"claude-haiku-4-5","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"Hello"}]}"#,
    },
    SampleCall {
        endpoint: JSON_ENDPOINTS[4],
        body: r#"{"from":"a@example.com","to":["b@example.com","c@example.com"],"subject":"hi","text":"hi"}"#,
    },
    SampleCall {
        endpoint: FORM_ENDPOINTS[2],
        body: "To=%2B14155550100&From=%2B15005550006&Body=Hello%20from%20keycap",
    },
    SampleCall {
        endpoint: GENERIC_ENDPOINT,
        body: r#"{"prompt":"a lighthouse"}"#,
    },
    SampleCall {
        endpoint: JSON_ENDPOINTS[5],
        body: r#"[{"from":"a@example.com","to":"b@example.com","subject":"1"},{"from":"a@example.com","to":"c@example.com","bcc":["d@example.com"],"subject":"2"}]"#,
    },
];

/// Currency rates the Stripe model is built with, so conversions (and the
/// zero- and three-decimal currencies) are exercised, not just refused.
const RATES: [(&str, &str); 4] = [
    ("eur", "1.08"),
    ("jpy", "0.0067"),
    ("kwd", "3.25"),
    ("gbp", "1.2700001"),
];

/// Largest client-facing error message: client text in it is clipped, so
/// no request can make the proxy echo it back at length.
const MAX_ERROR_MESSAGE: usize = 512;

/// Event bound for the reader checked on its own; small, so fuzzed inputs
/// reach the overflow path.
const READER_LIMIT: usize = 256;

/// Every profile's model, with the shipped price tables.
static MODELS: LazyLock<BTreeMap<&'static str, Arc<dyn PriceModel>>> = LazyLock::new(|| {
    let rates: BTreeMap<String, String> = RATES
        .iter()
        .map(|(c, r)| (c.to_string(), r.to_string()))
        .collect();
    let catalog = Catalog::builtin();
    Profile::ALL
        .iter()
        .map(|p| {
            let prices = if *p == Profile::Generic {
                GENERIC_RULES
            } else {
                ""
            };
            let model = model_for(p.as_str(), &rates, &catalog, prices, "")
                .unwrap_or_else(|e| panic!("profile {}: {e}", p.as_str()));
            (p.as_str(), model)
        })
        .collect()
});

/// The sample calls with their quotes.
static SAMPLES: LazyLock<Vec<(SampleCall, Quote)>> = LazyLock::new(|| {
    SAMPLE_CALLS
        .iter()
        .map(|call| {
            let quote = quote(&call.endpoint, call.body.as_bytes()).unwrap_or_else(|e| {
                panic!(
                    "sample call {} {} {} no longer quotes: {e}",
                    call.endpoint.profile, call.endpoint.method, call.endpoint.path
                )
            });
            assert!(
                quote.reserve > Micros::ZERO,
                "sample calls are priced: {quote:?}"
            );
            (*call, quote)
        })
        .collect()
});

fn model(profile: &str) -> &'static dyn PriceModel {
    match MODELS.get(profile) {
        Some(m) => m.as_ref(),
        None => panic!("no pricing profile {profile:?}: fix the endpoint tables"),
    }
}

fn headers(content_type: &'static str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    h
}

static JSON_HEADERS: LazyLock<HeaderMap> = LazyLock::new(|| headers(JSON));
static SSE_HEADERS: LazyLock<HeaderMap> = LazyLock::new(|| headers("text/event-stream"));

/// Quotes `body` on `ep` with the models the checks use.
pub fn quote(ep: &Endpoint, body: &[u8]) -> Result<Quote, PricingError> {
    model(ep.profile).quote(&PriceRequest {
        method: ep.method,
        path: ep.path,
        query: None,
        content_type: Some(ep.content_type),
        headers: super::no_headers(),
        body,
    })
}

/// Arbitrary bytes as the form-encoded body of every form-priced endpoint:
/// a quote with a reservation the body justifies, or a clean refusal.
pub fn form_body(data: &[u8]) {
    // The body as a plain form decoder reads it: the reference the Stripe
    // quote must agree with.
    let values = |name: &str| -> Vec<String> {
        form_urlencoded::parse(data)
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
            .collect()
    };
    let (amounts, currencies) = (values("amount"), values("currency"));
    for ep in FORM_ENDPOINTS {
        let quoted = quote(ep, data);
        check_quote(ep, data, &quoted);
        if ep.profile == "stripe" && (amounts.len() > 1 || currencies.len() > 1) {
            // Which duplicate the vendor honours is not guessed.
            assert!(quoted.is_err(), "{ep:?}: duplicate field quoted");
        }
        let Ok(Quote {
            kind:
                QuoteKind::Stripe {
                    amount,
                    currency,
                    // The amount a charge or intent states; a checkout
                    // session sums its line items instead.
                    op: StripeOp::Charge | StripeOp::Intent,
                },
            ..
        }) = &quoted
        else {
            continue;
        };
        // The amount reserved is the one the body states, once.
        assert_eq!(amounts.len(), 1, "{ep:?}: one amount, got {amounts:?}");
        assert!(
            amounts[0].bytes().all(|b| b.is_ascii_digit()),
            "{amounts:?}"
        );
        assert_eq!(amounts[0].parse::<i64>(), Ok(*amount), "{ep:?}");
        assert_eq!(currencies.len(), 1, "{ep:?}: {currencies:?}");
        assert_eq!(&currencies[0].to_ascii_lowercase(), currency, "{ep:?}");
    }
}

/// Arbitrary bytes as the JSON body of every JSON-priced endpoint: a quote
/// with a reservation the body justifies, or a clean refusal.
pub fn json_body(data: &[u8]) {
    for ep in JSON_ENDPOINTS {
        let quoted = quote(ep, data);
        check_quote(ep, data, &quoted);
        let Ok(q) = &quoted else { continue };
        // A quoted body is read exactly: valid JSON, no key named twice.
        let v: Value = match super::parse_json(data) {
            Ok(v) => v,
            Err(e) => panic!("{ep:?}: quoted a body not read exactly ({e}): {q:?}"),
        };
        match &q.kind {
            QuoteKind::Stripe {
                amount, currency, ..
            } => {
                assert_eq!(v.get("amount").and_then(Value::as_i64), Some(*amount));
                let stated = v.get("currency").and_then(Value::as_str);
                assert_eq!(stated.map(str::to_ascii_lowercase).as_ref(), Some(currency));
            }
            QuoteKind::OpenAiChat { .. } | QuoteKind::AnthropicMessages { .. } => {
                let asked = v.get("stream") == Some(&Value::Bool(true));
                assert_eq!(q.streaming, asked, "{ep:?}: streaming flag");
                // What adds billed tokens the body does not state is never
                // quoted.
                for unbounded in ["mcp_servers", "container", "web_search_options", "audio"] {
                    assert!(
                        v.get(unbounded).is_none_or(Value::is_null),
                        "{ep:?}: quoted a body with {unbounded}: {q:?}"
                    );
                }
                // Prediction tokens are billed as output, and bounded so.
                if let Some(p) = v.get("prediction").filter(|p| !p.is_null()) {
                    let output_max = q.detail["output_tokens_max"].as_u64().unwrap_or(0);
                    let len = p.to_string().len() as u64;
                    assert!(
                        output_max >= len,
                        "{ep:?}: prediction of {len} bytes: {q:?}"
                    );
                }
            }
            _ => {}
        }
    }
}

/// Invariants of any quote or refusal for a body-priced endpoint.
fn check_quote(ep: &Endpoint, body: &[u8], quoted: &Result<Quote, PricingError>) {
    let q = match quoted {
        Err(PricingError::Config(m)) => {
            panic!("{ep:?}: a request raised a configuration error: {m}")
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.len() <= MAX_ERROR_MESSAGE,
                "{ep:?}: error message of {} bytes: {msg}",
                msg.len()
            );
            return;
        }
        Ok(q) => q,
    };
    assert!(q.reserve >= Micros::ZERO, "{ep:?}: negative reserve {q:?}");
    match &q.kind {
        QuoteKind::Free => panic!("{ep:?} is priced from its body but quoted free: {q:?}"),
        QuoteKind::Stripe {
            amount, currency, ..
        } => {
            assert!(*amount >= 0, "{q:?}");
            assert!(
                currency.len() == 3 && currency.bytes().all(|b| b.is_ascii_lowercase()),
                "{q:?}"
            );
            assert!(!q.streaming, "{q:?}");
            if currency == "usd" {
                // Cents to micro-dollars, exactly.
                assert_eq!(Some(q.reserve.0), amount.checked_mul(10_000), "{q:?}");
            } else if *amount > 0 {
                // Converted and rounded up: a charge is never reserved at 0.
                assert!(q.reserve > Micros::ZERO, "{q:?}");
            }
        }
        QuoteKind::OpenAiChat { price, .. } | QuoteKind::AnthropicMessages { price, .. } => {
            let bound = |k: &str| {
                q.detail
                    .get(k)
                    .and_then(Value::as_u64)
                    .unwrap_or_else(|| panic!("{ep:?}: quote detail lacks {k}: {q:?}"))
            };
            let (input_max, output_max) = (bound("input_tokens_max"), bound("output_tokens_max"));
            // A token is at least one byte: every body byte is reserved as
            // input, and the output bound is never zero.
            let body_len = body.len() as u64;
            assert!(input_max >= body_len, "{ep:?}: {input_max} < {body_len}");
            assert!(output_max >= 1, "{q:?}");
            // Every input token at the dearest input price.
            if let Some(floor) = price.bound(body_len, output_max, None) {
                assert!(q.reserve >= floor, "{ep:?}: {q:?} under {floor:?}");
            }
        }
        QuoteKind::Resend { recipients } => {
            let per = q.detail.get("per_recipient_micros").and_then(Value::as_i64);
            let emails = q.detail.get("emails").and_then(Value::as_u64);
            assert!(*recipients >= 1, "{q:?}");
            assert!(emails.is_some_and(|e| e >= 1 && e <= *recipients), "{q:?}");
            let want = per.and_then(|p| p.checked_mul(i64::try_from(*recipients).ok()?));
            assert_eq!(want, Some(q.reserve.0), "{q:?}");
        }
        // A new kind gets the checks above (no panic, reserve >= 0) until
        // it adds its own arm.
        #[allow(unreachable_patterns)]
        _ => {}
    }
}

/// Arbitrary bytes as an SSE response, cut where the fuzzer says (see
/// `split_chunks`), through `SseReader` and every sample call's stream
/// settler. The reader stays within its bound and reads the same events
/// however the stream is cut; each settler settles the same way and shows
/// the client the same bytes however the stream is cut, and passes them
/// through unchanged unless keycap changed the request.
pub fn sse_stream(data: &[u8]) {
    let (stream, cut) = split_chunks(data);
    let whole: Vec<&[u8]> = vec![stream];
    let bytewise: Vec<&[u8]> = stream.chunks(1).collect();

    let small = read_events(&cut, READER_LIMIT);
    assert_eq!(
        small,
        read_events(&whole, READER_LIMIT),
        "reader: cut vs whole"
    );
    assert_eq!(
        small,
        read_events(&bytewise, READER_LIMIT),
        "reader: bytewise"
    );
    if stream.len() <= READER_LIMIT {
        assert!(!small.1, "a stream within the limit overflowed it");
    }
    let large = read_events(&cut, crate::sse::DEFAULT_MAX_EVENT_BYTES);
    if !small.1 {
        assert_eq!(small, large, "the limit changed events it did not drop");
    }

    for (call, quote) in SAMPLES.iter() {
        let model = model(call.endpoint.profile);
        // One cut against the whole stream: the fuzzer's sizes reach every
        // other cut (sizes of 1 feed it byte by byte).
        let (seen, settled) = stream_through(model, quote, &cut, 200);
        let (seen_whole, settled_whole) = stream_through(model, quote, &whole, 200);
        assert_eq!(
            settled, settled_whole,
            "{call:?}: settlement depends on cuts"
        );
        assert_eq!(seen, seen_whole, "{call:?}: client bytes depend on cuts");
        if quote.forward_body.is_none() {
            assert!(
                seen == stream,
                "{call:?}: the client was not sent the stream"
            );
        } else {
            assert!(is_subsequence(&seen, stream), "{call:?}: bytes were added");
        }
        check_settlement(quote, 200, &settled);
        let (_, failed) = stream_through(model, quote, &cut, 502);
        check_settlement(quote, 502, &failed);
    }
}

/// Splits fuzz input into a stream and the chunks to feed it in. The first
/// byte's low three bits give how many chunk sizes follow (0 to 7 bytes);
/// the rest is the stream, cut by cycling through those sizes (a zero size
/// feeds an empty chunk). No sizes: one chunk.
pub fn split_chunks(data: &[u8]) -> (&[u8], Vec<&[u8]>) {
    let Some((&first, rest)) = data.split_first() else {
        return (data, vec![data]);
    };
    let n = usize::from(first & 7).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let mut chunks = Vec::new();
    if sizes.iter().all(|&s| s == 0) {
        chunks.extend(sizes.iter().map(|_| &stream[..0]));
        chunks.push(stream);
        return (stream, chunks);
    }
    let mut pos = 0;
    for &size in sizes.iter().cycle() {
        if pos == stream.len() {
            break;
        }
        let end = (pos + usize::from(size)).min(stream.len());
        chunks.push(&stream[pos..end]);
        pos = end;
    }
    (stream, chunks)
}

/// The events a reader with `limit` reads from `chunks`, and whether it
/// overflowed; it never holds more than `limit` bytes between chunks.
fn read_events(chunks: &[&[u8]], limit: usize) -> (Vec<String>, bool) {
    let mut reader = SseReader::with_limit(limit);
    let mut events = Vec::new();
    for chunk in chunks {
        events.extend(reader.feed(chunk));
        assert!(
            reader.buffered() <= limit,
            "reader holds {} bytes, limit {limit}",
            reader.buffered()
        );
    }
    for e in &events {
        // Replacement characters can only make invalid bytes longer, so
        // bound the bytes before lossy decoding: 3 per input byte.
        assert!(
            e.len() <= limit.saturating_mul(3),
            "event of {} bytes",
            e.len()
        );
    }
    (events, reader.overflowed())
}

/// What the client is sent for `chunks`, and the settlement at `status`.
fn stream_through(
    model: &dyn PriceModel,
    quote: &Quote,
    chunks: &[&[u8]],
    status: u16,
) -> (Vec<u8>, Settlement) {
    let mut settler = model.stream_settler_for(quote, &SSE_HEADERS);
    let mut seen = Vec::new();
    for chunk in chunks {
        seen.extend_from_slice(&settler.pass(Bytes::copy_from_slice(chunk)));
    }
    seen.extend_from_slice(&settler.end_of_stream());
    (seen, settler.finish(status))
}

fn is_subsequence(sub: &[u8], of: &[u8]) -> bool {
    let mut rest = of.iter();
    sub.iter().all(|b| rest.any(|x| x == b))
}

/// Stripe writes whose query and body `query_and_body` reads as one set:
/// priced ones, and free ones that refuse some parameters.
const STRIPE_WRITES: [(&str, &str); 6] = [
    ("POST", "/v1/charges"),
    ("POST", "/v1/payment_intents"),
    ("POST", "/v1/invoices/in_1"),
    ("POST", "/v1/payment_intents/pi_1"),
    ("POST", "/v1/customers/cus_1"),
    ("DELETE", "/v1/customers/cus_1"),
];

/// Splits fuzz input into a query string and a body: the first byte is how
/// many of the rest are the query (the query as text, lossily).
pub fn split_query(data: &[u8]) -> (String, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (String::new(), data);
    };
    let (query, body) = rest.split_at(usize::from(n).min(rest.len()));
    (String::from_utf8_lossy(query).into_owned(), body)
}

/// Arbitrary bytes as a write's query string and form body (see
/// `split_query`). Stripe reads both as one set: a quote comes only from
/// a query without `;`, with no top-level name in both, stating one amount
/// across both, and never lets through a guarded parameter with a value
/// that could move money. Every other profile lets a write's query through
/// only when each parameter is one it knows harmless.
pub fn query_and_body(data: &[u8]) {
    let (query, body) = split_query(data);
    let pairs = |bytes: &[u8]| -> Vec<(String, String)> {
        form_urlencoded::parse(bytes)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect()
    };
    let (in_query, in_body) = (pairs(query.as_bytes()), pairs(body));
    let top = |name: &str| name.split('[').next().unwrap_or("").to_string();
    let all: Vec<(String, String)> = in_query.iter().chain(&in_body).cloned().collect();
    let values = |name: &str| -> Vec<&str> {
        all.iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let has = |name: &str| all.iter().any(|(k, _)| top(k) == name);
    for (method, path) in STRIPE_WRITES {
        let req = PriceRequest {
            method,
            path,
            query: Some(&query),
            content_type: Some(FORM),
            headers: super::no_headers(),
            body,
        };
        let quoted = model("stripe").quote(&req);
        let q = match quoted {
            Err(PricingError::Config(m)) => panic!("{method} {path}: configuration error {m}"),
            Err(e) => {
                assert!(e.to_string().len() <= MAX_ERROR_MESSAGE, "{e}");
                continue;
            }
            Ok(q) => q,
        };
        let at = format!("{method} {path}?{query}");
        assert!(!query.contains(';'), "{at}: a query with ';' was read");
        let names_in = |ps: &[(String, String)]| -> Vec<String> {
            ps.iter()
                .map(|(k, _)| top(k))
                .filter(|k| !k.is_empty())
                .collect()
        };
        let (qn, bn) = (names_in(&in_query), names_in(&in_body));
        assert!(
            !qn.iter().any(|n| bn.contains(n)),
            "{at}: a name in the query and the body was read"
        );
        match path {
            "/v1/charges" | "/v1/payment_intents" => {
                let QuoteKind::Stripe { amount, .. } = q.kind else {
                    panic!("{at}: a charge quoted free: {q:?}");
                };
                // The amount reserved is the one stated, once, in either.
                let stated = values("amount");
                assert_eq!(stated.len(), 1, "{at}: {stated:?}");
                assert_eq!(stated[0].parse::<i64>(), Ok(amount), "{at}");
            }
            "/v1/invoices/in_1" => {
                assert!(values("auto_advance").iter().all(|v| *v == "false"), "{at}");
                assert!(!has("automatically_finalizes_at"), "{at}");
                assert!(
                    values("collection_method")
                        .iter()
                        .all(|v| *v == "send_invoice"),
                    "{at}"
                );
            }
            "/v1/payment_intents/pi_1" => {
                assert!(!has("amount") && !has("currency"), "{at}");
            }
            "/v1/customers/cus_1" if method == "POST" => assert!(!has("balance"), "{at}"),
            _ => assert!(
                all.iter().all(|(k, _)| k.is_empty()),
                "{at}: a parameter the delete does not have"
            ),
        }
    }
    for (profile, harmless) in [
        ("openai", &[("beta", "true")][..]),
        ("anthropic", &[("beta", "true")][..]),
        ("resend", &[][..]),
        ("twilio", &[][..]),
        ("generic", &[][..]),
    ] {
        let req = PriceRequest {
            method: "POST",
            path: "/v1/generate",
            query: Some(&query),
            content_type: Some(JSON),
            headers: super::no_headers(),
            body,
        };
        if model(profile).check_write_query(&req).is_ok() {
            assert!(!query.contains(';'), "{profile}: ';' let through");
            for (k, v) in &in_query {
                assert!(
                    harmless.contains(&(k.as_str(), v.as_str())),
                    "{profile}: {k}={v} let through"
                );
            }
        }
    }
}

/// Arbitrary bytes as a response to every sample call: the first two bytes
/// are the status (big-endian, any u16, as the proxy may report 0 for a
/// call that got no response), the rest the body.
pub fn settle_body(data: &[u8]) {
    let (status, body) = match data {
        [hi, lo, rest @ ..] => (u16::from_be_bytes([*hi, *lo]), rest),
        _ => (200, data),
    };
    for (call, quote) in SAMPLES.iter() {
        let model = model(call.endpoint.profile);
        let settled = model.settle_response(
            quote,
            &PriceResponse {
                status,
                headers: &JSON_HEADERS,
                body,
            },
        );
        check_settlement(quote, status, &settled);
    }
}

/// A settlement is consistent with its quote and the response status.
fn check_settlement(quote: &Quote, status: u16, s: &Settlement) {
    assert!(s.cost >= Micros::ZERO, "negative cost: {s:?}");
    assert_eq!(
        s.detail.get("status").and_then(Value::as_u64),
        Some(u64::from(status)),
        "the audit detail names the status: {s:?}"
    );
    if !is_success(status) {
        assert_eq!(
            (s.cost, s.outcome),
            (Micros::ZERO, Outcome::Released),
            "{s:?}"
        );
        return;
    }
    match s.outcome {
        Outcome::Released => panic!("a {status} was released: {quote:?} {s:?}"),
        Outcome::SettledAtReservation => {
            assert_eq!(s.cost, quote.reserve, "{s:?}");
            assert!(
                s.detail.get("reason").is_some_and(Value::is_string),
                "{s:?}"
            );
        }
        Outcome::Settled => {
            let usage_priced = matches!(
                quote.kind,
                QuoteKind::OpenAiChat { .. } | QuoteKind::AnthropicMessages { .. }
            );
            if matches!(quote.kind, QuoteKind::Resend { .. } | QuoteKind::Free) {
                assert_eq!(s.cost, quote.reserve, "fixed-cost call: {s:?}");
            }
            if matches!(quote.kind, QuoteKind::Stripe { .. })
                && s.cost == Micros::ZERO
                && quote.reserve > Micros::ZERO
            {
                // Stripe spends 0 only when the object says nothing moved
                // or the answer is a replay.
                assert!(
                    s.detail.get("object_status").is_some()
                        || s.detail.get("idempotent_replay").is_some(),
                    "Stripe settled at 0 without saying why: {s:?}"
                );
            }
            if s.cost > quote.reserve {
                assert_eq!(
                    s.detail.get("exceeded_reservation"),
                    Some(&Value::Bool(true)),
                    "a cost above the reservation is flagged: {s:?}"
                );
            }
            // A priced call settles at 0 only from a reported usage of 0.
            if s.cost == Micros::ZERO && quote.reserve > Micros::ZERO {
                let obj = s.detail.as_object();
                let counts: Vec<(&String, &Value)> = obj
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| k.ends_with("_tokens"))
                    .collect();
                if usage_priced {
                    assert!(
                        ["input_tokens", "output_tokens"]
                            .iter()
                            .all(|k| counts.iter().any(|(c, _)| c == k)),
                        "settled at 0 without reported counts: {s:?}"
                    );
                }
                assert!(
                    counts.iter().all(|(_, v)| v.as_u64() == Some(0)),
                    "settled at 0 from non-zero usage: {s:?}"
                );
            }
        }
    }
}
