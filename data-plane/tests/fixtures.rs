//! Vendor fixtures: requests and responses written from each vendor's public
//! API reference, priced and settled through the shipped price tables.
//!
//! Each `tests/fixtures/<vendor>/<case>.json` holds one call:
//!
//! ```json
//! {
//!   "about": "what the case shows",
//!   "profile": "openai",
//!   "currency_rates": {"eur": "1.08"},          // optional
//!   "base_url": "https://eu.api.openai.com",    // optional: where the vendor's calls go
//!   "prices": { ... },                           // optional operator table
//!   "request": {
//!     "method": "POST", "path": "/v1/...", "query": "a=b",   // query optional
//!     "content_type": "application/json",                   // optional
//!     "headers": {"idempotency-key": "k1"},                 // optional
//!     "body": { ... } | "form=encoded&text"                  // JSON value or text
//!   },
//!   "looked": [{"path": "/v1/...", "status": 200, "body": { ... }}],  // optional:
//!          // the objects the proxy reads from the vendor first (`lookups`)
//!   "quote": {"reserve_micros": 1234, "streaming": false, "detail": { ... }}
//!          | {"error": "unpriceable_request"},
//!   "forward_body": { ... },          // optional: the body keycap forwards instead
//!   "response": {                     // absent when the quote is refused
//!     "status": 200, "headers": { ... },
//!     "body": { ... } | "text"        // or "stream": "<file>.sse" beside the case
//!   },
//!   "client_sees": "<file>.sse",      // optional: what a stream's client receives
//!   "settle": {"cost_micros": 1000, "outcome": "settled", "detail": { ... }}
//! }
//! ```
//!
//! `detail` objects are matched as subsets: every field the fixture names
//! must be present with that value. A streamed response is fed in several
//! chunkings (whole, 1 byte, 7 bytes, split at every event) and must settle
//! the same way, and show the client the same bytes, each time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use keycap_proxy::pricing::{model_for, Catalog, Looked, PriceRequest, PriceResponse, Settlement};
use serde_json::Value;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cases() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for vendor in std::fs::read_dir(fixture_dir()).expect("tests/fixtures exists") {
        let vendor = vendor.unwrap().path();
        if !vendor.is_dir() {
            continue;
        }
        for case in std::fs::read_dir(&vendor).unwrap() {
            let case = case.unwrap().path();
            if case.extension().is_some_and(|e| e == "json") {
                out.push(case);
            }
        }
    }
    out.sort();
    out
}

fn headers(v: &Value) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(obj) = v.as_object() {
        for (k, v) in obj {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                HeaderValue::from_str(v.as_str().expect("header values are strings"))
                    .expect("header value"),
            );
        }
    }
    h
}

/// A body given as a JSON string is the text itself; anything else is JSON.
fn body_bytes(v: &Value) -> Vec<u8> {
    match v {
        Value::Null => Vec::new(),
        Value::String(s) => s.clone().into_bytes(),
        other => other.to_string().into_bytes(),
    }
}

/// Every field of `want` is in `got` with the same value (recursively for
/// objects).
fn assert_subset(case: &str, what: &str, want: &Value, got: &Value) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let gv = g
                    .get(k)
                    .unwrap_or_else(|| panic!("{case}: {what}.{k} missing in {got}"));
                assert_subset(case, &format!("{what}.{k}"), wv, gv);
            }
        }
        _ => assert_eq!(want, got, "{case}: {what}"),
    }
}

fn check_settlement(case: &str, want: &Value, got: &Settlement) {
    assert_eq!(
        want["cost_micros"].as_i64(),
        Some(got.cost.0),
        "{case}: settled cost ({got:?})"
    );
    assert_eq!(
        want["outcome"].as_str(),
        Some(got.outcome.as_str()),
        "{case}: outcome ({got:?})"
    );
    if let Some(d) = want.get("detail") {
        assert_subset(case, "settle.detail", d, &got.detail);
    }
}

/// Chunkings a stream is fed in: whole, 1 byte, 7 bytes, one per event.
fn chunkings(stream: &[u8]) -> Vec<Vec<Bytes>> {
    let by = |n: usize| stream.chunks(n).map(Bytes::copy_from_slice).collect();
    let mut per_event = Vec::new();
    let mut start = 0;
    for i in 0..stream.len() {
        if stream[i..].starts_with(b"\n\n") {
            per_event.push(Bytes::copy_from_slice(&stream[start..i + 2]));
            start = i + 2;
        }
    }
    if start < stream.len() {
        per_event.push(Bytes::copy_from_slice(&stream[start..]));
    }
    vec![
        vec![Bytes::copy_from_slice(stream)],
        by(1),
        by(7),
        per_event,
    ]
}

fn run_case(path: &Path) {
    let case = path
        .strip_prefix(fixture_dir())
        .unwrap()
        .display()
        .to_string();
    let text = std::fs::read_to_string(path).unwrap();
    let f: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{case}: {e}"));
    let rates: BTreeMap<String, String> =
        serde_json::from_value(f.get("currency_rates").cloned().unwrap_or(Value::Null))
            .unwrap_or_default();
    let prices = f.get("prices").map(Value::to_string).unwrap_or_default();
    let model = model_for(
        f["profile"].as_str().expect("profile"),
        &rates,
        &Catalog::builtin(),
        &prices,
        f["base_url"].as_str().unwrap_or_default(),
    )
    .unwrap_or_else(|e| panic!("{case}: {e}"));

    let r = &f["request"];
    let req_headers = headers(&r["headers"]);
    let body = body_bytes(&r["body"]);
    let request = PriceRequest {
        method: r["method"].as_str().expect("request.method"),
        path: r["path"].as_str().expect("request.path"),
        query: r["query"].as_str(),
        content_type: r["content_type"].as_str(),
        headers: &req_headers,
        body: &body,
    };
    let looked: Vec<Looked> = f["looked"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|l| Looked {
                    path: l["path"].as_str().expect("looked.path").to_string(),
                    status: l["status"].as_u64().expect("looked.status") as u16,
                    body: Bytes::from(body_bytes(&l["body"])),
                })
                .collect()
        })
        .unwrap_or_default();
    if f["quote"].get("error").is_none() {
        let wanted: Vec<&str> = looked.iter().map(|l| l.path.as_str()).collect();
        let asked = model
            .lookups(&request)
            .unwrap_or_else(|e| panic!("{case}: lookups: {e}"));
        assert_eq!(asked, wanted, "{case}: the objects read before pricing");
    }
    let quoted = model.quote_with(&request, &looked);
    let want = &f["quote"];
    if let Some(code) = want.get("error") {
        let err = quoted.expect_err(&format!("{case}: quote should be refused"));
        assert_eq!(code.as_str(), Some(err.code()), "{case}: {err}");
        return;
    }
    let quote = quoted.unwrap_or_else(|e| panic!("{case}: quote refused: {e}"));
    assert_eq!(
        want["reserve_micros"].as_i64(),
        Some(quote.reserve.0),
        "{case}: reservation ({quote:?})"
    );
    if let Some(s) = want.get("streaming") {
        assert_eq!(s.as_bool(), Some(quote.streaming), "{case}: streaming");
    }
    if let Some(d) = want.get("detail") {
        assert_subset(&case, "quote.detail", d, &quote.detail);
    }
    match (f.get("forward_body"), &quote.forward_body) {
        (None, None) => {}
        (Some(want), Some(got)) => {
            let got: Value = serde_json::from_slice(got).expect("forwarded body is JSON");
            assert_eq!(want, &got, "{case}: forwarded body");
        }
        (want, got) => panic!("{case}: forward_body: fixture {want:?}, quote {got:?}"),
    }

    let resp = &f["response"];
    let status = resp["status"].as_u64().expect("response.status") as u16;
    let resp_headers = headers(&resp["headers"]);
    if let Some(stream) = resp["stream"].as_str() {
        let dir = path.parent().unwrap();
        let stream = std::fs::read(dir.join(stream)).unwrap();
        let client_sees = f["client_sees"]
            .as_str()
            .map(|name| std::fs::read(dir.join(name)).unwrap());
        for chunks in chunkings(&stream) {
            let mut settler = model.stream_settler_for(&quote, &resp_headers);
            let mut seen = Vec::new();
            for c in chunks.iter() {
                seen.extend_from_slice(&settler.pass(c.clone()));
            }
            seen.extend_from_slice(&settler.end_of_stream());
            let expected = client_sees.as_deref().unwrap_or(&stream);
            assert_eq!(
                String::from_utf8_lossy(expected),
                String::from_utf8_lossy(&seen),
                "{case}: what the client sees ({} chunks)",
                chunks.len()
            );
            check_settlement(&case, &f["settle"], &settler.finish(status));
        }
    } else {
        let body = body_bytes(&resp["body"]);
        let s = model.settle_response(
            &quote,
            &PriceResponse {
                status,
                headers: &resp_headers,
                body: &body,
            },
        );
        check_settlement(&case, &f["settle"], &s);
    }
}

#[test]
fn every_vendor_fixture_prices_and_settles_as_written() {
    let cases = cases();
    let mut vendors: Vec<String> = cases
        .iter()
        .map(|c| {
            c.parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    vendors.dedup();
    for want in [
        "anthropic",
        "generic",
        "openai",
        "resend",
        "stripe",
        "twilio",
    ] {
        assert!(
            vendors.iter().any(|v| v == want),
            "no fixtures for {want} (found {vendors:?})"
        );
    }
    for case in &cases {
        run_case(case);
    }
}
