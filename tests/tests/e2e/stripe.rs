//! Stripe end to end: money counts once, at the call that moves it.
//! Confirming an existing payment intent and paying an invoice are priced
//! from the object read from Stripe first; a checkout session costs its
//! line items; captures and refunds cost nothing; a retried request with the
//! same Idempotency-Key is reserved once and never counted twice; writes
//! keycap does not price never leave. Included from `e2e.rs`.

use keycap_tests::harness::{Api, ControlOpts, ProxyOpts, Resp, Stack};
use keycap_tests::mock::{MockVendor, Scripted, LOSE_FIRST_ANSWER};
use serde_json::json;

use super::{assert_mock_never_saw, stack_with_stripe, stripe_key_body};

const FORM: &str = "application/x-www-form-urlencoded";

async fn mint(
    stack: &Stack,
    cap: i64,
    endpoints: &[&str],
    label: &str,
) -> keycap_tests::harness::MintedKey {
    stack
        .mint(&stripe_key_body(json!(cap), endpoints, label))
        .await
}

fn paths(mock: &MockVendor) -> Vec<String> {
    mock.calls()
        .iter()
        .map(|c| format!("{} {}", c.method, c.path))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_intent_counts_once_when_it_is_confirmed() {
    let (stack, mock) = stack_with_stripe().await;
    let key = mint(
        &stack,
        100,
        &["POST /v1/payment_intents", "POST /v1/payment_intents/*"],
        "stripe/intents",
    )
    .await;
    let agent = stack.agent(&key.secret);

    // Created unconfirmed: reserved, but nothing moved, so nothing spent.
    let pi = agent
        .post_form("/stripe/v1/payment_intents", "amount=2500&currency=usd")
        .await
        .expect(200);
    assert_eq!(pi["status"], "requires_payment_method");
    let id = pi["id"].as_str().unwrap().to_string();
    stack.wait_key_spend(&key.id, 0, 1).await;

    // Confirmed through keycap: priced from the intent read from Stripe.
    let confirmed = agent
        .post_form(
            &format!("/stripe/v1/payment_intents/{id}/confirm"),
            "payment_method=pm_card_visa",
        )
        .await
        .expect(200);
    assert_eq!(confirmed["status"], "succeeded");
    stack.wait_key_spend(&key.id, 25_000_000, 2).await;
    let calls = mock.calls();
    let lookup = &calls[1];
    assert_eq!(
        (lookup.method.as_str(), lookup.path.as_str()),
        ("GET", format!("/v1/payment_intents/{id}").as_str())
    );
    assert_eq!(
        lookup.authorization(),
        Some(format!("Bearer {}", mock.credential()).as_str())
    );

    // Confirming it again: Stripe refuses, the reservation is released.
    agent
        .post_form(&format!("/stripe/v1/payment_intents/{id}/confirm"), "")
        .await
        .expect(400);
    stack.wait_key_spend(&key.id, 25_000_000, 3).await;

    // An authorization counts when it is made; its capture costs nothing.
    let auth = agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=1000&currency=usd&confirm=true&capture_method=manual",
        )
        .await
        .expect(200);
    assert_eq!(auth["status"], "requires_capture");
    let auth_id = auth["id"].as_str().unwrap();
    agent
        .post_form(&format!("/stripe/v1/payment_intents/{auth_id}/capture"), "")
        .await
        .expect(200);
    stack.wait_key_spend(&key.id, 35_000_000, 5).await;
    assert_eq!(mock.forwarded_stripe_amount(), 3500);

    // An intent Stripe does not know is refused before anything is sent.
    let before = mock.calls().len();
    agent
        .post_form("/stripe/v1/payment_intents/pi_missing/confirm", "")
        .await
        .expect_error(400, "unpriceable_request");
    let after = paths(&mock);
    assert_eq!(after.len(), before + 1, "only the lookup: {after:?}");
    assert_eq!(after[before], "GET /v1/payment_intents/pi_missing");
    assert_mock_never_saw(&mock, &key.secret);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invoices_checkout_sessions_and_refunds() {
    let (stack, mock) = stack_with_stripe().await;
    let key = mint(
        &stack,
        100,
        &[
            "POST /v1/invoices/*",
            "POST /v1/checkout/sessions",
            "POST /v1/refunds",
            "POST /v1/transfers",
        ],
        "stripe/billing",
    )
    .await;
    let agent = stack.agent(&key.secret);

    let invoice = mock.add_invoice(1234, "usd");
    let paid = agent
        .post_form(&format!("/stripe/v1/invoices/{invoice}/pay"), "")
        .await
        .expect(200);
    assert_eq!(paid["status"], "paid");
    stack.wait_key_spend(&key.id, 12_340_000, 1).await;

    let price = mock.add_price(250, "usd");
    let session = format!(
        "mode=payment&success_url=https%3A%2F%2Fexample.com%2Fdone\
         &line_items[0][price_data][currency]=usd&line_items[0][price_data][unit_amount]=1500\
         &line_items[0][price_data][product_data][name]=Shirt&line_items[0][quantity]=3\
         &line_items[1][price]={price}&line_items[1][quantity]=2"
    );
    let cs = agent
        .post_form("/stripe/v1/checkout/sessions", &session)
        .await
        .expect(200);
    assert_eq!(cs["amount_total"], 5000);
    stack.wait_key_spend(&key.id, 62_340_000, 2).await;

    agent
        .post_form("/stripe/v1/refunds", "payment_intent=pi_x&amount=500")
        .await
        .expect(200);
    stack.wait_key_spend(&key.id, 62_340_000, 3).await;
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 3).await;
    let refund = entries.iter().find(|e| e["path"] == "/v1/refunds").unwrap();
    assert_eq!(refund["cost_micros"], 0, "{refund}");

    // Moving money keycap does not price never leaves.
    let before = mock.calls().len();
    agent
        .post_form(
            "/stripe/v1/transfers",
            "amount=100&currency=usd&destination=acct_1",
        )
        .await
        .expect_error(400, "unpriceable_request");
    assert_eq!(mock.calls().len(), before);
    assert_eq!(mock.forwarded_stripe_amount(), 1234 + 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_idempotent_request_is_reserved_once_and_counted_once() {
    let (stack, mock) = stack_with_stripe().await;
    // 15 USD: a second reservation of the 10 USD charge would not fit.
    let key = mint(&stack, 15, &["POST /v1/charges"], "stripe/idem").await;
    let agent = stack.agent(&key.secret);
    let charge = |idem: &'static str| {
        let agent = agent.clone();
        async move {
            agent
                .send(
                    reqwest::Method::POST,
                    "/stripe/v1/charges",
                    Some((FORM, b"amount=1000&currency=usd&source=tok_visa".to_vec())),
                    &[("idempotency-key", idem)],
                )
                .await
        }
    };
    let first = charge("order-42").await;
    assert_eq!(first.status, 200, "{}", first.text);
    stack.wait_key_spend(&key.id, 10_000_000, 1).await;

    let retry = charge("order-42").await;
    assert_eq!(retry.status, 200, "{}", retry.text);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.json()["id"], first.json()["id"]);
    stack.wait_key_spend(&key.id, 10_000_000, 2).await;
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 2).await;
    let again = &entries[0];
    assert_eq!(again["reserved_micros"], 0, "{again}");
    assert_eq!(again["cost_micros"], 0, "{again}");
    assert_eq!(again["detail"]["idempotent_retry"], true, "{again}");

    // The key reached Stripe both times; Stripe charged once.
    let calls = mock.calls();
    assert_eq!(calls.len(), 2);
    assert!(calls
        .iter()
        .all(|c| c.header("idempotency-key") == Some("order-42")));
    assert_eq!(mock.forwarded_stripe_amount(), 1000);

    // A different key is a different charge, and no longer fits the cap.
    charge("order-43")
        .await
        .expect_error(429, "daily_cap_exceeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priced_calls_ask_for_a_response_keycap_can_read() {
    let (stack, mock) = stack_with_stripe().await;
    let key = mint(
        &stack,
        100,
        &[
            "POST /v1/payment_intents",
            "POST /v1/payment_intents/*",
            "GET /v1/customers/*",
        ],
        "stripe/encoding",
    )
    .await;
    let agent = stack.agent(&key.secret);
    let gzip = [("accept-encoding", "gzip, deflate")];
    let pi = agent
        .send(
            reqwest::Method::POST,
            "/stripe/v1/payment_intents",
            Some((FORM, b"amount=100&currency=usd".to_vec())),
            &gzip,
        )
        .await;
    assert_eq!(pi.status, 200, "{}", pi.text);
    let id = pi.json()["id"].as_str().unwrap().to_string();
    agent
        .send(
            reqwest::Method::POST,
            &format!("/stripe/v1/payment_intents/{id}/confirm"),
            Some((FORM, b"".to_vec())),
            &gzip,
        )
        .await;
    agent
        .send(
            reqwest::Method::GET,
            "/stripe/v1/customers/cus_1",
            None,
            &gzip,
        )
        .await;
    let calls = mock.calls();
    let seen: Vec<(String, Option<&str>)> = calls
        .iter()
        .map(|c| {
            (
                format!("{} {}", c.method, c.path),
                c.header("accept-encoding"),
            )
        })
        .collect();
    // A compressed answer could not be settled from, nor checked for the
    // credential: every forwarded call asks for identity, free ones too;
    // the lookup before a confirm asks for no coding at all.
    assert_eq!(seen.len(), 4, "{seen:?}");
    for (call, enc) in &seen {
        let want = if call.starts_with("GET /v1/payment_intents/") {
            None
        } else {
            Some("identity")
        };
        assert_eq!(*enc, want, "{call}");
    }
    stack.wait_key_spend(&key.id, 1_000_000, 3).await;
}

/// A proxy that gives a vendor one second, and the Stripe mock registered
/// as `stripe`.
async fn stack_with_a_one_second_stripe() -> (Stack, MockVendor) {
    let stack = Stack::start_with_proxy(
        ControlOpts::sqlite(),
        ProxyOpts::new("impatient").flag("upstream-timeout-secs", 1),
    )
    .await;
    let mock = MockVendor::start(super::STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    (stack, mock)
}

/// Sends a payment intent under Idempotency-Key `idem`.
async fn intent(agent: &Api, idem: &str, body: &str) -> Resp {
    agent
        .send(
            reqwest::Method::POST,
            "/stripe/v1/payment_intents",
            Some((FORM, body.as_bytes().to_vec())),
            &[("idempotency-key", idem)],
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_a_timed_out_answer_rides_on_the_first_calls_charge() {
    let (stack, mock) = stack_with_a_one_second_stripe().await;
    // 30 USD: the 25 USD intent fits once, never twice.
    let key = mint(&stack, 30, &["POST /v1/payment_intents"], "stripe/lost").await;
    let agent = stack.agent(&key.secret);
    let body = format!("amount=2500&currency=usd&confirm=true&description={LOSE_FIRST_ANSWER}");

    // Stripe makes the intent but its answer comes too late: the call may
    // have been charged, so it counts at its reservation.
    intent(&agent, "order-7", &body)
        .await
        .expect_error(504, "upstream_timeout");
    stack.wait_key_spend(&key.id, 25_000_000, 1).await;

    // The retry is forwarded with nothing reserved and Stripe replays the
    // intent: the agent learns its id, and it is counted once.
    let retry = intent(&agent, "order-7", &body).await;
    assert_eq!(retry.status, 200, "{}", retry.text);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(retry.json()["status"], "succeeded");
    stack.wait_key_spend(&key.id, 25_000_000, 2).await;
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 2).await;
    let (again, first) = (&entries[0], &entries[1]);
    assert_eq!(first["outcome"], "settled_at_reservation", "{first}");
    assert_eq!(again["reserved_micros"], 0, "{again}");
    assert_eq!(again["cost_micros"], 0, "{again}");
    assert_eq!(again["detail"]["idempotent_retry"], true, "{again}");
    assert_eq!(mock.forwarded_stripe_amount(), 2500);

    // Another request under the same key is not the same call: priced
    // again, it no longer fits, and never reaches Stripe.
    let other = body.replace("amount=2500", "amount=2600");
    intent(&agent, "order-7", &other)
        .await
        .expect_error(429, "daily_cap_exceeded");
    assert_eq!(mock.payment_intent_amounts(), [2500, 2500]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_stripe_runs_in_place_of_a_lost_first_call_counts_once() {
    let (stack, mock) = stack_with_a_one_second_stripe().await;
    let key = mint(&stack, 30, &["POST /v1/payment_intents"], "stripe/unread").await;
    let agent = stack.agent(&key.secret);
    let body = "amount=2500&currency=usd&confirm=true";

    // An answer keycap cannot read: the outcome is unknown, so the call
    // counts at its reservation (and this one never reached Stripe).
    mock.script_once(
        "/v1/payment_intents",
        Scripted {
            status: 200,
            headers: vec![("content-type".into(), "text/html".into())],
            body: "<html>gateway</html>".into(),
        },
    );
    let first = intent(&agent, "order-8", body).await;
    assert_eq!(first.status, 200, "{}", first.text);
    stack.wait_key_spend(&key.id, 25_000_000, 1).await;
    assert_eq!(mock.forwarded_stripe_amount(), 0);

    // Stripe runs the retry as the first time: one charge, already counted.
    let retry = intent(&agent, "order-8", body).await;
    assert_eq!(retry.status, 200, "{}", retry.text);
    assert_eq!(retry.header("idempotent-replayed"), None);
    assert_eq!(retry.json()["status"], "succeeded");
    stack.wait_key_spend(&key.id, 25_000_000, 2).await;
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 2).await;
    assert_eq!(entries[0]["cost_micros"], 0, "{}", entries[0]);
    assert!(entries[0]["detail"].get("exceeded_reservation").is_none());
    assert_eq!(mock.forwarded_stripe_amount(), 2500);
}
