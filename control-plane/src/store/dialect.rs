//! What differs between the two databases `SqlStore` runs on, and nothing
//! else: how to connect and migrate, how a write transaction begins, which
//! rows and tables a transaction locks, the two-argument maximum, and the
//! change feed. Every query is written once in `sql_store`, in SQL both
//! databases read (`$N` placeholders, `CAST(.. AS BIGINT)`, `IN (..)`
//! lists, `CASE` instead of `FILTER`).
//!
//! * PostgreSQL (production, shared by every control-plane replica):
//!   replicas are stateless over the database, so every rule that must hold
//!   across them is enforced by row and table locks inside one READ
//!   COMMITTED transaction. A lease grant locks its key and every ancestor
//!   (in id order) and the lease row before it reads the usage; a key
//!   insert holds its vendor and parent rows `FOR SHARE` while a vendor
//!   delete or key revocation holds them `FOR UPDATE`; change-log appends
//!   take `LOCK TABLE change_log IN EXCLUSIVE MODE` last before commit, so
//!   versions commit in increasing order and a follower reading
//!   `version > after` never skips one. Inserting into `change_log`
//!   notifies `CHANGE_CHANNEL`.
//! * SQLite (the embedded single-node default): one file in WAL mode,
//!   foreign keys on, a busy timeout so a second process waits rather than
//!   fails. Every write runs in a `BEGIN IMMEDIATE` transaction taken under
//!   an in-process mutex: writes are serial, which is what makes a lease
//!   grant's read-check-write atomic here (SQLite has no row locks), and the
//!   mutex queues writers fairly instead of leaving them to SQLite's
//!   busy-retry loop. Reads go straight to the pool and never wait for
//!   writers (WAL).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Database, Pool, Postgres, Sqlite, Transaction};
use tokio::sync::{Mutex, MutexGuard};

use super::sql::{audit_insert, spend_chunks, to_json, ChainedEntry, Statement};
use super::StoreResult;

/// The channel notified (empty payload) whenever the change log grows.
pub const CHANGE_CHANNEL: &str = "keycap_changes";

/// A write transaction; on SQLite it also holds the write mutex until it is
/// committed or dropped (fields drop in order: the transaction first, then
/// the guard).
pub struct WriteTx<'a, DB: Database> {
    tx: Transaction<'static, DB>,
    _serial: Option<MutexGuard<'a, ()>>,
}

impl<DB: Database> WriteTx<'_, DB> {
    pub fn conn(&mut self) -> &mut DB::Connection {
        &mut self.tx
    }

    pub async fn commit(self) -> StoreResult<()> {
        self.tx.commit().await?;
        Ok(())
    }
}

#[async_trait]
pub trait Dialect: Send + Sync + 'static {
    type Db: Database;
    /// Whether the database locks rows (`FOR UPDATE`); without them a write
    /// transaction is serial as a whole.
    const ROW_LOCKS: bool;
    /// Suffix of a `SELECT` that locks the rows it reads for writing.
    const FOR_UPDATE: &'static str;
    /// Whether a statement of many arguments is written with plain `?`
    /// placeholders (`sql::Statement::anonymous`) rather than `$N`.
    const PLAIN_PLACEHOLDERS: bool;
    /// Suffix of a `SELECT` that keeps the rows it reads from changing.
    const FOR_SHARE: &'static str;
    /// Suffix of a `SELECT` that locks the rows it reads for writing and
    /// passes over rows another transaction has locked (a work queue).
    const SKIP_LOCKED: &'static str;
    /// The scalar maximum of two values.
    const GREATEST: &'static str;
    /// The database's clock in microseconds since the epoch (UTC): the
    /// clock an audit entry's `logged_at` is taken from.
    const CLOCK_MICROS: &'static str;

    /// Applies the embedded migrations. Idempotent.
    async fn migrate(&self, pool: &Pool<Self::Db>) -> StoreResult<()>;
    /// Begins a transaction that will write.
    async fn begin_write<'a>(&'a self, pool: &Pool<Self::Db>)
        -> StoreResult<WriteTx<'a, Self::Db>>;
    /// The statement that locks `table` in `mode` until commit, if the
    /// database has table locks.
    fn lock_table(table: &str, mode: &str) -> Option<String>;
    /// The text value of key `key` (an expression, e.g. a placeholder) of
    /// the JSON object in `column`; NULL when absent.
    fn json_text(column: &str, key: &str) -> String;
    /// `column = value` for an audit column looked up by id (`event_id`,
    /// `key_id`, `agent_run_label`, `trace_id`), `value` an expression
    /// (e.g. a placeholder), written so the column's index serves it.
    fn indexed_text_eq(column: &str, value: &str) -> String;
    /// How many rows a statement changed.
    fn rows_affected(done: &<Self::Db as Database>::QueryResult) -> u64;
    /// See `Store::change_feed`.
    fn change_feed(&self, pool: &Pool<Self::Db>) -> Option<tokio::sync::watch::Receiver<u64>>;
    /// Which of `ids` are already in the audit ledger, looking only at
    /// entries logged within `logged` (micros, `CLOCK_MICROS`'s clock): on
    /// PostgreSQL the day partitions outside it are not read at all.
    async fn known_event_ids(
        conn: &mut <Self::Db as Database>::Connection,
        ids: &[&str],
        logged: std::ops::RangeInclusive<i64>,
    ) -> StoreResult<Vec<String>>;
    /// Writes a batch of chained entries into the audit ledger, in one go
    /// where the database has a bulk path. The caller holds the ledger
    /// head and has already dropped every event stored before.
    async fn append_audit(
        conn: &mut <Self::Db as Database>::Connection,
        entries: &[ChainedEntry<'_>],
    ) -> StoreResult<()>;
    /// See `Store::ensure_audit_partitions`.
    async fn ensure_audit_partitions(pool: &Pool<Self::Db>) -> StoreResult<()>;
    /// The audit ledger's day partitions, oldest first (none where the
    /// ledger is one table).
    async fn audit_partitions(pool: &Pool<Self::Db>) -> StoreResult<Vec<AuditPartition>>;
    /// Detaches and drops one partition of `audit_partitions`.
    async fn drop_audit_partition(
        conn: &mut <Self::Db as Database>::Connection,
        partition: &AuditPartition,
    ) -> StoreResult<()>;
}

/// How long dropping a day's partition waits for the ledger's table lock
/// before it gives up (until the next round of retention).
const DETACH_LOCK_TIMEOUT: &str = "5s";

/// One day's partition of the audit ledger (PostgreSQL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditPartition {
    pub day: chrono::NaiveDate,
    /// `audit_pYYYYMMDD`: made only of the day, so safe to put in SQL.
    pub table: String,
}

impl AuditPartition {
    /// The partition named `table`, if it is one of keycap's.
    fn parse(table: &str) -> Option<AuditPartition> {
        let digits = table.strip_prefix("audit_p")?;
        if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let day = chrono::NaiveDate::parse_from_str(digits, "%Y%m%d").ok()?;
        Some(AuditPartition {
            day,
            table: table.to_string(),
        })
    }
}

/// How many days ahead of today the audit partitions exist.
const AUDIT_PARTITIONS_AHEAD: i32 = 3;

pub struct Pg;

#[async_trait]
impl Dialect for Pg {
    type Db = Postgres;
    const ROW_LOCKS: bool = true;
    const FOR_UPDATE: &'static str = " FOR UPDATE";
    const PLAIN_PLACEHOLDERS: bool = false;
    const FOR_SHARE: &'static str = " FOR SHARE";
    const SKIP_LOCKED: &'static str = " FOR UPDATE SKIP LOCKED";
    const GREATEST: &'static str = "GREATEST";
    const CLOCK_MICROS: &'static str =
        "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)";

    async fn migrate(&self, pool: &PgPool) -> StoreResult<()> {
        // sqlx takes an advisory lock, so replicas starting together are safe.
        sqlx::migrate!("./migrations/postgres").run(pool).await?;
        Ok(())
    }

    async fn begin_write<'a>(&'a self, pool: &PgPool) -> StoreResult<WriteTx<'a, Postgres>> {
        Ok(WriteTx {
            tx: pool.begin().await?,
            _serial: None,
        })
    }

    fn lock_table(table: &str, mode: &str) -> Option<String> {
        Some(format!("LOCK TABLE {table} IN {mode} MODE"))
    }

    fn json_text(column: &str, key: &str) -> String {
        format!("(CAST({column} AS JSONB) ->> CAST({key} AS TEXT))")
    }

    fn indexed_text_eq(column: &str, value: &str) -> String {
        // The index holds the id's hash (migration 0027): the hash finds
        // the entries, the id itself decides.
        format!(
            "hashtextextended({column}, 0) = hashtextextended({value}, 0) AND {column} = {value}"
        )
    }

    fn rows_affected(done: &sqlx::postgres::PgQueryResult) -> u64 {
        done.rows_affected()
    }

    fn change_feed(&self, pool: &PgPool) -> Option<tokio::sync::watch::Receiver<u64>> {
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        tokio::spawn(listen_for_changes(pool.clone(), tx));
        Some(rx)
    }

    async fn known_event_ids(
        conn: &mut PgConnection,
        ids: &[&str],
        logged: std::ops::RangeInclusive<i64>,
    ) -> StoreResult<Vec<String>> {
        // One array parameter, one plan, whatever the batch size. Each id
        // is one probe of the `event_id` index (the LATERAL with LIMIT
        // keeps the planner from reading a young day partition whole, as
        // it would for `= ANY($1)` while the partition looks small next to
        // the batch); the bounds on `logged_at` prune every other day
        // partition when the statement starts. So the lookup costs the same
        // whatever the partition's size and the retention.
        Ok(sqlx::query_scalar(
            "SELECT u.id FROM unnest(CAST($1 AS TEXT[])) AS u(id) CROSS JOIN LATERAL \
             (SELECT 1 FROM audit a WHERE a.event_id = u.id \
             AND a.logged_at BETWEEN $2 AND $3 LIMIT 1) AS hit",
        )
        .bind(ids)
        .bind(logged.start())
        .bind(logged.end())
        .fetch_all(conn)
        .await?)
    }

    async fn append_audit(
        conn: &mut PgConnection,
        entries: &[ChainedEntry<'_>],
    ) -> StoreResult<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let data = pg_copy::audit_rows(entries)?;
        let mut copy = conn.copy_in_raw(pg_copy::AUDIT_COPY).await?;
        for chunk in data.chunks(pg_copy::MESSAGE) {
            if let Err(e) = copy.send(chunk).await {
                // The connection goes back to normal only once the COPY
                // is ended; the transaction is rolled back by the caller.
                let _ = copy.abort("keycap: batch not sent").await;
                return Err(e.into());
            }
        }
        copy.finish().await?;
        Ok(())
    }

    async fn ensure_audit_partitions(pool: &PgPool) -> StoreResult<()> {
        sqlx::query("SELECT keycap_audit_ensure_partitions($1)")
            .bind(AUDIT_PARTITIONS_AHEAD)
            .execute(pool)
            .await?;
        Ok(())
    }

    async fn audit_partitions(pool: &PgPool) -> StoreResult<Vec<AuditPartition>> {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT CAST(c.relname AS TEXT) FROM pg_inherits i \
             JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = CAST('audit' AS REGCLASS)",
        )
        .fetch_all(pool)
        .await?;
        let mut parts: Vec<AuditPartition> = names
            .iter()
            .filter_map(|n| AuditPartition::parse(n))
            .collect();
        parts.sort_by_key(|p| p.day);
        Ok(parts)
    }

    async fn drop_audit_partition(
        conn: &mut PgConnection,
        partition: &AuditPartition,
    ) -> StoreResult<()> {
        let table = &partition.table;
        // Detaching waits for every transaction holding a lock on the
        // ledger. An append written ahead of the head's lock holds one while
        // it waits, in the replica, for the append before it, which may
        // itself wait behind this request: a wait PostgreSQL cannot see as
        // a deadlock. Give up instead; the next round tries again.
        sqlx::query(&format!("SET LOCAL lock_timeout = '{DETACH_LOCK_TIMEOUT}'"))
            .execute(&mut *conn)
            .await?;
        sqlx::query(&format!("ALTER TABLE audit DETACH PARTITION {table}"))
            .execute(&mut *conn)
            .await?;
        sqlx::query(&format!("DROP TABLE {table}"))
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// The audit batch as PostgreSQL's binary `COPY` format, written by hand:
/// a fixed header, then per row the field count and each field as its
/// length (4 bytes, big-endian) and its bytes (integers big-endian, text as
/// UTF-8, `bytea` raw), then a trailer. The server parses no text and
/// plans no statement per batch.
mod pg_copy {
    use super::{to_json, ChainedEntry, StoreResult};
    use crate::store::sql::micros;

    pub const AUDIT_COPY: &str = "COPY audit (seq, event_id, key_id, agent_run_label, vendor, \
         method, path, upstream_status, reserved, cost, outcome, at, node_id, lease_id, day, \
         detail_json, trace_id, context, prev_hash, hash, refusal_reason, refused_calls, \
         credential_version, would_refuse) FROM STDIN (FORMAT binary)";
    const FIELDS: i16 = 24;
    /// Bytes per `CopyData` message.
    pub const MESSAGE: usize = 1 << 20;
    const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

    fn int8(out: &mut Vec<u8>, v: i64) {
        out.extend_from_slice(&8i32.to_be_bytes());
        out.extend_from_slice(&v.to_be_bytes());
    }

    fn int4(out: &mut Vec<u8>, v: i32) {
        out.extend_from_slice(&4i32.to_be_bytes());
        out.extend_from_slice(&v.to_be_bytes());
    }

    fn bytes(out: &mut Vec<u8>, v: &[u8]) {
        // Fields are bounded far below 2 GiB by request validation.
        let len = i32::try_from(v.len()).unwrap_or(i32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(v);
    }

    pub fn audit_rows(entries: &[ChainedEntry<'_>]) -> StoreResult<Vec<u8>> {
        let mut out = Vec::with_capacity(32 + entries.len() * 512);
        out.extend_from_slice(SIGNATURE);
        out.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        out.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        for c in entries {
            let e = c.event;
            out.extend_from_slice(&FIELDS.to_be_bytes());
            int8(&mut out, c.seq);
            for text in [
                e.event_id.as_str(),
                e.key_id.as_str(),
                c.agent_run_label,
                e.vendor.as_str(),
                e.method.as_str(),
                e.path.as_str(),
            ] {
                bytes(&mut out, text.as_bytes());
            }
            int4(&mut out, e.upstream_status);
            int8(&mut out, e.reserved.0);
            int8(&mut out, e.cost.0);
            bytes(&mut out, e.outcome.as_str().as_bytes());
            int8(&mut out, micros(e.at));
            for text in [
                e.node_id.as_str(),
                e.lease_id.as_str(),
                e.day.as_str(),
                e.detail_json.as_str(),
                e.trace_id.as_str(),
            ] {
                bytes(&mut out, text.as_bytes());
            }
            bytes(&mut out, to_json(&e.context, "context")?.as_bytes());
            bytes(&mut out, &c.prev_hash);
            bytes(&mut out, &c.hash);
            bytes(&mut out, e.refusal_reason.as_bytes());
            int8(&mut out, e.refused_calls);
            int8(&mut out, e.credential_version);
            bytes(&mut out, e.would_refuse.as_bytes());
        }
        out.extend_from_slice(&(-1i16).to_be_bytes());
        Ok(out)
    }
}

pub(super) const PG_MAX_CONNECTIONS: u32 = 16;
pub(super) const PG_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

pub(super) async fn pg_pool(url: &str) -> StoreResult<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(PG_MAX_CONNECTIONS)
        .acquire_timeout(PG_ACQUIRE_TIMEOUT)
        // No JIT: keycap's statements are short, and a plan whose estimate
        // crosses `jit_above_cost` (the dedupe lookup of a large batch
        // does) would spend ~100 ms compiling to save microseconds. A
        // `SET` rather than a startup option, which poolers such as
        // PgBouncer refuse.
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET jit = off").execute(conn).await?;
                Ok(())
            })
        })
        .connect(url)
        .await?)
}

/// LISTENs on `CHANGE_CHANNEL` and moves `tx` on every notification, and
/// after every (re)connection since notifications may have been missed
/// meanwhile. Reconnects with capped backoff; ends when nobody listens.
async fn listen_for_changes(pool: PgPool, tx: tokio::sync::watch::Sender<u64>) {
    const MAX_BACKOFF: Duration = Duration::from_secs(5);
    let mut backoff = Duration::from_millis(100);
    while !tx.is_closed() {
        match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(mut listener) => match listener.listen(CHANGE_CHANNEL).await {
                Ok(()) => {
                    backoff = Duration::from_millis(100);
                    tx.send_modify(|n| *n += 1);
                    // `recv` reconnects by itself after a lost connection.
                    while let Ok(_notification) = listener.recv().await {
                        tx.send_modify(|n| *n += 1);
                        if tx.is_closed() {
                            return;
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot LISTEN for changes"),
            },
            Err(e) => tracing::warn!(error = %e, "cannot connect to LISTEN for changes"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// SQLite; `write_lock` serialises this process's write transactions.
#[derive(Default)]
pub struct Lite {
    write_lock: Mutex<()>,
}

/// How long a connection waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
const SQLITE_MAX_CONNECTIONS: u32 = 8;

#[async_trait]
impl Dialect for Lite {
    type Db = Sqlite;
    const ROW_LOCKS: bool = false;
    const FOR_UPDATE: &'static str = "";
    const PLAIN_PLACEHOLDERS: bool = true;
    const FOR_SHARE: &'static str = "";
    const SKIP_LOCKED: &'static str = "";
    const GREATEST: &'static str = "MAX";
    const CLOCK_MICROS: &'static str =
        "CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER)";

    async fn migrate(&self, pool: &SqlitePool) -> StoreResult<()> {
        sqlx::migrate!("./migrations/sqlite").run(pool).await?;
        Ok(())
    }

    async fn begin_write<'a>(&'a self, pool: &SqlitePool) -> StoreResult<WriteTx<'a, Sqlite>> {
        let serial = self.write_lock.lock().await;
        let tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        Ok(WriteTx {
            tx,
            _serial: Some(serial),
        })
    }

    fn lock_table(_table: &str, _mode: &str) -> Option<String> {
        None
    }

    fn indexed_text_eq(column: &str, value: &str) -> String {
        format!("{column} = {value}")
    }

    fn json_text(column: &str, key: &str) -> String {
        // Keys are letters, digits and `_ . : -` (see
        // `domain::validate_context_key`), so quoting them in the path is
        // enough.
        format!("json_extract({column}, '$.\"' || {key} || '\"')")
    }

    fn rows_affected(done: &sqlx::sqlite::SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    fn change_feed(&self, _pool: &SqlitePool) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    async fn known_event_ids(
        conn: &mut SqliteConnection,
        ids: &[&str],
        _logged: std::ops::RangeInclusive<i64>,
    ) -> StoreResult<Vec<String>> {
        // One table and one index on `event_id`: nothing to prune.
        let mut known = Vec::new();
        for chunk in spend_chunks(ids) {
            let mut q = Statement::new("SELECT event_id FROM audit WHERE 1 = 1");
            q.push_in("event_id", chunk);
            known.extend(
                q.query_scalar::<Sqlite, String>()
                    .fetch_all(&mut *conn)
                    .await?,
            );
        }
        Ok(known)
    }

    async fn append_audit(
        conn: &mut SqliteConnection,
        entries: &[ChainedEntry<'_>],
    ) -> StoreResult<()> {
        // Inside the batch's one transaction: multi-row inserts, in
        // power-of-two chunks so a few prepared statements serve any size.
        for chunk in spend_chunks(entries) {
            audit_insert(chunk)?
                .query::<Sqlite>()
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    async fn ensure_audit_partitions(_pool: &SqlitePool) -> StoreResult<()> {
        Ok(())
    }

    async fn audit_partitions(_pool: &SqlitePool) -> StoreResult<Vec<AuditPartition>> {
        Ok(Vec::new())
    }

    async fn drop_audit_partition(
        _conn: &mut SqliteConnection,
        _partition: &AuditPartition,
    ) -> StoreResult<()> {
        Ok(())
    }
}

/// Opens (creating if missing) the SQLite database at `url_or_path`: a
/// `sqlite:` URL or a plain file path; `None` for an in-memory one.
pub(super) async fn sqlite_pool(url_or_path: Option<&str>) -> StoreResult<SqlitePool> {
    let Some(url_or_path) = url_or_path else {
        // An in-memory database lives as long as a connection to it: keep
        // exactly one, forever.
        let options = SqliteConnectOptions::from_str("sqlite::memory:")?
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT);
        return Ok(SqlitePoolOptions::new()
            .min_connections(1)
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await?);
    };
    let options = if url_or_path.starts_with("sqlite:") {
        SqliteConnectOptions::from_str(url_or_path)?
    } else {
        SqliteConnectOptions::new().filename(url_or_path)
    };
    let options = options
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(true)
        // The audit ledger is written in batches of hundreds of rows
        // across five indexes: keep its hot pages in memory rather than
        // re-reading them from the OS on every batch, keep statement
        // journals off disk, and checkpoint the WAL less often.
        .pragma("cache_size", "-65536")
        .pragma("temp_store", "MEMORY")
        .pragma("wal_autocheckpoint", "10000");
    Ok(SqlitePoolOptions::new()
        .max_connections(SQLITE_MAX_CONNECTIONS)
        .connect_with(options)
        .await?)
}
