//! The store test suite. Each case is written once against `dyn Store` and
//! runs on both backends: `sqlite::<case>` on a temporary database file and
//! `postgres::<case>` on a fresh database from `keycap_tests::pg` (the
//! server at `DATABASE_URL`, or a throwaway cluster).
//!
//! Times passed in carry nanoseconds on purpose: the store keeps whole
//! microseconds, so expected values are truncated with `trunc`.

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Duration, SubsecRound, TimeZone, Utc};
use keycap_control::domain::{
    AdminToken, AuditQuery, ChangeRef, EnforcedTerms, IssuerToken, KeyFilter, KeyLimits, KeyStatus,
    LeaseGrantRequest, Outcome, Profile, SpendDimension, SpendEvent, SpendReportQuery, VaultKey,
    Vendor, VendorName,
};
use keycap_control::scope::{Scopes, VendorScope};
use keycap_control::store::{
    unreturned_lease_grace, PgStore, RefusalCountQuery, SqliteStore, Store, StoreError, VendorWrite,
};
use keycap_proto::Micros;
use sha2::{Digest, Sha256};

use cases::*;
use common::Raw;

store_suite!(
    admin_tokens_round_trip,
    issuer_tokens_round_trip,
    a_known_hash_is_not_recorded_again,
    the_last_unrestricted_admin_token_cannot_be_revoked,
    revoke_run_within_vendors,
    audit_restricted_to_vendors,
    vendor_create_update_list,
    vendor_delete_rules,
    sealed_credentials_are_replaced_only_if_unchanged,
    key_round_trip_and_insert_rules,
    key_limits_round_trip,
    list_keys_filters_and_order,
    policy_keys_are_those_expiring_after_the_bound,
    revoke_key_is_idempotent,
    revoke_run_revokes_unrevoked_keys_of_the_run,
    change_log_versions,
    grant_respects_daily_cap,
    grant_minimum,
    grant_is_idempotent_by_grant_id,
    grant_refusals,
    expired_leases_stop_counting,
    a_returned_lease_counts_its_unreported_spend_past_its_expiry,
    return_lease_returns_the_unspent_rest,
    shrink_lease_gives_back_only_from_the_grant_it_names,
    lifetime_cap_spans_days,
    record_spend_applies_each_event_once,
    spend_moves_from_lease_to_settled,
    a_report_moves_only_its_own_nodes_lease,
    one_batch_settles_many_budgets_days_and_leases,
    fleet_nodes_register_acknowledge_and_unregister,
    fleet_heartbeat_refreshes_its_replica_and_forgets_the_dead,
    vendor_load_errors_are_replaced_per_node_and_shown_while_it_is_registered,
    fenced_leases_are_never_grown_but_keep_counting,
    key_spend_by_day_and_lifetime,
    audit_filters_order_and_paging,
    spend_summary_per_vendor,
    concurrent_grants_never_exceed_the_cap,
    concurrent_resent_batches_apply_once,
    an_event_dated_ahead_of_the_ledger_clock_waits_and_then_counts_once,
    an_event_resent_while_its_first_batch_fails_is_applied_once,
    a_tree_is_recorded_and_bounded_in_depth,
    siblings_share_their_parents_daily_cap,
    a_grandchild_is_bounded_by_its_grandparent,
    siblings_share_their_parents_lifetime_cap,
    a_revoked_or_expired_ancestor_refuses_grants,
    revoking_a_key_revokes_its_subtree,
    revoking_a_run_revokes_the_subtrees_of_its_keys,
    concurrent_sibling_grants_never_exceed_the_parents_cap,
    the_audit_ledger_is_one_hash_chain,
    concurrent_appenders_form_one_chain,
    a_bulk_batch_applies_each_event_once_within_and_across_batches,
    audit_filters_by_trace_id_and_context,
    an_export_verifies_with_the_documented_script,
    refusals_are_chained_entries_that_spend_nothing,
    spend_report_groups_ranges_and_ranks,
    refusal_counts_sum_records_per_key_and_reason,
    lineage_spend_sums_each_ancestors_subtree,
    threshold_reads_take_many_keys_at_once,
    a_roll_chain_spends_one_budget_and_retires_key_by_key,
    rolling_repeatedly_never_grants_more_than_the_cap,
    an_observe_key_is_held_to_its_ceiling_marked_at_ingest_and_switched_in_place,
);

macro_rules! raw_suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite_raw {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = crate::common::sqlite().await;
                    super::tamper::$case(backend.store.clone(), backend.raw.clone()).await;
                }
            )*
        }
        mod postgres_raw {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(backend) = crate::common::postgres().await else { return };
                    super::tamper::$case(backend.store.clone(), backend.raw.clone()).await;
                }
            )*
        }
    };
}

raw_suite!(
    the_ledger_triggers_refuse_changes,
    an_edited_amount_is_named,
    a_removed_middle_entry_is_named,
    removed_last_entries_are_caught_against_the_head,
    a_rewritten_head_is_caught_against_the_last_checkpoint,
);

/// The ledger tampered with as the database owner: verify names the entry.
mod tamper {
    use super::*;
    use keycap_control::ledger::{self, ChainBreak};

    type S = Arc<dyn Store>;

    /// 40 entries in batches of 7; their seqs, oldest first.
    async fn filled(s: &dyn Store) -> Vec<i64> {
        add_key(s, key("k1", "stripe", "r", 1_000_000_000)).await;
        let events: Vec<SpendEvent> = (0..40)
            .map(|i| event(&format!("e{i}"), "k1", "l1", DAY, "stripe", 100 + i))
            .collect();
        for batch in events.chunks(7) {
            s.record_spend(batch).await.unwrap();
        }
        let all = check_whole_chain(s).await;
        let v = ledger::verify(s, None, &[]).await.unwrap();
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.checked, 40);
        all.iter().map(|e| e.seq).collect()
    }

    pub async fn the_ledger_triggers_refuse_changes(s: S, raw: Raw) {
        let seqs = filled(&*s).await;
        let update = raw
            .exec(&format!(
                "UPDATE audit SET cost = 1 WHERE seq = {}",
                seqs[3]
            ))
            .await;
        assert!(update.unwrap_err().contains("append-only"));
        let delete = raw
            .exec(&format!("DELETE FROM audit WHERE seq = {}", seqs[3]))
            .await;
        assert!(delete.unwrap_err().contains("append-only"));
        if let Raw::Postgres(_) = raw {
            let truncate = raw.exec("TRUNCATE audit").await;
            assert!(truncate.unwrap_err().contains("append-only"));
        }
        assert!(ledger::verify(&*s, None, &[]).await.unwrap().ok());

        // Signed checkpoints are kept the same way.
        let (seq, hash) = s.ledger_head().await.unwrap();
        let key = ledger::checkpoint::new_signing_key();
        let cp = ledger::Checkpoint::sign(&key, seq, hash, Utc::now());
        s.insert_checkpoint(&cp).await.unwrap();
        let update = raw.exec("UPDATE ledger_checkpoints SET seq = 1").await;
        assert!(update.unwrap_err().contains("append-only"));
        let delete = raw.exec("DELETE FROM ledger_checkpoints").await;
        assert!(delete.unwrap_err().contains("append-only"));
        if let Raw::Postgres(_) = raw {
            let truncate = raw.exec("TRUNCATE ledger_checkpoints").await;
            assert!(truncate.unwrap_err().contains("append-only"));
        }
        assert_eq!(s.checkpoints(None, 5).await.unwrap(), [cp]);
    }

    pub async fn an_edited_amount_is_named(s: S, raw: Raw) {
        let seqs = filled(&*s).await;
        raw.disable_ledger_triggers().await;
        raw.exec(&format!(
            "UPDATE audit SET cost = cost + 1 WHERE seq = {}",
            seqs[17]
        ))
        .await
        .unwrap();
        let v = ledger::verify(&*s, None, &[]).await.unwrap();
        let broken = v.broken.expect("the edit is found");
        assert_eq!(
            (broken.seq, broken.reason),
            (seqs[17], ChainBreak::HashMismatch)
        );
        assert_eq!(v.checked, 17, "the entries before it hold");
        // Verifying from after it passes: the edit is before the range.
        let later = ledger::verify(&*s, Some(seqs[18]), &[]).await.unwrap();
        assert!(later.ok(), "{later:?}");
        assert_eq!(later.checked, 22);
    }

    pub async fn a_removed_middle_entry_is_named(s: S, raw: Raw) {
        let seqs = filled(&*s).await;
        raw.disable_ledger_triggers().await;
        raw.exec(&format!("DELETE FROM audit WHERE seq = {}", seqs[25]))
            .await
            .unwrap();
        let v = ledger::verify(&*s, None, &[]).await.unwrap();
        let broken = v.broken.expect("the gap is found");
        assert_eq!(
            (broken.seq, broken.reason),
            (seqs[26], ChainBreak::PrevMismatch)
        );
    }

    pub async fn a_rewritten_head_is_caught_against_the_last_checkpoint(s: S, raw: Raw) {
        let seqs = filled(&*s).await;
        let (head_seq, head_hash) = s.ledger_head().await.unwrap();
        assert_eq!(head_seq, seqs[39]);
        let key = ledger::checkpoint::new_signing_key();
        let trusted = [key.verifying_key().to_bytes()];
        let cp = ledger::Checkpoint::sign(&key, head_seq, head_hash, Utc::now());
        assert!(s.insert_checkpoint(&cp).await.unwrap());
        assert!(!s.insert_checkpoint(&cp).await.unwrap(), "one per seq");
        assert_eq!(
            s.checkpoints(None, 5).await.unwrap(),
            std::slice::from_ref(&cp)
        );
        let verify = |held: Option<ledger::KnownPoint>| {
            let s = s.clone();
            async move {
                ledger::verify_to_checkpoint(&*s, None, &trusted, held)
                    .await
                    .unwrap()
            }
        };
        assert!(verify(None).await.ok());

        // The last three entries removed and the head moved back to the
        // entry before them: the chain and the head agree again.
        raw.disable_ledger_triggers().await;
        raw.exec(&format!("DELETE FROM audit WHERE seq >= {}", seqs[37]))
            .await
            .unwrap();
        let survivor = check_whole_chain(&*s).await.pop().unwrap();
        let hex = hex::encode(survivor.hash.unwrap());
        let literal = match raw {
            Raw::Sqlite(_) => format!("X'{hex}'"),
            Raw::Postgres(_) => format!("decode('{hex}', 'hex')"),
        };
        raw.exec(&format!(
            "UPDATE ledger_head SET seq = {}, hash = {literal}",
            survivor.seq
        ))
        .await
        .unwrap();
        assert!(ledger::verify(&*s, None, &[]).await.unwrap().ok());
        let v = verify(None).await;
        let broken = v.broken.expect("the checkpoint catches it");
        assert_eq!(
            (broken.seq, broken.reason),
            (seqs[37], ChainBreak::Truncated)
        );
        assert_eq!(v.checkpoint_seq, Some(seqs[39]));

        // Checkpoints whose signature breaks, or that a key other than a
        // trusted one signed (as anyone who can write the database can
        // store), are not used.
        let mut broken_signature =
            ledger::Checkpoint::sign(&key, seqs[39] + 5, [1; 32], Utc::now());
        broken_signature.signature[0] ^= 1;
        s.insert_checkpoint(&broken_signature).await.unwrap();
        let stranger = ledger::checkpoint::new_signing_key();
        let forged = ledger::Checkpoint::sign(&stranger, seqs[39] + 6, [2; 32], Utc::now());
        assert!(forged.signature_holds());
        s.insert_checkpoint(&forged).await.unwrap();
        assert_eq!(s.checkpoints(None, 5).await.unwrap().len(), 3);
        assert_eq!(s.checkpoints(Some(&trusted), 5).await.unwrap().len(), 2);
        assert!(s.checkpoints(Some(&[]), 5).await.unwrap().is_empty());
        assert_eq!(
            verify(None).await.checkpoint_seq,
            Some(seqs[39]),
            "both skipped"
        );

        // The stored checkpoints removed too: only a checkpoint kept
        // outside the database still shows the rewrite.
        raw.exec("DELETE FROM ledger_checkpoints").await.unwrap();
        let v = verify(None).await;
        assert!(v.ok(), "nothing stored is left to catch it: {v:?}");
        let kept = format!("{}:{}", seqs[39], hex::encode(head_hash));
        let v = verify(Some(kept.parse().unwrap())).await;
        let broken = v.broken.expect("the kept checkpoint catches it");
        assert_eq!(
            (broken.seq, broken.reason),
            (seqs[37], ChainBreak::Truncated)
        );
        // A kept point the chain still reaches, with the hash it had, holds;
        // with another hash it names that entry.
        let before = check_whole_chain(&*s).await[30].clone();
        let point = ledger::KnownPoint {
            seq: before.seq,
            hash: before.hash.unwrap(),
        };
        assert!(verify(Some(point)).await.ok());
        let other = ledger::KnownPoint {
            hash: [9; 32],
            ..point
        };
        let broken = verify(Some(other)).await.broken.unwrap();
        assert_eq!(
            (broken.seq, broken.reason),
            (before.seq, ChainBreak::Truncated)
        );
    }

    pub async fn removed_last_entries_are_caught_against_the_head(s: S, raw: Raw) {
        let seqs = filled(&*s).await;
        raw.disable_ledger_triggers().await;
        raw.exec(&format!("DELETE FROM audit WHERE seq >= {}", seqs[37]))
            .await
            .unwrap();
        let v = ledger::verify(&*s, None, &[]).await.unwrap();
        let broken = v.broken.expect("the truncation is found");
        assert_eq!(
            (broken.seq, broken.reason),
            (seqs[37], ChainBreak::Truncated)
        );
        assert_eq!(v.checked, 37);
    }
}

#[tokio::test]
async fn sqlite_in_memory_store_works() {
    let mem = SqliteStore::in_memory().await.unwrap();
    mem.migrate().await.unwrap();
    add_key(&mem, key("k1", "stripe", "run", 1_000)).await;
    assert_eq!(
        granted(&mem, grant("g1", "l1", "k1", DAY, 600, 0)).await,
        600
    );
    assert_eq!(
        granted(&mem, grant("g2", "l2", "k1", DAY, 600, 0)).await,
        400
    );
    assert!(mem.get_key("k1").await.unwrap().is_some());
    let other = SqliteStore::in_memory().await.unwrap();
    other.migrate().await.unwrap();
    assert!(
        other.get_key("k1").await.unwrap().is_none(),
        "each in-memory store is its own"
    );
}

#[tokio::test]
async fn sqlite_file_is_created_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub-keycap.db");
    assert!(!path.exists());
    let store = SqliteStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    assert!(path.exists(), "connect creates the file");
    let pool = store.pool();
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(journal, "wal");
    let foreign_keys: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(foreign_keys, 1);
    let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(busy > 0, "busy_timeout is set");
    assert!(SqliteStore::connect("").await.is_err());
}

// --- fixtures ----------------------------------------------------------------

const DAY: &str = "2026-01-15";
const DAY2: &str = "2026-01-16";
const DAY3: &str = "2026-01-17";

/// A fixed "now" with sub-microsecond digits, in the past: the calls it
/// dates must not lie ahead of the ledger's own clock (`ledger::MAX_AHEAD`).
fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 15, 12, 0, 0).unwrap() + Duration::nanoseconds(123_456_789)
}

fn trunc(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

fn vendor(name: &str, at: DateTime<Utc>) -> Vendor {
    let mut rates = BTreeMap::new();
    rates.insert("eur".to_string(), "1.08".to_string());
    Vendor {
        name: VendorName::parse(name).unwrap(),
        profile: Profile::Stripe,
        base_url: format!("https://{name}.example.com/v1"),
        currency_rates: rates,
        // The store keeps the text as given (validation is the domain's).
        prices: format!(r#"{{"vendor":"{name}"}}"#),
        forward_trace_context: false,
        created_at: at,
        updated_at: at,
        credential_set_at: at,
        rotate_after: None,
    }
}

fn with_credential(v: Vendor, credential: &[u8]) -> VendorWrite {
    with_version(v, credential, 1)
}

/// A write of `credential` as the vendor's `version` (its next one).
fn with_version(v: Vendor, credential: &[u8], version: i64) -> VendorWrite {
    VendorWrite {
        vendor: v,
        sealed_credential: Some(credential.to_vec()),
        credential_version: version,
    }
}

async fn add_vendor(s: &dyn Store, name: &str) {
    s.put_vendor(with_credential(vendor(name, now()), b"sealed"))
        .await
        .expect("put vendor");
}

fn admin_token(
    id: &str,
    scopes: &[&str],
    vendors: &[&str],
    expires_at: Option<DateTime<Utc>>,
) -> AdminToken {
    AdminToken {
        id: id.to_string(),
        token_hash: Sha256::digest(id.as_bytes()).into(),
        token_prefix: format!("kcadm_test_{id}"),
        name: format!("token {id}"),
        scopes: Scopes::parse_list(scopes).unwrap(),
        vendors: VendorScope::parse_list(vendors).unwrap(),
        // Later ids sort as newer.
        created_at: trunc(now()) + Duration::seconds(id.len() as i64),
        expires_at: expires_at.map(trunc),
        revoked_at: None,
    }
}

fn issuer_token(id: &str, key_id: &str, expires_at: Option<DateTime<Utc>>) -> IssuerToken {
    IssuerToken {
        id: id.to_string(),
        token_hash: Sha256::digest(id.as_bytes()).into(),
        token_prefix: format!("kciss_test_{id}"),
        key_id: key_id.to_string(),
        name: format!("scenario {id}"),
        // Later ids sort as newer.
        created_at: trunc(now()) + Duration::seconds(id.len() as i64),
        expires_at: expires_at.map(trunc),
        revoked_at: None,
    }
}

fn key(id: &str, vendor: &str, label: &str, daily_cap: i64) -> VaultKey {
    let mut metadata = BTreeMap::new();
    metadata.insert("scenario".to_string(), "checkout".to_string());
    VaultKey {
        id: id.to_string(),
        key_hash: Sha256::digest(id.as_bytes()).into(),
        key_prefix: format!("kc_test_{id}"),
        vendor: VendorName::parse(vendor).unwrap(),
        allowed_endpoints: vec![
            "POST /v1/payment_intents".to_string(),
            "GET /v1/*".to_string(),
        ],
        daily_cap: Micros(daily_cap),
        per_call_cap: Some(Micros(daily_cap / 2)),
        lifetime_cap: None,
        expires_at: now() + Duration::days(30),
        agent_run_label: label.to_string(),
        metadata,
        created_at: now(),
        revoked_at: None,
        limits: KeyLimits::default(),
        parent_id: None,
        approval_above: None,
        roll: Default::default(),
        observe_ceiling: None,
    }
}

/// A key minted under `parent`.
fn child(id: &str, parent: &str, daily_cap: i64) -> VaultKey {
    VaultKey {
        parent_id: Some(parent.to_string()),
        ..key(id, "stripe", "r", daily_cap)
    }
}

/// The successor a roll of `old` mints: its policy, its budget.
fn successor(old: &VaultKey, id: &str) -> VaultKey {
    VaultKey {
        id: id.to_string(),
        key_hash: Sha256::digest(id.as_bytes()).into(),
        key_prefix: format!("kc_test_{id}"),
        roll: keycap_control::domain::KeyRoll {
            budget_id: Some(old.budget_id().to_string()),
            rolled_from: Some(old.id.clone()),
            successor_id: None,
            retire_at: None,
        },
        ..old.clone()
    }
}

/// Inserts a vendor (if needed) and a key with this daily cap.
async fn add_key(s: &dyn Store, k: VaultKey) -> VaultKey {
    if s.get_vendor(k.vendor.as_str()).await.unwrap().is_none() {
        add_vendor(s, k.vendor.as_str()).await;
    }
    s.insert_key(&k).await.expect("insert key");
    k
}

fn grant(
    grant_id: &str,
    lease_id: &str,
    key_id: &str,
    day: &str,
    requested: i64,
    minimum: i64,
) -> LeaseGrantRequest {
    LeaseGrantRequest {
        grant_id: grant_id.to_string(),
        lease_id: lease_id.to_string(),
        key_id: key_id.to_string(),
        node_id: "node-a".to_string(),
        day: day.to_string(),
        requested: Micros(requested),
        minimum: Micros(minimum),
        expires_at: now() + Duration::hours(1),
    }
}

/// Grants and returns just the granted amount.
async fn granted(s: &dyn Store, req: LeaseGrantRequest) -> i64 {
    s.grant_lease(&req, now()).await.expect("grant").granted.0
}

/// What a fresh lease could get right now (asks for everything, grants
/// nothing: the answer's `unleased` with a minimum nobody can meet).
async fn available(s: &dyn Store, key_id: &str, day: &str) -> i64 {
    let probe = format!("probe-{}", rand_id());
    let mut req = grant(&probe, &probe, key_id, day, i64::MAX / 4, i64::MAX / 4);
    req.expires_at = now() + Duration::hours(1);
    let answer = s.grant_lease(&req, now()).await.expect("probe grant");
    assert_eq!(answer.granted, Micros(0), "a probe must not take budget");
    answer.unleased.0
}

fn rand_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

fn event(
    event_id: &str,
    key_id: &str,
    lease_id: &str,
    day: &str,
    vendor: &str,
    cost: i64,
) -> SpendEvent {
    SpendEvent {
        event_id: event_id.to_string(),
        lease_id: lease_id.to_string(),
        key_id: key_id.to_string(),
        day: day.to_string(),
        vendor: vendor.to_string(),
        method: "POST".to_string(),
        path: "/v1/payment_intents".to_string(),
        upstream_status: 200,
        reserved: Micros(cost + 1),
        cost: Micros(cost),
        outcome: Outcome::Settled,
        at: now(),
        node_id: "node-a".to_string(),
        detail_json: r#"{"model":"x"}"#.to_string(),
        trace_id: String::new(),
        context: BTreeMap::new(),
        refusal_reason: String::new(),
        refused_calls: 0,
        credential_version: 0,
        would_refuse: String::new(),
    }
}

/// A proxy's report of `calls` calls of `key_id` refused with `reason` in
/// the minute starting at `at`.
fn refusal(event_id: &str, key_id: &str, vendor: &str, reason: &str, calls: i64) -> SpendEvent {
    SpendEvent {
        lease_id: String::new(),
        method: String::new(),
        path: String::new(),
        upstream_status: 0,
        reserved: Micros(0),
        outcome: Outcome::Refused,
        detail_json: String::new(),
        refusal_reason: reason.to_string(),
        refused_calls: calls,
        ..event(event_id, key_id, "", DAY, vendor, 0)
    }
}

/// Every audit entry, oldest first, checked as one hash chain from the
/// start; panics naming the first broken entry.
async fn check_whole_chain(s: &dyn Store) -> Vec<keycap_control::domain::AuditEntry> {
    let mut all = Vec::new();
    let mut before = None;
    loop {
        let page = s
            .query_audit(&AuditQuery {
                before_seq: before,
                limit: 1000,
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        let done = page.len() < 1000;
        before = page.last().map(|e| e.seq);
        all.extend(page);
        if done {
            break;
        }
    }
    all.reverse();
    let mut check = keycap_control::ledger::ChainCheck::new();
    for e in &all {
        check
            .push(
                e.seq,
                &e.agent_run_label,
                &e.event,
                e.prev_hash.as_ref().map(|h| &h[..]),
                e.hash.as_ref().map(|h| &h[..]),
            )
            .unwrap_or_else(|b| panic!("chain broken at seq {}: {}", e.seq, b.describe()));
    }
    assert_eq!(
        check.checked() as usize,
        all.len(),
        "every entry is chained"
    );
    all
}

fn assert_conflict<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) {
    assert!(
        matches!(r, Err(StoreError::Conflict(_))),
        "{what}: expected Conflict, got {r:?}"
    );
}

fn assert_not_found<T: std::fmt::Debug>(r: Result<T, StoreError>, what: &str) {
    assert!(
        matches!(r, Err(StoreError::NotFound(_))),
        "{what}: expected NotFound, got {r:?}"
    );
}

// --- cases -------------------------------------------------------------------

mod cases {
    use super::*;

    type S = Arc<dyn Store>;

    pub async fn admin_tokens_round_trip(s: S) {
        let full = admin_token("adm_full", &["admin"], &[], None);
        let narrow = admin_token(
            "adm_narrow",
            &["keys:issue", "audit:read"],
            &["openai", "stripe"],
            Some(now() + Duration::hours(2)),
        );
        s.insert_admin_token(&full).await.unwrap();
        s.insert_admin_token(&narrow).await.unwrap();
        assert_eq!(
            s.find_admin_token(&narrow.token_hash).await.unwrap(),
            Some(narrow.clone()),
            "scopes, vendors and times read back as written"
        );
        assert_eq!(
            s.get_admin_token("adm_full").await.unwrap(),
            Some(full.clone())
        );
        assert_eq!(s.find_admin_token(&[9u8; 32]).await.unwrap(), None);
        assert_eq!(s.get_admin_token("adm_none").await.unwrap(), None);
        let listed: Vec<String> = s
            .list_admin_tokens()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(listed, ["adm_narrow", "adm_full"], "newest first");

        let mut same_hash = admin_token("adm_other", &["admin"], &[], None);
        same_hash.token_hash = full.token_hash;
        assert!(matches!(
            s.insert_admin_token(&same_hash).await,
            Err(StoreError::Conflict(_))
        ));
        let same_id = admin_token("adm_full", &["admin"], &[], None);
        let mut same_id = same_id;
        same_id.token_hash = [42u8; 32];
        assert!(matches!(
            s.insert_admin_token(&same_id).await,
            Err(StoreError::Conflict(_))
        ));

        let later = now() + Duration::minutes(5);
        let revoked = s.revoke_admin_token("adm_narrow", later).await.unwrap();
        assert_eq!(revoked.revoked_at, Some(trunc(later)));
        let again = s
            .revoke_admin_token("adm_narrow", later + Duration::hours(1))
            .await
            .unwrap();
        assert_eq!(again.revoked_at, Some(trunc(later)), "keeps its first time");
        assert_eq!(
            s.find_admin_token(&narrow.token_hash)
                .await
                .unwrap()
                .unwrap()
                .status(later),
            KeyStatus::Revoked
        );
        assert!(matches!(
            s.revoke_admin_token("adm_none", later).await,
            Err(StoreError::NotFound(_))
        ));
    }

    pub async fn a_known_hash_is_not_recorded_again(s: S) {
        // What start-up does with --admin-token: a retired bootstrap token
        // presented again must stay retired.
        let boot = admin_token("adm_boot", &["admin"], &[], None);
        s.ensure_admin_token(&boot).await.unwrap();
        s.insert_admin_token(&admin_token("adm_second", &["admin"], &[], None))
            .await
            .unwrap();
        s.revoke_admin_token("adm_boot", now()).await.unwrap();
        let mut restart = admin_token("adm_fresh_id", &["admin"], &[], None);
        restart.token_hash = boot.token_hash;
        s.ensure_admin_token(&restart).await.unwrap();
        let stored = s.find_admin_token(&boot.token_hash).await.unwrap().unwrap();
        assert_eq!(stored.id, "adm_boot");
        assert_eq!(stored.revoked_at, Some(trunc(now())));
        assert_eq!(s.get_admin_token("adm_fresh_id").await.unwrap(), None);
        assert_eq!(s.list_admin_tokens().await.unwrap().len(), 2);
    }

    pub async fn the_last_unrestricted_admin_token_cannot_be_revoked(s: S) {
        s.insert_admin_token(&admin_token("adm_boot", &["admin"], &[], None))
            .await
            .unwrap();
        // None of these can stand in for it: restricted to vendors, short
        // of scopes, or expired.
        s.insert_admin_token(&admin_token("adm_vendor", &["admin"], &["stripe"], None))
            .await
            .unwrap();
        s.insert_admin_token(&admin_token(
            "adm_keys",
            &["keys:issue", "tokens:write"],
            &[],
            None,
        ))
        .await
        .unwrap();
        s.insert_admin_token(&admin_token(
            "adm_expired",
            &["admin"],
            &[],
            Some(now() - Duration::seconds(1)),
        ))
        .await
        .unwrap();
        // Nor one that will expire, nor a row from before the kcadm_ format
        // (empty prefix), which can never sign in.
        s.insert_admin_token(&admin_token(
            "adm_expiring",
            &["admin"],
            &[],
            Some(now() + Duration::days(1)),
        ))
        .await
        .unwrap();
        let mut legacy = admin_token("adm_legacy", &["admin"], &[], None);
        legacy.token_prefix = String::new();
        s.insert_admin_token(&legacy).await.unwrap();
        match s.revoke_admin_token("adm_boot", now()).await {
            Err(StoreError::Conflict(msg)) => assert!(msg.contains("last"), "{msg}"),
            other => panic!("revoked the last admin token: {other:?}"),
        }
        assert_eq!(
            s.get_admin_token("adm_boot")
                .await
                .unwrap()
                .unwrap()
                .revoked_at,
            None
        );
        // Lesser tokens can always go.
        s.revoke_admin_token("adm_vendor", now()).await.unwrap();
        s.revoke_admin_token("adm_keys", now()).await.unwrap();

        s.insert_admin_token(&admin_token("adm_second", &["admin"], &[], None))
            .await
            .unwrap();
        s.revoke_admin_token("adm_boot", now()).await.unwrap();
        assert!(matches!(
            s.revoke_admin_token("adm_second", now()).await,
            Err(StoreError::Conflict(_))
        ));

        // Two admins revoked at once: exactly one revocation succeeds.
        s.insert_admin_token(&admin_token("adm_third", &["admin"], &[], None))
            .await
            .unwrap();
        let (a, b) = tokio::join!(
            s.revoke_admin_token("adm_second", now()),
            s.revoke_admin_token("adm_third", now())
        );
        assert_eq!(
            [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(),
            1,
            "{a:?} / {b:?}"
        );
    }

    pub async fn sealed_credentials_are_replaced_only_if_unchanged(s: S) {
        s.put_vendor(with_credential(vendor("stripe", now()), b"sealed-a"))
            .await
            .unwrap();
        s.put_vendor(with_credential(vendor("openai", now()), b"sealed-b"))
            .await
            .unwrap();
        assert_eq!(
            s.sealed_credentials()
                .await
                .unwrap()
                .into_iter()
                .map(|c| (c.vendor, c.version, c.sealed))
                .collect::<Vec<_>>(),
            vec![
                ("openai".to_string(), 1, b"sealed-b".to_vec()),
                ("stripe".to_string(), 1, b"sealed-a".to_vec()),
            ]
        );
        let version = s.latest_version().await.unwrap();
        assert!(s
            .replace_sealed_credential("stripe", 1, b"sealed-a", b"sealed-a2")
            .await
            .unwrap());
        assert_eq!(
            s.get_vendor_credential("stripe").await.unwrap(),
            Some((1, b"sealed-a2".to_vec()))
        );
        // Stale expectation (changed meanwhile): nothing is replaced.
        assert!(!s
            .replace_sealed_credential("stripe", 1, b"sealed-a", b"sealed-a3")
            .await
            .unwrap());
        assert!(!s
            .replace_sealed_credential("missing", 1, b"x", b"y")
            .await
            .unwrap());
        assert_eq!(
            s.get_vendor_credential("stripe").await.unwrap(),
            Some((1, b"sealed-a2".to_vec()))
        );
        assert_eq!(
            s.get_vendor_credential("openai").await.unwrap(),
            Some((1, b"sealed-b".to_vec()))
        );
        assert_eq!(
            s.latest_version().await.unwrap(),
            version,
            "a re-wrap changes nothing a proxy sees"
        );
    }

    pub async fn vendor_create_update_list(s: S) {
        let t1 = now();
        let no_credential = VendorWrite {
            vendor: vendor("stripe", t1),
            sealed_credential: None,
            credential_version: 0,
        };
        assert_conflict(
            s.put_vendor(no_credential).await,
            "create without credential",
        );
        assert_eq!(s.get_vendor("stripe").await.unwrap(), None);
        assert_eq!(
            s.latest_version().await.unwrap(),
            0,
            "a refused put logs nothing"
        );

        let (stored, created) = s
            .put_vendor(with_credential(vendor("stripe", t1), b"cred-1"))
            .await
            .unwrap();
        assert!(created);
        assert_eq!(stored.created_at, trunc(t1));
        assert_eq!(stored.updated_at, trunc(t1));
        assert_eq!(s.get_vendor("stripe").await.unwrap(), Some(stored.clone()));
        assert_eq!(
            s.get_vendor_credential("stripe").await.unwrap(),
            Some((1, b"cred-1".to_vec()))
        );

        // Update without a credential: keeps it and created_at.
        let t2 = t1 + Duration::minutes(5);
        let mut changed = vendor("stripe", t2);
        changed.base_url = "https://api.stripe.example/v2".to_string();
        changed.profile = Profile::Openai;
        changed
            .currency_rates
            .insert("gbp".to_string(), "1.27".to_string());
        changed.forward_trace_context = true;
        let (updated, created) = s
            .put_vendor(VendorWrite {
                vendor: changed.clone(),
                sealed_credential: None,
                credential_version: 0,
            })
            .await
            .unwrap();
        assert!(!created);
        assert_eq!(updated.created_at, trunc(t1), "created_at is kept");
        assert_eq!(updated.updated_at, trunc(t2));
        assert_eq!(updated.base_url, changed.base_url);
        assert!(updated.forward_trace_context);
        assert_eq!(s.get_vendor("stripe").await.unwrap(), Some(updated.clone()));
        assert_eq!(
            s.get_vendor_credential("stripe").await.unwrap(),
            Some((1, b"cred-1".to_vec()))
        );

        // Update with a credential replaces it: the next version, active;
        // the one before retires at once. A stale version is refused.
        assert_conflict(
            s.put_vendor(with_version(vendor("stripe", t2), b"cred-x", 1))
                .await,
            "a taken credential version",
        );
        s.put_vendor(with_version(vendor("stripe", t2), b"cred-2", 2))
            .await
            .unwrap();
        let versions = s.list_credentials("stripe").await.unwrap();
        assert_eq!(
            versions
                .iter()
                .map(|c| (c.version, c.state.as_str()))
                .collect::<Vec<_>>(),
            [(2, "active"), (1, "retired")]
        );
        assert_eq!(
            s.get_credential("stripe", 1).await.unwrap().unwrap().1,
            None
        );
        assert_eq!(
            s.get_vendor_credential("stripe").await.unwrap(),
            Some((2, b"cred-2".to_vec()))
        );

        s.put_vendor(with_credential(vendor("anthropic", t1), b"x"))
            .await
            .unwrap();
        s.put_vendor(with_credential(vendor("openai", t1), b"y"))
            .await
            .unwrap();
        let names: Vec<String> = s
            .list_vendors()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name.to_string())
            .collect();
        assert_eq!(names, ["anthropic", "openai", "stripe"]);
        assert_eq!(s.get_vendor("nope").await.unwrap(), None);
        assert_eq!(s.get_vendor_credential("nope").await.unwrap(), None);
    }

    pub async fn vendor_delete_rules(s: S) {
        assert_not_found(
            s.delete_vendor("ghost", now()).await,
            "delete unknown vendor",
        );

        add_key(&*s, key("k1", "stripe", "run", 1_000)).await;
        let before = s.latest_version().await.unwrap();
        assert_conflict(
            s.delete_vendor("stripe", now()).await,
            "delete with an active key",
        );
        assert_eq!(
            s.latest_version().await.unwrap(),
            before,
            "a refused delete logs nothing"
        );

        // Once the key is inactive (revoked here; expired in the second
        // vendor below) the vendor may go, and the key stays.
        s.revoke_key("k1", now()).await.unwrap();
        s.delete_vendor("stripe", now())
            .await
            .expect("delete with only revoked keys");
        assert_eq!(s.get_vendor("stripe").await.unwrap(), None);
        assert_eq!(s.get_vendor_credential("stripe").await.unwrap(), None);
        assert!(
            s.get_key("k1").await.unwrap().is_some(),
            "keys outlive their vendor"
        );
        assert_not_found(s.delete_vendor("stripe", now()).await, "delete twice");

        let mut short = key("k2", "openai", "run", 1_000);
        short.expires_at = now() + Duration::minutes(10);
        add_key(&*s, short).await;
        assert_conflict(s.delete_vendor("openai", now()).await, "key still live");
        s.delete_vendor("openai", now() + Duration::minutes(10))
            .await
            .expect("delete once the only key has expired");
        assert!(s.list_vendors().await.unwrap().is_empty());
    }

    pub async fn key_round_trip_and_insert_rules(s: S) {
        assert_not_found(
            s.insert_key(&key("k1", "stripe", "run", 5)).await,
            "insert with unknown vendor",
        );
        assert_eq!(s.latest_version().await.unwrap(), 0);

        add_vendor(&*s, "stripe").await;
        let mut k = key("k1", "stripe", "run-1", 2_500_000);
        k.lifetime_cap = Some(Micros(10_000_000));
        k.per_call_cap = None;
        s.insert_key(&k).await.unwrap();
        let mut expected = k.clone();
        expected.expires_at = trunc(k.expires_at);
        expected.created_at = trunc(k.created_at);
        assert_eq!(s.get_key("k1").await.unwrap(), Some(expected));
        assert_eq!(s.get_key("nope").await.unwrap(), None);

        assert_conflict(s.insert_key(&k).await, "duplicate key id");
        let mut same_hash = key("k2", "stripe", "run-1", 5);
        same_hash.key_hash = k.key_hash;
        assert_conflict(s.insert_key(&same_hash).await, "duplicate key hash");
        assert_eq!(s.get_key("k2").await.unwrap(), None);
    }

    pub async fn key_limits_round_trip(s: S) {
        add_vendor(&*s, "stripe").await;
        let mut limited = key("limited", "stripe", "run-1", 5);
        limited.limits = KeyLimits::parse(
            120,
            &[
                "10.0.0.0/8".into(),
                "2001:db8::/32".into(),
                "192.0.2.7".into(),
            ],
            "eu-west",
        )
        .unwrap();
        add_key(&*s, limited.clone()).await;
        // A key without limits reads back without them, not as zeros.
        add_key(&*s, key("open", "stripe", "run-1", 5)).await;

        let got = s.get_key("limited").await.unwrap().expect("limited key");
        assert_eq!(got.limits, limited.limits);
        assert_eq!(
            got.limits.cidr_strings(),
            ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]
        );
        assert_eq!(got.limits.rate_limit_per_minute, Some(120));
        assert_eq!(got.limits.zone.as_deref(), Some("eu-west"));
        let open = s.get_key("open").await.unwrap().expect("open key");
        assert_eq!(open.limits, KeyLimits::default());
        // What proxies are sent carries the limits too.
        let policy = s.policy_keys(now() - Duration::days(1)).await.unwrap();
        let sent = policy
            .iter()
            .find(|k| k.id == "limited")
            .expect("in policy");
        assert_eq!(sent.limits, limited.limits);
        let listed = s.list_keys(&KeyFilter::default(), now()).await.unwrap();
        let listed = listed.iter().find(|k| k.id == "limited").expect("listed");
        assert_eq!(listed.limits, limited.limits);
    }

    pub async fn list_keys_filters_and_order(s: S) {
        let at = |mins| now() + Duration::minutes(mins);
        let mut a = key("a", "stripe", "run-1", 10);
        a.created_at = at(1);
        let mut b = key("b", "openai", "run-1", 10);
        b.created_at = at(3);
        let mut c = key("c", "stripe", "run-2", 10);
        c.created_at = at(2);
        let mut d = key("d", "stripe", "run-1", 10);
        d.created_at = at(3); // same instant as b: ties break by id, descending
        let mut expired = key("e", "stripe", "run-1", 10);
        expired.created_at = at(4);
        expired.expires_at = at(5);
        for k in [a, b, c, d, expired] {
            add_key(&*s, k).await;
        }
        s.revoke_key("c", at(6)).await.unwrap();
        let later = at(10);

        let ids = |keys: Vec<VaultKey>| keys.into_iter().map(|k| k.id).collect::<Vec<_>>();
        let all = KeyFilter::default();
        assert_eq!(
            ids(s.list_keys(&all, later).await.unwrap()),
            ["d", "b", "a"]
        );
        let everything = KeyFilter {
            include_inactive: true,
            ..KeyFilter::default()
        };
        assert_eq!(
            ids(s.list_keys(&everything, later).await.unwrap()),
            ["e", "d", "b", "c", "a"]
        );
        let run1 = KeyFilter {
            agent_run_label: Some("run-1".to_string()),
            include_inactive: true,
            ..KeyFilter::default()
        };
        assert_eq!(
            ids(s.list_keys(&run1, later).await.unwrap()),
            ["e", "d", "b", "a"]
        );
        let stripe_run1 = KeyFilter {
            agent_run_label: Some("run-1".to_string()),
            vendor: Some("stripe".to_string()),
            include_inactive: false,
        };
        assert_eq!(
            ids(s.list_keys(&stripe_run1, later).await.unwrap()),
            ["d", "a"]
        );
        // Before "e" expired it is active.
        assert_eq!(
            ids(s.list_keys(&stripe_run1, at(4)).await.unwrap()),
            ["e", "d", "a"]
        );
    }

    pub async fn policy_keys_are_those_expiring_after_the_bound(s: S) {
        add_key(&*s, key("live", "stripe", "r", 10)).await;
        add_key(&*s, key("revoked", "stripe", "r", 10)).await;
        let mut soon = key("soon", "stripe", "r", 10);
        soon.expires_at = now() + Duration::seconds(30);
        add_key(&*s, soon).await;
        s.revoke_key("revoked", now()).await.unwrap();

        let ids = |keys: Vec<VaultKey>| keys.into_iter().map(|k| k.id).collect::<Vec<_>>();
        // Revoked keys stay in, so proxies can say `key_revoked`.
        assert_eq!(
            ids(s.policy_keys(now()).await.unwrap()),
            ["live", "revoked", "soon"]
        );
        assert_eq!(
            ids(s.policy_keys(now() + Duration::seconds(30)).await.unwrap()),
            ["live", "revoked"]
        );
    }

    pub async fn issuer_tokens_round_trip(s: S) {
        add_vendor(&*s, "stripe").await;
        s.insert_key(&key("k1", "stripe", "r", 10)).await.unwrap();
        s.insert_key(&key("k2", "stripe", "r", 10)).await.unwrap();
        let a = issuer_token("iss_a", "k1", None);
        let b = issuer_token("iss_bb", "k1", Some(now() + Duration::hours(1)));
        let c = issuer_token("iss_ccc", "k2", None);
        for t in [&a, &b, &c] {
            s.insert_issuer_token(t).await.unwrap();
        }
        assert_eq!(
            s.find_issuer_token(&b.token_hash).await.unwrap(),
            Some(b.clone()),
            "every column reads back as written"
        );
        assert_eq!(s.get_issuer_token("iss_a").await.unwrap(), Some(a.clone()));
        assert_eq!(s.find_issuer_token(&[9u8; 32]).await.unwrap(), None);
        assert_eq!(s.get_issuer_token("iss_none").await.unwrap(), None);
        let ids = |v: Vec<IssuerToken>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
        assert_eq!(
            ids(s.list_issuer_tokens("k1").await.unwrap()),
            ["iss_bb", "iss_a"],
            "only the key's tokens, newest first"
        );
        assert!(s.list_issuer_tokens("k9").await.unwrap().is_empty());

        let mut same_hash = issuer_token("iss_other", "k1", None);
        same_hash.token_hash = a.token_hash;
        assert!(matches!(
            s.insert_issuer_token(&same_hash).await,
            Err(StoreError::Conflict(_))
        ));
        let mut same_id = issuer_token("iss_a", "k1", None);
        same_id.token_hash = [42u8; 32];
        assert!(matches!(
            s.insert_issuer_token(&same_id).await,
            Err(StoreError::Conflict(_))
        ));

        let later = now() + Duration::minutes(5);
        let revoked = s.revoke_issuer_token("iss_a", later).await.unwrap();
        assert_eq!(revoked.revoked_at, Some(trunc(later)));
        assert_eq!(revoked.status(later), KeyStatus::Revoked);
        let again = s
            .revoke_issuer_token("iss_a", later + Duration::minutes(1))
            .await
            .unwrap();
        assert_eq!(again, revoked, "a second revocation changes nothing");
        assert_eq!(
            s.find_issuer_token(&a.token_hash).await.unwrap(),
            Some(revoked)
        );
        assert!(matches!(
            s.revoke_issuer_token("iss_none", later).await,
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(
            s.get_issuer_token("iss_ccc")
                .await
                .unwrap()
                .unwrap()
                .revoked_at,
            None,
            "other tokens are untouched"
        );
    }

    pub async fn revoke_key_is_idempotent(s: S) {
        assert_not_found(s.revoke_key("ghost", now()).await, "revoke unknown key");
        add_key(&*s, key("k1", "stripe", "r", 10)).await;
        let v0 = s.latest_version().await.unwrap();

        let first = s.revoke_key("k1", now()).await.unwrap().key;
        assert_eq!(first.revoked_at, Some(trunc(now())));
        assert_eq!(s.latest_version().await.unwrap(), v0 + 1);
        let changes = s.changes_since(v0, 10).await.unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].what, ChangeRef::Key("k1".to_string()));

        let again = s
            .revoke_key("k1", now() + Duration::hours(1))
            .await
            .unwrap()
            .key;
        assert_eq!(
            again.revoked_at,
            Some(trunc(now())),
            "keeps the first revoked_at"
        );
        assert_eq!(
            s.latest_version().await.unwrap(),
            v0 + 1,
            "no change logged"
        );
        assert_eq!(
            s.get_key("k1").await.unwrap().unwrap().revoked_at,
            Some(trunc(now()))
        );
    }

    pub async fn revoke_run_revokes_unrevoked_keys_of_the_run(s: S) {
        add_key(&*s, key("a2", "stripe", "run-a", 10)).await;
        add_key(&*s, key("a1", "stripe", "run-a", 10)).await;
        add_key(&*s, key("a3", "stripe", "run-a", 10)).await;
        add_key(&*s, key("b1", "stripe", "run-b", 10)).await;
        let earlier = now() - Duration::hours(1);
        s.revoke_key("a3", earlier).await.unwrap();
        let v0 = s.latest_version().await.unwrap();

        let ids = s.revoke_run("run-a", None, now()).await.unwrap();
        assert_eq!(ids, ["a1", "a2"]);
        for id in ["a1", "a2"] {
            assert_eq!(
                s.get_key(id).await.unwrap().unwrap().revoked_at,
                Some(trunc(now()))
            );
        }
        assert_eq!(
            s.get_key("a3").await.unwrap().unwrap().revoked_at,
            Some(trunc(earlier)),
            "an already revoked key keeps its time"
        );
        assert_eq!(s.get_key("b1").await.unwrap().unwrap().revoked_at, None);

        let mut logged: Vec<ChangeRef> = s
            .changes_since(v0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.what)
            .collect();
        logged.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            logged,
            [ChangeRef::Key("a1".into()), ChangeRef::Key("a2".into())]
        );

        assert!(s.revoke_run("run-a", None, now()).await.unwrap().is_empty());
        assert!(s
            .revoke_run("no-such-run", None, now())
            .await
            .unwrap()
            .is_empty());
        assert_eq!(s.latest_version().await.unwrap(), v0 + 2);
    }

    pub async fn change_log_versions(s: S) {
        assert_eq!(s.latest_version().await.unwrap(), 0);
        assert_eq!(s.oldest_version().await.unwrap(), 0);
        assert!(s.changes_since(0, 100).await.unwrap().is_empty());

        let mut versions = Vec::new();
        fn step(v: i64, versions: &mut Vec<i64>) {
            assert!(
                versions.last().is_none_or(|last| v > *last),
                "versions increase: {versions:?} then {v}"
            );
            versions.push(v);
        }
        add_vendor(&*s, "stripe").await;
        step(s.latest_version().await.unwrap(), &mut versions);
        s.put_vendor(VendorWrite {
            vendor: vendor("stripe", now()),
            sealed_credential: None,
            credential_version: 0,
        })
        .await
        .unwrap();
        step(s.latest_version().await.unwrap(), &mut versions);
        s.insert_key(&key("k1", "stripe", "r", 10)).await.unwrap();
        step(s.latest_version().await.unwrap(), &mut versions);
        s.revoke_key("k1", now()).await.unwrap();
        step(s.latest_version().await.unwrap(), &mut versions);
        s.delete_vendor("stripe", now()).await.unwrap();
        step(s.latest_version().await.unwrap(), &mut versions);

        let changes = s.changes_since(0, 100).await.unwrap();
        let got: Vec<(i64, ChangeRef)> = changes.into_iter().map(|c| (c.version, c.what)).collect();
        let vendor_ref = || ChangeRef::Vendor("stripe".to_string());
        let key_ref = || ChangeRef::Key("k1".to_string());
        assert_eq!(
            got,
            [
                (versions[0], vendor_ref()),
                (versions[1], vendor_ref()),
                (versions[2], key_ref()),
                (versions[3], key_ref()),
                (versions[4], vendor_ref()),
            ]
        );
        assert_eq!(s.oldest_version().await.unwrap(), versions[0]);

        let page: Vec<i64> = s
            .changes_since(versions[1], 2)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.version)
            .collect();
        assert_eq!(page, [versions[2], versions[3]]);
        assert!(s.changes_since(versions[4], 100).await.unwrap().is_empty());

        // Reads and refused writes log nothing.
        s.get_key("k1").await.unwrap();
        let _ = s.delete_vendor("stripe", now()).await;
        assert_eq!(s.latest_version().await.unwrap(), versions[4]);

        // Trimming drops the oldest entries only; the head stays.
        assert_eq!(s.prune_changes(versions[2]).await.unwrap(), 3);
        assert_eq!(s.oldest_version().await.unwrap(), versions[3]);
        assert_eq!(s.latest_version().await.unwrap(), versions[4]);
        assert_eq!(s.prune_changes(versions[2]).await.unwrap(), 0);
        let left: Vec<i64> = s
            .changes_since(0, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.version)
            .collect();
        assert_eq!(left, [versions[3], versions[4]]);
    }

    pub async fn grant_respects_daily_cap(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 1_000_000)).await;

        let g = s
            .grant_lease(&grant("g1", "l1", "k1", DAY, 600_000, 0), now())
            .await
            .unwrap();
        assert_eq!(g.granted, Micros(600_000));
        assert_eq!(g.lease_total, Micros(600_000));
        assert_eq!(g.unleased, Micros(400_000));
        assert_eq!(g.expires_at, trunc(now() + Duration::hours(1)));

        // Another lease gets only what is left.
        let g = s
            .grant_lease(&grant("g2", "l2", "k1", DAY, 600_000, 0), now())
            .await
            .unwrap();
        assert_eq!(
            (g.granted, g.lease_total, g.unleased),
            (Micros(400_000), Micros(400_000), Micros(0))
        );
        // Growing an existing lease adds to its total; nothing is left now.
        let mut grow = grant("g3", "l1", "k1", DAY, 1, 0);
        grow.expires_at = now() + Duration::hours(5); // ignored: the lease keeps its own
        let g = s.grant_lease(&grow, now()).await.unwrap();
        assert_eq!(
            (g.granted, g.lease_total, g.unleased),
            (Micros(0), Micros(600_000), Micros(0))
        );
        assert_eq!(g.expires_at, trunc(now() + Duration::hours(1)));

        // Another day has its own daily budget.
        assert_eq!(
            granted(&*s, grant("g4", "l3", "k1", DAY2, 999_999, 0)).await,
            999_999
        );
        assert_eq!(available(&*s, "k1", DAY2).await, 1);
        assert_eq!(available(&*s, "k1", DAY).await, 0);
    }

    pub async fn grant_minimum(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 1_000)).await;
        assert_eq!(
            granted(&*s, grant("g1", "l1", "k1", DAY, 700, 0)).await,
            700
        );

        let g = s
            .grant_lease(&grant("g2", "l2", "k1", DAY, 500, 301), now())
            .await
            .unwrap();
        assert_eq!(
            (g.granted, g.unleased),
            (Micros(0), Micros(300)),
            "less than the minimum is left"
        );
        let g = s
            .grant_lease(&grant("g3", "l2", "k1", DAY, 500, 300), now())
            .await
            .unwrap();
        assert_eq!(
            (g.granted, g.lease_total, g.unleased),
            (Micros(300), Micros(300), Micros(0))
        );
        assert_eq!(granted(&*s, grant("g4", "l3", "k1", DAY, 5, 0)).await, 0);
    }

    pub async fn grant_is_idempotent_by_grant_id(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 1_000)).await;
        let req = grant("g1", "l1", "k1", DAY, 400, 0);
        let first = s.grant_lease(&req, now()).await.unwrap();
        let retry = s
            .grant_lease(&req, now() + Duration::minutes(1))
            .await
            .unwrap();
        assert_eq!(first, retry);
        assert_eq!(
            available(&*s, "k1", DAY).await,
            600,
            "the retry took nothing"
        );

        // A retry returns the first answer even after the budget moved.
        assert_eq!(
            granted(&*s, grant("g2", "l2", "k1", DAY, 600, 0)).await,
            600
        );
        assert_eq!(s.grant_lease(&req, now()).await.unwrap(), first);
        // And even after the key was revoked.
        s.revoke_key("k1", now()).await.unwrap();
        assert_eq!(s.grant_lease(&req, now()).await.unwrap(), first);

        assert_conflict(
            s.grant_lease(&grant("g1", "other-lease", "k1", DAY, 1, 0), now())
                .await,
            "a grant id reused for another lease",
        );
    }

    pub async fn grant_refusals(s: S) {
        assert_not_found(
            s.grant_lease(&grant("g0", "l0", "ghost", DAY, 1, 0), now())
                .await,
            "unknown key",
        );

        add_key(&*s, key("revoked", "stripe", "r", 1_000)).await;
        s.revoke_key("revoked", now()).await.unwrap();
        assert_conflict(
            s.grant_lease(&grant("g1", "l1", "revoked", DAY, 1, 0), now())
                .await,
            "revoked key",
        );

        let mut k = key("expiring", "stripe", "r", 1_000);
        k.expires_at = now() + Duration::minutes(1);
        add_key(&*s, k).await;
        assert_eq!(
            granted(&*s, grant("g2", "l2", "expiring", DAY, 10, 0)).await,
            10
        );
        assert_conflict(
            s.grant_lease(
                &grant("g3", "l3", "expiring", DAY, 1, 0),
                now() + Duration::minutes(1),
            )
            .await,
            "expired key",
        );

        add_key(&*s, key("k", "stripe", "r", 1_000)).await;
        let mut stale = grant("g4", "l4", "k", DAY, 10, 0);
        stale.expires_at = now();
        assert_conflict(
            s.grant_lease(&stale, now()).await,
            "a new lease that is already expired",
        );
        assert_conflict(
            s.grant_lease(&grant("g5", "l2", "k", DAY, 10, 0), now())
                .await,
            "growing another key's lease",
        );
        assert_eq!(granted(&*s, grant("g6", "l6", "k", DAY, 10, 0)).await, 10);
        assert_conflict(
            s.grant_lease(&grant("g7", "l6", "k", DAY2, 10, 0), now())
                .await,
            "growing a lease of another day",
        );
        let mut other_node = grant("g8", "l6", "k", DAY, 10, 0);
        other_node.node_id = "node-b".to_string();
        assert_conflict(
            s.grant_lease(&other_node, now()).await,
            "growing another node's lease",
        );
        // Nothing refused took budget.
        assert_eq!(available(&*s, "k", DAY).await, 990);
    }

    pub async fn a_report_moves_only_its_own_nodes_lease(s: S) {
        add_key(&*s, key("k", "stripe", "r", 1_000)).await;
        assert_eq!(granted(&*s, grant("g1", "l1", "k", DAY, 600, 0)).await, 600);
        // Another node reports spend against node-a's lease: the spend is
        // real and counts, but node-a's lease keeps its whole share.
        let mut stray = event("e1", "k", "l1", DAY, "stripe", 100);
        stray.node_id = "node-b".to_string();
        s.record_spend(&[stray]).await.unwrap();
        assert_eq!(s.key_spend("k", DAY).await.unwrap().spent_day, Micros(100));
        assert_eq!(available(&*s, "k", DAY).await, 300);
        // Its own node's report moves the spend out of the lease.
        s.record_spend(&[event("e2", "k", "l1", DAY, "stripe", 100)])
            .await
            .unwrap();
        assert_eq!(available(&*s, "k", DAY).await, 300);
    }

    /// One batch spends on more keys than one settle statement takes
    /// (`SPEND_CHUNK`, 256), on two days, on two keys of one roll chain,
    /// and reports on each key's lease plus once on a lease of another
    /// node's: every budget, day and lease gets exactly its own sum.
    pub async fn one_batch_settles_many_budgets_days_and_leases(s: S) {
        const KEYS: i64 = 300;
        for i in 0..KEYS {
            add_key(&*s, key(&format!("k{i}"), "stripe", "r", 1_000_000)).await;
            let g = grant(
                &format!("g{i}"),
                &format!("l{i}"),
                &format!("k{i}"),
                DAY,
                500_000,
                0,
            );
            assert_eq!(granted(&*s, g).await, 500_000);
        }
        let a = add_key(&*s, key("a", "stripe", "r", 1_000_000)).await;
        s.roll_key("a", &successor(&a, "a2"), now() + Duration::hours(1), now())
            .await
            .unwrap();
        let mut events = Vec::new();
        for i in 0..KEYS {
            let (k, l) = (format!("k{i}"), format!("l{i}"));
            events.push(event(&format!("e{i}"), &k, &l, DAY, "stripe", 100 + i));
            if i % 2 == 0 {
                events.push(event(&format!("d{i}"), &k, "", DAY2, "stripe", 10));
            }
        }
        events.push(event("ra", "a", "", DAY, "stripe", 1_000));
        events.push(event("ra2", "a2", "", DAY, "stripe", 2_000));
        let mut stray = event("stray", "k0", "l0", DAY, "stripe", 7);
        stray.node_id = "node-b".to_string();
        events.push(stray);
        let applied = s.record_spend(&events).await.unwrap();
        assert_eq!(applied, (events.len() as u32, 0));

        for i in 0..KEYS {
            let k = format!("k{i}");
            let stray = if i == 0 { 7 } else { 0 };
            let day = s.key_spend(&k, DAY).await.unwrap();
            assert_eq!(day.spent_day, Micros(100 + i + stray), "{k}");
            assert_eq!(day.calls_day, 1 + i64::from(i == 0), "{k}");
            let day2 = s.key_spend(&k, DAY2).await.unwrap();
            let (spent2, calls2) = if i % 2 == 0 { (10, 1) } else { (0, 0) };
            assert_eq!(
                (day2.spent_day, day2.calls_day),
                (Micros(spent2), calls2),
                "{k}"
            );
            // The lease's own node's report moved its spend out of the
            // lease; the stray report did not.
            assert_eq!(available(&*s, &k, DAY).await, 500_000 - stray, "{k}");
        }
        for id in ["a", "a2"] {
            let chain = s.key_spend(id, DAY).await.unwrap();
            assert_eq!(
                (chain.spent_day, chain.calls_day),
                (Micros(3_000), 2),
                "{id}"
            );
        }
    }

    /// (node, replica, applied version) of every registration.
    async fn nodes(s: &dyn Store) -> Vec<(String, String, i64)> {
        s.fleet_nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|n| (n.node_id, n.replica, n.applied_version))
            .collect()
    }

    fn row(node: &str, replica: &str, applied: i64) -> (String, String, i64) {
        (node.to_string(), replica.to_string(), applied)
    }

    pub async fn fleet_nodes_register_acknowledge_and_unregister(s: S) {
        assert!(s.fleet_nodes().await.unwrap().is_empty());
        s.register_fleet_node("n1", "r1", "s1", now())
            .await
            .unwrap();
        s.register_fleet_node("n2", "r2", "s2", now())
            .await
            .unwrap();
        let listed = s.fleet_nodes().await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].heartbeat_at, trunc(now()));
        assert_eq!(
            nodes(&*s).await,
            vec![row("n1", "r1", 0), row("n2", "r2", 0)]
        );

        // Acknowledgements only ever raise the applied version.
        assert!(s.ack_policy("n1", 7).await.unwrap());
        assert!(s.ack_policy("n1", 3).await.unwrap());
        assert!(!s.ack_policy("ghost", 9).await.unwrap(), "not registered");
        assert_eq!(
            nodes(&*s).await,
            vec![row("n1", "r1", 7), row("n2", "r2", 0)]
        );
        assert!(s
            .fleet_nodes()
            .await
            .unwrap()
            .iter()
            .all(|n| n.node_id != "ghost"));

        // n1 reconnects to r2: a new stream starts from nothing, and the old
        // stream ending later leaves the new registration alone.
        s.register_fleet_node("n1", "r2", "s3", now())
            .await
            .unwrap();
        assert_eq!(
            nodes(&*s).await,
            vec![row("n1", "r2", 0), row("n2", "r2", 0)]
        );
        s.unregister_fleet_node("n1", "s1").await.unwrap();
        assert_eq!(nodes(&*s).await.len(), 2);
        s.unregister_fleet_node("n1", "s3").await.unwrap();
        assert_eq!(nodes(&*s).await, vec![row("n2", "r2", 0)]);
        s.unregister_fleet_node("n1", "s3").await.unwrap();
    }

    pub async fn vendor_load_errors_are_replaced_per_node_and_shown_while_it_is_registered(s: S) {
        let errs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(v, e)| (v.to_string(), e.to_string()))
                .collect()
        };
        let seen =
            |list: Vec<keycap_control::domain::VendorLoadError>| -> Vec<(String, String, String)> {
                list.into_iter()
                    .map(|e| (e.vendor, e.node_id, e.error))
                    .collect()
            };
        let t = now();
        s.register_fleet_node("n1", "r1", "s1", t).await.unwrap();
        s.register_fleet_node("n2", "r1", "s2", t).await.unwrap();
        // Nothing to clear: no write, nothing shown.
        s.report_vendor_errors("n1", &[], t).await.unwrap();
        assert!(s.vendor_load_errors(None).await.unwrap().is_empty());
        s.report_vendor_errors("n1", &errs(&[("stripe", "bad rate"), ("openai", "x")]), t)
            .await
            .unwrap();
        s.report_vendor_errors("n2", &errs(&[("stripe", "other")]), t)
            .await
            .unwrap();
        let stripe = s.vendor_load_errors(Some("stripe")).await.unwrap();
        assert_eq!(stripe[0].at, trunc(t));
        assert_eq!(
            seen(stripe),
            [
                ("stripe".into(), "n1".into(), "bad rate".into()),
                ("stripe".into(), "n2".into(), "other".into())
            ]
        );
        assert_eq!(s.vendor_load_errors(None).await.unwrap().len(), 3);
        // A node's next report replaces its last one.
        s.report_vendor_errors("n1", &errs(&[("openai", "y")]), t)
            .await
            .unwrap();
        assert_eq!(
            seen(s.vendor_load_errors(None).await.unwrap()),
            [
                ("openai".into(), "n1".into(), "y".into()),
                ("stripe".into(), "n2".into(), "other".into())
            ]
        );
        // A node no longer registered no longer speaks for the fleet.
        s.unregister_fleet_node("n2", "s2").await.unwrap();
        assert!(s
            .vendor_load_errors(Some("stripe"))
            .await
            .unwrap()
            .is_empty());
        s.report_vendor_errors("n1", &[], t).await.unwrap();
        assert!(s.vendor_load_errors(None).await.unwrap().is_empty());
    }

    pub async fn fleet_heartbeat_refreshes_its_replica_and_forgets_the_dead(s: S) {
        let t0 = now();
        s.register_fleet_node("a1", "alive", "s1", t0)
            .await
            .unwrap();
        s.register_fleet_node("a2", "alive", "s2", t0)
            .await
            .unwrap();
        s.register_fleet_node("d1", "dead", "s3", t0).await.unwrap();
        let t1 = t0 + Duration::seconds(10);
        s.heartbeat_fleet_nodes("alive", t1, t0 - Duration::hours(1))
            .await
            .unwrap();
        let beats: Vec<(String, DateTime<Utc>)> = s
            .fleet_nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|n| (n.node_id, n.heartbeat_at))
            .collect();
        assert_eq!(
            beats,
            vec![
                ("a1".to_string(), trunc(t1)),
                ("a2".to_string(), trunc(t1)),
                ("d1".to_string(), trunc(t0)),
            ],
            "one replica's heartbeat refreshes its own streams only"
        );
        // Much later, the dead replica's registration is dropped; the live
        // one's stays.
        let t2 = t1 + Duration::hours(2);
        s.heartbeat_fleet_nodes("alive", t2, t2 - Duration::hours(1))
            .await
            .unwrap();
        let left: Vec<String> = nodes(&*s).await.into_iter().map(|n| n.0).collect();
        assert_eq!(left, ["a1", "a2"]);
    }

    pub async fn fenced_leases_are_never_grown_but_keep_counting(s: S) {
        add_key(&*s, key("k", "stripe", "r", 1_000)).await;
        add_key(&*s, key("other", "stripe", "r", 1_000)).await;
        let on = |node: &str, mut g: LeaseGrantRequest| {
            g.node_id = node.to_string();
            g
        };
        assert_eq!(
            granted(&*s, on("node-a", grant("g1", "la", "k", DAY, 300, 0))).await,
            300
        );
        assert_eq!(
            granted(&*s, on("node-b", grant("g2", "lb", "k", DAY, 200, 0))).await,
            200
        );
        assert_eq!(
            granted(&*s, on("node-c", grant("g3", "lc", "k", DAY, 100, 0))).await,
            100
        );
        assert_eq!(
            granted(&*s, on("node-a", grant("g4", "lo", "other", DAY, 50, 0))).await,
            50
        );
        s.return_lease("lc", None, Micros(40)).await.unwrap();
        let mut spent = event("e1", "k", "la", DAY, "stripe", 120);
        spent.node_id = "node-a".to_string();
        s.record_spend(&[spent]).await.unwrap();

        // Who could still spend with k: open, unexpired, not fully
        // reported leases (node-c returned its lease).
        let holders = s.lease_holders(&["k".to_string()], now()).await.unwrap();
        assert_eq!(holders, ["node-a", "node-b"]);
        assert!(
            s.lease_holders(&["k".to_string()], now() + Duration::hours(2))
                .await
                .unwrap()
                .is_empty(),
            "expired leases hold nothing"
        );

        // Fencing node-a's leases of k: what they still hold comes back.
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let held = s
            .fence_leases(&ids(&["node-a", "node-c"]), &ids(&["k"]), now())
            .await
            .unwrap();
        assert_eq!(held, Micros(300 - 120));
        let before = available(&*s, "k", DAY).await;
        assert_conflict(
            s.grant_lease(&on("node-a", grant("g5", "la", "k", DAY, 10, 0)), now())
                .await,
            "growing a fenced lease",
        );
        // Other nodes' leases and node-a's lease of another key still grow.
        assert_eq!(
            granted(&*s, on("node-b", grant("g6", "lb", "k", DAY, 10, 0))).await,
            10
        );
        assert_eq!(
            granted(&*s, on("node-a", grant("g7", "lo", "other", DAY, 10, 0))).await,
            10
        );
        // The fenced lease still counts against the cap; reports on it still
        // apply and it can still be handed back.
        assert_eq!(available(&*s, "k", DAY).await, before - 10);
        let mut late = event("e2", "k", "la", DAY, "stripe", 30);
        late.node_id = "node-a".to_string();
        assert_eq!(s.record_spend(&[late]).await.unwrap(), (1, 0));
        assert_eq!(s.key_spend("k", DAY).await.unwrap().spent_day, Micros(150));
        // Fencing again keeps the first fence and reports what is left.
        let held = s
            .fence_leases(
                &ids(&["node-a"]),
                &ids(&["k"]),
                now() + Duration::minutes(1),
            )
            .await
            .unwrap();
        assert_eq!(held, Micros(300 - 150));
        s.return_lease("la", Some("node-a"), Micros(150))
            .await
            .unwrap();
        assert_eq!(
            s.lease_holders(&ids(&["k"]), now()).await.unwrap(),
            ["node-b"]
        );
        assert_eq!(
            s.fence_leases(&ids(&["node-a"]), &ids(&["k"]), now())
                .await
                .unwrap(),
            Micros(0),
            "a returned lease is not fenced"
        );
        assert!(s.lease_holders(&[], now()).await.unwrap().is_empty());
        assert_eq!(
            s.fence_leases(&[], &ids(&["k"]), now()).await.unwrap(),
            Micros(0)
        );
    }

    pub async fn expired_leases_stop_counting(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 1_000)).await;
        let mut req = grant("g1", "l1", "k1", DAY, 1_000, 0);
        req.expires_at = now() + Duration::seconds(60);
        assert_eq!(granted(&*s, req).await, 1_000);
        assert_eq!(granted(&*s, grant("g2", "l2", "k1", DAY, 1, 0)).await, 0);

        // Expired but never returned: its proxy may have been killed with
        // spend undelivered, so it counts in full through the grace.
        let expired = now() + Duration::seconds(60);
        let mut early = grant("g3", "l3", "k1", DAY, 1_000, 0);
        early.expires_at = expired + Duration::hours(1);
        assert_eq!(
            s.grant_lease(&early, expired).await.unwrap().granted,
            Micros(0)
        );
        assert_conflict(
            s.grant_lease(&grant("g4", "l1", "k1", DAY, 1, 0), expired)
                .await,
            "growing an expired lease",
        );
        // Spend delivered late still lands inside the cap.
        s.record_spend(&[event("e1", "k1", "l1", DAY, "stripe", 300)])
            .await
            .unwrap();
        let later = expired + unreturned_lease_grace();
        let mut fresh = grant("g5", "l5", "k1", DAY, 1_000, 0);
        fresh.expires_at = later + Duration::hours(1);
        assert_eq!(
            s.grant_lease(&fresh, later).await.unwrap().granted,
            Micros(700)
        );
    }

    pub async fn a_returned_lease_counts_its_unreported_spend_past_its_expiry(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 1_000)).await;
        let mut req = grant("g1", "l1", "k1", DAY, 1_000, 0);
        req.expires_at = now() + Duration::seconds(60);
        assert_eq!(granted(&*s, req).await, 1_000);
        // Returned having spent 400, none of it reported yet.
        s.return_lease("l1", Some("node-a"), Micros(400))
            .await
            .unwrap();
        let long_after = now() + Duration::days(1);
        let mut probe = grant("g2", "l2", "k1", DAY, 1_000, 0);
        probe.expires_at = long_after + Duration::hours(1);
        assert_eq!(
            s.grant_lease(&probe, long_after).await.unwrap().granted,
            Micros(600)
        );
        // Once reported, it is settled spend and the lease counts nothing.
        s.record_spend(&[event("e1", "k1", "l1", DAY, "stripe", 400)])
            .await
            .unwrap();
        s.return_lease("l2", Some("node-a"), Micros(0))
            .await
            .unwrap();
        let mut again = grant("g3", "l3", "k1", DAY, 1_000, 0);
        again.expires_at = long_after + Duration::hours(1);
        assert_eq!(
            s.grant_lease(&again, long_after).await.unwrap().granted,
            Micros(600)
        );
    }

    pub async fn shrink_lease_gives_back_only_from_the_grant_it_names(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 1_000)).await;
        assert_not_found(
            s.shrink_lease("ghost", None, Micros(0), Micros(0)).await,
            "unknown lease",
        );
        assert_eq!(
            granted(&*s, grant("g1", "l1", "k1", DAY, 600, 0)).await,
            600
        );
        s.record_spend(&[event("e1", "k1", "l1", DAY, "stripe", 100)])
            .await
            .unwrap();
        assert_not_found(
            s.shrink_lease("l1", Some("another-node"), Micros(600), Micros(100))
                .await,
            "another node's lease",
        );
        // The node keeps 250 (spent plus reserved) and gives 350 back; the
        // lease stays open and can grow again.
        assert!(s
            .shrink_lease("l1", Some("node-a"), Micros(600), Micros(250))
            .await
            .unwrap());
        assert_eq!(available(&*s, "k1", DAY).await, 750);
        // A late retry of the same shrink, or one naming a stale grant,
        // changes nothing, even after the lease grew again.
        assert_eq!(granted(&*s, grant("g2", "l1", "k1", DAY, 50, 0)).await, 50);
        assert!(!s
            .shrink_lease("l1", None, Micros(600), Micros(250))
            .await
            .unwrap());
        assert_eq!(available(&*s, "k1", DAY).await, 700);
        // Never below what was reported spent from it.
        assert!(s
            .shrink_lease("l1", None, Micros(300), Micros(0))
            .await
            .unwrap());
        assert_eq!(available(&*s, "k1", DAY).await, 900);
        // A returned lease shrinks no more.
        s.return_lease("l1", None, Micros(100)).await.unwrap();
        assert!(!s
            .shrink_lease("l1", None, Micros(100), Micros(0))
            .await
            .unwrap());
        assert_eq!(available(&*s, "k1", DAY).await, 900);
    }

    pub async fn return_lease_returns_the_unspent_rest(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 1_000)).await;
        assert_not_found(
            s.return_lease("ghost", None, Micros(0)).await,
            "unknown lease",
        );

        assert_eq!(
            granted(&*s, grant("g1", "l1", "k1", DAY, 1_000, 0)).await,
            1_000
        );
        s.record_spend(&[event("e1", "k1", "l1", DAY, "stripe", 300)])
            .await
            .unwrap();
        assert_eq!(available(&*s, "k1", DAY).await, 0);
        // Only the node the lease was granted to may return it.
        assert_not_found(
            s.return_lease("l1", Some("another-node"), Micros(0)).await,
            "another node's lease",
        );
        assert_eq!(
            available(&*s, "k1", DAY).await,
            0,
            "the lease is still open"
        );
        s.return_lease("l1", None, Micros(300)).await.unwrap();
        assert_eq!(
            available(&*s, "k1", DAY).await,
            700,
            "settled 300, the rest is back"
        );

        // Spend the proxy reported on return but not yet as events still
        // counts, through the lease.
        assert_eq!(
            granted(&*s, grant("g2", "l2", "k1", DAY, 500, 0)).await,
            500
        );
        s.return_lease("l2", Some("node-a"), Micros(200))
            .await
            .unwrap();
        assert_eq!(available(&*s, "k1", DAY).await, 500);
        s.return_lease("l2", None, Micros(0))
            .await
            .expect("returning again is a no-op");
        assert_eq!(
            available(&*s, "k1", DAY).await,
            500,
            "the first return stands"
        );
        s.record_spend(&[event("e2", "k1", "l2", DAY, "stripe", 200)])
            .await
            .unwrap();
        assert_eq!(
            available(&*s, "k1", DAY).await,
            500,
            "the spend moved from lease to settled"
        );

        assert_conflict(
            s.grant_lease(&grant("g3", "l2", "k1", DAY, 1, 0), now())
                .await,
            "growing a returned lease",
        );
    }

    pub async fn an_observe_key_is_held_to_its_ceiling_marked_at_ingest_and_switched_in_place(
        s: S,
    ) {
        let mut k = key("k1", "stripe", "observe", 1_000);
        k.lifetime_cap = Some(Micros(1_500));
        k.observe_ceiling = Some(Micros(5_000));
        add_key(&*s, k).await;
        add_key(&*s, key("k2", "stripe", "enforce", 1_000)).await;
        // Held to the ceiling, with no lifetime cap: not to its own caps.
        assert_eq!(
            granted(&*s, grant("g1", "l1", "k1", DAY, 4_000, 0)).await,
            4_000
        );
        // Events reserve their cost + 1. 800 fits the daily 1,000; then
        // 800 + 301 passes it; a mark the proxy made stays; an enforcing
        // key's calls are never marked.
        let mut proxy_marked = event("e3", "k1", "l1", DAY, "stripe", 0);
        proxy_marked.would_refuse = "endpoint_not_allowed".into();
        let batch = vec![
            event("e1", "k1", "l1", DAY, "stripe", 800),
            event("e2", "k1", "l1", DAY, "stripe", 300),
            proxy_marked,
            event("e4", "k2", "", DAY, "stripe", 900),
            event("e5", "k2", "", DAY, "stripe", 900),
        ];
        assert_eq!(s.record_spend(&batch).await.unwrap(), (5, 0));
        let mut entries = s.query_audit(&AuditQuery::default()).await.unwrap();
        entries.sort_by_key(|e| e.seq);
        let marks: Vec<(&str, &str)> = entries
            .iter()
            .map(|e| (e.event.event_id.as_str(), e.event.would_refuse.as_str()))
            .collect();
        assert_eq!(
            marks,
            [
                ("e1", ""),
                ("e2", "daily_cap_exceeded"),
                ("e3", "endpoint_not_allowed"),
                ("e4", ""),
                ("e5", "")
            ]
        );
        // The marks are in the chain: an edit would be named.
        let chained = entries.iter().all(|e| {
            e.hash
                == Some(keycap_control::ledger::link(
                    &e.prev_hash.unwrap(),
                    e.seq,
                    &e.agent_run_label,
                    &e.event,
                ))
        });
        assert!(chained, "every entry hashes with its mark");
        // The lifetime cap marks in a later batch: 1,100 settled, 1,500 cap.
        s.record_spend(&[event("e6", "k1", "l1", DAY2, "stripe", 500)])
            .await
            .unwrap();
        let last = s.query_audit(&AuditQuery::default()).await.unwrap();
        let e6 = last.iter().find(|e| e.event.event_id == "e6").unwrap();
        assert_eq!(e6.event.would_refuse, "lifetime_cap_exceeded");
        let report = s
            .spend_report(&SpendReportQuery {
                group_by: vec![SpendDimension::Key],
                top: 10,
                ..SpendReportQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(report.would_refuse_calls, 3);
        assert_eq!(report.would_refuse, Micros(800));
        let k1 = report
            .groups
            .iter()
            .find(|g| g.key_id.as_deref() == Some("k1"))
            .unwrap();
        assert_eq!((k1.would_refuse_calls, k1.would_refuse), (3, Micros(800)));

        // Switched in place: the ceiling is gone, the terms are the key's.
        let terms = EnforcedTerms {
            daily_cap: Micros(2_000),
            per_call_cap: None,
            lifetime_cap: Some(Micros(1_500)),
            allowed_endpoints: vec!["POST /v1/payment_intents".into()],
        };
        let version = s.latest_version().await.unwrap();
        let switched = s.enforce_key("k1", &terms).await.unwrap();
        assert_eq!(switched.observe_ceiling, None);
        assert_eq!(switched.daily_cap, Micros(2_000));
        assert!(
            s.latest_version().await.unwrap() > version,
            "a change to stream"
        );
        assert!(matches!(
            s.enforce_key("k1", &terms).await,
            Err(StoreError::Conflict(_))
        ));
        assert!(matches!(
            s.enforce_key("k2", &terms).await,
            Err(StoreError::Conflict(_))
        ));
        // The lease granted under the ceiling still counts until it is back;
        // then the lifetime cap binds: 1,600 spent of 1,500.
        assert_eq!(available(&*s, "k1", DAY2).await, 0);
        s.return_lease("l1", None, Micros(1_600)).await.unwrap();
        assert_eq!(available(&*s, "k1", DAY2).await, 0);
        let mut k3 = key("k3", "stripe", "observe", 1_000);
        k3.observe_ceiling = Some(Micros(3_000));
        add_key(&*s, k3).await;
        s.record_spend(&[event("e7", "k3", "", DAY, "stripe", 1_200)])
            .await
            .unwrap();
        s.enforce_key(
            "k3",
            &EnforcedTerms {
                lifetime_cap: None,
                ..terms
            },
        )
        .await
        .unwrap();
        assert_eq!(available(&*s, "k3", DAY).await, 800);
    }

    pub async fn lifetime_cap_spans_days(s: S) {
        let mut k = key("k1", "stripe", "r", 1_000);
        k.lifetime_cap = Some(Micros(1_500));
        add_key(&*s, k).await;

        assert_eq!(
            granted(&*s, grant("g1", "l1", "k1", DAY, 1_000, 0)).await,
            1_000
        );
        s.record_spend(&[event("e1", "k1", "l1", DAY, "stripe", 1_000)])
            .await
            .unwrap();
        s.return_lease("l1", None, Micros(1_000)).await.unwrap();

        // A new day has a fresh daily cap but only 500 of lifetime left.
        let g = s
            .grant_lease(&grant("g2", "l2", "k1", DAY2, 1_000, 0), now())
            .await
            .unwrap();
        assert_eq!((g.granted, g.unleased), (Micros(500), Micros(0)));
        // Unspent leases of any day count against the lifetime cap.
        assert_eq!(
            granted(&*s, grant("g3", "l3", "k1", DAY3, 1_000, 0)).await,
            0
        );
        s.return_lease("l2", None, Micros(0)).await.unwrap();
        assert_eq!(
            granted(&*s, grant("g4", "l4", "k1", DAY3, 1_000, 0)).await,
            500
        );
    }

    pub async fn record_spend_applies_each_event_once(s: S) {
        add_key(&*s, key("k1", "stripe", "run-1", 10_000)).await;
        assert_eq!(
            granted(&*s, grant("g1", "l1", "k1", DAY, 5_000, 0)).await,
            5_000
        );
        let batch = vec![
            event("e1", "k1", "l1", DAY, "stripe", 100),
            event("e2", "k1", "l1", DAY, "stripe", 250),
            event("e3", "k1", "l1", DAY2, "stripe", 50),
        ];
        assert_eq!(s.record_spend(&batch).await.unwrap(), (3, 0));
        let spend = s.key_spend("k1", DAY).await.unwrap();
        let audit_len = s.query_audit(&AuditQuery::default()).await.unwrap().len();
        let avail = available(&*s, "k1", DAY).await;

        assert_eq!(
            s.record_spend(&batch).await.unwrap(),
            (0, 3),
            "a re-sent batch"
        );
        assert_eq!(s.key_spend("k1", DAY).await.unwrap(), spend);
        assert_eq!(
            s.query_audit(&AuditQuery::default()).await.unwrap().len(),
            audit_len
        );
        assert_eq!(
            available(&*s, "k1", DAY).await,
            avail,
            "lease reported spend unchanged"
        );

        let mixed = vec![
            event("e2", "k1", "l1", DAY, "stripe", 250),
            event("e4", "k1", "l1", DAY, "stripe", 1),
        ];
        assert_eq!(s.record_spend(&mixed).await.unwrap(), (1, 1));
        assert_eq!(s.key_spend("k1", DAY).await.unwrap().spent_day, Micros(351));
        assert_eq!(s.record_spend(&[]).await.unwrap(), (0, 0));

        // Unknown key and lease: recorded, with an empty run label.
        let stray = event("e5", "ghost", "no-lease", DAY, "stripe", 7);
        assert_eq!(
            s.record_spend(std::slice::from_ref(&stray)).await.unwrap(),
            (1, 0)
        );
        let q = AuditQuery {
            key_id: Some("ghost".to_string()),
            ..AuditQuery::default()
        };
        let rows = s.query_audit(&q).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].agent_run_label, "");
        let mut expected = stray.clone();
        expected.at = trunc(stray.at);
        assert_eq!(rows[0].event, expected, "the event round-trips");
        assert_eq!(
            s.key_spend("ghost", DAY).await.unwrap().spent_day,
            Micros(7)
        );
    }

    pub async fn spend_moves_from_lease_to_settled(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 1_000)).await;
        assert_eq!(
            granted(&*s, grant("g1", "l1", "k1", DAY, 500, 0)).await,
            500
        );
        assert_eq!(available(&*s, "k1", DAY).await, 500);
        s.record_spend(&[event("e1", "k1", "l1", DAY, "stripe", 200)])
            .await
            .unwrap();
        // settled 200 + unspent lease 300: still 500 available, not 300.
        assert_eq!(available(&*s, "k1", DAY).await, 500);
        // Overspending a lease never makes its unspent part negative.
        s.record_spend(&[event("e2", "k1", "l1", DAY, "stripe", 400)])
            .await
            .unwrap();
        assert_eq!(available(&*s, "k1", DAY).await, 400);
    }

    pub async fn key_spend_by_day_and_lifetime(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 10_000)).await;
        let none = s.key_spend("k1", DAY).await.unwrap();
        assert_eq!(
            (none.spent_day, none.calls_day, none.spent_lifetime),
            (Micros(0), 0, Micros(0))
        );
        s.record_spend(&[
            event("e1", "k1", "l", DAY, "stripe", 100),
            event("e2", "k1", "l", DAY, "stripe", 20),
            event("e3", "k1", "l", DAY2, "stripe", 3),
        ])
        .await
        .unwrap();
        let d1 = s.key_spend("k1", DAY).await.unwrap();
        assert_eq!(
            (d1.spent_day, d1.calls_day, d1.spent_lifetime),
            (Micros(120), 2, Micros(123))
        );
        let d2 = s.key_spend("k1", DAY2).await.unwrap();
        assert_eq!(
            (d2.spent_day, d2.calls_day, d2.spent_lifetime),
            (Micros(3), 1, Micros(123))
        );
        let d3 = s.key_spend("k1", DAY3).await.unwrap();
        assert_eq!(
            (d3.spent_day, d3.calls_day, d3.spent_lifetime),
            (Micros(0), 0, Micros(123))
        );
    }

    pub async fn revoke_run_within_vendors(s: S) {
        add_key(&*s, key("s1", "stripe", "run", 10)).await;
        add_key(&*s, key("o1", "openai", "run", 10)).await;
        add_key(&*s, key("r1", "resend", "run", 10)).await;
        let only = ["openai".to_string(), "resend".to_string()];
        let ids = s.revoke_run("run", Some(&only), now()).await.unwrap();
        assert_eq!(ids, ["o1", "r1"]);
        assert_eq!(s.get_key("s1").await.unwrap().unwrap().revoked_at, None);
        assert!(s
            .revoke_run("run", Some(&[]), now())
            .await
            .unwrap()
            .is_empty());
        assert_eq!(s.revoke_run("run", None, now()).await.unwrap(), ["s1"]);
    }

    pub async fn audit_restricted_to_vendors(s: S) {
        add_key(&*s, key("ka", "stripe", "run", 10_000)).await;
        add_key(&*s, key("kb", "openai", "run", 10_000)).await;
        let events: Vec<SpendEvent> = (0..6)
            .map(|i| {
                let (k, vendor) = if i % 2 == 0 {
                    ("ka", "stripe")
                } else {
                    ("kb", "openai")
                };
                let mut e = event(&format!("e{i}"), k, "l", DAY, vendor, 10);
                e.at = now() + Duration::minutes(i);
                e
            })
            .collect();
        s.record_spend(&events).await.unwrap();
        let ids = |vendors: Option<Vec<&str>>, limit: u32| {
            let s = s.clone();
            let vendors: Option<Vec<String>> =
                vendors.map(|v| v.into_iter().map(String::from).collect());
            async move {
                let q = AuditQuery {
                    vendors,
                    limit,
                    ..AuditQuery::default()
                };
                s.query_audit(&q)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|r| r.event.event_id)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(ids(Some(vec!["openai"]), 0).await, ["e5", "e3", "e1"]);
        // The restriction applies before the page is cut.
        assert_eq!(ids(Some(vec!["stripe"]), 2).await, ["e4", "e2"]);
        assert_eq!(ids(Some(vec!["openai", "stripe"]), 0).await.len(), 6);
        assert!(ids(Some(vec![]), 0).await.is_empty());
        assert_eq!(ids(None, 0).await.len(), 6);
    }

    pub async fn audit_filters_order_and_paging(s: S) {
        add_key(&*s, key("ka", "stripe", "run-a", 10_000)).await;
        add_key(&*s, key("kb", "openai", "run-b", 10_000)).await;
        let mut events = Vec::new();
        for i in 0..10 {
            let (k, vendor) = if i % 2 == 0 {
                ("ka", "stripe")
            } else {
                ("kb", "openai")
            };
            let mut e = event(&format!("e{i}"), k, "l", DAY, vendor, 10 + i);
            e.at = now() + Duration::minutes(i);
            events.push(e);
        }
        s.record_spend(&events[..4]).await.unwrap();
        s.record_spend(&events[4..]).await.unwrap();
        let ids = |rows: &[keycap_control::domain::AuditEntry]| {
            rows.iter()
                .map(|r| r.event.event_id.clone())
                .collect::<Vec<_>>()
        };

        let all = s.query_audit(&AuditQuery::default()).await.unwrap();
        assert_eq!(
            ids(&all),
            ["e9", "e8", "e7", "e6", "e5", "e4", "e3", "e2", "e1", "e0"]
        );
        assert!(
            all.windows(2).all(|w| w[0].seq > w[1].seq),
            "newest first by seq"
        );
        assert_eq!(all[0].agent_run_label, "run-b");
        assert_eq!(all[1].agent_run_label, "run-a");

        let by_key = AuditQuery {
            key_id: Some("ka".into()),
            ..AuditQuery::default()
        };
        assert_eq!(
            ids(&s.query_audit(&by_key).await.unwrap()),
            ["e8", "e6", "e4", "e2", "e0"]
        );
        let by_label = AuditQuery {
            agent_run_label: Some("run-b".into()),
            ..AuditQuery::default()
        };
        assert_eq!(
            ids(&s.query_audit(&by_label).await.unwrap()),
            ["e9", "e7", "e5", "e3", "e1"]
        );
        let by_vendor = AuditQuery {
            vendor: Some("stripe".into()),
            ..AuditQuery::default()
        };
        assert_eq!(
            ids(&s.query_audit(&by_vendor).await.unwrap()),
            ["e8", "e6", "e4", "e2", "e0"]
        );
        let none = AuditQuery {
            vendor: Some("stripe".into()),
            agent_run_label: Some("run-b".into()),
            ..AuditQuery::default()
        };
        assert!(
            s.query_audit(&none).await.unwrap().is_empty(),
            "filters are ANDed"
        );

        // since is inclusive, until exclusive.
        let window = AuditQuery {
            since: Some(events[3].at),
            until: Some(events[6].at),
            ..AuditQuery::default()
        };
        assert_eq!(
            ids(&s.query_audit(&window).await.unwrap()),
            ["e5", "e4", "e3"]
        );

        // Paging.
        let mut q = AuditQuery {
            limit: 4,
            ..AuditQuery::default()
        };
        let mut pages = Vec::new();
        loop {
            let page = s.query_audit(&q).await.unwrap();
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 4);
            q.before_seq = Some(page.last().unwrap().seq);
            pages.push(ids(&page));
        }
        assert_eq!(
            pages,
            [
                vec!["e9", "e8", "e7", "e6"],
                vec!["e5", "e4", "e3", "e2"],
                vec!["e1", "e0"]
            ]
        );
        let filtered_page = AuditQuery {
            key_id: Some("kb".into()),
            before_seq: Some(all[2].seq), // e7
            limit: 2,
            ..AuditQuery::default()
        };
        assert_eq!(
            ids(&s.query_audit(&filtered_page).await.unwrap()),
            ["e5", "e3"]
        );
    }

    pub async fn spend_summary_per_vendor(s: S) {
        add_key(&*s, key("k1", "stripe", "run-1", 10_000)).await;
        add_key(&*s, key("k2", "openai", "run-1", 10_000)).await;
        add_key(&*s, key("k3", "stripe", "run-2", 10_000)).await;
        s.record_spend(&[
            event("e1", "k1", "l", DAY, "stripe", 100),
            event("e2", "k2", "l", DAY, "openai", 7),
            event("e3", "k1", "l", DAY2, "stripe", 50),
            event("e4", "k3", "l", DAY, "stripe", 1_000),
            event("e5", "k2", "l", DAY, "openai", 0),
        ])
        .await
        .unwrap();
        let sum = s.spend_summary("run-1").await.unwrap();
        assert_eq!(sum.total, Micros(157));
        assert_eq!(sum.calls, 4);
        assert_eq!(
            sum.vendors,
            [
                ("openai".to_string(), Micros(7), 2),
                ("stripe".to_string(), Micros(150), 2)
            ]
        );
        let empty = s.spend_summary("no-such-run").await.unwrap();
        assert_eq!(
            (empty.total, empty.calls, empty.vendors.len()),
            (Micros(0), 0, 0)
        );
    }

    pub async fn concurrent_grants_never_exceed_the_cap(s: S) {
        const CAP: i64 = 1_000_000;
        const TASKS: usize = 50;
        const ASK: i64 = 30_000; // 50 x 30_000 = 1.5 x the cap
        add_key(&*s, key("k1", "stripe", "r", CAP)).await;

        // Each grant is sent twice at once (a retry racing its original).
        let mut tasks = Vec::new();
        for i in 0..TASKS {
            for _ in 0..2 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    let req = grant(&format!("g{i}"), &format!("l{i}"), "k1", DAY, ASK, 0);
                    (
                        i,
                        s.grant_lease(&req, now()).await.expect("concurrent grant"),
                    )
                }));
            }
        }
        let mut answers: BTreeMap<usize, keycap_control::domain::LeaseGrant> = BTreeMap::new();
        for t in tasks {
            let (i, answer) = t.await.unwrap();
            if let Some(first) = answers.get(&i) {
                assert_eq!(
                    first, &answer,
                    "both copies of grant {i} get the same answer"
                );
            }
            answers.insert(i, answer);
        }
        let total: i64 = answers.values().map(|a| a.granted.0).sum();
        assert_eq!(
            total, CAP,
            "the whole cap is granted, and not a micro-dollar more"
        );
        assert!(answers.values().all(|a| (0..=ASK).contains(&a.granted.0)));
        assert_eq!(available(&*s, "k1", DAY).await, 0);
    }

    // --- budget trees -------------------------------------------------------

    pub async fn a_tree_is_recorded_and_bounded_in_depth(s: S) {
        add_key(&*s, key("p", "stripe", "r", 100)).await;
        assert_not_found(
            s.insert_key(&child("c0", "ghost", 10)).await,
            "unknown parent",
        );
        add_key(&*s, child("c1", "p", 100)).await;
        add_key(&*s, child("c2", "c1", 100)).await;
        add_key(&*s, child("c3", "c2", 100)).await;
        assert_eq!(
            s.get_key("c3").await.unwrap().unwrap().parent_id.as_deref(),
            Some("c2")
        );
        assert_eq!(s.get_key("p").await.unwrap().unwrap().parent_id, None);
        // Four levels is the most a tree has; nothing is written on refusal.
        let v = s.latest_version().await.unwrap();
        assert_conflict(s.insert_key(&child("c4", "c3", 100)).await, "fifth level");
        assert!(s.get_key("c4").await.unwrap().is_none());
        assert_eq!(s.latest_version().await.unwrap(), v);
        s.revoke_key("c3", now()).await.unwrap();
        assert_conflict(s.insert_key(&child("c5", "c3", 10)).await, "revoked parent");
    }

    pub async fn siblings_share_their_parents_daily_cap(s: S) {
        add_key(&*s, key("p", "stripe", "r", 10_000_000)).await;
        for c in ["a", "b", "c"] {
            add_key(&*s, child(c, "p", 5_000_000)).await;
        }
        // Each child asks for its whole $5; together they may not pass $10.
        let mut total = 0;
        for c in ["a", "b", "c"] {
            total += granted(
                &*s,
                grant(&format!("g{c}"), &format!("l{c}"), c, DAY, 5_000_000, 0),
            )
            .await;
        }
        assert_eq!(total, 10_000_000, "the parent's cap, not 3 x $5");
        assert_eq!(available(&*s, "c", DAY).await, 0);
        assert_eq!(
            available(&*s, "p", DAY).await,
            0,
            "the parent counts its children's leases"
        );

        // A spends $1 of its lease and returns the rest: $4 goes back to the
        // parent, and is what C (its own $5 untouched) can get now.
        s.record_spend(&[event("e1", "a", "la", DAY, "stripe", 1_000_000)])
            .await
            .unwrap();
        s.return_lease("la", None, Micros(1_000_000)).await.unwrap();
        assert_eq!(available(&*s, "c", DAY).await, 4_000_000);
        assert_eq!(available(&*s, "a", DAY).await, 4_000_000);
        // B reports $2.50 and returns the rest: the parent has $6.50 left,
        // more than C's own cap; A stays bound by its own $4.
        s.record_spend(&[event("e2", "b", "lb", DAY, "stripe", 2_500_000)])
            .await
            .unwrap();
        s.return_lease("lb", None, Micros(2_500_000)).await.unwrap();
        assert_eq!(available(&*s, "a", DAY).await, 4_000_000);
        assert_eq!(available(&*s, "c", DAY).await, 5_000_000);
        assert_eq!(available(&*s, "p", DAY).await, 6_500_000);
    }

    pub async fn a_grandchild_is_bounded_by_its_grandparent(s: S) {
        add_key(&*s, key("g", "stripe", "r", 3_000_000)).await;
        add_key(&*s, child("p", "g", 3_000_000)).await;
        add_key(&*s, child("x", "g", 3_000_000)).await;
        add_key(&*s, child("c", "p", 3_000_000)).await;
        assert_eq!(
            granted(&*s, grant("g1", "l1", "x", DAY, 2_000_000, 0)).await,
            2_000_000
        );
        // Parent p and grandchild c have $3 each, the grandparent $1 left.
        let answer = s
            .grant_lease(&grant("g2", "l2", "c", DAY, 3_000_000, 0), now())
            .await
            .unwrap();
        assert_eq!((answer.granted.0, answer.unleased.0), (1_000_000, 0));
        assert!(!answer.lifetime_bound);
        assert_eq!(available(&*s, "p", DAY).await, 0);
        // The tightest level says how much is left when nothing is granted.
        let refused = s
            .grant_lease(&grant("g3", "l3", "c", DAY, 1, 1), now())
            .await
            .unwrap();
        assert_eq!((refused.granted.0, refused.unleased.0), (0, 0));
        // A new day: the daily caps start again for every level.
        assert_eq!(available(&*s, "c", DAY2).await, 3_000_000);
    }

    pub async fn siblings_share_their_parents_lifetime_cap(s: S) {
        add_key(
            &*s,
            VaultKey {
                lifetime_cap: Some(Micros(6_000_000)),
                ..key("p", "stripe", "r", 10_000_000)
            },
        )
        .await;
        add_key(&*s, child("a", "p", 10_000_000)).await;
        add_key(&*s, child("b", "p", 10_000_000)).await;
        s.record_spend(&[event("e1", "a", "", DAY, "stripe", 4_000_000)])
            .await
            .unwrap();
        // Another day: the parent's daily cap is fresh, its lifetime cap
        // has $2 left, which binds B.
        let answer = s
            .grant_lease(&grant("g1", "l1", "b", DAY2, 10_000_000, 0), now())
            .await
            .unwrap();
        assert_eq!(answer.granted.0, 2_000_000);
        assert!(answer.lifetime_bound, "the parent's lifetime cap binds");
        assert_eq!(available(&*s, "a", DAY3).await, 0);
    }

    pub async fn a_revoked_or_expired_ancestor_refuses_grants(s: S) {
        add_key(&*s, key("p", "stripe", "r", 10_000_000)).await;
        add_key(&*s, child("c", "p", 5_000_000)).await;
        add_key(&*s, child("gc", "c", 5_000_000)).await;
        assert_eq!(granted(&*s, grant("g0", "l0", "gc", DAY, 1, 0)).await, 1);
        s.revoke_key("p", now()).await.unwrap();
        assert_conflict(
            s.grant_lease(&grant("g1", "l1", "gc", DAY, 1, 0), now())
                .await,
            "grandchild of a revoked key",
        );
        // The store does not check a child's expiry against its parent's
        // (minting does), so a live child under an expired parent shows
        // that a grant checks every level itself.
        add_key(
            &*s,
            VaultKey {
                expires_at: now() + Duration::hours(1),
                ..key("q", "stripe", "r", 10_000_000)
            },
        )
        .await;
        add_key(
            &*s,
            VaultKey {
                expires_at: now() + Duration::hours(2),
                ..child("d", "q", 5_000_000)
            },
        )
        .await;
        let mut req = grant("g2", "l2", "d", DAY, 1, 0);
        req.expires_at = now() + Duration::hours(3);
        assert_conflict(
            s.grant_lease(&req, now() + Duration::minutes(90)).await,
            "child of an expired key",
        );
    }

    pub async fn a_roll_chain_spends_one_budget_and_retires_key_by_key(s: S) {
        add_key(&*s, key("p", "stripe", "r", 10_000_000)).await;
        let a = add_key(&*s, child("a", "p", 6_000_000)).await;
        s.record_spend(&[event("e1", "a", "", DAY, "stripe", 2_000_000)])
            .await
            .unwrap();
        let grace = now() + Duration::minutes(10);
        let a2 = successor(&a, "a2");
        let rolled = s.roll_key("a", &a2, grace, now()).await.unwrap();
        assert_eq!(rolled.roll.successor_id.as_deref(), Some("a2"));
        assert_eq!(
            rolled.roll.retire_at.map(|t| t.timestamp_micros()),
            Some(grace.timestamp_micros())
        );
        let stored = s.get_key("a2").await.unwrap().unwrap();
        assert_eq!(stored.budget_id(), "a");
        assert_eq!(stored.roll.rolled_from.as_deref(), Some("a"));
        // Spend before the roll counts after it, and a lease granted to the
        // successor is the old key's too.
        assert_eq!(available(&*s, "a2", DAY).await, 4_000_000);
        assert_eq!(
            granted(&*s, grant("g1", "l1", "a2", DAY, 3_000_000, 0)).await,
            3_000_000
        );
        assert_eq!(available(&*s, "a", DAY).await, 1_000_000);
        // The parent counts the chain once.
        assert_eq!(available(&*s, "p", DAY).await, 5_000_000);
        // A key is rolled once.
        assert_conflict(
            s.roll_key("a", &successor(&a, "a2b"), grace, now()).await,
            "a second roll of one key",
        );
        assert!(s.get_key("a2b").await.unwrap().is_none());
        let a3 = successor(&stored, "a3");
        s.roll_key("a2", &a3, grace + Duration::minutes(5), now())
            .await
            .unwrap();
        assert_eq!(s.get_key("a3").await.unwrap().unwrap().budget_id(), "a");
        s.record_spend(&[event("e2", "a3", "l1", DAY, "stripe", 1_000_000)])
            .await
            .unwrap();
        for id in ["a", "a2", "a3"] {
            assert_eq!(
                s.key_spend(id, DAY).await.unwrap().spent_day,
                Micros(3_000_000),
                "{id}"
            );
        }
        // A child of the successor joins the chain's tree.
        add_key(&*s, child("c", "a3", 1_000_000)).await;
        assert_eq!(available(&*s, "c", DAY).await, 1_000_000);
        // Deadlines come due in order; retiring a rolled key revokes it
        // alone, and the chain spends on.
        assert!(s.due_retirements(now(), 10).await.unwrap().is_empty());
        assert_eq!(
            s.due_retirements(now() + Duration::hours(1), 10)
                .await
                .unwrap(),
            vec!["a".to_string(), "a2".to_string()]
        );
        let retired = s.revoke_key("a", now()).await.unwrap();
        assert!(retired.descendants.is_empty());
        assert!(retired.key.revoked_at.is_some());
        assert!(s.get_key("a3").await.unwrap().unwrap().revoked_at.is_none());
        assert!(s.get_key("c").await.unwrap().unwrap().revoked_at.is_none());
        assert_eq!(
            granted(&*s, grant("g2", "l2", "a3", DAY, 500_000, 0)).await,
            500_000
        );
        assert_eq!(
            s.due_retirements(now() + Duration::hours(1), 10)
                .await
                .unwrap(),
            vec!["a2".to_string()]
        );
        assert_conflict(
            s.roll_key("a", &successor(&a, "a4"), grace, now()).await,
            "a roll of a revoked key",
        );
        // Revoking the chain's newest key revokes the budget: every key of
        // the chain and the tree below it.
        let revoked = s.revoke_key("a3", now()).await.unwrap();
        assert_eq!(revoked.descendants, vec!["a", "a2", "c"]);
        for id in ["a2", "a3", "c"] {
            assert!(
                s.get_key(id).await.unwrap().unwrap().revoked_at.is_some(),
                "{id}"
            );
        }
        assert_conflict(
            s.grant_lease(&grant("g3", "l3", "a3", DAY, 1, 0), now())
                .await,
            "a grant on a revoked chain",
        );
        assert!(s.get_key("p").await.unwrap().unwrap().revoked_at.is_none());
    }

    pub async fn rolling_repeatedly_never_grants_more_than_the_cap(s: S) {
        let mut head = add_key(&*s, key("k0", "stripe", "r", 5_000_000)).await;
        let mut total = 0;
        for i in 1..=8 {
            // Each key of the chain takes what it can, then is rolled.
            let id = format!("l{i}");
            total += granted(&*s, grant(&id, &id, &head.id, DAY, 1_000_000, 0)).await;
            let next = successor(&head, &format!("k{i}"));
            s.roll_key(&head.id, &next, now() + Duration::minutes(10), now())
                .await
                .unwrap();
            head = s.get_key(&next.id).await.unwrap().unwrap();
            if i % 2 == 0 {
                s.revoke_key(&format!("k{}", i - 2), now()).await.unwrap();
            }
        }
        assert_eq!(
            total, 5_000_000,
            "the chain was granted {total} under a $5 cap"
        );
        assert_eq!(available(&*s, &head.id, DAY).await, 0);
        assert_eq!(available(&*s, "k0", DAY).await, 0);
    }

    pub async fn revoking_a_key_revokes_its_subtree(s: S) {
        add_key(&*s, key("p", "stripe", "r", 100)).await;
        add_key(&*s, child("a", "p", 10)).await;
        add_key(&*s, child("b", "p", 10)).await;
        add_key(&*s, child("aa", "a", 10)).await;
        add_key(&*s, key("other", "stripe", "r", 100)).await;
        s.revoke_key("b", now() - Duration::minutes(1))
            .await
            .unwrap();
        let v0 = s.latest_version().await.unwrap();

        let out = s.revoke_key("p", now()).await.unwrap();
        assert_eq!(out.key.id, "p");
        assert_eq!(out.key.revoked_at, Some(trunc(now())));
        assert_eq!(out.descendants, vec!["a", "aa", "b"]);
        // One change per key this revocation changed: b was revoked before.
        let mut changed: Vec<ChangeRef> = s
            .changes_since(v0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.what)
            .collect();
        changed.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            changed,
            ["a", "aa", "p"]
                .map(|k| ChangeRef::Key(k.to_string()))
                .to_vec()
        );
        for k in ["a", "aa"] {
            assert_eq!(
                s.get_key(k).await.unwrap().unwrap().revoked_at,
                Some(trunc(now()))
            );
        }
        assert_eq!(
            s.get_key("b").await.unwrap().unwrap().revoked_at,
            Some(trunc(now() - Duration::minutes(1))),
            "keeps its first revoked_at"
        );
        assert!(s
            .get_key("other")
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_none());
        // Revoking a leaf revokes only it.
        add_key(&*s, child("o1", "other", 10)).await;
        let leaf = s.revoke_key("o1", now()).await.unwrap();
        assert!(leaf.descendants.is_empty());
        assert!(s
            .get_key("other")
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_none());
    }

    pub async fn revoking_a_run_revokes_the_subtrees_of_its_keys(s: S) {
        add_key(&*s, key("p", "stripe", "scenario", 100)).await;
        // Children carry their own labels (per execution).
        add_key(&*s, child("p1", "p", 10)).await;
        add_key(&*s, child("p11", "p1", 10)).await;
        add_key(&*s, key("q", "stripe", "other", 100)).await;
        add_key(&*s, child("q1", "q", 10)).await;
        let v0 = s.latest_version().await.unwrap();
        let ids = s.revoke_run("scenario", None, now()).await.unwrap();
        assert_eq!(ids, vec!["p", "p1", "p11"]);
        assert_eq!(s.latest_version().await.unwrap(), v0 + 3);
        assert!(s.get_key("q1").await.unwrap().unwrap().revoked_at.is_none());
        // Restricted to other vendors, nothing is revoked.
        let none = s
            .revoke_run("other", Some(&["openai".to_string()]), now())
            .await
            .unwrap();
        assert!(none.is_empty());
    }

    pub async fn concurrent_sibling_grants_never_exceed_the_parents_cap(s: S) {
        const CAP: i64 = 1_000_000;
        const CHILDREN: usize = 10;
        const ASK: i64 = 30_000; // 10 x 5 x 30_000 = 1.5 x the parent's cap
        add_key(&*s, key("p", "stripe", "r", CAP)).await;
        for c in 0..CHILDREN {
            add_key(&*s, child(&format!("c{c}"), "p", CAP)).await;
        }
        let mut tasks = Vec::new();
        for c in 0..CHILDREN {
            for i in 0..5 {
                let s = s.clone();
                tasks.push(tokio::spawn(async move {
                    let id = format!("c{c}-{i}");
                    let req = grant(&id, &id, &format!("c{c}"), DAY, ASK, 0);
                    s.grant_lease(&req, now()).await.expect("concurrent grant")
                }));
            }
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap().granted.0;
        }
        assert_eq!(
            total, CAP,
            "the whole parent cap, and not a micro-dollar more"
        );
        assert_eq!(available(&*s, "c0", DAY).await, 0);
    }

    pub async fn a_bulk_batch_applies_each_event_once_within_and_across_batches(s: S) {
        add_key(&*s, key("k1", "stripe", "run-1", 1_000_000_000)).await;
        add_key(&*s, key("k2", "stripe", "run-2", 1_000_000_000)).await;
        let ev = |i: usize| {
            let k = if i.is_multiple_of(2) { "k1" } else { "k2" };
            event(
                &format!("e{i}"),
                k,
                "l1",
                DAY,
                "stripe",
                1 + (i % 13) as i64,
            )
        };
        // 1,000 events in one batch (several bulk writes on SQLite, one
        // COPY on PostgreSQL), 100 of them twice: once early in the batch,
        // once again after every fresh one.
        let mut first: Vec<SpendEvent> = (0..1000).map(ev).collect();
        first.insert(1, ev(0));
        let later: Vec<SpendEvent> = (0..1000).step_by(10).skip(1).map(ev).collect();
        first.extend(later);
        let applied = s.apply_spend(&first).await.unwrap();
        assert_eq!(applied.len(), 1100);
        assert_eq!(applied.iter().filter(|a| **a).count(), 1000);
        assert!(!applied[1], "the repeat right after its first copy");
        assert!(applied[1001..].iter().all(|a| !a), "the repeats at the end");
        // Across batches: 300 stored ones, then 200 new ones each twice.
        let mut second: Vec<SpendEvent> = (0..300).map(ev).collect();
        let fresh: Vec<SpendEvent> = (1000..1200).map(ev).collect();
        second.extend(fresh.iter().cloned());
        second.extend(fresh);
        assert_eq!(s.record_spend(&second).await.unwrap(), (200, 500));
        assert_eq!(s.record_spend(&second).await.unwrap(), (0, 700), "resent");

        let all = check_whole_chain(&*s).await;
        assert_eq!(all.len(), 1200);
        let ids: std::collections::BTreeSet<&str> =
            all.iter().map(|e| e.event.event_id.as_str()).collect();
        assert_eq!(ids.len(), 1200, "no event twice");
        assert!(
            all.windows(2).all(|w| w[1].seq == w[0].seq + 1),
            "seqs are consecutive"
        );
        let spent = |k: usize| -> (i64, i64) {
            let of_k: Vec<i64> = (0..1200)
                .filter(|i| i % 2 == k)
                .map(|i| 1 + (i % 13) as i64)
                .collect();
            (of_k.iter().sum(), of_k.len() as i64)
        };
        for (k, id) in [(0, "k1"), (1, "k2")] {
            let got = s.key_spend(id, DAY).await.unwrap();
            assert_eq!((got.spent_day.0, got.calls_day), spent(k), "{id}");
        }
        assert_eq!(all[5].agent_run_label, "run-2");
        assert_eq!(all[4].agent_run_label, "run-1");
    }

    pub async fn concurrent_resent_batches_apply_once(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 1_000_000)).await;
        let batch: Vec<SpendEvent> = (0..20)
            .map(|i| event(&format!("e{i}"), "k1", "l1", DAY, "stripe", 10 + i))
            .collect();
        let expected: i64 = batch.iter().map(|e| e.cost.0).sum();
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let s = s.clone();
            let batch = batch.clone();
            tasks.push(tokio::spawn(async move {
                s.record_spend(&batch).await.expect("record")
            }));
        }
        let (mut applied, mut dups) = (0, 0);
        for t in tasks {
            let (a, d) = t.await.unwrap();
            applied += a;
            dups += d;
        }
        assert_eq!((applied, dups), (20, 7 * 20));
        let spend = s.key_spend("k1", DAY).await.unwrap();
        assert_eq!((spend.spent_day, spend.calls_day), (Micros(expected), 20));
        assert_eq!(
            s.query_audit(&AuditQuery::default()).await.unwrap().len(),
            20
        );
    }

    pub async fn an_event_dated_ahead_of_the_ledger_clock_waits_and_then_counts_once(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 1_000_000)).await;
        let head = s.ledger_head().await.unwrap();
        // A proxy whose clock runs two hours fast: its batch is refused
        // whole, as a conflict (the proxy keeps it and retries), and
        // nothing of it is applied.
        let fast = SpendEvent {
            at: Utc::now() + Duration::hours(2),
            ..event("fast", "k1", "l1", DAY, "stripe", 10)
        };
        let batch = [event("on-time", "k1", "l1", DAY, "stripe", 5), fast.clone()];
        match s.record_spend(&batch).await {
            Err(StoreError::Conflict(why)) => assert!(
                why.contains("spend event fast") && why.contains("ahead of the ledger's clock"),
                "{why}"
            ),
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(s.ledger_head().await.unwrap(), head);
        assert_eq!(s.key_spend("k1", DAY).await.unwrap().calls_day, 0);
        // Within the hour it is taken, and once only.
        let soon = SpendEvent {
            at: Utc::now() + Duration::minutes(50),
            ..fast
        };
        let batch = [batch[0].clone(), soon];
        assert_eq!(s.record_spend(&batch).await.unwrap(), (2, 0));
        assert_eq!(s.record_spend(&batch).await.unwrap(), (0, 2));
        // An event delivered long after its call (a spool replayed after
        // days) and then again is still counted once.
        let late = SpendEvent {
            at: Utc::now() - Duration::days(40),
            ..event("late", "k1", "l1", DAY, "stripe", 7)
        };
        assert_eq!(
            s.record_spend(std::slice::from_ref(&late)).await.unwrap(),
            (1, 0)
        );
        assert_eq!(s.record_spend(&[late]).await.unwrap(), (0, 1));
        let spend = s.key_spend("k1", DAY).await.unwrap();
        assert_eq!((spend.spent_day, spend.calls_day), (Micros(22), 3));
        check_whole_chain(&*s).await;
    }

    pub async fn an_event_resent_while_its_first_batch_fails_is_applied_once(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 1_000_000)).await;
        // Three batches at once (on PostgreSQL the later two chain behind
        // the first, `ledger::pipeline`). The first carries event x and
        // fails whole (another of its events is dated hours ahead); the
        // third resends x. x was never stored, so the third applies it.
        let x = event("x", "k1", "l1", DAY, "stripe", 5);
        let fast = SpendEvent {
            at: Utc::now() + Duration::hours(2),
            ..event("fast", "k1", "l1", DAY, "stripe", 10)
        };
        let batches = [
            vec![x.clone(), fast],
            vec![event("y", "k1", "l1", DAY, "stripe", 7)],
            vec![x],
        ];
        let answers =
            futures_util::future::join_all(batches.iter().map(|b| s.record_spend(b))).await;
        assert!(
            matches!(answers[0], Err(StoreError::Conflict(_))),
            "{answers:?}"
        );
        assert_eq!(answers[1].as_ref().unwrap(), &(1, 0));
        assert_eq!(answers[2].as_ref().unwrap(), &(1, 0), "x is applied");
        let spend = s.key_spend("k1", DAY).await.unwrap();
        assert_eq!((spend.spent_day, spend.calls_day), (Micros(12), 2));
        check_whole_chain(&*s).await;
    }

    pub async fn the_audit_ledger_is_one_hash_chain(s: S) {
        add_key(&*s, key("k1", "stripe", "run-1", 1_000_000)).await;
        let mut first: Vec<SpendEvent> = (0..5)
            .map(|i| event(&format!("e{i}"), "k1", "l1", DAY, "stripe", 10 + i))
            .collect();
        first[1].trace_id = "0af7651916cd43dd8448eb211c80319c".into();
        first[1].context = BTreeMap::from([
            ("step".to_string(), "charge".to_string()),
            ("tenant".to_string(), "acme".to_string()),
        ]);
        // A duplicate inside the batch counts once.
        first.push(first[0].clone());
        assert_eq!(s.record_spend(&first).await.unwrap(), (5, 1));
        // A resent batch, partly new: only the new events are appended.
        let mut second = first[3..5].to_vec();
        second.push(event("e5", "k1", "l1", DAY, "stripe", 15));
        assert_eq!(s.record_spend(&second).await.unwrap(), (1, 2));

        let all = check_whole_chain(&*s).await;
        let ids: Vec<&str> = all.iter().map(|e| e.event.event_id.as_str()).collect();
        assert_eq!(ids, ["e0", "e1", "e2", "e3", "e4", "e5"]);
        assert!(
            all.windows(2).all(|w| w[1].seq == w[0].seq + 1),
            "seqs are consecutive"
        );
        assert_eq!(all[0].prev_hash, Some(keycap_control::ledger::GENESIS));
        assert_eq!(all[1].event.trace_id, first[1].trace_id);
        assert_eq!(all[1].event.context, first[1].context);
        assert_eq!(all[1].agent_run_label, "run-1");
    }

    pub async fn concurrent_appenders_form_one_chain(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 1_000_000_000)).await;
        add_key(&*s, key("k2", "openai", "r", 1_000_000_000)).await;
        // 8 writers (on PostgreSQL each on its own connection, as replicas
        // are); every batch is also resent by a second writer.
        let batches: Vec<Vec<SpendEvent>> = (0..16)
            .map(|b| {
                (0..25)
                    .map(|i| {
                        let k = if i % 2 == 0 { "k1" } else { "k2" };
                        event(&format!("b{b}-e{i}"), k, "l1", DAY, "stripe", 1 + i)
                    })
                    .collect()
            })
            .collect();
        let mut tasks = Vec::new();
        for w in 0..8usize {
            let s = s.clone();
            let mine: Vec<Vec<SpendEvent>> = batches
                .iter()
                .enumerate()
                .filter(|(b, _)| b % 8 == w || (b + 1) % 8 == w)
                .map(|(_, batch)| batch.clone())
                .collect();
            tasks.push(tokio::spawn(async move {
                let mut applied = 0;
                for batch in mine {
                    applied += s.record_spend(&batch).await.expect("record").0;
                }
                applied
            }));
        }
        let mut applied = 0;
        for t in tasks {
            applied += t.await.unwrap();
        }
        assert_eq!(applied, 16 * 25, "each event applied once");
        let all = check_whole_chain(&*s).await;
        assert_eq!(all.len(), 16 * 25);
        assert!(
            all.windows(2).all(|w| w[1].seq == w[0].seq + 1),
            "seqs are consecutive"
        );
        let spent: i64 = batches.iter().flatten().map(|e| e.cost.0).sum();
        let k1 = s.key_spend("k1", DAY).await.unwrap().spent_day;
        let k2 = s.key_spend("k2", DAY).await.unwrap().spent_day;
        assert_eq!(k1.0 + k2.0, spent);
    }

    pub async fn an_export_verifies_with_the_documented_script(s: S) {
        add_key(&*s, key("k1", "stripe", "run-ü", 1_000_000)).await;
        let mut events: Vec<SpendEvent> = (0..30)
            .map(|i| event(&format!("e{i}"), "k1", "l1", DAY, "stripe", 7 * i))
            .collect();
        events[3].trace_id = "0af7651916cd43dd8448eb211c80319c".into();
        events[3].context = BTreeMap::from([
            ("z".into(), "last".into()),
            ("a".into(), "first, \"quoted\" ✓".into()),
        ]);
        events[4].detail_json = r#"{ "model" : "gpt-x",  "spaced": true }"#.into();
        // Refusal entries carry their reason and count in the chain too.
        events[12] = refusal("e12", "k1", "stripe", "daily_cap_exceeded", 500);
        events[13] = refusal("e13", "k1", "stripe", "rate_limited", 1);
        // Observe mode's marks, with and without a credential version.
        events[20].would_refuse = "endpoint_not_allowed".into();
        events[21].would_refuse = "per_call_cap_exceeded".into();
        events[21].credential_version = 3;
        for batch in events.chunks(7) {
            s.record_spend(batch).await.unwrap();
        }
        let all = check_whole_chain(&*s).await;
        let dir = tempfile::tempdir().unwrap();
        let export: String = all
            .iter()
            .map(keycap_control::ledger::export::jsonl)
            .collect();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/verify_ledger.py");
        let run_with = |text: &str, args: &[String]| {
            let path = dir.path().join("audit.jsonl");
            std::fs::write(&path, text).unwrap();
            std::process::Command::new("python3")
                .arg(script)
                .arg(&path)
                .args(args)
                .output()
                .expect("python3 runs")
        };
        let run = |text: &str| run_with(text, &[]);
        let ok = run(&export);
        let out = String::from_utf8_lossy(&ok.stdout);
        let head = all.last().unwrap();
        assert!(
            ok.status.success(),
            "{out} {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert_eq!(
            out.trim(),
            format!(
                "OK 30 entries, head seq {} hash {}",
                head.seq,
                hex::encode(head.hash.unwrap())
            )
        );

        // The same ledger exported as CSV verifies the same; an amount
        // changed in it is named.
        use keycap_control::ledger::export::{csv, csv_header};
        let csv_export = |edit: Option<usize>| {
            let mut out = csv_header();
            for (n, e) in all.iter().enumerate() {
                let mut e = e.clone();
                if edit == Some(n) {
                    e.event.cost.0 += 1;
                }
                out.push_str(&csv(&e));
            }
            out
        };
        let from_csv = run(&csv_export(None));
        assert_eq!(
            String::from_utf8_lossy(&from_csv.stdout),
            String::from_utf8_lossy(&ok.stdout),
            "{}",
            String::from_utf8_lossy(&from_csv.stderr)
        );
        let bad = run(&csv_export(Some(4)));
        assert_eq!(
            String::from_utf8_lossy(&bad.stdout).trim(),
            format!(
                "BROKEN at seq {}: content does not match its hash",
                all[4].seq
            )
        );
        // A later part of the ledger verifies from the hash before it.
        let tail: String = export.lines().skip(10).map(|l| format!("{l}\n")).collect();
        let from = ["--from-hash".to_string(), hex::encode(all[9].hash.unwrap())];
        let part = run_with(&tail, &from);
        assert_eq!(
            String::from_utf8_lossy(&part.stdout).trim(),
            format!(
                "OK 20 entries, head seq {} hash {}",
                head.seq,
                hex::encode(head.hash.unwrap())
            )
        );
        assert!(!run(&tail).status.success(), "not from the genesis hash");

        // An amount changed in the export: that entry is named.
        let mut lines: Vec<String> = export.lines().map(str::to_string).collect();
        let mut edited: serde_json::Value = serde_json::from_str(&lines[10]).unwrap();
        edited["cost_micros"] = serde_json::json!(1);
        lines[10] = edited.to_string();
        let bad = run(&(lines.join("\n") + "\n"));
        assert!(!bad.status.success());
        assert_eq!(
            String::from_utf8_lossy(&bad.stdout).trim(),
            format!(
                "BROKEN at seq {}: content does not match its hash",
                all[10].seq
            )
        );
        // A refusal's count changed: that entry is named.
        let mut lines: Vec<String> = export.lines().map(str::to_string).collect();
        let mut edited: serde_json::Value = serde_json::from_str(&lines[12]).unwrap();
        assert_eq!(edited["refused_calls"], 500);
        edited["refused_calls"] = serde_json::json!(5);
        lines[12] = edited.to_string();
        let bad = run(&(lines.join("\n") + "\n"));
        assert_eq!(
            String::from_utf8_lossy(&bad.stdout).trim(),
            format!(
                "BROKEN at seq {}: content does not match its hash",
                all[12].seq
            )
        );
        // A middle entry removed: the one after it is named.
        let mut lines: Vec<String> = export.lines().map(str::to_string).collect();
        lines.remove(20);
        let gap = run(&(lines.join("\n") + "\n"));
        assert!(!gap.status.success());
        assert_eq!(
            String::from_utf8_lossy(&gap.stdout).trim(),
            format!(
                "BROKEN at seq {}: prev_hash is not the hash of the entry before it",
                all[21].seq
            )
        );

        // Checkpoints kept from earlier: one the export holds passes; the
        // last entries cut off (a checkpoint beyond the end) or an entry
        // whose hash is not the checkpoint's are named.
        let point = |e: &keycap_control::domain::AuditEntry| {
            let point = format!("{}:{}", e.seq, hex::encode(e.hash.unwrap()));
            vec!["--checkpoint".to_string(), point]
        };
        let held = [point(&all[9]), point(head)].concat();
        assert!(run_with(&export, &held).status.success());
        let cut: String = export.lines().take(25).map(|l| format!("{l}\n")).collect();
        let short = run_with(&cut, &held);
        assert!(!short.status.success());
        assert_eq!(
            String::from_utf8_lossy(&short.stdout).trim(),
            format!(
                "BROKEN at seq {}: the checkpoint's entry is not in the export",
                head.seq
            )
        );
        let mut other = point(&all[9]);
        other[1] = format!("{}:{}", all[9].seq, "ab".repeat(32));
        let wrong = run_with(&export, &other);
        assert_eq!(
            String::from_utf8_lossy(&wrong.stdout).trim(),
            format!(
                "BROKEN at seq {}: not the hash the checkpoint holds",
                all[9].seq
            )
        );
    }

    pub async fn refusals_are_chained_entries_that_spend_nothing(s: S) {
        add_key(&*s, key("k1", "stripe", "run-1", 1_000_000)).await;
        add_key(&*s, key("k2", "stripe", "run-1", 1_000_000)).await;
        let batch = vec![
            event("e1", "k1", "l1", DAY, "stripe", 100),
            refusal("r1", "k1", "stripe", "daily_cap_exceeded", 500),
            refusal("r2", "k2", "stripe", "endpoint_not_allowed", 3),
            refusal("r3", "k1", "stripe", "rate_limited", 2),
        ];
        assert_eq!(s.record_spend(&batch).await.unwrap(), (4, 0));
        // A resent report counts once.
        assert_eq!(s.record_spend(&batch[1..2]).await.unwrap(), (0, 1));
        let all = check_whole_chain(&*s).await;
        assert_eq!(all.len(), 4);
        let v = keycap_control::ledger::verify(&*s, None, &[])
            .await
            .unwrap();
        assert!(v.ok(), "{v:?}");
        let r1 = &all[1].event;
        assert_eq!(r1.outcome, Outcome::Refused);
        assert_eq!(
            (r1.refusal_reason.as_str(), r1.refused_calls),
            ("daily_cap_exceeded", 500)
        );
        assert_eq!(all[1].agent_run_label, "run-1");
        assert_eq!(all[0].event.refusal_reason, "");

        // A refusal spends nothing and is no call of the key's.
        let spend = s.key_spend("k1", DAY).await.unwrap();
        assert_eq!((spend.spent_day, spend.calls_day), (Micros(100), 1));
        let sum = s.spend_summary("run-1").await.unwrap();
        assert_eq!((sum.total, sum.calls), (Micros(100), 1));

        // Queryable: every refusal, or one reason's.
        let refused = s
            .query_audit(&AuditQuery {
                outcome: Some(Outcome::Refused),
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        let ids: Vec<&str> = refused.iter().map(|e| e.event.event_id.as_str()).collect();
        assert_eq!(ids, ["r3", "r2", "r1"]);
        let cap = s
            .query_audit(&AuditQuery {
                refusal_reason: Some("daily_cap_exceeded".into()),
                key_id: Some("k1".into()),
                ..AuditQuery::default()
            })
            .await
            .unwrap();
        assert_eq!(cap.len(), 1);
        assert_eq!(cap[0].event.refused_calls, 500);
    }

    pub async fn refusal_counts_sum_records_per_key_and_reason(s: S) {
        add_key(&*s, key("k1", "stripe", "run-1", 1_000_000)).await;
        add_key(&*s, key("k2", "stripe", "run-1", 1_000_000)).await;
        add_key(&*s, key("k3", "openai", "run-2", 1_000_000)).await;
        let t0 = Utc.with_ymd_and_hms(2026, 1, 15, 10, 0, 0).unwrap();
        let at = |e: SpendEvent, minutes: i64, node: &str| SpendEvent {
            at: t0 + Duration::minutes(minutes),
            node_id: node.to_string(),
            ..e
        };
        let batch = vec![
            event("e1", "k1", "l1", DAY, "stripe", 100),
            at(
                refusal("r1", "k1", "stripe", "daily_cap_exceeded", 5),
                0,
                "node-a",
            ),
            // Another proxy's record of the same minute.
            at(
                refusal("r2", "k1", "stripe", "daily_cap_exceeded", 3),
                0,
                "node-b",
            ),
            at(
                refusal("r3", "k1", "stripe", "rate_limited", 2),
                0,
                "node-a",
            ),
            at(
                refusal("r4", "k2", "stripe", "endpoint_not_allowed", 1),
                1,
                "node-a",
            ),
            at(
                refusal("r5", "k3", "openai", "daily_cap_exceeded", 4),
                0,
                "node-a",
            ),
        ];
        assert_eq!(s.record_spend(&batch).await.unwrap(), (6, 0));
        let counts = |q: RefusalCountQuery| {
            let s = s.clone();
            async move {
                s.refusal_counts(&q)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|c| (c.key_id, c.reason, c.calls))
                    .collect::<Vec<_>>()
            }
        };
        let row = |k: &str, r: &str, n: i64| (k.to_string(), r.to_string(), n);

        let all = counts(RefusalCountQuery {
            since: Some(t0),
            ..RefusalCountQuery::default()
        })
        .await;
        assert_eq!(
            all,
            [
                row("k1", "daily_cap_exceeded", 8),
                row("k3", "daily_cap_exceeded", 4),
                row("k1", "rate_limited", 2),
                row("k2", "endpoint_not_allowed", 1),
            ]
        );
        let full = s
            .refusal_counts(&RefusalCountQuery::default())
            .await
            .unwrap();
        assert_eq!(
            (full[0].agent_run_label.as_str(), full[0].vendor.as_str()),
            ("run-1", "stripe")
        );
        // One key's cap refusals in one minute, every proxy's together.
        let minute = counts(RefusalCountQuery {
            since: Some(t0),
            until: Some(t0 + Duration::minutes(1)),
            key_id: Some("k1".into()),
            reasons: Some(vec![
                "daily_cap_exceeded".into(),
                "lifetime_cap_exceeded".into(),
            ]),
            vendors: None,
        })
        .await;
        assert_eq!(minute, [row("k1", "daily_cap_exceeded", 8)]);
        // A token restricted to some vendors sees theirs only.
        let stripe = counts(RefusalCountQuery {
            vendors: Some(vec!["stripe".into()]),
            ..RefusalCountQuery::default()
        })
        .await;
        assert!(stripe.iter().all(|(k, _, _)| k != "k3"), "{stripe:?}");
        let later = counts(RefusalCountQuery {
            since: Some(t0 + Duration::minutes(1)),
            ..RefusalCountQuery::default()
        })
        .await;
        assert_eq!(later, [row("k2", "endpoint_not_allowed", 1)]);
    }

    pub async fn lineage_spend_sums_each_ancestors_subtree(s: S) {
        add_key(&*s, key("p", "stripe", "r", 10_000_000)).await;
        add_key(&*s, child("c", "p", 5_000_000)).await;
        add_key(&*s, child("g", "c", 1_000_000)).await;
        add_key(&*s, child("sibling", "p", 1_000_000)).await;
        let batch = vec![
            event("e1", "p", "l1", DAY, "stripe", 100),
            event("e2", "c", "l2", DAY, "stripe", 200),
            event("e3", "g", "l3", DAY, "stripe", 300),
            event("e4", "c", "l4", DAY2, "stripe", 50),
            event("e5", "sibling", "l5", DAY, "stripe", 7),
        ];
        assert_eq!(s.record_spend(&batch).await.unwrap(), (5, 0));
        let lineage = |ids: &'static [&'static str], day: &'static str| {
            let s = s.clone();
            async move {
                let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
                s.lineage_spend(&ids, day)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|l| {
                        (
                            l.key_id,
                            l.spend.spent_day.0,
                            l.spend.calls_day,
                            l.spend.spent_lifetime.0,
                        )
                    })
                    .collect::<Vec<(String, i64, i64, i64)>>()
            }
        };
        assert_eq!(
            lineage(&["g"], DAY).await,
            [
                ("g".to_string(), 300, 1, 300),
                ("c".to_string(), 500, 2, 550),
                ("p".to_string(), 607, 4, 657),
            ]
        );
        // Two keys at once: each ancestor once, at the least depth either
        // key sees it (`p` is the sibling's parent), then by id.
        assert_eq!(
            lineage(&["sibling", "nobody", "g"], DAY).await,
            [
                ("g".to_string(), 300, 1, 300),
                ("sibling".to_string(), 7, 1, 7),
                ("c".to_string(), 500, 2, 550),
                ("p".to_string(), 607, 4, 657),
            ]
        );
        let root = lineage(&["p"], DAY2).await;
        assert_eq!(root, [("p".to_string(), 50, 1, 657)]);
        assert!(lineage(&["nobody"], DAY).await.is_empty());
        assert!(lineage(&[], DAY).await.is_empty());
    }

    /// What a threshold pass reads for all its keys at once, over more
    /// keys than one statement takes: the keys, their lineage's spend, the
    /// keys of their runs and what each budget settled on a day.
    pub async fn threshold_reads_take_many_keys_at_once(s: S) {
        const KEYS: usize = 300;
        add_key(&*s, key("root", "stripe", "run-root", 1_000_000_000)).await;
        let mut ids = Vec::new();
        let mut batch = Vec::new();
        for i in 0..KEYS {
            let id = format!("k{i:03}");
            add_key(
                &*s,
                VaultKey {
                    agent_run_label: format!("run-{}", i % 3),
                    ..child(&id, "root", 1_000_000)
                },
            )
            .await;
            batch.push(event(
                &format!("e{i}"),
                &id,
                "l",
                DAY,
                "stripe",
                i as i64 + 1,
            ));
            ids.push(id);
        }
        assert_eq!(s.record_spend(&batch).await.unwrap(), (KEYS as u32, 0));
        let total: i64 = (1..=KEYS as i64).sum();

        let mut asked = ids.clone();
        asked.push("nobody".to_string());
        let mut found: Vec<String> = s
            .keys_by_id(&asked)
            .await
            .unwrap()
            .into_iter()
            .map(|k| k.id)
            .collect();
        found.sort();
        assert_eq!(found, ids, "every known key once, the unknown one left out");

        let lineage = s.lineage_spend(&ids, DAY).await.unwrap();
        assert_eq!(
            lineage.len(),
            KEYS + 1,
            "each key, and the shared root once"
        );
        let root: Vec<_> = lineage.iter().filter(|l| l.key_id == "root").collect();
        assert_eq!(root.len(), 1);
        assert_eq!(root[0].spend.spent_day, Micros(total));
        assert_eq!(root[0].spend.calls_day, KEYS as i64);
        let k7 = lineage.iter().find(|l| l.key_id == "k007").unwrap();
        assert_eq!(k7.spend.spent_day, Micros(8));

        let labels = vec![
            "run-1".to_string(),
            "run-root".to_string(),
            "run-none".to_string(),
        ];
        let mut run_keys: Vec<(String, String)> = s
            .run_keys(&labels)
            .await
            .unwrap()
            .into_iter()
            .map(|k| (k.agent_run_label, k.id))
            .collect();
        run_keys.sort();
        let mut expected: Vec<(String, String)> = (0..KEYS)
            .filter(|i| i % 3 == 1)
            .map(|i| ("run-1".to_string(), format!("k{i:03}")))
            .collect();
        expected.push(("run-root".to_string(), "root".to_string()));
        assert_eq!(run_keys, expected);

        let mut budgets = ids.clone();
        budgets.push("root".to_string());
        let mut spent = s.budgets_spent_on(&budgets, DAY).await.unwrap();
        spent.sort();
        let expected: Vec<(String, Micros)> = (0..KEYS)
            .map(|i| (format!("k{i:03}"), Micros(i as i64 + 1)))
            .collect();
        assert_eq!(spent, expected, "the root settled nothing itself");
        assert!(s.budgets_spent_on(&budgets, DAY2).await.unwrap().is_empty());
    }

    pub async fn spend_report_groups_ranges_and_ranks(s: S) {
        add_key(&*s, key("k1", "stripe", "run-1", 1_000_000)).await;
        add_key(&*s, key("k2", "openai", "run-1", 1_000_000)).await;
        add_key(&*s, key("k3", "stripe", "run-2", 1_000_000)).await;
        let t0 = Utc.with_ymd_and_hms(2026, 1, 15, 10, 0, 0).unwrap();
        let at = |e: SpendEvent, day: &str, hours: i64| SpendEvent {
            at: t0 + Duration::hours(hours),
            day: day.to_string(),
            ..e
        };
        s.record_spend(&[
            at(event("e1", "k1", "l", DAY, "stripe", 100), DAY, 0),
            at(event("e2", "k2", "l", DAY, "openai", 7), DAY, 1),
            at(event("e3", "k1", "l", DAY2, "stripe", 50), DAY2, 24),
            at(event("e4", "k3", "l", DAY, "stripe", 1_000), DAY, 2),
            at(event("e5", "k2", "l", DAY2, "openai", 0), DAY2, 25),
            at(
                refusal("r1", "k1", "stripe", "daily_cap_exceeded", 40),
                DAY2,
                26,
            ),
            at(refusal("r2", "k3", "stripe", "rate_limited", 2), DAY, 3),
            at(event("e6", "k3", "l", DAY3, "stripe", 9), DAY3, 48),
        ])
        .await
        .unwrap();
        let report = |group_by: &[SpendDimension], top: u32| SpendReportQuery {
            group_by: group_by.to_vec(),
            top,
            ..SpendReportQuery::default()
        };
        let rows = |r: &keycap_control::domain::SpendReport| -> Vec<(Vec<String>, i64, i64, i64)> {
            r.groups
                .iter()
                .map(|g| {
                    let dims = [&g.agent_run_label, &g.key_id, &g.vendor, &g.day]
                        .into_iter()
                        .flatten()
                        .cloned()
                        .collect();
                    (dims, g.total.0, g.calls, g.refused_calls)
                })
                .collect()
        };
        let v = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();

        // By key: largest spend first, with calls and refusals; totals.
        let by_key = s
            .spend_report(&report(&[SpendDimension::Key], 100))
            .await
            .unwrap();
        assert_eq!(
            rows(&by_key),
            vec![
                (v(&["k3"]), 1_009, 2, 2),
                (v(&["k1"]), 150, 2, 40),
                (v(&["k2"]), 7, 2, 0),
            ]
        );
        assert_eq!(
            (
                by_key.total,
                by_key.calls,
                by_key.refused_calls,
                by_key.more
            ),
            (Micros(1_166), 6, 42, false)
        );

        // By vendor and day, over a range: [day 1 10:00, day 3 00:00).
        let mut q = report(&[SpendDimension::Vendor, SpendDimension::Day], 100);
        q.since = Some(t0);
        q.until = Some(Utc.with_ymd_and_hms(2026, 1, 17, 0, 0, 0).unwrap());
        let by_vendor_day = s.spend_report(&q).await.unwrap();
        assert_eq!(
            rows(&by_vendor_day),
            vec![
                (v(&["stripe", DAY]), 1_100, 2, 2),
                (v(&["stripe", DAY2]), 50, 1, 40),
                (v(&["openai", DAY]), 7, 1, 0),
                (v(&["openai", DAY2]), 0, 1, 0),
            ]
        );
        assert_eq!(by_vendor_day.total, Micros(1_157));

        // Top N: the rest is in the totals and flagged.
        let top = s
            .spend_report(&report(&[SpendDimension::RunLabel], 1))
            .await
            .unwrap();
        assert_eq!(rows(&top), vec![(v(&["run-2"]), 1_009, 2, 2)]);
        assert!(top.more);
        assert_eq!(top.total, Micros(1_166));

        // One run, restricted to a vendor, no grouping: totals only.
        let mut q = report(&[], 100);
        q.agent_run_label = Some("run-1".into());
        q.vendors = Some(vec!["stripe".into()]);
        let only = s.spend_report(&q).await.unwrap();
        assert!(only.groups.is_empty());
        assert_eq!(
            (only.total, only.calls, only.refused_calls),
            (Micros(150), 2, 40)
        );

        // Nothing in range: zeros.
        let mut q = report(&[SpendDimension::Key], 100);
        q.since = Some(t0 + Duration::days(100));
        let none = s.spend_report(&q).await.unwrap();
        assert!(none.groups.is_empty());
        assert_eq!((none.total, none.calls), (Micros(0), 0));
    }

    pub async fn audit_filters_by_trace_id_and_context(s: S) {
        add_key(&*s, key("k1", "stripe", "r", 1_000_000)).await;
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let mut events: Vec<SpendEvent> = (0..4)
            .map(|i| event(&format!("e{i}"), "k1", "l1", DAY, "stripe", 1))
            .collect();
        events[0].trace_id = trace.into();
        events[2].trace_id = trace.into();
        events[1].context = BTreeMap::from([("tenant".into(), "acme".into())]);
        events[2].context = BTreeMap::from([("tenant".into(), "globex".into())]);
        events[3].context = BTreeMap::from([("other".into(), "acme".into())]);
        s.record_spend(&events).await.unwrap();
        let ids = |rows: Vec<keycap_control::domain::AuditEntry>| {
            rows.into_iter()
                .map(|r| r.event.event_id)
                .collect::<Vec<_>>()
        };
        let by_trace = AuditQuery {
            trace_id: Some(trace.into()),
            ..AuditQuery::default()
        };
        assert_eq!(ids(s.query_audit(&by_trace).await.unwrap()), ["e2", "e0"]);
        // Untraced entries are out of the trace index, not out of reach.
        let untraced = AuditQuery {
            trace_id: Some(String::new()),
            ..AuditQuery::default()
        };
        assert_eq!(ids(s.query_audit(&untraced).await.unwrap()), ["e3", "e1"]);
        let by_context = AuditQuery {
            context: Some(("tenant".into(), "acme".into())),
            ..AuditQuery::default()
        };
        assert_eq!(ids(s.query_audit(&by_context).await.unwrap()), ["e1"]);
        let both = AuditQuery {
            trace_id: Some(trace.into()),
            context: Some(("tenant".into(), "globex".into())),
            ..AuditQuery::default()
        };
        assert_eq!(ids(s.query_audit(&both).await.unwrap()), ["e2"]);
    }
}

// --- the money invariant as a property -------------------------------------------

/// What one proxy does with its leases in the model.
#[derive(Clone, Debug)]
enum Op {
    /// Ask for (or grow) a lease of `amount`.
    Grant { node: usize, amount: i64 },
    /// Forward a call reserved at `share` percent of what is left in the
    /// node's lease; it costs `percent` of that.
    Spend {
        node: usize,
        share: i64,
        percent: i64,
    },
    /// Deliver the node's queued spend events, maybe twice (a retry).
    Deliver { node: usize, twice: bool },
    /// Return the node's lease with what it spent.
    Return { node: usize },
    /// The node is killed: its lease is never returned; what it queued
    /// stays in its spool and is delivered later (after a restart).
    Crash { node: usize },
    /// Time passes (leases live 60 s). Queued spend may arrive long after
    /// its lease expired, but within the grace an unreturned lease counts
    /// for: a node comes back within it (spend delivered after the grace
    /// is the documented limit).
    Advance { secs: i64 },
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (0..3usize, 1..1_200i64).prop_map(|(node, amount)| Op::Grant { node, amount }),
        (0..3usize, 1..=100i64, 0..=100i64).prop_map(|(node, share, percent)| Op::Spend {
            node,
            share,
            percent
        }),
        (0..3usize, any::<bool>()).prop_map(|(node, twice)| Op::Deliver { node, twice }),
        (0..3usize).prop_map(|node| Op::Return { node }),
        (0..3usize).prop_map(|node| Op::Crash { node }),
        (1..900i64).prop_map(|secs| Op::Advance { secs }),
    ]
}

#[derive(Default)]
struct Node {
    /// Lease id, its total as granted, its expiry, and what calls on it cost.
    lease: Option<(String, i64, DateTime<Utc>, i64)>,
    /// Spend not yet delivered, with the expiry of the lease it drew on.
    queued: Vec<(SpendEvent, DateTime<Utc>)>,
}

const CAP: i64 = 1_000;
/// How soon after its lease expires a killed node delivers its spool, in the
/// model; the store's grace must cover it.
const COMES_BACK_WITHIN: Duration = Duration::minutes(59);

/// A child's cap in the tree model: three of them exceed the parent's.
const CHILD_CAP: i64 = 700;

/// Runs `ops` against the store with three proxies and checks, after every
/// step: the vendor was never charged more than the cap; the store counted
/// every delivered call exactly once; and what it still offers plus what it
/// counted never exceeds the cap. With `tree`, each proxy spends with its
/// own child key (cap `CHILD_CAP`) of one parent key (cap `CAP`), and the
/// cap checked is the parent's, over all three children, as well as each
/// child's own.
async fn run_model(ops: Vec<Op>, tree: bool) {
    let s = SqliteStore::in_memory().await.unwrap();
    s.migrate().await.unwrap();
    add_key(&s, key("k", "stripe", "r", CAP)).await;
    let keys: Vec<String> = if tree {
        for node in 0..3 {
            add_key(&s, child(&format!("k{node}"), "k", CHILD_CAP)).await;
        }
        (0..3).map(|node| format!("k{node}")).collect()
    } else {
        vec!["k".to_string(); 3]
    };
    let mut charged_by = [0i64; 3];
    let mut clock = now();
    let mut nodes: Vec<Node> = (0..3).map(|_| Node::default()).collect();
    let (mut charged, mut delivered, mut n) = (0i64, 0i64, 0u32);
    for op in ops {
        n += 1;
        match op {
            Op::Grant { node, amount } => {
                let id = match &nodes[node].lease {
                    Some((id, ..)) => id.clone(),
                    None => format!("lease-{node}-{n}"),
                };
                let mut req = grant(&format!("g{n}"), &id, &keys[node], DAY, amount, 1);
                req.node_id = format!("node-{node}");
                req.expires_at = clock + Duration::seconds(60);
                match s.grant_lease(&req, clock).await {
                    Ok(g) => {
                        let used = nodes[node].lease.as_ref().map_or(0, |l| l.3);
                        nodes[node].lease = Some((id, g.lease_total.0, g.expires_at, used));
                    }
                    // An expired lease cannot grow: the node starts another.
                    Err(StoreError::Conflict(_)) => nodes[node].lease = None,
                    Err(e) => panic!("grant: {e}"),
                }
            }
            Op::Spend {
                node,
                share,
                percent,
            } => {
                let Some((id, total, expires, used)) = &mut nodes[node].lease else {
                    continue;
                };
                let amount = ((*total - *used) * share / 100).max(1);
                if *expires <= clock || *used + amount > *total {
                    continue;
                }
                let cost = amount * percent / 100;
                *used += cost;
                charged += cost;
                charged_by[node] += cost;
                let mut e = event(&format!("e{n}"), &keys[node], id, DAY, "stripe", cost);
                e.node_id = format!("node-{node}");
                let expires = *expires;
                nodes[node].queued.push((e, expires));
            }
            Op::Deliver { node, twice } => {
                let queued: Vec<SpendEvent> = std::mem::take(&mut nodes[node].queued)
                    .into_iter()
                    .map(|(e, _)| e)
                    .collect();
                s.record_spend(&queued).await.unwrap();
                if twice {
                    assert_eq!(
                        s.record_spend(&queued).await.unwrap().0,
                        0,
                        "a retry applied"
                    );
                }
                delivered += queued.iter().map(|e| e.cost.0).sum::<i64>();
            }
            Op::Return { node } => {
                if !nodes[node].queued.is_empty() {
                    continue;
                }
                if let Some((id, _, _, used)) = nodes[node].lease.take() {
                    s.return_lease(&id, Some(&format!("node-{node}")), Micros(used))
                        .await
                        .unwrap();
                }
            }
            Op::Crash { node } => nodes[node].lease = None,
            Op::Advance { secs } => {
                clock += Duration::seconds(secs);
                // A killed node comes back, and delivers, within 59 minutes
                // of its lease's expiry: inside the store's grace.
                for node in &mut nodes {
                    let (due, wait): (Vec<_>, Vec<_>) = std::mem::take(&mut node.queued)
                        .into_iter()
                        .partition(|(_, expires)| *expires + COMES_BACK_WITHIN <= clock);
                    node.queued = wait;
                    let due: Vec<SpendEvent> = due.into_iter().map(|(e, _)| e).collect();
                    s.record_spend(&due).await.unwrap();
                    delivered += due.iter().map(|e| e.cost.0).sum::<i64>();
                }
            }
        }
        assert!(
            charged <= CAP,
            "the vendor was charged {charged} against a cap of {CAP}"
        );
        // What the nodes may still spend counts too: the vendor could be
        // charged that much more without the store being asked again.
        let spendable: i64 = nodes
            .iter()
            .filter_map(|nd| nd.lease.as_ref())
            .filter(|l| l.2 > clock)
            .map(|l| l.1 - l.3)
            .sum();
        assert!(
            charged + spendable <= CAP,
            "charged {charged} + still spendable {spendable} exceeds the cap {CAP}"
        );
        if tree {
            assert!(
                charged_by.iter().all(|c| *c <= CHILD_CAP),
                "a child was charged more than its cap: {charged_by:?}"
            );
        }
        let mut spent = 0;
        for k in if tree { &keys[..] } else { &keys[..1] } {
            spent += s.key_spend(k, DAY).await.unwrap().spent_day.0;
        }
        assert_eq!(spent, delivered, "delivered spend counted exactly once");
        let mut probe = grant(
            &format!("p{n}"),
            &format!("p{n}"),
            "k",
            DAY,
            CAP * 4,
            CAP * 4,
        );
        probe.expires_at = clock + Duration::seconds(60);
        let offered = s.grant_lease(&probe, clock).await.unwrap();
        assert_eq!(offered.granted, Micros(0), "a probe took budget");
        assert!(
            offered.unleased.0 >= 0 && spent + offered.unleased.0 <= CAP,
            "spent {spent} + still offered {} exceeds the cap {CAP}",
            offered.unleased.0
        );
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
    #[test]
    fn no_sequence_of_grants_spends_returns_and_expiries_breaks_the_cap(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run_model(ops, false));
    }

    #[test]
    fn no_sequence_of_grants_spends_returns_and_expiries_breaks_a_parents_cap(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run_model(ops, true));
    }
}

// --- PostgreSQL: the ledger's day partitions -----------------------------------

/// The names of the audit ledger's partitions, sorted.
async fn audit_partitions(pool: &sqlx::PgPool) -> Vec<String> {
    let mut names: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(c.relname AS TEXT) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = CAST('audit' AS REGCLASS)",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    names.sort();
    names
}

fn partition_name(day: chrono::NaiveDate) -> String {
    format!("audit_p{}", day.format("%Y%m%d"))
}

/// Moves entries `seqs` into `day`'s partition (creating it) as the
/// database owner: entries appended that day, seen days later.
async fn age_entries(
    raw: &Raw,
    pool: &sqlx::PgPool,
    seqs: std::ops::RangeInclusive<i64>,
    day: chrono::NaiveDate,
) {
    sqlx::query("SELECT keycap_audit_partition($1)")
        .bind(day)
        .execute(pool)
        .await
        .unwrap();
    raw.disable_ledger_triggers().await;
    let start = day
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_micros();
    sqlx::query("UPDATE audit SET logged_at = $1 + seq WHERE seq BETWEEN $2 AND $3")
        .bind(start)
        .bind(seqs.start())
        .bind(seqs.end())
        .execute(pool)
        .await
        .unwrap();
    raw.exec("ALTER TABLE audit ENABLE TRIGGER USER")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_retention_drops_only_covered_days_and_verify_holds_after() {
    use keycap_control::ledger::{self, ChainBreak};
    let Some(b) = common::postgres().await else {
        return;
    };
    let s = &*b.store;
    let Raw::Postgres(pool) = b.raw.clone() else {
        unreachable!()
    };
    add_key(s, key("k1", "stripe", "r", 1_000_000_000)).await;
    let events: Vec<SpendEvent> = (0..30)
        .map(|i| event(&format!("e{i}"), "k1", "l1", DAY, "stripe", 1 + i))
        .collect();
    for batch in events.chunks(7) {
        s.record_spend(batch).await.unwrap();
    }
    let all = check_whole_chain(s).await;
    let seq = |i: usize| all[i].seq;

    // Partitions exist for today and the next three days (the database's
    // clock; allow for a midnight passing since).
    let today = Utc::now().date_naive();
    s.ensure_audit_partitions().await.unwrap();
    let names = audit_partitions(&pool).await;
    for d in 0..3 {
        let day = today + chrono::Days::new(d);
        assert!(names.contains(&partition_name(day)), "{day} in {names:?}");
    }
    let old = today - chrono::Days::new(10);
    let older_kept = today - chrono::Days::new(9);
    age_entries(&b.raw, &pool, seq(0)..=seq(9), old).await;
    age_entries(&b.raw, &pool, seq(10)..=seq(19), older_kept).await;
    assert!(ledger::verify(s, None, &[]).await.unwrap().ok());
    let before = today - chrono::Days::new(5);

    // Nothing covered (no checkpoint, no export): nothing goes.
    assert!(s.drop_audit_partitions(before, 0).await.unwrap().is_empty());
    // Covered through the 15th entry: the first day (entries 1-10) goes;
    // the second (11-20) is not wholly covered, and retention stops there.
    let dropped = s.drop_audit_partitions(before, seq(14)).await.unwrap();
    assert_eq!(dropped, [partition_name(old)]);
    assert!(!audit_partitions(&pool).await.contains(&partition_name(old)));
    let r = s.ledger_retention().await.unwrap();
    assert_eq!(
        (r.dropped_through, Some(r.dropped_hash)),
        (seq(9), all[9].hash)
    );
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 20);

    // The kept ledger starts with the day after the dropped one. An event
    // whose entry could lie in the dropped day (dated then, or within
    // `MAX_AHEAD` after) cannot be told from a resend: it is refused, and
    // nothing of its batch is applied.
    let kept_from: i64 = sqlx::query_scalar("SELECT kept_from FROM ledger_head")
        .fetch_one(&pool)
        .await
        .unwrap();
    let kept_day = older_kept.and_hms_opt(0, 0, 0).unwrap().and_utc();
    assert_eq!(kept_from, kept_day.timestamp_micros());
    let late = |id: &str, at: DateTime<Utc>| SpendEvent {
        at,
        ..event(id, "k1", "l1", DAY, "stripe", 5)
    };
    let refused = s
        .record_spend(&[
            late("late-new", Utc::now()),
            late("late-old", kept_day - Duration::hours(12)),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, keycap_control::store::StoreError::Invalid(m) if m.contains("late-old")),
        "{refused}"
    );
    let edge = s
        .record_spend(&[late("late-edge", kept_day + Duration::minutes(30))])
        .await
        .unwrap_err();
    assert!(
        matches!(edge, keycap_control::store::StoreError::Invalid(_)),
        "within MAX_AHEAD of the dropped day"
    );
    let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM audit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 20, "nothing of either batch applied");

    // Verify starts after the last dropped entry, from its kept hash, and
    // still reaches a signed checkpoint of the head.
    let (head_seq, head_hash) = s.ledger_head().await.unwrap();
    let key = ledger::checkpoint::new_signing_key();
    let cp = ledger::Checkpoint::sign(&key, head_seq, head_hash, Utc::now());
    s.insert_checkpoint(&cp).await.unwrap();
    let trusted = [key.verifying_key().to_bytes()];
    let v = ledger::verify_to_checkpoint(s, None, &trusted, None)
        .await
        .unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!((v.checked, v.checkpoint_seq), (20, Some(head_seq)));
    // Asking for earlier entries starts at the first one kept.
    let v = ledger::verify(s, Some(1), &[]).await.unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.checked, 20);

    // The kept partitions still refuse changes.
    let delete = b
        .raw
        .exec(&format!("DELETE FROM audit WHERE seq = {}", seq(12)))
        .await;
    assert!(delete.unwrap_err().contains("append-only"));
    let truncate = b
        .raw
        .exec(&format!("TRUNCATE {}", partition_name(older_kept)))
        .await;
    assert!(truncate.unwrap_err().contains("append-only"));

    // Everything covered: the second old day goes; today's is not past
    // retention and stays.
    let dropped = s.drop_audit_partitions(before, head_seq).await.unwrap();
    assert_eq!(dropped, [partition_name(older_kept)]);
    let v = ledger::verify_to_checkpoint(s, None, &trusted, None)
        .await
        .unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.checked, 10);
    assert_eq!(s.ledger_retention().await.unwrap().dropped_through, seq(19));

    // An edit of the first entry kept is still named.
    b.raw.disable_ledger_triggers().await;
    b.raw
        .exec(&format!(
            "UPDATE audit SET cost = cost + 1 WHERE seq = {}",
            seq(20)
        ))
        .await
        .unwrap();
    let broken = ledger::verify(s, None, &[]).await.unwrap().broken.unwrap();
    assert_eq!(
        (broken.seq, broken.reason),
        (seq(20), ChainBreak::HashMismatch)
    );
}

/// The migration that partitions the ledger keeps the rows written before
/// it, their chain, and the append-only triggers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_partitioning_keeps_the_ledger_written_before_it() {
    use keycap_control::ledger;
    let Some(db) = keycap_tests::pg::fresh_database_or_skip()
        .await
        .expect("a PostgreSQL database")
    else {
        return;
    };
    let store = PgStore::connect(&db.url).await.unwrap();
    let mut before = sqlx::migrate!("./migrations/postgres");
    before.migrations = std::borrow::Cow::Owned(
        before
            .migrations
            .iter()
            // Every migration but the partitioning ones (12, 13), so that
            // today's code can write the rows; the partitioning then copies
            // whatever columns the table has by then. Nor 27, which
            // rebuilds indexes the partitioning creates.
            .filter(|m| !(12..=13).contains(&m.version) && m.version != 27)
            .cloned()
            .collect(),
    );
    before.run(store.pool()).await.unwrap();
    let s: &dyn Store = &store;
    let raw = Raw::Postgres(store.pool().clone());
    // Today's dedupe lookup names `logged_at`, which the partitioning
    // brings: a stand-in while the old rows are written, dropped before.
    raw.exec("ALTER TABLE audit ADD COLUMN logged_at BIGINT NOT NULL DEFAULT 0")
        .await
        .unwrap();
    add_key(s, key("k1", "stripe", "r", 1_000_000_000)).await;
    let events: Vec<SpendEvent> = (0..25)
        .map(|i| event(&format!("e{i}"), "k1", "l1", DAY, "stripe", 1 + i))
        .collect();
    for batch in events.chunks(10) {
        s.record_spend(batch).await.unwrap();
    }
    raw.exec("ALTER TABLE audit DROP COLUMN logged_at")
        .await
        .unwrap();
    let old = check_whole_chain(s).await;
    let head = s.ledger_head().await.unwrap();

    s.migrate().await.unwrap();
    let partitioned: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_partitioned_table WHERE partrelid = CAST('audit' AS REGCLASS))",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert!(partitioned);
    assert_eq!(check_whole_chain(s).await, old, "every row kept as it was");
    assert_eq!(s.ledger_head().await.unwrap(), head);
    let delete = raw.exec("DELETE FROM audit").await;
    assert!(delete.unwrap_err().contains("append-only"));
    assert!(raw
        .exec("TRUNCATE audit")
        .await
        .unwrap_err()
        .contains("append-only"));
    // Appending goes on where it stopped, and dedupe still sees old rows.
    let more: Vec<SpendEvent> = (20..30)
        .map(|i| event(&format!("e{i}"), "k1", "l1", DAY, "stripe", 1 + i))
        .collect();
    assert_eq!(s.record_spend(&more).await.unwrap(), (5, 5));
    let v = ledger::verify(s, None, &[]).await.unwrap();
    assert!(v.ok(), "{v:?}");
    assert_eq!(v.checked, 30);
}

/// Two replicas on one database, each with appends in flight at once
/// (`ledger::pipeline`): an append chained ahead of the lock commits only
/// onto the head it chained onto, so every event counts once, in one
/// chain, whichever replica and whichever path took it.
/// Waits until `n` sessions of the database match `condition` (a
/// `pg_stat_activity` condition), failing with `what` after 30 s.
async fn until_sessions(pool: &sqlx::PgPool, condition: &str, n: i64, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let matching: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND {condition}"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        if matching >= n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Starts an append of `events` on `store` and waits until it is the
/// `n`th session waiting for a lock (the ledger head's).
async fn queued_append(
    store: &Arc<PgStore>,
    events: Vec<SpendEvent>,
    n: i64,
    what: &str,
) -> tokio::task::JoinHandle<keycap_control::store::StoreResult<(u32, u32)>> {
    let s = store.clone();
    let task = tokio::spawn(async move { s.record_spend(&events).await });
    until_sessions(store.pool(), "wait_event_type = 'Lock'", n, what).await;
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_appending_ahead_of_the_lock_count_each_event_once() {
    use futures_util::FutureExt;
    let Some(db) = keycap_tests::pg::fresh_database_or_skip()
        .await
        .expect("a PostgreSQL database")
    else {
        return;
    };
    let a = PgStore::connect(&db.url).await.unwrap();
    a.migrate().await.unwrap();
    let b = PgStore::connect(&db.url).await.unwrap();
    add_key(&a, key("k1", "stripe", "r", 1_000_000_000)).await;
    add_key(&a, key("k2", "openai", "r", 1_000_000_000)).await;
    let batch = |n: usize| -> Vec<SpendEvent> {
        (0..40)
            .map(|i| {
                let k = if i % 2 == 0 { "k1" } else { "k2" };
                event(&format!("b{n}-e{i}"), k, "l1", DAY, "stripe", 1 + i as i64)
            })
            .collect()
    };

    // One replica. A first batch is held at the ledger head's lock (taken
    // here, as another replica's append would), so it is surely in flight
    // when three more start: those chain behind it, write ahead of the
    // lock, and commit once it has. The last resends batch 1 while batch
    // 1 is in flight.
    let a = Arc::new(a);
    let b = Arc::new(b);
    let hold_head = || async {
        let mut holder = a.pool().begin().await.unwrap();
        sqlx::query("SELECT seq FROM ledger_head WHERE id = 1 FOR UPDATE")
            .execute(&mut *holder)
            .await
            .unwrap();
        holder
    };
    let holder = hold_head().await;
    let held = queued_append(&a, batch(0), 1, "the first batch never waited for the head").await;
    let behind: Vec<Vec<SpendEvent>> = vec![batch(1), batch(2), batch(1)];
    let mut behind_done = Box::pin(futures_util::future::join_all(
        behind.iter().map(|batch| a.record_spend(batch)),
    ));
    // Polled once: each takes its place in line behind the held batch.
    assert!((&mut behind_done).now_or_never().is_none());
    holder.commit().await.unwrap();
    assert_eq!(held.await.unwrap().unwrap(), (40, 0));
    let answers = behind_done.await;
    let applied: u32 = answers.iter().map(|r| r.as_ref().unwrap().0).sum();
    assert_eq!(applied, 2 * 40, "batch 1 counted once: {answers:?}");
    let (ahead, missed) = a.pipelined_appends();
    assert!(
        ahead >= 1,
        "batches behind one in flight commit ahead of the lock"
    );
    assert_eq!(missed, 0, "alone, no replica appends in between");

    // Another replica's entries committed below the head an append ahead
    // chains onto, after that append started: B's batch 30 waits for the
    // head first, then A's batch 31; A's batch 32, which also carries
    // batch 30's events, starts behind 31 and gets as far as it can
    // before 31 has chained. The lock goes to 30, then 31, which chains
    // onto 30's entries, so 32 chains onto a head that holds them and
    // must find them stored (looked up before 31 had chained, they were
    // not yet, and were stored twice).
    let holder = hold_head().await;
    let other = queued_append(&b, batch(30), 1, "B's batch never waited for the head").await;
    let locked = queued_append(&a, batch(31), 2, "A's batch never waited for the head").await;
    let both: Vec<SpendEvent> = batch(32).into_iter().chain(batch(30)).collect();
    let ahead = tokio::spawn({
        let a = a.clone();
        async move { a.record_spend(&both).await }
    });
    // Batch 32 has run every statement it runs before it waits for 31 to
    // chain: its session idles in its transaction.
    until_sessions(
        a.pool(),
        "state = 'idle in transaction' AND query NOT LIKE '%FOR UPDATE%'",
        1,
        "batch 32 never waited for batch 31",
    )
    .await;
    holder.commit().await.unwrap();
    assert_eq!(other.await.unwrap().unwrap(), (40, 0));
    assert_eq!(locked.await.unwrap().unwrap(), (40, 0));
    assert_eq!(
        ahead.await.unwrap().unwrap(),
        (40, 40),
        "batch 30's events, stored by B, count once"
    );
    let stored_twice: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT event_id FROM audit GROUP BY event_id \
         HAVING COUNT(*) > 1) AS d",
    )
    .fetch_one(a.pool())
    .await
    .unwrap();
    assert_eq!(stored_twice, 0);

    // A batch chained onto a head another replica moves first: replica A's
    // batch 27 waits for the head, then B's batch 28 does; A's batch 29
    // chains behind 27 and writes ahead. The lock goes to the waiters in
    // turn, 27, then 28, so 29 finds the head where 28 left it, not where it
    // chained on: it starts over holding the lock, and every event counts
    // once.
    let holder = hold_head().await;
    let first = queued_append(&a, batch(27), 1, "A's batch never waited for the head").await;
    let between = queued_append(&b, batch(28), 2, "B's batch never waited for the head").await;
    let last = batch(29);
    let mut chained = Box::pin(a.record_spend(&last));
    assert!((&mut chained).now_or_never().is_none());
    holder.commit().await.unwrap();
    assert_eq!(first.await.unwrap().unwrap(), (40, 0));
    assert_eq!(between.await.unwrap().unwrap(), (40, 0));
    assert_eq!(chained.await.unwrap(), (40, 0));
    let (_, missed) = a.pipelined_appends();
    assert_eq!(missed, 1, "batch 29's head proved stale");
    let v = keycap_control::ledger::verify(&*a, None, &[])
        .await
        .unwrap();
    assert!(v.ok(), "{v:?}");

    // Two replicas: every batch is sent to both, four at a time each, so
    // their appends meet, and ones chained onto a stale head start over.
    let rest: Vec<Vec<SpendEvent>> = (3..27).map(batch).collect();
    async fn run(s: &PgStore, order: Vec<&Vec<SpendEvent>>) -> u32 {
        let mut applied = 0;
        for four in order.chunks(4) {
            let answers =
                futures_util::future::join_all(four.iter().map(|batch| s.record_spend(batch)))
                    .await;
            applied += answers.into_iter().map(|r| r.unwrap().0).sum::<u32>();
        }
        applied
    }
    let (on_a, on_b) = tokio::join!(
        run(&a, rest.iter().collect()),
        run(&b, rest.iter().rev().collect())
    );
    assert_eq!(
        on_a + on_b,
        24 * 40,
        "each event applied once across replicas"
    );
    let all = check_whole_chain(&*a).await;
    assert_eq!(all.len(), 33 * 40);
    assert!(
        all.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "seqs are consecutive"
    );
    let spent: i64 = (0..33).flat_map(batch).map(|e| e.cost.0).sum();
    let k1 = a.key_spend("k1", DAY).await.unwrap();
    let k2 = a.key_spend("k2", DAY).await.unwrap();
    assert_eq!(k1.spent_day.0 + k2.spent_day.0, spent);
    assert_eq!(k1.calls_day + k2.calls_day, 33 * 40);
}

/// Every lookup of the audit ledger by a key, run label or trace id is
/// served by that column's index (which holds the id's hash, migration
/// 0027), whatever the partition:
/// with sequential scans priced out, the plan of each condition the store
/// writes (`Dialect::indexed_text_eq`) reads the index it is meant to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_id_lookups_read_their_hashed_indexes() {
    use keycap_control::store::{dialect::Pg, Dialect};
    let Some(b) = common::postgres().await else {
        return;
    };
    let s = &*b.store;
    let Raw::Postgres(pool) = b.raw.clone() else {
        unreachable!()
    };
    add_key(s, key("k1", "stripe", "run-a", 1_000_000_000)).await;
    add_key(s, key("k2", "stripe", "run-b", 1_000_000_000)).await;
    let events: Vec<SpendEvent> = (0..200)
        .map(|i| SpendEvent {
            trace_id: if i % 2 == 0 {
                format!("{i:032x}")
            } else {
                String::new()
            },
            ..event(
                &format!("e{i}"),
                ["k1", "k2"][i % 2],
                "l1",
                DAY,
                "stripe",
                1,
            )
        })
        .collect();
    assert_eq!(s.record_spend(&events).await.unwrap(), (200, 0));

    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql("ANALYZE audit; SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    // (the query around a condition, its column, the value, the index)
    let newest = "SELECT seq FROM audit WHERE {} ORDER BY seq DESC LIMIT 50";
    let traced = "SELECT seq FROM audit WHERE {} AND trace_id <> '' ORDER BY seq DESC LIMIT 50";
    let trace = format!("'{:032x}'", 4);
    let cases = [
        (newest, "key_id", "'k1'", "audit_key_id", 50),
        (
            newest,
            "agent_run_label",
            "'run-b'",
            "audit_agent_run_label",
            50,
        ),
        (traced, "trace_id", trace.as_str(), "audit_trace_id", 1),
    ];
    for (query, column, value, index, found) in cases {
        let sql = query.replace("{}", &Pg::indexed_text_eq(column, value));
        let plan: serde_json::Value = sqlx::query_scalar(&format!("EXPLAIN (FORMAT JSON) {sql}"))
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        let mut used = Vec::new();
        index_names(&plan, &mut used);
        let mut parents = Vec::new();
        for (name, cond) in &used {
            let parent: Option<String> = sqlx::query_scalar(
                "SELECT p.relname::text FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
                 WHERE i.inhrelid = CAST($1 AS REGCLASS)",
            )
            .bind(name)
            .fetch_optional(&mut *conn)
            .await
            .unwrap();
            parents.push((parent.unwrap_or_else(|| name.clone()), cond.clone()));
        }
        // Found by the hash: the index holds it, not the text.
        assert!(
            parents
                .iter()
                .any(|(p, cond)| p == index && cond.starts_with("(hashtextextended(")),
            "{sql}: reads {parents:?}, not {index} by the hash\n{plan:#}"
        );
        // It finds what the plain condition on the text finds.
        let plain = query.replace("{}", &format!("{column} = {value}"));
        for q in [&sql, &plain] {
            let hits: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM ({q}) AS q"))
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            assert_eq!(hits, found, "{q}");
        }
    }
}

/// The indexes a JSON plan reads, each with the condition it reads it by.
fn index_names(plan: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match plan {
        serde_json::Value::Object(node) => {
            if let Some(serde_json::Value::String(name)) = node.get("Index Name") {
                let cond = node
                    .get("Index Cond")
                    .and_then(|c| c.as_str())
                    .unwrap_or("");
                out.push((name.clone(), cond.to_string()));
            }
            node.values().for_each(|v| index_names(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| index_names(v, out)),
        _ => {}
    }
}
