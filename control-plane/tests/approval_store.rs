//! Approvals in the store, on both backends (`sqlite::<case>`,
//! `postgres::<case>` as in `tests/store.rs`): a decision is recorded once,
//! and of any number of concurrent uses of one approval exactly one wins;
//! a use that breaks a rule (key, fingerprint, amount, expiry, state) never
//! does.

#[macro_use]
mod common;

use std::sync::Arc;

use chrono::{Duration, SubsecRound, Utc};
use keycap_control::approval::{Approval, ApprovalFilter, ApprovalState, ConsumeRefusal};
use keycap_control::domain::{KeyLimits, Profile, VaultKey, Vendor, VendorName};
use keycap_control::store::{Store, VendorWrite};
use keycap_proto::Micros;
use sha2::{Digest, Sha256};

store_suite!(
    an_approval_round_trips_and_is_decided_once,
    of_concurrent_uses_exactly_one_wins,
    a_use_that_breaks_a_rule_never_wins,
);

async fn key(s: &dyn Store, id: &str) {
    let now = Utc::now().trunc_subsecs(6);
    if s.get_vendor("stripe").await.unwrap().is_none() {
        s.put_vendor(VendorWrite {
            vendor: Vendor {
                name: VendorName::parse("stripe").unwrap(),
                profile: Profile::Stripe,
                base_url: "https://stripe.example.com".into(),
                currency_rates: Default::default(),
                prices: String::new(),
                forward_trace_context: false,
                created_at: now,
                updated_at: now,
                credential_set_at: now,
                rotate_after: None,
            },
            sealed_credential: Some(b"sealed".to_vec()),
            credential_version: 1,
        })
        .await
        .unwrap();
    }
    s.insert_key(&VaultKey {
        id: id.to_string(),
        key_hash: Sha256::digest(id.as_bytes()).into(),
        key_prefix: format!("kc_test_{id}"),
        vendor: VendorName::parse("stripe").unwrap(),
        allowed_endpoints: vec!["POST /v1/payment_intents".into()],
        daily_cap: Micros(100_000_000),
        per_call_cap: None,
        lifetime_cap: None,
        expires_at: now + Duration::hours(2),
        agent_run_label: "run".into(),
        metadata: Default::default(),
        created_at: now,
        revoked_at: None,
        limits: KeyLimits::default(),
        parent_id: None,
        approval_above: Some(Micros(10_000_000)),
        roll: Default::default(),
        observe_ceiling: None,
    })
    .await
    .unwrap();
}

fn approval(key_id: &str, ttl: Duration) -> Approval {
    let now = Utc::now().trunc_subsecs(6);
    Approval {
        id: keycap_control::approval::new_id(),
        key_id: key_id.to_string(),
        vendor: "stripe".into(),
        method: "POST".into(),
        path: "/v1/payment_intents".into(),
        fingerprint: [7; 32],
        quote: Micros(50_000_000),
        node_id: "node-1".into(),
        agent_run_label: "run".into(),
        requested_at: now,
        expires_at: now + ttl,
        decision: None,
        consumed_at: None,
        consumed_event: None,
    }
}

async fn an_approval_round_trips_and_is_decided_once(s: Arc<dyn Store>) {
    key(&*s, "k1").await;
    let stored = s.get_key("k1").await.unwrap().unwrap();
    assert_eq!(stored.approval_above, Some(Micros(10_000_000)));
    let a = approval("k1", Duration::hours(1));
    s.insert_approval(&a).await.unwrap();
    assert_eq!(s.get_approval(&a.id).await.unwrap().as_ref(), Some(&a));
    let mut orphan = approval("nope", Duration::hours(1));
    orphan.id = keycap_control::approval::new_id();
    assert!(s.insert_approval(&orphan).await.is_err());

    let now = Utc::now();
    let pending = s
        .list_approvals(
            &ApprovalFilter {
                state: Some(ApprovalState::Pending),
                ..Default::default()
            },
            now,
        )
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert!(s
        .decide_approval(&a.id, true, "adm_1 (ops)", "invoice", now)
        .await
        .unwrap());
    assert!(!s
        .decide_approval(&a.id, false, "adm_2 (ops)", "no", now)
        .await
        .unwrap());
    let decided = s.get_approval(&a.id).await.unwrap().unwrap();
    let d = decided.decision.as_ref().unwrap();
    assert!(d.approved);
    assert_eq!(
        (d.by.as_str(), d.reason.as_str()),
        ("adm_1 (ops)", "invoice")
    );
    assert_eq!(decided.state(now), ApprovalState::Approved);
    let approved = s
        .list_approvals(
            &ApprovalFilter {
                state: Some(ApprovalState::Approved),
                key_id: Some("k1".into()),
                limit: 0,
            },
            now,
        )
        .await
        .unwrap();
    assert_eq!(approved.len(), 1);
}

async fn of_concurrent_uses_exactly_one_wins(s: Arc<dyn Store>) {
    key(&*s, "k1").await;
    let a = approval("k1", Duration::hours(1));
    s.insert_approval(&a).await.unwrap();
    s.decide_approval(&a.id, true, "adm", "ok", Utc::now())
        .await
        .unwrap();
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (s, id) = (s.clone(), a.id.clone());
            tokio::spawn(async move {
                s.consume_approval(
                    &id,
                    "k1",
                    &[7; 32],
                    Micros(50_000_000),
                    &format!("ev_{i}"),
                    Utc::now(),
                )
                .await
                .unwrap()
            })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        if t.await.unwrap() {
            won += 1;
        }
    }
    assert_eq!(won, 1, "{won} uses of one approval won");
    let used = s.get_approval(&a.id).await.unwrap().unwrap();
    assert_eq!(used.state(Utc::now()), ApprovalState::Used);
    assert!(used.consumed_event.is_some());
}

async fn a_use_that_breaks_a_rule_never_wins(s: Arc<dyn Store>) {
    key(&*s, "k1").await;
    key(&*s, "k2").await;
    let now = Utc::now();
    let a = approval("k1", Duration::hours(1));
    s.insert_approval(&a).await.unwrap();
    let use_ = |key: &'static str, fp: [u8; 32], amount: i64| {
        let (s, id) = (s.clone(), a.id.clone());
        async move {
            s.consume_approval(&id, key, &fp, Micros(amount), "ev", Utc::now())
                .await
                .unwrap()
        }
    };
    // Pending: nothing wins.
    assert!(!use_("k1", [7; 32], 1).await);
    s.decide_approval(&a.id, true, "adm", "ok", now)
        .await
        .unwrap();
    assert!(!use_("k2", [7; 32], 1).await, "another key");
    assert!(!use_("k1", [8; 32], 1).await, "another request");
    assert!(!use_("k1", [7; 32], 50_000_001).await, "above the quote");
    let row = s.get_approval(&a.id).await.unwrap().unwrap();
    assert_eq!(
        row.refusal_for("k1", &[7; 32], Micros(50_000_001), Utc::now()),
        ConsumeRefusal::AmountExceeded
    );
    assert!(use_("k1", [7; 32], 40_000_000).await, "within the quote");

    // Expired: neither decided nor used.
    let late = approval("k1", Duration::milliseconds(1));
    s.insert_approval(&late).await.unwrap();
    let after = late.expires_at + Duration::seconds(1);
    assert!(!s
        .decide_approval(&late.id, true, "adm", "late", after)
        .await
        .unwrap());
    // Denied: never used.
    let denied = approval("k1", Duration::hours(1));
    s.insert_approval(&denied).await.unwrap();
    s.decide_approval(&denied.id, false, "adm", "no", now)
        .await
        .unwrap();
    assert!(!s
        .consume_approval(&denied.id, "k1", &[7; 32], Micros(1), "ev2", Utc::now())
        .await
        .unwrap());
    let d = s.get_approval(&denied.id).await.unwrap().unwrap();
    assert_eq!(d.state(Utc::now()), ApprovalState::Denied);
}
