//! One rule per vendor setting: what the control plane accepts every proxy
//! serves, and a vendor a proxy cannot load anyway is shown on the
//! vendor's admin reads (REST and gRPC), never only logged. Included from
//! `e2e.rs`.

use keycap_proto::pb;
use keycap_tests::harness::{wait_for, within, POLICY_TIMEOUT};
use sqlx::Connection;

use super::*;

const GENERIC_RULES: &str = r#"{"currency": "usd",
    "rules": [{"endpoint": "GET /*", "cost": {"fixed": "0.01"}}],
    "credential_header": "HEADER"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendor_settings_a_proxy_would_refuse_are_refused_when_registered() {
    let (stack, mock) = stack_with_stripe().await;
    let url = mock.url();
    let cases: Vec<(Value, &str)> = vec![
        // The proxy refuses a usd rate other than 1: so does registration.
        (
            json!({"profile": "stripe", "base_url": url, "credential": STRIPE_CREDENTIAL,
                   "currency_rates": {"usd": "2"}}),
            "currency_rates",
        ),
        (
            json!({"profile": "stripe", "base_url": url, "credential": "sk_1"}),
            "credential",
        ),
    ];
    let mut cases = cases;
    for header in [
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "proxy-x",
    ] {
        cases.push((
            json!({"profile": "generic", "base_url": url, "credential": "tok_123456",
                   "prices": serde_json::from_str::<Value>(&GENERIC_RULES.replace("HEADER", header)).unwrap()}),
            "prices_json",
        ));
    }
    for (body, field) in cases {
        let r = stack.admin.put_json("/vault/vendors/other", &body).await;
        let e = r.expect_error(400, "invalid_request");
        assert_eq!(e["field"], field, "{body}: {e}");
    }
    // An update that keeps the stored credential must still fit it: a
    // Stripe key is no Twilio ACCOUNT_SID:AUTH_TOKEN.
    let r = stack
        .admin
        .put_json(
            "/vault/vendors/stripe",
            &json!({"profile": "twilio", "base_url": url}),
        )
        .await;
    assert_eq!(
        r.expect_error(400, "invalid_request")["field"],
        "credential"
    );
    assert!(!r.text.contains(STRIPE_CREDENTIAL), "{}", r.text);
    // The shared rules still accept what proxies serve.
    let ok = json!({"profile": "generic", "base_url": url, "credential": "tok_123456",
        "prices": serde_json::from_str::<Value>(&GENERIC_RULES.replace("HEADER", "X-Token")).unwrap()});
    stack.put_vendor("other", &ok).await;
}

/// Writes `value` straight into `column` of the stored vendor `name` and
/// logs the change, as a vendor stored before a rule existed (or by a
/// control plane with other flags) would be.
pub async fn store_behind_the_control_planes_back(
    stack: &Stack,
    name: &str,
    column: &str,
    value: &str,
) {
    let db = stack
        .control
        .database_dir()
        .expect("a SQLite stack")
        .join("keycap.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite:{}", db.display()))
        .await
        .expect("open the control plane's database");
    sqlx::query(&format!("UPDATE vendors SET {column} = ? WHERE name = ?"))
        .bind(value)
        .bind(name)
        .execute(&mut conn)
        .await
        .expect("update the vendor");
    sqlx::query("INSERT INTO change_log (kind, ref_id) VALUES ('vendor', ?)")
        .bind(name)
        .execute(&mut conn)
        .await
        .expect("log the change");
}

/// Waits until GET /vault/vendors/{name} shows a proxy's load error;
/// the vendor as read then.
pub async fn wait_proxy_errors(stack: &Stack, name: &str) -> Value {
    wait_for(within(POLICY_TIMEOUT), || async {
        let v = stack
            .admin
            .get(&format!("/vault/vendors/{name}"))
            .await
            .expect(200);
        (v["proxy_errors"].as_array().is_some_and(|e| !e.is_empty())).then_some(v)
    })
    .await
    .unwrap_or_else(|| panic!("no proxy's load error reached GET /vault/vendors/{name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vendor_a_proxy_cannot_load_is_shown_on_the_vendors_reads() {
    let (stack, _mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(5),
            &["POST /v1/payment_intents"],
            "load/1",
        ))
        .await;
    let fresh = stack.admin.get("/vault/vendors/stripe").await.expect(200);
    assert_eq!(fresh["proxy_errors"], json!([]));

    store_behind_the_control_planes_back(&stack, "stripe", "currency_rates", r#"{"usd":"2"}"#)
        .await;
    let shown = wait_proxy_errors(&stack, "stripe").await;
    let errors = shown["proxy_errors"].as_array().expect("array");
    assert_eq!(errors.len(), 1, "{shown}");
    assert_eq!(errors[0]["node_id"], "e2e-proxy");
    let why = errors[0]["error"].as_str().expect("error text");
    assert!(why.contains("usd"), "{why}");
    assert!(!why.contains(STRIPE_CREDENTIAL), "{why}");
    assert!(errors[0]["at"].as_str().is_some(), "{shown}");
    // The proxy refuses the vendor rather than serve an older version.
    dollar_charge(&stack.agent(&key.secret))
        .await
        .expect_error(404, "unknown_vendor");
    let listed = stack.admin.get("/vault/vendors").await.expect(200);
    assert_eq!(listed["vendors"][0]["proxy_errors"], shown["proxy_errors"]);

    // gRPC reads show the same.
    let mut grpc = pb::vendor_service_client::VendorServiceClient::connect(stack.control.url())
        .await
        .expect("gRPC connect");
    let mut req = tonic::Request::new(pb::GetVendorRequest {
        name: "stripe".into(),
    });
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", stack.control.opts.admin_token)
            .parse()
            .expect("metadata"),
    );
    let v = grpc
        .get_vendor(req)
        .await
        .expect("GetVendor")
        .into_inner()
        .vendor
        .expect("vendor");
    assert_eq!(v.proxy_errors.len(), 1);
    assert_eq!(v.proxy_errors[0].node_id, "e2e-proxy");
    assert!(v.proxy_errors[0].error.contains("usd"));

    // Mended through the admin API: the proxy serves it and says so.
    stack
        .put_vendor(
            "stripe",
            &json!({"profile": "stripe", "base_url": _mock.url(), "currency_rates": {"eur": "1.08"}}),
        )
        .await;
    let cleared = wait_for(within(POLICY_TIMEOUT), || async {
        let v = stack.admin.get("/vault/vendors/stripe").await.expect(200);
        (v["proxy_errors"] == json!([])).then_some(v)
    })
    .await;
    assert!(cleared.is_some(), "the load error was never cleared");
    dollar_charge(&stack.agent(&key.secret)).await.expect(200);
}
