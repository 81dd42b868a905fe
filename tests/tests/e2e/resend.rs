//! The Resend profile end to end: emails are priced per recipient from the
//! shipped unit price before they leave, a batch is the sum of its emails,
//! and an email keycap cannot count never reaches Resend. Included from
//! `e2e.rs`.

use keycap_tests::harness::Stack;
use keycap_tests::mock::MockVendor;
use serde_json::{json, Value};

use super::{assert_mock_never_saw, usd_micros};

const RESEND_CREDENTIAL: &str = "re_KeycapE2eRealResendCredentialDoNotLeak";

fn per_recipient() -> i64 {
    // Compiled in, so the test reads the table the proxy was built with.
    let table: Value =
        serde_json::from_str(include_str!("../../../vendors/prices/resend.json")).unwrap();
    usd_micros(table["per_recipient"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emails_cost_their_recipients_and_uncountable_ones_stay_home() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(RESEND_CREDENTIAL).await;
    stack.register("resend", "resend", &mock).await;
    let key = stack
        .mint(&json!({
            "vendor": "resend",
            "daily_usd_cap": 1,
            "allowed_endpoints": ["POST /emails", "POST /emails/batch"],
            "expires_in": "1h",
            "agent_run_label": "resend/1",
        }))
        .await;
    let agent = stack.agent(&key.secret);
    let unit = per_recipient();

    let email = json!({
        "from": "agent@example.com",
        "to": ["a@example.com", "b@example.com"],
        "cc": "c@example.com",
        "subject": "Your invoice",
        "html": "<p>Attached.</p>",
    });
    agent.post_json("/resend/emails", &email).await.expect(200);
    assert_eq!(
        mock.calls()[0].authorization(),
        Some(format!("Bearer {RESEND_CREDENTIAL}").as_str())
    );
    stack.wait_key_spend(&key.id, 3 * unit, 1).await;
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 1).await;
    assert_eq!(entries[0]["detail"]["recipients"], 3, "{}", entries[0]);

    let batch = json!([
        {"from": "agent@example.com", "to": "d@example.com", "subject": "1"},
        {"from": "agent@example.com", "to": "e@example.com", "bcc": ["f@example.com"], "subject": "2"},
    ]);
    let body = agent
        .post_json("/resend/emails/batch", &batch)
        .await
        .expect(200);
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2));
    stack.wait_key_spend(&key.id, 6 * unit, 2).await;

    let no_recipient = json!({"from": "agent@example.com", "subject": "x"});
    agent
        .post_json("/resend/emails", &no_recipient)
        .await
        .expect_error(400, "unpriceable_request");
    assert_eq!(mock.calls().len(), 2, "the uncountable email was forwarded");
    assert_mock_never_saw(&mock, &key.secret);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_price_set_through_the_admin_api_replaces_the_shipped_one() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(RESEND_CREDENTIAL).await;
    let vendor = |prices: Value| {
        json!({
            "profile": "resend",
            "base_url": mock.url(),
            "credential": mock.credential(),
            "prices": prices,
        })
    };

    // A table the profile cannot read is refused, naming the problem, and
    // nothing is stored.
    for (bad, says) in [
        (
            json!({"as_of": "2026-11-20", "currency": "usd", "per_recipient": "0"}),
            "per_recipient",
        ),
        (
            json!({"as_of": "2026-11-20", "currency": "eur", "per_recipient": "1"}),
            "usd",
        ),
        (json!({"per_recipient": 0.25}), "not valid"),
    ] {
        let r = stack
            .admin
            .put_json("/vault/vendors/resend", &vendor(bad))
            .await;
        let err = r.expect_error(400, "invalid_request");
        assert!(err.to_string().contains(says), "{err}");
    }
    let stripe_with_prices = json!({
        "profile": "stripe", "base_url": mock.url(), "credential": mock.credential(),
        "prices": {"as_of": "2026-11-20", "currency": "usd", "per_recipient": "1"},
    });
    stack
        .admin
        .put_json("/vault/vendors/stripe", &stripe_with_prices)
        .await
        .expect_error(400, "invalid_request");
    assert_eq!(
        stack.admin.get("/vault/vendors").await.expect(200),
        json!({"vendors": []})
    );

    let table = json!({"as_of": "2026-11-20", "currency": "usd", "per_recipient": "0.25"});
    let stored = stack.put_vendor("resend", &vendor(table.clone())).await;
    assert_eq!(stored["prices"], table);
    let key = stack
        .mint(&json!({
            "vendor": "resend",
            "daily_usd_cap": 1,
            "allowed_endpoints": ["POST /emails"],
            "expires_in": "1h",
            "agent_run_label": "resend/prices",
        }))
        .await;
    let agent = stack.agent(&key.secret);
    let email = json!({
        "from": "agent@example.com",
        "to": ["a@example.com", "b@example.com"],
        "subject": "Priced by the operator",
    });
    agent.post_json("/resend/emails", &email).await.expect(200);
    stack.wait_key_spend(&key.id, 500_000, 1).await;

    // Five recipients at the operator's price (1.25) exceed the 1 USD cap:
    // refused before anything leaves.
    let five = json!({
        "from": "agent@example.com",
        "to": ["a@example.com", "b@example.com", "c@example.com", "d@example.com", "e@example.com"],
        "subject": "Too dear",
    });
    agent
        .post_json("/resend/emails", &five)
        .await
        .expect_error(429, "daily_cap_exceeded");
    assert_eq!(mock.calls().len(), 1);
}
