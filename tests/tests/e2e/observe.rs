//! Observe mode (docs/observe.md) through a fleet: two control-plane
//! replicas over one PostgreSQL and three proxies. A key minted with
//! `"mode": "observe"` forwards the calls its allowlist, rate limit and caps
//! would refuse and marks each in the audit with the rule that would have
//! fired; it is still refused for authentication, pricing and beyond its
//! observe ceiling, which the vendor never sees exceeded. Reports, the dry
//! run and the suggestion show what enforcement would have done, and the
//! key switches to enforcement in place — same id, secret and budget —
//! answered once every proxy enforces it, so the very next call is held to
//! the new policy.

use keycap_tests::fleet::{Fleet, FleetOpts};
use keycap_tests::harness::assert_all_confirmed;
use reqwest::Method;

use super::*;

/// A confirmed $`cents/100` payment intent.
async fn pay(agent: &Api, cents: i64) -> Resp {
    agent
        .send(
            Method::POST,
            "/stripe/v1/payment_intents",
            Some((
                "application/x-www-form-urlencoded",
                format!("amount={cents}&currency=usd&confirm=true").into_bytes(),
            )),
            &[],
        )
        .await
}

/// A read the key's allowlist does not name (free: nothing to reserve).
async fn read_customer(agent: &Api) -> Resp {
    agent
        .send(
            Method::GET,
            "/stripe/v1/customers/cus_NffrFeUfNV2Hib",
            None,
            &[],
        )
        .await
}

/// The `would_refuse` codes of the key's settled entries, oldest first.
async fn marks(admin: &Api, key: &str, n: usize) -> Vec<String> {
    let entries = admin
        .wait_audit(&format!("key_id={key}&outcome=settled&limit=100"), n)
        .await;
    let mut entries: Vec<&Value> = entries.iter().collect();
    entries.sort_by_key(|e| e["seq"].as_i64());
    entries
        .iter()
        .map(|e| {
            let code = e["would_refuse"]["code"].as_str().unwrap_or("");
            let rule = e["would_refuse"]["rule"].as_str().unwrap_or("");
            assert_eq!(code.is_empty(), rule.is_empty(), "{e}");
            code.to_string()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_observed_key_forwards_what_enforcement_would_refuse_and_switches_in_place() {
    let Some(db) = pg::fresh_database_or_skip()
        .await
        .expect("a PostgreSQL database for the test")
    else {
        return;
    };
    let fleet = Fleet::start(db, &FleetOpts::default()).await;
    let admin = fleet.admin(0);

    // Observe mode needs its ceiling, and is for a root key.
    let base = json!({
        "vendor": "stripe",
        "daily_usd_cap": 5,
        "per_call_usd_cap": 3,
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "rate_limit_per_minute": 3,
        "expires_in": "2h",
        "agent_run_label": "observe/e2e",
        "mode": "observe",
    });
    let r = admin.post_json("/vault/keys", &base).await;
    let body = r.expect_error(400, "invalid_request");
    assert_eq!(body["field"], "observe_ceiling_usd", "{body}");
    let mut bad = base.clone();
    bad["mode"] = json!("watch");
    bad["observe_ceiling_usd"] = json!(12);
    assert_eq!(
        admin.post_json("/vault/keys", &bad).await.expect(400)["field"],
        "mode"
    );

    let mut body = base.clone();
    body["observe_ceiling_usd"] = json!(12);
    let minted = admin.post_json("/vault/keys", &body).await.expect(201);
    assert_all_confirmed(&minted);
    assert_eq!(minted["mode"], "observe", "{minted}");
    assert_eq!(minted["observe_ceiling_usd"].as_f64(), Some(12.0));
    assert_eq!(minted["daily_usd_cap"].as_f64(), Some(5.0));
    let id = minted["id"].as_str().expect("id").to_string();
    let secret = minted["key"].as_str().expect("key").to_string();
    let agents = fleet.agents(&secret);

    // An observe key has no children: its budget is the ceiling's.
    let mut child = base.clone();
    child["mode"] = json!("enforce");
    child["parent_id"] = json!(id);
    child["daily_usd_cap"] = json!(1);
    child["per_call_usd_cap"] = json!(1);
    child["rate_limit_per_minute"] = json!(null);
    assert_eq!(
        admin.post_json("/vault/keys", &child).await.expect(400)["field"],
        "parent_id"
    );

    // Within policy, over the per-call cap, and off the allowlist: all
    // forwarded on their first call, through different proxies.
    pay(&agents[0], 200).await.expect(200);
    pay(&agents[0], 400).await.expect(200);
    read_customer(&agents[1]).await.expect(200);
    assert_eq!(fleet.mock.payment_intent_amounts(), [200, 400]);
    // The marks of the daily cap follow the ledger's order of spend: $6
    // settled before the next calls.
    admin.wait_key_spend(&id, 6_000_000, 3).await;

    // Past the daily cap of $5 ($6 settled), and past the rate of three a
    // minute through one proxy: forwarded, each marked. (The rate is per
    // proxy: only proxy 2 uses it up.)
    for _ in 0..4 {
        pay(&agents[2], 100).await.expect(200);
    }
    assert_eq!(fleet.mock.payment_intent_amounts().len(), 6);
    let mut got = marks(&admin, &id, 7).await;
    let mut first = got.drain(..3).collect::<Vec<_>>();
    first.sort();
    assert_eq!(
        first,
        ["", "endpoint_not_allowed", "per_call_cap_exceeded"],
        "the marks of the first three calls"
    );
    assert_eq!(
        got,
        [
            "daily_cap_exceeded",
            "daily_cap_exceeded",
            "daily_cap_exceeded",
            "rate_limited"
        ],
        "the marks of the four calls through proxy 2"
    );

    // Still refused: a wrong key, a call it cannot price, and past the
    // ceiling ($10 spent of $12: a $4 call would pass it). None reaches
    // the vendor.
    let stranger = fleet.proxies[0].api(Some("kc_test_notakey"));
    pay(&stranger, 100).await.expect_error(401, "invalid_key");
    let r = agents[2]
        .send(
            Method::POST,
            "/stripe/v1/payment_intents",
            Some((
                "application/x-www-form-urlencoded",
                b"currency=usd&confirm=true".to_vec(),
            )),
            &[],
        )
        .await;
    assert!(r.status >= 400 && r.status < 500, "{}", r.text);
    let sent = Utc::now();
    let r = pay(&agents[2], 400).await;
    let refusal = assert_cap_refusal_of(&r, 12.0, sent, Utc::now());
    assert!(refusal["remaining_usd"].as_f64() < Some(4.0), "{refusal}");
    assert_eq!(fleet.mock.forwarded_stripe_amount(), 1000);

    // What enforcement would have done: the report and the dry run.
    admin.wait_key_spend(&id, 10_000_000, 7).await;
    let report = fleet
        .admin(1)
        .get("/vault/spend?group_by=key")
        .await
        .expect(200);
    let group = &report["groups"][0];
    assert_eq!(group["key_id"], id.as_str(), "{report}");
    assert_eq!(group["calls"], 7, "{report}");
    assert_eq!(group["would_refuse_calls"], 6, "{report}");
    assert_eq!(group["would_refuse_usd"].as_f64(), Some(8.0), "{report}");
    let dry = fleet
        .admin(1)
        .post_json(
            "/vault/simulate",
            &json!({"key_id": id, "request": {
                "method": "POST", "path": "/v1/payment_intents",
                "headers": {"content-type": "application/x-www-form-urlencoded"},
                "body": "amount=150&currency=usd&confirm=true",
            }}),
        )
        .await
        .expect(200);
    assert_eq!(dry["allowed"], true, "{dry}");
    assert_eq!(dry["would_refuse"]["code"], "daily_cap_exceeded", "{dry}");
    assert_eq!(dry["would_refuse"]["rule"], "daily_cap", "{dry}");
    assert_eq!(
        dry["remaining"]["daily_remaining_usd"].as_f64(),
        Some(2.0),
        "{dry}"
    );

    // The suggestion comes from what was seen: both endpoints, the $4 call.
    let s = admin
        .get(&format!("/vault/keys/{id}/suggest?margin_percent=25"))
        .await
        .expect(200);
    assert_eq!(
        s["suggested"]["allowed_endpoints"],
        json!(["GET /v1/customers/*", "POST /v1/payment_intents"]),
        "{s}"
    );
    assert_eq!(
        s["suggested"]["per_call_usd_cap"].as_f64(),
        Some(5.0),
        "{s}"
    );

    // Switched in place through the other replica, with a daily cap of $11:
    // same id and budget, $10 already spent; answered once every proxy
    // enforces it.
    let switched = fleet
        .admin(1)
        .post_json(
            &format!("/vault/keys/{id}/enforce"),
            &json!({"daily_usd_cap": 11}),
        )
        .await
        .expect(200);
    assert_eq!(
        switched["confirmation"]["all_confirmed"], true,
        "{switched}"
    );
    assert_eq!(switched["id"], id.as_str());
    assert_eq!(switched["mode"], "enforce");
    assert!(switched["observe_ceiling_usd"].is_null(), "{switched}");
    assert_eq!(switched["daily_usd_cap"].as_f64(), Some(11.0));
    assert_eq!(switched["spent_today_usd"].as_f64(), Some(10.0));
    admin
        .post_json(&format!("/vault/keys/{id}/enforce"), &json!({}))
        .await
        .expect_error(409, "conflict");

    // The very next calls meet the policy, on every proxy.
    let before = fleet.mock.payment_intent_amounts().len();
    pay(&agents[0], 400)
        .await
        .expect_error(403, "per_call_cap_exceeded");
    read_customer(&agents[1])
        .await
        .expect_error(403, "endpoint_not_allowed");
    pay(&agents[1], 100).await.expect(200);
    let sent = Utc::now();
    let r = pay(&agents[1], 100).await;
    assert_cap_refusal(&r, 11.0, 0.0, sent, Utc::now());
    assert_eq!(fleet.mock.payment_intent_amounts().len(), before + 1);
    assert_eq!(fleet.mock.forwarded_stripe_amount(), 1100);
    // An enforcing key's calls carry no marks.
    let got = marks(&admin, &id, 8).await;
    assert_eq!(got.last().map(String::as_str), Some(""), "{got:?}");
}

/// Runs the `keycap` CLI against `stack`, asserting it succeeded; its JSON.
async fn cli(stack: &Stack, args: &[&str]) -> Value {
    let out = keycap_tests::harness::keycap_cli(
        &stack.control.url(),
        &stack.control.opts.admin_token,
        args,
    )
    .await;
    assert!(out.status.success(), "keycap {args:?}: {}", out.stderr);
    out.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_and_the_rust_client_observe_a_key_and_switch_it_to_its_suggestion() {
    let (stack, mock) = stack_with_stripe().await;
    let minted = cli(
        &stack,
        &[
            "key",
            "create",
            "--vendor",
            "stripe",
            "--daily-usd-cap",
            "1",
            "--allow",
            "POST /v1/payment_intents",
            "--expires-in",
            "1h",
            "--run-label",
            "observe/cli",
            "--mode",
            "observe",
            "--observe-ceiling-usd",
            "10",
        ],
    )
    .await;
    assert_eq!(minted["mode"], "observe", "{minted}");
    assert_eq!(minted["observe_ceiling_usd"].as_f64(), Some(10.0));
    let id = minted["id"].as_str().expect("id").to_string();
    let agent = stack.agent(minted["key"].as_str().expect("key"));

    // Over the $1 daily cap and off the allowlist, on the first calls.
    pay(&agent, 200).await.expect(200);
    read_customer(&agent).await.expect(200);
    stack.wait_key_spend(&id, 2_000_000, 2).await;
    let mut got = marks(&stack.admin, &id, 2).await;
    got.sort();
    assert_eq!(got, ["daily_cap_exceeded", "endpoint_not_allowed"]);

    // Enforce what was seen, with no margin: both endpoints, $2 a day.
    let switched = cli(
        &stack,
        &["key", "enforce", &id, "--suggested", "--margin", "0"],
    )
    .await;
    assert_eq!(switched["mode"], "enforce", "{switched}");
    assert_eq!(switched["id"], id.as_str());
    assert_eq!(switched["daily_usd_cap"].as_f64(), Some(2.0), "{switched}");
    assert_eq!(
        switched["allowed_endpoints"],
        json!(["GET /v1/customers/*", "POST /v1/payment_intents"])
    );
    assert_eq!(switched["confirmation"]["all_confirmed"], true);
    read_customer(&agent).await.expect(200);
    let sent = Utc::now();
    let r = pay(&agent, 100).await;
    assert_cap_refusal(&r, 2.0, 0.0, sent, Utc::now());
    assert_eq!(mock.forwarded_stripe_amount(), 200);

    // The Rust client: minted observing, switched with its own cap.
    let mut client =
        keycap_client::Client::connect(&stack.control.url(), &stack.control.opts.admin_token, None)
            .await
            .expect("connect");
    let created = client
        .create_key(keycap_client::NewKey {
            vendor: "stripe".into(),
            daily_usd_cap: keycap_client::Micros(1_000_000),
            allowed_endpoints: vec!["POST /v1/payment_intents".into()],
            expires_in: Duration::from_secs(3600),
            agent_run_label: "observe/rust".into(),
            observe_ceiling_usd: Some(keycap_client::Micros(5_000_000)),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(created.info.mode, "observe");
    assert_eq!(created.info.observe_ceiling_micros, 5_000_000);
    let enforced = client
        .enforce_key(
            created.id(),
            keycap_client::Enforce {
                daily_usd_cap: Some(keycap_client::Micros(3_000_000)),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let key = enforced.key.unwrap();
    assert_eq!(
        (key.mode.as_str(), key.daily_cap_micros),
        ("enforce", 3_000_000)
    );
    assert!(enforced.confirmation.unwrap().unconfirmed_nodes.is_empty());
    let again = client
        .enforce_key(created.id(), keycap_client::Enforce::default())
        .await
        .unwrap_err();
    assert_eq!(again.code(), "conflict");

    // An observe key is refused once revoked, like any key, and a revoked
    // key is not switched.
    let watching = client
        .create_key(keycap_client::NewKey {
            vendor: "stripe".into(),
            daily_usd_cap: keycap_client::Micros(1_000_000),
            allowed_endpoints: vec!["POST /v1/payment_intents".into()],
            expires_in: Duration::from_secs(3600),
            agent_run_label: "observe/revoked".into(),
            observe_ceiling_usd: Some(keycap_client::Micros(5_000_000)),
            ..Default::default()
        })
        .await
        .unwrap();
    let agent = stack.agent(&watching.key);
    read_customer(&agent).await.expect(200);
    client.revoke_key(watching.id()).await.unwrap();
    read_customer(&agent).await.expect_error(401, "key_revoked");
    let revoked = client
        .enforce_key(watching.id(), keycap_client::Enforce::default())
        .await
        .unwrap_err();
    assert_eq!(revoked.code(), "conflict");
}
