//! Alert webhooks end to end: the real control plane (and proxies) post to
//! a receiver in this process. A receiver that answers 500 then 200 gets the
//! same event (same id) again, in order; a control plane SIGKILLed while a
//! delivery is in flight delivers it after restart; a key hammered through
//! a fleet of three proxies over two replicas announces each threshold of
//! the key and of its run exactly once; bad URLs and private destinations
//! are refused. Signatures are verified with an independent implementation
//! in `tests/python/test_webhooks.py`.

use keycap_tests::fleet::{self, Fleet, FleetOpts};
use keycap_tests::harness::Control;
use keycap_tests::receiver::{Receiver, HOLD};

use super::*;

const ALLOW_PRIVATE: &str = "--allow-private-webhooks";

fn private_ok() -> ControlOpts {
    let mut opts = ControlOpts::sqlite();
    opts.args.push(ALLOW_PRIVATE.into());
    opts
}

async fn register(admin: &Api, body: Value) -> (String, String) {
    let created = admin.post_json("/vault/webhooks", &body).await.expect(201);
    (
        created["webhook"]["id"].as_str().expect("id").to_string(),
        created["secret"].as_str().expect("secret").to_string(),
    )
}

async fn deliveries(admin: &Api, id: &str) -> Vec<Value> {
    admin
        .get(&format!("/vault/webhooks/{id}/deliveries"))
        .await
        .expect(200)["deliveries"]
        .as_array()
        .expect("deliveries")
        .clone()
}

/// Polls until the receiver holds `n` deliveries.
async fn wait_received(
    receiver: &Receiver,
    n: usize,
    within_: Duration,
) -> Vec<keycap_tests::receiver::Received> {
    wait_for(within(within_), || async {
        let got = receiver.received();
        (got.len() >= n).then_some(got)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{} deliveries received, wanted {n}",
            receiver.received().len()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_answering_500_then_200_gets_the_same_event_again_in_order() {
    let stack = Stack::start_with(private_ok()).await;
    let receiver = Receiver::start(&[500, 200, 200]).await;
    let (id, secret) = register(&stack.admin, json!({"url": receiver.url("/hook")})).await;
    assert!(secret.starts_with("whsec_"), "{secret}");
    // Listing never shows the secret.
    let listed = stack.admin.get("/vault/webhooks").await.expect(200);
    assert_eq!(listed["webhooks"][0]["id"], id.as_str());
    assert!(!listed.to_string().contains(&secret));

    let first = stack
        .admin
        .post_json(&format!("/vault/webhooks/{id}/test"), &json!({}))
        .await
        .expect(202)["event_id"]
        .as_str()
        .unwrap()
        .to_string();
    let second = stack
        .admin
        .post_json(&format!("/vault/webhooks/{id}/test"), &json!({}))
        .await
        .expect(202)["event_id"]
        .as_str()
        .unwrap()
        .to_string();
    let got = wait_received(&receiver, 3, Duration::from_secs(20)).await;
    let ids: Vec<String> = got
        .iter()
        .map(|r| r.header("keycap-event-id").unwrap().to_string())
        .collect();
    // The 500 is retried with the same event id, and the second event
    // waits behind the first: in order per endpoint.
    assert_eq!(ids, vec![first.clone(), first.clone(), second.clone()]);
    for r in &got {
        assert_eq!(r.json()["id"], r.header("keycap-event-id").unwrap());
        assert_eq!(r.json()["type"], "webhook.test");
        let sig = r.header("keycap-signature").expect("signed");
        assert!(sig.starts_with("t=") && sig.contains(",v1="), "{sig}");
    }
    assert_eq!(got[0].body, got[1].body, "a retry carries the same payload");

    // Attempts are visible in the API.
    let listed = wait_for(within(Duration::from_secs(10)), || async {
        let d = deliveries(&stack.admin, &id).await;
        d.iter().all(|d| d["state"] == "delivered").then_some(d)
    })
    .await
    .expect("both delivered");
    let d1 = listed
        .iter()
        .find(|d| d["event_id"] == first.as_str())
        .unwrap();
    let statuses: Vec<&Value> = d1["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| &a["status"])
        .collect();
    assert_eq!(statuses, vec![&json!(500), &json!(200)]);
    assert_eq!(d1["attempts"][0]["error"], "the receiver answered 500");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_and_its_run_is_announced_and_slack_gets_text() {
    let (stack, _mock) = {
        let stack = Stack::start_with(private_ok()).await;
        let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
        stack.register("stripe", "stripe", &mock).await;
        (stack, mock)
    };
    let receiver = Receiver::start(&[]).await;
    let slack = Receiver::start(&[]).await;
    register(
        &stack.admin,
        json!({"url": receiver.url("/k"), "events": ["key.revoked", "run.revoked"]}),
    )
    .await;
    register(
        &stack.admin,
        json!({"url": slack.url("/s"), "events": ["key.revoked"], "format": "slack"}),
    )
    .await;
    let key = stack
        .create_key(&stripe_key_body(
            json!(5),
            &["POST /v1/payment_intents"],
            "wh/run-1",
        ))
        .await;
    let other = stack
        .create_key(&stripe_key_body(
            json!(5),
            &["POST /v1/payment_intents"],
            "wh/run-1",
        ))
        .await;
    stack
        .admin
        .delete(&format!("/vault/keys/{}", key.id))
        .await
        .expect(200);
    stack
        .admin
        .post_json(
            "/vault/keys/revoke",
            &json!({"agent_run_label": "wh/run-1"}),
        )
        .await
        .expect(200);
    let got = wait_received(&receiver, 2, Duration::from_secs(20)).await;
    assert_eq!(got[0].json()["type"], "key.revoked");
    assert_eq!(got[0].json()["data"]["key_id"], key.id.as_str());
    assert_eq!(got[1].json()["type"], "run.revoked");
    assert_eq!(got[1].json()["data"]["key_ids"], json!([other.id]));
    let s = wait_received(&slack, 1, Duration::from_secs(20)).await;
    let text = s[0].json()["text"].as_str().unwrap().to_string();
    assert!(
        text.contains(&format!("key {} was revoked", key.id)),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_private_destinations_are_refused() {
    let stack = Stack::start().await;
    for (url, says) in [
        ("ftp://hooks.example.com/", "only http and https"),
        ("https://user:pw@hooks.example.com/", "user information"),
        ("http://127.0.0.1:9/hook", "--allow-private-webhooks"),
        ("http://169.254.169.254/latest", "--allow-private-webhooks"),
        ("http://10.0.0.8/hook", "--allow-private-webhooks"),
    ] {
        let r = stack
            .admin
            .post_json("/vault/webhooks", &json!({"url": url}))
            .await;
        let body = r.expect_error(400, "invalid_request");
        assert_eq!(body["field"], "url", "{url}: {body}");
        assert!(
            body["message"].as_str().unwrap().contains(says),
            "{url}: {body}"
        );
    }
    let r = stack
        .admin
        .post_json(
            "/vault/webhooks",
            &json!({"url": "https://hooks.example.com/", "thresholds": [0]}),
        )
        .await;
    assert_eq!(
        r.expect_error(400, "invalid_request")["field"],
        "thresholds"
    );
    assert!(
        stack.admin.get("/vault/webhooks").await.expect(200)["webhooks"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_killed_mid_delivery_delivers_after_restart() {
    let mut opts = private_ok();
    // An attempt may take 1 s; a claim lasts 2 x 1 s + 5 s.
    opts.args
        .extend(["--webhook-timeout-ms".into(), "1000".into()]);
    let mut control = Control::start(opts).await;
    // The first delivery is held open by the receiver, so the control
    // plane is killed while it is in flight.
    let receiver = Receiver::start(&[HOLD]).await;
    let (id, _) = register(&control.admin(), json!({"url": receiver.url("/hook")})).await;
    let event = control
        .admin()
        .post_json(&format!("/vault/webhooks/{id}/test"), &json!({}))
        .await
        .expect(202)["event_id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_received(&receiver, 1, Duration::from_secs(10)).await;
    control.kill().await;
    control.restart().await;
    let got = wait_received(&receiver, 2, Duration::from_secs(30)).await;
    assert_eq!(got[1].header("keycap-event-id"), Some(event.as_str()));
    assert_eq!(got[1].answered, 200);
    let delivered = wait_for(within(Duration::from_secs(10)), || async {
        let d = deliveries(&control.admin(), &id).await;
        (d[0]["state"] == "delivered").then_some(d)
    })
    .await
    .expect("recorded delivered after the restart");
    assert_eq!(delivered.len(), 1, "one delivery, not a second event");
}

/// The thresholds this test asks for: charges of 45 to 55 cents under a
/// $20 cap stop short of exactly 100%.
const THRESHOLDS: [u64; 3] = [50, 80, 95];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_threshold_fires_once_with_three_proxies_spending_at_once() {
    let Some(db) = pg::fresh_database_or_skip()
        .await
        .expect("a PostgreSQL database for the test")
    else {
        return;
    };
    let fleet = Fleet::start(
        db,
        &FleetOpts {
            control_args: vec![ALLOW_PRIVATE.into()],
            ..FleetOpts::default()
        },
    )
    .await;
    let receiver = Receiver::start(&[]).await;
    let (id, _) = register(
        &fleet.admin(1),
        json!({"url": receiver.url("/caps"), "events": ["cap.threshold"], "thresholds": THRESHOLDS}),
    )
    .await;
    let key = fleet.mint(0, json!(20), "wh/fleet-run").await;
    let charges = fleet::charges(
        &fleet.agents(&key.secret),
        120,
        24,
        |i| 45 + (i * 7 % 11) as i64,
        Default::default(),
    )
    .await;
    let admitted = charges
        .iter()
        .filter(|c| c.answer.as_ref().is_ok_and(|r| r.status == 200))
        .count();
    assert!(admitted >= 37, "only {admitted} charges admitted");
    // Every admitted charge is reported (and its thresholds checked) once
    // the audit holds it.
    fleet
        .admin(0)
        .wait_audit(&format!("key_id={}", key.id), admitted)
        .await;
    let expected: BTreeSet<(String, u64)> = ["key", "run"]
        .iter()
        .flat_map(|s| THRESHOLDS.iter().map(move |t| (s.to_string(), *t)))
        .collect();
    let got = wait_received(&receiver, expected.len(), Duration::from_secs(30)).await;
    let mut seen = Vec::new();
    for r in &got {
        let v = r.json();
        assert_eq!(v["type"], "cap.threshold");
        assert_eq!(v["data"]["run_label"], "wh/fleet-run");
        seen.push((
            v["data"]["subject"].as_str().unwrap().to_string(),
            v["data"]["threshold_percent"].as_u64().unwrap(),
        ));
    }
    let distinct: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(distinct, expected, "{seen:?}");
    // The outbox is the truth: with all spend recorded, exactly one event
    // per subject and threshold was ever raised, through either replica.
    let outbox = deliveries(&fleet.admin(0), &id).await;
    assert_eq!(outbox.len(), expected.len(), "{outbox:?}");
    assert_eq!(
        seen.len(),
        expected.len(),
        "a threshold was delivered twice: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_adds_lists_tests_and_deletes_an_endpoint_over_grpc() {
    let control = Control::start(private_ok()).await;
    let receiver = Receiver::start(&[503]).await;
    let added = control
        .cli(&[
            "--format",
            "json",
            "webhook",
            "add",
            &receiver.url("/cli"),
            "--event",
            "cap.threshold,key.revoked",
            "--thresholds",
            "80,100",
            "--run-label",
            "cli-run",
        ])
        .await
        .json();
    let id = added["webhook"]["id"].as_str().unwrap().to_string();
    assert_eq!(added["webhook"]["thresholds"], json!([80, 100]));
    assert_eq!(added["webhook"]["run_label"], "cli-run");
    assert!(added["secret"].as_str().unwrap().starts_with("whsec_"));
    let listed = control
        .cli(&["--format", "json", "webhook", "list"])
        .await
        .json();
    assert_eq!(listed["webhooks"][0]["id"], id.as_str());

    let event = control
        .cli(&["--format", "json", "webhook", "test", &id])
        .await
        .json()["event_id"]
        .as_str()
        .unwrap()
        .to_string();
    let got = wait_received(&receiver, 2, Duration::from_secs(20)).await;
    assert_eq!(got[1].header("keycap-event-id"), Some(event.as_str()));
    let shown = wait_for(within(Duration::from_secs(10)), || async {
        let d = control
            .cli(&["--format", "json", "webhook", "deliveries", &id])
            .await
            .json();
        (d["deliveries"][0]["state"] == "delivered").then_some(d)
    })
    .await
    .expect("the delivery shows as delivered");
    let d = &shown["deliveries"][0];
    assert_eq!(d["event_id"], event.as_str());
    // The REST answer's shape (`GET /vault/webhooks/{id}/deliveries`).
    assert_eq!(d["attempts"].as_array().unwrap().len(), 2, "{d}");
    assert_eq!(d["attempts"][0]["status"], 503);
    assert_eq!(d["attempts"][1]["status"], 200);
    assert_eq!(d["payload"]["id"], event.as_str());

    // Bad input is refused with keycap's code.
    let bad = control
        .cli(&["webhook", "add", "https://u:p@hooks.example.com/"])
        .await;
    assert!(!bad.status.success());
    assert!(bad.stderr.contains("invalid_request"), "{}", bad.stderr);

    let deleted = control
        .cli(&["--format", "json", "webhook", "delete", &id])
        .await
        .json();
    assert_eq!(deleted, json!({"deleted": true}));
    let listed = control
        .cli(&["--format", "json", "webhook", "list"])
        .await
        .json();
    assert_eq!(listed["webhooks"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_past_its_rotate_after_is_flagged_and_announced_once() {
    let mut opts = private_ok();
    opts.args
        .extend(["--rotation-check-ms".into(), "100".into()]);
    let control = Control::start(opts).await;
    let admin = control.admin();
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    let receiver = Receiver::start(&[]).await;
    register(
        &admin,
        json!({"url": receiver.url("/rot"), "events": ["credential.rotation_due"]}),
    )
    .await;
    let put = json!({"profile": "stripe", "base_url": mock.url(),
                     "credential": STRIPE_CREDENTIAL, "rotate_after": "2s"});
    let v = admin
        .put_json("/vault/vendors/stripe", &put)
        .await
        .expect(201);
    assert_eq!(v["rotate_after_seconds"], 2);
    assert_eq!(v["rotation_overdue"], false);
    let bad = admin
        .put_json(
            "/vault/vendors/stripe",
            &json!({"profile": "stripe", "base_url": mock.url(), "rotate_after": "soon"}),
        )
        .await;
    assert_eq!(
        bad.expect_error(400, "invalid_request")["field"],
        "rotate_after"
    );

    let first = wait_received(&receiver, 1, Duration::from_secs(20)).await;
    let event = first[0].json();
    assert_eq!(event["type"], "credential.rotation_due");
    assert_eq!(event["data"]["vendor"], "stripe");
    assert_eq!(event["data"]["credential_set_at"], v["credential_set_at"]);
    let read = admin.get("/vault/vendors/stripe").await.expect(200);
    assert_eq!(read["rotation_overdue"], true);

    // A new credential starts again: one more alert, for it, once due.
    let v2 = admin
        .put_json("/vault/vendors/stripe", &put)
        .await
        .expect(200);
    assert_eq!(v2["rotation_overdue"], false);
    let got = wait_received(&receiver, 2, Duration::from_secs(20)).await;
    assert_eq!(
        got[1].json()["data"]["credential_set_at"],
        v2["credential_set_at"]
    );
    // Checks keep running every 100 ms; neither credential is announced
    // again (the outbox holds one event per credential).
    let id = admin.get("/vault/webhooks").await.expect(200)["webhooks"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(deliveries(&admin, &id).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_reporting_a_spool_backlog_is_announced_once_an_hour() {
    use keycap_proto::pb;
    use keycap_proto::pb::fleet_service_client::FleetServiceClient;

    let control = Control::start(private_ok()).await;
    let receiver = Receiver::start(&[]).await;
    register(
        &control.admin(),
        json!({"url": receiver.url("/spool"), "events": ["spool.backlog"]}),
    )
    .await;
    let channel = tonic::transport::Endpoint::from_shared(control.url())
        .unwrap()
        .connect()
        .await
        .expect("gRPC connection");
    let mut fleet = FleetServiceClient::new(channel);
    let report = |depth: i64| {
        let mut r = tonic::Request::new(pb::ReportSpendRequest {
            node_id: "spooling-proxy".into(),
            events: Vec::new(),
            spool_depth: depth,
        });
        let token: tonic::metadata::MetadataValue<_> =
            format!("Bearer {}", control.opts.fleet_token)
                .parse()
                .unwrap();
        r.metadata_mut().insert("authorization", token);
        r
    };
    // Below the threshold: nothing; at or above it: one event this hour,
    // however many reports say so.
    fleet.report_spend(report(999)).await.expect("report");
    for depth in [1000, 4000, 2500] {
        fleet.report_spend(report(depth)).await.expect("report");
    }
    let got = wait_received(&receiver, 1, Duration::from_secs(20)).await;
    let event = got[0].json();
    assert_eq!(event["type"], "spool.backlog");
    assert_eq!(event["data"]["node_id"], "spooling-proxy");
    assert_eq!(event["data"]["spool_depth"], 1000);
    let id = control.admin().get("/vault/webhooks").await.expect(200)["webhooks"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(deliveries(&control.admin(), &id).await.len(), 1);
}

/// Stops the stack's proxy as an operator does (SIGTERM): it reports the
/// refusals of the running minute with its last spend.
async fn stop_proxy(stack: &mut Stack) {
    let status = stack
        .proxy
        .process_mut()
        .terminate(within(Duration::from_secs(30)))
        .await
        .expect("the proxy stops");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_cap_refusals_at_the_proxy_is_announced_once() {
    let mut stack = Stack::start_with(private_ok()).await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let receiver = Receiver::start(&[]).await;
    register(
        &stack.admin,
        json!({"url": receiver.url("/refusals"), "events": ["cap.refusals"]}),
    )
    .await;
    let key = stack
        .mint(&stripe_key_body(
            json!(1),
            &["POST /v1/payment_intents"],
            "wh/refusals",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    dollar_charge(&agent).await.expect(200);
    // The cap is spent: the proxy refuses these itself, and records them.
    for _ in 0..7 {
        dollar_charge(&agent)
            .await
            .expect_error(429, "daily_cap_exceeded");
    }
    stop_proxy(&mut stack).await;

    let got = wait_received(&receiver, 1, Duration::from_secs(30)).await;
    let event = got[0].json();
    assert_eq!(event["type"], "cap.refusals", "{event}");
    assert_eq!(event["data"]["key_id"], key.id.as_str());
    assert_eq!(event["data"]["run_label"], "wh/refusals");
    assert_eq!(event["data"]["refusals"], 7, "{event}");
    assert_eq!(event["data"]["reasons"]["daily_cap_exceeded"], 7, "{event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parent_crossing_a_threshold_through_its_child_is_announced() {
    let (stack, _mock) = {
        let stack = Stack::start_with(private_ok()).await;
        let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
        stack.register("stripe", "stripe", &mock).await;
        (stack, mock)
    };
    let receiver = Receiver::start(&[]).await;
    let parent = stack
        .mint(&stripe_key_body(
            json!(2),
            &["POST /v1/payment_intents"],
            "wh/tree-parent",
        ))
        .await;
    let mut body = stripe_key_body(json!(2), &["POST /v1/payment_intents"], "wh/tree-child");
    body["parent_id"] = json!(parent.id);
    body["expires_in"] = json!("1h");
    let child = stack.mint(&body).await;
    // Only the parent's thresholds are wanted: the parent itself never
    // spends, its child does.
    register(
        &stack.admin,
        json!({"url": receiver.url("/tree"), "events": ["cap.threshold"],
               "thresholds": [50], "key_id": parent.id}),
    )
    .await;
    dollar_charge(&stack.agent(&child.secret)).await.expect(200);

    let got = wait_received(&receiver, 1, Duration::from_secs(30)).await;
    let event = got[0].json();
    assert_eq!(event["type"], "cap.threshold", "{event}");
    assert_eq!(event["data"]["key_id"], parent.id.as_str(), "{event}");
    assert_eq!(event["data"]["threshold_percent"], 50);
    assert_eq!(event["data"]["spent_usd"], "1", "{event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_crossed_before_its_endpoint_existed_is_raised_by_the_sweep() {
    let mut opts = private_ok();
    opts.args
        .extend(["--rotation-check-ms".to_string(), "200".to_string()]);
    let stack = Stack::start_with(opts).await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let key = stack
        .mint(&stripe_key_body(
            json!(2),
            &["POST /v1/payment_intents"],
            "wh/swept",
        ))
        .await;
    dollar_charge(&stack.agent(&key.secret)).await.expect(200);
    stack.wait_key_spend(&key.id, 1_000_000, 1).await;

    // No spend arrives after this: only the sweep can raise the threshold.
    let receiver = Receiver::start(&[]).await;
    register(
        &stack.admin,
        json!({"url": receiver.url("/swept"), "events": ["cap.threshold"],
               "thresholds": [50], "key_id": key.id}),
    )
    .await;
    let got = wait_received(&receiver, 1, Duration::from_secs(30)).await;
    let event = got[0].json();
    assert_eq!(event["type"], "cap.threshold", "{event}");
    assert_eq!(event["data"]["key_id"], key.id.as_str(), "{event}");
    assert_eq!(event["data"]["threshold_percent"], 50);
}
