//! The proxy's edges: how it streams, times out, bounds what it buffers,
//! and fails closed without its control plane. Included from `e2e.rs`,
//! whose helpers these tests share.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use keycap_proto::secret::{self, SecretKind};
use keycap_tests::harness::{
    self, wait_until, within, Api, ControlOpts, Dev, Proxy, ProxyOpts, Readiness, Stack,
    READY_TIMEOUT,
};
use keycap_tests::mock::{self, HoldAt, MockVendor};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{
    assert_mock_never_saw, assert_resp_lacks, dollar_charge, openai_cost, stack_with_openai,
    stack_with_stripe, stripe_key_body, STRIPE_CREDENTIAL,
};

/// How long a piece of a response the vendor has already sent may take to
/// come through the proxy. Far above a pass-through's latency, far below
/// the test's other timeouts, so a proxy that buffers fails here.
const PASS_THROUGH_TIMEOUT: Duration = Duration::from_secs(10);

/// A proxy started with extra flags, its control plane, and a Stripe mock
/// registered as `stripe`.
async fn stack_with_stripe_and_proxy(proxy: ProxyOpts) -> (Stack, MockVendor) {
    let stack = Stack::start_with_proxy(ControlOpts::sqlite(), proxy).await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    (stack, mock)
}

/// The only audit entry of key `id`, once it has arrived.
async fn only_audit_entry(stack: &Stack, id: &str) -> Value {
    stack.wait_audit(&format!("key_id={id}"), 1).await.remove(0)
}

// --- streaming ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_reach_the_agent_as_the_vendor_sends_them() {
    let (stack, mock, key) = stack_with_openai().await;
    let model = "gpt-4o";
    let request = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Stream a hello, slowly."}],
        "max_tokens": 500,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let usage = mock::chat_usage(&request);
    let events = mock::chat_stream_events(model, true, usage);
    let first_event = format!("data: {}\n\n", events[0]);

    // The vendor sends its first event, then nothing (not even the usage
    // chunk the cost comes from) until the test says so.
    let hold = mock.hold("/v1/chat/completions", HoldAt::AfterFirstEvent);
    let mut resp = tokio::time::timeout(
        PASS_THROUGH_TIMEOUT,
        stack
            .agent(&key.secret)
            .post_json_streaming("/openai/v1/chat/completions", &request),
    )
    .await
    .expect("no response head while the vendor held the rest of its stream");
    assert_eq!(resp.status(), 200);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type:?}"
    );

    let mut received: Vec<u8> = Vec::new();
    let first = async {
        while !received.windows(2).any(|w| w == b"\n\n") {
            match resp.chunk().await {
                Ok(Some(chunk)) => received.extend_from_slice(&chunk),
                Ok(None) => panic!("the stream ended before the vendor was released"),
                Err(e) => panic!("the stream failed before the vendor was released: {e}"),
            }
        }
    };
    tokio::time::timeout(PASS_THROUGH_TIMEOUT, first)
        .await
        .expect("the vendor's first event did not come through while it held the rest: the proxy buffers the stream");
    assert_eq!(String::from_utf8_lossy(&received), first_event);

    hold.release();
    let rest = async {
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => received.extend_from_slice(&chunk),
                Ok(None) => return,
                Err(e) => panic!("the stream failed after the vendor was released: {e}"),
            }
        }
    };
    tokio::time::timeout(PASS_THROUGH_TIMEOUT, rest)
        .await
        .expect("the rest of the stream did not come through after the release");
    assert_eq!(
        String::from_utf8_lossy(&received),
        mock::chat_stream_body(model, true, usage)
    );
    assert_mock_never_saw(&mock, &key.secret);

    // The cost comes from the usage chunk that arrived after the hold.
    let cost = openai_cost(model, usage);
    let e = only_audit_entry(&stack, &key.id).await;
    assert_eq!(e["outcome"], "settled", "{e}");
    assert_eq!(e["cost_micros"], cost, "{e}");
    assert!(
        e["reserved_micros"].as_i64().is_some_and(|r| r > cost),
        "{e}"
    );
    stack.wait_key_spend(&key.id, cost, 1).await;
}

// --- upstream failures -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vendor_that_does_not_answer_in_time_is_a_504_settled_at_the_reservation() {
    let (stack, mock) =
        stack_with_stripe_and_proxy(ProxyOpts::new("e2e-proxy").flag("upstream-timeout-secs", 1))
            .await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "timeout/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    let hold = mock.hold("/v1/payment_intents", HoldAt::Response);

    let sent = Instant::now();
    let r = agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=500&currency=usd&confirm=true",
        )
        .await;
    let waited = sent.elapsed();
    r.expect_error(504, "upstream_timeout");
    assert_resp_lacks(&r, STRIPE_CREDENTIAL);
    assert!(
        !r.text.contains(&mock.addr().port().to_string()),
        "internal address leaked: {}",
        r.text
    );
    assert!(
        waited >= Duration::from_secs(1) && waited < Duration::from_secs(15),
        "answered after {waited:?}, not after the configured 1 s"
    );
    // The call did reach the vendor, which may have charged it: the
    // reservation is kept, not released.
    assert_eq!(mock.calls().len(), 1);
    let e = only_audit_entry(&stack, &key.id).await;
    assert_eq!(e["outcome"], "settled_at_reservation", "{e}");
    assert_eq!(e["reserved_micros"], 5_000_000, "{e}");
    assert_eq!(e["cost_micros"], 5_000_000, "{e}");
    stack.wait_key_spend(&key.id, 5_000_000, 1).await;

    // A vendor that answers again is served as usual.
    hold.release();
    agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    stack.wait_key_spend(&key.id, 6_000_000, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priced_response_over_the_limit_is_a_502_settled_at_the_reservation() {
    let limit = 4096;
    let (stack, mock) =
        stack_with_stripe_and_proxy(ProxyOpts::new("e2e-proxy").flag("max-response-bytes", limit))
            .await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "large/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);

    // Under the limit: passed back whole.
    let fits = agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true&description=small",
        )
        .await;
    let body = fits.expect(200);
    assert_eq!(body["description"], "small");
    assert!(fits.text.len() < limit, "{}", fits.text.len());
    stack.wait_key_spend(&key.id, 1_000_000, 1).await;

    // The vendor echoes the description: twice the limit comes back.
    let description = "x".repeat(2 * limit);
    let r = agent
        .post_form(
            "/stripe/v1/payment_intents",
            &format!("amount=100&currency=usd&confirm=true&description={description}"),
        )
        .await;
    r.expect_error(502, "upstream_response_too_large");
    assert!(
        !r.text.contains(&description),
        "the oversized body was passed on"
    );
    assert_resp_lacks(&r, STRIPE_CREDENTIAL);
    assert_eq!(mock.calls().len(), 2);
    // The vendor accepted the charge; the proxy could not read the answer,
    // so the call costs its reservation, not zero.
    assert_eq!(mock.forwarded_stripe_amount(), 200);
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 2).await;
    let e = entries
        .iter()
        .find(|e| e["outcome"] != "settled")
        .unwrap_or_else(|| panic!("no entry for the oversized response: {entries:?}"));
    assert_eq!(e["outcome"], "settled_at_reservation", "{e}");
    assert_eq!(e["reserved_micros"], 1_000_000, "{e}");
    assert_eq!(e["cost_micros"], 1_000_000, "{e}");
    stack.wait_key_spend(&key.id, 2_000_000, 2).await;
}

/// Sends a raw form POST for a Stripe payment intent of `amount` cents with
/// `key`, and returns the open connection without reading the answer.
async fn send_payment_intent_raw(addr: std::net::SocketAddr, key: &str, amount: u32) -> TcpStream {
    let body = format!("amount={amount}&currency=usd&confirm=true");
    let mut conn = TcpStream::connect(addr)
        .await
        .expect("connect to the proxy");
    let request = format!(
        "POST /stripe/v1/payment_intents HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes())
        .await
        .expect("send the request");
    conn
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_hangs_up_mid_call_is_settled_at_the_reservation() {
    let (stack, mock) = stack_with_stripe_and_proxy(ProxyOpts::new("e2e-proxy")).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "hangup/1",
        ))
        .await;
    let hold = mock.hold("/v1/payment_intents", HoldAt::Response);

    let conn = send_payment_intent_raw(stack.proxy.addr(), &key.secret, 700).await;
    assert!(
        wait_until(within(PASS_THROUGH_TIMEOUT), || async {
            mock.calls().len() == 1
        })
        .await,
        "the call never reached the vendor"
    );
    // The vendor has the charge; the agent goes away before the answer.
    drop(conn);

    // The call may have cost money: it is audited at its reservation, not
    // forgotten, and the budget counts it.
    let e = only_audit_entry(&stack, &key.id).await;
    assert_eq!(e["outcome"], "settled_at_reservation", "{e}");
    assert_eq!(e["reserved_micros"], 7_000_000, "{e}");
    assert_eq!(e["cost_micros"], 7_000_000, "{e}");
    stack.wait_key_spend(&key.id, 7_000_000, 1).await;

    // The reservation was resolved, not stranded: the rest of the cap is
    // still there for the next call ($50 - $7 leaves room for $43).
    hold.release();
    stack
        .agent(&key.secret)
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=4300&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    stack.wait_key_spend(&key.id, 50_000_000, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_calls_in_flight_finish_and_delivers_their_spend() {
    let (mut stack, mock) = stack_with_stripe_and_proxy(ProxyOpts::new("e2e-proxy")).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "sigterm/1",
        ))
        .await;
    let hold = mock.hold("/v1/payment_intents", HoldAt::Response);
    let mut conn = send_payment_intent_raw(stack.proxy.addr(), &key.secret, 300).await;
    assert!(
        wait_until(within(PASS_THROUGH_TIMEOUT), || async {
            mock.calls().len() == 1
        })
        .await,
        "the call never reached the vendor"
    );

    stack.proxy.process().signal_term();
    // New connections are refused once the proxy has stopped accepting.
    let refused = wait_until(within(READY_TIMEOUT), || async {
        TcpStream::connect(stack.proxy.addr()).await.is_err()
    })
    .await;
    assert!(refused, "the proxy still accepts connections after SIGTERM");
    let early = stack.proxy.process_mut().exited();
    assert!(
        early.is_none(),
        "the proxy exited with a call in flight: {early:?}"
    );

    // The vendor answers: the call in flight completes for the agent...
    hold.release();
    let mut answer = String::new();
    tokio::time::timeout(PASS_THROUGH_TIMEOUT, conn.read_to_string(&mut answer))
        .await
        .expect("the answer came before the proxy closed the connection")
        .expect("read the answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"amount\":300"), "{answer}");

    // ...and the proxy exits on its own, having delivered the spend event:
    // it is in the ledger the moment the proxy is gone.
    let status = stack
        .proxy
        .process_mut()
        .wait_exit(within(READY_TIMEOUT))
        .await
        .expect("the proxy exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    let entries = stack.audit(&format!("key_id={}", key.id)).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["outcome"], "settled", "{}", entries[0]);
    assert_eq!(entries[0]["cost_micros"], 3_000_000, "{}", entries[0]);
}

// --- without the control plane -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_policy_is_unhealthy_and_forwards_nothing() {
    // Nothing listens on this port.
    let port = harness::free_port();
    let metrics_port = harness::free_port();
    let proxy = Proxy::start_with(
        &format!("http://127.0.0.1:{port}"),
        &harness::fleet_token(),
        &ProxyOpts::new("orphan-proxy")
            .readiness(Readiness::Listening)
            .flag("metrics-listen", format!("127.0.0.1:{metrics_port}")),
    )
    .await;

    // Alive, not ready: on the agents' listener and, for a balancer, on
    // the metrics listener.
    let metrics_url = format!("http://127.0.0.1:{metrics_port}");
    let probes = [
        (proxy.url(), &["/healthz", "/readyz"][..]),
        (metrics_url, &["/readyz"][..]),
    ];
    for (base, paths) in probes {
        for path in paths {
            let health = Api::new(&base, None).get(path).await;
            assert_eq!(health.status, 503, "{base}{path}: {}", health.text);
            assert_eq!(health.json()["status"], "waiting_for_policy");
        }
        let live = Api::new(&base, None).get("/livez").await;
        assert_eq!(live.status, 200, "{base}/livez: {}", live.text);
    }

    let key = secret::generate(SecretKind::VaultKey, "test");
    let r = Api::new(&proxy.url(), Some(&key))
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await;
    r.expect_error(503, "policy_unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        !r.text.contains(&port.to_string()),
        "internal address leaked: {}",
        r.text
    );

    // The admin relay has nowhere to go either.
    let relayed = Api::new(&proxy.url(), Some(&harness::admin_token()))
        .get("/vault/keys")
        .await;
    relayed.expect_error(502, "upstream_unreachable");
    assert!(
        !relayed.text.contains(&port.to_string()),
        "internal address leaked: {}",
        relayed.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_without_a_lease_fails_closed_when_the_control_plane_is_gone() {
    let (mut stack, mock) = stack_with_stripe().await;
    // Made live by a probe that is refused before pricing: no call has
    // reserved anything, so the proxy holds no lease for this key.
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "closed/1",
        ))
        .await;
    stack.control.kill().await;
    let control_addr = format!("127.0.0.1:{}", stack.control.port());
    assert!(
        tokio::net::TcpStream::connect(&control_addr).await.is_err(),
        "the control plane still accepts connections after SIGKILL"
    );

    let r = stack
        .agent(&key.secret)
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await;
    r.expect_error(503, "budget_unavailable");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        !r.text.contains(&stack.control.port().to_string()),
        "internal address leaked: {}",
        r.text
    );
    assert!(
        mock.calls().is_empty(),
        "a call without budget reached the vendor: {:?}",
        mock.calls()
    );
    assert_eq!(mock.forwarded_stripe_amount(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_an_unknown_vendor_is_a_404_but_only_for_a_known_key() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "unknown/1",
        ))
        .await;
    let r = stack
        .agent(&key.secret)
        .post_form("/nosuchvendor/v1/x", "amount=100&currency=usd")
        .await;
    let body = r.expect_error(404, "unknown_vendor");
    assert_resp_lacks(&r, &key.secret);
    assert_resp_lacks(&r, STRIPE_CREDENTIAL);
    assert!(body.get("cap_usd").is_none(), "{body}");

    // Without a key the answer is the same for a vendor that exists and one
    // that does not: vendor names cannot be probed.
    // The real key with its last character changed (to one it is not).
    let last = if key.secret.ends_with('x') { 'y' } else { 'x' };
    let forged = format!("{}{last}", &key.secret[..key.secret.len() - 1]);
    for credential in [None, Some("kc_not_a_key"), Some(forged.as_str())] {
        for vendor in ["nosuchvendor", "stripe"] {
            let r = Api::new(&stack.proxy.url(), credential)
                .post_form(
                    &format!("/{vendor}/v1/payment_intents"),
                    "amount=100&currency=usd",
                )
                .await;
            let body = r.expect_error(401, "invalid_key");
            assert!(
                !r.text.contains("nosuchvendor"),
                "{credential:?} {vendor}: {body}"
            );
        }
    }
    // Nor can a key that no longer works: revoked, it is refused before
    // the vendor is looked up.
    stack
        .admin
        .delete(&format!("/vault/keys/{}", key.id))
        .await
        .expect(200);
    for vendor in ["nosuchvendor", "stripe"] {
        stack
            .agent(&key.secret)
            .post_form(
                &format!("/{vendor}/v1/payment_intents"),
                "amount=100&currency=usd",
            )
            .await
            .expect_error(401, "key_revoked");
    }
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_badly_chunked_body_is_a_400_not_a_413() {
    let (stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "chunked/1",
        ))
        .await;
    // A chunk size that is not hexadecimal: the body can never be read, but
    // it is not too large either.
    let request = format!(
        "POST /stripe/v1/payment_intents HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Authorization: Bearer {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         17\r\namount=100&currency=usd\r\nzz\r\n",
        key.secret
    );
    let r = harness::raw_http(stack.proxy.addr(), &request).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(
        keycap_tests::harness::keycap_refusal(&r.json().expect("JSON error body"))["error"],
        "invalid_request_body"
    );
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
}

// --- keycap dev ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycap_dev_takes_the_admin_token_flag() {
    let token = harness::admin_token();
    let dev = Dev::start_with_admin_token_flag(&token).await;
    Api::new(&dev.control_url, Some(&token))
        .get("/vault/keys")
        .await
        .expect(200);
    Api::new(&dev.control_url, Some(&harness::admin_token()))
        .get("/vault/keys")
        .await
        .expect_error(401, "unauthenticated");
    assert!(
        !dev.data_dir().join("admin-token").exists(),
        "a token given on the command line is not replaced by a generated one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycap_dev_makes_up_an_admin_token_when_none_is_given() {
    let dev = Dev::start_generating_admin_token().await;
    let token = dev.admin_token.clone();
    assert!(
        secret::is_well_formed(SecretKind::AdminToken, &token),
        "not an admin token: {token:?}"
    );
    let file = dev.data_dir().join("admin-token");
    let mode = std::fs::metadata(&file)
        .expect("admin-token metadata")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "admin-token has mode {mode:o}");

    // The banner shows it.
    let log = dev.process().log_path().to_path_buf();
    let banner_token = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.trim().strip_prefix("admin token:").map(str::trim))
            .map(str::to_string)
    };
    let shown = wait_until(within(READY_TIMEOUT), || async { banner_token().is_some() }).await;
    assert!(
        shown,
        "no admin token in the banner:\n{}",
        dev.process().log_tail(40)
    );
    assert_eq!(banner_token().as_deref(), Some(token.as_str()));

    // It works on both addresses, and only it does.
    for base in [&dev.proxy_url, &dev.control_url] {
        let vendors = Api::new(base, Some(&token))
            .get("/vault/vendors")
            .await
            .expect(200);
        assert_eq!(vendors["vendors"][0]["name"], "sandbox", "{vendors}");
        Api::new(base, Some(&harness::admin_token()))
            .get("/vault/vendors")
            .await
            .expect_error(401, "unauthenticated");
    }
}

/// Segment files in a proxy's spool directory.
fn spool_segments(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .expect("spool directory")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("spend-"))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_off_by_sigkill_is_reported_once_when_the_proxy_restarts() {
    let spool = tempfile::tempdir().unwrap();
    let opts = ProxyOpts::new("spooled").flag("spool-dir", spool.path().display());
    let (mut stack, mock) = stack_with_stripe_and_proxy(opts.clone()).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "spool/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    stack.wait_key_spend(&key.id, 1_000_000, 1).await;

    // The vendor has the second call and has not answered when the proxy
    // is killed: the proxy never learns what it cost.
    let hold = mock.hold("/v1/payment_intents", HoldAt::Response);
    let cut_off = tokio::spawn(async move {
        agent
            .post_form(
                "/stripe/v1/payment_intents",
                "amount=250&currency=usd&confirm=true",
            )
            .await
    });
    assert!(
        wait_until(within(Duration::from_secs(20)), || async {
            mock.calls().len() == 2
        })
        .await,
        "the second call reached the vendor"
    );
    stack.proxy.process_mut().kill().await;
    cut_off.abort();
    drop(hold);

    // Restarted on the same spool, the proxy reports the cut-off call at
    // its reservation, once, beside the first call's entry.
    let restarted =
        Proxy::start_with(&stack.control.url(), &stack.control.opts.fleet_token, &opts).await;
    let entries = stack.wait_audit(&format!("key_id={}", key.id), 2).await;
    let mut got: Vec<(i64, String)> = entries
        .iter()
        .map(|e| {
            (
                e["cost_micros"].as_i64().unwrap(),
                e["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (1_000_000, "settled".to_string()),
            (2_500_000, "settled_at_reservation".to_string()),
        ]
    );
    stack.wait_key_spend(&key.id, 3_500_000, 2).await;
    // What the old run left is gone once delivered: only the new run's
    // segment stays.
    assert!(
        wait_until(within(Duration::from_secs(20)), || async {
            spool_segments(spool.path()) == 1
        })
        .await,
        "the old run's segments were not removed"
    );
    // The key serves on through the restarted proxy, from what is left.
    restarted
        .api(Some(&key.secret))
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    stack.wait_key_spend(&key.id, 4_500_000, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_and_restarted_on_its_spool_strands_no_budget() {
    let spool = tempfile::tempdir().unwrap();
    let opts = ProxyOpts::new("restarted").flag("spool-dir", spool.path().display());
    let (mut stack, _mock) = stack_with_stripe_and_proxy(opts).await;
    // $5.50 a day: the first call opens a lease of a quarter of the cap
    // ($1.375), which the kill leaves $0.375 of unspent.
    let key = stack
        .mint(&stripe_key_body(
            json!(5.5),
            &["POST /v1/payment_intents"],
            "restart/1",
        ))
        .await;
    dollar_charge(&stack.agent(&key.secret)).await.expect(200);

    // SIGKILL, and back on the same spool and node id: the old run's lease
    // goes back once its spend is delivered, so the key can spend the rest
    // of its cap rather than what the stranded lease leaves of it.
    stack.proxy.restart().await;
    let mut served = 0;
    let refusal = loop {
        let r = dollar_charge(&stack.agent(&key.secret)).await;
        if r.status != 200 {
            break r;
        }
        served += 1;
    };
    assert_eq!(served, 4, "$5.50 holds five $1 calls in all");
    let body = refusal.expect_error(429, "daily_cap_exceeded");
    assert_eq!(body["remaining_usd"], json!(0.5), "{body}");
    // The key's own read says the same once the spend has landed.
    let view = stack.wait_key_spend(&key.id, 5_000_000, 5).await;
    assert_eq!(view["remaining_today_usd"], json!(0.5), "{view}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_a_stopping_proxy_cannot_deliver_stays_in_its_spool_for_the_next_start() {
    let spool = tempfile::tempdir().unwrap();
    let opts = ProxyOpts::new("stopping").flag("spool-dir", spool.path().display());
    let (mut stack, _mock) = stack_with_stripe_and_proxy(opts).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "stopping/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    dollar_charge(&agent).await.expect(200);
    stack.wait_key_spend(&key.id, 1_000_000, 1).await;

    // The control plane goes away; the next call is served from the lease
    // and its spend cannot be delivered before the proxy stops.
    stack.control.process_mut().kill().await;
    dollar_charge(&agent).await.expect(200);
    let status = stack
        .proxy
        .process_mut()
        .terminate(within(Duration::from_secs(30)))
        .await
        .expect("the proxy exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(
        stack
            .proxy
            .process()
            .log_contains("stays in the spool and is delivered when this proxy starts again"),
        "{}",
        stack.proxy.process().log_tail(20)
    );

    // Both back: the second call's spend arrives from the spool.
    stack.control.restart().await;
    stack.proxy.restart().await;
    stack.wait_key_spend(&key.id, 2_000_000, 2).await;
}
