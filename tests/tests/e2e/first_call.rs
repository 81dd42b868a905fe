//! A key works on its first call: minted through either replica or a
//! proxy's `/vault` relay and called at once through every proxy, with no
//! pause and no retry, as an agent (or a Make.com scenario's next module)
//! calls it. Also while one replica is frozen (SIGSTOP): proxies notice
//! within about a second and take their policy from the other, creations
//! and revocations are still confirmed by every proxy, and once the frozen
//! replica is back the proxies that prefer it return to it.

use std::sync::Arc;

use keycap_tests::fleet::{self as fleet_rig, Fleet, FleetOpts};

use super::*;

/// Mint-then-call pairs in the fleet run.
const PAIRS: usize = 200;
/// Pairs in flight at once.
const PAIR_CONCURRENCY: usize = 4;

fn key_body(label: &str) -> Value {
    json!({
        "vendor": "stripe",
        "daily_usd_cap": 5,
        "allowed_endpoints": ["POST /v1/payment_intents"],
        "expires_in": "1h",
        "agent_run_label": label,
    })
}

async fn start_fleet() -> Option<Fleet> {
    let db = pg::fresh_database_or_skip()
        .await
        .expect("a PostgreSQL database for the test")?;
    Some(Fleet::start(db, &FleetOpts::default()).await)
}

/// Mints a key through `minter` and charges it once through each of
/// `agents` at once; returns every answer that was not a 200, with where it
/// came from.
async fn mint_then_call(minter: &Api, agents: &[String], label: &str) -> Vec<String> {
    let key = minter.post_json("/vault/keys", &key_body(label)).await;
    if key.status != 201 {
        return vec![format!("mint {label}: {} {}", key.status, key.text)];
    }
    let body = key.json();
    let secret = body["key"].as_str().expect("key").to_string();
    let calls: Vec<_> = agents
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let agent = Api::new(url, Some(&secret));
            let label = label.to_string();
            tokio::spawn(async move {
                let r = agent
                    .post_form(fleet_rig::CHARGE_PATH, "amount=1&currency=usd&confirm=true")
                    .await;
                (r.status != 200).then(|| format!("{label} on proxy {i}: {} {}", r.status, r.text))
            })
        })
        .collect();
    let mut bad = Vec::new();
    for c in calls {
        bad.extend(c.await.expect("call task"));
    }
    if body["confirmation"]["all_confirmed"] != json!(true) {
        bad.push(format!("{label}: not every proxy confirmed: {body}"));
    }
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_minted_anywhere_work_on_their_first_call_through_every_proxy() {
    let Some(fleet) = start_fleet().await else {
        return;
    };
    let token = &fleet.controls[0].opts.admin_token;
    // Where keys are minted: each replica, and each proxy's relay.
    let minters: Vec<Api> = fleet
        .controls
        .iter()
        .map(|c| c.admin())
        .chain(fleet.proxies.iter().map(|p| p.api(Some(token))))
        .collect();
    let agents: Vec<String> = fleet.proxies.iter().map(|p| p.url()).collect();
    let slots = Arc::new(tokio::sync::Semaphore::new(PAIR_CONCURRENCY));
    let mut pairs = Vec::with_capacity(PAIRS);
    for i in 0..PAIRS {
        let slot = slots.clone().acquire_owned().await.expect("semaphore");
        let minter = minters[i % minters.len()].clone();
        let agents = agents.clone();
        pairs.push(tokio::spawn(async move {
            let bad = mint_then_call(&minter, &agents, &format!("first-call/{i}")).await;
            drop(slot);
            bad
        }));
    }
    let mut refused = Vec::new();
    for p in pairs {
        refused.extend(p.await.expect("pair task"));
    }
    assert!(
        refused.is_empty(),
        "{} of {} first calls (and confirmations) failed: {:#?}",
        refused.len(),
        PAIRS * agents.len(),
        &refused[..refused.len().min(20)]
    );
    assert_eq!(fleet.mock.calls().len(), PAIRS * agents.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keycap_dev_serves_every_key_on_the_call_right_after_its_creation() {
    let token = harness::admin_token();
    let dev = Dev::start(&token).await;
    let admin = Api::new(&dev.proxy_url, Some(&token));
    for i in 0..PAIRS {
        let k = admin
            .post_json(
                "/vault/keys",
                &json!({
                    "vendor": "sandbox",
                    "daily_usd_cap": 5,
                    "allowed_endpoints": ["POST /v1/payment_intents"],
                    "expires_in": "1h",
                    "agent_run_label": format!("dev-first-call/{i}"),
                }),
            )
            .await
            .expect(201);
        let secret = k["key"].as_str().expect("key");
        let r = Api::new(&dev.proxy_url, Some(secret))
            .post_form(
                "/sandbox/v1/payment_intents",
                "amount=100&currency=usd&confirm=true",
            )
            .await;
        assert_eq!(r.status, 200, "key {i}, called at once: {}", r.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_replica_frozen_every_proxy_still_serves_new_keys_and_confirms_changes() {
    let Some(fleet) = start_fleet().await else {
        return;
    };
    let agents: Vec<String> = fleet.proxies.iter().map(|p| p.url()).collect();
    // A key in use everywhere before the freeze.
    let before = fleet.mint(1, json!(5), "frozen/before").await;
    for agent in fleet.agents(&before.secret) {
        agent
            .post_form(fleet_rig::CHARGE_PATH, "amount=1&currency=usd&confirm=true")
            .await
            .expect(200);
    }

    // Replica 0, the first choice of proxies 0 and 2, stops answering
    // without closing anything.
    fleet.controls[0].process().pause();
    let healthy = fleet.admin(1);
    let mut refused = Vec::new();
    for i in 0..20 {
        refused.extend(mint_then_call(&healthy, &agents, &format!("frozen/{i}")).await);
    }
    let revoked = healthy
        .delete(&format!("/vault/keys/{}", before.id))
        .await
        .expect(200);
    fleet.controls[0].process().resume();
    assert!(
        refused.is_empty(),
        "with replica 0 frozen, first calls or confirmations failed: {refused:#?}"
    );
    harness::assert_all_confirmed(&revoked);
    assert_eq!(
        revoked["confirmation"]["confirmed_nodes"]
            .as_array()
            .map(Vec::len),
        Some(3),
        "{revoked}"
    );
    for agent in fleet.agents(&before.secret) {
        agent
            .post_form(fleet_rig::CHARGE_PATH, "amount=1&currency=usd&confirm=true")
            .await
            .expect_error(401, "key_revoked");
    }

    // Back: the proxies that prefer replica 0 move back to it, so a
    // replica that was away does not stay idle while the other carries the
    // whole fleet.
    for i in [0, 2] {
        let home = wait_until(within(harness::POLICY_TIMEOUT), || async {
            fleet.proxies[i]
                .process()
                .log_contains("policy stream back on the home replica")
        })
        .await;
        assert!(home, "proxy {i} did not return to its first replica");
    }
    // And a change made there is confirmed by all three.
    let after = fleet.mint(0, json!(5), "frozen/after").await;
    for agent in fleet.agents(&after.secret) {
        agent
            .post_form(fleet_rig::CHARGE_PATH, "amount=1&currency=usd&confirm=true")
            .await
            .expect(200);
    }
}
