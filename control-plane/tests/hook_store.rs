//! The inbound hook store (`crate::hooks`) on both backends, SQLite on a
//! temporary file and PostgreSQL at `DATABASE_URL` (skipped without one, as
//! in `store.rs`): registration and its change-log entries, re-wrapping
//! under a new KEK only what is unchanged, and the claim of an event id that keeps a replay from being relayed twice — exactly
//! one of many concurrent claimers wins, a dropped claim is free again, a
//! lapsed one too.

#[macro_use]
mod common;

use std::sync::Arc;

use chrono::{Duration, Utc};
use keycap_control::domain::ChangeRef;
use keycap_control::hooks::{HookEndpoint, StoredHook};
use keycap_control::store::{Store, StoreError};
use keycap_vendors::webhooks::HookVendor;

fn hook(id: &str) -> StoredHook {
    StoredHook {
        endpoint: HookEndpoint {
            id: id.into(),
            vendor: HookVendor::Stripe,
            destination_url: "https://scenario.example/hook".into(),
            public_url: String::new(),
            tolerance_secs: 300,
            description: "d".into(),
            created_at: chrono::DateTime::from_timestamp_micros(Utc::now().timestamp_micros())
                .unwrap(),
        },
        sealed_secrets: b"sealed-secrets".to_vec(),
        sealed_relay_secret: b"sealed-relay".to_vec(),
    }
}

async fn hook_changes(s: &dyn Store) -> Vec<String> {
    s.changes_since(0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|c| match c.what {
            ChangeRef::Hook(id) => Some(id),
            _ => None,
        })
        .collect()
}

async fn hooks_round_trip_and_reach_the_change_log(s: Arc<dyn Store>) {
    let h = hook("hk_1");
    s.insert_hook(&h).await.unwrap();
    assert!(matches!(
        s.insert_hook(&h).await,
        Err(StoreError::Conflict(_))
    ));
    let got = s.get_hook("hk_1").await.unwrap().expect("stored");
    assert_eq!(got.endpoint, h.endpoint);
    assert_eq!(got.sealed_secrets, h.sealed_secrets);
    assert_eq!(got.sealed_relay_secret, h.sealed_relay_secret);
    assert_eq!(s.list_hooks().await.unwrap().len(), 1);
    s.set_hook_secrets("hk_1", b"rolled").await.unwrap();
    assert_eq!(
        s.get_hook("hk_1").await.unwrap().unwrap().sealed_secrets,
        b"rolled"
    );
    // A KEK rotation replaces the sealed secrets only if unchanged.
    assert!(!s
        .rewrap_hook_secrets("hk_1", (b"stale", b"sealed-relay"), (b"a", b"b"))
        .await
        .unwrap());
    assert!(s
        .rewrap_hook_secrets(
            "hk_1",
            (b"rolled", b"sealed-relay"),
            (b"rewrapped", b"relay2")
        )
        .await
        .unwrap());
    let rewrapped = s.get_hook("hk_1").await.unwrap().unwrap();
    assert_eq!(rewrapped.sealed_secrets, b"rewrapped");
    assert_eq!(rewrapped.sealed_relay_secret, b"relay2");
    s.delete_hook("hk_1").await.unwrap();
    assert!(s.get_hook("hk_1").await.unwrap().is_none());
    assert!(matches!(
        s.delete_hook("hk_1").await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.set_hook_secrets("hk_1", b"x").await,
        Err(StoreError::NotFound(_))
    ));
    // Create, roll, delete: three entries the proxies follow.
    assert_eq!(hook_changes(&*s).await, vec!["hk_1", "hk_1", "hk_1"]);
}

async fn an_event_is_claimed_once_across_concurrent_claimers(s: Arc<dyn Store>) {
    s.insert_hook(&hook("hk_2")).await.unwrap();
    let now = Utc::now();
    let hold = now + Duration::seconds(60);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.claim_hook_event("hk_2", "evt_1", now, hold).await })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        if t.await.unwrap().unwrap() {
            won += 1;
        }
    }
    assert_eq!(won, 1, "claims of one event that won");
    // Another event of the same hook, and the same id at another hook, are
    // their own.
    assert!(s
        .claim_hook_event("hk_2", "evt_2", now, hold)
        .await
        .unwrap());
    assert!(s
        .claim_hook_event("hk_other", "evt_1", now, hold)
        .await
        .unwrap());
    // Relayed: kept for the window, still refused.
    let window = now + Duration::seconds(600);
    s.settle_hook_event("hk_2", "evt_1", Some(window))
        .await
        .unwrap();
    assert!(!s
        .claim_hook_event("hk_2", "evt_1", now, hold)
        .await
        .unwrap());
    // ...until the window has passed.
    let later = window + Duration::seconds(1);
    assert!(s
        .claim_hook_event("hk_2", "evt_1", later, later + Duration::seconds(60))
        .await
        .unwrap());
    // Not relayed: the claim is dropped and the vendor's retry may claim.
    s.settle_hook_event("hk_2", "evt_2", None).await.unwrap();
    assert!(s
        .claim_hook_event("hk_2", "evt_2", now, hold)
        .await
        .unwrap());
}

store_suite!(
    hooks_round_trip_and_reach_the_change_log,
    an_event_is_claimed_once_across_concurrent_claimers,
);
