//! Where vendor calls may go: without the control plane's
//! `--allow-private-upstreams`, a vendor's base URL is `https://` to a
//! public address, checked when it is registered (resolving its host) and
//! again by the proxy on the address it connects to. Included from
//! `e2e.rs`.

use keycap_tests::harness::{wait_for, within, ControlOpts, POLICY_TIMEOUT};

use super::vendor_config::{store_behind_the_control_planes_back, wait_proxy_errors};
use super::*;

/// An address the control plane takes as public; nothing is sent to it.
const PUBLIC_BASE_URL: &str = "https://93.184.216.34";

/// Registers vendor `stripe` at `PUBLIC_BASE_URL`.
async fn register_public_stripe(stack: &Stack) {
    stack
        .put_vendor(
            "stripe",
            &json!({"profile": "stripe", "base_url": PUBLIC_BASE_URL,
                    "credential": STRIPE_CREDENTIAL}),
        )
        .await;
}

/// A control plane without the opt-in, and a proxy.
async fn public_only_stack() -> Stack {
    let mut opts = ControlOpts::sqlite();
    opts.allow_private_upstreams = false;
    Stack::start_with(opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_urls_are_public_https_unless_the_control_plane_opts_in() {
    let stack = public_only_stack().await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    for base_url in [
        // The mock itself: plain http on loopback.
        mock.url(),
        "http://api.example.com".to_string(),
        "https://169.254.169.254".to_string(),
        "https://169.254.169.254/latest/meta-data".to_string(),
        "https://127.0.0.1:8443".to_string(),
        "https://[::1]".to_string(),
        "https://[::ffff:169.254.169.254]".to_string(),
        "https://10.1.2.3".to_string(),
        "https://192.168.0.10".to_string(),
        "https://100.64.0.1".to_string(),
        "https://[fe80::1]".to_string(),
        "https://[fd00::1]".to_string(),
        "https://0.0.0.0".to_string(),
        // A name is resolved: localhost is loopback.
        "https://localhost:8443".to_string(),
    ] {
        let body =
            json!({"profile": "stripe", "base_url": base_url, "credential": STRIPE_CREDENTIAL});
        let r = stack.admin.put_json("/vault/vendors/stripe", &body).await;
        let e = r.expect_error(400, "invalid_request");
        assert_eq!(e["field"], "base_url", "{base_url}: {e}");
    }
    // A public address is accepted (nothing is sent to it here).
    register_public_stripe(&stack).await;
    assert_eq!(mock.calls().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_checks_the_address_it_connects_to() {
    let stack = public_only_stack().await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    register_public_stripe(&stack).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(1),
            &["POST /v1/payment_intents"],
            "upstream/1",
        ))
        .await;
    let port = mock.url().rsplit(':').next().expect("port").to_string();

    // The name now resolves to loopback (as a DNS answer may change after
    // registration): every call is refused before a connection is made,
    // and its reservation released, so the $1 cap allows the next one too.
    store_behind_the_control_planes_back(
        &stack,
        "stripe",
        "base_url",
        &format!("https://localhost:{port}"),
    )
    .await;
    let agent = stack.agent(&key.secret);
    let refused = wait_for(within(POLICY_TIMEOUT), || async {
        let r = dollar_charge(&agent).await;
        (r.error_code().as_deref() == Some("upstream_address_refused")).then_some(r)
    })
    .await
    .expect("the proxy never refused the loopback address");
    assert_eq!(refused.status, 502);
    assert!(!refused.text.contains("127.0.0.1"), "{}", refused.text);
    for _ in 0..3 {
        dollar_charge(&agent)
            .await
            .expect_error(502, "upstream_address_refused");
    }
    assert_eq!(mock.calls().len(), 0, "a call reached the vendor");
    assert_eq!(stack.key(&key.id).await["spent_today_micros"], 0);

    // An address written as the host is checked when the proxy loads the
    // vendor: it refuses the vendor and says why.
    store_behind_the_control_planes_back(
        &stack,
        "stripe",
        "base_url",
        &format!("https://127.0.0.1:{port}"),
    )
    .await;
    let shown = wait_proxy_errors(&stack, "stripe").await;
    let why = shown["proxy_errors"][0]["error"].as_str().expect("error");
    assert!(why.contains("allow-private-upstreams"), "{why}");
    dollar_charge(&agent)
        .await
        .expect_error(404, "unknown_vendor");
    assert_eq!(mock.calls().len(), 0, "a call reached the vendor");
}
