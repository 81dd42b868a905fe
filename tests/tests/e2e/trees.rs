//! Budget trees through a real proxy: children minted under a parent key
//! draw on the parent's cap as well as their own, so however calls are
//! spread over the children the vendor never receives more than the
//! parent's cap; revoking the parent revokes the children.

use super::*;

/// Mints a $`cap` Stripe child of `parent` for charges.
async fn mint_child(stack: &Stack, parent: &str, cap: u32, label: &str) -> MintedKey {
    let mut body = stripe_key_body(json!(cap), &["POST /v1/payment_intents"], label);
    body["parent_id"] = json!(parent);
    body["expires_in"] = json!("1h");
    let key = stack.mint(&body).await;
    assert_eq!(key.body["parent_id"], parent, "{}", key.body);
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_never_spend_more_than_their_parents_cap() {
    let (stack, mock) = stack_with_stripe().await;
    let parent = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/*"],
            "make-scenario/trees",
        ))
        .await;
    assert_eq!(parent.body["parent_id"], Value::Null);
    let children = [
        mint_child(&stack, &parent.id, 8, "make-scenario/trees/1").await,
        mint_child(&stack, &parent.id, 8, "make-scenario/trees/2").await,
    ];

    // A child may not be wider than its parent.
    let mut too_big = stripe_key_body(json!(11), &["POST /v1/payment_intents"], "x");
    too_big["parent_id"] = json!(parent.id);
    too_big["expires_in"] = json!("1h");
    let r = stack.admin.post_json("/vault/keys", &too_big).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let mut wider = stripe_key_body(json!(1), &["GET /v1/customers"], "x");
    wider["parent_id"] = json!(parent.id);
    wider["expires_in"] = json!("1h");
    let r = stack.admin.post_json("/vault/keys", &wider).await;
    assert_eq!(r.status, 400, "{}", r.text);
    let mut orphan = stripe_key_body(json!(1), &["POST /v1/payment_intents"], "x");
    orphan["parent_id"] = json!("key_0000");
    let r = stack.admin.post_json("/vault/keys", &orphan).await;
    assert_eq!(r.status, 404, "{}", r.text);

    // 30 concurrent $1 charges over both children: $16 of child caps, $10
    // of parent cap.
    let agents = [
        stack.agent(&children[0].secret),
        stack.agent(&children[1].secret),
    ];
    let ok = dollar_charges(&agents, 30).await;
    assert!(ok <= 10, "{ok} charges of $1 admitted under a $10 parent");
    assert!(ok > 0, "no charge went through");
    assert!(
        mock.forwarded_stripe_amount() <= 1000,
        "the vendor received {} cents under a $10 parent",
        mock.forwarded_stripe_amount()
    );
    assert_eq!(mock.forwarded_stripe_amount(), 100 * ok);

    // Revoking the parent revokes both children.
    let r = stack
        .admin
        .delete(&format!("/vault/keys/{}", parent.id))
        .await;
    let revoked_at = Instant::now();
    r.expect(200);
    for child in &children {
        assert_refused_in_time(
            &stack.proxy.url(),
            "stripe",
            &child.secret,
            "key_revoked",
            revoked_at,
        )
        .await;
        assert_eq!(stack.key(&child.id).await["status"], "revoked");
    }
    let before = mock.calls().len();
    agents[0]
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await
        .expect_error(401, "key_revoked");
    assert_eq!(
        mock.calls().len(),
        before,
        "a revoked child's call was forwarded"
    );
}
