//! What the proxy tells the agent about each call in its answer's headers
//! (`Keycap-Call-Id`, `Keycap-Cost-USD`, `Keycap-Remaining-USD`), and the
//! agent's `Keycap-Context`: read, bounded, refused when malformed, and
//! never forwarded. Included from `e2e.rs`.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_name_the_call_its_cost_and_what_the_key_has_left() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(json!(10), &["POST /v1/*"], "headers/1"))
        .await;
    let agent = stack.agent(&key.secret);

    let paid = agent
        .send(
            reqwest::Method::POST,
            "/stripe/v1/payment_intents",
            Some((
                "application/x-www-form-urlencoded",
                b"amount=100&currency=usd&confirm=true".to_vec(),
            )),
            &[
                (
                    "keycap-context",
                    "step=charge-customer, tool_call_id=call_abc",
                ),
                ("keycap-context", "reasoning_id=r_42"),
            ],
        )
        .await;
    assert_eq!(paid.status, 200, "{}", paid.text);
    assert_eq!(paid.header("keycap-cost-usd"), Some("1"));
    // The proxy holds part of the $10 as its lease; what it knows is left
    // is at most the $9 the key has after this call.
    let remaining: f64 = paid
        .header("keycap-remaining-usd")
        .expect("Keycap-Remaining-USD on a settled call")
        .parse()
        .expect("decimal dollars");
    assert!((0.0..=9.0).contains(&remaining), "{remaining}");
    let call_id = paid.header("keycap-call-id").expect("Keycap-Call-Id");
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 1).await;
    assert_eq!(entries[0]["event_id"], call_id, "{entries:?}");
    // The context is keycap's, not the vendor's.
    let sent = mock.calls();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].header("keycap-context"), None);

    // A refusal names its call too, each call its own.
    let refused = agent
        .send(
            reqwest::Method::DELETE,
            "/stripe/v1/customers/cus_1",
            None,
            &[],
        )
        .await;
    refused.expect_error(403, "endpoint_not_allowed");
    let refused_id = refused.header("keycap-call-id").expect("Keycap-Call-Id");
    assert_ne!(refused_id, call_id);
    assert_eq!(refused.header("keycap-cost-usd"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_context_is_refused_in_the_vendors_envelope_and_never_leaves() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(json!(10), &["POST /v1/*"], "headers/2"))
        .await;
    let agent = stack.agent(&key.secret);
    let too_many: Vec<String> = (0..17).map(|i| format!("k{i}=v")).collect();
    let too_many = too_many.join(",");
    for (context, says) in [
        ("step", "key=value pairs"),
        ("step=a b", "visible ASCII"),
        ("9lives=x", "starting with a letter"),
        ("a=1,a=2", "names \"a\" twice"),
        (too_many.as_str(), "more than 16 pairs"),
    ] {
        let r = agent
            .send(
                reqwest::Method::POST,
                "/stripe/v1/payment_intents",
                Some((
                    "application/x-www-form-urlencoded",
                    b"amount=100&currency=usd&confirm=true".to_vec(),
                )),
                &[("keycap-context", context)],
            )
            .await;
        // Stripe's envelope: keycap's code at error.code.
        let body = r.json();
        assert_eq!(r.status, 400, "{context}: {}", r.text);
        assert_eq!(body["error"]["code"], "invalid_context", "{body}");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{context}: {message}");
        assert!(r.header("keycap-call-id").is_some());
    }
    assert!(mock.calls().is_empty(), "a refused call reached the vendor");
    let key = stack.key(&key.id).await;
    assert_eq!(key["spent_today_usd"].as_f64(), Some(0.0), "{key}");
}
