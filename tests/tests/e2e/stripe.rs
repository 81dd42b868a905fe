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

/// Every call the mock received, as `METHOD /path?query`.
fn seen(mock: &MockVendor) -> Vec<String> {
    mock.calls()
        .iter()
        .map(|c| match &c.query {
            Some(q) => format!("{} {}?{q}", c.method, c.path),
            None => format!("{} {}", c.method, c.path),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_are_refused_by_every_path_that_reaches_them() {
    let (stack, mock) = stack_with_stripe().await;
    let key = mint(
        &stack,
        1,
        &[
            "POST /v1/customers/*",
            "DELETE /v1/customers/*",
            "POST /v1/subscriptions/*",
        ],
        "stripe/subscriptions",
    )
    .await;
    let agent = stack.agent(&key.secret);
    let price = mock.add_price(500_000, "usd");
    // Creating one through the customer creates it and charges its first
    // invoice; updating with always_invoice and canceling with invoice_now
    // charge at once.
    let create = agent
        .post_form(
            "/stripe/v1/customers/cus_1/subscriptions",
            &format!("items[0][price]={price}"),
        )
        .await;
    create.expect_error(400, "unpriceable_request");
    assert!(create.text.contains("subscription"), "{}", create.text);
    agent
        .post_form(
            "/stripe/v1/customers/cus_1/subscriptions/sub_1",
            "proration_behavior=always_invoice",
        )
        .await
        .expect_error(400, "unpriceable_request");
    agent
        .post_form(
            "/stripe/v1/customers/cus_1/subscriptions/sub_1?proration_behavior=always_invoice",
            "",
        )
        .await
        .expect_error(400, "unpriceable_request");
    agent
        .delete("/stripe/v1/customers/cus_1/subscriptions/sub_1?invoice_now=true")
        .await
        .expect_error(400, "unpriceable_request");
    agent
        .delete("/stripe/v1/customers/cus_1/subscriptions/sub_1/discount")
        .await
        .expect_error(400, "unpriceable_request");
    agent
        .post_form(
            "/stripe/v1/subscriptions/sub_1",
            "proration_behavior=always_invoice",
        )
        .await
        .expect_error(400, "unpriceable_request");
    assert_eq!(seen(&mock), Vec::<String>::new());
    assert_eq!(mock.forwarded_stripe_amount(), 0);

    // The customer itself is still a free write: it reaches Stripe (the
    // mock has no customer to delete).
    let r = agent.delete("/stripe/v1/customers/cus_1").await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(seen(&mock), ["DELETE /v1/customers/cus_1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_parameters_are_read_with_the_body() {
    let (stack, mock) = stack_with_stripe().await;
    let key = mint(
        &stack,
        1,
        &[
            "POST /v1/invoiceitems",
            "POST /v1/invoices",
            "POST /v1/invoices/*",
            "POST /v1/payment_intents",
            "POST /v1/payment_intents/*",
        ],
        "stripe/query",
    )
    .await;
    let agent = stack.agent(&key.secret);

    // A pending invoice item waits for the customer's next invoice, which
    // Stripe may charge on its own: refused, whether its amount is in the
    // body or the query.
    agent
        .post_form(
            "/stripe/v1/invoiceitems",
            "customer=cus_1&amount=5000000&currency=usd",
        )
        .await
        .expect_error(400, "unpriceable_request");
    agent
        .post_form(
            "/stripe/v1/invoiceitems?amount=5000000&currency=usd",
            "customer=cus_1",
        )
        .await
        .expect_error(400, "unpriceable_request");

    // A draft Stripe will not advance on its own is free; turning
    // auto_advance on from the query string is refused like from the body.
    let inv = agent
        .post_form("/stripe/v1/invoices", "customer=cus_1&auto_advance=false")
        .await
        .expect(200);
    let id = inv["id"].as_str().unwrap().to_string();
    for (path, body) in [
        (format!("/stripe/v1/invoices/{id}?auto_advance=true"), ""),
        (format!("/stripe/v1/invoices/{id}"), "auto_advance=true"),
    ] {
        agent
            .post_form(&path, body)
            .await
            .expect_error(400, "unpriceable_request");
    }
    assert_eq!(mock.invoice(&id).unwrap()["auto_advance"], false);

    // An item on that draft is free (the draft is read from Stripe first);
    // the invoice is charged only through /pay, which is priced: 5.00 is
    // over this key's 1 USD.
    agent
        .post_form(
            "/stripe/v1/invoiceitems",
            &format!("customer=cus_1&invoice={id}&amount=500&currency=usd"),
        )
        .await
        .expect(200);
    // Paying a draft is refused: a line added between keycap's read and
    // Stripe's payment would be charged unpriced. Finalizing it is free
    // only when Stripe will not collect it on its own.
    agent
        .post_form(&format!("/stripe/v1/invoices/{id}/pay"), "")
        .await
        .expect_error(400, "unpriceable_request");
    agent
        .post_form(&format!("/stripe/v1/invoices/{id}/finalize"), "")
        .await
        .expect_error(400, "unpriceable_request");
    agent
        .post_form(
            &format!("/stripe/v1/invoices/{id}/finalize?auto_advance=true"),
            "",
        )
        .await
        .expect_error(400, "unpriceable_request");
    agent
        .post_form(
            &format!("/stripe/v1/invoices/{id}/finalize"),
            "auto_advance=false",
        )
        .await
        .expect(200);
    assert_eq!(mock.invoice(&id).unwrap()["status"], "open");
    agent
        .post_form(&format!("/stripe/v1/invoices/{id}/pay"), "")
        .await
        .expect_error(429, "daily_cap_exceeded");

    // Changing an intent's amount between its read and its confirmation.
    let pi = agent
        .post_form("/stripe/v1/payment_intents", "amount=50&currency=usd")
        .await
        .expect(200);
    let pi = pi["id"].as_str().unwrap().to_string();
    agent
        .post_form(
            &format!("/stripe/v1/payment_intents/{pi}?amount=99999999"),
            "",
        )
        .await
        .expect_error(400, "unpriceable_request");
    assert_eq!(mock.payment_intent(&pi).unwrap()["amount"], 50);

    assert_eq!(
        seen(&mock),
        [
            "POST /v1/invoices".to_string(),
            format!("GET /v1/invoices/{id}"),
            "POST /v1/invoiceitems".to_string(),
            // The draft /pay was refused on what this read showed.
            format!("GET /v1/invoices/{id}"),
            format!("POST /v1/invoices/{id}/finalize"),
            // The open invoice's /pay, refused for the cap.
            format!("GET /v1/invoices/{id}"),
            "POST /v1/payment_intents".to_string(),
        ]
    );
    assert_eq!(mock.forwarded_stripe_amount(), 0);
    // Four calls reached Stripe (the draft, its item, its finalization and
    // the intent), each at no cost.
    stack.wait_key_spend(&key.id, 0, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_content_type_is_refused() {
    let (stack, mock) = stack_with_stripe().await;
    let key = mint(&stack, 5, &["POST /v1/charges"], "stripe/content-type").await;
    let agent = stack.agent(&key.secret);

    // JSON to the first Content-Type (1 cent), a form to the second
    // (1,000 USD).
    let body =
        br#"{"amount":1,"currency":"usd","metadata":{"x":"&amount=100000&currency=usd&y="}}"#;
    let r = post(
        &agent,
        "/stripe/v1/charges",
        FORM,
        body.to_vec(),
        &[("content-type", "application/json")],
    )
    .await;
    r.expect_error(400, "ambiguous_request");
    assert!(r.text.contains("Content-Type"), "{}", r.text);
    for content_type in [
        "application/json, application/x-www-form-urlencoded",
        "application/x-www-form-urlencoded; charset=utf-16",
    ] {
        post(
            &agent,
            "/stripe/v1/charges",
            content_type,
            b"amount=100&currency=usd".to_vec(),
            &[],
        )
        .await
        .expect_error(400, "ambiguous_request");
    }
    assert_eq!(seen(&mock), Vec::<String>::new());
    assert_eq!(mock.forwarded_stripe_amount(), 0);

    // One plain Content-Type is priced as before.
    post(
        &agent,
        "/stripe/v1/charges",
        "application/x-www-form-urlencoded; charset=utf-8",
        b"amount=100&currency=usd".to_vec(),
        &[],
    )
    .await
    .expect(200);
    stack.wait_key_spend(&key.id, 1_000_000, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoded_body_is_refused() {
    let (stack, mock) = stack_with_stripe().await;
    let key = mint(
        &stack,
        5,
        &[
            "POST /v1/charges",
            "POST /v1/invoices/*",
            "POST /v1/payment_intents/*",
        ],
        "stripe/encoding",
    )
    .await;
    let agent = stack.agent(&key.secret);

    // A gzip body: pricing would read noise, Stripe the parameters.
    let inv = mock.add_invoice(100_000, "usd");
    for (path, form) in [
        (format!("/stripe/v1/invoices/{inv}"), "auto_advance=true"),
        (
            "/stripe/v1/payment_intents/pi_1".to_string(),
            "amount=99999999",
        ),
        (
            "/stripe/v1/charges".to_string(),
            "amount=100000&currency=usd",
        ),
    ] {
        let r = post(
            &agent,
            &path,
            FORM,
            gzip(form.as_bytes()),
            &[("content-encoding", "gzip")],
        )
        .await;
        r.expect_error(400, "ambiguous_request");
    }
    // So are a transfer encoding of the body and a method override.
    for (name, value) in [
        ("content-transfer-encoding", "base64"),
        ("x-http-method-override", "DELETE"),
    ] {
        post(
            &agent,
            "/stripe/v1/charges",
            FORM,
            b"amount=100&currency=usd".to_vec(),
            &[(name, value)],
        )
        .await
        .expect_error(400, "ambiguous_request");
    }
    assert_eq!(seen(&mock), Vec::<String>::new());
    assert_eq!(mock.forwarded_stripe_amount(), 0);

    // `identity` is no coding at all.
    post(
        &agent,
        "/stripe/v1/charges",
        FORM,
        b"amount=100&currency=usd".to_vec(),
        &[("content-encoding", "identity")],
    )
    .await
    .expect(200);
    stack.wait_key_spend(&key.id, 1_000_000, 1).await;
}

/// POSTs `body` as `content_type` with `headers` (sent before the body's
/// Content-Type).
async fn post(
    agent: &Api,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Resp {
    agent
        .send(
            reqwest::Method::POST,
            path,
            Some((content_type, body)),
            headers,
        )
        .await
}

/// `data` as a gzip member of one stored (uncompressed) deflate block.
fn gzip(data: &[u8]) -> Vec<u8> {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    let len = u16::try_from(data.len()).expect("a short body");
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 1];
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&(!len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&(!crc).to_le_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_session_reserves_its_shipping_and_tax() {
    let (stack, mock) = stack_with_stripe().await;
    let key = mint(
        &stack,
        5,
        &["POST /v1/checkout/sessions"],
        "stripe/checkout",
    )
    .await;
    let agent = stack.agent(&key.secret);
    let item = "mode=payment&success_url=https%3A%2F%2Fexample.com\
        &line_items[0][price_data][currency]=usd&line_items[0][price_data][unit_amount]=100\
        &line_items[0][price_data][product_data][name]=Pen&line_items[0][quantity]=1";

    // One 1.00 item with 999,999.99 of shipping: over a 5 USD cap.
    let dear = format!(
        "{item}&shipping_options[0][shipping_rate_data][display_name]=Freight\
         &shipping_options[0][shipping_rate_data][type]=fixed_amount\
         &shipping_options[0][shipping_rate_data][fixed_amount][amount]=99999999\
         &shipping_options[0][shipping_rate_data][fixed_amount][currency]=usd"
    );
    agent
        .post_form("/stripe/v1/checkout/sessions", &dear)
        .await
        .expect_error(429, "daily_cap_exceeded");
    // Tax worked out later from the customer's address cannot be bounded.
    agent
        .post_form(
            "/stripe/v1/checkout/sessions",
            &format!("{item}&automatic_tax[enabled]=true"),
        )
        .await
        .expect_error(400, "unpriceable_request");
    assert_eq!(seen(&mock), Vec::<String>::new());

    // The customer picks one of two shipping options after the session is
    // made: the dearer (1.50, a Shipping Rate read from Stripe) is
    // reserved, and the session settles at that bound, not at the total
    // Stripe reports with the first option selected (2.00).
    let courier = mock.add_shipping_rate(150, "usd");
    let choice = format!(
        "{item}&shipping_options[0][shipping_rate_data][display_name]=Post\
         &shipping_options[0][shipping_rate_data][fixed_amount][amount]=100\
         &shipping_options[0][shipping_rate_data][fixed_amount][currency]=usd\
         &shipping_options[1][shipping_rate]={courier}"
    );
    let cs = agent
        .post_form("/stripe/v1/checkout/sessions", &choice)
        .await
        .expect(200);
    assert_eq!(cs["amount_total"], 200);
    stack.wait_key_spend(&key.id, 2_500_000, 1).await;

    // Exclusive tax of a tax rate read from Stripe: 1.00 + 10%.
    let tax = mock.add_tax_rate(10.0, false);
    let taxed = format!("{item}&line_items[0][tax_rates][0]={tax}");
    let cs = agent
        .post_form("/stripe/v1/checkout/sessions", &taxed)
        .await
        .expect(200);
    assert_eq!(cs["amount_total"], 110);
    stack.wait_key_spend(&key.id, 3_600_000, 2).await;
    assert_eq!(
        seen(&mock),
        [
            format!("GET /v1/shipping_rates/{courier}"),
            "POST /v1/checkout/sessions".to_string(),
            format!("GET /v1/tax_rates/{tax}"),
            "POST /v1/checkout/sessions".to_string(),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripes_v2_api_is_refused_as_a_whole() {
    let (stack, mock) = stack_with_stripe().await;
    let key = mint(&stack, 5, &["* /v2/*"], "stripe/v2").await;
    let agent = stack.agent(&key.secret);
    agent
        .get("/stripe/v2/core/events")
        .await
        .expect_error(400, "unpriceable_request");
    agent
        .send(
            reqwest::Method::POST,
            "/stripe/v2/core/accounts",
            Some(("application/json", br#"{"display_name":"x"}"#.to_vec())),
            &[],
        )
        .await
        .expect_error(400, "unpriceable_request");
    assert_eq!(seen(&mock), Vec::<String>::new());
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
    // Nor is the same request for another account (Stripe keeps keys per
    // account, and would charge it afresh): priced again, it no longer
    // fits. Naming two accounts is refused outright.
    let on = |headers: Vec<(&'static str, &'static str)>| {
        let agent = agent.clone();
        let body = body.clone();
        async move {
            let mut h = vec![("idempotency-key", "order-7")];
            h.extend(headers);
            agent
                .send(
                    reqwest::Method::POST,
                    "/stripe/v1/payment_intents",
                    Some((FORM, body.into_bytes())),
                    &h,
                )
                .await
        }
    };
    on(vec![("stripe-context", "acct_other")])
        .await
        .expect_error(429, "daily_cap_exceeded");
    on(vec![
        ("stripe-account", "acct_a"),
        ("stripe-account", "acct_b"),
    ])
    .await
    .expect_error(400, "unpriceable_request");
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
