//! Least-privilege admin tokens over REST, gRPC and the CLI: scopes (401 for
//! an unknown token, 403 naming the missing scope for a known one), vendor
//! restrictions, expiry, revocation, no escalation, shown once and stored
//! hashed, and retiring the bootstrap token for good.
//!
//! Each test starts its own control plane (and a proxy where calls go
//! through one) on SQLite; waits poll a condition until a deadline.

use std::path::Path;
use std::time::Duration;

use keycap_proto::pb::{self, admin_token_service_client::AdminTokenServiceClient};
use keycap_proto::secret::{self, SecretKind};
use keycap_tests::harness::{
    keycap_cli, q, wait_until, within, Api, Control, ControlOpts, Resp, Stack,
};
use keycap_tests::mock::MockVendor;
use serde_json::{json, Value};
use tonic::transport::Endpoint;
use tonic::{Code, Request};

const STRIPE_CREDENTIAL: &str = "sk_live_51KeycapAdminTokenE2eCredentialDoNotLeak";
const RUN: &str = "tokens-e2e/run-1";

// --- helpers -------------------------------------------------------------------

/// POST /vault/admin-tokens with `admin`, asserting 201; (id, token, body).
pub(super) async fn create_token(admin: &Api, body: Value) -> (String, String, Value) {
    let b = admin
        .post_json("/vault/admin-tokens", &body)
        .await
        .expect(201);
    let id = b["id"].as_str().expect("token id").to_string();
    let token = b["token"].as_str().expect("token text").to_string();
    (id, token, b)
}

async fn token_with(control_url: &str, admin: &Api, scopes: &[&str]) -> Api {
    let (_, token, _) = create_token(
        admin,
        json!({"name": format!("only {}", scopes.join(" ")), "scopes": scopes}),
    )
    .await;
    Api::new(control_url, Some(&token))
}

/// Asserts the 401 every unusable token gets; returns the body.
#[track_caller]
fn expect_unauthenticated(r: &Resp) -> Value {
    r.expect_error(401, "unauthenticated")
}

/// Asserts a 403 naming `scope`.
#[track_caller]
fn expect_missing_scope(r: &Resp, scope: &str) {
    let body = r.expect_error(403, "missing_scope");
    assert_eq!(body["scope"], scope, "{body}");
    assert_eq!(
        body["message"],
        format!("this admin token lacks the {scope} scope"),
        "{body}"
    );
}

/// Asserts a 403 naming `vendor`.
#[track_caller]
fn expect_vendor_not_allowed(r: &Resp, vendor: &str) {
    let body = r.expect_error(403, "vendor_not_allowed");
    assert_eq!(body["vendor"], vendor, "{body}");
    assert!(body["message"].as_str().unwrap().contains(vendor), "{body}");
}

fn key_body(vendor: &str) -> Value {
    json!({
        "vendor": vendor,
        "daily_usd_cap": 50,
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "expires_in": "2h",
        "agent_run_label": RUN,
    })
}

async fn send(api: &Api, method: &str, path: &str, body: &Option<Value>) -> Resp {
    match (method, body) {
        ("GET", _) => api.get(path).await,
        ("DELETE", _) => api.delete(path).await,
        ("PUT", Some(b)) => api.put_json(path, b).await,
        ("POST", Some(b)) => api.post_json(path, b).await,
        other => panic!("no such route shape {other:?}"),
    }
}

fn database_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.display().to_string(), bytes)
        })
        .collect()
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn names(list: &Value, field: &str) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .map(|v| v[field].as_str().expect("string field").to_string())
        .collect()
}

// --- REST ----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_tokens_are_shown_once_stored_hashed_and_revocable() {
    let control = Control::start(ControlOpts::sqlite()).await;
    let admin = control.admin();
    let (id, token, created) = create_token(
        &admin,
        json!({"name": "ci reader", "scopes": ["keys:read", "vendors:read"], "expires_in": "30d"}),
    )
    .await;
    assert!(
        secret::is_well_formed(SecretKind::AdminToken, &token),
        "{token}"
    );
    assert!(token.starts_with("kcadm_live_"), "{token}");
    assert!(id.starts_with("adm_"), "{id}");
    assert_eq!(created["scopes"], json!(["vendors:read", "keys:read"]));
    assert_eq!(created["vendors"], Value::Null);
    assert_eq!(created["status"], "active");
    assert!(created["expires_at"].is_string(), "{created}");
    let prefix = created["token_prefix"]
        .as_str()
        .unwrap()
        .trim_end_matches('…');
    assert!(token.starts_with(prefix) && prefix.len() < token.len());

    // Listed without its text; the bootstrap token is there too.
    let listed = admin.get("/vault/admin-tokens").await;
    let body = listed.expect(200);
    assert!(!listed.text.contains(&token), "{}", listed.text);
    let tokens = &body["admin_tokens"];
    assert_eq!(names(tokens, "name"), ["ci reader", "bootstrap"]);
    assert!(tokens[0].get("token").is_none(), "{tokens}");
    assert_eq!(tokens[1]["scopes"], json!(["admin"]));

    // It does what its scopes allow, and nothing else.
    let reader = Api::new(&control.url(), Some(&token));
    reader.get("/vault/keys").await.expect(200);
    reader.get("/vault/vendors").await.expect(200);
    expect_missing_scope(
        &reader.post_json("/vault/keys", &key_body("stripe")).await,
        "keys:issue",
    );

    // The database holds its hash, never its text.
    let hash = secret::hash(&token);
    let files = database_files(control.database_dir().expect("SQLite"));
    assert!(
        files.iter().any(|(_, b)| holds(b, &hash)),
        "the token's hash is in no database file; nothing was scanned"
    );
    for (path, bytes) in &files {
        assert!(!holds(bytes, token.as_bytes()), "{path} holds the token");
        assert!(
            !holds(bytes, control.opts.admin_token.as_bytes()),
            "{path} holds the bootstrap token"
        );
    }

    // Revoked: 401 with the same body as an unknown or malformed token.
    let revoked = admin
        .delete(&format!("/vault/admin-tokens/{id}"))
        .await
        .expect(200);
    assert_eq!(revoked["status"], "revoked");
    assert!(revoked["revoked_at"].is_string());
    let after = expect_unauthenticated(&reader.get("/vault/keys").await);
    let unknown = Api::new(&control.url(), Some(&keycap_tests::harness::admin_token()));
    assert_eq!(
        expect_unauthenticated(&unknown.get("/vault/keys").await),
        after
    );
    let mut bad_check = token.clone().into_bytes();
    let i = bad_check.len() - 1;
    bad_check[i] = if bad_check[i] == b'a' { b'b' } else { b'a' };
    let malformed = Api::new(&control.url(), Some(&String::from_utf8(bad_check).unwrap()));
    assert_eq!(
        expect_unauthenticated(&malformed.get("/vault/keys").await),
        after
    );
    let not_admin = Api::new(&control.url(), Some(&control.opts.fleet_token));
    assert_eq!(
        expect_unauthenticated(&not_admin.get("/vault/keys").await),
        after
    );

    // Gone from the default list, kept with include_inactive.
    let active = admin.get("/vault/admin-tokens").await.expect(200);
    assert_eq!(names(&active["admin_tokens"], "id").len(), 1);
    let all = admin
        .get("/vault/admin-tokens?include_inactive=true")
        .await
        .expect(200);
    assert_eq!(all["admin_tokens"][0]["status"], "revoked");

    // Bad input: a clear 400 naming the field, nothing created.
    for (body, field) in [
        (json!({"name": "x", "scopes": ["keys:write"]}), "scopes"),
        (json!({"name": "x", "scopes": []}), "scopes"),
        (json!({"name": "", "scopes": ["keys:read"]}), "name"),
        (
            json!({"name": "x", "scopes": ["keys:read"], "vendors": ["Not A Vendor"]}),
            "vendors",
        ),
        (
            json!({"name": "x", "scopes": ["keys:read"], "expires_in": "400d"}),
            "expires_in",
        ),
    ] {
        let b = admin
            .post_json("/vault/admin-tokens", &body)
            .await
            .expect_error(400, "invalid_request");
        assert_eq!(b["field"], field, "{body} -> {b}");
    }
    let all_after = admin
        .get("/vault/admin-tokens?include_inactive=true")
        .await
        .expect(200);
    assert_eq!(all_after["admin_tokens"].as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_route_needs_the_scope_the_table_names() {
    let control = Control::start(ControlOpts::sqlite()).await;
    let admin = control.admin();
    let url = control.url();
    // A vendor and a key for the routes that need one.
    admin
        .put_json(
            "/vault/vendors/stripe",
            &json!({"profile": "stripe", "base_url": "http://127.0.0.1:9", "credential": "sk_test_1"}),
        )
        .await
        .expect(201);
    let key = admin
        .post_json("/vault/keys", &key_body("stripe"))
        .await
        .expect(201);
    let key_id = key["id"].as_str().unwrap().to_string();
    // One the table's DELETE does not revoke, for the issuer-token routes.
    let live_key_id = admin
        .post_json("/vault/keys", &key_body("stripe"))
        .await
        .expect(201)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let other_token = create_token(
        &admin,
        json!({"name": "victim", "scopes": ["tokens:write"]}),
    )
    .await
    .0;

    let vendor_no_cred = json!({"profile": "stripe", "base_url": "http://127.0.0.1:9"});
    let vendor_cred =
        json!({"profile": "stripe", "base_url": "http://127.0.0.1:9", "credential": "sk_test_2"});
    let routes: Vec<(&str, String, Option<Value>, &[&str])> = vec![
        ("GET", "/vault/vendors".into(), None, &["vendors:read"]),
        (
            "GET",
            "/vault/vendors/stripe".into(),
            None,
            &["vendors:read"],
        ),
        (
            "PUT",
            "/vault/vendors/stripe".into(),
            Some(vendor_no_cred),
            &["vendors:write"],
        ),
        (
            "PUT",
            "/vault/vendors/stripe".into(),
            Some(vendor_cred),
            &["vendors:write", "credentials:write"],
        ),
        (
            "DELETE",
            "/vault/vendors/nobody".into(),
            None,
            &["vendors:write"],
        ),
        (
            "POST",
            "/vault/keys".into(),
            Some(key_body("stripe")),
            &["keys:issue"],
        ),
        ("GET", "/vault/keys".into(), None, &["keys:read"]),
        ("GET", format!("/vault/keys/{key_id}"), None, &["keys:read"]),
        (
            "POST",
            "/vault/keys/revoke".into(),
            Some(json!({"agent_run_label": "nobody"})),
            &["keys:revoke"],
        ),
        (
            "DELETE",
            format!("/vault/keys/{key_id}"),
            None,
            &["keys:revoke"],
        ),
        (
            "GET",
            format!("/vault/spend?agent_run_label={RUN}"),
            None,
            &["audit:read"],
        ),
        ("GET", "/vault/audit".into(), None, &["audit:read"]),
        ("GET", "/vault/audit/verify".into(), None, &["audit:read"]),
        (
            "GET",
            "/vault/audit/checkpoints".into(),
            None,
            &["audit:read"],
        ),
        ("GET", "/vault/admin-tokens".into(), None, &["tokens:read"]),
        (
            "POST",
            "/vault/admin-tokens".into(),
            Some(json!({"name": "n", "scopes": ["tokens:write"]})),
            &["tokens:write"],
        ),
        (
            "DELETE",
            format!("/vault/admin-tokens/{other_token}"),
            None,
            &["tokens:write"],
        ),
        (
            "POST",
            format!("/vault/keys/{live_key_id}/issuer-tokens"),
            Some(json!({"name": "scenario"})),
            &["keys:issue"],
        ),
        (
            "GET",
            format!("/vault/keys/{live_key_id}/issuer-tokens"),
            None,
            &["keys:read"],
        ),
        (
            "DELETE",
            "/vault/issuer-tokens/iss_nobody".into(),
            None,
            &["keys:revoke"],
        ),
        (
            "POST",
            "/vault/simulate".into(),
            Some(json!({"key_id": live_key_id,
                "request": {"method": "POST", "path": "/v1/payment_intents"}})),
            &["keys:read"],
        ),
        (
            "GET",
            "/vault/keys/key_nobody/suggest".into(),
            None,
            &["keys:read", "audit:read"],
        ),
    ];
    // A known token with an unrelated scope: 403 naming the first scope.
    let unrelated = token_with(&url, &admin, &["fleet:read"]).await;
    for (method, path, body, scopes) in &routes {
        let r = send(&unrelated, method, path, body).await;
        expect_missing_scope(&r, scopes[0]);
    }
    // With exactly the scopes listed, the same call is let through (and
    // with all but the last, refused naming it).
    for (method, path, body, scopes) in &routes {
        if scopes.len() > 1 {
            let short = token_with(&url, &admin, &scopes[..scopes.len() - 1]).await;
            let r = send(&short, method, path, body).await;
            expect_missing_scope(&r, scopes[scopes.len() - 1]);
        }
        let exact = token_with(&url, &admin, scopes).await;
        let r = send(&exact, method, path, body).await;
        assert!(
            r.status < 400 || r.status == 404,
            "{method} {path} with {scopes:?}: {} {}",
            r.status,
            r.text
        );
    }
    // An unknown token gets 401 on every route, before any scope talk.
    let unknown = Api::new(&url, Some(&keycap_tests::harness::admin_token()));
    for (method, path, body, _) in &routes {
        expect_unauthenticated(&send(&unknown, method, path, body).await);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_token_can_grant_more_than_it_holds() {
    let control = Control::start(ControlOpts::sqlite()).await;
    let admin = control.admin();
    let url = control.url();
    let (_, issuer_token, _) = create_token(
        &admin,
        json!({
            "name": "delegator",
            "scopes": ["tokens:write", "tokens:read", "keys:read"],
            "vendors": ["stripe", "openai"],
            "expires_in": "1h",
        }),
    )
    .await;
    let issuer = Api::new(&url, Some(&issuer_token));
    let create = |body: Value| {
        let issuer = issuer.clone();
        async move { issuer.post_json("/vault/admin-tokens", &body).await }
    };
    expect_missing_scope(
        &create(json!({"name": "up", "scopes": ["keys:issue"], "vendors": ["stripe"], "expires_in": "10m"})).await,
        "keys:issue",
    );
    expect_missing_scope(
        &create(
            json!({"name": "up", "scopes": ["admin"], "vendors": ["stripe"], "expires_in": "10m"}),
        )
        .await,
        "admin",
    );
    expect_vendor_not_allowed(
        &create(json!({"name": "up", "scopes": ["keys:read"], "vendors": ["resend"], "expires_in": "10m"})).await,
        "resend",
    );
    // No vendor list would mean every vendor.
    expect_vendor_not_allowed(
        &create(json!({"name": "up", "scopes": ["keys:read"], "expires_in": "10m"})).await,
        "*",
    );
    // Nor may it outlive its creator.
    let b = create(json!({"name": "up", "scopes": ["keys:read"], "vendors": ["stripe"]}))
        .await
        .expect_error(400, "invalid_request");
    assert_eq!(b["field"], "expires_in", "{b}");
    let b = create(
        json!({"name": "up", "scopes": ["keys:read"], "vendors": ["stripe"], "expires_in": "2h"}),
    )
    .await
    .expect_error(400, "invalid_request");
    assert_eq!(b["field"], "expires_in", "{b}");

    // Within bounds it works, and the new token is as narrow as asked.
    let child = create(json!({"name": "child", "scopes": ["keys:read"], "vendors": ["stripe"], "expires_in": "10m"}))
        .await
        .expect(201);
    assert_eq!(child["vendors"], json!(["stripe"]));
    let child_api = Api::new(&url, Some(child["token"].as_str().unwrap()));
    expect_missing_scope(
        &child_api
            .post_json(
                "/vault/admin-tokens",
                &json!({"name": "x", "scopes": ["keys:read"]}),
            )
            .await,
        "tokens:write",
    );

    // It sees and revokes only tokens within its own bounds: not the
    // bootstrap token.
    let listed = issuer.get("/vault/admin-tokens").await.expect(200);
    assert_eq!(
        names(&listed["admin_tokens"], "name"),
        ["child", "delegator"]
    );
    let all = admin.get("/vault/admin-tokens").await.expect(200);
    let bootstrap_id = all["admin_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "bootstrap")
        .expect("bootstrap listed")["id"]
        .as_str()
        .unwrap()
        .to_string();
    expect_missing_scope(
        &issuer
            .delete(&format!("/vault/admin-tokens/{bootstrap_id}"))
            .await,
        "admin",
    );
    admin.get("/vault/keys").await.expect(200);
    issuer
        .delete(&format!(
            "/vault/admin-tokens/{}",
            child["id"].as_str().unwrap()
        ))
        .await
        .expect(200);
    expect_unauthenticated(&child_api.get("/vault/keys").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_like_an_unknown_one() {
    let control = Control::start(ControlOpts::sqlite()).await;
    let admin = control.admin();
    let (id, token, created) = create_token(
        &admin,
        json!({"name": "short", "scopes": ["keys:read"], "expires_in": 2}),
    )
    .await;
    assert!(created["expires_at"].is_string());
    let api = Api::new(&control.url(), Some(&token));
    let expired = wait_until(within(Duration::from_secs(15)), || async {
        api.get("/vault/keys").await.status == 401
    })
    .await;
    assert!(expired, "the token still works after its expiry");
    let body = expect_unauthenticated(&api.get("/vault/keys").await);
    let unknown = Api::new(&control.url(), Some(&keycap_tests::harness::admin_token()));
    assert_eq!(
        expect_unauthenticated(&unknown.get("/vault/keys").await),
        body
    );
    let all = admin
        .get("/vault/admin-tokens?include_inactive=true")
        .await
        .expect(200);
    let t = all["admin_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .expect("listed")
        .clone();
    assert_eq!(t["status"], "expired", "{t}");
}

// --- vendor restriction ---------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vendor_restricted_token_sees_and_touches_only_its_vendors() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    stack.register("billing", "stripe", &mock).await;
    let stripe_key = stack.mint(&key_body("stripe")).await;
    let billing_key = stack.mint(&key_body("billing")).await;
    for (vendor, key) in [("stripe", &stripe_key), ("billing", &billing_key)] {
        stack
            .agent(&key.secret)
            .post_form(
                &format!("/{vendor}/v1/payment_intents"),
                "amount=100&currency=usd&confirm=true",
            )
            .await
            .expect(200);
    }
    stack
        .wait_audit(&format!("agent_run_label={}", q(RUN)), 2)
        .await;

    let (_, token, _) = create_token(
        &stack.admin,
        json!({"name": "stripe ops", "scopes": ["admin"], "vendors": ["stripe"]}),
    )
    .await;
    let ops = Api::new(&stack.control.url(), Some(&token));

    // Vendors.
    let vendors = ops.get("/vault/vendors").await.expect(200);
    assert_eq!(names(&vendors["vendors"], "name"), ["stripe"]);
    ops.get("/vault/vendors/stripe").await.expect(200);
    expect_vendor_not_allowed(&ops.get("/vault/vendors/billing").await, "billing");
    expect_vendor_not_allowed(
        &ops.put_json(
            "/vault/vendors/newco",
            &json!({"profile": "stripe", "base_url": mock.url(), "credential": "sk_test_x"}),
        )
        .await,
        "newco",
    );
    expect_vendor_not_allowed(&ops.delete("/vault/vendors/billing").await, "billing");

    // Keys.
    expect_vendor_not_allowed(
        &ops.post_json("/vault/keys", &key_body("billing")).await,
        "billing",
    );
    ops.post_json("/vault/keys", &key_body("stripe"))
        .await
        .expect(201);
    let keys = ops.get("/vault/keys").await.expect(200);
    assert!(
        names(&keys["keys"], "vendor").iter().all(|v| v == "stripe"),
        "{keys}"
    );
    expect_vendor_not_allowed(&ops.get("/vault/keys?vendor=billing").await, "billing");
    // Another vendor's key is not found, like an unknown one: its id says
    // nothing about its vendor.
    for r in [
        ops.get(&format!("/vault/keys/{}", billing_key.id)).await,
        ops.delete(&format!("/vault/keys/{}", billing_key.id)).await,
    ] {
        let body = r.expect_error(404, "not_found");
        assert!(!body.to_string().contains("billing"), "{body}");
    }
    // Nor can it mint under another vendor's key: the parent is not found
    // (even for a child of a vendor it may act on), and nothing is written.
    let before = stack.admin.get("/vault/keys").await.expect(200)["keys"]
        .as_array()
        .map(Vec::len);
    for vendor in ["stripe", "billing"] {
        let mut body = key_body(vendor);
        body["parent_id"] = json!(billing_key.id);
        body["expires_in"] = json!("1h");
        let r = ops.post_json("/vault/keys", &body).await;
        let status = if vendor == "billing" { 403 } else { 404 };
        assert_eq!(r.status, status, "{}", r.text);
        assert!(!r.text.contains("billing\" key"), "{}", r.text);
    }
    let after = stack.admin.get("/vault/keys").await.expect(200)["keys"]
        .as_array()
        .map(Vec::len);
    assert_eq!(before, after, "a refused child was written");
    // Under its own vendor's key it may.
    let mut body = key_body("stripe");
    body["parent_id"] = json!(stripe_key.id);
    body["daily_usd_cap"] = json!(5);
    body["expires_in"] = json!("1h");
    let minted = ops.post_json("/vault/keys", &body).await.expect(201);
    assert_eq!(minted["parent_id"], json!(stripe_key.id));
    let unknown = ops
        .get("/vault/keys/key_unknown")
        .await
        .expect_error(404, "not_found");
    assert_eq!(
        unknown["message"],
        format!("key {:?} not found", "key_unknown"),
        "{unknown}"
    );
    stack
        .admin
        .get(&format!("/vault/keys/{}", billing_key.id))
        .await
        .expect(200);

    // Audit and spend.
    let audit = ops.get("/vault/audit").await.expect(200);
    assert_eq!(names(&audit["entries"], "vendor"), ["stripe"]);
    expect_vendor_not_allowed(&ops.get("/vault/audit?vendor=billing").await, "billing");
    let spend = ops
        .get(&format!("/vault/spend?agent_run_label={}", q(RUN)))
        .await
        .expect(200);
    assert_eq!(names(&spend["vendors"], "vendor"), ["stripe"], "{spend}");
    assert_eq!(spend["calls"], 1, "{spend}");
    let everything = stack
        .admin
        .get(&format!("/vault/spend?agent_run_label={}", q(RUN)))
        .await
        .expect(200);
    assert_eq!(everything["calls"], 2, "{everything}");

    // Revoking the run revokes only its vendors' keys.
    let revoked = ops
        .post_json("/vault/keys/revoke", &json!({"agent_run_label": RUN}))
        .await
        .expect(200);
    let ids: Vec<String> = serde_json::from_value(revoked["revoked_ids"].clone()).unwrap();
    assert!(ids.contains(&stripe_key.id), "{revoked}");
    assert!(!ids.contains(&billing_key.id), "{revoked}");
    assert_eq!(stack.key(&billing_key.id).await["status"], "active");
    assert_eq!(stack.key(&stripe_key.id).await["status"], "revoked");
}

// --- the proxy -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_token_is_never_a_vault_key() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    stack.register("stripe", "stripe", &mock).await;
    // A live key proves the proxy has the policy before the refusals below.
    let key = stack.mint(&key_body("stripe")).await;
    mock.reset();
    let (_, minted_admin, _) =
        create_token(&stack.admin, json!({"name": "full", "scopes": ["admin"]})).await;
    for token in [stack.control.opts.admin_token.clone(), minted_admin] {
        let r = stack
            .agent(&token)
            .post_form(
                "/stripe/v1/payment_intents",
                "amount=100&currency=usd&confirm=true",
            )
            .await;
        assert_eq!(r.status, 401, "{}", r.text);
        assert!(!r.text.contains(&token), "{}", r.text);
    }
    assert!(mock.calls().is_empty(), "{:?}", mock.calls());
    // The vault key itself still works, and is the only thing that does.
    stack
        .agent(&key.secret)
        .post_form(
            "/stripe/v1/payment_intents",
            "amount=100&currency=usd&confirm=true",
        )
        .await
        .expect(200);
    assert_eq!(mock.calls().len(), 1);
}

// --- bootstrap ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_token_retires_once_another_admin_exists_and_stays_retired() {
    bootstrap_retirement(ControlOpts::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bootstrap_token_stays_retired_on_postgres() {
    // Under CI a missing PostgreSQL fails here instead of skipping.
    let Some(db) = keycap_tests::pg::fresh_database_or_skip()
        .await
        .expect("a PostgreSQL database for the test")
    else {
        return;
    };
    bootstrap_retirement(ControlOpts::postgres(&db.url)).await;
}

async fn bootstrap_retirement(opts: ControlOpts) {
    let mut control = Control::start(opts).await;
    let bootstrap = control.admin();
    let tokens = bootstrap.get("/vault/admin-tokens").await.expect(200);
    assert_eq!(names(&tokens["admin_tokens"], "name"), ["bootstrap"]);
    let bootstrap_id = tokens["admin_tokens"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let retire = format!("/vault/admin-tokens/{bootstrap_id}");

    // Alone, it cannot go; nor once a narrower token exists.
    let b = bootstrap
        .delete(&retire)
        .await
        .expect_error(409, "conflict");
    assert!(b["message"].as_str().unwrap().contains("last"), "{b}");
    let narrow = create_token(
        &bootstrap,
        json!({"name": "stripe only", "scopes": ["admin"], "vendors": ["stripe"]}),
    )
    .await;
    bootstrap
        .delete(&retire)
        .await
        .expect_error(409, "conflict");
    assert_eq!(narrow.2["vendors"], json!(["stripe"]));

    let (ops_id, ops_token, _) =
        create_token(&bootstrap, json!({"name": "ops", "scopes": ["admin"]})).await;
    let ops = Api::new(&control.url(), Some(&ops_token));
    let retired = ops.delete(&retire).await.expect(200);
    assert_eq!(retired["status"], "revoked");
    expect_unauthenticated(&bootstrap.get("/vault/keys").await);
    // ops is now the last admin: it cannot revoke itself.
    ops.delete(&format!("/vault/admin-tokens/{ops_id}"))
        .await
        .expect_error(409, "conflict");

    // The same --admin-token on restart does not bring it back.
    control.restart().await;
    expect_unauthenticated(&bootstrap.get("/vault/keys").await);
    ops.get("/vault/keys").await.expect(200);
    let all = ops
        .get("/vault/admin-tokens?include_inactive=true")
        .await
        .expect(200);
    let boots: Vec<&Value> = all["admin_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == "bootstrap")
        .collect();
    assert_eq!(boots.len(), 1, "{all}");
    assert_eq!(boots[0]["status"], "revoked");
}

// --- gRPC -----------------------------------------------------------------------

fn bearer<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ASCII token"),
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_creates_lists_and_revokes_tokens_with_the_same_rules() {
    let control = Control::start(ControlOpts::sqlite()).await;
    let channel = Endpoint::from_shared(control.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("gRPC connection");
    let mut svc = AdminTokenServiceClient::new(channel.clone());
    let boot = control.opts.admin_token.clone();

    let created = svc
        .create_admin_token(bearer(
            pb::CreateAdminTokenRequest {
                name: "auditor".into(),
                scopes: vec!["audit:read".into(), "tokens:read".into()],
                vendors: vec!["stripe".into()],
                expires_in_seconds: 3600,
            },
            &boot,
        ))
        .await
        .expect("CreateAdminToken")
        .into_inner();
    let t = created.token.expect("token");
    assert!(secret::is_well_formed(
        SecretKind::AdminToken,
        &created.secret
    ));
    assert_eq!(t.scopes, ["audit:read", "tokens:read"]);
    assert_eq!(t.vendors, ["stripe"]);
    assert_eq!(t.status, pb::KeyStatus::Active as i32);
    assert!(t.expires_at.is_some() && t.revoked_at.is_none());

    // Its own listing: only tokens within its bounds; never a secret.
    let listed = svc
        .list_admin_tokens(bearer(
            pb::ListAdminTokensRequest::default(),
            &created.secret,
        ))
        .await
        .expect("ListAdminTokens")
        .into_inner();
    assert_eq!(
        listed
            .tokens
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["auditor"]
    );
    let listed = svc
        .list_admin_tokens(bearer(pb::ListAdminTokensRequest::default(), &boot))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.tokens.len(), 2);
    let bootstrap_id = listed
        .tokens
        .iter()
        .find(|t| t.name == "bootstrap")
        .unwrap()
        .id
        .clone();

    // PERMISSION_DENIED names the scope; other services use the same table.
    let denied = svc
        .revoke_admin_token(bearer(
            pb::RevokeAdminTokenRequest { id: t.id.clone() },
            &created.secret,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(
        denied.message(),
        "this admin token lacks the tokens:write scope"
    );
    let mut keys = pb::key_service_client::KeyServiceClient::new(channel.clone());
    let denied = keys
        .list_keys(bearer(pb::ListKeysRequest::default(), &created.secret))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("keys:read"), "{denied:?}");
    let mut audit = pb::audit_service_client::AuditServiceClient::new(channel.clone());
    let denied = audit
        .query_audit(bearer(
            pb::QueryAuditRequest {
                vendor: "billing".into(),
                ..Default::default()
            },
            &created.secret,
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("billing"), "{denied:?}");
    audit
        .query_audit(bearer(pb::QueryAuditRequest::default(), &created.secret))
        .await
        .expect("audit:read lets it query its vendors");

    // Retiring the only admin: FAILED_PRECONDITION.
    let refused = svc
        .revoke_admin_token(bearer(
            pb::RevokeAdminTokenRequest { id: bootstrap_id },
            &boot,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // Revoked: UNAUTHENTICATED, like an unknown token.
    let revoked = svc
        .revoke_admin_token(bearer(pb::RevokeAdminTokenRequest { id: t.id }, &boot))
        .await
        .unwrap()
        .into_inner()
        .token
        .unwrap();
    assert_eq!(revoked.status, pb::KeyStatus::Revoked as i32);
    for token in [created.secret, keycap_tests::harness::admin_token()] {
        let s = audit
            .query_audit(bearer(pb::QueryAuditRequest::default(), &token))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated);
        assert_eq!(s.message(), "missing or invalid token");
    }
}

// --- CLI ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_creates_lists_and_revokes_tokens() {
    let control = Control::start(ControlOpts::sqlite()).await;
    let url = control.url();
    let boot = control.opts.admin_token.clone();

    // `generate` mints a bootstrap token offline.
    let generated = keycap_cli(&url, "", &["admin-token", "generate", "--env", "prod"]).await;
    assert!(generated.status.success(), "{}", generated.stderr);
    let g = generated.stdout.trim();
    assert!(g.starts_with("kcadm_prod_"), "{g}");
    assert!(secret::is_well_formed(SecretKind::AdminToken, g));

    let created = keycap_cli(
        &url,
        &boot,
        &[
            "admin-token",
            "create",
            "--name",
            "issuer",
            "--scope",
            "keys:issue,keys:read",
            "--vendor",
            "stripe",
            "--expires-in",
            "7d",
        ],
    )
    .await
    .json();
    let token = created["token"]
        .as_str()
        .expect("token shown once")
        .to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(secret::is_well_formed(SecretKind::AdminToken, &token));
    assert_eq!(created["scopes"], json!(["keys:read", "keys:issue"]));
    assert_eq!(created["vendors"], json!(["stripe"]));

    let listed = keycap_cli(&url, &boot, &["admin-token", "list"]).await;
    let list = listed.json()["admin_tokens"].clone();
    assert_eq!(names(&list, "name"), ["issuer", "bootstrap"]);
    assert!(!listed.stdout.contains(&token));

    // The new token works through the CLI within its scopes only.
    let keys = keycap_cli(&url, &token, &["key", "list"]).await;
    assert!(keys.status.success(), "{}", keys.stderr);
    let denied = keycap_cli(&url, &token, &["vendor", "list"]).await;
    assert!(!denied.status.success());
    assert!(
        denied.stderr.contains("missing_scope: ") && denied.stderr.contains("vendors:read"),
        "{}",
        denied.stderr
    );

    let revoked = keycap_cli(&url, &boot, &["admin-token", "revoke", &id])
        .await
        .json();
    assert_eq!(revoked["status"], "revoked");
    let after = keycap_cli(&url, &token, &["key", "list"]).await;
    assert!(!after.status.success());
    assert!(
        after.stderr.contains("unauthenticated: "),
        "{}",
        after.stderr
    );
    let all = keycap_cli(&url, &boot, &["admin-token", "list", "--all"])
        .await
        .json();
    assert_eq!(all["admin_tokens"].as_array().unwrap().len(), 2);

    // The bootstrap token refuses to retire while it is the only admin.
    let boot_id = list
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "bootstrap")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let refused = keycap_cli(&url, &boot, &["admin-token", "revoke", &boot_id]).await;
    assert!(!refused.status.success());
    assert!(refused.stderr.contains("conflict: "), "{}", refused.stderr);
    let still = keycap_cli(&url, &boot, &["key", "list"]).await;
    assert!(still.status.success(), "{}", still.stderr);
}

#[tokio::test]
async fn vendors_write_alone_cannot_redirect_or_reprice_a_stored_credential() {
    let control = Control::start(ControlOpts::sqlite()).await;
    let admin = control.admin();
    let mock = MockVendor::start(STRIPE_CREDENTIAL).await;
    let stored =
        json!({"profile": "stripe", "base_url": mock.url(), "credential": STRIPE_CREDENTIAL});
    admin
        .put_json("/vault/vendors/stripe", &stored)
        .await
        .expect(201);
    let writer = token_with(&control.url(), &admin, &["vendors:write", "vendors:read"]).await;
    // A generic vendor's rules are its prices.
    let rules = |cost: &str| {
        json!({"as_of": "2026-11-23", "currency": "usd",
               "rules": [{"endpoint": "POST /x", "cost": {"fixed": cost}}]})
    };
    let generic =
        |cost: &str| json!({"profile": "generic", "base_url": mock.url(), "prices": rules(cost)});
    let mut first = generic("1.00");
    first["credential"] = json!(STRIPE_CREDENTIAL);
    admin
        .put_json("/vault/vendors/gen", &first)
        .await
        .expect(201);
    let r = writer
        .put_json("/vault/vendors/gen", &generic("0.000001"))
        .await;
    expect_missing_scope(&r, "credentials:write");
    writer
        .put_json("/vault/vendors/gen", &generic("1.00"))
        .await
        .expect(200);
    let same = json!({"profile": "stripe", "base_url": mock.url()});
    // Sending the credential somewhere else, or changing what calls cost,
    // could spend or leak the stored credential: credentials:write.
    for (what, body) in [
        (
            "base URL",
            json!({"profile": "stripe", "base_url": "https://attacker.example"}),
        ),
        (
            "profile",
            json!({"profile": "openai", "base_url": mock.url()}),
        ),
        (
            "currency rates",
            json!({"profile": "stripe", "base_url": mock.url(), "currency_rates": {"eur": "0.000001"}}),
        ),
    ] {
        let r = writer.put_json("/vault/vendors/stripe", &body).await;
        assert_eq!(r.status, 403, "{what}: {}", r.text);
        expect_missing_scope(&r, "credentials:write");
    }
    let kept = writer.get("/vault/vendors/stripe").await.expect(200);
    assert_eq!(kept["base_url"], json!(mock.url()), "{kept}");
    assert_eq!(kept["profile"], "stripe");
    // Re-sending what is stored changes nothing and needs only vendors:write.
    writer
        .put_json("/vault/vendors/stripe", &same)
        .await
        .expect(200);
    // With credentials:write the same change goes through.
    let both = token_with(
        &control.url(),
        &admin,
        &["vendors:write", "credentials:write"],
    )
    .await;
    let moved = both
        .put_json(
            "/vault/vendors/stripe",
            &json!({"profile": "stripe", "base_url": "https://vendor-moved.example"}),
        )
        .await
        .expect(200);
    assert_eq!(moved["base_url"], "https://vendor-moved.example");
}
