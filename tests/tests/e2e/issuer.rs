//! Issuer tokens over REST: an admin makes one for a key; the token mints
//! children of that key (each within it, like any child) and nothing else;
//! the children's spend draws on the key's cap through a real proxy; a
//! revoked token, or a token whose key is revoked, mints nothing.

use super::*;

/// POST /vault/keys/{key}/issuer-tokens as `admin`, asserting 201;
/// (id, token, body).
async fn create_issuer(admin: &Api, key_id: &str, name: &str) -> (String, String, Value) {
    let b = admin
        .post_json(
            &format!("/vault/keys/{key_id}/issuer-tokens"),
            &json!({"name": name}),
        )
        .await
        .expect(201);
    let id = b["id"].as_str().expect("token id").to_string();
    let token = b["token"].as_str().expect("token text").to_string();
    (id, token, b)
}

/// A $`cap` Stripe child body for charges, without a parent (the issuer's
/// key is implied).
fn child_body(cap: u32, label: &str) -> Value {
    let mut body = stripe_key_body(json!(cap), &["POST /v1/payment_intents"], label);
    body["expires_in"] = json!("1h");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_token_mints_children_of_its_key_and_nothing_else() {
    let (stack, mock) = stack_with_stripe().await;
    let parent = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/*"],
            "make-scenario/iss",
        ))
        .await;
    let other = stack
        .mint(&stripe_key_body(
            json!(10),
            &["POST /v1/*"],
            "make-scenario/other",
        ))
        .await;

    // Made by an admin token with keys:issue, shown once.
    let (token_id, token, created) = create_issuer(&stack.admin, &parent.id, "checkout").await;
    assert!(
        secret::is_well_formed(SecretKind::IssuerToken, &token),
        "{token}"
    );
    assert!(token.starts_with("kciss_live_"), "{token}");
    assert_eq!(created["key_id"], parent.id.as_str());
    assert_eq!(created["status"], "active");
    let listed = stack
        .admin
        .get(&format!("/vault/keys/{}/issuer-tokens", parent.id))
        .await;
    assert!(!listed.text.contains(&token), "{}", listed.text);
    assert_eq!(
        listed.expect(200)["issuer_tokens"][0]["id"],
        token_id.as_str()
    );
    let control_url = stack.control.url();
    let reader = stack
        .admin
        .post_json(
            "/vault/admin-tokens",
            &json!({"name": "reader", "scopes": ["keys:read"]}),
        )
        .await
        .expect(201)["token"]
        .as_str()
        .expect("token text")
        .to_string();
    let reader = Api::new(&control_url, Some(&reader));
    let r = reader
        .post_json(
            &format!("/vault/keys/{}/issuer-tokens", parent.id),
            &json!({"name": "x"}),
        )
        .await;
    assert_eq!(r.expect_error(403, "missing_scope")["scope"], "keys:issue");

    // Two $5 children, one naming its parent and one leaving it implied.
    let issuer = Api::new(&control_url, Some(&token));
    let mut children = Vec::new();
    for (i, name_parent) in [false, true].into_iter().enumerate() {
        let mut body = child_body(5, &format!("make-scenario/iss/{i}"));
        if name_parent {
            body["parent_id"] = json!(parent.id);
        }
        let b = issuer.post_json("/vault/keys", &body).await.expect(201);
        assert_eq!(b["parent_id"], parent.id.as_str(), "{b}");
        let secret = b["key"].as_str().expect("key secret").to_string();
        harness::assert_all_confirmed(&b);
        children.push(secret);
    }

    // A child wider than the parent is refused like any child.
    let r = issuer.post_json("/vault/keys", &child_body(11, "x")).await;
    r.expect_error(400, "invalid_request");
    let mut wider = stripe_key_body(json!(1), &["GET /v1/customers"], "x");
    wider["expires_in"] = json!("1h");
    issuer
        .post_json("/vault/keys", &wider)
        .await
        .expect_error(400, "invalid_request");

    // Nothing but children of its own key.
    let mut elsewhere = child_body(1, "x");
    elsewhere["parent_id"] = json!(other.id);
    issuer
        .post_json("/vault/keys", &elsewhere)
        .await
        .expect_error(403, "issuer_scope");
    for r in [
        issuer.get("/vault/keys").await,
        issuer.get(&format!("/vault/keys/{}", parent.id)).await,
        issuer.delete(&format!("/vault/keys/{}", other.id)).await,
        issuer
            .post_json(
                &format!("/vault/keys/{}/issuer-tokens", parent.id),
                &json!({"name": "again"}),
            )
            .await,
        issuer.get("/vault/vendors").await,
        issuer.get("/vault/admin-tokens").await,
    ] {
        let body = r.expect_error(403, "issuer_scope");
        assert!(!r.text.contains(&token), "{body}");
    }
    assert_eq!(stack.key(&other.id).await["status"], "active");

    // Bad issuer tokens get the admin path's 401, body for body.
    let bad_admin = Api::new(&control_url, Some("kcadm_live_nope"))
        .post_json("/vault/keys", &child_body(1, "x"))
        .await;
    let bad_admin = bad_admin.expect_error(401, "unauthenticated");
    let unknown = secret::generate(SecretKind::IssuerToken, "live");
    let mut tampered = token.clone().into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'a' { b'b' } else { b'a' };
    for bad in [
        unknown,
        String::from_utf8(tampered).unwrap(),
        "kciss_live_short".to_string(),
    ] {
        let r = Api::new(&control_url, Some(&bad))
            .post_json("/vault/keys", &child_body(1, "x"))
            .await;
        assert_eq!(r.expect_error(401, "unauthenticated"), bad_admin);
        let r = Api::new(&control_url, Some(&bad)).get("/vault/keys").await;
        assert_eq!(r.expect_error(401, "unauthenticated"), bad_admin);
    }

    // 45 concurrent $1 charges over the parent and both children: $20 of
    // caps among them, $10 of parent cap.
    let agents = [
        stack.agent(&parent.secret),
        stack.agent(&children[0]),
        stack.agent(&children[1]),
    ];
    let ok = dollar_charges(&agents, 45).await;
    assert!(ok > 0, "no charge went through");
    assert!(
        mock.forwarded_stripe_amount() <= 1000,
        "the vendor received {} cents under a $10 parent",
        mock.forwarded_stripe_amount()
    );
    assert_eq!(mock.forwarded_stripe_amount(), 100 * ok);

    // Revoked: minting is 401, like any unusable token; revoking again
    // changes nothing.
    let revoked = stack
        .admin
        .delete(&format!("/vault/issuer-tokens/{token_id}"))
        .await
        .expect(200);
    assert_eq!(revoked["status"], "revoked");
    let again = stack
        .admin
        .delete(&format!("/vault/issuer-tokens/{token_id}"))
        .await
        .expect(200);
    assert_eq!(again["revoked_at"], revoked["revoked_at"]);
    let r = issuer.post_json("/vault/keys", &child_body(1, "x")).await;
    assert_eq!(r.expect_error(401, "unauthenticated"), bad_admin);

    // A token whose key is revoked mints nothing either; a revoked key gets
    // no new token.
    let (_, token2, _) = create_issuer(&stack.admin, &other.id, "other").await;
    stack
        .admin
        .delete(&format!("/vault/keys/{}", other.id))
        .await
        .expect(200);
    let r = Api::new(&control_url, Some(&token2))
        .post_json("/vault/keys", &child_body(1, "x"))
        .await;
    assert_eq!(r.expect_error(400, "invalid_request")["field"], "parent_id");
    stack
        .admin
        .post_json(
            &format!("/vault/keys/{}/issuer-tokens", other.id),
            &json!({"name": "late"}),
        )
        .await
        .expect_error(400, "invalid_request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_manages_issuer_tokens_and_grpc_mints_with_one() {
    use keycap_proto::pb::{self, key_service_client::KeyServiceClient};
    use tonic::metadata::MetadataValue;
    use tonic::{Code, Request};

    let control = harness::Control::start(ControlOpts::sqlite()).await;
    let url = control.url();
    let boot = control.opts.admin_token.clone();
    let _mock = stripe_on(&control).await;
    let parent = control
        .admin()
        .post_json(
            "/vault/keys",
            &stripe_key_body(json!(10), &["POST /v1/*"], "make-scenario/cli"),
        )
        .await
        .expect(201);
    let parent_id = parent["id"].as_str().unwrap().to_string();

    let created = keycap_cli(
        &url,
        &boot,
        &[
            "key",
            "issuer-token",
            "create",
            &parent_id,
            "--name",
            "checkout",
            "--expires-in",
            "1d",
        ],
    )
    .await
    .json();
    let token = created["token"]
        .as_str()
        .expect("token shown once")
        .to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(secret::is_well_formed(SecretKind::IssuerToken, &token));
    assert_eq!(created["key_id"], parent_id.as_str());
    let listed = keycap_cli(&url, &boot, &["key", "issuer-token", "list", &parent_id]).await;
    assert!(!listed.stdout.contains(&token), "{}", listed.stdout);
    assert_eq!(listed.json()["issuer_tokens"][0]["id"], id.as_str());

    fn with_token<T>(msg: T, token: &str) -> Request<T> {
        let mut req = Request::new(msg);
        let v: MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        req.metadata_mut().insert("authorization", v);
        req
    }
    let mut keys = KeyServiceClient::connect(url.clone()).await.expect("gRPC");
    let child = pb::CreateKeyRequest {
        vendor: "stripe".into(),
        allowed_endpoints: vec!["POST /v1/payment_intents".into()],
        daily_cap_micros: 5_000_000,
        expires_in_seconds: 3600,
        agent_run_label: "make-scenario/cli/1".into(),
        ..Default::default()
    };
    let minted = keys
        .create_key(with_token(child.clone(), &token))
        .await
        .expect("CreateKey with the issuer token")
        .into_inner();
    assert_eq!(minted.key.unwrap().parent_id, parent_id);
    let refused = keys
        .create_key(with_token(
            pb::CreateKeyRequest {
                parent_id: "key_elsewhere".into(),
                ..child.clone()
            },
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let refused = keys
        .list_keys(with_token(pb::ListKeysRequest::default(), &token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("issuer token"), "{refused:?}");

    let revoked = keycap_cli(&url, &boot, &["key", "issuer-token", "revoke", &id])
        .await
        .json();
    assert_eq!(revoked["status"], "revoked");
    let refused = keys
        .create_key(with_token(child, &token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let all = keycap_cli(&url, &boot, &["key", "issuer-token", "list", &parent_id]).await;
    assert_eq!(
        all.json(),
        json!({"issuer_tokens": []}),
        "revoked tokens are listed only with --all"
    );
    let all = keycap_cli(
        &url,
        &boot,
        &["key", "issuer-token", "list", &parent_id, "--all"],
    )
    .await
    .json();
    assert_eq!(all["issuer_tokens"][0]["status"], "revoked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_minted_with_an_issuer_token_keep_their_parents_network_limits() {
    let (stack, _mock) = stack_with_stripe().await;
    let control_url = stack.control.url();
    let mut body = stripe_key_body(json!(10), &["POST /v1/*"], "make-scenario/limits");
    body["allowed_cidrs"] = json!(["127.0.0.0/8", "2001:db8::/32"]);
    body["zone"] = json!("eu");
    body["rate_limit_per_minute"] = json!(2);
    let zoned = stack.create_key(&body).await;
    let (_, token, _) = create_issuer(&stack.admin, &zoned.id, "zoned").await;
    let issuer = Api::new(&control_url, Some(&token));

    // Left out: each limit is the parent's, as read back and as served.
    let child = issuer
        .post_json("/vault/keys", &child_body(5, "make-scenario/limits/1"))
        .await
        .expect(201);
    assert_eq!(
        child["allowed_cidrs"],
        json!(["127.0.0.0/8", "2001:db8::/32"])
    );
    assert_eq!(child["zone"], "eu");
    assert_eq!(child["rate_limit_per_minute"], 2);
    let read = stack.key(child["id"].as_str().expect("child id")).await;
    assert_eq!(read["allowed_cidrs"], child["allowed_cidrs"]);
    assert_eq!(read["zone"], "eu");
    assert_eq!(read["rate_limit_per_minute"], 2);
    // This proxy serves no zone: the child is refused like its parent.
    let secret = child["key"].as_str().expect("child secret");
    let refused = wait_until(within(keycap_tests::harness::POLICY_TIMEOUT), || async {
        stack.probe("stripe", secret).await.as_deref() == Some("zone_mismatch")
    })
    .await;
    assert!(refused, "{:?}", stack.probe("stripe", secret).await);

    // Wider: refused, naming the field.
    for (wider, field) in [
        (json!({"allowed_cidrs": ["10.0.0.0/8"]}), "allowed_cidrs"),
        (json!({"allowed_cidrs": ["0.0.0.0/0"]}), "allowed_cidrs"),
        (json!({"zone": "us"}), "zone"),
        (json!({"rate_limit_per_minute": 3}), "rate_limit_per_minute"),
    ] {
        let mut b = child_body(1, "make-scenario/limits/wide");
        for (k, v) in wider.as_object().expect("object") {
            b[k] = v.clone();
        }
        let r = issuer.post_json("/vault/keys", &b).await;
        assert_eq!(
            r.expect_error(400, "invalid_request")["field"],
            field,
            "{wider}"
        );
    }
    // Tighter: kept as stated.
    let mut tight = child_body(1, "make-scenario/limits/tight");
    tight["allowed_cidrs"] = json!(["127.0.0.1"]);
    tight["zone"] = json!("eu");
    tight["rate_limit_per_minute"] = json!(1);
    let tight = issuer.post_json("/vault/keys", &tight).await.expect(201);
    assert_eq!(tight["allowed_cidrs"], json!(["127.0.0.1/32"]));
    assert_eq!(tight["rate_limit_per_minute"], 1);

    // A parent limited only in rate: its child, minted without one, gets
    // the parent's limit at the proxy.
    let mut body = stripe_key_body(json!(10), &["POST /v1/*"], "make-scenario/rate");
    body["rate_limit_per_minute"] = json!(1);
    let rated = stack.create_key(&body).await;
    let (_, token, _) = create_issuer(&stack.admin, &rated.id, "rated").await;
    let child = Api::new(&control_url, Some(&token))
        .post_json("/vault/keys", &child_body(5, "make-scenario/rate/1"))
        .await
        .expect(201);
    let secret = child["key"].as_str().expect("child secret");
    harness::assert_all_confirmed(&child);
    let agent = stack.agent(secret);
    dollar_charge(&agent).await.expect(200);
    dollar_charge(&agent)
        .await
        .expect_error(429, "rate_limited");
}
