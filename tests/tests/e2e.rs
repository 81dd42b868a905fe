//! End-to-end tests: keycap's real binaries (`keycap-control`, `keycap-proxy`,
//! `keycap`) as child processes, talking to an in-process mock vendor.
//!
//! Build the binaries first: `cargo build --workspace --bins`. Each test
//! starts its own control plane (SQLite in a temporary directory unless it
//! says otherwise) and proxy on free 127.0.0.1 ports. Waits poll a condition
//! until a deadline; nothing sleeps in place of synchronisation.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use keycap_proto::secret::{self, SecretKind};
use keycap_tests::harness::{
    self, keycap_cli, probe_key, q, raw_http, wait_for, wait_until, within, Api, ControlOpts, Dev,
    MintedKey, Proxy, Resp, Stack, PROBE_LIVE, SPEND_TIMEOUT,
};
use keycap_tests::mock::{self, MockVendor};
use keycap_tests::pg;
use serde_json::{json, Value};

#[path = "e2e/approvals.rs"]
mod approvals;
#[path = "e2e/call_headers.rs"]
mod call_headers;
#[path = "e2e/canary.rs"]
mod canary;
#[path = "e2e/first_call.rs"]
mod first_call;
#[path = "e2e/fleet.rs"]
mod fleet;
#[path = "e2e/grpc.rs"]
mod grpc;
#[path = "e2e/hooks.rs"]
mod hooks;
#[path = "e2e/kek.rs"]
mod kek;
#[path = "e2e/ledger.rs"]
mod ledger;
#[path = "e2e/metrics.rs"]
mod metrics;
#[path = "e2e/observe.rs"]
mod observe;
#[path = "e2e/refusals.rs"]
mod refusals;
#[path = "e2e/replicas.rs"]
mod replicas;
#[path = "e2e/revocation.rs"]
mod revocation;
#[path = "e2e/rotation.rs"]
mod rotation;
#[path = "e2e/simulate.rs"]
mod simulate;
#[path = "e2e/webhooks.rs"]
mod webhooks;

const STRIPE_CREDENTIAL: &str = "sk_live_51KeycapE2eRealStripeCredentialDoNotLeak";
const OPENAI_CREDENTIAL: &str = "sk-proj-KeycapE2eRealOpenAiCredentialDoNotLeak";
const RUN_LABEL: &str = "make-billing-scenario/4711";

/// How long after a revoke call returns the proxy may still accept the key.
const REVOCATION_BOUND: Duration = Duration::from_secs(1);

// --- helpers -------------------------------------------------------------------

fn stripe_key_body(daily_usd_cap: Value, endpoints: &[&str], label: &str) -> Value {
    json!({
        "vendor": "stripe",
        "daily_usd_cap": daily_usd_cap,
        "allowed_endpoints": endpoints,
        "expires_in": "2h",
        "agent_run_label": label,
    })
}

async fn stack_with_stripe() -> (Stack, MockVendor) {
    let stack = Stack::start().await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    (stack, mock)
}

/// A Stripe mock registered as vendor `stripe` through `control`'s admin
/// API.
async fn stripe_on(control: &harness::Control) -> MockVendor {
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    control
        .admin()
        .put_json(
            "/vault/vendors/stripe",
            &json!({"profile": "stripe", "base_url": mock.url(), "credential": STRIPE_CREDENTIAL}),
        )
        .await
        .expect(201);
    mock
}

/// One $1 Stripe charge (a confirmed payment intent) by `agent`.
async fn dollar_charge(agent: &Api) -> Resp {
    agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await
}

/// `n` concurrent $1 Stripe charges spread round robin over `agents`;
/// every refusal must be a 429. Returns how many were answered 200.
async fn dollar_charges(agents: &[Api], n: usize) -> i64 {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let agent = agents[i % agents.len()].clone();
            tokio::spawn(async move { dollar_charge(&agent).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let r = t.await.expect("call task");
        if r.status == 200 {
            ok += 1;
        } else {
            assert_eq!(r.status, 429, "{}", r.text);
        }
    }
    ok
}

fn next_utc_midnight(t: DateTime<Utc>) -> DateTime<Utc> {
    (t.date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight")
        .and_utc()
}

/// Asserts a `daily_cap_exceeded` refusal of a request sent at `sent` and
/// answered at `received`.
#[track_caller]
fn assert_cap_refusal(
    r: &Resp,
    cap_usd: f64,
    remaining_usd: f64,
    sent: DateTime<Utc>,
    received: DateTime<Utc>,
) {
    let body = assert_cap_refusal_of(r, cap_usd, sent, received);
    assert_eq!(
        body["remaining_usd"].as_f64(),
        Some(remaining_usd),
        "{body}"
    );
}

/// Asserts a `daily_cap_exceeded` refusal of a request sent at `sent` and
/// answered at `received` under a `cap_usd` cap, whatever it says remains;
/// returns the body.
#[track_caller]
fn assert_cap_refusal_of(
    r: &Resp,
    cap_usd: f64,
    sent: DateTime<Utc>,
    received: DateTime<Utc>,
) -> Value {
    let body = r.expect_error(429, "daily_cap_exceeded");
    assert_eq!(body["cap_usd"].as_f64(), Some(cap_usd), "{body}");
    let reset = next_utc_midnight(sent);
    assert_eq!(
        body["resets_at"],
        reset.to_rfc3339_opts(SecondsFormat::Secs, true),
        "{body}"
    );
    let retry_after: i64 = r
        .header("retry-after")
        .expect("Retry-After on a cap refusal")
        .parse()
        .expect("Retry-After is whole seconds");
    // The proxy's clock read falls between `sent` and `received`.
    let lo = (reset - received).num_seconds() - 2;
    let hi = (reset - sent).num_seconds() + 2;
    assert!(
        (lo..=hi).contains(&retry_after),
        "Retry-After {retry_after} not within [{lo}, {hi}] seconds to {reset}"
    );
    assert_eq!(r.header("x-should-retry"), Some("false"));
    body
}

/// Asserts that the proxy refuses `secret` with `code` in a request sent
/// within `REVOCATION_BOUND` of `since`.
async fn assert_refused_in_time(
    proxy_url: &str,
    vendor: &str,
    secret: &str,
    code: &str,
    since: Instant,
) {
    let refused = wait_until(since + REVOCATION_BOUND, || async {
        probe_key(proxy_url, vendor, secret).await.as_deref() == Some(code)
    })
    .await;
    assert!(
        refused,
        "the proxy did not refuse the key with {code} within {REVOCATION_BOUND:?} of the revoke \
         response (now {:?} later; it says {:?})",
        since.elapsed(),
        probe_key(proxy_url, vendor, secret).await
    );
}

/// Asserts that no call the mock received carries `secret` anywhere.
#[track_caller]
fn assert_mock_never_saw(mock: &MockVendor, secret: &str) {
    for call in mock.calls() {
        assert!(
            !call.as_text().contains(secret),
            "the vendor received a secret it must never see:\n{}",
            call.as_text()
        );
    }
}

/// Asserts a response carries `secret` in neither its headers nor its body.
#[track_caller]
fn assert_resp_lacks(r: &Resp, secret: &str) {
    assert!(
        !r.text.contains(secret),
        "response body leaks a secret: {}",
        r.text
    );
    for (name, value) in &r.headers {
        assert!(
            !value.to_str().unwrap_or_default().contains(secret),
            "response header {name} leaks a secret"
        );
    }
}

/// `decimal` USD text ("2.50") as micro-dollars.
fn usd_micros(decimal: &str) -> i64 {
    let (int, frac) = decimal.split_once('.').unwrap_or((decimal, ""));
    assert!(frac.len() <= 6, "{decimal}");
    let frac = format!("{frac:0<6}");
    int.parse::<i64>().unwrap() * 1_000_000 + frac.parse::<i64>().unwrap()
}

/// Token prices (micro-dollars per million tokens) of `model` in the price
/// table the proxy ships.
fn openai_prices(model: &str) -> (i64, i64) {
    // Compiled in, so the test reads the table the proxy was built with.
    let table: Value =
        serde_json::from_str(include_str!("../../vendors/prices/openai.json")).unwrap();
    assert_eq!(table["unit"], "per_million_tokens");
    let m = &table["models"][model];
    (
        usd_micros(m["input"].as_str().unwrap()),
        usd_micros(m["output"].as_str().unwrap()),
    )
}

fn ceil_div(n: i64, d: i64) -> i64 {
    (n + d - 1) / d
}

/// What a chat completion with this usage costs by the shipped table.
fn openai_cost(model: &str, (prompt, completion): (u64, u64)) -> i64 {
    let (input, output) = openai_prices(model);
    ceil_div(prompt as i64 * input, 1_000_000) + ceil_div(completion as i64 * output, 1_000_000)
}

async fn keys_including_inactive(admin: &Api) -> Vec<Value> {
    admin
        .get("/vault/keys?include_inactive=true")
        .await
        .expect(200)["keys"]
        .as_array()
        .expect("keys")
        .clone()
}

// --- the issue's REST flow ---------------------------------------------------------

/// The flow from the issue, with every admin call made through `admin`
/// (the control plane itself, or the proxy's `/vault` relay).
async fn issue_rest_flow(stack: &Stack, admin: &Api) {
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    let vendor_body = json!({
        "profile": "stripe",
        "base_url": mock.url(),
        "credential": STRIPE_CREDENTIAL,
    });

    // Vendor: created, then updated; the credential never comes back.
    let r = admin.put_json("/vault/vendors/stripe", &vendor_body).await;
    let v = r.expect(201);
    assert_resp_lacks(&r, STRIPE_CREDENTIAL);
    assert_eq!(v["name"], "stripe");
    assert_eq!(v["profile"], "stripe");
    assert_eq!(v["base_url"], mock.url());
    let r = admin.put_json("/vault/vendors/stripe", &vendor_body).await;
    r.expect(200);
    assert_resp_lacks(&r, STRIPE_CREDENTIAL);
    let r = admin.get("/vault/vendors").await;
    let listed = r.expect(200);
    let names: Vec<&str> = listed["vendors"]
        .as_array()
        .expect("vendors")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert_eq!(names, ["stripe"]);
    assert_resp_lacks(&r, STRIPE_CREDENTIAL);
    let r = admin.get("/vault/vendors/stripe").await;
    assert_eq!(r.expect(200)["base_url"], mock.url());
    assert_resp_lacks(&r, STRIPE_CREDENTIAL);

    // Key.
    let before = Utc::now();
    let endpoints = ["POST /v1/payment_intents", "GET /v1/customers/*"];
    let r = admin
        .post_json(
            "/vault/keys",
            &json!({
                "vendor": "stripe",
                "daily_usd_cap": 500,
                "allowed_endpoints": endpoints,
                "expires_in": "2h",
                "agent_run_label": RUN_LABEL,
            }),
        )
        .await;
    let after = Utc::now();
    let k = r.expect(201);
    assert_resp_lacks(&r, STRIPE_CREDENTIAL);
    let id = k["id"].as_str().expect("id").to_string();
    assert!(!id.is_empty());
    let secret = k["key"].as_str().expect("key").to_string();
    assert!(secret.starts_with("kc_"), "{secret}");
    assert!(secret::is_well_formed(SecretKind::VaultKey, &secret));
    let expires_at = DateTime::parse_from_rfc3339(k["expires_at"].as_str().expect("expires_at"))
        .expect("expires_at is RFC 3339")
        .with_timezone(&Utc);
    let two_hours = chrono::Duration::hours(2);
    let slack = chrono::Duration::seconds(2);
    assert!(
        expires_at >= before + two_hours - slack && expires_at <= after + two_hours + slack,
        "expires_at {expires_at} is not 2h after {before}..{after}"
    );
    assert_eq!(k["status"], "active");
    assert_eq!(k["vendor"], "stripe");
    assert_eq!(k["agent_run_label"], RUN_LABEL);
    assert_eq!(k["allowed_endpoints"], json!(endpoints));
    assert_eq!(k["daily_cap_micros"], 500_000_000);
    assert_eq!(k["daily_usd_cap"].as_f64(), Some(500.0));

    let listed = admin.get("/vault/keys").await.expect(200);
    assert!(
        listed["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .any(|k| k["id"] == id.as_str()),
        "{listed}"
    );

    // Calls through the proxy, at once.
    let agent = stack.agent(&secret);
    let r = agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=2000&currency=usd&confirm=true",
        )
        .await;
    let pi = r.expect(200);
    assert_eq!(pi["amount"], 2000);
    assert_eq!(pi["status"], "succeeded");
    assert_eq!(pi["object"], "payment_intent");
    assert_resp_lacks(&r, STRIPE_CREDENTIAL);
    let r = agent.get("/stripe/v1/customers/cus_4711").await;
    assert_eq!(r.expect(200)["id"], "cus_4711");
    let r = agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=150&currency=usd&confirm=true",
        )
        .await;
    assert_eq!(r.expect(200)["amount"], 150);
    assert_eq!(mock.calls().len(), 3);
    assert_eq!(mock.forwarded_stripe_amount(), 2150);
    for call in mock.calls() {
        assert_eq!(
            call.authorization(),
            Some(format!("Bearer {STRIPE_CREDENTIAL}").as_str())
        );
    }
    assert_mock_never_saw(&mock, &secret);

    // The key's spend today.
    let key_path = format!("/vault/keys/{id}");
    let k = wait_for(within(SPEND_TIMEOUT), || async {
        let k = admin.get(&key_path).await.expect(200);
        (k["calls_today"] == 3).then_some(k)
    })
    .await
    .expect("the three calls reach the key's spend");
    assert_eq!(k["status"], "active");
    assert_eq!(k["spent_today_micros"], 21_500_000);
    assert_eq!(k["spent_today_usd"].as_f64(), Some(21.5));
    assert_eq!(k["remaining_today_micros"], 478_500_000);
    assert_eq!(k["remaining_today_usd"].as_f64(), Some(478.5));
    assert!(k.get("key").is_none(), "the secret is shown only once: {k}");
    assert!(!k.to_string().contains(&secret));

    // Spend of the run.
    let s = admin
        .get(&format!("/vault/spend?agent_run_label={}", q(RUN_LABEL)))
        .await
        .expect(200);
    assert_eq!(s["agent_run_label"], RUN_LABEL);
    assert_eq!(s["total_micros"], 21_500_000);
    assert_eq!(s["total_usd"].as_f64(), Some(21.5));
    assert_eq!(s["calls"], 3);
    assert_eq!(
        s["vendors"],
        json!([{"vendor": "stripe", "total_usd": 21.5, "total_micros": 21_500_000, "calls": 3}])
    );

    // Audit: newest first, two pages.
    let page1 = admin
        .get(&format!(
            "/vault/audit?agent_run_label={}&limit=2",
            q(RUN_LABEL)
        ))
        .await
        .expect(200);
    let first = page1["entries"].as_array().expect("entries").clone();
    assert_eq!(first.len(), 2, "{page1}");
    let cursor = page1["next_cursor"]
        .as_str()
        .expect("a next_cursor after a full page");
    let page2 = admin
        .get(&format!(
            "/vault/audit?agent_run_label={}&limit=2&cursor={}",
            q(RUN_LABEL),
            q(cursor)
        ))
        .await
        .expect(200);
    let second = page2["entries"].as_array().expect("entries").clone();
    assert_eq!(second.len(), 1, "{page2}");
    assert!(page2["next_cursor"].is_null(), "{page2}");
    let all: Vec<Value> = first.into_iter().chain(second).collect();
    let seqs: Vec<i64> = all
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] > w[1]),
        "not newest first: {seqs:?}"
    );
    let expected = [
        ("POST", "/v1/payment_intents", 1_500_000),
        ("GET", "/v1/customers/cus_4711", 0),
        ("POST", "/v1/payment_intents", 20_000_000),
    ];
    for (e, (method, path, cost)) in all.iter().zip(expected) {
        assert_eq!(e["method"], method, "{e}");
        assert_eq!(e["path"], path, "{e}");
        assert_eq!(e["cost_micros"], cost, "{e}");
        assert_eq!(e["outcome"], "settled", "{e}");
        assert_eq!(e["upstream_status"], 200, "{e}");
        assert_eq!(e["key_id"], id.as_str(), "{e}");
        assert_eq!(e["agent_run_label"], RUN_LABEL, "{e}");
        assert_eq!(e["vendor"], "stripe", "{e}");
        assert_eq!(e["node_id"], stack.proxy.node_id.as_str(), "{e}");
    }
    assert_eq!(all[0]["reserved_micros"], 1_500_000);
    let by_key = admin
        .get(&format!("/vault/audit?key_id={id}&vendor=stripe"))
        .await
        .expect(200);
    assert_eq!(by_key["entries"].as_array().expect("entries").len(), 3);
    let future =
        (Utc::now() + chrono::Duration::hours(1)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let none = admin
        .get(&format!("/vault/audit?key_id={id}&since={}", q(&future)))
        .await
        .expect(200);
    assert_eq!(none["entries"], json!([]));

    // Revoke one key.
    let r = admin.delete(&key_path).await;
    let revoked_at = Instant::now();
    let k = r.expect(200);
    assert_eq!(k["status"], "revoked");
    assert!(k["revoked_at"].is_string(), "{k}");
    assert_refused_in_time(
        &stack.proxy.url(),
        "stripe",
        &secret,
        "key_revoked",
        revoked_at,
    )
    .await;
    let calls_before = mock.calls().len();
    agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await
        .expect_error(401, "key_revoked");
    assert_eq!(
        mock.calls().len(),
        calls_before,
        "a revoked key's call was forwarded"
    );
    assert_eq!(admin.get(&key_path).await.expect(200)["status"], "revoked");

    // Revoke every key of the run label.
    let body = stripe_key_body(json!(5), &["POST /v1/payment_intents"], RUN_LABEL);
    let a = admin.post_json("/vault/keys", &body).await.expect(201);
    let b = admin.post_json("/vault/keys", &body).await.expect(201);
    let other = admin
        .post_json(
            "/vault/keys",
            &stripe_key_body(json!(5), &["POST /v1/payment_intents"], "another-run/1"),
        )
        .await
        .expect(201);
    let secret_of = |k: &Value| k["key"].as_str().expect("key").to_string();
    for k in [&a, &b, &other] {
        harness::assert_all_confirmed(k);
    }
    let r = admin
        .post_json("/vault/keys/revoke", &json!({"agent_run_label": RUN_LABEL}))
        .await;
    let revoked_at = Instant::now();
    let out = r.expect(200);
    assert_eq!(out["revoked"], 2, "{out}");
    let ids: BTreeSet<&str> = out["revoked_ids"]
        .as_array()
        .expect("revoked_ids")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let want: BTreeSet<&str> = [&a, &b].iter().filter_map(|k| k["id"].as_str()).collect();
    assert_eq!(ids, want);
    for k in [&a, &b] {
        assert_refused_in_time(
            &stack.proxy.url(),
            "stripe",
            &secret_of(k),
            "key_revoked",
            revoked_at,
        )
        .await;
    }
    assert_eq!(
        stack.probe("stripe", &secret_of(&other)).await.as_deref(),
        Some(PROBE_LIVE),
        "a key of another run was revoked"
    );
    let r = stack
        .agent(&secret_of(&other))
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await;
    r.expect(200);
}

#[path = "e2e/proxy_edges.rs"]
mod proxy_edges;

#[path = "e2e/anthropic.rs"]
mod anthropic;

#[path = "e2e/resend.rs"]
mod resend;

#[path = "e2e/stripe.rs"]
mod stripe;

#[path = "e2e/generic.rs"]
mod generic;

#[path = "e2e/openai.rs"]
mod openai;

#[path = "e2e/twilio.rs"]
mod twilio;

#[path = "e2e/admin_tokens.rs"]
mod admin_tokens;

#[path = "e2e/dashboard.rs"]
mod dashboard;
#[path = "e2e/edge.rs"]
mod edge;
#[path = "e2e/envelopes.rs"]
mod envelopes;
#[path = "e2e/issuer.rs"]
mod issuer;
#[path = "e2e/limits.rs"]
mod limits;
#[path = "e2e/prices.rs"]
mod prices;
#[path = "e2e/scrub.rs"]
mod scrub;
#[path = "e2e/traces.rs"]
mod traces;

#[path = "e2e/tls.rs"]
mod tls;
#[path = "e2e/trees.rs"]
mod trees;
#[path = "e2e/upstreams.rs"]
mod upstreams;
#[path = "e2e/vendor_config.rs"]
mod vendor_config;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_rest_flow_against_the_control_plane() {
    let stack = Stack::start().await;
    issue_rest_flow(&stack, &stack.admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_rest_flow_through_the_proxy_vault_relay() {
    let stack = Stack::start().await;
    issue_rest_flow(&stack, &stack.admin_via_proxy()).await;
}

// --- admin authentication ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_requires_the_admin_token_and_says_nothing_more() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    let vendor_body =
        json!({"profile": "stripe", "base_url": mock.url(), "credential": STRIPE_CREDENTIAL});
    let key_body = stripe_key_body(json!(5), &["POST /v1/payment_intents"], "auth/1");
    let fleet = format!("Bearer {}", stack.control.opts.fleet_token);
    let wrong = format!("Bearer {}", harness::admin_token());
    let bare = stack.control.opts.admin_token.clone();
    let basic = format!("Basic {}", stack.control.opts.admin_token);
    let credentials: [(&str, Option<&str>); 6] = [
        ("missing", None),
        ("wrong token", Some(&wrong)),
        ("token without scheme", Some(&bare)),
        ("basic scheme", Some(&basic)),
        ("fleet token", Some(&fleet)),
        ("empty bearer", Some("Bearer")),
    ];
    let mut bodies = BTreeSet::new();
    for base in [stack.control.url(), stack.proxy.url()] {
        for (what, authorization) in credentials {
            let api = Api::new(&base, None).with_authorization(authorization);
            let responses = [
                api.get("/vault/vendors").await,
                api.get("/vault/vendors/stripe").await,
                api.put_json("/vault/vendors/stripe", &vendor_body).await,
                api.delete("/vault/vendors/stripe").await,
                api.get("/vault/keys").await,
                api.post_json("/vault/keys", &key_body).await,
                api.get("/vault/keys/key_x").await,
                api.delete("/vault/keys/key_x").await,
                api.post_json("/vault/keys/revoke", &json!({"agent_run_label": "auth/1"}))
                    .await,
                api.get("/vault/spend?agent_run_label=auth%2F1").await,
                api.get("/vault/audit").await,
            ];
            for r in responses {
                let body = r.expect_error(401, "unauthenticated");
                let fields: BTreeSet<&str> = body
                    .as_object()
                    .expect("object")
                    .keys()
                    .map(String::as_str)
                    .collect();
                assert_eq!(
                    fields,
                    BTreeSet::from(["error", "message"]),
                    "{what}: {body}"
                );
                bodies.insert(r.text.clone());
            }
        }
    }
    assert_eq!(
        bodies.len(),
        1,
        "401 bodies differ by why the token was refused: {bodies:?}"
    );
    // Nothing was created by the refused calls.
    let vendors = stack.admin.get("/vault/vendors").await.expect(200);
    assert_eq!(vendors["vendors"], json!([]));
    assert_eq!(
        keys_including_inactive(&stack.admin).await,
        Vec::<Value>::new()
    );
    assert!(mock.calls().is_empty());
}

// --- credential injection ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vendor_sees_the_real_credential_and_the_agent_never_does() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &[
                "POST /v1/payment_intents",
                "GET /v1/customers/*",
                "POST /v1/charges",
            ],
            "inject/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    let trace = [("x-agent-trace", "trace-4711")];
    let responses = vec![
        agent
            .send(
                reqwest::Method::POST,
                "/stripe/v1/payment_intents",
                Some((
                    "application/x-www-form-urlencoded",
                    b"amount=500&currency=usd&confirm=true".to_vec(),
                )),
                &trace,
            )
            .await,
        agent
            .send(
                reqwest::Method::GET,
                "/stripe/v1/customers/cus_1?expand=sources",
                None,
                &trace,
            )
            .await,
        agent
            .send(
                reqwest::Method::POST,
                "/stripe/v1/charges",
                Some((
                    "application/x-www-form-urlencoded",
                    b"amount=700&currency=usd&description=fail500".to_vec(),
                )),
                &trace,
            )
            .await,
    ];
    assert_eq!(responses[0].status, 200, "{}", responses[0].text);
    assert_eq!(responses[1].status, 200, "{}", responses[1].text);
    // An upstream failure passes through as the vendor sent it.
    assert_eq!(responses[2].status, 500, "{}", responses[2].text);
    assert_eq!(responses[2].json()["error"]["type"], "api_error");
    for r in &responses {
        assert_resp_lacks(r, STRIPE_CREDENTIAL);
    }

    let calls = mock.calls();
    assert_eq!(calls.len(), 3);
    for call in &calls {
        assert_eq!(
            call.authorization(),
            Some(format!("Bearer {STRIPE_CREDENTIAL}").as_str()),
            "{}",
            call.as_text()
        );
        assert_eq!(call.header("x-agent-trace"), Some("trace-4711"));
    }
    assert_eq!(calls[0].body_text(), "amount=500&currency=usd&confirm=true");
    assert_eq!(calls[1].path, "/v1/customers/cus_1");
    assert_eq!(calls[1].query.as_deref(), Some("expand=sources"));
    assert_mock_never_saw(&mock, &key.secret);

    // The vault key is worth nothing at the vendor itself.
    let direct = Api::new(&mock.url(), Some(&key.secret))
        .post_form(
            "/v1/payment_intents",
            "amount=500&currency=usd&confirm=true",
        )
        .await;
    assert_eq!(direct.status, 401);
    assert_eq!(mock.forwarded_stripe_amount(), 500);

    // The 500 released its reservation; the payment intent settled.
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 3).await;
    let outcome_of = |path: &str| {
        entries
            .iter()
            .find(|e| e["path"] == path)
            .map(|e| (e["outcome"].clone(), e["upstream_status"].clone()))
    };
    assert_eq!(
        outcome_of("/v1/charges"),
        Some((json!("released"), json!(500)))
    );
    assert_eq!(
        outcome_of("/v1/payment_intents"),
        Some((json!("settled"), json!(200)))
    );
}

// --- allowlist ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_endpoints_match_whole_segments_only() {
    let (stack, mock) = stack_with_stripe().await;
    // Same vendor profile, another name: a key for one may not call the other.
    stack.register("stripe-eu", "stripe", &mock).await;
    let tail = stack
        .mint(&stripe_key_body(
            json!(50),
            &["GET /v1/customers/*", "POST /v1/payment_intents"],
            "allow/1",
        ))
        .await;
    let middle = stack
        .mint(&stripe_key_body(
            json!(50),
            &["GET /v1/customers/*/balance_transactions"],
            "allow/2",
        ))
        .await;

    let cases: &[(&MintedKey, &str, &str, bool)] = &[
        // A trailing `*` matches one or more segments.
        (&tail, "GET", "/stripe/v1/customers/cus_1", true),
        (
            &tail,
            "GET",
            "/stripe/v1/customers/cus_1/sources/src_9",
            true,
        ),
        (&tail, "GET", "/stripe/v1/customers", false),
        (&tail, "GET", "/stripe/v1/customers/", false),
        (&tail, "GET", "/stripe/v1/customersX/cus_1", false),
        // The method is part of the pattern.
        (&tail, "POST", "/stripe/v1/customers/cus_1", false),
        (&tail, "DELETE", "/stripe/v1/customers/cus_1", false),
        (&tail, "GET", "/stripe/v1/payment_intents", false),
        // A literal pattern does not extend to sub-paths or siblings.
        (
            &tail,
            "POST",
            "/stripe/v1/payment_intents/pi_1/confirm",
            false,
        ),
        (&tail, "POST", "/stripe/v1/charges", false),
        // A key for `stripe` does not work on another vendor.
        (&tail, "GET", "/stripe-eu/v1/customers/cus_1", false),
        // A `*` in the middle matches exactly one segment.
        (
            &middle,
            "GET",
            "/stripe/v1/customers/cus_1/balance_transactions",
            true,
        ),
        (
            &middle,
            "GET",
            "/stripe/v1/customers/balance_transactions",
            false,
        ),
        (
            &middle,
            "GET",
            "/stripe/v1/customers/cus_1/x/balance_transactions",
            false,
        ),
        (
            &middle,
            "GET",
            "/stripe/v1/customers/cus_1/balance_transactions/txn_1",
            false,
        ),
        (&middle, "GET", "/stripe/v1/customers/cus_1", false),
    ];
    let mut forwarded = Vec::new();
    for (key, method, path, allowed) in cases {
        let agent = stack.agent(&key.secret);
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let body = (method == reqwest::Method::POST).then(|| {
            (
                "application/x-www-form-urlencoded",
                b"amount=100&currency=usd".to_vec(),
            )
        });
        let r = agent.send(method.clone(), path, body, &[]).await;
        if *allowed {
            assert_eq!(r.status, 200, "{method} {path}: {}", r.text);
            let vendor_path = path.strip_prefix("/stripe").unwrap();
            forwarded.push(format!("{method} {vendor_path}"));
        } else {
            r.expect_error(403, "endpoint_not_allowed");
        }
    }
    let seen: Vec<String> = mock
        .calls()
        .iter()
        .map(|c| format!("{} {}", c.method, c.path))
        .collect();
    assert_eq!(
        seen, forwarded,
        "the vendor saw a call the allowlist refused"
    );
}

// --- request-target normalisation ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaping_request_targets_are_refused_before_forwarding() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["GET /v1/customers/*", "POST /v1/payment_intents"],
            "target/1",
        ))
        .await;
    let request = |target: &str| {
        format!(
            "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\n\
             Connection: close\r\n\r\n",
            key.secret
        )
    };

    // The raw path machinery itself works: a clean target is forwarded.
    let ok = raw_http(stack.proxy.addr(), &request("/stripe/v1/customers/cus_1")).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(mock.calls().len(), 1);
    mock.reset();

    let mock_authority = mock.addr().to_string();
    let absolute = format!("http://{mock_authority}/v1/customers/cus_1");
    let targets = [
        "/stripe/v1/customers/../payment_intents",
        "/stripe/v1/customers/cus_1/../../payment_intents",
        "/stripe/../stripe/v1/customers/cus_1",
        "/stripe/v1/./customers/cus_1",
        "/stripe/v1/customers/%2e%2e/payment_intents",
        "/stripe/v1/customers/%2E%2E/payment_intents",
        "/stripe/v1/customers/.%2e/payment_intents",
        "/stripe/v1/customers/%2e/cus_1",
        "/stripe/v1/customers%2fcus_1",
        "/stripe/v1/customers/cus_1%2F..%2F..%2Fpayment_intents",
        "/stripe/v1/customers/%252e%252e/payment_intents",
        "/stripe//v1/customers/cus_1",
        "/stripe/v1//customers/cus_1",
        "//stripe/v1/customers/cus_1",
        "/stripe/v1\\customers\\cus_1",
        "/stripe/v1/customers/cus_1%5c..%5c..%5cpayment_intents",
        "/stripe/v1/customers/..;x/payment_intents",
        absolute.as_str(),
    ];
    for target in targets {
        let r = raw_http(stack.proxy.addr(), &request(target)).await;
        assert_eq!(r.status, 400, "{target}: {} {}", r.status, r.text());
        let body = keycap_tests::harness::keycap_refusal(
            &r.json()
                .unwrap_or_else(|| panic!("{target}: body is not JSON: {:?}", r.text())),
        );
        assert_eq!(body["error"], "invalid_target", "{target}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(!r.text().contains(&key.secret));
    }
    assert!(
        mock.calls().is_empty(),
        "refused targets reached the vendor: {:?}",
        mock.calls()
            .iter()
            .map(|c| format!("{} {}", c.method, c.path))
            .collect::<Vec<_>>()
    );
}

// --- key checks ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_keys_are_refused_before_forwarding() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "keys/1",
        ))
        .await;
    // Same shape, one checksum character changed.
    let mut bad_checksum = key.secret.clone();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == 'a' { 'b' } else { 'a' });
    let unknown = secret::generate(SecretKind::VaultKey, "live");
    assert!(secret::is_well_formed(SecretKind::VaultKey, &unknown));
    let truncated = key.secret[..key.secret.len() - 1].to_string();
    let presented: Vec<(&str, Option<String>)> = vec![
        ("no authorization", None),
        ("garbage", Some("Bearer hello".to_string())),
        ("empty bearer", Some("Bearer".to_string())),
        ("not bearer", Some(format!("Basic {}", key.secret))),
        ("bad checksum", Some(format!("Bearer {bad_checksum}"))),
        ("truncated", Some(format!("Bearer {truncated}"))),
        ("unknown well-formed", Some(format!("Bearer {unknown}"))),
        (
            "admin token",
            Some(format!("Bearer {}", stack.control.opts.admin_token)),
        ),
    ];
    let mut messages = BTreeSet::new();
    for (what, authorization) in &presented {
        let agent = stack.agent("").with_authorization(authorization.as_deref());
        let r = agent
            .post_form(
                "/stripe/v1/payment_intents",
                "amount=100&currency=usd&confirm=true",
            )
            .await;
        assert_eq!(r.status, 401, "{what}: {}", r.text);
        let body = r.expect_error(401, "invalid_key");
        messages.insert(body["message"].as_str().unwrap_or_default().to_string());
        if let Some(a) = authorization {
            let presented_secret = a.split_once(' ').map_or(a.as_str(), |(_, s)| s);
            if !presented_secret.is_empty() {
                assert!(
                    !r.text.contains(presented_secret),
                    "{what}: echoed: {}",
                    r.text
                );
            }
        }
    }
    assert_eq!(
        messages.len(),
        1,
        "invalid_key messages differ: {messages:?}"
    );
    assert!(
        mock.calls().is_empty(),
        "a call with an invalid key was forwarded"
    );
    // The real key still works.
    stack
        .agent(&key.secret)
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    assert_eq!(mock.calls().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_key_is_refused() {
    let (stack, mock) = stack_with_stripe().await;
    let mut body = stripe_key_body(json!(50), &["POST /v1/payment_intents"], "expiry/1");
    // Long enough for the proxy to learn of the key while it is live.
    body["expires_in"] = json!("3s");
    let key = stack.mint(&body).await;
    let expired = wait_until(within(Duration::from_secs(20)), || async {
        stack.probe("stripe", &key.secret).await.as_deref() == Some("key_expired")
    })
    .await;
    assert!(
        expired,
        "the key was not refused as expired (probe says {:?})",
        stack.probe("stripe", &key.secret).await
    );
    stack
        .agent(&key.secret)
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await
        .expect_error(401, "key_expired");
    assert!(mock.calls().is_empty());
    let k = stack.key(&key.id).await;
    assert_eq!(k["status"], "expired", "{k}");
}

/// A proxy that joins after a key was revoked or expired learns of the key
/// only from its first policy snapshot; it should refuse it for the same
/// reason a proxy that was running all along does.
async fn late_proxy_refusal(revoke: bool) {
    let (stack, mock) = stack_with_stripe().await;
    let mut body = stripe_key_body(json!(5), &["POST /v1/payment_intents"], "late/1");
    if !revoke {
        body["expires_in"] = json!("1s");
    }
    let key = stack.create_key(&body).await;
    let code = if revoke {
        stack
            .admin
            .delete(&format!("/vault/keys/{}", key.id))
            .await
            .expect(200);
        "key_revoked"
    } else {
        let is_expired = wait_until(within(Duration::from_secs(20)), || async {
            stack.key(&key.id).await["status"] == "expired"
        })
        .await;
        assert!(is_expired, "the 1 s key never expired");
        "key_expired"
    };
    let late = Proxy::start(
        &stack.control.url(),
        &stack.control.opts.fleet_token,
        "e2e-proxy-late",
    )
    .await;
    Api::new(&late.url(), Some(&key.secret))
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await
        .expect_error(401, code);
    assert!(mock.calls().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_after_a_revocation_says_key_revoked() {
    late_proxy_refusal(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_after_an_expiry_says_key_expired() {
    late_proxy_refusal(false).await;
}

// --- budgets ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_cap_holds_exactly_under_concurrency() {
    let (stack, mock) = stack_with_stripe().await;
    cap_holds_under_concurrency(&stack, &mock, 10, 60).await;
}

/// A $`cap` key, `calls` concurrent $1 charges: exactly `cap` succeed.
async fn cap_holds_under_concurrency(stack: &Stack, mock: &MockVendor, cap: i64, calls: usize) {
    let key = stack
        .mint(&stripe_key_body(
            json!(cap),
            &["POST /v1/payment_intents"],
            "cap/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    let tasks: Vec<_> = (0..calls)
        .map(|_| {
            let agent = agent.clone();
            tokio::spawn(async move {
                let sent = Utc::now();
                let r = agent
                    .post_form(
                        "/stripe/v1/payment_intents",
                        "amount=100&currency=usd&confirm=true",
                    )
                    .await;
                (r, sent, Utc::now())
            })
        })
        .collect();
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        let (r, sent, received) = t.await.expect("call task");
        match r.status {
            200 => {
                assert_eq!(r.json()["amount"], 100);
                ok += 1;
            }
            _ => {
                assert_cap_refusal(&r, cap as f64, 0.0, sent, received);
                refused += 1;
            }
        }
    }
    assert_eq!(ok, cap, "calls admitted under a ${cap} cap");
    assert_eq!(refused, calls as i64 - cap);
    assert_eq!(mock.forwarded_stripe_amount(), cap * 100);
    assert_eq!(mock.calls().len() as i64, cap);

    let k = stack.wait_key_spend(&key.id, cap * 1_000_000, cap).await;
    assert_eq!(k["remaining_today_micros"], 0, "{k}");
    // Settled spend still holds the cap.
    let sent = Utc::now();
    let r = agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await;
    assert_cap_refusal(&r, cap as f64, 0.0, sent, Utc::now());
    let entries = stack
        .wait_audit(&format!("key_id={}&limit=1000", key.id), cap as usize)
        .await;
    assert!(entries.iter().all(|e| e["cost_micros"] == 1_000_000));
    assert_eq!(mock.forwarded_stripe_amount(), cap * 100);
}

/// Two proxies share one $10 key: 60 concurrent $0.70 charges, alternating
/// between them (14 fit). Checks the money invariant and every refusal;
/// returns how many were admitted.
async fn charges_through_two_proxies() -> usize {
    let (stack, mock) = stack_with_stripe().await;
    let second = Proxy::start(
        &stack.control.url(),
        &stack.control.opts.fleet_token,
        "e2e-proxy-2",
    )
    .await;
    let key = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/payment_intents"],
            "cap/2",
        ))
        .await;
    let agents = [
        stack.agent(&key.secret),
        Api::new(&second.url(), Some(&key.secret)),
    ];
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let agent = agents[i % 2].clone();
            tokio::spawn(async move {
                agent
                    .post_form(
                        "/stripe/v1/payment_intents",
                        "amount=70&currency=usd&confirm=true",
                    )
                    .await
            })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let r = t.await.expect("call task");
        if r.status == 200 {
            ok += 1;
        } else {
            let body = r.expect_error(429, "daily_cap_exceeded");
            assert_eq!(body["cap_usd"].as_f64(), Some(10.0), "{body}");
        }
    }
    // The money invariant: never more than the cap, whatever the split.
    assert!(ok <= 14, "{ok} calls of $0.70 admitted under a $10 cap");
    assert_eq!(mock.forwarded_stripe_amount(), 70 * ok as i64);
    stack
        .wait_key_spend(&key.id, 700_000 * ok as i64, ok as i64)
        .await;
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_cap_is_never_exceeded_across_two_proxies() {
    let admitted = charges_through_two_proxies().await;
    assert!(admitted > 0, "no call was admitted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_budget_is_stranded_across_two_proxies() {
    // DESIGN.md: lease slices "shrink to exactly-one-call grants as the key
    // nears its cap, so no node strands budget another node needs".
    let admitted = charges_through_two_proxies().await;
    assert_eq!(admitted, 14, "budget left unused in one proxy's lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_cap_refuses_a_single_large_call() {
    let (stack, mock) = stack_with_stripe().await;
    let mut body = stripe_key_body(json!(100), &["POST /v1/payment_intents"], "percall/1");
    body["per_call_usd_cap"] = json!(5);
    let key = stack.mint(&body).await;
    let agent = stack.agent(&key.secret);
    let refused = agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=501&currency=usd&confirm=true",
        )
        .await
        .expect_error(403, "per_call_cap_exceeded");
    assert_eq!(refused["per_call_cap_usd"].as_f64(), Some(5.0), "{refused}");
    assert_eq!(refused["cost_usd"].as_f64(), Some(5.01), "{refused}");
    assert!(mock.calls().is_empty());
    agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=500&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    assert_eq!(mock.forwarded_stripe_amount(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifetime_cap_refusal_says_it_never_resets() {
    let (stack, mock) = stack_with_stripe().await;
    let mut body = stripe_key_body(json!(100), &["POST /v1/payment_intents"], "life/1");
    body["lifetime_usd_cap"] = json!(5);
    let key = stack.mint(&body).await;
    let agent = stack.agent(&key.secret);
    agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=300&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    // $2 left over the key's life while $97 is left today: the lifetime cap
    // is what refuses, and nothing about it resets at midnight.
    let r = agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=300&currency=usd&confirm=true",
        )
        .await;
    let refused = r.expect_error(403, "lifetime_cap_exceeded");
    assert_eq!(refused["cap_usd"].as_f64(), Some(5.0), "{refused}");
    assert_eq!(refused["remaining_usd"].as_f64(), Some(2.0), "{refused}");
    assert!(refused.get("resets_at").is_none(), "{refused}");
    assert_eq!(r.header("retry-after"), None);
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert_eq!(mock.forwarded_stripe_amount(), 300);
    // What is left can still be spent.
    agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=200&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    assert_eq!(mock.forwarded_stripe_amount(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declined_charge_releases_its_reservation() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/payment_intents"],
            "declined/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    let r = agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=402&currency=usd&confirm=true",
        )
        .await;
    assert_eq!(r.status, 402, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "card_declined");
    assert_eq!(mock.calls().len(), 1);
    assert_eq!(mock.forwarded_stripe_amount(), 0);

    let entries = stack.wait_audit(&format!("key_id={}", key.id), 1).await;
    let e = &entries[0];
    assert_eq!(e["outcome"], "released", "{e}");
    assert_eq!(e["upstream_status"], 402, "{e}");
    assert_eq!(e["reserved_micros"], 4_020_000, "{e}");
    assert_eq!(e["cost_micros"], 0, "{e}");
    let k = stack.wait_key_spend(&key.id, 0, 1).await;
    assert_eq!(k["remaining_today_micros"], 10_000_000, "{k}");

    // The released $4.02 is spendable again: the whole $10 goes through.
    agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=1000&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    assert_eq!(mock.forwarded_stripe_amount(), 1000);
    stack.wait_key_spend(&key.id, 10_000_000, 2).await;
}

// --- bad input ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_input_is_refused_and_creates_nothing() {
    let (stack, mock) = stack_with_stripe().await;
    let admin = &stack.admin;
    // One valid key, so "unchanged" is not trivially "empty".
    stack
        .create_key(&stripe_key_body(
            json!(5),
            &["POST /v1/payment_intents"],
            "input/1",
        ))
        .await;
    let keys_before = keys_including_inactive(admin).await;
    assert_eq!(keys_before.len(), 1);
    let vendors_before = admin.get("/vault/vendors").await.expect(200);

    let valid = stripe_key_body(json!(5), &["POST /v1/payment_intents"], "input/2");
    let with = |field: &str, value: Value| {
        let mut b = valid.clone();
        b[field] = value;
        b
    };
    let bad_keys: Vec<(&str, Value, &str)> = vec![
        (
            "unknown vendor",
            with("vendor", json!("nosuchvendor")),
            "vendor",
        ),
        (
            "negative cap",
            with("daily_usd_cap", json!(-5)),
            "daily_usd_cap",
        ),
        ("zero cap", with("daily_usd_cap", json!(0)), "daily_usd_cap"),
        (
            "absurd cap",
            with("daily_usd_cap", json!(1e12)),
            "daily_usd_cap",
        ),
        (
            "cap as words",
            with("daily_usd_cap", json!("lots")),
            "daily_usd_cap",
        ),
        (
            "sub-micro cap",
            with("daily_usd_cap", json!("0.0000001")),
            "daily_usd_cap",
        ),
        (
            "negative per-call cap",
            with("per_call_usd_cap", json!(-1)),
            "per_call_usd_cap",
        ),
        (
            "unparseable expires_in",
            with("expires_in", json!("soon")),
            "expires_in",
        ),
        (
            "zero expires_in",
            with("expires_in", json!("0s")),
            "expires_in",
        ),
        (
            "endless expires_in",
            with("expires_in", json!("400d")),
            "expires_in",
        ),
        (
            "negative expires_in",
            with("expires_in", json!(-5)),
            "expires_in",
        ),
        (
            "no endpoints",
            with("allowed_endpoints", json!([])),
            "allowed_endpoints",
        ),
        (
            "bad method",
            with("allowed_endpoints", json!(["FETCH /v1/x"])),
            "allowed_endpoints",
        ),
        (
            "partial glob",
            with("allowed_endpoints", json!(["GET /v1/cus*"])),
            "allowed_endpoints",
        ),
        (
            "empty run label",
            with("agent_run_label", json!("")),
            "agent_run_label",
        ),
        // Patterns the proxy could never match: accepting them would mint
        // a key every proxy drops, and the agent would see invalid_key.
        (
            "trailing slash",
            with("allowed_endpoints", json!(["GET /v1/customers/"])),
            "allowed_endpoints",
        ),
        (
            "empty segment",
            with("allowed_endpoints", json!(["GET /v1//customers"])),
            "allowed_endpoints",
        ),
        (
            "non-ASCII path",
            with("allowed_endpoints", json!(["GET /v1/caf\u{e9}"])),
            "allowed_endpoints",
        ),
    ];
    for (what, body, field) in &bad_keys {
        let r = admin.post_json("/vault/keys", body).await;
        let e = r.expect_error(400, "invalid_request");
        assert_eq!(e["field"], *field, "{what}: {e}");
    }
    let raw_bodies = [
        (
            "malformed JSON",
            r#"{"vendor": "stripe", "daily_usd_cap": "#,
        ),
        ("empty body", ""),
        ("not an object", "[1, 2]"),
        (
            "unknown field",
            r#"{"vendor":"stripe","daily_usd_cap":5,"allowed_endpoints":["POST /v1/x"],"expires_in":"2h","agent_run_label":"x","bypass_caps":true}"#,
        ),
    ];
    for (what, text) in raw_bodies {
        let r = admin
            .post_raw("/vault/keys", "application/json", text)
            .await;
        let e = r.expect_error(400, "invalid_request");
        assert_eq!(e["field"], "body", "{what}: {e}");
    }

    let bad_vendors: Vec<(&str, &str, Value, &str)> = vec![
        (
            "unknown profile",
            "paypal",
            json!({"profile": "paypal", "base_url": mock.url(), "credential": "x"}),
            "profile",
        ),
        (
            "twilio credential that is not SID:TOKEN",
            "twilio",
            json!({"profile": "twilio", "base_url": mock.url(), "credential": "x"}),
            "credential",
        ),
        (
            "bad base_url",
            "other",
            json!({"profile": "stripe", "base_url": "ftp://example.com", "credential": "x"}),
            "base_url",
        ),
        (
            "credential that cannot go in a header",
            "other",
            json!({"profile": "stripe", "base_url": mock.url(), "credential": "sk_caf\u{e9}"}),
            "credential",
        ),
        (
            "bad currency rate",
            "other",
            json!({"profile": "stripe", "base_url": mock.url(), "credential": "x",
                   "currency_rates": {"eur": "lots"}}),
            "currency_rates",
        ),
    ];
    for (what, name, body, field) in &bad_vendors {
        let r = admin
            .put_json(&format!("/vault/vendors/{name}"), body)
            .await;
        let e = r.expect_error(400, "invalid_request");
        assert_eq!(e["field"], *field, "{what}: {e}");
    }
    let r = admin
        .send(
            reqwest::Method::PUT,
            "/vault/vendors/other",
            Some(("application/json", b"{not json".to_vec())),
            &[],
        )
        .await;
    assert_eq!(r.expect_error(400, "invalid_request")["field"], "body");

    let bad_queries = [
        ("/vault/spend", "agent_run_label"),
        ("/vault/audit?limit=0", "limit"),
        ("/vault/audit?limit=100000", "limit"),
        ("/vault/audit?cursor=abc", "cursor"),
        ("/vault/audit?since=yesterday", "since"),
    ];
    for (path, field) in bad_queries {
        let e = admin.get(path).await.expect_error(400, "invalid_request");
        assert_eq!(e["field"], field, "{path}: {e}");
    }
    admin
        .get("/vault/keys/key_doesnotexist")
        .await
        .expect_error(404, "not_found");
    admin
        .delete("/vault/keys/key_doesnotexist")
        .await
        .expect_error(404, "not_found");
    admin
        .get("/vault/vendors/twilio")
        .await
        .expect_error(404, "not_found");

    assert_eq!(keys_including_inactive(admin).await, keys_before);
    assert_eq!(
        admin.get("/vault/vendors").await.expect(200),
        vendors_before
    );
    assert!(mock.calls().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpriceable_stripe_calls_are_refused_and_rates_price_other_currencies() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "pricing/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    let cases = [
        (
            "no amount",
            "/stripe/v1/payment_intents",
            "currency=usd",
            "unpriceable_request",
        ),
        (
            "fractional amount",
            "/stripe/v1/payment_intents",
            "amount=12.5&currency=usd&confirm=true",
            "unpriceable_request",
        ),
        (
            "word amount",
            "/stripe/v1/payment_intents",
            "amount=ten&currency=usd&confirm=true",
            "unpriceable_request",
        ),
        (
            "negative amount",
            "/stripe/v1/payment_intents",
            "amount=-100&currency=usd&confirm=true",
            "unpriceable_request",
        ),
        (
            "two amounts",
            "/stripe/v1/payment_intents",
            "amount=1&amount=100000&currency=usd&confirm=true",
            "unpriceable_request",
        ),
        (
            "no currency",
            "/stripe/v1/payment_intents",
            "amount=100",
            "unpriceable_request",
        ),
        (
            "amount in the query and in the body",
            "/stripe/v1/payment_intents?amount=100000",
            "amount=100&currency=usd",
            "unpriceable_request",
        ),
        (
            "eur without a rate",
            "/stripe/v1/payment_intents",
            "amount=1000&currency=eur&confirm=true",
            "currency_not_supported",
        ),
    ];
    for (what, path, form, code) in cases {
        let r = agent.post_form(path, form).await;
        assert_eq!(r.status, 400, "{what}: {}", r.text);
        r.expect_error(400, code);
    }
    let r = agent
        .post_raw(
            "/stripe/v1/payment_intents",
            "application/json",
            r#"{"amount": 10.5, "currency": "usd"}"#,
        )
        .await;
    r.expect_error(400, "unpriceable_request");
    assert!(
        mock.calls().is_empty(),
        "an unpriceable call was forwarded: {:?}",
        mock.calls()
    );

    // With a rate, EUR is priced: 10.00 EUR at 1.10 = $11.00. The update
    // omits the credential, which keeps the stored one.
    let v = stack
        .put_vendor(
            "stripe",
            &json!({"profile": "stripe", "base_url": mock.url(), "currency_rates": {"eur": "1.10"}}),
        )
        .await;
    assert_eq!(v["currency_rates"], json!({"eur": "1.10"}));
    let priced = wait_for(within(harness::POLICY_TIMEOUT), || async {
        let r = agent
            .post_form(
                "/stripe/v1/payment_intents",
                "amount=1000&currency=eur&confirm=true",
            )
            .await;
        (r.error_code().as_deref() != Some("currency_not_supported")).then_some(r)
    })
    .await
    .expect("the currency rate reached the proxy");
    let pi = priced.expect(200);
    assert_eq!(pi["currency"], "eur");
    assert_eq!(mock.forwarded_stripe_amount(), 1000);
    let calls = mock.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].authorization(),
        Some(format!("Bearer {STRIPE_CREDENTIAL}").as_str())
    );
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 1).await;
    let e = &entries[0];
    assert_eq!(e["reserved_micros"], 11_000_000, "{e}");
    assert_eq!(e["cost_micros"], 11_000_000, "{e}");
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(e["detail"]["currency"], "eur", "{e}");
    assert_eq!(e["detail"]["usd_rate"], "1.10", "{e}");
    // Other currencies still need their own rate.
    agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=1000&currency=jpy&confirm=true",
        )
        .await
        .expect_error(400, "currency_not_supported");
    assert_eq!(mock.calls().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_vendor_is_a_502_that_costs_nothing() {
    let stack = Stack::start().await;
    // Nothing listens on this port.
    let port = harness::free_port();
    let base_url = format!("http://127.0.0.1:{port}");
    stack
        .put_vendor(
            "stripe",
            &json!({"profile": "stripe", "base_url": base_url, "credential": STRIPE_CREDENTIAL}),
        )
        .await;
    let key = stack
        .mint(&stripe_key_body(
            json!(5),
            &["POST /v1/payment_intents"],
            "down/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    for _ in 0..3 {
        // $5 each: were a failed call's reservation kept, the second would
        // be refused with daily_cap_exceeded.
        let r = agent
            .post_form(
                "/stripe/v1/payment_intents",
                "amount=500&currency=usd&confirm=true",
            )
            .await;
        r.expect_error(502, "upstream_unreachable");
        assert!(
            !r.text.contains(&port.to_string()),
            "internal address leaked: {}",
            r.text
        );
        assert_resp_lacks(&r, STRIPE_CREDENTIAL);
    }
    let k = stack.key(&key.id).await;
    assert_eq!(k["spent_today_micros"], 0, "{k}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_is_refused_before_forwarding() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "body/1",
        ))
        .await;
    // Default limit: 1 MiB. Both exchanges are raw so the client never races
    // the proxy's early answer: it sends only part of what it announces and
    // then reads.
    let limit = 1usize << 20;
    let head = |framing: &str| {
        format!(
            "POST /stripe/v1/payment_intents HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Authorization: Bearer {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
             {framing}\r\nConnection: close\r\n\r\n",
            key.secret
        )
    };
    // A declared length over the limit is refused from the headers alone:
    // the proxy answers before the body has arrived.
    let declared = format!(
        "{}amount=100&currency=usd&description=",
        head(&format!("Content-Length: {}", 2 * limit))
    );
    let r = raw_http(stack.proxy.addr(), &declared).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(
        keycap_tests::harness::keycap_refusal(&r.json().expect("JSON error body"))["error"],
        "body_too_large"
    );

    // A chunked body with no declared length is refused once it passes the
    // limit, however it is framed.
    let data = format!("amount=100&currency=usd&description={}", "x".repeat(limit));
    let chunked = format!(
        "{}{:x}\r\n{data}",
        head("Transfer-Encoding: chunked"),
        data.len()
    );
    let r = raw_http(stack.proxy.addr(), &chunked).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(
        keycap_tests::harness::keycap_refusal(&r.json().expect("JSON error body"))["error"],
        "body_too_large"
    );

    // Just under the limit is priced and forwarded as usual.
    let fits = format!(
        "amount=100&currency=usd&description={}",
        "x".repeat(limit - 64)
    );
    stack
        .agent(&key.secret)
        .post_form("/stripe/v1/payment_intents", &fits)
        .await
        .expect(200);
    assert_eq!(
        mock.calls().len(),
        1,
        "only the call within the limit reaches the vendor"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_refused() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "body/2",
        ))
        .await;
    // Content-Length and Transfer-Encoding together: the two framings could
    // disagree between keycap and whatever sits in front of or behind it.
    let chunk = "amount=100&currency=usd";
    let smuggle = format!(
        "POST /stripe/v1/payment_intents HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         {:x}\r\n{chunk}\r\n0\r\n\r\n",
        key.secret,
        chunk.len()
    );
    let r = raw_http(stack.proxy.addr(), &smuggle).await;
    assert_eq!(r.status, 400, "CL+TE accepted: {} {}", r.status, r.text());
    assert!(
        mock.calls().is_empty(),
        "a refused body reached the vendor: {:?}",
        mock.calls()
    );
}

// --- OpenAI ------------------------------------------------------------------------------------------------

async fn stack_with_openai() -> (Stack, MockVendor, MintedKey) {
    let stack = Stack::start().await;
    let mock = MockVendor::start(OPENAI_CREDENTIAL).await;
    stack.register("openai", "openai", &mock).await;
    let key = stack
        .mint(&json!({
            "vendor": "openai",
            "daily_usd_cap": 5,
            "allowed_endpoints": ["POST /v1/chat/completions"],
            "expires_in": "1h",
            "agent_run_label": "openai/1",
        }))
        .await;
    (stack, mock, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_settles_from_reported_usage() {
    let (stack, mock, key) = stack_with_openai().await;
    let model = "gpt-4o-mini";
    let request = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 1000,
    });
    let r = stack
        .agent(&key.secret)
        .post_json("/openai/v1/chat/completions", &request)
        .await;
    let body = r.expect(200);
    assert_resp_lacks(&r, OPENAI_CREDENTIAL);
    let usage = mock::chat_usage(&request);
    assert_eq!(body["usage"]["prompt_tokens"], usage.0);
    assert_eq!(body["usage"]["completion_tokens"], usage.1);
    assert_eq!(
        mock.calls()[0].authorization(),
        Some(format!("Bearer {OPENAI_CREDENTIAL}").as_str())
    );
    assert_mock_never_saw(&mock, &key.secret);

    let cost = openai_cost(model, usage);
    assert!(cost > 0);
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 1).await;
    let e = &entries[0];
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(e["cost_micros"], cost, "{e}");
    let reserved = e["reserved_micros"].as_i64().expect("reserved_micros");
    assert!(
        reserved >= cost,
        "reserved {reserved} below the settled cost {cost}"
    );
    assert_eq!(e["detail"]["input_tokens"], usage.0, "{e}");
    assert_eq!(e["detail"]["output_tokens"], usage.1, "{e}");
    stack.wait_key_spend(&key.id, cost, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_stream_passes_every_event_and_settles_from_the_final_usage() {
    let (stack, mock, key) = stack_with_openai().await;
    let agent = stack.agent(&key.secret);
    let model = "gpt-4o";
    let request = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Stream a hello."}],
        "max_tokens": 500,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let r = agent
        .post_json("/openai/v1/chat/completions", &request)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(
        r.header("content-type")
            .is_some_and(|ct| ct.starts_with("text/event-stream")),
        "{:?}",
        r.headers
    );
    let usage = mock::chat_usage(&request);
    assert_eq!(r.text, mock::chat_stream_body(model, true, usage));
    assert_resp_lacks(&r, OPENAI_CREDENTIAL);
    let cost = openai_cost(model, usage);
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 1).await;
    assert_eq!(entries[0]["outcome"], "settled", "{}", entries[0]);
    assert_eq!(entries[0]["cost_micros"], cost, "{}", entries[0]);
    assert_eq!(mock.calls().len(), 1);
    // A stream whose client did not ask for usage: see e2e/openai.rs.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_unknown_model_is_refused_before_forwarding() {
    let (stack, mock, key) = stack_with_openai().await;
    let agent = stack.agent(&key.secret);
    agent
        .post_json(
            "/openai/v1/chat/completions",
            &json!({"model": "gpt-9-ultra", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await
        .expect_error(400, "unknown_model");
    agent
        .post_raw(
            "/openai/v1/chat/completions",
            "application/json",
            "{not json",
        )
        .await
        .expect_error(400, "unpriceable_request");
    agent
        .post_json(
            "/openai/v1/chat/completions",
            &json!({"model": "gpt-4o", "messages": [], "max_tokens": -1}),
        )
        .await
        .expect_error(400, "unpriceable_request");
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
}

// --- control-plane outage --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_events_survive_a_control_plane_outage() {
    let (mut stack, mock) = stack_with_stripe().await;
    // A $100 cap: the first call's lease is a first slice, a sixteenth of
    // the cap ($6.25), and two calls are too slow a rate to top it up
    // ahead of need.
    let key = stack
        .mint(&stripe_key_body(
            json!(100),
            &["POST /v1/payment_intents"],
            "outage/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    let charge = || dollar_charge(&agent);
    charge().await.expect(200);
    charge().await.expect(200);

    stack.control.kill().await;
    let control_addr = format!("127.0.0.1:{}", stack.control.port());
    assert!(
        tokio::net::TcpStream::connect(&control_addr).await.is_err(),
        "the control plane still accepts connections after SIGKILL"
    );
    for _ in 0..4 {
        let r = charge().await;
        assert_eq!(
            r.status, 200,
            "a call within the lease failed during the outage: {}",
            r.text
        );
    }
    // The lease is spent: fail closed.
    charge().await.expect_error(503, "budget_unavailable");
    assert_eq!(mock.forwarded_stripe_amount(), 600);

    stack.control.restart().await;
    let entries = stack
        .wait_audit(&format!("key_id={}&limit=1000", key.id), 6)
        .await;
    let events: BTreeSet<&str> = entries
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    assert_eq!(events.len(), 6, "duplicate audit entries: {entries:?}");
    assert!(entries.iter().all(|e| e["cost_micros"] == 1_000_000));
    stack.wait_key_spend(&key.id, 6_000_000, 6).await;
    let s = stack
        .admin
        .get("/vault/spend?agent_run_label=outage%2F1")
        .await
        .expect(200);
    assert_eq!(s["calls"], 6, "{s}");
    assert_eq!(s["total_micros"], 6_000_000, "{s}");

    // The proxy is back in touch: new calls are recorded and new keys work.
    charge().await.expect(200);
    stack
        .wait_audit(&format!("key_id={}&limit=1000", key.id), 7)
        .await;
    stack
        .mint(&stripe_key_body(
            json!(1),
            &["POST /v1/payment_intents"],
            "outage/2",
        ))
        .await;
}

// --- policy propagation ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_reach_a_running_proxy() {
    // Vendor and key are both created after the proxy has its policy, and
    // each change is served by the call right after it: every change waits
    // for the proxy's confirmation.
    let stack = Stack::start().await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    harness::assert_all_confirmed(&stack.register("stripe", "stripe", &mock).await);
    let key = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/payment_intents"],
            "policy/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    let charge = || dollar_charge(&agent);
    charge().await.expect(200);
    assert_eq!(mock.calls().len(), 1);

    // Moving the vendor to another base URL takes effect without a restart.
    let moved = MockVendor::start(STRIPE_CREDENTIAL).await;
    harness::assert_all_confirmed(&stack.register("stripe", "stripe", &moved).await);
    charge().await.expect(200);
    assert_eq!(moved.calls().len(), 1, "the call went to the new base URL");
    assert_eq!(mock.calls().len(), 1);

    // A vendor with live keys cannot be deleted; once they are revoked it
    // can, and the proxy stops serving it: a key of another vendor is
    // told it does not exist.
    stack
        .admin
        .delete("/vault/vendors/stripe")
        .await
        .expect_error(409, "conflict");
    stack
        .admin
        .delete(&format!("/vault/keys/{}", key.id))
        .await
        .expect(200);
    let other = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("other", "stripe", &other).await;
    let mut body = stripe_key_body(json!(10), &["POST /v1/payment_intents"], "policy/2");
    body["vendor"] = json!("other");
    let witness = stack.mint(&body).await;
    assert_eq!(
        stack.probe("stripe", &witness.secret).await.as_deref(),
        Some("endpoint_not_allowed")
    );
    let deleted = stack
        .admin
        .delete("/vault/vendors/stripe")
        .await
        .expect(200);
    harness::assert_all_confirmed(&deleted);
    assert_eq!(
        stack.probe("stripe", &witness.secret).await.as_deref(),
        Some("unknown_vendor"),
        "a deleted vendor is still served"
    );
}

// --- the CLI ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_vendors_keys_spend_and_audit() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let put = strings(&[
        "vendor",
        "put",
        "stripe",
        "--profile",
        "stripe",
        "--base-url",
        &mock.url(),
        "--credential",
        STRIPE_CREDENTIAL,
    ]);
    let out = stack.control.cli(&put).await;
    let v = out.json();
    assert!(!out.stdout.contains(STRIPE_CREDENTIAL));
    assert_eq!(v["name"], "stripe");
    assert_eq!(v["profile"], "stripe");
    assert_eq!(v["base_url"], mock.url());
    assert_eq!(v["created"], true);
    assert_eq!(stack.control.cli(&put).await.json()["created"], false);
    let out = stack.control.cli(&["vendor", "list"]).await;
    let list = out.json();
    assert!(!out.stdout.contains(STRIPE_CREDENTIAL));
    // The CLI prints what REST answers (docs/api-conventions.md).
    assert_eq!(list, stack.admin.get("/vault/vendors").await.expect(200));
    assert_eq!(list["vendors"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list["vendors"][0]["name"], "stripe");
    assert_eq!(
        stack.control.cli(&["vendor", "get", "stripe"]).await.json(),
        stack.admin.get("/vault/vendors/stripe").await.expect(200)
    );

    let create = |label: &str| {
        strings(&[
            "key",
            "create",
            "--vendor",
            "stripe",
            "--daily-usd-cap",
            "25",
            "--allow",
            "POST /v1/payment_intents",
            "--allow",
            "GET /v1/customers/*",
            "--expires-in",
            "2h",
            "--run-label",
            label,
        ])
    };
    let k = stack.control.cli(&create("cli/1")).await.json();
    let id = k["id"].as_str().expect("id").to_string();
    let secret = k["key"].as_str().expect("key").to_string();
    assert!(secret.starts_with("kc_"), "{k}");
    assert_eq!(k["status"], "active");
    assert_eq!(k["daily_usd_cap"], 25.0);
    assert_eq!(k["daily_cap_micros"], 25_000_000);
    assert_eq!(k["agent_run_label"], "cli/1");
    assert_eq!(
        k["allowed_endpoints"],
        json!(["POST /v1/payment_intents", "GET /v1/customers/*"])
    );

    stack
        .agent(&secret)
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=250&currency=usd&confirm=true",
        )
        .await
        .expect(200);

    let listed = stack
        .control
        .cli(&["key", "list", "--run-label", "cli/1"])
        .await
        .json();
    let ids: Vec<&str> = listed["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["id"].as_str())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let got = wait_for(within(SPEND_TIMEOUT), || {
        let (control, id) = (&stack.control, &id);
        async move {
            let k = control.cli(&["key", "get", id]).await.json();
            (k["calls_today"] == 1).then_some(k)
        }
    })
    .await
    .expect("the call reaches the key's spend");
    assert_eq!(got["spent_today_usd"], 2.5);
    assert_eq!(got["remaining_today_usd"], 22.5);
    assert!(!got.to_string().contains(&secret));
    let rest = |path: String| {
        let admin = &stack.admin;
        async move { admin.get(&path).await.expect(200) }
    };
    assert_eq!(got, rest(format!("/vault/keys/{id}")).await);
    // Listed again now the spend is in: the first list may predate it.
    let listed = stack
        .control
        .cli(&["key", "list", "--run-label", "cli/1"])
        .await
        .json();
    assert_eq!(
        listed,
        rest("/vault/keys?agent_run_label=cli/1".to_string()).await
    );

    let s = stack
        .control
        .cli(&["spend", "--run-label", "cli/1"])
        .await
        .json();
    assert_eq!(s["total_usd"], 2.5);
    assert_eq!(s["calls"], 1);
    assert_eq!(
        s["vendors"],
        json!([{"vendor": "stripe", "total_usd": 2.5, "total_micros": 2_500_000, "calls": 1}])
    );
    assert_eq!(
        s,
        rest("/vault/spend?agent_run_label=cli/1".to_string()).await
    );
    let a = stack
        .control
        .cli(&["audit", "--run-label", "cli/1"])
        .await
        .json();
    let entries = a["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "{a}");
    assert_eq!(
        (&entries[0]["method"], &entries[0]["path"]),
        (&json!("POST"), &json!("/v1/payment_intents"))
    );
    assert_eq!(entries[0]["cost_usd"], 2.5);
    assert_eq!(
        a,
        rest("/vault/audit?agent_run_label=cli/1&limit=50".to_string()).await
    );
    let verified = stack.control.cli(&["audit", "verify"]).await.json();
    assert_eq!(verified, rest("/vault/audit/verify".to_string()).await);
    assert_eq!(verified["ok"], true);
    assert_eq!(entries[0]["outcome"], "settled");
    assert_eq!(entries[0]["key_id"], id.as_str());

    let r = stack.control.cli(&["key", "revoke", &id]).await.json();
    let revoked_at = Instant::now();
    assert_eq!(r["status"], "revoked");
    assert_refused_in_time(
        &stack.proxy.url(),
        "stripe",
        &secret,
        "key_revoked",
        revoked_at,
    )
    .await;

    let a = stack.control.cli(&create("cli/2")).await.json();
    let b = stack.control.cli(&create("cli/2")).await.json();
    let r = stack
        .control
        .cli(&["key", "revoke", "--run-label", "cli/2"])
        .await
        .json();
    let mut got: Vec<&str> = r["revoked_ids"]
        .as_array()
        .expect("revoked_ids")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    got.sort();
    let mut want = vec![a["id"].as_str().unwrap(), b["id"].as_str().unwrap()];
    want.sort();
    assert_eq!(got, want);
    assert_eq!(r["revoked"], 2);
    assert_eq!(
        stack.control.cli(&["key", "list"]).await.json(),
        json!({"keys": []}),
        "revoked keys are not listed as active"
    );
    let all = stack.control.cli(&["key", "list", "--all"]).await.json();
    assert_eq!(all["keys"].as_array().map(Vec::len), Some(3), "{all}");

    // Failures exit non-zero and say why.
    let missing = stack.control.cli(&["key", "get", "key_doesnotexist"]).await;
    assert!(!missing.status.success());
    assert!(missing.stderr.contains("not_found: "), "{}", missing.stderr);
    let denied = keycap_cli(
        &stack.control.url(),
        &harness::admin_token(),
        &["vendor", "list"],
    )
    .await;
    assert!(!denied.status.success());
    assert!(
        denied.stderr.contains("unauthenticated: "),
        "{}",
        denied.stderr
    );
}

// --- the OpenAPI document ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_served_by_the_control_plane_and_through_the_proxy() {
    let stack = Stack::start().await;
    let checked_in =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json"))
            .expect("docs/openapi.json");
    for (what, api) in [
        ("the control plane", Api::new(&stack.control.url(), None)),
        ("the proxy's relay", stack.proxy.api(None)),
    ] {
        let served = api.get("/openapi.json").await;
        assert_eq!(served.status, 200, "{what}: {}", served.text);
        assert_eq!(
            served.header("content-type"),
            Some("application/json"),
            "{what}"
        );
        assert!(
            served.text == checked_in,
            "{what} serves another document than docs/openapi.json: run scripts/gen-openapi"
        );
    }
}

// --- keycap dev ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycap_dev_runs_the_sandbox_flow() {
    let token = harness::admin_token();
    let dev = Dev::start(&token).await;
    // As the banner shows: one base URL, the proxy, for admin and agent.
    let admin = Api::new(&dev.proxy_url, Some(&token));
    let vendors = admin.get("/vault/vendors").await.expect(200);
    assert_eq!(vendors["vendors"][0]["name"], "sandbox", "{vendors}");
    assert_eq!(vendors["vendors"][0]["profile"], "stripe", "{vendors}");
    let k = admin
        .post_json(
            "/vault/keys",
            &json!({
                "vendor": "sandbox",
                "daily_usd_cap": 5,
                "allowed_endpoints": ["POST /v1/payment_intents"],
                "expires_in": "1h",
                "agent_run_label": "demo/1",
            }),
        )
        .await
        .expect(201);
    let secret = k["key"].as_str().expect("key").to_string();
    assert!(secret.starts_with("kc_dev_"), "{secret}");
    harness::assert_all_confirmed(&k);

    let agent = Api::new(&dev.proxy_url, Some(&secret));
    let pi = agent
        .post_form(
            "/sandbox/v1/payment_intents",
            "amount=300&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    assert_eq!(pi["amount"], 300);
    assert_eq!(pi["status"], "succeeded");
    let sent = Utc::now();
    let r = agent
        .post_form(
            "/sandbox/v1/payment_intents",
            "amount=300&currency=usd&confirm=true",
        )
        .await;
    assert_cap_refusal(&r, 5.0, 2.0, sent, Utc::now());

    let spend = wait_for(within(SPEND_TIMEOUT), || async {
        let s = admin
            .get("/vault/spend?agent_run_label=demo%2F1")
            .await
            .expect(200);
        (s["calls"] == 1).then_some(s)
    })
    .await
    .expect("the sandbox call reaches the run's spend");
    assert_eq!(spend["total_micros"], 3_000_000, "{spend}");
    // The admin API also answers on the control plane's own address.
    Api::new(&dev.control_url, Some(&token))
        .get("/vault/keys")
        .await
        .expect(200);
    assert!(dev.data_dir().join("master.key").is_file());
}

// --- PostgreSQL --------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_core_flow() {
    // Under CI a missing PostgreSQL fails here instead of skipping.
    let Some(db) = pg::fresh_database_or_skip()
        .await
        .expect("a PostgreSQL database for the test")
    else {
        return;
    };
    let stack = Stack::start_with(ControlOpts::postgres(&db.url)).await;
    issue_rest_flow(&stack, &stack.admin).await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    cap_holds_under_concurrency(&stack, &mock, 5, 12).await;
}

#[path = "e2e/rust_client.rs"]
mod rust_client;

#[path = "e2e/cli.rs"]
mod cli;

#[path = "e2e/key_roll.rs"]
mod key_roll;
