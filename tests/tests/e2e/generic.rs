//! The generic profile end to end: an operator prices any HTTP API with
//! rules (a fixed cost, or a reservation and the cost the response states),
//! the credential goes in the header the rules name, a request no rule
//! matches never leaves, and a call that cost more than its reservation
//! tightens that rule for the calls after it. Included from `e2e.rs`.

use keycap_tests::harness::Stack;
use keycap_tests::mock::MockVendor;
use serde_json::json;

use super::assert_mock_never_saw;

const CREDENTIAL: &str = "gv_KeycapE2eRealGenericCredentialDoNotLeak";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_price_any_api_and_an_overrun_tightens_its_rule() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(CREDENTIAL).await;
    let rules = json!({
        "as_of": "2026-11-23",
        "currency": "usd",
        "credential_header": "x-vendor-key",
        "rules": [
            {"endpoint": "POST /generic/renders", "cost": {"fixed": "0.05"}},
            {"endpoint": "POST /generic/jobs/*", "reserve": "0.10",
             "cost": {"header": {"name": "x-request-cost", "unit": "usd"}}},
            {"endpoint": "POST /generic/generate", "reserve": "0.50",
             "cost": {"json_pointer": {"pointer": "/usage/cost", "unit": "usd"}}}
        ]
    });
    // A generic vendor without rules is refused.
    stack
        .admin
        .put_json(
            "/vault/vendors/render",
            &json!({"profile": "generic", "base_url": mock.url(), "credential": CREDENTIAL}),
        )
        .await
        .expect_error(400, "invalid_request");
    stack
        .put_vendor(
            "render",
            &json!({"profile": "generic", "base_url": mock.url(), "credential": CREDENTIAL,
                    "prices": rules}),
        )
        .await;
    let key = stack
        .mint(&json!({
            "vendor": "render",
            "daily_usd_cap": 5,
            "allowed_endpoints": ["POST /generic/*", "POST /generic/jobs/*", "POST /other"],
            "expires_in": "1h",
            "agent_run_label": "generic/1",
        }))
        .await;
    let agent = stack.agent(&key.secret);

    agent
        .post_json("/render/generic/renders", &json!({"scene": 1}))
        .await
        .expect(200);
    assert_eq!(mock.calls()[0].header("x-vendor-key"), Some(CREDENTIAL));
    assert_eq!(mock.calls()[0].authorization(), None);
    stack.wait_key_spend(&key.id, 50_000, 1).await;

    let job = |cost: &'static str| {
        let agent = agent.clone();
        async move {
            agent
                .send(
                    reqwest::Method::POST,
                    "/render/generic/jobs/j1",
                    Some(("application/json", b"{}".to_vec())),
                    &[("x-mock-cost", cost)],
                )
                .await
        }
    };
    // The response states 0.08: settled at that, under the 0.10 reserved.
    assert_eq!(job("0.08").await.status, 200);
    stack.wait_key_spend(&key.id, 130_000, 2).await;
    // It states 0.30: recorded at its true cost and flagged...
    assert_eq!(job("0.30").await.status, 200);
    stack.wait_key_spend(&key.id, 430_000, 3).await;
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 3).await;
    assert_eq!(entries[0]["reserved_micros"], 100_000, "{}", entries[0]);
    assert_eq!(entries[0]["cost_micros"], 300_000, "{}", entries[0]);
    assert_eq!(entries[0]["detail"]["exceeded_reservation"], true);
    // ...and the rule now reserves enough for it.
    assert_eq!(job("0.30").await.status, 200);
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 4).await;
    assert_eq!(entries[0]["reserved_micros"], 300_000, "{}", entries[0]);
    assert_eq!(entries[0]["detail"]["tightened_from_micros"], 100_000);
    assert!(entries[0]["detail"].get("exceeded_reservation").is_none());

    // A cost the response does not state settles at the reservation.
    agent
        .post_json("/render/generic/generate", &json!({}))
        .await
        .expect(200);
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 5).await;
    assert_eq!(
        entries[0]["outcome"], "settled_at_reservation",
        "{}",
        entries[0]
    );
    assert_eq!(entries[0]["cost_micros"], 500_000);

    // No rule matches: refused, never forwarded.
    let before = mock.calls().len();
    agent
        .post_json("/render/other", &json!({}))
        .await
        .expect_error(400, "unpriceable_request");
    assert_eq!(mock.calls().len(), before);
    assert_mock_never_saw(&mock, &key.secret);
}
