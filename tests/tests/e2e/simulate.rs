//! Dry runs (`POST /vault/simulate`, gRPC `Simulate`, `keycap simulate`,
//! the Rust client) through a fleet: for the same request, the dry run's
//! answer agrees with what a proxy then does — allowed at the same price
//! (Stripe, OpenAI), the endpoint refusal, the per-call and daily cap
//! refusals — and a dry run reserves nothing. A call the proxy prices only
//! after reading a Stripe object is answered `quote_needs_lookup`, never
//! with a price. No answer carries a credential; dry runs need `keys:read`
//! and are rate-limited per token. Included from `e2e.rs`.

use keycap_client::Client;
use keycap_tests::fleet::{Fleet, FleetOpts, STRIPE_CREDENTIAL};
use keycap_tests::mock::MockVendor;
use reqwest::Method;

use super::*;

const FORM: &str = "application/x-www-form-urlencoded";

async fn start_fleet() -> Option<Fleet> {
    let db = pg::fresh_database_or_skip()
        .await
        .expect("a PostgreSQL database for the test")?;
    Some(Fleet::start(db, &FleetOpts::default()).await)
}

/// A dry run of `method path` with `body` for `key_id`, through `admin`,
/// asserting 200; no answer ever carries a credential.
async fn simulate(admin: &Api, key_id: &str, method: &str, path: &str, body: Value) -> Value {
    let headers = if body.is_string() {
        json!({"Content-Type": FORM})
    } else {
        json!({"Content-Type": "application/json"})
    };
    let r = admin
        .post_json(
            "/vault/simulate",
            &json!({"key_id": key_id, "request": {
                "method": method, "path": path, "headers": headers, "body": body,
            }}),
        )
        .await;
    assert!(!r.text.contains(STRIPE_CREDENTIAL), "{}", r.text);
    assert!(!r.text.contains(OPENAI_CREDENTIAL), "{}", r.text);
    r.expect(200)
}

/// The daily remainder a dry run answered, in micro-dollars.
fn remaining(answer: &Value) -> i64 {
    usd_micros(&answer["remaining"]["daily_remaining_usd"].to_string())
}

/// Waits until the key's settled spend today is `micros` (dry runs are
/// rate-limited, so the key is polled instead).
async fn wait_spent(admin: &Api, key_id: &str, micros: i64) {
    let settled = wait_until(within(SPEND_TIMEOUT), || async {
        let view = admin.get(&format!("/vault/keys/{key_id}")).await.json();
        usd_micros(&view["spent_today_usd"].to_string()) == micros
    })
    .await;
    assert!(
        settled,
        "the key's spend never reached {micros} micro-dollars"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_agrees_with_the_proxy_and_reserves_nothing() {
    let Some(fleet) = start_fleet().await else {
        return;
    };
    let admin = fleet.admin(0);
    let key = admin
        .post_json(
            "/vault/keys",
            &json!({
                "vendor": "stripe",
                "daily_usd_cap": 10,
                "per_call_usd_cap": 6,
                "allowed_endpoints": ["POST /v1/payment_intents", "POST /v1/payment_intents/*/confirm"],
                "expires_in": "1h",
                "agent_run_label": "simulate/stripe",
            }),
        )
        .await
        .expect(201);
    let key_id = key["id"].as_str().unwrap().to_string();
    let agent = fleet.proxies[0].api(Some(key["key"].as_str().unwrap()));

    // Allowed: the dry run's quote is what the proxy reserves, and asking
    // twice (on either replica) changes nothing.
    let charge = "amount=250&currency=usd&confirm=true";
    let dry = simulate(
        &admin,
        &key_id,
        "POST",
        "/v1/payment_intents",
        json!(charge),
    )
    .await;
    assert_eq!(dry["allowed"], true, "{dry}");
    assert_eq!(dry["refusal"], Value::Null, "{dry}");
    assert_eq!(dry["quote"]["reserve_micros"], 2_500_000, "{dry}");
    assert_eq!(dry["quote"]["kind"], "stripe", "{dry}");
    assert_eq!(remaining(&dry), 10_000_000, "{dry}");
    let again = simulate(
        &fleet.admin(1),
        &key_id,
        "POST",
        "/v1/payment_intents",
        json!(charge),
    )
    .await;
    assert_eq!(
        remaining(&again),
        10_000_000,
        "a dry run reserved something: {again}"
    );
    let view = admin
        .get(&format!("/vault/keys/{key_id}"))
        .await
        .expect(200);
    assert_eq!(
        usd_micros(&view["remaining_today_usd"].to_string()),
        10_000_000,
        "{view}"
    );
    assert_eq!(fleet.mock.calls().len(), 0, "a dry run reached the vendor");

    agent
        .post_form("/stripe/v1/payment_intents", charge)
        .await
        .expect(200);
    let entries = wait_for(within(SPEND_TIMEOUT), || async {
        let r = admin
            .get(&format!("/vault/audit?key_id={key_id}"))
            .await
            .json();
        let entries = r["entries"].as_array().cloned().unwrap_or_default();
        (!entries.is_empty()).then_some(entries)
    })
    .await
    .expect("the charge's audit entry");
    assert_eq!(
        entries[0]["reserved_micros"], dry["quote"]["reserve_micros"],
        "the proxy reserved another amount than the dry run quoted: {}",
        entries[0]
    );
    wait_spent(&admin, &key_id, 2_500_000).await;
    let after = simulate(
        &admin,
        &key_id,
        "POST",
        "/v1/payment_intents",
        json!(charge),
    )
    .await;
    assert_eq!(remaining(&after), 7_500_000, "{after}");
    assert_eq!(after["allowed"], true, "{after}");

    // The endpoint refusal.
    let dry = simulate(
        &admin,
        &key_id,
        "POST",
        "/v1/refunds",
        json!("payment_intent=pi_1"),
    )
    .await;
    assert_eq!(dry["allowed"], false, "{dry}");
    assert_eq!(dry["refusal"]["code"], "endpoint_not_allowed", "{dry}");
    assert_eq!(dry["refusal"]["rule"], "allowed_endpoints", "{dry}");
    agent
        .post_form("/stripe/v1/refunds", "payment_intent=pi_1")
        .await
        .expect_error(403, "endpoint_not_allowed");

    // The per-call cap refusal, with the quote that broke it.
    let big = "amount=700&currency=usd&confirm=true";
    let dry = simulate(&admin, &key_id, "POST", "/v1/payment_intents", json!(big)).await;
    assert_eq!(dry["refusal"]["code"], "per_call_cap_exceeded", "{dry}");
    assert_eq!(dry["quote"]["reserve_micros"], 7_000_000, "{dry}");
    agent
        .post_form("/stripe/v1/payment_intents", big)
        .await
        .expect_error(403, "per_call_cap_exceeded");

    // The daily cap refusal: 5.5 USD of the 7.5 left... then 5.5 more.
    let mid = "amount=550&currency=usd&confirm=true";
    agent
        .post_form("/stripe/v1/payment_intents", mid)
        .await
        .expect(200);
    wait_spent(&admin, &key_id, 8_000_000).await;
    let dry = simulate(&admin, &key_id, "POST", "/v1/payment_intents", json!(mid)).await;
    assert_eq!(dry["allowed"], false, "{dry}");
    assert_eq!(dry["refusal"]["code"], "daily_cap_exceeded", "{dry}");
    assert_eq!(dry["refusal"]["rule"], "daily_cap", "{dry}");
    assert_eq!(remaining(&dry), 2_000_000, "{dry}");
    agent
        .post_form("/stripe/v1/payment_intents", mid)
        .await
        .expect_error(429, "daily_cap_exceeded");

    // Confirming a payment intent is priced from the intent Stripe holds:
    // a dry run reads nothing from Stripe, so it says so and names it.
    let dry = simulate(
        &admin,
        &key_id,
        "POST",
        "/v1/payment_intents/pi_123/confirm",
        json!(""),
    )
    .await;
    assert_eq!(dry["allowed"], false, "{dry}");
    assert_eq!(dry["refusal"]["code"], "quote_needs_lookup", "{dry}");
    assert_eq!(dry["quote"], Value::Null, "{dry}");
    assert_eq!(
        dry["lookups"],
        json!(["/v1/payment_intents/pi_123"]),
        "{dry}"
    );

    // Through a proxy's /vault relay, the same answer.
    let relayed = fleet.proxies[1]
        .api(Some(&fleet.controls[0].opts.admin_token))
        .post_json(
            "/vault/simulate",
            &json!({"key_id": key_id, "request": {"method": "POST", "path": "/v1/refunds"}}),
        )
        .await
        .expect(200);
    assert_eq!(
        relayed["refusal"]["code"], "endpoint_not_allowed",
        "{relayed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_llm_call_is_quoted_as_the_proxy_reserves_it_over_every_client() {
    let Some(fleet) = start_fleet().await else {
        return;
    };
    let admin = fleet.admin(0);
    let openai = MockVendor::start(OPENAI_CREDENTIAL).await;
    admin
        .put_json(
            "/vault/vendors/openai",
            &json!({"profile": "openai", "base_url": openai.url(), "credential": OPENAI_CREDENTIAL}),
        )
        .await
        .expect(201);
    let key = admin
        .post_json(
            "/vault/keys",
            &json!({
                "vendor": "openai",
                "daily_usd_cap": 5,
                "allowed_endpoints": ["POST /v1/chat/completions"],
                "expires_in": "1h",
                "agent_run_label": "simulate/openai",
            }),
        )
        .await
        .expect(201);
    let key_id = key["id"].as_str().unwrap().to_string();
    let chat = json!({"model": "gpt-4o", "max_tokens": 50,
        "messages": [{"role": "user", "content": "hello there"}]});
    let dry = simulate(
        &admin,
        &key_id,
        "POST",
        "/v1/chat/completions",
        chat.clone(),
    )
    .await;
    assert_eq!(dry["allowed"], true, "{dry}");
    assert_eq!(dry["quote"]["kind"], "openai_chat", "{dry}");
    assert_eq!(dry["quote"]["rule"], "POST /v1/chat/completions", "{dry}");
    let quoted = dry["quote"]["reserve_micros"].as_i64().unwrap();
    assert!(quoted > 0, "{dry}");

    // The Rust client (gRPC) and the CLI answer the same.
    let token = fleet.controls[0].opts.admin_token.clone();
    let mut client = Client::connect(&fleet.controls[1].url(), &token, None)
        .await
        .unwrap();
    let body = serde_json::to_vec(&chat).unwrap();
    let grpc = client
        .simulate(
            &key_id,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body.clone(),
        )
        .await
        .unwrap_or_else(|e| panic!("Simulate over gRPC: {e}"));
    assert!(grpc.allowed);
    assert_eq!(grpc.quote.as_ref().unwrap().reserve_micros, quoted);
    let cli = harness::keycap_cli(
        &fleet.controls[0].url(),
        &token,
        &[
            "--format",
            "json",
            "simulate",
            "--key",
            &key_id,
            "POST",
            "/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            &chat.to_string(),
        ],
    )
    .await
    .json();
    assert_eq!(cli["quote"]["reserve_micros"], quoted, "{cli}");
    assert!(!cli.to_string().contains(OPENAI_CREDENTIAL));

    // The proxy reserves what was quoted.
    let agent = fleet.proxies[2].api(Some(key["key"].as_str().unwrap()));
    agent
        .post_json("/openai/v1/chat/completions", &chat)
        .await
        .expect(200);
    let entry = wait_for(within(SPEND_TIMEOUT), || async {
        let r = admin
            .get(&format!("/vault/audit?key_id={key_id}"))
            .await
            .json();
        r["entries"].as_array().and_then(|e| e.first().cloned())
    })
    .await
    .expect("the call's audit entry");
    assert_eq!(entry["reserved_micros"], quoted, "{entry}");

    // A model without a price is refused by both, with pricing's code.
    let unknown = json!({"model": "gpt-nonexistent", "max_tokens": 5, "messages": []});
    let dry = simulate(
        &admin,
        &key_id,
        "POST",
        "/v1/chat/completions",
        unknown.clone(),
    )
    .await;
    assert_eq!(dry["refusal"]["rule"], "pricing", "{dry}");
    let code = dry["refusal"]["code"].as_str().unwrap().to_string();
    let real = agent
        .post_json("/openai/v1/chat/completions", &unknown)
        .await;
    assert_eq!(
        real.error_code().as_deref(),
        Some(code.as_str()),
        "{}",
        real.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_runs_need_keys_read_and_are_rate_limited_per_token() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let key = stack
        .mint(&json!({
            "vendor": "stripe",
            "daily_usd_cap": 1,
            "allowed_endpoints": ["POST /v1/payment_intents"],
            "expires_in": "1h",
            "agent_run_label": "simulate/limits",
        }))
        .await;
    let token = |scopes: Value| {
        let admin = stack.admin.clone();
        async move {
            let r = admin
                .post_json(
                    "/vault/admin-tokens",
                    &json!({"name": "dry-runs", "scopes": scopes}),
                )
                .await
                .expect(201);
            r["token"].as_str().unwrap().to_string()
        }
    };
    let body = json!({"key_id": key.id, "request": {"method": "POST", "path": "/v1/payment_intents",
        "headers": {"Content-Type": FORM}, "body": "amount=100&currency=usd"}});

    let url = stack.control.url();
    let issuer = Api::new(&url, Some(&token(json!(["keys:issue"])).await));
    let r = issuer.post_json("/vault/simulate", &body).await;
    r.expect_error(403, "missing_scope");

    let reader = Api::new(&url, Some(&token(json!(["keys:read"])).await));
    for i in 0..60 {
        let r = reader.post_json("/vault/simulate", &body).await;
        assert_eq!(r.status, 200, "dry run {i}: {}", r.text);
    }
    let r = reader.post_json("/vault/simulate", &body).await;
    r.expect_error(429, "rate_limited");
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");
    // Another token is not held back by this one.
    stack
        .admin
        .post_json("/vault/simulate", &body)
        .await
        .expect(200);

    // An unknown key is not found; a bad request names its field.
    let mut unknown = body.clone();
    unknown["key_id"] = json!("key_doesnotexist");
    stack
        .admin
        .post_json("/vault/simulate", &unknown)
        .await
        .expect_error(404, "not_found");
    let mut bad = body.clone();
    bad["request"]["path"] = json!("v1/payment_intents");
    let err = stack
        .admin
        .post_json("/vault/simulate", &bad)
        .await
        .expect_error(400, "invalid_request");
    assert_eq!(err["field"], "request.path", "{err}");

    // A revoked key's call would be refused as revoked.
    stack
        .admin
        .send(
            Method::DELETE,
            &format!("/vault/keys/{}", key.id),
            None,
            &[],
        )
        .await
        .expect(200);
    let dry = stack
        .admin
        .post_json("/vault/simulate", &body)
        .await
        .expect(200);
    assert_eq!(dry["allowed"], false, "{dry}");
    assert_eq!(dry["refusal"]["code"], "key_revoked", "{dry}");
    assert!(!dry.to_string().contains(STRIPE_CREDENTIAL));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_is_suggested_from_a_keys_calls_and_mints_a_key_that_admits_them() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let key = stack
        .mint(&json!({
            "vendor": "stripe",
            "daily_usd_cap": 100,
            "allowed_endpoints": ["POST /v1/*", "GET /v1/*"],
            "expires_in": "1h",
            "agent_run_label": "suggest/observed",
        }))
        .await;
    let path = format!("/vault/keys/{}/suggest", key.id);
    stack.admin.get(&path).await.expect_error(409, "conflict");

    let agent = stack.agent(&key.secret);
    for amount in [300, 500] {
        agent
            .post_form(
                "/stripe/v1/payment_intents",
                &format!("amount={amount}&currency=usd&confirm=true"),
            )
            .await
            .expect(200);
    }
    agent
        .get("/stripe/v1/customers/cus_NffrFeUfNV2Hib")
        .await
        .expect(200);
    stack.wait_key_spend(&key.id, 8_000_000, 3).await;
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 3).await;
    assert_eq!(entries.len(), 3);

    let s = stack.admin.get(&path).await.expect(200);
    let suggested = &s["suggested"];
    assert_eq!(
        suggested["allowed_endpoints"],
        json!(["GET /v1/customers/*", "POST /v1/payment_intents"]),
        "{s}"
    );
    assert_eq!(s["margin_percent"], 25, "{s}");
    assert_eq!(
        usd_micros(&suggested["per_call_usd_cap"].to_string()),
        6_250_000,
        "{s}"
    );
    assert_eq!(
        usd_micros(&suggested["daily_usd_cap"].to_string()),
        10_000_000,
        "{s}"
    );
    assert_eq!(s["observed"]["calls"], 3, "{s}");
    assert_eq!(
        usd_micros(&s["observed"]["max_daily_usd"].to_string()),
        8_000_000,
        "{s}"
    );

    // Another margin, through the CLI: the same shape.
    let cli = keycap_cli(
        &stack.control.url(),
        &stack.control.opts.admin_token,
        &[
            "--format", "json", "key", "suggest", &key.id, "--margin", "0",
        ],
    )
    .await
    .json();
    assert_eq!(
        usd_micros(&cli["suggested"]["per_call_usd_cap"].to_string()),
        5_000_000,
        "{cli}"
    );
    assert_eq!(
        cli["suggested"]["allowed_endpoints"],
        suggested["allowed_endpoints"]
    );

    // The suggestion is a create-key body: the key it mints admits the calls
    // observed and refuses what was never seen.
    let mut body = suggested.clone();
    body["expires_in"] = json!("1h");
    body["agent_run_label"] = json!("suggest/enforced");
    let enforced = stack.mint(&body).await;
    let agent = stack.agent(&enforced.secret);
    agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=500&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    agent
        .post_form("/stripe/v1/refunds", "payment_intent=pi_1")
        .await
        .expect_error(403, "endpoint_not_allowed");
    agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=700&currency=usd&confirm=true",
        )
        .await
        .expect_error(403, "per_call_cap_exceeded");
}
