//! Exporting and verifying a ledger of a million entries: each reads the
//! ledger a page at a time and lets go of a page before the next, so the
//! memory it holds stays flat whatever the ledger's length. (That an export
//! verifies on its own, and that verify names what is broken, is tested in
//! the store suite and end to end; here the entries only need to be many.)

use std::sync::Arc;
use std::time::Instant;

use futures_util::TryStreamExt;
use keycap_control::ledger::export::{self, Format};
use keycap_control::store::{SqliteStore, Store};

const ENTRIES: i64 = 1_000_000;
/// Most the process may grow while the export streams: SQLite's page
/// cache (64 MiB a connection, `store::dialect`) fills as the table is
/// read, plus what the export itself holds (about a page of records).
/// Buffering the export (about 700 MB of JSON Lines) or its rows would pass
/// it many times over.
const MAX_GROWTH_BYTES: u64 = 96 << 20;
/// Most it may grow over the second half of the export, once the page
/// cache is full: flat memory means about nothing.
const MAX_LATE_GROWTH_BYTES: u64 = 16 << 20;

/// A memory figure of this process from /proc/self/status, in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    kb * 1024
}

/// The process's resident memory.
fn rss_bytes() -> u64 {
    status_bytes("VmRSS")
}

/// Writes `ENTRIES` ledger entries straight into the database, in one
/// statement (SQLite generates the rows), as an upgrade or a long-running
/// deployment would have left them: no proxy needed to make them. With
/// `hashes` they carry random chain fields (an export copies them as they
/// are); without, they are entries from before the ledger was chained,
/// which verify reads and counts.
async fn fill(store: &SqliteStore, hashes: bool) {
    let chain = if hashes {
        "randomblob(32), randomblob(32)"
    } else {
        "NULL, NULL"
    };
    let sql = format!(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ENTRIES}) \
         INSERT INTO audit (seq, event_id, key_id, agent_run_label, vendor, method, path, \
         upstream_status, reserved, cost, outcome, at, node_id, lease_id, day, detail_json, \
         trace_id, context, prev_hash, hash, refusal_reason, refused_calls) \
         SELECT i, 'ev_' || printf('%08d', i), 'key_' || (i % 97), 'run/' || (i % 13), \
         'openai', 'POST', '/v1/chat/completions', 200, 2000, 1500 + (i % 500), 'settled', \
         1796000000000000 + i * 1000, 'node-1', 'lease_' || (i % 101), '2026-12-01', \
         '{{\"model\":\"gpt-4o-mini\",\"input_tokens\":812,\"output_tokens\":95}}', '', \
         '{{\"tenant\":\"acme\"}}', {chain}, '', 0 FROM n"
    );
    let mut tx = store.pool().begin().await.unwrap();
    // An export reads by seq only; the other indexes would only slow the
    // filling down.
    for index in [
        "audit_key_id",
        "audit_agent_run_label",
        "audit_vendor",
        "audit_trace_id",
        "audit_refusal_reason",
    ] {
        sqlx::query(&format!("DROP INDEX {index}"))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    sqlx::query(&sql).execute(&mut *tx).await.unwrap();
    sqlx::query("UPDATE ledger_head SET seq = $1 WHERE id = 1")
        .bind(ENTRIES)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_entry_export_streams_in_flat_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keycap.db");
    let store = SqliteStore::connect(path.to_str().unwrap()).await.unwrap();
    store.migrate().await.unwrap();
    let started = Instant::now();
    fill(&store, true).await;
    let filled = started.elapsed();

    let store: Arc<dyn Store> = Arc::new(store);
    let mut pieces = Box::pin(export::stream(store, Format::Jsonl, None, None));
    let before = rss_bytes();
    let mut peak = before;
    let mut halfway = None;
    let (mut records, mut bytes, mut largest_piece, mut n) = (0i64, 0u64, 0usize, 0u64);
    let mut last_line = String::new();
    let started = Instant::now();
    // Consumed a piece at a time, as the REST body or the gRPC stream
    // hands it to the client.
    while let Some(piece) = pieces.try_next().await.unwrap() {
        records += piece.matches('\n').count() as i64;
        bytes += piece.len() as u64;
        largest_piece = largest_piece.max(piece.len());
        n += 1;
        if n % 25 == 0 {
            peak = peak.max(rss_bytes());
        }
        if halfway.is_none() && records >= ENTRIES / 2 {
            halfway = Some(peak.max(rss_bytes()));
        }
        if let Some(end) = piece.strip_suffix('\n') {
            let start = end.rfind('\n').map_or(0, |i| i + 1);
            last_line = end[start..].to_string();
        }
    }
    peak = peak.max(rss_bytes());
    let streamed = started.elapsed();
    let growth = peak.saturating_sub(before);
    let late_growth = peak.saturating_sub(halfway.unwrap_or(before));
    println!(
        "export of {records} entries: {bytes} bytes in {n} pieces (largest {largest_piece}), \
         filled in {filled:?}, streamed in {streamed:?}; RSS {} MiB before, peak growth {} KiB, \
         growth over the second half {} KiB",
        before >> 20,
        growth >> 10,
        late_growth >> 10,
    );
    assert_eq!(records, ENTRIES);
    let last: serde_json::Value = serde_json::from_str(&last_line).unwrap();
    assert_eq!(last["seq"], ENTRIES);
    assert_eq!(last["hash"].as_str().map(str::len), Some(64));
    assert!(
        largest_piece < 4 << 20,
        "a piece is a page of records: {largest_piece} bytes"
    );
    assert!(
        growth < MAX_GROWTH_BYTES,
        "the export grew the process by {} MiB while streaming {} MiB",
        growth >> 20,
        bytes >> 20
    );
    assert!(
        late_growth < MAX_LATE_GROWTH_BYTES,
        "the export's second half grew the process by {} KiB",
        late_growth >> 10
    );
}

/// The process's peak resident memory since `reset_peak_rss`.
fn peak_rss_bytes() -> u64 {
    status_bytes("VmHWM")
}

/// Starts the peak resident memory over from the current one.
fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("/proc/self/clear_refs");
}

/// Most the process may grow while verify runs: a page of entries (5,000,
/// `ledger::verify`) decoded, and the database driver's buffers. Holding
/// the ledger's entries (about 700 MB as exported) would pass it many times
/// over.
const MAX_VERIFY_GROWTH_BYTES: u64 = 48 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_entry_verify_reads_in_flat_memory() {
    // In memory, so the whole database is resident before verify starts:
    // what the process grows by while verify runs is verify's own, not a
    // page cache filling.
    let store = SqliteStore::in_memory().await.unwrap();
    store.migrate().await.unwrap();
    fill(&store, false).await;
    let store: Arc<dyn Store> = Arc::new(store);

    reset_peak_rss();
    let before = rss_bytes();
    let started = Instant::now();
    let v = keycap_control::ledger::verify(&*store, None, &[])
        .await
        .unwrap();
    let took = started.elapsed();
    let growth = peak_rss_bytes().saturating_sub(before);
    println!(
        "verify of {ENTRIES} entries in {took:?}: RSS {} MiB before, peak growth {} KiB",
        before >> 20,
        growth >> 10,
    );
    assert!(v.ok(), "{v:?}");
    assert_eq!((v.legacy, v.checked), (ENTRIES as u64, 0));
    assert!(
        growth < MAX_VERIFY_GROWTH_BYTES,
        "verify grew the process by {} MiB",
        growth >> 20
    );
}
