//! Per-key rate limits, client network allowlists and zone binding, end to
//! end: each refusal comes before pricing, so a refused call reserves
//! nothing and never reaches the vendor. Included from `e2e.rs`.

use keycap_proto::pb;
use keycap_tests::harness::{
    keycap_cli, probe_key, wait_until, within, Api, ControlOpts, Proxy, ProxyOpts, Resp, Stack,
    POLICY_TIMEOUT,
};
use keycap_tests::mock::MockVendor;
use reqwest::Method;
use serde_json::{json, Value};

use super::{assert_mock_never_saw, stack_with_stripe, stripe_key_body, STRIPE_CREDENTIAL};

const CHARGE: &str = "/stripe/v1/payment_intents";
/// One US dollar: 1,000,000 micros reserved and settled per call.
const ONE_USD: &str = "amount=100&currency=usd&confirm=true";

/// A $1 charge through the proxy at `proxy_url`, with extra headers.
async fn charge(proxy_url: &str, secret: &str, headers: &[(&str, &str)]) -> Resp {
    Api::new(proxy_url, Some(secret))
        .send(
            Method::POST,
            CHARGE,
            Some((
                "application/x-www-form-urlencoded",
                ONE_USD.as_bytes().to_vec(),
            )),
            headers,
        )
        .await
}

/// Waits until the proxy at `proxy_url` knows `secret` and refuses it with
/// `code` (keys it refuses before the endpoint check never probe live).
async fn wait_refused_with(proxy_url: &str, secret: &str, code: &str) {
    let seen = wait_until(within(POLICY_TIMEOUT), || async {
        probe_key(proxy_url, "stripe", secret).await.as_deref() == Some(code)
    })
    .await;
    assert!(
        seen,
        "the proxy never refused the key with {code} (last probe: {:?})",
        probe_key(proxy_url, "stripe", secret).await
    );
}

fn key_body(label: &str, extra: Value) -> Value {
    let mut body = stripe_key_body(json!(100), &["POST /v1/payment_intents"], label);
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_refuses_the_call_after_the_burst_with_retry_headers() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&key_body("rate/1", json!({"rate_limit_per_minute": 3})))
        .await;
    assert_eq!(key.body["rate_limit_per_minute"], 3, "{}", key.body);
    assert_eq!(stack.key(&key.id).await["rate_limit_per_minute"], 3);
    let open = stack.mint(&key_body("rate/open", json!({}))).await;
    assert_eq!(open.body["rate_limit_per_minute"], Value::Null);

    for remaining in [2, 1, 0] {
        let r = charge(&stack.proxy.url(), &key.secret, &[]).await;
        r.expect(200);
        assert_eq!(
            r.header("ratelimit-policy"),
            Some("\"per-key\";q=3;w=60"),
            "{:?}",
            r.headers
        );
        let state = r.header("ratelimit").expect("RateLimit header");
        assert!(
            state.starts_with(&format!("\"per-key\";r={remaining};t=")),
            "{state}"
        );
    }
    let refused = charge(&stack.proxy.url(), &key.secret, &[]).await;
    let body = refused.expect_error(429, "rate_limited");
    let retry: u64 = refused
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("Retry-After in whole seconds");
    // Three a minute: one call comes back within 20 s of the first.
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    assert_eq!(body["retry_after_seconds"], retry, "{body}");
    assert_eq!(body["limit_per_minute"], 3, "{body}");
    assert_eq!(
        refused.header("ratelimit"),
        Some(format!("\"per-key\";r=0;t={retry}").as_str())
    );
    assert_eq!(
        refused.header("ratelimit-policy"),
        Some("\"per-key\";q=3;w=60")
    );
    assert_eq!(mock.calls().len(), 3, "the vendor saw the refused call");

    // The refusal reserved and spent nothing: three calls, $3.
    stack.wait_key_spend(&key.id, 3_000_000, 3).await;
    stack.wait_audit(&format!("key_id={}", key.id), 3).await;

    // Another key is not limited by this one's rate, and a key without a
    // limit carries no RateLimit fields.
    let r = charge(&stack.proxy.url(), &open.secret, &[]).await;
    r.expect(200);
    assert_eq!(r.header("ratelimit"), None);
    assert_eq!(r.header("ratelimit-policy"), None);
    assert_eq!(mock.calls().len(), 4);
    assert_mock_never_saw(&mock, &key.secret);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cidr_allowlist_uses_the_peer_unless_the_peer_is_a_trusted_proxy() {
    let (stack, mock) = stack_with_stripe().await;
    let behind_balancer = Proxy::start_with(
        &stack.control.url(),
        &stack.control.opts.fleet_token,
        &ProxyOpts::new("e2e-trusting-proxy").flag("trusted-proxies", "127.0.0.1/32"),
    )
    .await;
    let private = stack
        .create_key(&key_body(
            "cidr/private",
            json!({"allowed_cidrs": ["10.0.0.0/8"]}),
        ))
        .await;
    assert_eq!(private.body["allowed_cidrs"], json!(["10.0.0.0/8"]));
    let local = stack
        .mint(&key_body(
            "cidr/local",
            json!({"allowed_cidrs": ["127.0.0.0/8", "2001:db8::/32"]}),
        ))
        .await;
    let direct = stack.proxy.url();
    let trusting = behind_balancer.url();
    wait_refused_with(&direct, &private.secret, "ip_not_allowed").await;
    wait_refused_with(&trusting, &private.secret, "ip_not_allowed").await;

    // Without --trusted-proxies the socket peer (127.0.0.1) is the client,
    // whatever X-Forwarded-For claims.
    let refused = charge(&direct, &private.secret, &[]).await;
    let body = refused.expect_error(403, "ip_not_allowed");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("127.0.0.1"), "{message}");
    assert!(
        !message.contains("10.0.0.0"),
        "leaks the allowlist: {message}"
    );
    charge(&direct, &private.secret, &[("x-forwarded-for", "10.1.2.3")])
        .await
        .expect_error(403, "ip_not_allowed");
    charge(&direct, &local.secret, &[]).await.expect(200);
    charge(
        &direct,
        &local.secret,
        &[("x-forwarded-for", "203.0.113.9")],
    )
    .await
    .expect(200);
    assert_eq!(mock.calls().len(), 2);

    // Behind a trusted balancer, the rightmost untrusted hop is the client.
    charge(
        &trusting,
        &private.secret,
        &[("x-forwarded-for", "10.1.2.3")],
    )
    .await
    .expect(200);
    charge(
        &trusting,
        &private.secret,
        &[("x-forwarded-for", "203.0.113.9, 10.1.2.3")],
    )
    .await
    .expect(200);
    // What the client wrote left of the balancer's entry is not believed.
    let spoofed = charge(
        &trusting,
        &private.secret,
        &[("x-forwarded-for", "10.1.2.3, 203.0.113.9")],
    )
    .await;
    let body = spoofed.expect_error(403, "ip_not_allowed");
    assert!(
        body["message"].as_str().unwrap().contains("203.0.113.9"),
        "{body}"
    );
    // No header, or one that cannot be read: the peer, which is outside.
    charge(&trusting, &private.secret, &[])
        .await
        .expect_error(403, "ip_not_allowed");
    charge(
        &trusting,
        &private.secret,
        &[("x-forwarded-for", "10.1.2.3, not-an-address")],
    )
    .await
    .expect_error(403, "ip_not_allowed");
    charge(
        &trusting,
        &local.secret,
        &[("x-forwarded-for", "203.0.113.9")],
    )
    .await
    .expect_error(403, "ip_not_allowed");
    charge(
        &trusting,
        &local.secret,
        &[("x-forwarded-for", "2001:db8::7")],
    )
    .await
    .expect(200);
    assert_eq!(mock.calls().len(), 5, "a refused call reached the vendor");
    // Only the five forwarded calls were reserved and spent.
    stack.wait_key_spend(&private.id, 2_000_000, 2).await;
    stack.wait_key_spend(&local.id, 3_000_000, 3).await;
    assert_mock_never_saw(&mock, &private.secret);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zoned_key_is_served_only_by_proxies_of_its_zone() {
    let stack = Stack::start_with_proxy(
        ControlOpts::sqlite(),
        ProxyOpts::new("e2e-proxy-us").flag("zone", "us"),
    )
    .await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let eu_proxy = Proxy::start_with(
        &stack.control.url(),
        &stack.control.opts.fleet_token,
        &ProxyOpts::new("e2e-proxy-eu").flag("zone", "eu"),
    )
    .await;
    let unzoned_proxy = Proxy::start(
        &stack.control.url(),
        &stack.control.opts.fleet_token,
        "e2e-proxy-unzoned",
    )
    .await;
    let key = stack
        .create_key(&key_body("zone/eu", json!({"zone": "eu"})))
        .await;
    assert_eq!(key.body["zone"], "eu");
    let us = stack.proxy.url();
    wait_refused_with(&us, &key.secret, "zone_mismatch").await;
    wait_refused_with(&unzoned_proxy.url(), &key.secret, "zone_mismatch").await;

    let body = charge(&us, &key.secret, &[])
        .await
        .expect_error(403, "zone_mismatch");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("\"eu\"") && message.contains("\"us\""),
        "{message}"
    );
    charge(&unzoned_proxy.url(), &key.secret, &[])
        .await
        .expect_error(403, "zone_mismatch");
    assert!(mock.calls().is_empty());
    charge(&eu_proxy.url(), &key.secret, &[]).await.expect(200);
    assert_eq!(mock.calls().len(), 1);
    stack.wait_key_spend(&key.id, 1_000_000, 1).await;

    // A key without a zone is served by a zoned proxy too.
    let anywhere = stack.mint(&key_body("zone/any", json!({}))).await;
    charge(&us, &anywhere.secret, &[]).await.expect(200);
    assert_eq!(mock.calls().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_limits_are_refused_naming_the_field_and_create_nothing() {
    let (stack, _mock) = stack_with_stripe().await;
    for (extra, field) in [
        (
            json!({"rate_limit_per_minute": -1}),
            "rate_limit_per_minute",
        ),
        (
            json!({"rate_limit_per_minute": 1.5}),
            "rate_limit_per_minute",
        ),
        (
            json!({"rate_limit_per_minute": "60"}),
            "rate_limit_per_minute",
        ),
        (
            json!({"rate_limit_per_minute": 1_000_000_000u64}),
            "rate_limit_per_minute",
        ),
        (json!({"allowed_cidrs": ["10.0.0.1/8"]}), "allowed_cidrs"),
        (json!({"allowed_cidrs": ["office"]}), "allowed_cidrs"),
        (json!({"allowed_cidrs": ["10.0.0.0/33"]}), "allowed_cidrs"),
        (json!({"zone": "EU"}), "zone"),
        (json!({"zone": "eu west"}), "zone"),
    ] {
        let r = stack
            .admin
            .post_json("/vault/keys", &key_body("bad/limits", extra.clone()))
            .await;
        let body = r.expect_error(400, "invalid_request");
        assert_eq!(body["field"], field, "{extra}: {body}");
    }
    let keys = stack
        .admin
        .get("/vault/keys?include_inactive=true")
        .await
        .expect(200);
    assert_eq!(keys["keys"].as_array().map(Vec::len), Some(0), "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sets_and_shows_key_limits() {
    let (stack, _mock) = stack_with_stripe().await;
    let out = keycap_cli(
        &stack.control.url(),
        &stack.control.opts.admin_token,
        &[
            "key",
            "create",
            "--vendor",
            "stripe",
            "--daily-usd-cap",
            "10",
            "--allow",
            "POST /v1/payment_intents",
            "--expires-in",
            "1h",
            "--run-label",
            "cli/limits",
            "--rate-limit-per-minute",
            "30",
            "--allow-cidr",
            "10.0.0.0/8,192.0.2.7",
            "--allow-cidr",
            "2001:db8::/32",
            "--zone",
            "eu",
        ],
    )
    .await;
    let created = out.json();
    assert_eq!(created["rate_limit_per_minute"], 30, "{created}");
    assert_eq!(
        created["allowed_cidrs"],
        json!(["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"])
    );
    assert_eq!(created["zone"], "eu");
    let id = created["id"].as_str().expect("id");
    let read = stack.key(id).await;
    assert_eq!(read["rate_limit_per_minute"], 30);
    assert_eq!(read["allowed_cidrs"], created["allowed_cidrs"]);
    assert_eq!(read["zone"], "eu");
}

/// The limits over gRPC: what an SDK sends, reads back, and what the fleet
/// stream hands every proxy; bad ones are InvalidArgument naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_keys_carry_limits_to_admin_reads_and_the_fleet_stream() {
    use keycap_proto::pb::{
        fleet_service_client::FleetServiceClient, key_service_client::KeyServiceClient,
        policy_update::Update,
    };
    use tonic::{Code, Request};

    let (stack, _mock) = stack_with_stripe().await;
    let channel = tonic::transport::Endpoint::from_shared(stack.control.url())
        .expect("control plane URL")
        .connect()
        .await
        .expect("gRPC connection");
    fn bearer<T>(msg: T, token: &str) -> Request<T> {
        let mut req = Request::new(msg);
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ASCII token"),
        );
        req
    }
    let admin_token = stack.control.opts.admin_token.clone();
    let mut keys = KeyServiceClient::new(channel.clone());
    let request = |rate: u32, cidrs: &[&str], zone: &str| pb::CreateKeyRequest {
        vendor: "stripe".into(),
        allowed_endpoints: vec!["POST /v1/payment_intents".into()],
        daily_cap_micros: 10_000_000,
        expires_in_seconds: 3600,
        agent_run_label: "grpc/limits".into(),
        rate_limit_per_minute: rate,
        allowed_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
        zone: zone.into(),
        ..Default::default()
    };

    for (req, field) in [
        (request(600_001, &[], ""), "rate_limit_per_minute"),
        (request(0, &["10.0.0.1/8"], ""), "allowed_cidrs"),
        (request(0, &["10.0.0.0/8", "nonsense"], ""), "allowed_cidrs"),
        (request(0, &[], "Eu"), "zone"),
    ] {
        let s = keys
            .create_key(bearer(req, &admin_token))
            .await
            .expect_err("bad limits accepted");
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().starts_with(&format!("{field}: ")), "{s:?}");
    }

    let created = keys
        .create_key(bearer(
            request(90, &["10.0.0.0/8", "::ffff:192.0.2.0/120"], "eu"),
            &admin_token,
        ))
        .await
        .expect("CreateKey")
        .into_inner();
    let view = created.key.expect("key");
    assert_eq!(view.rate_limit_per_minute, 90);
    assert_eq!(view.allowed_cidrs, ["10.0.0.0/8", "192.0.2.0/24"]);
    assert_eq!(view.zone, "eu");
    let read = keys
        .get_key(bearer(
            pb::GetKeyRequest {
                id: view.id.clone(),
            },
            &admin_token,
        ))
        .await
        .expect("GetKey")
        .into_inner()
        .key
        .expect("key");
    assert_eq!(
        (read.rate_limit_per_minute, &read.allowed_cidrs, &read.zone),
        (90, &view.allowed_cidrs, &view.zone)
    );

    let mut stream = FleetServiceClient::new(channel)
        .watch_policy(bearer(
            pb::WatchPolicyRequest {
                node_id: "limits-e2e".into(),
                from_version: 0,
            },
            &stack.control.opts.fleet_token,
        ))
        .await
        .expect("WatchPolicy")
        .into_inner();
    let first = tokio::time::timeout(
        POLICY_TIMEOUT,
        keycap_tests::harness::next_policy_update(&mut stream),
    )
    .await
    .expect("a snapshot in time")
    .expect("stream open")
    .expect("a message");
    let Some(Update::Snapshot(snap)) = first.update else {
        panic!("first message is not a snapshot: {first:?}");
    };
    let fleet_key = snap
        .keys
        .iter()
        .find(|k| k.id == view.id)
        .expect("the key in the snapshot");
    assert_eq!(fleet_key.rate_limit_per_minute, 90);
    assert_eq!(fleet_key.allowed_cidrs, view.allowed_cidrs);
    assert_eq!(fleet_key.zone, "eu");
}
