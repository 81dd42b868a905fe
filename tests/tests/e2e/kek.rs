//! Rotating the key-encryption key under vendor credentials while the proxy
//! keeps serving.

use super::*;

async fn pay(agent: &Api) -> Resp {
    agent
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=500&currency=usd&confirm=true",
        )
        .await
}

async fn rotate(stack: &Stack) -> (bool, Value, String) {
    let out = keycap_cli(
        &stack.control.url(),
        &stack.control.opts.admin_token,
        &["admin", "rotate-kek"],
    )
    .await;
    let report = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("rotate-kek printed no JSON ({e}): {out:?}"));
    (out.status.success(), report, out.stderr)
}

#[tokio::test]
async fn the_master_key_rotates_while_the_proxy_serves() {
    let (mut stack, mock) = stack_with_stripe().await;
    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["POST /v1/payment_intents"],
            "kek/1",
        ))
        .await;
    let agent = stack.agent(&key.secret);
    assert_eq!(pay(&agent).await.status, 200);
    let old = stack.control.opts.master_key.clone();
    let new = harness::master_key();

    // A replica given only the new key cannot open what the old one sealed,
    // and says which vendor rather than skipping it.
    stack.control.opts.master_key = new.clone();
    stack.control.restart().await;
    let (ok, report, stderr) = rotate(&stack).await;
    assert!(!ok, "a rotation that left a credential behind must fail");
    assert_eq!(report["failed_vendors"], json!(["stripe"]), "{report}");
    assert_eq!(report["rewrapped"], 0);
    assert!(stderr.contains("stripe"), "{stderr}");
    // The proxy kept its policy and served throughout.
    assert_eq!(pay(&agent).await.status, 200);

    // With the old key as previous, the rotation moves every data key.
    stack.control.opts.previous_master_keys = vec![old.clone()];
    stack.control.restart().await;
    let (ok, report, stderr) = rotate(&stack).await;
    assert!(ok, "{stderr}");
    assert_eq!(report["rewrapped"], 1, "{report}");
    assert_eq!(report["already_current"], 0);
    assert_eq!(report["failed_vendors"], json!([]));
    let kek_id = report["kek_id"].as_str().expect("kek id").to_string();
    assert!(!kek_id.is_empty() && !new.contains(&kek_id) && !old.contains(&kek_id));
    let (ok, again, _) = rotate(&stack).await;
    assert!(ok);
    assert_eq!(again["rewrapped"], 0, "a second rotation has nothing to do");
    assert_eq!(again["already_current"], 1);
    assert_eq!(again["kek_id"], json!(kek_id));
    assert_eq!(pay(&agent).await.status, 200);

    // The old key retired: a proxy that starts now gets the credential
    // opened under the new key alone, and the vendor sees the real one.
    stack.control.opts.previous_master_keys.clear();
    stack.control.restart().await;
    let fresh = Proxy::start(
        &stack.control.url(),
        &stack.control.opts.fleet_token,
        "kek-fresh",
    )
    .await;
    let seen = mock.calls().len();
    let r = pay(&Api::new(&fresh.url(), Some(&key.secret))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let calls = mock.calls();
    assert_eq!(calls.len(), seen + 1);
    assert_eq!(
        calls.last().and_then(|c| c.authorization()),
        Some(format!("Bearer {STRIPE_CREDENTIAL}").as_str())
    );
}
