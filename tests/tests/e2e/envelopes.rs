//! Refusal envelopes end to end: before the vault key is known every
//! refusal is worded in one envelope, the same whatever vendor the path
//! names (so it tells nobody which vendors exist); after, in the envelope of
//! the key's vendor's profile, with keycap's code and fields at fixed paths;
//! the generic profile keeps keycap's flat body. The vendors' own SDKs
//! reading these are tested in `tests/python/`. Included from `e2e.rs`.

use keycap_tests::harness::{Resp, Stack};
use keycap_tests::mock::MockVendor;
use serde_json::{json, Value};

const CREDENTIAL: &str = "sk_test_KeycapE2eEnvelopeCredentialDoNotLeak";

fn key_body(vendor: &str, cap: u32, endpoints: &[&str]) -> Value {
    json!({
        "vendor": vendor,
        "daily_usd_cap": cap,
        "allowed_endpoints": endpoints,
        "expires_in": "1h",
        "agent_run_label": "envelopes/1",
    })
}

/// Status, the headers a client acts on, and the body.
fn seen(r: &Resp) -> (u16, Vec<(String, Option<String>)>, Value) {
    let headers = [
        "content-type",
        "www-authenticate",
        "retry-after",
        "x-should-retry",
        "stripe-should-retry",
    ]
    .iter()
    .map(|h| (h.to_string(), r.header(h).map(str::to_string)))
    .collect();
    (r.status, headers, r.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_key_is_known_every_vendor_name_gets_the_same_refusal() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    stack.register("claude", "anthropic", &mock).await;
    let agent = stack.agent("kc_live_not-a-key");
    let mut answers = Vec::new();
    for target in [
        "/stripe/v1/payment_intents",
        "/claude/v1/messages",
        "/no-such-vendor/v1/payment_intents",
    ] {
        let r = agent.post_json(target, &json!({"amount": 100})).await;
        r.expect_error(401, "invalid_key");
        answers.push((target, seen(&r)));
    }
    let (_, first) = &answers[0];
    for (target, answer) in &answers {
        assert_eq!(answer, first, "{target} is answered differently");
    }
    let (_, headers, body) = first;
    assert!(headers.contains(&(
        "www-authenticate".into(),
        Some("Bearer realm=\"keycap\"".into())
    )));
    // One object every vendor SDK reads as its own error: Stripe's and
    // OpenAI's `error` object, Anthropic's `type`, Resend's `statusCode` and
    // `name`, Twilio's `code`, `status` and `message`.
    assert_eq!(body["error"]["code"], "invalid_key", "{body}");
    assert_eq!(body["error"]["details"]["error_code"], "invalid_key");
    assert!(body["error"]["type"].is_string(), "{body}");
    assert_eq!(body["type"], "error");
    assert_eq!(body["statusCode"], 401);
    assert_eq!(body["name"], "missing_api_key");
    assert_eq!(body["code"], "invalid_key");
    assert_eq!(body["status"], 401);
    assert_eq!(body["message"], body["error"]["message"]);
    assert!(mock.calls().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_the_key_is_known_a_refusal_is_in_its_vendors_envelope() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let key = stack
        .mint(&key_body("stripe", 1, &["POST /v1/payment_intents"]))
        .await;
    let agent = stack.agent(&key.secret);

    // Over the cap: Stripe's envelope, keycap's fields in `error`, and the
    // header that stops Stripe's SDK retrying.
    let r = agent
        .post_form("/stripe/v1/payment_intents", "amount=200&currency=usd")
        .await;
    r.expect_error(429, "daily_cap_exceeded");
    assert_eq!(r.header("stripe-should-retry"), Some("false"));
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let body = r.json();
    let error = body["error"].as_object().expect("error object");
    let mut members: Vec<&str> = error.keys().map(String::as_str).collect();
    members.sort_unstable();
    assert_eq!(
        members,
        [
            "cap_usd",
            "code",
            "message",
            "remaining_usd",
            "resets_at",
            "type"
        ],
        "{body}"
    );
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["cap_usd"], 1.0);
    assert_eq!(body.as_object().unwrap().len(), 1, "only `error`: {body}");

    // A vendor that does not exist, named with a valid key: still the key's
    // vendor's envelope (the key was shown, so the name may be told).
    let r = agent
        .post_form(
            "/no-such-vendor/v1/payment_intents",
            "amount=1&currency=usd",
        )
        .await;
    r.expect_error(404, "unknown_vendor");
    assert_eq!(r.json().as_object().unwrap().len(), 1, "{}", r.text);

    // Revoked: Stripe's envelope with the 401's scheme.
    stack
        .admin
        .delete(&format!("/vault/keys/{}", key.id))
        .await
        .expect(200);
    let r = agent
        .post_form("/stripe/v1/payment_intents", "amount=1&currency=usd")
        .await;
    r.expect_error(401, "key_revoked");
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"keycap\"")
    );
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert_eq!(r.json().as_object().unwrap().len(), 1, "{}", r.text);
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generic_vendors_refusals_keep_keycaps_flat_body() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(CREDENTIAL).await;
    let rules = json!({
        "as_of": "2026-11-23",
        "currency": "usd",
        "credential_header": "x-vendor-key",
        "rules": [{"endpoint": "POST /generic/renders", "cost": {"fixed": "2"}}]
    });
    stack
        .put_vendor(
            "render",
            &json!({"profile": "generic", "base_url": mock.url(), "credential": CREDENTIAL,
                    "prices": rules}),
        )
        .await;
    let key = stack
        .mint(&key_body("render", 1, &["POST /generic/renders"]))
        .await;
    let agent = stack.agent(&key.secret);
    let r = agent.post_json("/render/generic/renders", &json!({})).await;
    r.expect_error(429, "daily_cap_exceeded");
    let body = r.json();
    assert_eq!(body["error"], "daily_cap_exceeded", "{body}");
    assert_eq!(body["cap_usd"], 1.0);
    assert!(body["remaining_usd"].is_number());
    assert!(body["resets_at"].is_string());
    assert!(r.header("stripe-should-retry").is_none());
    assert_eq!(r.header("x-should-retry"), Some("false"));
    let r = agent.post_json("/render/generic/other", &json!({})).await;
    r.expect_error(403, "endpoint_not_allowed");
    assert!(r.json()["error"].is_string(), "{}", r.text);
    assert!(mock.calls().is_empty());
}
