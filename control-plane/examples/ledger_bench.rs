//! Audit ledger benchmark: appends N spend events in batches through the
//! store (chain included), then verifies the whole chain, and prints
//! entries per second for both. SQLite in a temporary file, or PostgreSQL
//! with `--postgres URL`.
//!
//!     cargo run --release -p keycap-control --example ledger_bench -- [N] [--postgres URL]
//!
//! `BENCH_SMOKE=1` appends 2,000 entries: does it still run? Goal for
//! verify: at least 1,000,000 entries per minute.

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::{Duration, Utc};
use keycap_control::domain::{
    KeyLimits, Outcome, Profile, SpendEvent, VaultKey, Vendor, VendorName,
};
use keycap_control::ledger;
use keycap_control::store::{PgStore, SqliteStore, Store, VendorWrite};
use keycap_proto::Micros;
use sha2::{Digest, Sha256};

const BATCH: usize = 500;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let smoke = std::env::var_os("BENCH_SMOKE").is_some();
    let n: usize = match args.first().filter(|a| !a.starts_with("--")) {
        Some(n) => n.parse()?,
        None if smoke => 2_000,
        None => 1_000_000,
    };
    let pg = args
        .iter()
        .position(|a| a == "--postgres")
        .and_then(|i| args.get(i + 1));
    let dir = tempfile::tempdir()?;
    let (store, backend): (Box<dyn Store>, &str) = match pg {
        Some(url) => (Box::new(PgStore::connect(url).await?), "postgres"),
        None => {
            let path = dir.path().join("ledger.db");
            let path = path.to_str().expect("utf-8 path");
            (Box::new(SqliteStore::connect(path).await?), "sqlite")
        }
    };
    store.migrate().await?;
    let now = Utc::now();
    store
        .put_vendor(VendorWrite {
            vendor: Vendor {
                name: VendorName::parse("stripe")?,
                profile: Profile::Stripe,
                base_url: "https://stripe.example.com".into(),
                currency_rates: BTreeMap::new(),
                prices: "{}".into(),
                forward_trace_context: false,
                created_at: now,
                updated_at: now,
                credential_set_at: now,
                rotate_after: None,
            },
            sealed_credential: Some(b"sealed".to_vec()),
            credential_version: 1,
        })
        .await?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let key_id = format!("key_{run}");
    store
        .insert_key(&VaultKey {
            id: key_id.clone(),
            key_hash: Sha256::digest(run.as_bytes()).into(),
            key_prefix: "kc_bench".into(),
            vendor: VendorName::parse("stripe")?,
            allowed_endpoints: vec!["POST /v1/payment_intents".into()],
            daily_cap: Micros(i64::MAX / 4),
            per_call_cap: None,
            lifetime_cap: None,
            expires_at: now + Duration::days(1),
            agent_run_label: "bench/1".into(),
            metadata: BTreeMap::new(),
            created_at: now,
            revoked_at: None,
            limits: KeyLimits::default(),
            parent_id: None,
            approval_above: None,
            roll: Default::default(),
            observe_ceiling: None,
        })
        .await?;
    let day = now.format("%Y-%m-%d").to_string();
    let event = |i: usize| SpendEvent {
        event_id: format!("{run}-{i}"),
        lease_id: "lease-bench".into(),
        key_id: key_id.clone(),
        day: day.clone(),
        vendor: "stripe".into(),
        method: "POST".into(),
        path: "/v1/payment_intents".into(),
        upstream_status: 200,
        reserved: Micros(1_000_000),
        cost: Micros(1_000_000),
        outcome: Outcome::Settled,
        at: now,
        node_id: "bench-node".into(),
        detail_json: r#"{"amount":100,"currency":"usd"}"#.into(),
        trace_id: format!("{:032x}", i),
        context: BTreeMap::from([("tenant".into(), "acme".into())]),
        refusal_reason: String::new(),
        refused_calls: 0,
        credential_version: 0,
        would_refuse: String::new(),
    };

    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let batch: Vec<SpendEvent> = (i..(i + BATCH).min(n)).map(event).collect();
        store.record_spend(&batch).await?;
        i += batch.len();
    }
    let append = started.elapsed();
    println!(
        "{backend}: appended {n} entries in {:.2} s: {:.0} entries/s (batches of {BATCH}, chain included)",
        append.as_secs_f64(),
        n as f64 / append.as_secs_f64()
    );

    let started = Instant::now();
    let v = ledger::verify(&*store, None, &[]).await?;
    let took = started.elapsed();
    anyhow::ensure!(v.ok(), "the chain does not verify: {:?}", v.broken);
    let total = v.checked + v.legacy;
    println!(
        "{backend}: verified {total} entries in {:.2} s: {:.0} entries/min (goal >= 1,000,000)",
        took.as_secs_f64(),
        total as f64 * 60.0 / took.as_secs_f64()
    );
    Ok(())
}
