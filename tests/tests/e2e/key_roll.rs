//! Vault key rolls through a real proxy: a successor works on its first
//! call, the rolled key works through its grace and is then refused, and
//! however often a key is rolled and whichever keys of the chain call, the
//! vendor never receives more than the chain's one daily cap.

use super::*;

/// `POST /vault/keys/{id}/roll` with `body`.
async fn roll(stack: &Stack, id: &str, body: &Value) -> Resp {
    stack
        .admin
        .post_json(&format!("/vault/keys/{id}/roll"), body)
        .await
}

/// Rolls `id` with `grace`, asserting the answer; returns the successor.
async fn rolled(stack: &Stack, id: &str, grace: &str, budget: &str) -> MintedKey {
    let r = roll(stack, id, &json!({ "grace": grace })).await;
    let body = r.expect(201);
    assert_eq!(body["confirmation"]["all_confirmed"], true, "{body}");
    assert_eq!(body["rolled_from"], id, "{body}");
    assert_eq!(body["budget_id"], budget, "{body}");
    assert_eq!(body["status"], "active", "{body}");
    assert_eq!(body["rolled"]["id"], id, "{body}");
    assert_eq!(body["rolled"]["successor"], body["id"], "{body}");
    assert!(body["rolled"]["grace_ends_at"].is_string(), "{body}");
    MintedKey {
        id: body["id"].as_str().expect("id").to_string(),
        secret: body["key"].as_str().expect("key").to_string(),
        body,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_a_key_never_raises_what_its_chain_may_spend() {
    let (stack, mock) = stack_with_stripe().await;
    let first = stack
        .mint(&stripe_key_body(
            json!(6),
            &["POST /v1/payment_intents"],
            "make-scenario/roll",
        ))
        .await;
    let a = stack.agent(&first.secret);
    for _ in 0..2 {
        dollar_charge(&a).await.expect(200);
    }
    stack.wait_key_spend(&first.id, 2_000_000, 2).await;

    // The successor serves its very first call, and the rolled key keeps
    // working through its grace; both spend the one budget.
    let second = rolled(&stack, &first.id, "3s", &first.id).await;
    assert_eq!(second.body["spent_today_usd"].as_f64(), Some(2.0));
    assert_eq!(second.body["daily_usd_cap"].as_f64(), Some(6.0));
    // A dry run of the successor's call sees the chain's budget: $4 left.
    let dry = stack
        .admin
        .post_json(
            "/vault/simulate",
            &json!({"key_id": second.id, "request": {
                "method": "POST", "path": "/v1/payment_intents",
                "headers": {"content-type": "application/x-www-form-urlencoded"},
                "body": "amount=100&currency=usd&confirm=true",
            }}),
        )
        .await
        .expect(200);
    assert_eq!(dry["allowed"], true, "{dry}");
    assert_eq!(
        dry["remaining"]["daily_remaining_usd"].as_f64(),
        Some(4.0),
        "{dry}"
    );
    let b = stack.agent(&second.secret);
    dollar_charge(&b).await.expect(200);
    dollar_charge(&a).await.expect(200);

    // A key is rolled once; its successor is what rolls next.
    roll(&stack, &first.id, &json!({}))
        .await
        .expect_error(409, "key_already_rolled");
    roll(&stack, &second.id, &json!({"grace": "25h"}))
        .await
        .expect_error(400, "invalid_request");
    let third = rolled(&stack, &second.id, "1h", &first.id).await;
    let c = stack.agent(&third.secret);

    // The first key's grace ends: it is refused (the proxies confirm the
    // revocation), while the chain's budget and leases live on.
    let retired = wait_until(within(Duration::from_secs(15)), || async {
        stack.key(&first.id).await["status"] == "revoked"
    })
    .await;
    assert!(retired, "the rolled key was not revoked after its grace");
    assert_refused_in_time(
        &stack.proxy.url(),
        "stripe",
        &first.secret,
        "key_revoked",
        Instant::now(),
    )
    .await;
    let before = mock.forwarded_stripe_amount();
    dollar_charge(&a).await.expect_error(401, "key_revoked");
    assert_eq!(mock.forwarded_stripe_amount(), before);
    dollar_charge(&c).await.expect(200);

    // $5 of $6 spent over three keys: of ten concurrent $1 charges over the
    // two live keys exactly one fits, and the next refusal is at the cap.
    let ok = dollar_charges(&[b.clone(), c.clone()], 10).await;
    assert_eq!(ok, 1, "{ok} charges admitted with $1 of the cap left");
    assert_eq!(mock.forwarded_stripe_amount(), 600);
    let sent = Utc::now();
    let r = dollar_charge(&c).await;
    assert_cap_refusal(&r, 6.0, 0.0, sent, Utc::now());
    assert_eq!(mock.forwarded_stripe_amount(), 600);

    // Every key of the chain reads the shared budget; each call's audit
    // entry names the key that made it.
    let head = stack.wait_key_spend(&third.id, 6_000_000, 6).await;
    assert_eq!(head["budget_id"], first.id, "{head}");
    assert_eq!(head["rolled_from"], second.id, "{head}");
    let old = stack.key(&first.id).await;
    assert_eq!(old["successor"], second.id, "{old}");
    assert_eq!(old["spent_today_usd"].as_f64(), Some(6.0), "{old}");
    let mut forwarded = 0;
    for (key, at_least) in [(&first.id, 3), (&second.id, 1), (&third.id, 1)] {
        let entries: Vec<Value> = stack.audit(&format!("key_id={key}&outcome=settled")).await;
        assert!(
            entries.len() >= at_least,
            "{key}: {} settled calls in the audit",
            entries.len()
        );
        assert!(entries.iter().all(|e| e["key_id"] == *key));
        forwarded += entries.len();
    }
    assert_eq!(forwarded, 6, "six calls forwarded over the chain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_key_can_be_revoked_during_its_grace_and_revoking_the_successor_ends_the_chain() {
    let (stack, _mock) = stack_with_stripe().await;
    let first = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/payment_intents"],
            "make-scenario/roll-revoke",
        ))
        .await;
    let second = rolled(&stack, &first.id, "1h", &first.id).await;
    let (a, b) = (stack.agent(&first.secret), stack.agent(&second.secret));
    dollar_charge(&a).await.expect(200);

    // Revoking the rolled key ends its grace early; its successor spends on.
    stack
        .admin
        .delete(&format!("/vault/keys/{}", first.id))
        .await
        .expect(200);
    let since = Instant::now();
    assert_refused_in_time(
        &stack.proxy.url(),
        "stripe",
        &first.secret,
        "key_revoked",
        since,
    )
    .await;
    dollar_charge(&b).await.expect(200);
    assert_eq!(stack.key(&second.id).await["status"], "active");

    // A revoked key cannot be rolled.
    roll(&stack, &first.id, &json!({}))
        .await
        .expect_error(409, "key_already_rolled");
    // Revoking the chain's head revokes the budget.
    stack
        .admin
        .delete(&format!("/vault/keys/{}", second.id))
        .await
        .expect(200);
    let since = Instant::now();
    assert_refused_in_time(
        &stack.proxy.url(),
        "stripe",
        &second.secret,
        "key_revoked",
        since,
    )
    .await;
    roll(&stack, &second.id, &json!({}))
        .await
        .expect_error(409, "conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_rolls_a_key_and_prints_the_successor_once() {
    let (stack, _mock) = stack_with_stripe().await;
    let first = stack
        .mint(&stripe_key_body(
            json!(3),
            &["POST /v1/payment_intents"],
            "make-scenario/roll-cli",
        ))
        .await;
    let (url, token) = (stack.control.url(), stack.control.opts.admin_token.clone());
    let out = keycap_cli(&url, &token, &["key", "roll", &first.id, "--grace", "90s"])
        .await
        .json();
    let secret = out["key"].as_str().expect("the successor's secret");
    assert!(secret::is_well_formed(SecretKind::VaultKey, secret));
    assert_eq!(out["rolled_from"], first.id.as_str(), "{out}");
    assert_eq!(out["budget_id"], first.id.as_str(), "{out}");
    assert_eq!(out["confirmation"]["all_confirmed"], true, "{out}");
    assert_eq!(out["rolled"]["successor"], out["id"], "{out}");
    dollar_charge(&stack.agent(secret)).await.expect(200);
    let again = keycap_cli(&url, &token, &["key", "roll", &first.id]).await;
    assert!(!again.status.success());
    assert!(
        again.stderr.contains("key_already_rolled"),
        "{}",
        again.stderr
    );
    let read = keycap_cli(&url, &token, &["key", "get", &first.id]).await;
    assert!(!read.stdout.contains(secret), "{}", read.stdout);
}
