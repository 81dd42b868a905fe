//! No response carries the vendor credential: against a mock route that
//! echoes every request header back (in response headers and a body cut
//! into three-byte chunks), for each way keycap injects a credential —
//! Bearer, `x-api-key`, Basic — in streamed pass-through, SSE and buffered
//! (priced) responses. Included from `e2e.rs`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use keycap_tests::harness::Resp;
use keycap_tests::mock::Scripted;

use super::*;

const ANTHROPIC_CREDENTIAL: &str = "sk-ant-api03-KeycapE2eScrubCredentialDoNotLeak";
const TWILIO_CREDENTIAL: &str =
    "AC5ef8732a3c49700934481addd5ce1659:KeycapE2eScrubTwilioTokenDoNotLeak";

/// Asserts that no header value or body byte of `r` holds any of
/// `secrets`, and that `masked` (the mask of the injected form) does.
#[track_caller]
fn assert_scrubbed(what: &str, r: &Resp, secrets: &[&str], masked: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text);
    for secret in secrets {
        for (name, value) in &r.headers {
            let v = String::from_utf8_lossy(value.as_bytes());
            assert!(
                !v.contains(secret),
                "{what}: header {name} carries the credential: {v}"
            );
        }
        assert!(
            !r.text.contains(secret),
            "{what}: body carries the credential: {}",
            r.text
        );
    }
    assert!(
        r.text.contains(masked),
        "{what}: nothing masked in the body: {}",
        r.text
    );
    let echoed = r
        .headers
        .iter()
        .any(|(_, v)| String::from_utf8_lossy(v.as_bytes()).contains(masked));
    assert!(echoed, "{what}: no masked header: {:?}", r.headers);
}

fn stars(s: &str) -> String {
    "*".repeat(s.len())
}

fn echo_key(vendor: &str) -> Value {
    json!({
        "vendor": vendor,
        "daily_usd_cap": 1,
        "allowed_endpoints": ["GET /v1/echo/*"],
        "expires_in": "1h",
        "agent_run_label": format!("scrub/{vendor}"),
    })
}

async fn echo_both_ways(agent: &Api, vendor: &str) -> (Resp, Resp) {
    (
        agent.get(&format!("/{vendor}/v1/echo/x")).await,
        agent.get(&format!("/{vendor}/v1/echo/x?sse=1")).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_response_carries_the_vendor_credential() {
    let stack = Stack::start().await;

    // Bearer (stripe), unpriced: streamed through, JSON and SSE.
    let stripe = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &stripe).await;
    let key = stack.mint(&echo_key("stripe")).await;
    let (json_body, sse) = echo_both_ways(&stack.agent(&key.secret), "stripe").await;
    let masked = format!("Bearer {}", stars(STRIPE_CREDENTIAL));
    assert_scrubbed("bearer", &json_body, &[STRIPE_CREDENTIAL], &masked);
    assert_scrubbed("bearer sse", &sse, &[STRIPE_CREDENTIAL], &masked);
    assert_eq!(
        sse.header("content-type"),
        Some("text/event-stream"),
        "{:?}",
        sse.headers
    );
    // The vendor did get it, and keycap asked it not to compress.
    let seen = stripe.calls();
    assert_eq!(
        seen[0].header("authorization"),
        Some(format!("Bearer {STRIPE_CREDENTIAL}").as_str())
    );
    assert_eq!(seen[0].header("accept-encoding"), Some("identity"));
    // The mask keeps the body's length and shape: it is still JSON.
    let echoed = json_body.json();
    assert_eq!(echoed["headers"]["authorization"], masked.as_str());

    // x-api-key (anthropic).
    let anthropic = MockVendor::start(ANTHROPIC_CREDENTIAL).await;
    stack.register("anthropic", "anthropic", &anthropic).await;
    let key = stack.mint(&echo_key("anthropic")).await;
    let (json_body, sse) = echo_both_ways(&stack.agent(&key.secret), "anthropic").await;
    let masked = stars(ANTHROPIC_CREDENTIAL);
    assert_scrubbed("x-api-key", &json_body, &[ANTHROPIC_CREDENTIAL], &masked);
    assert_scrubbed("x-api-key sse", &sse, &[ANTHROPIC_CREDENTIAL], &masked);

    // Basic (twilio): neither the base64 keycap injects nor the auth token.
    let twilio = MockVendor::start(TWILIO_CREDENTIAL).await;
    stack.register("twilio", "twilio", &twilio).await;
    let key = stack.mint(&echo_key("twilio")).await;
    let agent = stack.agent(&key.secret).with_authorization(Some(&format!(
        "Basic {}",
        BASE64.encode(format!("AC5ef8732a3c49700934481addd5ce1659:{}", key.secret))
    )));
    let (json_body, sse) = echo_both_ways(&agent, "twilio").await;
    let encoded = BASE64.encode(TWILIO_CREDENTIAL);
    let token = TWILIO_CREDENTIAL.split_once(':').expect("SID:TOKEN").1;
    let masked = format!("Basic {}", stars(&encoded));
    for (what, r) in [("basic", &json_body), ("basic sse", &sse)] {
        assert_scrubbed(what, r, &[&encoded, token, TWILIO_CREDENTIAL], &masked);
    }

    // Buffered (a priced call): Bearer and a generic vendor's own header.
    for (name, header) in [("generic-bearer", None), ("generic-key", Some("X-Api-Key"))] {
        let mut rules = json!({"currency": "usd",
            "rules": [{"endpoint": "GET /v1/echo/*", "cost": {"fixed": "0.01"}}]});
        if let Some(h) = header {
            rules["credential_header"] = json!(h);
        }
        stack
            .put_vendor(
                name,
                &json!({"profile": "generic", "base_url": stripe.url(),
                        "credential": STRIPE_CREDENTIAL, "prices": rules}),
            )
            .await;
        let key = stack.mint(&echo_key(name)).await;
        let (json_body, sse) = echo_both_ways(&stack.agent(&key.secret), name).await;
        let masked = match header {
            None => format!("Bearer {}", stars(STRIPE_CREDENTIAL)),
            Some(_) => stars(STRIPE_CREDENTIAL),
        };
        assert_scrubbed(name, &json_body, &[STRIPE_CREDENTIAL], &masked);
        assert_scrubbed(name, &sse, &[STRIPE_CREDENTIAL], &masked);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compressed_answer_is_refused_not_passed_unread() {
    let (stack, mock) = stack_with_stripe().await;
    mock.script(
        "/v1/echo/gz",
        Scripted {
            status: 200,
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("content-encoding".into(), "gzip".into()),
            ],
            body: format!("compressed, so unreadable: {STRIPE_CREDENTIAL}"),
        },
    );
    let key = stack.mint(&echo_key("stripe")).await;
    let r = stack.agent(&key.secret).get("/stripe/v1/echo/gz").await;
    r.expect_error(502, "upstream_response_encoded");
    assert!(!r.text.contains(STRIPE_CREDENTIAL), "{}", r.text);
    assert_eq!(mock.calls().len(), 1, "the call was sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priced_stream_is_scrubbed_and_still_settles() {
    let (stack, mock, key) = stack_with_openai().await;
    let request = json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 1000,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let r = stack
        .agent(&key.secret)
        .send(
            reqwest::Method::POST,
            "/openai/v1/chat/completions",
            Some(("application/json", request.to_string().into_bytes())),
            &[("x-mock-echo", "1")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(OPENAI_CREDENTIAL), "{}", r.text);
    let masked = format!(": echo Bearer {}", stars(OPENAI_CREDENTIAL));
    assert!(r.text.contains(&masked), "{}", r.text);
    assert!(r.text.contains("data: [DONE]"), "{}", r.text);
    // Settled from the usage the stream reported, as without the echo.
    let usage = mock::chat_usage(&request);
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 1).await;
    assert_eq!(entries[0]["outcome"], "settled", "{}", entries[0]);
    assert_eq!(entries[0]["detail"]["output_tokens"], usage.1);
    assert_eq!(mock.calls().len(), 1);
}
