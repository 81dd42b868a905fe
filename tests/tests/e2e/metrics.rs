//! The proxy's Prometheus metrics, on their own listener.

use keycap_tests::harness::{free_port, ProxyOpts};

use super::*;

/// The value of one sample (`name{labels}`) in a text exposition, 0 when
/// absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().expect("a number"))
}

async fn scrape(port: u16) -> String {
    let r = Api::new(&format!("http://127.0.0.1:{port}"), None)
        .get("/metrics")
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.text.ends_with("# EOF\n"), "{}", r.text);
    r.text
}

#[tokio::test]
async fn proxy_metrics_count_calls_by_outcome_and_spend_by_vendor() {
    let port = free_port();
    let stack = Stack::start_with_proxy(
        ControlOpts::sqlite(),
        ProxyOpts::new("metrics-proxy").flag("metrics-listen", format!("127.0.0.1:{port}")),
    )
    .await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "metrics/1",
        ))
        .await;
    // Metrics are not served to agents.
    let r = stack.agent(&key.secret).get("/metrics").await;
    assert_ne!(r.status, 200, "{}", r.text);

    let forwarded = r#"keycap_proxy_requests_total{outcome="forwarded"}"#;
    let invalid = r#"keycap_proxy_requests_total{outcome="invalid_key"}"#;
    let micros = r#"keycap_proxy_settled_micros_total{vendor="stripe"}"#;
    let settled = r#"keycap_proxy_calls_settled_total{vendor="stripe"}"#;
    let before = scrape(port).await;
    let agent = stack.agent(&key.secret);
    for amount in [100, 250] {
        let r = agent
            .post_form(
                "/stripe/v1/payment_intents",
                &format!("amount={amount}&currency=usd&confirm=true"),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    let r = Api::new(&stack.proxy.url(), Some("kc_live_nope"))
        .post_form("/stripe/v1/payment_intents", "amount=1&currency=usd")
        .await;
    assert_eq!(r.status, 401);
    let after = wait_for(within(SPEND_TIMEOUT), || async {
        let t = scrape(port).await;
        (sample(&t, settled) - sample(&before, settled) == 2.0).then_some(t)
    })
    .await
    .expect("two settled calls in the metrics");
    assert_eq!(
        sample(&after, forwarded) - sample(&before, forwarded),
        2.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, invalid) - sample(&before, invalid),
        1.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, micros) - sample(&before, micros),
        3_500_000.0,
        "{after}"
    );
    assert!(
        sample(&after, "keycap_proxy_policy_version") >= 1.0,
        "{after}"
    );
}
