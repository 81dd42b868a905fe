//! The approval gate (docs/approvals.md) through a fleet: two control-plane
//! replicas over one PostgreSQL and three proxies. A call above its key's
//! `approval_above_usd` is refused with `approval_required` and reaches no
//! vendor; a person approves it with a reason through one replica; the
//! agent's identical retry through another proxy is forwarded once, and
//! every other use is refused with its own code. Fifty concurrent retries
//! of one approval over the three proxies forward exactly one call.

use keycap_tests::fleet::{Fleet, FleetOpts};
use keycap_tests::harness::assert_all_confirmed;
use reqwest::Method;

use super::*;

/// A $`cents/100` confirmed payment intent, with `Keycap-Approval` when
/// `approval` is given.
async fn pay(agent: &Api, cents: i64, approval: Option<&str>) -> Resp {
    let headers: Vec<(&str, &str)> = approval
        .map(|a| vec![("keycap-approval", a)])
        .unwrap_or_default();
    agent
        .send(
            Method::POST,
            "/stripe/v1/payment_intents",
            Some((
                "application/x-www-form-urlencoded",
                format!("amount={cents}&currency=usd&confirm=true").into_bytes(),
            )),
            &headers,
        )
        .await
}

/// Holds a `cents` call for approval; returns keycap's refusal fields.
async fn held(agent: &Api, cents: i64) -> Value {
    let r = pay(agent, cents, None).await;
    let body = r.expect_error(403, "approval_required");
    assert!(
        body["approval_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("apr_")),
        "{body}"
    );
    assert_eq!(body["quote_usd"], json!(cents as f64 / 100.0), "{body}");
    assert!(body["expires_at"].as_str().is_some(), "{body}");
    let id = body["approval_id"].as_str().unwrap();
    assert!(
        body["approval_url"]
            .as_str()
            .is_some_and(|u| u.ends_with(&format!("/ui/approvals/{id}"))),
        "{body}"
    );
    // Not a 429: an SDK must not retry it on its own.
    assert_eq!(r.header("x-should-retry"), Some("false"));
    body
}

fn id_of(refusal: &Value) -> String {
    refusal["approval_id"]
        .as_str()
        .expect("approval id")
        .to_string()
}

async fn decide(admin: &Api, id: &str, verdict: &str, reason: &str) -> Resp {
    admin
        .post_json(
            &format!("/vault/approvals/{id}/{verdict}"),
            &json!({"reason": reason}),
        )
        .await
}

/// Mints a Stripe key through replica `via` that needs approval above $10.
async fn gated_key(fleet: &Fleet, via: usize, label: &str) -> MintedKey {
    let body = fleet
        .admin(via)
        .post_json(
            "/vault/keys",
            &json!({
                "vendor": "stripe",
                "daily_usd_cap": 1000,
                "allowed_endpoints": ["POST /v1/payment_intents"],
                "expires_in": "2h",
                "agent_run_label": label,
                "approval_above_usd": 10,
            }),
        )
        .await
        .expect(201);
    assert_eq!(body["approval_above_usd"], json!(10.0), "{body}");
    assert_all_confirmed(&body);
    MintedKey {
        id: body["id"].as_str().expect("key id").to_string(),
        secret: body["key"].as_str().expect("key secret").to_string(),
        body,
    }
}

fn forwarded(fleet: &Fleet) -> usize {
    fleet.mock.payment_intent_amounts().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_approved_call_is_forwarded_once_across_the_fleet_and_every_misuse_has_its_code() {
    let Some(db) = pg::fresh_database_or_skip()
        .await
        .expect("a PostgreSQL database for the test")
    else {
        return;
    };
    let fleet = Fleet::start(db, &FleetOpts::default()).await;
    let key = gated_key(&fleet, 0, "approvals/e2e").await;
    let agents = fleet.agents(&key.secret);

    // Below the threshold: forwarded as ever.
    pay(&agents[0], 500, None).await.expect(200);
    assert_eq!(forwarded(&fleet), 1);

    // Above it: held, nothing reserved, nothing sent.
    let refusal = held(&agents[0], 5000).await;
    let id = id_of(&refusal);
    assert_eq!(forwarded(&fleet), 1, "a held call reached the vendor");
    let shown = fleet
        .admin(1)
        .get(&format!("/vault/approvals/{id}"))
        .await
        .expect(200);
    assert_eq!(shown["state"], "pending", "{shown}");
    assert_eq!(shown["key_id"], key.id.as_str());
    assert_eq!(shown["quote_usd"], json!(50.0));
    let pending = fleet
        .admin(0)
        .get("/vault/approvals?state=pending")
        .await
        .expect(200);
    assert!(
        pending["approvals"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["id"] == id.as_str()),
        "{pending}"
    );

    // Retried before anyone decided: still pending.
    pay(&agents[1], 5000, Some(&id))
        .await
        .expect_error(403, "approval_pending");

    // A read-only token sees it but cannot decide it.
    let (_, reader, _) = admin_tokens::create_token(
        &fleet.admin(0),
        json!({"name": "reader", "scopes": ["keys:read"]}),
    )
    .await;
    let reader = Api::new(&fleet.controls[1].url(), Some(&reader));
    reader
        .get(&format!("/vault/approvals/{id}"))
        .await
        .expect(200);
    decide(&reader, &id, "approve", "looks fine")
        .await
        .expect_error(403, "missing_scope");
    // A decision needs a reason.
    decide(&fleet.admin(1), &id, "approve", " ")
        .await
        .expect_error(400, "invalid_request");

    // Approved through the other replica, with a reason.
    let approved = decide(&fleet.admin(1), &id, "approve", "invoice 4711 is due")
        .await
        .expect(200);
    assert_eq!(approved["state"], "approved", "{approved}");
    assert_eq!(approved["reason"], "invoice 4711 is due");
    assert!(
        approved["decided_by"]
            .as_str()
            .is_some_and(|b| b.contains("bootstrap")),
        "{approved}"
    );
    decide(&fleet.admin(0), &id, "deny", "changed my mind")
        .await
        .expect_error(409, "conflict");

    // A different body is another request.
    pay(&agents[2], 5001, Some(&id))
        .await
        .expect_error(403, "approval_request_mismatch");
    // Another key cannot use it.
    let other = gated_key(&fleet, 1, "approvals/other").await;
    pay(&fleet.agents(&other.secret)[0], 5000, Some(&id))
        .await
        .expect_error(403, "approval_key_mismatch");
    assert_eq!(forwarded(&fleet), 1, "a refused retry reached the vendor");

    // The identical retry, through another proxy: forwarded once, without
    // keycap's header.
    pay(&agents[1], 5000, Some(&id)).await.expect(200);
    assert_eq!(fleet.mock.payment_intent_amounts(), vec![500, 5000]);
    let last = fleet.mock.calls().last().cloned().expect("a call");
    assert_eq!(last.header("keycap-approval"), None);
    // A second use, anywhere, is refused.
    for agent in &agents {
        pay(agent, 5000, Some(&id))
            .await
            .expect_error(403, "approval_used");
    }
    assert_eq!(forwarded(&fleet), 2);
    let used = fleet
        .admin(0)
        .get(&format!("/vault/approvals/{id}"))
        .await
        .expect(200);
    assert_eq!(used["state"], "used", "{used}");

    // Denied: refused with its own code.
    let denied = id_of(&held(&agents[2], 7000).await);
    decide(&fleet.admin(0), &denied, "deny", "not in this budget")
        .await
        .expect(200);
    pay(&agents[2], 7000, Some(&denied))
        .await
        .expect_error(403, "approval_denied");
    // An id that was never issued.
    pay(
        &agents[0],
        7000,
        Some("apr_00000000000000000000000000000000"),
    )
    .await
    .expect_error(403, "approval_unknown");

    // Fifty concurrent retries of one approval over three proxies: one
    // reaches the vendor.
    let race = id_of(&held(&agents[0], 2500).await);
    decide(&fleet.admin(1), &race, "approve", "one refund")
        .await
        .expect(200);
    let before = forwarded(&fleet);
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let agent = agents[i % agents.len()].clone();
            let race = race.clone();
            tokio::spawn(async move { pay(&agent, 2500, Some(&race)).await })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        let r = t.await.expect("retry task");
        if r.status == 200 {
            ok += 1;
        } else {
            r.expect_error(403, "approval_used");
        }
    }
    assert_eq!(ok, 1, "{ok} retries of one approval were answered 200");
    assert_eq!(
        forwarded(&fleet) - before,
        1,
        "the vendor saw more than one"
    );

    // The audit names the approval, who decided it and why.
    let entries = fleet
        .admin(0)
        .wait_audit(&format!("key_id={}", key.id), 3)
        .await;
    let under: Vec<&Value> = entries
        .iter()
        .filter(|e| !e["approval"].is_null())
        .collect();
    assert_eq!(under.len(), 2, "{entries:?}");
    let first = under
        .iter()
        .find(|e| e["approval"]["id"] == id.as_str())
        .expect("the approved call's entry");
    assert_eq!(first["approval"]["reason"], "invoice 4711 is due");
    assert!(first["approval"]["decided_by"]
        .as_str()
        .is_some_and(|b| b.contains("bootstrap")));
    assert_eq!(first["cost_micros"], 50_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_approval_can_be_neither_decided_nor_used() {
    let (stack, mock) = {
        let mut opts = ControlOpts::sqlite();
        opts.args.extend(["--approval-ttl-secs".into(), "1".into()]);
        let stack = Stack::start_with(opts).await;
        let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
        stack.register("stripe", "stripe", &mock).await;
        (stack, mock)
    };
    let mut body = stripe_key_body(json!(100), &["POST /v1/payment_intents"], "approvals/ttl");
    body["approval_above_usd"] = json!("10");
    let key = stack.mint(&body).await;
    let agent = stack.agent(&key.secret);

    // Approved at once, used too late.
    let late = id_of(&held(&agent, 2000).await);
    decide(&stack.admin, &late, "approve", "ok")
        .await
        .expect(200);
    // Never decided.
    let undecided = id_of(&held(&agent, 3000).await);
    let expired = wait_until(within(Duration::from_secs(10)), || async {
        let a = stack
            .admin
            .get(&format!("/vault/approvals/{undecided}"))
            .await
            .expect(200);
        a["state"] == "expired"
    })
    .await;
    assert!(expired, "the approval never expired");
    let a = stack
        .admin
        .get(&format!("/vault/approvals/{late}"))
        .await
        .expect(200);
    assert_eq!(a["state"], "expired", "{a}");
    decide(&stack.admin, &undecided, "approve", "too late")
        .await
        .expect_error(409, "conflict");
    pay(&agent, 2000, Some(&late))
        .await
        .expect_error(403, "approval_expired");
    pay(&agent, 3000, Some(&undecided))
        .await
        .expect_error(403, "approval_expired");
    assert!(mock.payment_intent_amounts().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_is_gated_at_its_parents_lower_threshold() {
    let (stack, mock) = stack_with_stripe().await;
    let mut parent = stripe_key_body(json!(100), &["POST /v1/payment_intents"], "approvals/tree");
    parent["approval_above_usd"] = json!(5);
    let parent = stack.mint(&parent).await;
    let mut child = stripe_key_body(json!(50), &["POST /v1/payment_intents"], "approvals/tree/1");
    child["parent_id"] = json!(parent.id);
    child["expires_in"] = json!("1h");
    child["approval_above_usd"] = json!(20);
    let child = stack.mint(&child).await;
    assert_eq!(
        child.body["approval_above_usd"],
        json!(5.0),
        "{}",
        child.body
    );
    // A dry run says so before the agent tries.
    let dry = |amount: i64| {
        let admin = stack.admin.clone();
        let key = child.id.clone();
        async move {
            admin
                .post_json(
                    "/vault/simulate",
                    &json!({"key_id": key, "request": {
                        "method": "POST", "path": "/v1/payment_intents",
                        "headers": {"content-type": "application/x-www-form-urlencoded"},
                        "body": format!("amount={amount}&currency=usd"),
                    }}),
                )
                .await
                .expect(200)
        }
    };
    assert_eq!(dry(400).await["allowed"], true);
    let gated = dry(600).await;
    assert_eq!(gated["allowed"], false, "{gated}");
    assert_eq!(gated["refusal"]["code"], "approval_required", "{gated}");
    let agent = stack.agent(&child.secret);
    pay(&agent, 400, None).await.expect(200);
    held(&agent, 600).await;
    assert_eq!(mock.payment_intent_amounts(), vec![400]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_decides_with_the_cli_and_the_webhooks_announce_the_hold_and_the_decision() {
    let mut opts = ControlOpts::sqlite();
    opts.args.push("--allow-private-webhooks".into());
    let stack = Stack::start_with(opts).await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    let receiver = keycap_tests::receiver::Receiver::start(&[]).await;
    stack
        .admin
        .post_json(
            "/vault/webhooks",
            &json!({"url": receiver.url("/hook"), "events": ["approval.requested", "approval.decided"]}),
        )
        .await
        .expect(201);
    let key = stack
        .mint(&json!({
            "vendor": "stripe", "daily_usd_cap": 1000, "expires_in": "1h",
            "allowed_endpoints": ["POST /v1/payment_intents"],
            "agent_run_label": "approvals/cli", "approval_above_usd": 10,
        }))
        .await;
    let agent = stack.agent(&key.secret);

    // Held: the person hears of it by webhook, with the link to decide.
    let first = id_of(&held(&agent, 5000).await);
    let second = id_of(&held(&agent, 7000).await);
    let listed = stack
        .control
        .cli(&["approval", "list", "--state", "pending"])
        .await
        .json();
    let pending: Vec<&str> = listed["approvals"]
        .as_array()
        .expect("approvals")
        .iter()
        .filter_map(|a| a["id"].as_str())
        .collect();
    assert_eq!(pending.len(), 2, "{listed}");
    assert!(pending.contains(&first.as_str()) && pending.contains(&second.as_str()));

    // Decided from the command line, each with its reason.
    let approved = stack
        .control
        .cli(&[
            "approval",
            "approve",
            &first,
            "--reason",
            "invoice 77 is due",
        ])
        .await
        .json();
    assert_eq!(approved["state"], "approved", "{approved}");
    let denied = stack
        .control
        .cli(&["approval", "deny", &second, "--reason", "not ours"])
        .await
        .json();
    assert_eq!(denied["state"], "denied", "{denied}");
    let shown = stack
        .control
        .cli(&["approval", "show", &first])
        .await
        .json();
    assert_eq!(shown["reason"], "invoice 77 is due", "{shown}");

    pay(&agent, 5000, Some(&first)).await.expect(200);
    pay(&agent, 7000, Some(&second))
        .await
        .expect_error(403, "approval_denied");
    assert_eq!(mock.payment_intent_amounts(), [5000]);

    // Four events: two holds and two decisions, each naming its approval.
    let got = wait_for(within(Duration::from_secs(20)), || async {
        let got = receiver.received();
        (got.len() >= 4).then_some(got)
    })
    .await
    .expect("four approval events delivered");
    let events: Vec<Value> = got.iter().map(|r| r.json()).collect();
    let of = |kind: &str, id: &str| {
        events
            .iter()
            .find(|e| e["type"] == kind && e["data"]["approval_id"] == id)
            .unwrap_or_else(|| panic!("no {kind} for {id}: {events:?}"))
            .clone()
    };
    let requested = of("approval.requested", &first);
    assert_eq!(requested["data"]["quote_usd"], "50", "{requested}");
    assert!(requested["data"]["approval_url"]
        .as_str()
        .is_some_and(|u| u.ends_with(&format!("/ui/approvals/{first}"))));
    let decided = of("approval.decided", &first);
    assert_eq!(decided["data"]["state"], "approved", "{decided}");
    assert_eq!(decided["data"]["reason"], "invoice 77 is due");
    assert!(decided["data"]["decided_by"].is_string(), "{decided}");
    of("approval.requested", &second);
    assert_eq!(of("approval.decided", &second)["data"]["state"], "denied");
}
