//! Inbound hooks end to end (docs/inbound-hooks.md): a Stripe webhook
//! registered with the real control plane, its events sent to two real
//! proxies. A verified event reaches the destination (a receiver in this
//! process) once, signed with a Keycap-Signature that verifies with the
//! relay secret; the same event at the other proxy is a replay, refused
//! fleet-wide; forged, stale, oversized and unknown-hook events are
//! refused and never forwarded; a Stripe secret roll verifies with either
//! secret; the audit shows each event. The verifiers are checked against
//! the vendors' own libraries in `tests/python/test_hooks.py`.

use keycap_tests::harness::ProxyOpts;
use keycap_tests::receiver::Receiver;
use keycap_vendors::webhooks::stripe;
use reqwest::Method;

use super::*;

const STRIPE_SECRET: &str = "whsec_e2e_first_secret";
const STRIPE_SECRET_2: &str = "whsec_e2e_second_secret";

fn private_ok() -> ControlOpts {
    let mut opts = ControlOpts::sqlite();
    opts.args.push("--allow-private-webhooks".into());
    opts
}

/// A Stripe event body and its `Stripe-Signature` at `t`, signed with each
/// of `secrets` (Stripe sends one `v1` per live secret during a roll).
fn stripe_event(id: &str, t: i64, secrets: &[&str]) -> (Vec<u8>, String) {
    let body = json!({"id": id, "object": "event", "type": "invoice.paid"})
        .to_string()
        .into_bytes();
    let mut header = format!("t={t}");
    for s in secrets {
        header.push_str(&format!(",v1={}", stripe::sign(s, t, &body)));
    }
    (body, header)
}

async fn post_event(proxy: &Proxy, path: &str, body: &[u8], signature: &str) -> Resp {
    proxy
        .api(None)
        .send(
            Method::POST,
            path,
            Some(("application/json", body.to_vec())),
            &[("Stripe-Signature", signature)],
        )
        .await
}

/// Polls until `proxy` serves hook `path` (the policy stream delivered it):
/// an unsigned post answers 401 rather than 404 then.
async fn wait_served(proxy: &Proxy, path: &str) {
    let served = wait_until(within(Duration::from_secs(10)), || async {
        proxy
            .api(None)
            .send(
                Method::POST,
                path,
                Some(("application/json", b"{}".to_vec())),
                &[],
            )
            .await
            .status
            != 404
    })
    .await;
    assert!(served, "{path} never reached the proxy");
}

fn verify_keycap_signature(header: &str, secret: &str, body: &[u8]) {
    let (t, v1) = header.split_once(',').expect("t=...,v1=...");
    let t: i64 = t
        .strip_prefix("t=")
        .expect("t=")
        .parse()
        .expect("unix time");
    assert!((Utc::now().timestamp() - t).abs() < 60, "{header}");
    assert_eq!(v1, format!("v1={}", stripe::sign(secret, t, body)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_event_is_relayed_once_across_the_fleet_and_forgeries_never() {
    let stack = Stack::start_with(private_ok()).await;
    let second = Proxy::start_with(
        &stack.control.url(),
        &stack.control.opts.fleet_token,
        &ProxyOpts::new("e2e-proxy-2"),
    )
    .await;
    let receiver = Receiver::start(&[]).await;
    let created = stack
        .admin
        .post_json(
            "/vault/hooks",
            &json!({
                "vendor": "stripe",
                "signing_secret": STRIPE_SECRET,
                "destination_url": receiver.url("/stripe"),
            }),
        )
        .await
        .expect(201);
    let path = created["path"].as_str().expect("path").to_string();
    let hook_id = created["hook"]["id"].as_str().expect("id").to_string();
    let relay_secret = created["relay_secret"]
        .as_str()
        .expect("relay secret")
        .to_string();
    assert_eq!(path, format!("/hooks/{hook_id}"));
    // Reads never show a secret.
    let listed = stack.admin.get("/vault/hooks").await.expect(200);
    assert_eq!(listed["hooks"][0]["id"], hook_id.as_str());
    assert!(!listed.to_string().contains(STRIPE_SECRET));
    assert!(!listed.to_string().contains(&relay_secret));
    wait_served(&stack.proxy, &path).await;
    wait_served(&second, &path).await;

    // Valid at the first proxy: relayed, signed by keycap.
    let now = Utc::now().timestamp();
    let (body, sig) = stripe_event("evt_e2e_1", now, &[STRIPE_SECRET]);
    post_event(&stack.proxy, &path, &body, &sig)
        .await
        .expect(200);
    let got = receiver.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body.as_ref(), body.as_slice());
    assert_eq!(got[0].header("content-type"), Some("application/json"));
    verify_keycap_signature(
        got[0].header("keycap-signature").expect("Keycap-Signature"),
        &relay_secret,
        &body,
    );

    // The same event at the other proxy (and again at the first): a
    // replay, refused fleet-wide and not forwarded.
    post_event(&second, &path, &body, &sig)
        .await
        .expect_error(409, "hook_replayed");
    post_event(&stack.proxy, &path, &body, &sig)
        .await
        .expect_error(409, "hook_replayed");

    // Forged (wrong secret), tampered body, stale, unsigned: 401 alike.
    let (forged_body, forged) = stripe_event("evt_e2e_2", now, &["whsec_attacker"]);
    post_event(&second, &path, &forged_body, &forged)
        .await
        .expect_error(401, "hook_signature_invalid");
    let (_, good) = stripe_event("evt_e2e_3", now, &[STRIPE_SECRET]);
    let tampered = json!({"id": "evt_e2e_3", "object": "event", "amount": 1}).to_string();
    post_event(&second, &path, tampered.as_bytes(), &good)
        .await
        .expect_error(401, "hook_signature_invalid");
    let (stale_body, stale) = stripe_event("evt_e2e_4", now - 3600, &[STRIPE_SECRET]);
    post_event(&second, &path, &stale_body, &stale)
        .await
        .expect_error(401, "hook_signature_invalid");
    // Over 1 MB: refused before any signature work.
    let big = vec![b'a'; (1 << 20) + 1];
    let (_, big_sig) = stripe_event("evt_e2e_5", now, &[STRIPE_SECRET]);
    assert_eq!(post_event(&second, &path, &big, &big_sig).await.status, 413);
    // Unknown hook: 404, the same as any path that is no hook.
    let unknown = post_event(&second, "/hooks/hk_nosuchhook", &body, &sig).await;
    unknown.expect_error(404, "not_found");
    assert_eq!(
        receiver.received().len(),
        1,
        "a refused event was forwarded"
    );

    // A Stripe secret roll: add the new secret, events signed with either
    // verify; once the old one is removed, only the new does.
    let rolled = stack
        .admin
        .post_json(
            &format!("/vault/hooks/{hook_id}/secrets"),
            &json!({"signing_secret": STRIPE_SECRET_2}),
        )
        .await
        .expect(200);
    let fingerprints = rolled["secrets"].as_array().expect("secrets").clone();
    assert_eq!(fingerprints.len(), 2);
    let (both_body, both) = stripe_event("evt_e2e_6", now, &[STRIPE_SECRET, STRIPE_SECRET_2]);
    let (new_body, new_only) = stripe_event("evt_e2e_7", now, &[STRIPE_SECRET_2]);
    let relayed_new = wait_until(within(Duration::from_secs(10)), || async {
        post_event(&second, &path, &new_body, &new_only)
            .await
            .status
            == 200
    })
    .await;
    assert!(relayed_new, "the new secret never verified");
    post_event(&stack.proxy, &path, &both_body, &both)
        .await
        .expect(200);
    let old = fingerprints[0].as_str().expect("fingerprint");
    stack
        .admin
        .delete(&format!("/vault/hooks/{hook_id}/secrets/{old}"))
        .await
        .expect(200);
    // Until the removal reaches the proxy an old-only event still
    // verifies (and is relayed); each try is a new event, counted.
    let relayed_meanwhile = std::sync::atomic::AtomicUsize::new(0);
    let tries = std::sync::atomic::AtomicUsize::new(0);
    let refused_old = wait_until(within(Duration::from_secs(10)), || async {
        let n = tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (old_body, old_only) = stripe_event(&format!("evt_e2e_8_{n}"), now, &[STRIPE_SECRET]);
        match post_event(&second, &path, &old_body, &old_only)
            .await
            .status
        {
            401 => true,
            200 => {
                relayed_meanwhile.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                false
            }
            other => panic!("an old-secret event answered {other}"),
        }
    })
    .await;
    assert!(refused_old, "the removed secret still verified");
    let relayed_meanwhile = relayed_meanwhile.into_inner();
    assert_eq!(receiver.received().len(), 3 + relayed_meanwhile);

    // The audit shows relayed and refused events, at no cost.
    let audited = wait_for(within(SPEND_TIMEOUT), || async {
        let entries = stack
            .admin
            .get("/vault/audit?vendor=stripe")
            .await
            .expect(200)["entries"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let relayed = entries.iter().filter(|e| e["outcome"] == "relayed").count();
        let replayed = entries
            .iter()
            .filter(|e| e["refusal_reason"] == "hook_replayed")
            .count();
        (relayed == 3 + relayed_meanwhile && replayed == 2).then_some(entries)
    })
    .await
    .expect("the relayed and replayed events in the audit");
    assert!(audited
        .iter()
        .any(|e| e["refusal_reason"] == "hook_forged" && e["cost_usd"].as_f64() == Some(0.0)));
    assert!(audited.iter().any(|e| e["refusal_reason"] == "hook_stale"));

    // Deleted: 404 like an unknown hook.
    stack
        .admin
        .delete(&format!("/vault/hooks/{hook_id}"))
        .await
        .expect(200);
    let gone = wait_until(within(Duration::from_secs(10)), || async {
        post_event(&second, &path, &body, &sig).await.status == 404
    })
    .await;
    assert!(gone, "a deleted hook still answered");
}
