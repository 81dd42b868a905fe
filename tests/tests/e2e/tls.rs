//! TLS: the proxy's HTTPS listener, the proxy -> vendor connection checked
//! against system roots plus `--upstream-ca`, and mutual TLS between proxies
//! and the control plane (a proxy gets policy and leases only with a client
//! certificate naming its node id). Certificates come from a CA generated
//! for each test.

use std::path::Path;

use keycap_proto::pb::{self, fleet_service_client::FleetServiceClient};
use keycap_proto::tls::{client_config, Identity, Trust};
use keycap_tests::harness::{
    keycap_cli, wait_until, within, Control, ControlOpts, ControlTls, HttpVersion, Proxy,
    ProxyOpts, Readiness, Stack, POLICY_TIMEOUT,
};
use keycap_tests::mock::MockVendor;
use keycap_tests::pki::TestCa;
use serde_json::json;
use tonic::Code;

use super::{assert_mock_never_saw, assert_resp_lacks, stripe_key_body, STRIPE_CREDENTIAL};

/// Whether the process log at `log` contains `needle` (the logs are
/// written without colour).
fn log_has(log: &Path, needle: &str) -> bool {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_call_the_proxy_over_https_and_plain_http_is_refused() {
    let ca = TestCa::new("proxy-listener");
    let opts = ProxyOpts::new("https-proxy").serve_tls(&ca.server("proxy"), &ca.ca_pem());
    let stack = Stack::start_with_proxy(ControlOpts::sqlite(), opts).await;
    assert!(stack.proxy.url().starts_with("https://"));
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;

    // Plain HTTP to the TLS listener gets no HTTP answer at all, and the
    // failed handshake leaves the listener serving.
    let plain = format!("http://127.0.0.1:{}/healthz", stack.proxy.addr().port());
    let refused = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(&plain)
        .send()
        .await;
    assert!(refused.is_err(), "plain HTTP was answered: {refused:?}");
    // So does a client that does not trust the listener's certificate.
    let untrusting = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/healthz", stack.proxy.url()))
        .send()
        .await;
    assert!(untrusting.is_err(), "an untrusted certificate was accepted");

    let key = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/payment_intents"],
            "tls/1",
        ))
        .await;
    let r = stack
        .agent(&key.secret)
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=250&currency=usd&confirm=true",
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_resp_lacks(&r, STRIPE_CREDENTIAL);
    let calls = mock.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].authorization(),
        Some(format!("Bearer {STRIPE_CREDENTIAL}").as_str())
    );
    assert_mock_never_saw(&mock, &key.secret);
    stack.wait_key_spend(&key.id, 2_500_000, 1).await;

    // The admin relay works through the HTTPS listener too.
    let vendors = stack
        .admin_via_proxy()
        .get("/vault/vendors")
        .await
        .expect(200);
    assert!(vendors.to_string().contains("stripe"), "{vendors}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_negotiating_http2_by_alpn_are_served_with_the_same_checks() {
    let ca = TestCa::new("proxy-listener-h2");
    let opts = ProxyOpts::new("https-h2-proxy").serve_tls(&ca.server("proxy"), &ca.ca_pem());
    let stack = Stack::start_with_proxy(ControlOpts::sqlite(), opts).await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;

    // An ordinary TLS client offers h2 and http/1.1; the proxy picks h2.
    // The key is minted through the proxy's /vault relay on it.
    let key = stack
        .mint_via_proxy(
            HttpVersion::Http2,
            &stripe_key_body(json!(5), &["POST /v1/payment_intents"], "tls/h2"),
        )
        .await;
    let (id, secret) = (key.id, key.secret);

    let agent = stack.agent(&secret).speaking(HttpVersion::Http2);
    let r = agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=350&currency=usd&confirm=true",
        )
        .await;
    assert_eq!(r.version, reqwest::Version::HTTP_2);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_resp_lacks(&r, STRIPE_CREDENTIAL);
    assert_mock_never_saw(&mock, &secret);
    assert_eq!(mock.forwarded_stripe_amount(), 350);
    stack.wait_key_spend(&id, 3_500_000, 1).await;
    let entry = stack.wait_audit(&format!("key_id={id}"), 1).await.remove(0);
    assert_eq!(entry["cost_micros"], 3_500_000, "{entry}");

    // Refused as over HTTP/1.1: the cap, and a target leaving the vendor.
    for api in [agent.clone(), stack.agent(&secret)] {
        let over = api
            .post_form(
                "/stripe/v1/payment_intents",
                "amount=350&currency=usd&confirm=true",
            )
            .await;
        over.expect_error(429, "daily_cap_exceeded");
        let escape = api.get("/stripe/v1/customers/x%2f..%2fy").await;
        escape.expect_error(400, "invalid_target");
    }
    assert_eq!(mock.calls().len(), 1, "{:?}", mock.calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vendor_over_tls_is_trusted_only_through_upstream_ca() {
    let vendor_ca = TestCa::new("vendor");
    let mock = MockVendor::start_tls(STRIPE_CREDENTIAL, vendor_ca.server_config()).await;
    assert!(mock.url().starts_with("https://"));
    let opts = ProxyOpts::new("trusting-proxy").flag("upstream-ca", vendor_ca.ca_pem().display());
    let stack = Stack::start_with_proxy(ControlOpts::sqlite(), opts).await;
    stack.register("stripe", "stripe", &mock).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/payment_intents"],
            "tls/2",
        ))
        .await;

    // With --upstream-ca the vendor's certificate verifies.
    stack
        .agent(&key.secret)
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=300&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    assert_eq!(mock.calls().len(), 1);
    assert_eq!(mock.forwarded_stripe_amount(), 300);
    stack.wait_key_spend(&key.id, 3_000_000, 1).await;
    mock.reset();

    // A proxy trusting only the system's roots refuses the vendor's
    // certificate: 502, nothing reaches the vendor (so neither does the
    // credential), and the reservation is released. $6 twice under a $7
    // remainder would hit the cap on the second call if the first had
    // kept its reservation.
    let untrusting = Proxy::start(
        &stack.control.url(),
        &stack.control.opts.fleet_token,
        "untrusting-proxy",
    )
    .await;
    let agent = untrusting.api(Some(&key.secret));
    wait_until(within(POLICY_TIMEOUT), || async {
        agent
            .delete("/stripe/keycap-e2e-probe")
            .await
            .error_code()
            .as_deref()
            == Some(keycap_tests::harness::PROBE_LIVE)
    })
    .await;
    for _ in 0..2 {
        let r = agent
            .post_form(
                "/stripe/v1/payment_intents",
                "amount=600&currency=usd&confirm=true",
            )
            .await;
        let body = r.expect_error(502, "upstream_unreachable");
        assert_resp_lacks(&r, STRIPE_CREDENTIAL);
        assert!(!body.to_string().contains("127.0.0.1"), "{body}");
    }
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
    assert_eq!(mock.forwarded_stripe_amount(), 0);
}

/// A control plane serving TLS with `server_ca`'s certificate and asking
/// for client certificates from `client_ca`.
async fn mtls_control(server_ca: &TestCa, client_ca: &TestCa) -> Control {
    Control::start(ControlOpts::sqlite().tls(ControlTls {
        server: server_ca.server("control"),
        ca: server_ca.ca_pem(),
        client_ca: Some(client_ca.ca_pem()),
    }))
    .await
}

/// Options for a proxy that trusts `server_ca` for the control plane and
/// presents `client` (if any) as its identity.
fn fleet_proxy(
    node_id: &str,
    server_ca: &TestCa,
    client: Option<&keycap_tests::pki::CertFiles>,
) -> ProxyOpts {
    let opts = ProxyOpts::new(node_id).flag("control-ca", server_ca.ca_pem().display());
    match client {
        Some(c) => opts
            .flag("tls-client-cert", c.cert.display())
            .flag("tls-client-key", c.key.display()),
        None => opts,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_with_a_certificate_for_its_node_gets_policy_and_serves() {
    let server_ca = TestCa::new("control");
    let client_ca = TestCa::new("proxies");
    let control = mtls_control(&server_ca, &client_ca).await;
    assert!(control.url().starts_with("https://"));
    let node = "node-1.proxy.keycap";
    let proxy = Proxy::start_with(
        &control.url(),
        &control.opts.fleet_token,
        &fleet_proxy(node, &server_ca, Some(&client_ca.client(node))),
    )
    .await;
    let admin = control.admin();
    let stack = Stack {
        proxy,
        control,
        admin,
    };
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/payment_intents"],
            "mtls/1",
        ))
        .await;
    // A grant, the call, and its spend report all pass the identity check.
    stack
        .agent(&key.secret)
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=400&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    assert_eq!(mock.calls().len(), 1);
    stack.wait_key_spend(&key.id, 4_000_000, 1).await;
    // The `/vault` relay reaches the control plane over the same mutual TLS.
    stack
        .admin_via_proxy()
        .get(&format!("/vault/keys/{}", key.id))
        .await
        .expect(200);
    assert!(!log_has(
        stack.control.process().log_path(),
        "fleet call refused"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_without_a_matching_client_certificate_get_no_policy() {
    let server_ca = TestCa::new("control");
    let client_ca = TestCa::new("proxies");
    let other_ca = TestCa::new("stranger");
    let control = mtls_control(&server_ca, &client_ca).await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    let admin = control.admin();
    admin
        .put_json(
            "/vault/vendors/stripe",
            &json!({"profile": "stripe", "base_url": mock.url(), "credential": STRIPE_CREDENTIAL}),
        )
        .await
        .expect(201);
    let key = admin
        .post_json(
            "/vault/keys",
            &stripe_key_body(json!(10), &["POST /v1/payment_intents"], "mtls/2"),
        )
        .await
        .expect(201);
    let secret = key["key"].as_str().unwrap().to_string();

    // No client certificate: UNAUTHENTICATED. A certificate for another
    // node: PERMISSION_DENIED. Both hold the right fleet token.
    let stolen = client_ca.client("node-1.proxy.keycap");
    let cases = [
        (
            "node-2.proxy.keycap",
            None,
            "Unauthenticated",
            "no client certificate",
        ),
        (
            "node-3.proxy.keycap",
            Some(&stolen),
            "PermissionDenied",
            "client certificate names another node",
        ),
    ];
    for (node, cert, code, refusal) in cases {
        let proxy = Proxy::start_with(
            &control.url(),
            &control.opts.fleet_token,
            &fleet_proxy(node, &server_ca, cert).readiness(Readiness::Listening),
        )
        .await;
        let refused = wait_until(within(POLICY_TIMEOUT), || async {
            log_has(proxy.process().log_path(), code)
                && log_has(control.process().log_path(), refusal)
        })
        .await;
        assert!(
            refused,
            "{node}: expected {code} / {refusal:?}; proxy log:\n{}\ncontrol log:\n{}",
            proxy.process().log_tail(20),
            control.process().log_tail(20)
        );
        let health = proxy.api(None).get("/healthz").await;
        assert_eq!(health.status, 503, "{node}: {}", health.text);
        let r = proxy
            .api(Some(&secret))
            .post_form(
                "/stripe/v1/payment_intents",
                "amount=100&currency=usd&confirm=true",
            )
            .await;
        assert!(r.status >= 400, "{node}: {} {}", r.status, r.text);
    }
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());

    // A certificate from a CA the control plane does not trust fails the
    // handshake itself, whatever name it carries.
    let foreign = other_ca.client("node-4.proxy.keycap");
    let proxy = Proxy::start_with(
        &control.url(),
        &control.opts.fleet_token,
        &fleet_proxy("node-4.proxy.keycap", &server_ca, Some(&foreign))
            .readiness(Readiness::Listening),
    )
    .await;
    let cut_off = wait_until(within(POLICY_TIMEOUT), || async {
        log_has(proxy.process().log_path(), "cannot watch policy")
    })
    .await;
    assert!(cut_off, "{}", proxy.process().log_tail(20));
    assert_eq!(proxy.api(None).get("/healthz").await.status, 503);
    assert!(mock.calls().is_empty());
    // Failed handshakes leave the control plane serving everyone else.
    admin.get("/vault/vendors").await.expect(200);
}

/// A fleet gRPC client to `control` over TLS, presenting `client` if given,
/// with the fleet token on every call.
async fn fleet_client(
    control: &Control,
    server_ca: &TestCa,
    client: Option<&keycap_tests::pki::CertFiles>,
) -> FleetServiceClient<tonic::transport::Channel> {
    let identity = client.map(|c| Identity::load(&c.cert, &c.key).unwrap());
    let ca = server_ca.ca_pem();
    let tls = client_config(Trust::OnlyOrSystem(Some(&ca)), identity).unwrap();
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http2()
        .wrap_connector(http);
    let channel = tonic::transport::Endpoint::from_shared(control.url())
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("TLS connection to the control plane");
    FleetServiceClient::new(channel)
}

fn with_fleet_token<T>(control: &Control, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", control.opts.fleet_token)
            .parse()
            .unwrap(),
    );
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_spend_reports_and_acks_are_checked_against_the_client_certificate() {
    let server_ca = TestCa::new("control");
    let client_ca = TestCa::new("proxies");
    let control = mtls_control(&server_ca, &client_ca).await;
    let grant = |node: &str| pb::GrantLeaseRequest {
        grant_id: "grant-1".into(),
        lease_id: "lease-1".into(),
        key_id: "key_unknown".into(),
        node_id: node.into(),
        day: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        requested_micros: 1_000,
        minimum_micros: 1,
    };
    let report = |node: &str| pb::ReportSpendRequest {
        node_id: node.into(),
        events: Vec::new(),
        ..Default::default()
    };
    let give_back = |node: &str| pb::ReturnLeaseRequest {
        lease_id: "lease-1".into(),
        spent_micros: 0,
        node_id: node.into(),
        ..Default::default()
    };
    let ack = |node: &str| pb::AckPolicyRequest {
        node_id: node.into(),
        version: 1,
        ..Default::default()
    };

    // No client certificate: refused before anything is looked at.
    let mut anonymous = fleet_client(&control, &server_ca, None).await;
    let status = anonymous
        .grant_lease(with_fleet_token(&control, grant("node-1.proxy.keycap")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(
        status.message().contains("client certificate"),
        "{status:?}"
    );

    // node-1's certificate speaking for node-2.
    let node1 = client_ca.client("node-1.proxy.keycap");
    let mut c = fleet_client(&control, &server_ca, Some(&node1)).await;
    let node2 = "node-2.proxy.keycap";
    let refusals = [
        c.grant_lease(with_fleet_token(&control, grant(node2)))
            .await
            .map(|_| ()),
        c.report_spend(with_fleet_token(&control, report(node2)))
            .await
            .map(|_| ()),
        c.return_lease(with_fleet_token(&control, give_back(node2)))
            .await
            .map(|_| ()),
        // Or a revocation could count node-2 as confirmed.
        c.ack_policy(with_fleet_token(&control, ack(node2)))
            .await
            .map(|_| ()),
    ];
    for r in refusals {
        let status = r.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains(node2), "{status:?}");
    }

    // Speaking for itself, node-1 passes the identity check and reaches the
    // handlers: an empty report is applied, an unknown key is not found.
    c.report_spend(with_fleet_token(&control, report("node-1.proxy.keycap")))
        .await
        .expect("node-1 reports for itself");
    c.ack_policy(with_fleet_token(&control, ack("node-1.proxy.keycap")))
        .await
        .expect("node-1 acknowledges for itself");
    let status = c
        .grant_lease(with_fleet_token(&control, grant("node-1.proxy.keycap")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    // The certificate does not replace the fleet token.
    let status = c
        .report_spend(tonic::Request::new(report("node-1.proxy.keycap")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_only_a_token_over_tls() {
    let server_ca = TestCa::new("control");
    let client_ca = TestCa::new("proxies");
    let control = mtls_control(&server_ca, &client_ca).await;
    let url = control.url();
    let token = control.opts.admin_token.clone();
    let ca = server_ca.ca_pem().display().to_string();

    // gRPC through the CLI with --ca and no client certificate.
    let put = keycap_cli(
        &url,
        &token,
        &[
            "--ca",
            &ca,
            "vendor",
            "put",
            "stripe",
            "--profile",
            "stripe",
            "--base-url",
            "https://api.stripe.example",
            "--credential",
            STRIPE_CREDENTIAL,
        ],
    )
    .await;
    assert!(put.status.success(), "{}", put.stderr);
    let listed = keycap_cli(&url, &token, &["--ca", &ca, "vendor", "list"]).await;
    assert!(listed.status.success(), "{}", listed.stderr);
    assert!(listed.stdout.contains("stripe"), "{}", listed.stdout);
    assert!(!listed.stdout.contains(STRIPE_CREDENTIAL));

    // Without --ca the control plane's certificate is not trusted.
    let untrusted = keycap_cli(&url, &token, &["vendor", "list"]).await;
    assert!(!untrusted.status.success(), "{}", untrusted.stdout);

    // REST with the token and no client certificate.
    let vendors = control.admin().get("/vault/vendors").await.expect(200);
    assert!(vendors.to_string().contains("stripe"), "{vendors}");
}
