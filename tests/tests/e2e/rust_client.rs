//! The light Rust client (`keycap-client`) against the real control plane
//! and proxy, walked as a Rust service would: register a vendor, mint a key,
//! call the vendor through the proxy at the key's base URL, meet the cap
//! refusal, revoke the run, read the audit and the spend; and its errors:
//! keycap's code and field, one error for a wrong token or an unreachable
//! control plane, no token or secret in any `Debug` or message.
//! Included from `e2e.rs`.

use std::time::Duration;

use keycap_client::{AuditFilter, Client, Micros, NewKey};
use keycap_tests::harness::{free_port, wait_for, within, Api, Stack, SPEND_TIMEOUT};
use keycap_tests::mock::MockVendor;
use serde_json::json;

use super::OPENAI_CREDENTIAL;

const CHAT: &str = "POST /v1/chat/completions";

fn new_key(vendor: &str, cap: &str, label: &str) -> NewKey {
    NewKey {
        vendor: vendor.to_string(),
        daily_usd_cap: Micros::parse_usd(cap).unwrap(),
        allowed_endpoints: vec![CHAT.to_string()],
        expires_in: Duration::from_secs(3600),
        agent_run_label: label.to_string(),
        ..Default::default()
    }
}

/// A small OpenAI chat completion body (the mock answers it).
pub(crate) fn chat() -> serde_json::Value {
    json!({"model": "gpt-4o", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rust_service_walks_the_whole_flow_with_keycap_client() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(OPENAI_CREDENTIAL).await;
    let token = stack.control.opts.admin_token.clone();
    let mut client = Client::connect(&stack.control.url(), &token, None)
        .await
        .expect("connect");

    let written = client
        .put_vendor("rs-openai", "openai", &mock.url(), Some(mock.credential()))
        .await
        .unwrap();
    assert!(written.created);
    assert_eq!(
        client.get_vendor("rs-openai").await.unwrap().profile,
        "openai"
    );
    assert!(client
        .list_vendors()
        .await
        .unwrap()
        .iter()
        .any(|v| v.name == "rs-openai"));

    let run = "rs-client/run";
    let created = client
        .create_key(new_key("rs-openai", "2", run))
        .await
        .unwrap();
    assert!(created.key.starts_with("kc_"));
    assert!(!format!("{created:?}").contains(&created.key));
    let base = created.base_url(&stack.proxy.url(), "openai");
    let path = base.strip_prefix(&stack.proxy.url()).unwrap().to_string();
    assert_eq!(path, "/rs-openai/v1");
    let agent = Api::new(&stack.proxy.url(), Some(&created.key));
    agent
        .post_json(&format!("{path}/chat/completions"), &chat())
        .await
        .expect(200);

    let tiny = client
        .create_key(new_key("rs-openai", "0.0001", run))
        .await
        .unwrap();
    Api::new(&stack.proxy.url(), Some(&tiny.key))
        .post_json(&format!("{path}/chat/completions"), &chat())
        .await
        .expect_error(429, "daily_cap_exceeded");

    let spent = wait_for(within(SPEND_TIMEOUT), || {
        let mut c = client.clone();
        async move {
            let s = c.spend(run).await.ok()?;
            (s.calls == 1).then_some(s)
        }
    })
    .await
    .expect("the call's spend reaches the control plane");
    assert!(spent.total_micros > 0);
    assert_eq!(
        client
            .get_key(created.id())
            .await
            .unwrap()
            .spent_today_micros,
        spent.total_micros
    );

    let revoked = client.revoke_run(run).await.unwrap();
    let mut ids = revoked.revoked_ids.clone();
    ids.sort();
    let mut expected = vec![created.id().to_string(), tiny.id().to_string()];
    expected.sort();
    assert_eq!(ids, expected);
    assert!(revoked.confirmation.unwrap().unconfirmed_nodes.is_empty());
    agent
        .post_json(&format!("{path}/chat/completions"), &chat())
        .await
        .expect_error(401, "key_revoked");
    assert!(client.list_keys(run, false).await.unwrap().is_empty());
    assert_eq!(client.list_keys(run, true).await.unwrap().len(), 2);

    let entries = client
        .audit_query(&AuditFilter {
            key_id: created.id().to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    let billed: Vec<_> = entries.iter().filter(|e| e.cost_micros > 0).collect();
    assert_eq!(billed.len(), 1, "{entries:?}");
    assert_eq!(billed[0].cost_micros, spent.total_micros);
    assert_eq!(billed[0].path, "/v1/chat/completions");

    // The ledger verifies, over gRPC as over REST.
    let newest = client
        .audit_query(&AuditFilter::default())
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .max()
        .unwrap();
    let verified = client.verify_audit(None, None).await.unwrap();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.head_seq, newest);
    assert_eq!(
        hex::encode(&verified.head_hash),
        stack.admin.get("/vault/audit/verify").await.expect(200)["head_hash"]
            .as_str()
            .unwrap()
    );
    assert_eq!(
        client
            .verify_audit(Some(newest), None)
            .await
            .unwrap()
            .checked,
        1
    );
    // Held against the head as a checkpoint kept now, and against one
    // whose hash the ledger never had.
    let kept = format!("{newest}:{}", hex::encode(&verified.head_hash));
    assert!(client.verify_audit(None, Some(&kept)).await.unwrap().ok);
    let other = format!("{newest}:{}", "ab".repeat(32));
    let broken = client.verify_audit(None, Some(&other)).await.unwrap();
    assert_eq!((broken.ok, broken.broken_seq), (false, newest));
    for cp in client.checkpoints(5).await.unwrap() {
        assert!(cp.seq <= newest && cp.hash.len() == 32 && cp.signature.len() == 64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycap_client_manages_admin_and_issuer_tokens() {
    let stack = Stack::start().await;
    let mock = MockVendor::start(OPENAI_CREDENTIAL).await;
    let token = stack.control.opts.admin_token.clone();
    let mut client = Client::connect(&stack.control.url(), &token, None)
        .await
        .unwrap();

    let (secret, minted) = client
        .create_admin_token(
            "rs reader",
            &["keys:read"],
            &["rs-openai"],
            Some(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    assert!(secret.starts_with("kcadm_"));
    assert_eq!(minted.scopes, ["keys:read"]);
    assert_eq!(minted.vendors, ["rs-openai"]);
    assert!(client
        .list_admin_tokens(false)
        .await
        .unwrap()
        .iter()
        .any(|t| t.id == minted.id));
    let mut reader = Client::connect(&stack.control.url(), &secret, None)
        .await
        .unwrap();
    assert!(reader.list_keys("", false).await.is_ok());
    let e = reader.list_vendors().await.unwrap_err();
    assert_eq!(e.code(), "missing_scope", "{e}");
    assert!(!format!("{e:?}{e}").contains(&secret));
    let revoked = client.revoke_admin_token(&minted.id).await.unwrap();
    assert_eq!(revoked.status, keycap_client::pb::KeyStatus::Revoked as i32);
    assert!(!client
        .list_admin_tokens(false)
        .await
        .unwrap()
        .iter()
        .any(|t| t.id == minted.id));
    assert_eq!(
        reader.list_keys("", false).await.unwrap_err().code(),
        "unauthenticated"
    );
    let e = client
        .create_admin_token("typo", &["keys:reed"], &[], None)
        .await
        .unwrap_err();
    assert_eq!((e.code(), e.field()), ("invalid_request", Some("scopes")));

    client
        .put_vendor("rs-openai", "openai", &mock.url(), Some(mock.credential()))
        .await
        .unwrap();
    let parent = client
        .create_key(new_key("rs-openai", "5", "rs-client/issuer"))
        .await
        .unwrap();
    let (issuer_secret, issuer) = client
        .create_issuer_token(parent.id(), "scenario", Duration::from_secs(1800))
        .await
        .unwrap();
    assert!(issuer_secret.starts_with("kciss_"));
    let listed = client.list_issuer_tokens(parent.id(), false).await.unwrap();
    assert_eq!(
        listed.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        [issuer.id.as_str()]
    );
    client.revoke_issuer_token(&issuer.id).await.unwrap();
    assert!(client
        .list_issuer_tokens(parent.id(), false)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        client.list_issuer_tokens(parent.id(), true).await.unwrap()[0].status,
        keycap_client::pb::KeyStatus::Revoked as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycap_client_errors_carry_the_code_and_never_the_token() {
    let stack = Stack::start().await;
    let token = stack.control.opts.admin_token.clone();
    let mut client = Client::connect(&stack.control.url(), &token, None)
        .await
        .unwrap();

    let e = client
        .create_key(new_key("nope", "0", "rs-client/bad"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_request", "{e}");
    assert!(e.field().is_some(), "{e:?}");
    let e = client.get_key("no-such-key").await.unwrap_err();
    assert_eq!(e.code(), "not_found", "{e}");

    let wrong = "kcadm_live_a-token-keycap-never-issued";
    let mut stranger = Client::connect(&stack.control.url(), wrong, None)
        .await
        .unwrap();
    let e = stranger.list_vendors().await.unwrap_err();
    assert_eq!(e.code(), "unauthenticated");
    assert_eq!(e.to_string(), "unauthenticated: missing or invalid token");
    assert!(!format!("{e:?}{stranger:?}").contains(wrong));

    let addr = format!("http://127.0.0.1:{}", free_port());
    let e = Client::connect(&addr, &token, None).await.unwrap_err();
    assert_eq!(e.code(), "unavailable");
    assert!(e.to_string().contains(&addr), "{e}");
    assert!(!format!("{e:?}").contains(&token));
}
