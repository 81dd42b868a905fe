//! Credential rotation without downtime (docs/rotation.md): a new version is
//! staged, probed against the vendor (a wrong one fails, and the probe
//! leaks neither credential nor the vendor's body), promoted while calls
//! stream through three proxies — no call fails, each carries exactly one
//! version, and the audit records the version the vendor saw — rolled back
//! within its grace, and retired after it; a KEK rotation re-wraps every
//! version that still has material.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::*;

const NEW_CREDENTIAL: &str = "sk_live_51KeycapE2eRotatedStripeCredentialV3xyz";
const WRONG_CREDENTIAL: &str = "sk_live_51KeycapE2eWrongStripeCredentialNope";

/// A call an agent made: the path (unique per call), its status, and
/// whether it was sent after the promote answered.
struct Sent {
    path: String,
    status: u16,
    after_promote: bool,
}

fn assert_no_credential(text: &str) {
    for c in [STRIPE_CREDENTIAL, NEW_CREDENTIAL, WRONG_CREDENTIAL] {
        assert!(!text.contains(c), "an answer carries a credential: {text}");
    }
}

async fn credentials(stack: &Stack) -> Value {
    let r = stack.admin.get("/vault/vendors/stripe/credentials").await;
    assert_no_credential(&r.text);
    r.expect(200)
}

fn states(list: &Value) -> Vec<(i64, String)> {
    list["credentials"]
        .as_array()
        .expect("credentials")
        .iter()
        .map(|c| {
            (
                c["version"].as_i64().unwrap(),
                c["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

async fn promote(stack: &Stack, version: i64, grace: &str) -> Value {
    let r = stack
        .admin
        .post_json(
            &format!("/vault/vendors/stripe/credentials/{version}/promote"),
            &json!({ "grace": grace }),
        )
        .await;
    assert_no_credential(&r.text);
    r.expect(200)
}

#[tokio::test]
async fn a_promote_under_load_through_three_proxies_fails_no_call() {
    let (stack, mock) = stack_with_stripe().await;
    mock.accept_also(NEW_CREDENTIAL);
    let fleet_token = stack.control.opts.fleet_token.clone();
    let second = Proxy::start(&stack.control.url(), &fleet_token, "rotation-2").await;
    let third = Proxy::start(&stack.control.url(), &fleet_token, "rotation-3").await;

    // Stage a wrong credential and the new one: neither is used yet.
    let staged = |credential: &'static str| {
        let admin = stack.admin.clone();
        async move {
            let r = admin
                .post_json(
                    "/vault/vendors/stripe/credentials",
                    &json!({ "credential": credential }),
                )
                .await;
            assert_no_credential(&r.text);
            r.expect(201)
        }
    };
    let wrong = staged(WRONG_CREDENTIAL).await;
    assert_eq!(
        (wrong["version"].as_i64(), wrong["state"].as_str()),
        (Some(2), Some("staged"))
    );
    let new = staged(NEW_CREDENTIAL).await;
    assert_eq!(new["version"], 3);
    assert_eq!(
        states(&credentials(&stack).await),
        [
            (3, "staged".into()),
            (2, "staged".into()),
            (1, "active".into())
        ]
    );

    // Probes: the vendor refuses the wrong one (its 401 body repeats the key
    // it was given: never shown) and accepts the new one.
    let probe = |v: i64| {
        let admin = stack.admin.clone();
        async move {
            let r = admin
                .post_json(
                    &format!("/vault/vendors/stripe/credentials/{v}/probe"),
                    &json!({}),
                )
                .await;
            assert_no_credential(&r.text);
            assert!(!r.text.contains("Invalid API Key"), "{}", r.text);
            r.expect(200)
        }
    };
    let bad = probe(2).await;
    assert_eq!(bad["probe"]["ok"], false, "{bad}");
    assert_eq!(bad["probe"]["status"], 401, "{bad}");
    let good = probe(3).await;
    assert_eq!(good["probe"]["ok"], true, "{good}");
    assert_eq!(good["probe"]["status"], 200);
    let probes: Vec<String> = mock
        .calls()
        .iter()
        .filter(|c| c.path == "/v1/balance")
        .map(|c| c.authorization().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        probes,
        [
            format!("Bearer {WRONG_CREDENTIAL}"),
            format!("Bearer {NEW_CREDENTIAL}")
        ],
        "each probe authenticates with its version, injected as the proxy does"
    );
    let listed = credentials(&stack).await;
    assert_eq!(listed["credentials"][0]["probe"]["ok"], true, "{listed}");

    let key = stack
        .mint(&stripe_key_body(
            json!(50),
            &["GET /v1/echo/*"],
            "rotation/1",
        ))
        .await;
    let agents = [
        stack.agent(&key.secret),
        second.api(Some(&key.secret)),
        third.api(Some(&key.secret)),
    ];

    // Calls stream through the three proxies, two at a time each, while
    // version 3 is promoted.
    let stop = Arc::new(AtomicBool::new(false));
    let promoted = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicUsize::new(0));
    let mut streams = Vec::new();
    for agent in agents.iter().chain(agents.iter()) {
        let (agent, stop, promoted, counter) = (
            agent.clone(),
            stop.clone(),
            promoted.clone(),
            counter.clone(),
        );
        streams.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let after_promote = promoted.load(Ordering::SeqCst);
                let path = format!("/v1/echo/call-{}", counter.fetch_add(1, Ordering::SeqCst));
                let r = agent.get(&format!("/stripe{path}")).await;
                sent.push(Sent {
                    path,
                    status: r.status,
                    after_promote,
                });
            }
            sent
        }));
    }
    let deadline = within(Duration::from_secs(30));
    assert!(
        wait_until(deadline, || async { counter.load(Ordering::SeqCst) >= 30 }).await,
        "calls did not start"
    );
    let answer = promote(&stack, 3, "1h").await;
    promoted.store(true, Ordering::SeqCst);
    assert_eq!(answer["credential"]["version"], 3);
    assert_eq!(answer["credential"]["state"], "active");
    assert_eq!(answer["previous"]["version"], 1);
    assert_eq!(answer["previous"]["state"], "previous");
    assert_eq!(answer["confirmation"]["all_confirmed"], true, "{answer}");
    assert_eq!(
        answer["confirmation"]["confirmed_nodes"]
            .as_array()
            .map(Vec::len),
        Some(3),
        "{answer}"
    );
    let at_promote = counter.load(Ordering::SeqCst);
    assert!(
        wait_until(deadline, || async {
            counter.load(Ordering::SeqCst) >= at_promote + 30
        })
        .await,
        "calls stopped after the promote"
    );
    stop.store(true, Ordering::SeqCst);
    let mut sent = Vec::new();
    for s in streams {
        sent.extend(s.await.expect("stream task"));
    }

    // No call failed; the vendor saw each with exactly one credential, the
    // new one for every call sent after the promote answered.
    for s in &sent {
        assert_eq!(s.status, 200, "{} failed during the rotation", s.path);
    }
    let old_auth = format!("Bearer {STRIPE_CREDENTIAL}");
    let new_auth = format!("Bearer {NEW_CREDENTIAL}");
    let mut seen: BTreeMap<String, i64> = BTreeMap::new();
    for call in mock
        .calls()
        .iter()
        .filter(|c| c.path.starts_with("/v1/echo/"))
    {
        let version = match call.authorization() {
            Some(a) if a == old_auth => 1,
            Some(a) if a == new_auth => 3,
            other => panic!("{} carried {other:?}", call.path),
        };
        let auths = call
            .headers
            .iter()
            .filter(|(n, _)| n == "authorization")
            .count();
        assert_eq!(auths, 1, "{} carried {auths} credentials", call.path);
        assert!(seen.insert(call.path.clone(), version).is_none());
    }
    assert_eq!(seen.len(), sent.len(), "every call reached the vendor once");
    for s in sent.iter().filter(|s| s.after_promote) {
        assert_eq!(seen[&s.path], 3, "{} was sent after the promote", s.path);
    }
    assert!(seen.values().any(|v| *v == 1) && seen.values().any(|v| *v == 3));

    // The audit's credential_version is what the vendor saw, call by call.
    let audit = wait_for(within(SPEND_TIMEOUT), || async {
        let r = stack
            .admin
            .get(&format!("/vault/audit?key_id={}&limit=1000", key.id))
            .await
            .expect(200);
        let entries = r["entries"].as_array().cloned().unwrap_or_default();
        (entries.len() == sent.len()).then_some(entries)
    })
    .await
    .expect("every call in the audit");
    for e in &audit {
        let path = e["path"].as_str().expect("path");
        assert_eq!(
            e["credential_version"].as_i64(),
            Some(seen[path]),
            "audit of {path}: {e}"
        );
    }

    // Rollback within the grace: version 1 is active again and used.
    let back = promote(&stack, 1, "1s").await;
    assert_eq!(back["credential"]["version"], 1);
    assert_eq!(back["previous"]["version"], 3);
    let r = agents[2].get("/stripe/v1/echo/after-rollback").await;
    assert_eq!(r.status, 200);
    let last = mock.calls().last().cloned().expect("a call");
    assert_eq!(last.authorization(), Some(old_auth.as_str()));

    // Forward again with a short grace: version 1 retires once it ends, its
    // material erased, and can no longer come back.
    promote(&stack, 3, "1s").await;
    let retired = wait_until(within(Duration::from_secs(15)), || async {
        states(&credentials(&stack).await).contains(&(1, "retired".to_string()))
    })
    .await;
    assert!(retired, "{}", credentials(&stack).await);
    let r = stack
        .admin
        .post_json("/vault/vendors/stripe/credentials/1/promote", &json!({}))
        .await;
    r.expect_error(409, "conflict");
    let r = stack
        .admin
        .post_json("/vault/vendors/stripe/credentials/1/probe", &json!({}))
        .await;
    r.expect_error(409, "conflict");
    let vendor = stack.admin.get("/vault/vendors/stripe").await;
    assert_no_credential(&vendor.text);
    let vendor = vendor.expect(200);
    assert_eq!(vendor["credential_version"], 3, "{vendor}");
    assert_eq!(vendor["rotation_due"], false);
    assert_eq!(
        agents[1].get("/stripe/v1/echo/after-retire").await.status,
        200
    );
    assert_eq!(
        mock.calls()
            .last()
            .and_then(|c| c.authorization().map(str::to_string)),
        Some(new_auth)
    );
}

#[tokio::test]
async fn a_kek_rotation_rewraps_every_credential_version() {
    let (mut stack, mock) = stack_with_stripe().await;
    mock.accept_also(NEW_CREDENTIAL);
    // Staged with the CLI, the credential read from standard input.
    let out = harness::keycap_cli_with_stdin(
        &stack.control.url(),
        &stack.control.opts.admin_token,
        &["vendor", "credential", "add", "stripe", "--credential", "-"],
        Some(NEW_CREDENTIAL),
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    assert_no_credential(&out.stdout);
    assert_eq!(out.json()["version"], 2, "{out:?}");
    assert_eq!(out.json()["state"], "staged");
    let listed = keycap_cli(
        &stack.control.url(),
        &stack.control.opts.admin_token,
        &["vendor", "credential", "list", "stripe"],
    )
    .await;
    assert_no_credential(&listed.stdout);
    assert_eq!(
        states(&listed.json()),
        [(2, "staged".to_string()), (1, "active".to_string())]
    );
    let old = stack.control.opts.master_key.clone();
    stack.control.opts.master_key = harness::master_key();
    stack.control.opts.previous_master_keys = vec![old];
    stack.control.restart().await;
    let out = keycap_cli(
        &stack.control.url(),
        &stack.control.opts.admin_token,
        &["admin", "rotate-kek"],
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let report = out.json();
    // Version 1 (active) and version 2 (staged) both.
    assert_eq!(report["rewrapped"], 2, "{report}");
    assert_eq!(report["failed_vendors"], json!([]));

    // Under the new key alone, the staged version still opens: probed and
    // promoted, it is what the vendor gets.
    stack.control.opts.previous_master_keys.clear();
    stack.control.restart().await;
    let probed = stack
        .admin
        .post_json("/vault/vendors/stripe/credentials/2/probe", &json!({}))
        .await
        .expect(200);
    assert_eq!(probed["probe"]["ok"], true, "{probed}");
    let answer = stack
        .admin
        .post_json("/vault/vendors/stripe/credentials/2/promote", &json!({}))
        .await
        .expect(200);
    assert_eq!(answer["credential"]["state"], "active");
    assert!(answer["previous"]["grace_until"].is_string(), "{answer}");
}
