//! The one SQL store: every query written once, run on PostgreSQL or SQLite
//! through a `Dialect` (see `store::dialect` for what differs and how each
//! database keeps the money path atomic).
//!
//! Encoding (times as microseconds, money as micro-dollars, JSON text) is
//! described in `store::sql`; the schemas are `migrations/postgres` and
//! `migrations/sqlite`.

use std::borrow::Cow;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keycap_proto::Micros;
use sqlx::{Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool, Type};

use super::approval_rows::{ApprovalRow, APPROVAL_COLUMNS};
use super::cockpit_rows::{LineageSpendRow, RefusalCountRow, MAX_REFUSAL_GROUPS};
use super::credential_rows::{CredentialRow, SealedCredentialRow, CREDENTIAL_COLUMNS};
use super::dialect::{self, Dialect, Lite, Pg, WriteTx};
use super::hook_rows::{HookRow, CHANGE_HOOK, HOOK_COLUMNS};
use super::sql::SpendKeyRow;
use super::sql::{
    admin_token_lists, would_strand_admin, AdminTokenRow, ADMIN_TOKEN_COLUMNS, LAST_ADMIN,
};
use super::sql::{
    audit_limit, check_ancestors, check_grant, check_tree_depth, conflict_on_unique,
    decide_tree_grant, distinct_key_ids, from_micros, micros, settle_daily, settle_leases,
    spend_chunks, spend_totals, to_json, tree_levels_sql, truncate, AuditRow, ChangeRow, GrantRow,
    KeyInsert, KeyRow, LeaseRow, TreeLevelRow, VendorRow, AUDIT_COLUMNS, CHANGE_KEY, CHANGE_VENDOR,
    KEY_COLUMNS, VENDOR_COLUMNS,
};
use super::sql::{vendor_load_errors_sql, VendorLoadErrorRow};
use super::sql::{ChainedEntry, Statement};
use super::sql::{
    FleetNodeRow, NodeLeaseRow, FLEET_NODE_COLUMNS, LEASE_COLUMNS, NODE_LEASE_COLUMNS,
};
use super::sql::{IssuerTokenRow, ISSUER_TOKEN_COLUMNS};
use super::webhook_rows::{
    endpoint_lists, AttemptRow, ClaimRow, DeliveryRow, WebhookEndpointRow, ATTEMPT_COLUMNS,
    CLAIM_COLUMNS, DELIVERY_COLUMNS, ENDPOINT_COLUMNS,
};
use super::{RevokedKey, SealedCredential, Store, StoreError, StoreResult, VendorWrite};
use crate::approval::{Approval, ApprovalFilter, ApprovalState};
use crate::credential::{CredentialProbe, CredentialState, CredentialVersion, Promotion};
use crate::domain::EnforcedTerms;
use crate::domain::{
    AdminToken, AuditEntry, AuditQuery, Change, FleetNode, IssuerToken, KeyFilter, KeySpend,
    KeyStatus, LeaseGrant, LeaseGrantRequest, NodeLease, SpendDimension, SpendEvent, SpendGroup,
    SpendReport, SpendReportQuery, SpendSummary, VaultKey, Vendor, VendorLoadError,
};
use crate::hooks::StoredHook;
use crate::ledger::observe::{ObservedCaps, SettledBefore};
use crate::ledger::pipeline::{Appends, Head, Ticket};
use crate::ledger::{self, Checkpoint, Retention};
use crate::webhook::{
    Attempt, AttemptOutcome, ClaimedDelivery, Delivery, WebhookEndpoint, WebhookEvent,
};

pub struct SqlStore<D: Dialect> {
    pool: Pool<D::Db>,
    dialect: D,
    /// This replica's ledger appends in flight, in order.
    appends: Appends,
}

/// The production store, shared by every control-plane replica.
pub type PgStore = SqlStore<Pg>;
/// The embedded single-node default.
pub type SqliteStore = SqlStore<Lite>;

impl PgStore {
    /// Connects a pool to `url` (`postgres://...`). Call `migrate` before use.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        Ok(Self::from_pool(dialect::pg_pool(url).await?))
    }

    /// Wraps a pool configured by the caller.
    pub fn from_pool(pool: sqlx::PgPool) -> Self {
        SqlStore {
            pool,
            dialect: Pg,
            appends: Appends::default(),
        }
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url_or_path`: a
    /// `sqlite:` URL or a plain file path. `sqlite::memory:` gives a private
    /// in-memory database, as `in_memory` does. Call `migrate` before use.
    pub async fn connect(url_or_path: &str) -> StoreResult<Self> {
        if url_or_path.trim().is_empty() {
            return Err(sqlx::Error::Configuration("empty SQLite database path".into()).into());
        }
        if url_or_path == ":memory:" || url_or_path.starts_with("sqlite::memory:") {
            return Self::in_memory().await;
        }
        Ok(Self::from_pool(
            dialect::sqlite_pool(Some(url_or_path)).await?,
        ))
    }

    /// A fresh private in-memory database (for tests and throwaway runs).
    /// Call `migrate` before use.
    pub async fn in_memory() -> StoreResult<Self> {
        Ok(Self::from_pool(dialect::sqlite_pool(None).await?))
    }

    fn from_pool(pool: sqlx::SqlitePool) -> Self {
        SqlStore {
            pool,
            dialect: Lite::default(),
            appends: Appends::default(),
        }
    }
}

impl<D: Dialect> SqlStore<D> {
    /// This replica's ledger appends committed ahead of the head's lock,
    /// and those that found another replica had appended in between
    /// (`ledger::pipeline`), so far.
    pub fn pipelined_appends(&self) -> (u64, u64) {
        self.appends.counts()
    }

    /// The pool, e.g. for a `PgListener` or a test's raw SQL.
    pub fn pool(&self) -> &Pool<D::Db> {
        &self.pool
    }
}

impl<D: Dialect> SqlStore<D>
where
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    for<'q> &'q str: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> Option<&'q str>: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> String: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> Option<String>: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> &'q [u8]: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> Option<&'q [u8]>: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> i64: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> Option<i64>: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> i32: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> bool: Encode<'q, D::Db> + Type<D::Db>,
    for<'r> i64: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> Option<i64>: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> i32: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> String: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> Vec<u8>: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> Option<Vec<u8>>: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> bool: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> Option<String>: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> (String, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (Option<i64>, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String, String): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String, Vec<u8>): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, Vec<u8>): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, Vec<u8>, i64, Vec<u8>, Vec<u8>): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String, Vec<u8>, Vec<u8>): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String, i64, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, i64, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, i64, i64, i64, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String, String, String, String, i64, i64, i64, i64, i64):
        FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, i64, Vec<u8>): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, i64, Vec<u8>, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, Option<Vec<u8>>): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String, String, String, String, i64, i64, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String,): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64,): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i32,): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (Vec<u8>,): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (Option<i64>,): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> KeyRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> ApprovalRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> AdminTokenRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> IssuerTokenRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> VendorRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> CredentialRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> SealedCredentialRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> ChangeRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> AuditRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> GrantRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> LeaseRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> TreeLevelRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> FleetNodeRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> NodeLeaseRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> VendorLoadErrorRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> WebhookEndpointRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> ClaimRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> DeliveryRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> AttemptRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> SpendKeyRow: FromRow<'r, <D::Db as Database>::Row>,
{
    async fn begin_write(&self) -> StoreResult<WriteTx<'_, D::Db>> {
        self.dialect.begin_write(&self.pool).await
    }

    /// Appends change-log entries; call it last in a transaction (see
    /// `store::dialect` for why PostgreSQL locks the table first).
    async fn append_changes(
        conn: &mut <D::Db as Database>::Connection,
        kind: &str,
        ref_ids: &[&str],
    ) -> StoreResult<()> {
        if ref_ids.is_empty() {
            return Ok(());
        }
        if let Some(lock) = D::lock_table("change_log", "EXCLUSIVE") {
            sqlx::query(&lock).execute(&mut *conn).await?;
        }
        for ref_id in ref_ids {
            sqlx::query("INSERT INTO change_log (kind, ref_id) VALUES ($1, $2)")
                .bind(kind)
                .bind(*ref_id)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// Inserts a credential version; `Conflict` when the version is taken.
    async fn insert_credential(
        conn: &mut <D::Db as Database>::Connection,
        vendor: &str,
        version: i64,
        sealed: &[u8],
        state: &str,
        now: i64,
    ) -> StoreResult<()> {
        let promoted_at = (state == "active").then_some(now);
        sqlx::query(
            "INSERT INTO vendor_credentials (vendor, version, state, sealed, created_at, \
             promoted_at) VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(vendor)
        .bind(version)
        .bind(state)
        .bind(sealed)
        .bind(now)
        .bind(promoted_at)
        .execute(&mut *conn)
        .await
        .map_err(|e| {
            conflict_on_unique(e, || {
                format!("credential version {version} of vendor {vendor} is taken")
            })
        })?;
        Ok(())
    }

    /// The version after the vendor's highest.
    async fn next_credential_version(
        conn: &mut <D::Db as Database>::Connection,
        vendor: &str,
    ) -> StoreResult<i64> {
        let max: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM vendor_credentials WHERE vendor = $1")
                .bind(vendor)
                .fetch_one(&mut *conn)
                .await?;
        Ok(max.unwrap_or(0) + 1)
    }

    /// Retires the vendor's versions matching `condition` (fixed SQL, never
    /// input): material erased.
    async fn retire_where(
        conn: &mut <D::Db as Database>::Connection,
        vendor: &str,
        condition: &str,
        now: i64,
    ) -> StoreResult<()> {
        sqlx::query(&format!(
            "UPDATE vendor_credentials SET state = 'retired', sealed = NULL, retired_at = $2, \
             grace_until = NULL WHERE vendor = $1 AND {condition}"
        ))
        .bind(vendor)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    async fn credential_row(
        conn: &mut <D::Db as Database>::Connection,
        vendor: &str,
        version: i64,
    ) -> StoreResult<Option<CredentialRow>> {
        let sql = format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM vendor_credentials WHERE vendor = $1 AND version = $2"
        );
        Ok(sqlx::query_as::<_, CredentialRow>(&sql)
            .bind(vendor)
            .bind(version)
            .fetch_optional(&mut *conn)
            .await?)
    }

    /// Inserts an admin token; with `keep_existing`, a token whose hash is
    /// already stored is left as it is.
    async fn insert_admin_token(&self, t: &AdminToken, keep_existing: bool) -> StoreResult<()> {
        let (scopes, vendors) = admin_token_lists(t)?;
        let on_conflict = if keep_existing {
            " ON CONFLICT (token_hash) DO NOTHING"
        } else {
            ""
        };
        let mut w = self.begin_write().await?;
        sqlx::query(&format!(
            "INSERT INTO admin_tokens ({ADMIN_TOKEN_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9){on_conflict}"
        ))
        .bind(t.id.as_str())
        .bind(&t.token_hash[..])
        .bind(t.token_prefix.as_str())
        .bind(t.name.as_str())
        .bind(scopes.as_str())
        .bind(vendors.as_deref())
        .bind(micros(t.created_at))
        .bind(t.expires_at.map(micros))
        .bind(t.revoked_at.map(micros))
        .execute(w.conn())
        .await
        .map_err(|e| conflict_on_unique(e, || format!("admin token {} already exists", t.id)))?;
        w.commit().await
    }

    /// The ancestors of a new key's parent, the parent itself included, each
    /// with its depth below the parent; `NotFound` for an unknown parent,
    /// `Conflict` for a revoked or expired one (at `now`) or one already at
    /// the deepest level. Holds the parent row `FOR SHARE` until commit, so a
    /// concurrent revocation of the parent either sees the child (and
    /// revokes it) or happens first (and the child is refused).
    async fn parent_ancestors(
        conn: &mut <D::Db as Database>::Connection,
        parent: &str,
        now: i64,
    ) -> StoreResult<Vec<(String, i64)>> {
        let state: Option<(Option<i64>, i64)> = sqlx::query_as(&format!(
            "SELECT revoked_at, expires_at FROM vault_keys WHERE id = $1{}",
            D::FOR_SHARE
        ))
        .bind(parent)
        .fetch_optional(&mut *conn)
        .await?;
        // A rolled-into parent's tree is its budget's: the child draws on
        // the budget the whole roll chain shares. The budget's row is held
        // too, since revoking the chain locks the budget rows of its tree.
        let budget: String = sqlx::query_scalar(&format!(
            "SELECT COALESCE(budget_id, id) FROM vault_keys WHERE id = $1{}",
            D::FOR_SHARE
        ))
        .bind(parent)
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or_else(|| parent.to_string());
        if budget != parent {
            let _: Option<i32> = sqlx::query_scalar(&format!(
                "SELECT 1 FROM vault_keys WHERE id = $1{}",
                D::FOR_SHARE
            ))
            .bind(budget.as_str())
            .fetch_optional(&mut *conn)
            .await?;
        }
        match state {
            None => return Err(StoreError::NotFound(format!("parent key {parent}"))),
            Some((Some(_), _)) => {
                return Err(StoreError::Conflict(format!(
                    "parent key {parent} is revoked"
                )))
            }
            Some((None, expires_at)) if expires_at <= now => {
                return Err(StoreError::Conflict(format!(
                    "parent key {parent} has expired"
                )))
            }
            Some(_) => {}
        }
        let ancestors: Vec<(String, i64)> = sqlx::query_as(
            "SELECT ancestor_id, CAST(depth AS BIGINT) FROM key_ancestors WHERE key_id = $1",
        )
        .bind(budget.as_str())
        .fetch_all(&mut *conn)
        .await?;
        check_tree_depth(parent, &ancestors)?;
        Ok(ancestors)
    }

    /// Revokes a rolled key alone (its successor spends its budget on) and
    /// commits. Idempotent: a revoked key keeps its first `revoked_at`.
    async fn retire_rolled_key(
        mut w: WriteTx<'_, D::Db>,
        mut key: VaultKey,
        now: DateTime<Utc>,
    ) -> StoreResult<RevokedKey> {
        let revoked: Vec<String> = sqlx::query_scalar(
            "UPDATE vault_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL \
             RETURNING id",
        )
        .bind(micros(now))
        .bind(key.id.as_str())
        .fetch_all(w.conn())
        .await?;
        let refs: Vec<&str> = revoked.iter().map(String::as_str).collect();
        Self::append_changes(w.conn(), CHANGE_KEY, &refs).await?;
        w.commit().await?;
        if key.revoked_at.is_none() {
            key.revoked_at = Some(truncate(now));
        }
        Ok(RevokedKey {
            key,
            descendants: Vec::new(),
        })
    }

    /// Appends `events` to the ledger holding its head's lock from the
    /// start: every append on SQLite, and on PostgreSQL one with no append
    /// of this replica in flight before it (`ledger::pipeline`). Returns
    /// which events were applied and the head it left.
    async fn append_locked(&self, events: &[SpendEvent]) -> StoreResult<(Vec<bool>, Head)> {
        let mut w = self.begin_write().await?;
        // The ledger head first: holding it, this transaction is the only
        // appender (across replicas on PostgreSQL), so the events found
        // new below stay new until commit, and the seqs and hashes chained
        // onto the head are the ledger's next ones. The database's clock
        // comes with it: no event dated too far past it is taken
        // (`ledger::MAX_AHEAD`), which is what lets the dedupe lookup
        // start at the batch's oldest event; nor one whose entry could lie
        // in a day retention dropped (`kept_from`).
        let (head_seq, clock, head_hash, kept_from): (i64, i64, Vec<u8>, i64) =
            sqlx::query_as(&format!(
                "SELECT seq, {}, hash, kept_from FROM ledger_head WHERE id = 1{}",
                D::CLOCK_MICROS,
                D::FOR_UPDATE
            ))
            .fetch_one(w.conn())
            .await?;
        if let Some(e) = ledger::dated_ahead(events, clock) {
            return Err(StoreError::Conflict(format!(
                "spend event {}: dated {}, more than {} min ahead of the ledger's clock ({}); \
                 it is taken once the clocks agree (check the proxy's clock)",
                e.event_id,
                e.at.to_rfc3339(),
                ledger::MAX_AHEAD.num_minutes(),
                DateTime::from_timestamp_micros(clock).map_or_else(String::new, |t| t.to_rfc3339()),
            )));
        }
        let head = (
            head_seq,
            head_hash
                .as_slice()
                .try_into()
                .map_err(|_| StoreError::Corrupt("ledger_head.hash: not 32 bytes".into()))?,
        );
        check_kept(events, clock, kept_from)?;
        let known = Self::known_event_ids(w.conn(), events, clock).await?;
        let (applied, fresh) = first_unstored(events, &known, |_| false);
        let keys = Self::spend_keys(w.conn(), events).await?;
        let settled = Self::settled_before(w.conn(), &fresh, &keys.observed).await?;
        let fresh = ledger::observe::mark(&fresh, &keys.observed, settled);
        let (entries, end) = chain_entries(head, &fresh, &keys.labels);
        D::append_audit(w.conn(), &entries).await?;
        Self::settle(w.conn(), &fresh, &keys.budgets, head, end).await?;
        w.commit().await?;
        Ok((applied, end))
    }

    /// Appends `events` behind an append of this replica still in flight
    /// (`ledger::pipeline`): looks them up, chains them onto the head that
    /// append leaves and writes them while it finishes, then takes the
    /// ledger head's lock and commits only if the head is exactly that
    /// one. `None`, having committed nothing, when it could not: the caller
    /// then appends under the lock (which also answers every error).
    async fn append_ahead(
        &self,
        events: &[SpendEvent],
        ticket: &mut Ticket<'_>,
    ) -> StoreResult<Option<Vec<bool>>> {
        if !ticket.behind() {
            return Ok(None);
        }
        let mut w = self.begin_write().await?;
        let clock: i64 = sqlx::query_scalar(&format!("SELECT {}", D::CLOCK_MICROS))
            .fetch_one(w.conn())
            .await?;
        // Checked before anything is written, so each entry is logged at
        // or after its time less `MAX_AHEAD`, as the dedupe window needs;
        // the locked append refuses such a batch.
        if ledger::dated_ahead(events, clock).is_some() {
            return Ok(None);
        }
        let keys = Self::spend_keys(w.conn(), events).await?;
        // What an observed key's calls would have met depends on what the
        // appends before settled: those go under the lock.
        if !keys.observed.is_empty() {
            return Ok(None);
        }
        let Some(start) = ticket.start().await else {
            return Ok(None);
        };
        // Looked up only once the head to chain onto is known. Every entry
        // up to it is then either committed before this lookup reads, or
        // written by an append of this replica still in flight (dropped
        // below). Looked up earlier, another replica's entries committed
        // between the lookup and the append before this one taking the
        // lock would lie below `start` unseen, and be stored twice.
        let known = Self::known_event_ids(w.conn(), events, clock).await?;
        let (applied, fresh) = first_unstored(events, &known, |id| ticket.earlier_holds(id));
        let fresh: Vec<Cow<'_, SpendEvent>> = fresh.into_iter().map(Cow::Borrowed).collect();
        let (entries, end) = chain_entries(start, &fresh, &keys.labels);
        ticket.chained(end);
        D::append_audit(w.conn(), &entries).await?;
        ticket.earlier_done().await;
        // The events dropped as carried by an append before are stored
        // only if that append committed.
        if !ticket.earlier_committed() {
            return Ok(None);
        }
        let (seq, kept_from, hash): (i64, i64, Vec<u8>) = sqlx::query_as(&format!(
            "SELECT seq, kept_from, hash FROM ledger_head WHERE id = 1{}",
            D::FOR_UPDATE
        ))
        .fetch_one(w.conn())
        .await?;
        if seq != start.0 || hash != start.1 {
            // Another replica appended in between: what the lookup saw is
            // not all there is. Rolled back when `w` drops.
            ticket.missed();
            return Ok(None);
        }
        // Retention may have dropped a day the lookup read since: then the
        // locked append answers.
        if check_kept(events, clock, kept_from).is_err() {
            return Ok(None);
        }
        Self::settle(w.conn(), &fresh, &keys.budgets, start, end).await?;
        w.commit().await?;
        ticket.done_ahead(end);
        Ok(Some(applied))
    }

    /// Which of `events` are already in the ledger, looking where an entry
    /// of theirs can be (`ledger::dedupe_window`, `clock` the ledger's).
    async fn known_event_ids(
        conn: &mut <D::Db as Database>::Connection,
        events: &[SpendEvent],
        clock: i64,
    ) -> StoreResult<Vec<String>> {
        let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
        D::known_event_ids(conn, &ids, ledger::dedupe_window(events, clock)).await
    }

    /// The run label of each key among `events`, and the caps of those in
    /// observe mode.
    async fn spend_keys(
        conn: &mut <D::Db as Database>::Connection,
        events: &[SpendEvent],
    ) -> StoreResult<SpendKeys> {
        let mut keys = SpendKeys::default();
        for ids in spend_chunks(&distinct_key_ids(events)) {
            let mut q = Statement::new(
                "SELECT id, agent_run_label, COALESCE(budget_id, id) AS budget_id, daily_cap, \
                 lifetime_cap, observe_ceiling FROM vault_keys WHERE 1 = 1",
            );
            q.push_in("id", ids);
            let rows: Vec<SpendKeyRow> = q.query_as::<D::Db, _>().fetch_all(&mut *conn).await?;
            for r in rows {
                keys.budgets.insert(r.id.clone(), r.budget_id.clone());
                if r.observe_ceiling.is_some() {
                    let caps = ObservedCaps {
                        budget_id: r.budget_id,
                        daily_cap: Micros(r.daily_cap),
                        lifetime_cap: r.lifetime_cap.map(Micros),
                    };
                    keys.observed.insert(r.id.clone(), caps);
                }
                keys.labels.insert(r.id, r.agent_run_label);
            }
        }
        Ok(keys)
    }

    /// Moves the ledger head from `start` to `end` and counts the spend of
    /// the `fresh` events just appended against their budgets (`budgets`,
    /// by key id: `SpendKeys::budgets`) and leases.
    async fn settle(
        conn: &mut <D::Db as Database>::Connection,
        fresh: &[Cow<'_, SpendEvent>],
        budgets: &std::collections::HashMap<String, String>,
        start: Head,
        end: Head,
    ) -> StoreResult<()> {
        if end != start {
            sqlx::query("UPDATE ledger_head SET seq = $1, hash = $2 WHERE id = 1")
                .bind(end.0)
                .bind(end.1.as_slice())
                .execute(&mut *conn)
                .await?;
        }
        let totals = spend_totals(fresh.iter().map(|e| &**e), budgets);
        for rows in spend_chunks(&totals.daily) {
            settle_daily(rows, D::PLAIN_PLACEHOLDERS)
                .query::<D::Db>()
                .execute(&mut *conn)
                .await?;
        }
        for rows in spend_chunks(&totals.leases) {
            settle_leases(rows, D::PLAIN_PLACEHOLDERS)
                .query::<D::Db>()
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }

    /// What the budgets of the observed keys among `events` had settled
    /// before them, for `ledger::observe::mark`. Nothing is read when no
    /// key is in observe mode.
    async fn settled_before(
        conn: &mut <D::Db as Database>::Connection,
        events: &[&SpendEvent],
        observed: &std::collections::HashMap<String, ObservedCaps>,
    ) -> StoreResult<SettledBefore> {
        let mut settled = SettledBefore::default();
        for e in events {
            let Some(caps) = observed.get(&e.key_id) else {
                continue;
            };
            let slot = (caps.budget_id.clone(), e.day.clone());
            if let std::collections::hash_map::Entry::Vacant(day) = settled.day.entry(slot) {
                let spent: Option<i64> = sqlx::query_scalar(
                    "SELECT spent FROM key_spend_daily WHERE key_id = $1 AND day = $2",
                )
                .bind(&caps.budget_id)
                .bind(&e.day)
                .fetch_optional(&mut *conn)
                .await?;
                day.insert(spent.unwrap_or(0));
            }
            if !settled.life.contains_key(&caps.budget_id) {
                let spent: i64 = sqlx::query_scalar(
                    "SELECT CAST(COALESCE(SUM(spent), 0) AS BIGINT) FROM key_spend_daily \
                     WHERE key_id = $1",
                )
                .bind(&caps.budget_id)
                .fetch_one(&mut *conn)
                .await?;
                settled.life.insert(caps.budget_id.clone(), spent);
            }
        }
        Ok(settled)
    }

    /// Writes a key's row (no closure rows, no change-log entry).
    async fn insert_key_row(
        conn: &mut <D::Db as Database>::Connection,
        k: &KeyInsert<'_>,
    ) -> StoreResult<()> {
        let sql = format!(
            "INSERT INTO vault_keys ({KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, $19, $20, $21, $22, $23)"
        );
        sqlx::query(&sql)
            .bind(k.id)
            .bind(k.key_hash)
            .bind(k.key_prefix)
            .bind(k.vendor)
            .bind(&k.allowed_endpoints)
            .bind(k.daily_cap)
            .bind(k.per_call_cap)
            .bind(k.lifetime_cap)
            .bind(k.expires_at)
            .bind(k.agent_run_label)
            .bind(&k.metadata)
            .bind(k.created_at)
            .bind(k.revoked_at)
            .bind(k.rate_limit_per_minute)
            .bind(&k.allowed_cidrs)
            .bind(k.zone)
            .bind(k.parent_id)
            .bind(k.approval_above)
            .bind(k.budget_id)
            .bind(k.rolled_from)
            .bind(k.successor_id)
            .bind(k.retire_at)
            .bind(k.observe_ceiling)
            .execute(&mut *conn)
            .await
            .map_err(|e| conflict_on_unique(e, || format!("key {} already exists", k.id)))?;
        Ok(())
    }

    /// Keys whose `column` is one of `values`, whatever their state.
    async fn keys_in(&self, column: &str, values: &[String]) -> StoreResult<Vec<VaultKey>> {
        let mut keys = Vec::with_capacity(values.len());
        for chunk in spend_chunks(values) {
            let mut q = Statement::new(format!("SELECT {KEY_COLUMNS} FROM vault_keys WHERE 1 = 1"));
            q.push_in(column, chunk);
            for row in q.query_as::<D::Db, KeyRow>().fetch_all(&self.pool).await? {
                keys.push(row.into_domain()?);
            }
        }
        Ok(keys)
    }

    async fn fetch_key(
        conn: &mut <D::Db as Database>::Connection,
        id: &str,
    ) -> StoreResult<Option<VaultKey>> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM vault_keys WHERE id = $1");
        sqlx::query_as::<_, KeyRow>(&sql)
            .bind(id)
            .fetch_optional(conn)
            .await?
            .map(KeyRow::into_domain)
            .transpose()
    }
}

#[async_trait]
impl<D: Dialect> Store for SqlStore<D>
where
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    for<'q> <D::Db as Database>::Arguments<'q>: IntoArguments<'q, D::Db>,
    for<'q> &'q str: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> Option<&'q str>: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> String: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> Option<String>: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> &'q [u8]: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> Option<&'q [u8]>: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> i64: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> Option<i64>: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> i32: Encode<'q, D::Db> + Type<D::Db>,
    for<'q> bool: Encode<'q, D::Db> + Type<D::Db>,
    for<'r> i64: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> Option<i64>: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> i32: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> String: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> Vec<u8>: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> Option<Vec<u8>>: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> bool: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> Option<String>: Decode<'r, D::Db> + Type<D::Db>,
    for<'r> (String, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (Option<i64>, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String, String): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String, Vec<u8>): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, Vec<u8>): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, Vec<u8>, i64, Vec<u8>, Vec<u8>): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String, Vec<u8>, Vec<u8>): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String, i64, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, i64, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, i64, i64, i64, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String, String, String, String, i64, i64, i64, i64, i64):
        FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, i64, Vec<u8>): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, i64, Vec<u8>, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, Option<Vec<u8>>): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String, String, String, String, i64, i64, i64): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (String,): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i64,): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (i32,): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (Vec<u8>,): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> (Option<i64>,): FromRow<'r, <D::Db as Database>::Row>,
    for<'r> RefusalCountRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> LineageSpendRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> KeyRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> ApprovalRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> AdminTokenRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> IssuerTokenRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> VendorRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> CredentialRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> SealedCredentialRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> ChangeRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> AuditRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> GrantRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> LeaseRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> TreeLevelRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> FleetNodeRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> NodeLeaseRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> VendorLoadErrorRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> WebhookEndpointRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> ClaimRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> DeliveryRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> AttemptRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> SpendKeyRow: FromRow<'r, <D::Db as Database>::Row>,
    for<'r> HookRow: FromRow<'r, <D::Db as Database>::Row>,
{
    async fn migrate(&self) -> StoreResult<()> {
        self.dialect.migrate(&self.pool).await
    }

    async fn ensure_admin_token(&self, token: &AdminToken) -> StoreResult<()> {
        self.insert_admin_token(token, true).await
    }

    async fn insert_admin_token(&self, token: &AdminToken) -> StoreResult<()> {
        SqlStore::insert_admin_token(self, token, false).await
    }

    async fn find_admin_token(&self, token_hash: &[u8; 32]) -> StoreResult<Option<AdminToken>> {
        let sql = format!("SELECT {ADMIN_TOKEN_COLUMNS} FROM admin_tokens WHERE token_hash = $1");
        sqlx::query_as::<_, AdminTokenRow>(&sql)
            .bind(&token_hash[..])
            .fetch_optional(&self.pool)
            .await?
            .map(AdminTokenRow::into_domain)
            .transpose()
    }

    async fn get_admin_token(&self, id: &str) -> StoreResult<Option<AdminToken>> {
        let sql = format!("SELECT {ADMIN_TOKEN_COLUMNS} FROM admin_tokens WHERE id = $1");
        sqlx::query_as::<_, AdminTokenRow>(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(AdminTokenRow::into_domain)
            .transpose()
    }

    async fn list_admin_tokens(&self) -> StoreResult<Vec<AdminToken>> {
        let sql = format!(
            "SELECT {ADMIN_TOKEN_COLUMNS} FROM admin_tokens ORDER BY created_at DESC, id DESC"
        );
        sqlx::query_as::<_, AdminTokenRow>(&sql)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(AdminTokenRow::into_domain)
            .collect()
    }

    async fn revoke_admin_token(&self, id: &str, now: DateTime<Utc>) -> StoreResult<AdminToken> {
        let mut w = self.begin_write().await?;
        // Revocations run one at a time (across replicas on PostgreSQL, where
        // the lock conflicts with itself but not with readers), so two cannot
        // each see the other's token as the admin that remains.
        if let Some(lock) = D::lock_table("admin_tokens", "SHARE ROW EXCLUSIVE") {
            sqlx::query(&lock).execute(w.conn()).await?;
        }
        let sql = format!("SELECT {ADMIN_TOKEN_COLUMNS} FROM admin_tokens");
        let all = sqlx::query_as::<_, AdminTokenRow>(&sql)
            .fetch_all(w.conn())
            .await?
            .into_iter()
            .map(AdminTokenRow::into_domain)
            .collect::<StoreResult<Vec<_>>>()?;
        let mut target = all
            .iter()
            .find(|t| t.id == id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("admin token {id}")))?;
        if target.revoked_at.is_some() {
            return Ok(target);
        }
        let active: Vec<AdminToken> = all
            .into_iter()
            .filter(|t| t.status(now) == KeyStatus::Active)
            .collect();
        if would_strand_admin(&target, &active) {
            return Err(StoreError::Conflict(LAST_ADMIN.to_string()));
        }
        sqlx::query("UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2")
            .bind(micros(now))
            .bind(id)
            .execute(w.conn())
            .await?;
        w.commit().await?;
        target.revoked_at = Some(truncate(now));
        Ok(target)
    }

    async fn insert_issuer_token(&self, t: &IssuerToken) -> StoreResult<()> {
        let sql = format!(
            "INSERT INTO issuer_tokens ({ISSUER_TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        );
        let mut w = self.begin_write().await?;
        sqlx::query(&sql)
            .bind(&t.id)
            .bind(&t.token_hash[..])
            .bind(&t.token_prefix)
            .bind(&t.key_id)
            .bind(&t.name)
            .bind(micros(t.created_at))
            .bind(t.expires_at.map(micros))
            .bind(t.revoked_at.map(micros))
            .execute(w.conn())
            .await
            .map_err(|e| {
                conflict_on_unique(e, || format!("issuer token {} already exists", t.id))
            })?;
        w.commit().await
    }

    async fn find_issuer_token(&self, token_hash: &[u8; 32]) -> StoreResult<Option<IssuerToken>> {
        let sql = format!("SELECT {ISSUER_TOKEN_COLUMNS} FROM issuer_tokens WHERE token_hash = $1");
        sqlx::query_as::<_, IssuerTokenRow>(&sql)
            .bind(&token_hash[..])
            .fetch_optional(&self.pool)
            .await?
            .map(IssuerTokenRow::into_domain)
            .transpose()
    }

    async fn get_issuer_token(&self, id: &str) -> StoreResult<Option<IssuerToken>> {
        let sql = format!("SELECT {ISSUER_TOKEN_COLUMNS} FROM issuer_tokens WHERE id = $1");
        sqlx::query_as::<_, IssuerTokenRow>(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(IssuerTokenRow::into_domain)
            .transpose()
    }

    async fn list_issuer_tokens(&self, key_id: &str) -> StoreResult<Vec<IssuerToken>> {
        let sql = format!(
            "SELECT {ISSUER_TOKEN_COLUMNS} FROM issuer_tokens WHERE key_id = $1 \
             ORDER BY created_at DESC, id DESC"
        );
        sqlx::query_as::<_, IssuerTokenRow>(&sql)
            .bind(key_id)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(IssuerTokenRow::into_domain)
            .collect()
    }

    async fn revoke_issuer_token(&self, id: &str, now: DateTime<Utc>) -> StoreResult<IssuerToken> {
        let mut w = self.begin_write().await?;
        sqlx::query(
            "UPDATE issuer_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(micros(now))
        .bind(id)
        .execute(w.conn())
        .await?;
        let sql = format!("SELECT {ISSUER_TOKEN_COLUMNS} FROM issuer_tokens WHERE id = $1");
        let row = sqlx::query_as::<_, IssuerTokenRow>(&sql)
            .bind(id)
            .fetch_optional(w.conn())
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("issuer token {id}")))?;
        w.commit().await?;
        row.into_domain()
    }

    async fn put_vendor(&self, write: VendorWrite) -> StoreResult<(Vendor, bool)> {
        let v = &write.vendor;
        let rates = to_json(&v.currency_rates, "currency_rates")?;
        let mut w = self.begin_write().await?;
        let existing: Option<(i64, i64)> = sqlx::query_as(&format!(
            "SELECT created_at, credential_set_at FROM vendors WHERE name = $1{}",
            D::FOR_UPDATE
        ))
        .bind(v.name.as_str())
        .fetch_optional(w.conn())
        .await?;
        let rotate_after = v.rotate_after.map(|d| d.num_seconds());
        let now = micros(v.updated_at);
        let (created_at, credential_set_at, created) = match (existing, &write.sealed_credential) {
            (None, None) => {
                return Err(StoreError::Conflict(format!(
                    "vendor {} does not exist; creating it needs a credential",
                    v.name
                )))
            }
            (None, Some(sealed)) => {
                if write.credential_version != 1 {
                    return Err(StoreError::Conflict(format!(
                        "vendor {} is new: its credential is version 1",
                        v.name
                    )));
                }
                sqlx::query(
                    "INSERT INTO vendors (name, profile, base_url, currency_rates, prices, \
                     created_at, updated_at, credential_set_at, rotate_after_secs, \
                     forward_trace_context) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                )
                .bind(v.name.as_str())
                .bind(v.profile.as_str())
                .bind(&v.base_url)
                .bind(&rates)
                .bind(&v.prices)
                .bind(micros(v.created_at))
                .bind(now)
                .bind(now)
                .bind(rotate_after)
                .bind(v.forward_trace_context)
                .execute(w.conn())
                .await
                .map_err(|e| {
                    conflict_on_unique(e, || format!("vendor {} was created concurrently", v.name))
                })?;
                // A vendor deleted before may have left nothing: its rows
                // went with it (`delete_vendor`).
                Self::insert_credential(w.conn(), v.name.as_str(), 1, sealed, "active", now)
                    .await?;
                (truncate(v.created_at), truncate(v.updated_at), true)
            }
            (Some((created_at, set_at)), sealed) => {
                let set_at = if let Some(sealed) = sealed {
                    let next = Self::next_credential_version(w.conn(), v.name.as_str()).await?;
                    if next != write.credential_version {
                        return Err(StoreError::Conflict(format!(
                            "credential version {} of vendor {} is taken",
                            write.credential_version, v.name
                        )));
                    }
                    // Overwritten as before versions: the active one
                    // retires at once, its material erased.
                    Self::retire_where(w.conn(), v.name.as_str(), "state = 'active'", now).await?;
                    Self::insert_credential(w.conn(), v.name.as_str(), next, sealed, "active", now)
                        .await?;
                    now
                } else {
                    set_at
                };
                sqlx::query(
                    "UPDATE vendors SET profile = $1, base_url = $2, currency_rates = $3, prices = $4, \
                     updated_at = $5, credential_set_at = $6, rotate_after_secs = $7, \
                     forward_trace_context = $9 WHERE name = $8",
                )
                .bind(v.profile.as_str())
                .bind(&v.base_url)
                .bind(&rates)
                .bind(&v.prices)
                .bind(now)
                .bind(set_at)
                .bind(rotate_after)
                .bind(v.name.as_str())
                .bind(v.forward_trace_context)
                .execute(w.conn())
                .await?;
                (
                    from_micros(created_at, "vendors.created_at")?,
                    from_micros(set_at, "vendors.credential_set_at")?,
                    false,
                )
            }
        };
        Self::append_changes(w.conn(), CHANGE_VENDOR, &[v.name.as_str()]).await?;
        w.commit().await?;
        let stored = Vendor {
            created_at,
            credential_set_at,
            updated_at: truncate(v.updated_at),
            ..write.vendor
        };
        Ok((stored, created))
    }

    async fn get_vendor(&self, name: &str) -> StoreResult<Option<Vendor>> {
        let sql = format!("SELECT {VENDOR_COLUMNS} FROM vendors WHERE name = $1");
        sqlx::query_as::<_, VendorRow>(&sql)
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(VendorRow::into_domain)
            .transpose()
    }

    async fn get_vendor_credential(&self, name: &str) -> StoreResult<Option<(i64, Vec<u8>)>> {
        Ok(sqlx::query_as(
            "SELECT version, sealed FROM vendor_credentials \
             WHERE vendor = $1 AND state = 'active' AND sealed IS NOT NULL",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn sealed_credentials(&self) -> StoreResult<Vec<SealedCredential>> {
        let rows: Vec<SealedCredentialRow> = sqlx::query_as(
            "SELECT vendor, version, sealed FROM vendor_credentials \
             WHERE sealed IS NOT NULL ORDER BY vendor, version",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| SealedCredential {
                vendor: r.vendor,
                version: r.version,
                sealed: r.sealed,
            })
            .collect())
    }

    async fn replace_sealed_credential(
        &self,
        name: &str,
        version: i64,
        expected: &[u8],
        sealed: &[u8],
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE vendor_credentials SET sealed = $4 \
             WHERE vendor = $1 AND version = $2 AND sealed = $3",
        )
        .bind(name)
        .bind(version)
        .bind(expected)
        .bind(sealed)
        .execute(&self.pool)
        .await?;
        Ok(D::rows_affected(&done) == 1)
    }

    async fn stage_credential(
        &self,
        vendor: &str,
        version: i64,
        sealed: &[u8],
        now: DateTime<Utc>,
    ) -> StoreResult<CredentialVersion> {
        let mut w = self.begin_write().await?;
        let exists: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT 1 FROM vendors WHERE name = $1{}",
            D::FOR_UPDATE
        ))
        .bind(vendor)
        .fetch_optional(w.conn())
        .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound(format!("vendor {vendor}")));
        }
        Self::insert_credential(w.conn(), vendor, version, sealed, "staged", micros(now)).await?;
        let row = Self::credential_row(w.conn(), vendor, version)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("credential {vendor} v{version}")))?;
        w.commit().await?;
        row.into_domain()
    }

    async fn list_credentials(&self, vendor: &str) -> StoreResult<Vec<CredentialVersion>> {
        let sql = format!(
            "SELECT {CREDENTIAL_COLUMNS} FROM vendor_credentials WHERE vendor = $1 \
             ORDER BY version DESC"
        );
        sqlx::query_as::<_, CredentialRow>(&sql)
            .bind(vendor)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(CredentialRow::into_domain)
            .collect()
    }

    async fn get_credential(
        &self,
        vendor: &str,
        version: i64,
    ) -> StoreResult<Option<(CredentialVersion, Option<Vec<u8>>)>> {
        let Some(row) = ({
            let mut conn = self.pool.acquire().await?;
            Self::credential_row(&mut conn, vendor, version).await?
        }) else {
            return Ok(None);
        };
        let sealed: Option<(i64, Option<Vec<u8>>)> = sqlx::query_as(
            "SELECT version, sealed FROM vendor_credentials WHERE vendor = $1 AND version = $2",
        )
        .bind(vendor)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?;
        Ok(Some((row.into_domain()?, sealed.and_then(|(_, s)| s))))
    }

    async fn record_credential_probe(
        &self,
        vendor: &str,
        version: i64,
        probe: &CredentialProbe,
    ) -> StoreResult<CredentialVersion> {
        let mut w = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE vendor_credentials SET probe_ok = $3, probe_status = $4, probe_error = $5, \
             probed_at = $6 WHERE vendor = $1 AND version = $2",
        )
        .bind(vendor)
        .bind(version)
        .bind(probe.ok)
        .bind(probe.status)
        .bind(probe.error.as_str())
        .bind(micros(probe.at))
        .execute(w.conn())
        .await?;
        if D::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(format!(
                "credential {vendor} v{version}"
            )));
        }
        let row = Self::credential_row(w.conn(), vendor, version)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("credential {vendor} v{version}")))?;
        w.commit().await?;
        row.into_domain()
    }

    async fn promote_credential(
        &self,
        vendor: &str,
        version: i64,
        grace: chrono::TimeDelta,
        now: DateTime<Utc>,
    ) -> StoreResult<Promotion> {
        let now_us = micros(now);
        let mut w = self.begin_write().await?;
        // The vendor's row serialises promotes of one vendor.
        let exists: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT 1 FROM vendors WHERE name = $1{}",
            D::FOR_UPDATE
        ))
        .bind(vendor)
        .fetch_optional(w.conn())
        .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound(format!("vendor {vendor}")));
        }
        let target = Self::credential_row(w.conn(), vendor, version)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("credential version {version}")))?
            .into_domain()?;
        match target.state {
            CredentialState::Active => {
                w.commit().await?;
                return Ok(Promotion {
                    active: target,
                    previous: None,
                    changed: false,
                });
            }
            CredentialState::Retired => {
                return Err(StoreError::Conflict(format!(
                    "credential version {version} is retired: its material is erased"
                )));
            }
            CredentialState::Previous if target.grace_until.is_some_and(|g| g <= now) => {
                return Err(StoreError::Conflict(format!(
                    "credential version {version}'s grace has ended; it is being retired"
                )));
            }
            CredentialState::Staged | CredentialState::Previous => {}
        }
        let old: Option<i64> = sqlx::query_scalar(
            "SELECT version FROM vendor_credentials WHERE vendor = $1 AND state = 'active'",
        )
        .bind(vendor)
        .fetch_optional(w.conn())
        .await?;
        if let Some(old) = old {
            if grace > chrono::TimeDelta::zero() {
                sqlx::query(
                    "UPDATE vendor_credentials SET state = 'previous', grace_until = $3 \
                     WHERE vendor = $1 AND version = $2",
                )
                .bind(vendor)
                .bind(old)
                .bind(micros(now + grace))
                .execute(w.conn())
                .await?;
            } else {
                Self::retire_where(w.conn(), vendor, "state = 'active'", now_us).await?;
            }
        }
        sqlx::query(
            "UPDATE vendor_credentials SET state = 'active', promoted_at = $3, grace_until = NULL \
             WHERE vendor = $1 AND version = $2",
        )
        .bind(vendor)
        .bind(version)
        .bind(now_us)
        .execute(w.conn())
        .await?;
        // A vendor's credential age is its active version's age.
        sqlx::query(
            "UPDATE vendors SET credential_set_at = (SELECT created_at FROM vendor_credentials \
             WHERE vendor = $1 AND version = $2) WHERE name = $1",
        )
        .bind(vendor)
        .bind(version)
        .execute(w.conn())
        .await?;
        let active = Self::credential_row(w.conn(), vendor, version)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("credential version {version}")))?
            .into_domain()?;
        let previous = match old {
            Some(old) => Self::credential_row(w.conn(), vendor, old)
                .await?
                .map(CredentialRow::into_domain)
                .transpose()?,
            None => None,
        };
        Self::append_changes(w.conn(), CHANGE_VENDOR, &[vendor]).await?;
        w.commit().await?;
        Ok(Promotion {
            active,
            previous,
            changed: true,
        })
    }

    async fn retire_credentials(&self, now: DateTime<Utc>) -> StoreResult<Vec<(String, i64)>> {
        let due: Vec<(String, i64)> = sqlx::query_as(
            "SELECT vendor, version FROM vendor_credentials \
             WHERE state = 'previous' AND grace_until <= $1 ORDER BY vendor, version",
        )
        .bind(micros(now))
        .fetch_all(&self.pool)
        .await?;
        let mut retired = Vec::with_capacity(due.len());
        for (vendor, version) in due {
            // Only if still previous and due: a rollback meanwhile made it
            // active again.
            let done = sqlx::query(
                "UPDATE vendor_credentials SET state = 'retired', sealed = NULL, retired_at = $3, \
                 grace_until = NULL WHERE vendor = $1 AND version = $2 AND state = 'previous' \
                 AND grace_until <= $3",
            )
            .bind(vendor.as_str())
            .bind(version)
            .bind(micros(now))
            .execute(&self.pool)
            .await?;
            if D::rows_affected(&done) == 1 {
                retired.push((vendor, version));
            }
        }
        Ok(retired)
    }

    async fn list_vendors(&self) -> StoreResult<Vec<Vendor>> {
        let sql = format!("SELECT {VENDOR_COLUMNS} FROM vendors ORDER BY name");
        sqlx::query_as::<_, VendorRow>(&sql)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(VendorRow::into_domain)
            .collect()
    }

    async fn delete_vendor(&self, name: &str, now: DateTime<Utc>) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        let exists: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT 1 FROM vendors WHERE name = $1{}",
            D::FOR_UPDATE
        ))
        .bind(name)
        .fetch_optional(w.conn())
        .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound(format!("vendor {name}")));
        }
        let active: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM vault_keys \
             WHERE vendor = $1 AND revoked_at IS NULL AND expires_at > $2",
        )
        .bind(name)
        .bind(micros(now))
        .fetch_one(w.conn())
        .await?;
        if active > 0 {
            return Err(StoreError::Conflict(format!(
                "vendor {name} is used by {active} active key(s); revoke them first"
            )));
        }
        sqlx::query("DELETE FROM vendors WHERE name = $1")
            .bind(name)
            .execute(w.conn())
            .await?;
        sqlx::query("DELETE FROM vendor_credentials WHERE vendor = $1")
            .bind(name)
            .execute(w.conn())
            .await?;
        Self::append_changes(w.conn(), CHANGE_VENDOR, &[name]).await?;
        w.commit().await
    }

    async fn insert_key(&self, key: &VaultKey) -> StoreResult<()> {
        let k = KeyInsert::new(key)?;
        let mut w = self.begin_write().await?;
        let vendor: Option<i32> = sqlx::query_scalar(&format!(
            "SELECT 1 FROM vendors WHERE name = $1{}",
            D::FOR_SHARE
        ))
        .bind(k.vendor)
        .fetch_optional(w.conn())
        .await?;
        if vendor.is_none() {
            return Err(StoreError::NotFound(format!("vendor {}", k.vendor)));
        }
        let ancestors = match k.parent_id {
            Some(parent) => Self::parent_ancestors(w.conn(), parent, k.created_at).await?,
            None => Vec::new(),
        };
        Self::insert_key_row(w.conn(), &k).await?;
        let own = (k.id.to_string(), -1);
        for (ancestor, depth) in std::iter::once(&own).chain(&ancestors) {
            sqlx::query(
                "INSERT INTO key_ancestors (key_id, ancestor_id, depth) VALUES ($1, $2, $3)",
            )
            .bind(k.id)
            .bind(ancestor.as_str())
            .bind(i32::try_from(depth + 1).unwrap_or(i32::MAX))
            .execute(w.conn())
            .await?;
        }
        Self::append_changes(w.conn(), CHANGE_KEY, &[k.id]).await?;
        w.commit().await
    }

    async fn get_key(&self, id: &str) -> StoreResult<Option<VaultKey>> {
        let mut conn = self.pool.acquire().await?;
        Self::fetch_key(&mut conn, id).await
    }

    async fn keys_by_id(&self, ids: &[String]) -> StoreResult<Vec<VaultKey>> {
        self.keys_in("id", ids).await
    }

    async fn run_keys(&self, labels: &[String]) -> StoreResult<Vec<VaultKey>> {
        self.keys_in("agent_run_label", labels).await
    }

    async fn find_key_by_hash(&self, key_hash: &[u8; 32]) -> StoreResult<Option<VaultKey>> {
        let sql = format!("SELECT {KEY_COLUMNS} FROM vault_keys WHERE key_hash = $1");
        sqlx::query_as::<_, KeyRow>(&sql)
            .bind(key_hash.as_slice())
            .fetch_optional(&self.pool)
            .await?
            .map(KeyRow::into_domain)
            .transpose()
    }

    async fn list_keys(
        &self,
        filter: &KeyFilter,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<VaultKey>> {
        let mut q = Statement::new(format!("SELECT {KEY_COLUMNS} FROM vault_keys WHERE 1 = 1"));
        if let Some(label) = &filter.agent_run_label {
            q.push(" AND agent_run_label = ").push_bind(label);
        }
        if let Some(vendor) = &filter.vendor {
            q.push(" AND vendor = ").push_bind(vendor);
        }
        if !filter.include_inactive {
            q.push(" AND revoked_at IS NULL AND expires_at > ")
                .push_bind(micros(now));
        }
        q.push(" ORDER BY created_at DESC, id DESC");
        q.query_as::<D::Db, KeyRow>()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(KeyRow::into_domain)
            .collect()
    }

    async fn revoke_key(&self, id: &str, now: DateTime<Utc>) -> StoreResult<RevokedKey> {
        let mut w = self.begin_write().await?;
        let Some(found) = Self::fetch_key(w.conn(), id).await? else {
            return Err(StoreError::NotFound(format!("key {id}")));
        };
        if found.roll.successor_id.is_some() {
            // A rolled key only retires: its budget, and the tree below it,
            // live on in its successor, which keeps them working.
            return Self::retire_rolled_key(w, found, now).await;
        }
        let budget = found.budget_id().to_string();
        // The key's budget tree: every key whose budget is the key's own
        // budget or one below it (a roll chain shares one budget).
        let members = "(id IN (SELECT key_id FROM key_ancestors WHERE ancestor_id = $1) \
             OR budget_id IN (SELECT key_id FROM key_ancestors WHERE ancestor_id = $1))";
        if D::ROW_LOCKS {
            // The subtree's rows are locked in id order, the order a grant
            // locks a key's ancestors in, so a revocation and a grant below
            // it cannot deadlock. A statement begun after the locks sees
            // every child committed before them; a child minted later waits
            // on the key's lock and then finds it revoked.
            let _: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT id FROM vault_keys WHERE {members} ORDER BY id{}",
                D::FOR_UPDATE
            ))
            .bind(budget.as_str())
            .fetch_all(w.conn())
            .await?;
        }
        let mut key = found;
        let mut revoked: Vec<String> = sqlx::query_scalar(&format!(
            "UPDATE vault_keys SET revoked_at = $2 WHERE revoked_at IS NULL AND {members} \
             RETURNING id"
        ))
        .bind(budget.as_str())
        .bind(micros(now))
        .fetch_all(w.conn())
        .await?;
        revoked.sort();
        let refs: Vec<&str> = revoked.iter().map(String::as_str).collect();
        Self::append_changes(w.conn(), CHANGE_KEY, &refs).await?;
        if key.revoked_at.is_none() {
            key.revoked_at = Some(truncate(now));
        }
        let descendants: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT id FROM vault_keys WHERE {members} AND id <> $2 ORDER BY id"
        ))
        .bind(budget.as_str())
        .bind(id)
        .fetch_all(w.conn())
        .await?;
        w.commit().await?;
        Ok(RevokedKey { key, descendants })
    }

    async fn revoke_run(
        &self,
        agent_run_label: &str,
        vendors: Option<&[String]>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<String>> {
        let mut w = self.begin_write().await?;
        // The run's keys and everything below them: a child key spends
        // only while its ancestors may. Locked in id order first (where rows
        // lock), the order grants lock a key's ancestors in.
        let subtrees = |q: &mut Statement| {
            // A roll chain's keys share its budget (the chain's first key),
            // which is where the tree's rows are.
            for column in ["id", "budget_id"] {
                q.push(if column == "id" { "(" } else { " OR " })
                    .push(column)
                    .push(
                        " IN (SELECT a.key_id FROM key_ancestors a \
                         JOIN vault_keys r ON r.id = a.ancestor_id WHERE r.agent_run_label = ",
                    )
                    .push_bind(agent_run_label.to_string());
                if let Some(vendors) = vendors {
                    q.push_in("r.vendor", vendors);
                }
                q.push(")");
            }
            q.push(")");
        };
        if D::ROW_LOCKS {
            let mut lock =
                Statement::new("SELECT id FROM vault_keys WHERE revoked_at IS NULL AND ");
            subtrees(&mut lock);
            lock.push(" ORDER BY id").push(D::FOR_UPDATE);
            let _: Vec<String> = lock.query_scalar::<D::Db, _>().fetch_all(w.conn()).await?;
        }
        let mut q = Statement::new("UPDATE vault_keys SET revoked_at = ");
        q.push_bind(micros(now))
            .push(" WHERE revoked_at IS NULL AND ");
        subtrees(&mut q);
        q.push(" RETURNING id");
        let mut ids: Vec<String> = q.query_scalar::<D::Db, _>().fetch_all(w.conn()).await?;
        ids.sort();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        Self::append_changes(w.conn(), CHANGE_KEY, &refs).await?;
        w.commit().await?;
        Ok(ids)
    }

    async fn enforce_key(&self, id: &str, terms: &EnforcedTerms) -> StoreResult<VaultKey> {
        let mut w = self.begin_write().await?;
        let Some(found) = Self::fetch_key(w.conn(), id).await? else {
            return Err(StoreError::NotFound(format!("key {id}")));
        };
        if found.revoked_at.is_some() {
            return Err(StoreError::Conflict(format!("key {id} is revoked")));
        }
        // Only keys still observing change, so of two switches at once one
        // finds nothing left to switch. The row locks taken here order the
        // switch with every lease grant of the budget (which locks them too).
        let mut switched: Vec<String> = sqlx::query_scalar(
            "UPDATE vault_keys SET observe_ceiling = NULL, daily_cap = $2, per_call_cap = $3, \
             lifetime_cap = $4, allowed_endpoints = $5 \
             WHERE (id = $1 OR budget_id = $1) AND observe_ceiling IS NOT NULL RETURNING id",
        )
        .bind(found.budget_id())
        .bind(terms.daily_cap.0)
        .bind(terms.per_call_cap.map(|m| m.0))
        .bind(terms.lifetime_cap.map(|m| m.0))
        .bind(to_json(&terms.allowed_endpoints, "allowed_endpoints")?)
        .fetch_all(w.conn())
        .await?;
        if !switched.iter().any(|s| s == id) {
            return Err(StoreError::Conflict(format!(
                "key {id} is not in observe mode: it already enforces its policy"
            )));
        }
        switched.sort();
        let refs: Vec<&str> = switched.iter().map(String::as_str).collect();
        Self::append_changes(w.conn(), CHANGE_KEY, &refs).await?;
        let key = Self::fetch_key(w.conn(), id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("key {id}")))?;
        w.commit().await?;
        Ok(key)
    }

    async fn roll_key(
        &self,
        id: &str,
        successor: &VaultKey,
        retire_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<VaultKey> {
        let k = KeyInsert::new(successor)?;
        let mut w = self.begin_write().await?;
        // The rolled key's row is held until commit: two rolls of one key
        // serialise here, and the second finds the first's successor.
        let state: Option<(Option<i64>, i64)> = sqlx::query_as(&format!(
            "SELECT revoked_at, expires_at FROM vault_keys WHERE id = $1{}",
            D::FOR_UPDATE
        ))
        .bind(id)
        .fetch_optional(w.conn())
        .await?;
        match state {
            None => return Err(StoreError::NotFound(format!("key {id}"))),
            Some((Some(_), _)) => return Err(StoreError::Conflict(format!("key {id} is revoked"))),
            Some((None, expires_at)) if expires_at <= micros(now) => {
                return Err(StoreError::Conflict(format!("key {id} has expired")))
            }
            Some(_) => {}
        }
        let mut key = Self::fetch_key(w.conn(), id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("key {id}")))?;
        if let Some(next) = &key.roll.successor_id {
            return Err(StoreError::Conflict(format!(
                "key {id} was already rolled; its successor is {next}"
            )));
        }
        if successor.roll.rolled_from.as_deref() != Some(id)
            || successor.roll.budget_id.as_deref() != Some(key.budget_id())
        {
            return Err(StoreError::Conflict(format!(
                "successor {} does not name key {id} and its budget",
                successor.id
            )));
        }
        Self::insert_key_row(w.conn(), &k).await?;
        sqlx::query("UPDATE vault_keys SET successor_id = $1, retire_at = $2 WHERE id = $3")
            .bind(successor.id.as_str())
            .bind(micros(retire_at))
            .bind(id)
            .execute(w.conn())
            .await?;
        Self::append_changes(w.conn(), CHANGE_KEY, &[id, successor.id.as_str()]).await?;
        w.commit().await?;
        key.roll.successor_id = Some(successor.id.clone());
        key.roll.retire_at = Some(truncate(retire_at));
        Ok(key)
    }

    async fn due_retirements(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM vault_keys WHERE retire_at <= $1 AND revoked_at IS NULL \
             ORDER BY retire_at, id LIMIT $2",
        )
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn key_spend(&self, id: &str, day: &str) -> StoreResult<KeySpend> {
        let (spent_day, calls_day, spent_lifetime): (i64, i64, i64) = sqlx::query_as(
            "SELECT \
               CAST(COALESCE(SUM(CASE WHEN day = $2 THEN spent END), 0) AS BIGINT), \
               CAST(COALESCE(SUM(CASE WHEN day = $2 THEN calls END), 0) AS BIGINT), \
               CAST(COALESCE(SUM(spent), 0) AS BIGINT) \
             FROM key_spend_daily WHERE key_id = \
               COALESCE((SELECT budget_id FROM vault_keys WHERE id = $1), $1)",
        )
        .bind(id)
        .bind(day)
        .fetch_one(&self.pool)
        .await?;
        Ok(KeySpend {
            spent_day: Micros(spent_day),
            calls_day,
            spent_lifetime: Micros(spent_lifetime),
        })
    }

    async fn budgets_spent_on(
        &self,
        budget_ids: &[String],
        day: &str,
    ) -> StoreResult<Vec<(String, Micros)>> {
        let mut spent = Vec::with_capacity(budget_ids.len());
        for ids in spend_chunks(budget_ids) {
            let mut q = Statement::new("SELECT key_id, spent FROM key_spend_daily WHERE day = ");
            q.push_bind(day).push_in("key_id", ids);
            let rows: Vec<(String, i64)> = q.query_as::<D::Db, _>().fetch_all(&self.pool).await?;
            spent.extend(rows.into_iter().map(|(id, v)| (id, Micros(v))));
        }
        Ok(spent)
    }

    async fn budget_levels(
        &self,
        key_id: &str,
        day: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<super::BudgetLevel>> {
        let levels: Vec<TreeLevelRow> =
            sqlx::query_as(&tree_levels_sql("$1", "$2", "$3", D::GREATEST))
                .bind(key_id)
                .bind(day)
                .bind(micros(now - super::unreturned_lease_grace()))
                .fetch_all(&self.pool)
                .await?;
        Ok(levels.into_iter().map(TreeLevelRow::into_level).collect())
    }

    fn change_feed(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.dialect.change_feed(&self.pool)
    }

    async fn latest_version(&self) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT CAST(COALESCE(MAX(version), 0) AS BIGINT) FROM change_log")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn changes_since(&self, after: i64, limit: u32) -> StoreResult<Vec<Change>> {
        sqlx::query_as::<_, ChangeRow>(
            "SELECT version, kind, ref_id FROM change_log \
             WHERE version > $1 ORDER BY version LIMIT $2",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(ChangeRow::into_domain)
        .collect()
    }

    async fn prune_changes(&self, through: i64) -> StoreResult<u64> {
        let mut w = self.begin_write().await?;
        let done = sqlx::query("DELETE FROM change_log WHERE version <= $1")
            .bind(through)
            .execute(w.conn())
            .await?;
        let n = D::rows_affected(&done);
        w.commit().await?;
        Ok(n)
    }

    async fn oldest_version(&self) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT CAST(COALESCE(MIN(version), 0) AS BIGINT) FROM change_log")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn policy_keys(&self, expired_after: DateTime<Utc>) -> StoreResult<Vec<VaultKey>> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM vault_keys \
             WHERE expires_at > $1 ORDER BY id"
        );
        sqlx::query_as::<_, KeyRow>(&sql)
            .bind(micros(expired_after))
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(KeyRow::into_domain)
            .collect()
    }

    async fn grant_lease(
        &self,
        req: &LeaseGrantRequest,
        now: DateTime<Utc>,
    ) -> StoreResult<LeaseGrant> {
        // Nothing that weighs on the caps changes between reading the usage
        // and writing the grant: on SQLite the write transaction holds the
        // database write lock from here to commit; on PostgreSQL the key and
        // every ancestor are locked, in id order, which serialises every
        // grant that draws on any of them across replicas (grants on sibling
        // keys meet at their common parent), and the usage is then read in
        // ONE statement, so a spend batch committing in between is seen whole
        // or not at all.
        let mut w = self.begin_write().await?;
        // Every key of a roll chain spends one budget, the chain's first
        // key: the grant, its lease and the tree are that budget's, so a
        // roll never adds to what the chain may spend.
        let budget: Option<String> =
            sqlx::query_scalar("SELECT COALESCE(budget_id, id) FROM vault_keys WHERE id = $1")
                .bind(req.key_id.as_str())
                .fetch_optional(w.conn())
                .await?;
        let Some(budget) = budget else {
            return Err(StoreError::NotFound(format!("key {}", req.key_id)));
        };
        if D::ROW_LOCKS {
            let locked: Vec<String> = sqlx::query_scalar(&format!(
                "SELECT id FROM vault_keys WHERE id IN \
                   (SELECT ancestor_id FROM key_ancestors WHERE key_id = $1) \
                 ORDER BY id{}",
                D::FOR_UPDATE
            ))
            .bind(budget.as_str())
            .fetch_all(w.conn())
            .await?;
            if locked.is_empty() {
                return Err(StoreError::NotFound(format!("key {}", req.key_id)));
            }
        }
        // The key and each ancestor with its subtree's usage, key first.
        let levels: Vec<TreeLevelRow> =
            sqlx::query_as(&tree_levels_sql("$1", "$2", "$3", D::GREATEST))
                .bind(budget.as_str())
                .bind(req.day.as_str())
                .bind(micros(now - super::unreturned_lease_grace()))
                .fetch_all(w.conn())
                .await?;
        let key = match levels.first() {
            Some(l) if l.depth == 0 => l.budget.clone(),
            _ => return Err(StoreError::NotFound(format!("key {}", req.key_id))),
        };

        let prior: Option<GrantRow> = sqlx::query_as(
            "SELECT lease_id, granted, lease_total, unleased, expires_at, lifetime_bound \
             FROM lease_grants WHERE grant_id = $1",
        )
        .bind(&req.grant_id)
        .fetch_optional(w.conn())
        .await?;
        if let Some(prior) = prior {
            if prior.lease_id != req.lease_id {
                return Err(StoreError::Conflict(format!(
                    "grant {} was made for another lease",
                    req.grant_id
                )));
            }
            return prior.into_domain();
        }

        let lease: Option<LeaseRow> = sqlx::query_as(&format!(
            "SELECT {LEASE_COLUMNS} FROM leases WHERE id = $1{}",
            D::FOR_UPDATE
        ))
        .bind(&req.lease_id)
        .fetch_optional(w.conn())
        .await?;
        check_grant(
            &budget,
            &key,
            lease.as_ref(),
            &req.node_id,
            &req.day,
            req.expires_at,
            now,
        )?;

        check_ancestors(&levels, now)?;
        let decision = decide_tree_grant(
            levels.iter().map(|l| (&l.budget, l.usage)),
            req.requested,
            req.minimum,
        );
        let granted = decision.granted;

        let (lease_total, expires_at) = match &lease {
            Some(l) => {
                sqlx::query("UPDATE leases SET granted = granted + $1 WHERE id = $2")
                    .bind(granted)
                    .bind(&req.lease_id)
                    .execute(w.conn())
                    .await?;
                (l.granted + granted, l.expires_at)
            }
            None => {
                sqlx::query(
                    "INSERT INTO leases (id, key_id, node_id, day, granted, reported, expires_at, closed) \
                     VALUES ($1, $2, $3, $4, $5, 0, $6, FALSE)",
                )
                .bind(&req.lease_id)
                .bind(budget.as_str())
                .bind(&req.node_id)
                .bind(&req.day)
                .bind(granted)
                .bind(micros(req.expires_at))
                .execute(w.conn())
                .await
                .map_err(|e| conflict_on_unique(e, || format!("lease {} exists", req.lease_id)))?;
                (granted, micros(req.expires_at))
            }
        };
        let answer = GrantRow {
            lease_id: req.lease_id.clone(),
            granted,
            lease_total,
            unleased: decision.unleased,
            expires_at,
            lifetime_bound: decision.lifetime_bound,
        };
        sqlx::query(
            "INSERT INTO lease_grants \
             (grant_id, lease_id, granted, lease_total, unleased, expires_at, lifetime_bound) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&req.grant_id)
        .bind(&answer.lease_id)
        .bind(answer.granted)
        .bind(answer.lease_total)
        .bind(answer.unleased)
        .bind(answer.expires_at)
        .bind(answer.lifetime_bound)
        .execute(w.conn())
        .await
        .map_err(|e| conflict_on_unique(e, || format!("grant {} exists", req.grant_id)))?;
        w.commit().await?;
        answer.into_domain()
    }

    async fn return_lease(
        &self,
        lease_id: &str,
        node: Option<&str>,
        spent: Micros,
    ) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        // A closed lease keeps the spend of its first return.
        let done = sqlx::query(
            "UPDATE leases SET granted = CASE WHEN closed THEN granted ELSE $1 END, closed = TRUE \
             WHERE id = $2 AND (CAST($3 AS TEXT) IS NULL OR node_id = $3)",
        )
        .bind(spent.0.max(0))
        .bind(lease_id)
        .bind(node)
        .execute(w.conn())
        .await?;
        if D::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(format!("lease {lease_id}")));
        }
        w.commit().await
    }

    async fn shrink_lease(
        &self,
        lease_id: &str,
        node: Option<&str>,
        from: Micros,
        to: Micros,
    ) -> StoreResult<bool> {
        let mut w = self.begin_write().await?;
        let done = sqlx::query(&format!(
            "UPDATE leases SET granted = {}($1, reported) \
             WHERE id = $2 AND (CAST($3 AS TEXT) IS NULL OR node_id = $3) AND NOT closed \
             AND granted = $4",
            D::GREATEST
        ))
        .bind(to.0)
        .bind(lease_id)
        .bind(node)
        .bind(from.0)
        .execute(w.conn())
        .await?;
        let shrank = D::rows_affected(&done) > 0;
        if !shrank {
            let known: Option<i32> = sqlx::query_scalar(
                "SELECT 1 FROM leases WHERE id = $1 AND (CAST($2 AS TEXT) IS NULL OR node_id = $2)",
            )
            .bind(lease_id)
            .bind(node)
            .fetch_optional(w.conn())
            .await?;
            if known.is_none() {
                return Err(StoreError::NotFound(format!("lease {lease_id}")));
            }
        }
        w.commit().await?;
        Ok(shrank)
    }

    async fn register_fleet_node(
        &self,
        node: &str,
        replica: &str,
        stream: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO fleet_nodes \
             (node_id, replica, stream_id, applied_version, connected_at, heartbeat_at) \
             VALUES ($1, $2, $3, 0, $4, $4) \
             ON CONFLICT (node_id) DO UPDATE SET replica = excluded.replica, \
               stream_id = excluded.stream_id, applied_version = 0, \
               connected_at = excluded.connected_at, heartbeat_at = excluded.heartbeat_at",
        )
        .bind(node)
        .bind(replica)
        .bind(stream)
        .bind(micros(now))
        .execute(w.conn())
        .await?;
        w.commit().await
    }

    async fn unregister_fleet_node(&self, node: &str, stream: &str) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        sqlx::query("DELETE FROM fleet_nodes WHERE node_id = $1 AND stream_id = $2")
            .bind(node)
            .bind(stream)
            .execute(w.conn())
            .await?;
        w.commit().await
    }

    async fn ack_policy(&self, node: &str, version: i64) -> StoreResult<bool> {
        let mut w = self.begin_write().await?;
        let done = sqlx::query(&format!(
            "UPDATE fleet_nodes SET applied_version = {}(applied_version, $2) WHERE node_id = $1",
            D::GREATEST
        ))
        .bind(node)
        .bind(version)
        .execute(w.conn())
        .await?;
        w.commit().await?;
        Ok(D::rows_affected(&done) == 1)
    }

    async fn heartbeat_fleet_nodes(
        &self,
        replica: &str,
        now: DateTime<Utc>,
        forget_before: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        sqlx::query("UPDATE fleet_nodes SET heartbeat_at = $1 WHERE replica = $2")
            .bind(micros(now))
            .bind(replica)
            .execute(w.conn())
            .await?;
        sqlx::query("DELETE FROM fleet_nodes WHERE heartbeat_at < $1")
            .bind(micros(forget_before))
            .execute(w.conn())
            .await?;
        w.commit().await
    }

    async fn outstanding_leases(
        &self,
        now: DateTime<Utc>,
    ) -> StoreResult<(i64, keycap_proto::Micros)> {
        let (leases, unreported): (i64, i64) = sqlx::query_as(
            "SELECT CAST(COUNT(*) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN granted > reported \
             THEN granted - reported ELSE 0 END), 0) AS BIGINT) \
             FROM leases WHERE NOT closed AND expires_at > $1",
        )
        .bind(micros(now))
        .fetch_one(&self.pool)
        .await?;
        Ok((leases, keycap_proto::Micros(unreported)))
    }

    async fn fleet_nodes(&self) -> StoreResult<Vec<FleetNode>> {
        let sql = format!("SELECT {FLEET_NODE_COLUMNS} FROM fleet_nodes ORDER BY node_id");
        sqlx::query_as::<_, FleetNodeRow>(&sql)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(FleetNodeRow::into_domain)
            .collect()
    }

    async fn report_vendor_errors(
        &self,
        node: &str,
        errors: &[(String, String)],
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        if errors.is_empty() {
            // The common case, on every acknowledgement: no write unless
            // there is something to clear.
            let had = sqlx::query("SELECT 1 FROM vendor_load_errors WHERE node_id = $1 LIMIT 1")
                .bind(node)
                .fetch_optional(&self.pool)
                .await?;
            if had.is_none() {
                return Ok(());
            }
        }
        let mut w = self.begin_write().await?;
        sqlx::query("DELETE FROM vendor_load_errors WHERE node_id = $1")
            .bind(node)
            .execute(w.conn())
            .await?;
        for (vendor, error) in errors {
            sqlx::query(
                "INSERT INTO vendor_load_errors (node_id, vendor, error, at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (node_id, vendor) DO UPDATE SET error = excluded.error, at = excluded.at",
            )
            .bind(node)
            .bind(vendor)
            .bind(error)
            .bind(micros(at))
            .execute(w.conn())
            .await?;
        }
        w.commit().await
    }

    async fn vendor_load_errors(&self, vendor: Option<&str>) -> StoreResult<Vec<VendorLoadError>> {
        sqlx::query_as::<_, VendorLoadErrorRow>(&vendor_load_errors_sql("CAST($1 AS TEXT)"))
            .bind(vendor)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(VendorLoadErrorRow::into_domain)
            .collect()
    }

    async fn lease_holders(
        &self,
        key_ids: &[String],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<String>> {
        let mut q = Statement::new(
            "SELECT DISTINCT node_id FROM leases WHERE NOT closed AND granted > reported \
             AND expires_at > ",
        );
        q.push_bind(micros(now));
        q.push_in("key_id", key_ids);
        q.push(" ORDER BY node_id");
        Ok(q.query_scalar::<D::Db, _>().fetch_all(&self.pool).await?)
    }

    async fn node_leases(
        &self,
        node: &str,
        counted_after: DateTime<Utc>,
    ) -> StoreResult<Vec<NodeLease>> {
        let sql = format!(
            "SELECT {NODE_LEASE_COLUMNS} FROM leases \
             WHERE node_id = $1 AND NOT closed AND expires_at > $2 ORDER BY id"
        );
        sqlx::query_as::<_, NodeLeaseRow>(&sql)
            .bind(node)
            .bind(micros(counted_after))
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(NodeLeaseRow::into_domain)
            .collect()
    }

    async fn fence_leases(
        &self,
        node_ids: &[String],
        key_ids: &[String],
        now: DateTime<Utc>,
    ) -> StoreResult<Micros> {
        let mut w = self.begin_write().await?;
        let mut q = Statement::new("UPDATE leases SET fenced_at = COALESCE(fenced_at, ");
        q.push_bind(micros(now))
            .push(") WHERE NOT closed AND expires_at > ")
            .push_bind(micros(now));
        q.push_in("node_id", node_ids);
        q.push_in("key_id", key_ids);
        q.push(format!(" RETURNING {}(granted - reported, 0)", D::GREATEST));
        let unspent: Vec<i64> = q.query_scalar::<D::Db, _>().fetch_all(w.conn()).await?;
        w.commit().await?;
        Ok(Micros(unspent.into_iter().fold(0i64, i64::saturating_add)))
    }

    async fn apply_spend(&self, events: &[SpendEvent]) -> StoreResult<Vec<bool>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        if !D::ROW_LOCKS {
            // One writer at a time: nothing to do ahead of the lock.
            return Ok(self.append_locked(events).await?.0);
        }
        let mut ticket = self
            .appends
            .ticket(events.iter().map(|e| e.event_id.as_str()));
        match self.append_ahead(events, &mut ticket).await {
            Ok(Some(applied)) => return Ok(applied),
            Ok(None) => {}
            Err(e) => tracing::debug!(
                error = %e,
                "a spend batch written ahead of the ledger head's lock failed; appending it under the lock"
            ),
        }
        ticket.earlier_done().await;
        let (applied, head) = self.append_locked(events).await?;
        ticket.done(Some(head));
        Ok(applied)
    }

    async fn audit_chain(
        &self,
        after_seq: i64,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: u32,
    ) -> StoreResult<Vec<AuditEntry>> {
        let mut q = Statement::new(format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE seq > "));
        q.push_bind(after_seq);
        q.push_time_range(since, until);
        q.push(" ORDER BY seq LIMIT ").push_bind(i64::from(limit));
        q.query_as::<D::Db, AuditRow>()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(AuditRow::into_domain)
            .collect()
    }

    async fn ledger_head(&self) -> StoreResult<(i64, [u8; 32])> {
        let (seq, hash): (i64, Vec<u8>) =
            sqlx::query_as("SELECT seq, hash FROM ledger_head WHERE id = 1")
                .fetch_one(&self.pool)
                .await?;
        let hash = hash
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::Corrupt("ledger_head.hash: not 32 bytes".into()))?;
        Ok((seq, hash))
    }

    async fn insert_checkpoint(&self, cp: &Checkpoint) -> StoreResult<bool> {
        let mut w = self.begin_write().await?;
        let done = sqlx::query(
            "INSERT INTO ledger_checkpoints (seq, hash, at, public_key, signature) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (seq) DO NOTHING",
        )
        .bind(cp.seq)
        .bind(&cp.hash[..])
        .bind(micros(cp.at))
        .bind(&cp.public_key[..])
        .bind(&cp.signature[..])
        .execute(w.conn())
        .await?;
        w.commit().await?;
        Ok(D::rows_affected(&done) == 1)
    }

    async fn checkpoints(
        &self,
        signed_by: Option<&[[u8; 32]]>,
        limit: u32,
    ) -> StoreResult<Vec<Checkpoint>> {
        let mut q = Statement::new(
            "SELECT seq, hash, at, public_key, signature FROM ledger_checkpoints WHERE 1 = 1",
        );
        if let Some(keys) = signed_by {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            q.push(" AND public_key IN (");
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    q.push(", ");
                }
                q.push_bind(key.to_vec());
            }
            q.push(")");
        }
        q.push(" ORDER BY seq DESC LIMIT ")
            .push_bind(i64::from(limit));
        let rows: Vec<(i64, Vec<u8>, i64, Vec<u8>, Vec<u8>)> =
            q.query_as::<D::Db, _>().fetch_all(&self.pool).await?;
        let bytes = |v: Vec<u8>, column: &str| {
            v.try_into()
                .map_err(|_| StoreError::Corrupt(format!("ledger_checkpoints.{column}: length")))
        };
        rows.into_iter()
            .map(|(seq, hash, at, public_key, signature)| {
                Ok(Checkpoint {
                    seq,
                    hash: bytes(hash, "hash")?,
                    at: from_micros(at, "ledger_checkpoints.at")?,
                    public_key: bytes(public_key, "public_key")?,
                    signature: signature.try_into().map_err(|_| {
                        StoreError::Corrupt("ledger_checkpoints.signature: length".into())
                    })?,
                })
            })
            .collect()
    }

    async fn ledger_signing_keys(&self) -> StoreResult<Vec<(String, Vec<u8>, Vec<u8>)>> {
        Ok(sqlx::query_as(
            "SELECT id, public_key, sealed_private FROM ledger_signing_keys \
             ORDER BY created_at DESC, id DESC",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn insert_ledger_signing_key(
        &self,
        id: &str,
        public_key: &[u8],
        sealed_private: &[u8],
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO ledger_signing_keys (id, public_key, sealed_private, created_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(public_key)
        .bind(sealed_private)
        .bind(micros(at))
        .execute(w.conn())
        .await
        .map_err(|e| conflict_on_unique(e, || format!("signing key {id} exists")))?;
        w.commit().await
    }

    async fn query_audit(&self, aq: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        let mut q = Statement::new(format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE 1 = 1"));
        if let Some(key_id) = &aq.key_id {
            q.push_eq_as(D::indexed_text_eq, "key_id", key_id);
        }
        if let Some(label) = &aq.agent_run_label {
            q.push_eq_as(D::indexed_text_eq, "agent_run_label", label);
        }
        if let Some(vendor) = &aq.vendor {
            q.push(" AND vendor = ").push_bind(vendor);
        }
        if let Some(vendors) = &aq.vendors {
            q.push_in("vendor", vendors);
        }
        q.push_time_range(aq.since, aq.until);
        if let Some(trace_id) = &aq.trace_id {
            q.push_eq_as(D::indexed_text_eq, "trace_id", trace_id);
            if !trace_id.is_empty() {
                // The trace index holds only traced entries; saying so
                // lets the database use it.
                q.push(" AND trace_id <> ''");
            }
        }
        if let Some((key, value)) = &aq.context {
            let key = q.arg(key);
            q.push(format!(" AND {} = ", D::json_text("context", &key)))
                .push_bind(value);
        }
        if let Some(outcome) = aq.outcome {
            q.push(" AND outcome = ").push_bind(outcome.as_str());
        }
        if let Some(reason) = &aq.refusal_reason {
            q.push(" AND refusal_reason = ").push_bind(reason);
            if !reason.is_empty() {
                // Only refused entries carry a reason; saying so lets
                // PostgreSQL use its refusal index, which holds only them.
                q.push(" AND outcome = 'refused'");
            }
        }
        if let Some(before) = aq.before_seq {
            q.push(" AND seq < ").push_bind(before);
        }
        q.push(" ORDER BY seq DESC LIMIT ")
            .push_bind(audit_limit(aq.limit));
        q.query_as::<D::Db, AuditRow>()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(AuditRow::into_domain)
            .collect()
    }

    async fn ensure_audit_partitions(&self) -> StoreResult<()> {
        D::ensure_audit_partitions(&self.pool).await
    }

    async fn drop_audit_partitions(
        &self,
        before: chrono::NaiveDate,
        covered: i64,
    ) -> StoreResult<Vec<String>> {
        let mut dropped = Vec::new();
        for part in D::audit_partitions(&self.pool).await? {
            if part.day >= before {
                break;
            }
            let mut w = self.begin_write().await?;
            // The retention row first: replicas pruning at once take turns.
            let (through,): (i64,) = sqlx::query_as(&format!(
                "SELECT dropped_through FROM ledger_retention WHERE id = 1{}",
                D::FOR_UPDATE
            ))
            .fetch_one(w.conn())
            .await?;
            let last: Option<(i64, Option<Vec<u8>>)> = sqlx::query_as(&format!(
                "SELECT seq, hash FROM {} ORDER BY seq DESC LIMIT 1",
                part.table
            ))
            .fetch_optional(w.conn())
            .await?;
            if last.as_ref().is_some_and(|(seq, _)| *seq > covered) {
                break;
            }
            // Detaching holds the ledger's table from here to commit, so no
            // append looks events up until the day is gone and the head's
            // row says where the kept ledger now starts: every append
            // reads that with the head, under its lock (`check_kept`).
            D::drop_audit_partition(w.conn(), &part).await?;
            let kept_from = part
                .day
                .succ_opt()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map_or(i64::MAX, |t| t.and_utc().timestamp_micros());
            sqlx::query(&format!(
                "UPDATE ledger_head SET kept_from = {}(kept_from, $1) WHERE id = 1",
                D::GREATEST
            ))
            .bind(kept_from)
            .execute(w.conn())
            .await?;
            if let Some((seq, hash)) = last.filter(|(seq, _)| *seq > through) {
                let hash = hash.unwrap_or_else(|| ledger::GENESIS.to_vec());
                sqlx::query(
                    "UPDATE ledger_retention SET dropped_through = $1, dropped_hash = $2 \
                     WHERE id = 1",
                )
                .bind(seq)
                .bind(hash.as_slice())
                .execute(w.conn())
                .await?;
            }
            w.commit().await?;
            dropped.push(part.table);
        }
        Ok(dropped)
    }

    async fn record_export(&self, through_seq: i64) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        sqlx::query(&format!(
            "UPDATE ledger_retention SET exported_through = {}(exported_through, $1) WHERE id = 1",
            D::GREATEST
        ))
        .bind(through_seq)
        .execute(w.conn())
        .await?;
        w.commit().await
    }

    async fn ledger_retention(&self) -> StoreResult<Retention> {
        let (exported_through, dropped_through, hash): (i64, i64, Vec<u8>) = sqlx::query_as(
            "SELECT exported_through, dropped_through, dropped_hash FROM ledger_retention \
             WHERE id = 1",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Retention {
            exported_through,
            dropped_through,
            dropped_hash: hash.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt("ledger_retention.dropped_hash: not 32 bytes".into())
            })?,
        })
    }

    async fn spend_summary(&self, agent_run_label: &str) -> StoreResult<SpendSummary> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(&format!(
            "SELECT vendor, CAST(COALESCE(SUM(cost), 0) AS BIGINT), COUNT(*) FROM audit \
             WHERE {} AND outcome <> 'refused' GROUP BY vendor ORDER BY vendor",
            D::indexed_text_eq("agent_run_label", "$1")
        ))
        .bind(agent_run_label)
        .fetch_all(&self.pool)
        .await?;
        let mut summary = SpendSummary::default();
        for (vendor, total, calls) in rows {
            summary.total = summary.total.saturating_add(Micros(total));
            summary.calls += calls;
            summary.vendors.push((vendor, Micros(total), calls));
        }
        Ok(summary)
    }

    async fn spend_report(&self, rq: &SpendReportQuery) -> StoreResult<SpendReport> {
        // Refusal entries cost nothing (their `cost` is 0) and are no
        // forwarded call; they count in `refused_calls`.
        const MEASURES: &str = "CAST(COALESCE(SUM(cost), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN outcome = 'refused' THEN 0 ELSE 1 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(refused_calls), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN would_refuse = '' THEN 0 ELSE 1 END), 0) AS BIGINT), \
             CAST(COALESCE(SUM(CASE WHEN would_refuse = '' THEN 0 ELSE cost END), 0) AS BIGINT)";
        let filter = |q: &mut Statement| {
            q.push_time_range(rq.since, rq.until);
            if let Some(label) = &rq.agent_run_label {
                q.push_eq_as(D::indexed_text_eq, "agent_run_label", label.as_str());
            }
            if let Some(vendors) = &rq.vendors {
                q.push_in("vendor", vendors);
            }
        };
        let mut q = Statement::new(format!("SELECT {MEASURES} FROM audit WHERE 1 = 1"));
        filter(&mut q);
        let (total, calls, refused_calls, would_refuse_calls, would_refuse): (
            i64,
            i64,
            i64,
            i64,
            i64,
        ) = q.query_as::<D::Db, _>().fetch_one(&self.pool).await?;
        let mut report = SpendReport {
            total: Micros(total),
            calls,
            refused_calls,
            would_refuse_calls,
            would_refuse: Micros(would_refuse),
            ..SpendReport::default()
        };
        if rq.group_by.is_empty() {
            return Ok(report);
        }
        // Every dimension is selected, those not grouped by as '' (one row
        // shape whatever the grouping).
        let column = |d: SpendDimension| match d {
            SpendDimension::RunLabel => "agent_run_label",
            SpendDimension::Key => "key_id",
            SpendDimension::Vendor => "vendor",
            SpendDimension::Day => "day",
        };
        let all = [
            SpendDimension::RunLabel,
            SpendDimension::Key,
            SpendDimension::Vendor,
            SpendDimension::Day,
        ];
        let selected: Vec<String> = all
            .iter()
            .map(|&d| {
                if rq.group_by.contains(&d) {
                    column(d).to_string()
                } else {
                    "CAST('' AS TEXT)".to_string()
                }
            })
            .collect();
        let grouped: Vec<&str> = rq.group_by.iter().map(|&d| column(d)).collect();
        let mut q = Statement::new(format!(
            "SELECT {}, {MEASURES} FROM audit WHERE 1 = 1",
            selected.join(", ")
        ));
        filter(&mut q);
        // One more than asked for tells whether groups were left out.
        q.push(format!(
            " GROUP BY {g} ORDER BY 5 DESC, 6 DESC, {g} LIMIT ",
            g = grouped.join(", ")
        ))
        .push_bind(i64::from(rq.top) + 1);
        type Row = (String, String, String, String, i64, i64, i64, i64, i64);
        let rows: Vec<Row> = q.query_as::<D::Db, _>().fetch_all(&self.pool).await?;
        report.more = rows.len() > rq.top as usize;
        let has = |d: SpendDimension, v: String| rq.group_by.contains(&d).then_some(v);
        report.groups = rows
            .into_iter()
            .take(rq.top as usize)
            .map(
                |(label, key, vendor, day, total, calls, refused_calls, would_calls, would)| {
                    SpendGroup {
                        agent_run_label: has(SpendDimension::RunLabel, label),
                        key_id: has(SpendDimension::Key, key),
                        vendor: has(SpendDimension::Vendor, vendor),
                        day: has(SpendDimension::Day, day),
                        total: Micros(total),
                        calls,
                        refused_calls,
                        would_refuse_calls: would_calls,
                        would_refuse: Micros(would),
                    }
                },
            )
            .collect();
        Ok(report)
    }

    async fn insert_webhook_endpoint(
        &self,
        e: &WebhookEndpoint,
        sealed_secret: &[u8],
    ) -> StoreResult<()> {
        let (events, thresholds) = endpoint_lists(e)?;
        let mut w = self.begin_write().await?;
        sqlx::query(&format!(
            "INSERT INTO webhook_endpoints ({ENDPOINT_COLUMNS}, sealed_secret) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        ))
        .bind(e.id.as_str())
        .bind(e.url.as_str())
        .bind(events)
        .bind(thresholds)
        .bind(e.run_label.as_deref())
        .bind(e.key_id.as_deref())
        .bind(e.format.as_str())
        .bind(e.description.as_str())
        .bind(micros(e.created_at))
        .bind(sealed_secret)
        .execute(w.conn())
        .await
        .map_err(|err| conflict_on_unique(err, || format!("webhook {} already exists", e.id)))?;
        w.commit().await
    }

    async fn list_webhook_endpoints(&self) -> StoreResult<Vec<WebhookEndpoint>> {
        let sql =
            format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints ORDER BY created_at, id");
        sqlx::query_as::<_, WebhookEndpointRow>(&sql)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(WebhookEndpointRow::into_domain)
            .collect()
    }

    async fn get_webhook_endpoint(&self, id: &str) -> StoreResult<Option<WebhookEndpoint>> {
        let sql = format!("SELECT {ENDPOINT_COLUMNS} FROM webhook_endpoints WHERE id = $1");
        sqlx::query_as::<_, WebhookEndpointRow>(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(WebhookEndpointRow::into_domain)
            .transpose()
    }

    async fn delete_webhook_endpoint(&self, id: &str) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        // Attempts go with their deliveries, deliveries with their endpoint
        // (ON DELETE CASCADE); events stay, other endpoints may hold them.
        let done = sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1")
            .bind(id)
            .execute(w.conn())
            .await?;
        if D::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(format!("webhook {id}")));
        }
        w.commit().await
    }

    async fn enqueue_webhook_event(
        &self,
        event: &WebhookEvent,
        dedupe: Option<&str>,
        endpoint_ids: &[String],
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut w = self.begin_write().await?;
        let done = sqlx::query(
            "INSERT INTO webhook_events (id, type, dedupe, payload, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(event.id.as_str())
        .bind(event.kind.as_str())
        .bind(dedupe)
        .bind(event.payload())
        .bind(micros(event.created_at))
        .execute(w.conn())
        .await?;
        if D::rows_affected(&done) == 0 {
            return Ok(false);
        }
        for endpoint in endpoint_ids {
            sqlx::query(
                "INSERT INTO webhook_deliveries (endpoint_id, event_id, state, attempts, \
                 next_attempt_at, created_at) VALUES ($1, $2, 'pending', $3, $4, $5)",
            )
            .bind(endpoint.as_str())
            .bind(event.id.as_str())
            .bind(0i32)
            .bind(micros(now))
            .bind(micros(now))
            .execute(w.conn())
            .await?;
        }
        w.commit().await?;
        Ok(true)
    }

    async fn claim_webhook_deliveries(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        let mut w = self.begin_write().await?;
        // The head of each endpoint's queue: no earlier pending delivery of
        // the same endpoint (a leased one, in flight elsewhere, counts).
        let seqs: Vec<i64> = sqlx::query_scalar(&format!(
            "SELECT d.seq FROM webhook_deliveries d WHERE d.state = 'pending' \
             AND d.next_attempt_at <= $1 AND (d.lease_until IS NULL OR d.lease_until <= $1) \
             AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e WHERE e.endpoint_id = d.endpoint_id \
             AND e.state = 'pending' AND e.seq < d.seq) \
             ORDER BY d.seq LIMIT $2{}",
            D::SKIP_LOCKED
        ))
        .bind(micros(now))
        .bind(i64::from(limit))
        .fetch_all(w.conn())
        .await?;
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = seqs.iter().map(|s| s.to_string()).collect();
        let mut q = Statement::new("UPDATE webhook_deliveries SET lease_until = ");
        q.push_bind(micros(lease_until))
            .push(", leased_by = ")
            .push_bind(worker)
            .push(" WHERE 1 = 1");
        q.push_in("seq", &seqs);
        q.query::<D::Db>().execute(w.conn()).await?;
        let mut q = Statement::new(format!(
            "SELECT {CLAIM_COLUMNS} FROM webhook_deliveries d \
             JOIN webhook_events ev ON ev.id = d.event_id \
             JOIN webhook_endpoints ep ON ep.id = d.endpoint_id WHERE 1 = 1"
        ));
        q.push_in("d.seq", &seqs);
        q.push(" ORDER BY d.seq");
        let rows = q.query_as::<D::Db, ClaimRow>().fetch_all(w.conn()).await?;
        w.commit().await?;
        tracing::debug!(worker, deliveries = ?ids, "claimed webhook deliveries");
        rows.into_iter().map(ClaimRow::into_domain).collect()
    }

    async fn finish_webhook_attempt(
        &self,
        seq: i64,
        worker: &str,
        attempt: &Attempt,
        outcome: AttemptOutcome,
    ) -> StoreResult<bool> {
        let mut w = self.begin_write().await?;
        let held: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT CAST(attempts AS BIGINT) FROM webhook_deliveries \
             WHERE seq = $1 AND leased_by = $2 AND state = 'pending'{}",
            D::FOR_UPDATE
        ))
        .bind(seq)
        .bind(worker)
        .fetch_optional(w.conn())
        .await?;
        let Some(before) = held else {
            return Ok(false);
        };
        let number = i32::try_from(before + 1)
            .map_err(|e| StoreError::Corrupt(format!("webhook_deliveries.attempts: {e}")))?;
        sqlx::query(
            "INSERT INTO webhook_attempts (delivery_seq, attempt, at, status, error, duration_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(seq)
        .bind(number)
        .bind(micros(attempt.at))
        .bind(attempt.status.map(i64::from))
        .bind(attempt.error.as_str())
        .bind(attempt.duration_ms)
        .execute(w.conn())
        .await?;
        let (state, next, done_at) = match outcome {
            AttemptOutcome::Delivered => {
                ("delivered", micros(attempt.at), Some(micros(attempt.at)))
            }
            AttemptOutcome::Failed => ("failed", micros(attempt.at), Some(micros(attempt.at))),
            AttemptOutcome::Retry(at) => ("pending", micros(at), None),
        };
        sqlx::query(
            "UPDATE webhook_deliveries SET attempts = $1, state = $2, next_attempt_at = $3, \
             done_at = $4, lease_until = NULL, leased_by = NULL WHERE seq = $5",
        )
        .bind(number)
        .bind(state)
        .bind(next)
        .bind(done_at)
        .bind(seq)
        .execute(w.conn())
        .await?;
        w.commit().await?;
        Ok(true)
    }

    async fn webhook_deliveries(
        &self,
        endpoint_id: &str,
        limit: u32,
    ) -> StoreResult<Vec<Delivery>> {
        let rows: Vec<DeliveryRow> = sqlx::query_as(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries d \
             JOIN webhook_events ev ON ev.id = d.event_id \
             WHERE d.endpoint_id = $1 ORDER BY d.seq DESC LIMIT $2"
        ))
        .bind(endpoint_id)
        .bind(audit_limit(limit))
        .fetch_all(&self.pool)
        .await?;
        let seqs: Vec<i64> = rows.iter().map(DeliveryRow::seq).collect();
        let mut attempts: std::collections::BTreeMap<i64, Vec<Attempt>> = Default::default();
        if !seqs.is_empty() {
            let mut q = Statement::new(format!(
                "SELECT {ATTEMPT_COLUMNS} FROM webhook_attempts WHERE 1 = 1"
            ));
            q.push_in("delivery_seq", &seqs);
            q.push(" ORDER BY delivery_seq, attempt");
            for row in q
                .query_as::<D::Db, AttemptRow>()
                .fetch_all(&self.pool)
                .await?
            {
                let seq = row.delivery_seq();
                attempts.entry(seq).or_default().push(row.into_domain()?);
            }
        }
        rows.into_iter()
            .map(|r| {
                let a = attempts.remove(&r.seq()).unwrap_or_default();
                r.into_domain(a)
            })
            .collect()
    }

    async fn refusal_counts(
        &self,
        rq: &super::RefusalCountQuery,
    ) -> StoreResult<Vec<super::RefusalCount>> {
        // A key's vendor and run label are fixed at mint, so grouping by
        // them too keeps one row per key and reason.
        let mut q = Statement::new(
            "SELECT key_id, agent_run_label, vendor, refusal_reason, \
             CAST(COALESCE(SUM(refused_calls), 0) AS BIGINT) AS calls \
             FROM audit WHERE outcome = 'refused'",
        );
        q.push_time_range(rq.since, rq.until);
        if let Some(key) = &rq.key_id {
            q.push_eq_as(D::indexed_text_eq, "key_id", key.as_str());
        }
        if let Some(reasons) = &rq.reasons {
            q.push_in("refusal_reason", reasons);
        }
        if let Some(vendors) = &rq.vendors {
            q.push_in("vendor", vendors);
        }
        q.push(
            " GROUP BY key_id, agent_run_label, vendor, refusal_reason \
             ORDER BY calls DESC, key_id, refusal_reason LIMIT ",
        )
        .push_bind(i64::from(MAX_REFUSAL_GROUPS));
        Ok(q.query_as::<D::Db, RefusalCountRow>()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(RefusalCountRow::into_domain)
            .collect())
    }

    async fn lineage_spend(
        &self,
        key_ids: &[String],
        day: &str,
    ) -> StoreResult<Vec<super::LineageSpend>> {
        let mut rows: Vec<LineageSpendRow> = Vec::new();
        for ids in spend_chunks(key_ids) {
            // `a` walks up from the keys to each ancestor (once, at the
            // least depth any of them sees it); `d` down from that ancestor
            // to every key of its subtree (itself included).
            let mut q = Statement::new(
                "SELECT a.ancestor_id, a.depth, CAST(COALESCE(SUM(CASE WHEN s.day = ",
            );
            let day = q.arg(day);
            q.push(format!(
                "{day} THEN s.spent END), 0) AS BIGINT) AS spent_day, \
                 CAST(COALESCE(SUM(CASE WHEN s.day = {day} THEN s.calls END), 0) AS BIGINT) \
                 AS calls_day, CAST(COALESCE(SUM(s.spent), 0) AS BIGINT) AS spent_lifetime \
                 FROM (SELECT ancestor_id, CAST(MIN(depth) AS BIGINT) AS depth \
                 FROM key_ancestors WHERE 1 = 1"
            ))
            .push_in("key_id", ids)
            .push(
                " GROUP BY ancestor_id) a \
                 JOIN key_ancestors d ON d.ancestor_id = a.ancestor_id \
                 LEFT JOIN key_spend_daily s ON s.key_id = d.key_id \
                 GROUP BY a.ancestor_id, a.depth",
            );
            rows.extend(
                q.query_as::<D::Db, LineageSpendRow>()
                    .fetch_all(&self.pool)
                    .await?,
            );
        }
        // An ancestor shared by keys of two chunks has the same subtree
        // spend in both: kept once, at the lesser depth.
        rows.sort_by(|a, b| (a.depth, &a.ancestor_id).cmp(&(b.depth, &b.ancestor_id)));
        let mut seen = std::collections::HashSet::new();
        Ok(rows
            .into_iter()
            .filter(|r| seen.insert(r.ancestor_id.clone()))
            .map(LineageSpendRow::into_domain)
            .collect())
    }

    async fn insert_approval(&self, a: &Approval) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        let key: Option<i32> = sqlx::query_scalar("SELECT 1 FROM vault_keys WHERE id = $1")
            .bind(a.key_id.as_str())
            .fetch_optional(w.conn())
            .await?;
        if key.is_none() {
            return Err(StoreError::NotFound(format!("key {}", a.key_id)));
        }
        sqlx::query(&format!(
            "INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, \
             $9, $10, $11, NULL, NULL, NULL, NULL, NULL, NULL)"
        ))
        .bind(a.id.as_str())
        .bind(a.key_id.as_str())
        .bind(a.vendor.as_str())
        .bind(a.method.as_str())
        .bind(a.path.as_str())
        .bind(a.fingerprint.as_slice())
        .bind(a.quote.0)
        .bind(a.node_id.as_str())
        .bind(a.agent_run_label.as_str())
        .bind(micros(a.requested_at))
        .bind(micros(a.expires_at))
        .execute(w.conn())
        .await
        .map_err(|e| conflict_on_unique(e, || format!("approval {} already exists", a.id)))?;
        w.commit().await
    }

    async fn get_approval(&self, id: &str) -> StoreResult<Option<Approval>> {
        let sql = format!("SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1");
        sqlx::query_as::<_, ApprovalRow>(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(ApprovalRow::into_domain)
            .transpose()
    }

    async fn list_approvals(
        &self,
        filter: &ApprovalFilter,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Approval>> {
        let mut q = Statement::new(format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE 1 = 1"
        ));
        if let Some(key) = &filter.key_id {
            q.push(" AND key_id = ").push_bind(key);
        }
        let now = micros(now);
        match filter.state {
            None => {}
            Some(ApprovalState::Used) => {
                q.push(" AND consumed_at IS NOT NULL");
            }
            Some(ApprovalState::Denied) => {
                q.push(" AND decision = 'denied'");
            }
            Some(ApprovalState::Pending) => {
                q.push(" AND decision IS NULL AND expires_at > ")
                    .push_bind(now);
            }
            Some(ApprovalState::Approved) => {
                q.push(" AND decision = 'approved' AND consumed_at IS NULL AND expires_at > ")
                    .push_bind(now);
            }
            Some(ApprovalState::Expired) => {
                q.push(
                    " AND consumed_at IS NULL AND (decision IS NULL OR decision = 'approved') \
                     AND expires_at <= ",
                )
                .push_bind(now);
            }
        }
        q.push(" ORDER BY requested_at DESC, id DESC LIMIT ")
            .push_bind(audit_limit(filter.limit));
        q.query_as::<D::Db, ApprovalRow>()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(ApprovalRow::into_domain)
            .collect()
    }

    async fn decide_approval(
        &self,
        id: &str,
        approved: bool,
        by: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut w = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE approvals SET decision = $1, decided_by = $2, reason = $3, decided_at = $4 \
             WHERE id = $5 AND decision IS NULL AND expires_at > $4",
        )
        .bind(if approved { "approved" } else { "denied" })
        .bind(by)
        .bind(reason)
        .bind(micros(now))
        .bind(id)
        .execute(w.conn())
        .await?;
        let done = D::rows_affected(&done);
        w.commit().await?;
        Ok(done == 1)
    }

    async fn consume_approval(
        &self,
        id: &str,
        key_id: &str,
        fingerprint: &[u8; 32],
        amount: Micros,
        event_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut w = self.begin_write().await?;
        // One statement decides: every replica's retries race on this row,
        // and the database lets exactly one of them set consumed_at.
        let done = sqlx::query(
            "UPDATE approvals SET consumed_at = $1, consumed_event = $2 \
             WHERE id = $3 AND decision = 'approved' AND consumed_at IS NULL \
             AND expires_at > $1 AND key_id = $4 AND fingerprint = $5 AND quote >= $6",
        )
        .bind(micros(now))
        .bind(event_id)
        .bind(id)
        .bind(key_id)
        .bind(fingerprint.as_slice())
        .bind(amount.0)
        .execute(w.conn())
        .await?;
        let done = D::rows_affected(&done);
        w.commit().await?;
        Ok(done == 1)
    }

    async fn insert_hook(&self, hook: &StoredHook) -> StoreResult<()> {
        let h = &hook.endpoint;
        let mut w = self.begin_write().await?;
        sqlx::query(&format!(
            "INSERT INTO hook_endpoints ({HOOK_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        ))
        .bind(h.id.as_str())
        .bind(h.vendor.as_str())
        .bind(hook.sealed_secrets.as_slice())
        .bind(hook.sealed_relay_secret.as_slice())
        .bind(h.destination_url.as_str())
        .bind(h.public_url.as_str())
        .bind(h.tolerance_secs)
        .bind(h.description.as_str())
        .bind(micros(h.created_at))
        .execute(w.conn())
        .await
        .map_err(|err| conflict_on_unique(err, || format!("hook {} already exists", h.id)))?;
        Self::append_changes(w.conn(), CHANGE_HOOK, &[h.id.as_str()]).await?;
        w.commit().await
    }

    async fn list_hooks(&self) -> StoreResult<Vec<StoredHook>> {
        let sql = format!("SELECT {HOOK_COLUMNS} FROM hook_endpoints ORDER BY created_at, id");
        sqlx::query_as::<_, HookRow>(&sql)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(HookRow::into_domain)
            .collect()
    }

    async fn get_hook(&self, id: &str) -> StoreResult<Option<StoredHook>> {
        let sql = format!("SELECT {HOOK_COLUMNS} FROM hook_endpoints WHERE id = $1");
        sqlx::query_as::<_, HookRow>(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(HookRow::into_domain)
            .transpose()
    }

    async fn set_hook_secrets(&self, id: &str, sealed_secrets: &[u8]) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        let done = sqlx::query("UPDATE hook_endpoints SET sealed_secrets = $1 WHERE id = $2")
            .bind(sealed_secrets)
            .bind(id)
            .execute(w.conn())
            .await?;
        if D::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(format!("hook {id}")));
        }
        Self::append_changes(w.conn(), CHANGE_HOOK, &[id]).await?;
        w.commit().await
    }

    async fn rewrap_hook_secrets(
        &self,
        id: &str,
        old: (&[u8], &[u8]),
        new: (&[u8], &[u8]),
    ) -> StoreResult<bool> {
        let mut w = self.begin_write().await?;
        let done = sqlx::query(
            "UPDATE hook_endpoints SET sealed_secrets = $1, sealed_relay_secret = $2 \
             WHERE id = $3 AND sealed_secrets = $4 AND sealed_relay_secret = $5",
        )
        .bind(new.0)
        .bind(new.1)
        .bind(id)
        .bind(old.0)
        .bind(old.1)
        .execute(w.conn())
        .await?;
        let replaced = D::rows_affected(&done) == 1;
        w.commit().await?;
        Ok(replaced)
    }

    async fn delete_hook(&self, id: &str) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        let done = sqlx::query("DELETE FROM hook_endpoints WHERE id = $1")
            .bind(id)
            .execute(w.conn())
            .await?;
        if D::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(format!("hook {id}")));
        }
        sqlx::query("DELETE FROM hook_event_claims WHERE hook_id = $1")
            .bind(id)
            .execute(w.conn())
            .await?;
        Self::append_changes(w.conn(), CHANGE_HOOK, &[id]).await?;
        w.commit().await
    }

    async fn claim_hook_event(
        &self,
        hook_id: &str,
        event_id: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let mut w = self.begin_write().await?;
        // Lapsed claims go first (any hook's: the table stays as small as
        // the replay windows), so a lapsed one of this event is free again.
        sqlx::query("DELETE FROM hook_event_claims WHERE expires_at <= $1")
            .bind(micros(now))
            .execute(w.conn())
            .await?;
        let done = sqlx::query(
            "INSERT INTO hook_event_claims (hook_id, event_id, expires_at) \
             VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(hook_id)
        .bind(event_id)
        .bind(micros(until))
        .execute(w.conn())
        .await?;
        let claimed = D::rows_affected(&done) == 1;
        w.commit().await?;
        Ok(claimed)
    }

    async fn settle_hook_event(
        &self,
        hook_id: &str,
        event_id: &str,
        keep_until: Option<DateTime<Utc>>,
    ) -> StoreResult<()> {
        let mut w = self.begin_write().await?;
        match keep_until {
            Some(until) => {
                sqlx::query(
                    "UPDATE hook_event_claims SET expires_at = $1 \
                     WHERE hook_id = $2 AND event_id = $3",
                )
                .bind(micros(until))
                .bind(hook_id)
                .bind(event_id)
                .execute(w.conn())
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM hook_event_claims WHERE hook_id = $1 AND event_id = $2")
                    .bind(hook_id)
                    .bind(event_id)
                    .execute(w.conn())
                    .await?;
            }
        }
        w.commit().await
    }
}

/// The run labels, budgets and observed caps of a spend batch's keys.
#[derive(Default)]
struct SpendKeys {
    labels: std::collections::HashMap<String, String>,
    /// The budget each key spends: a roll chain's first key, else itself.
    budgets: std::collections::HashMap<String, String>,
    observed: std::collections::HashMap<String, ObservedCaps>,
}

/// `Invalid` when an entry of one of `events` could lie in a day retention
/// dropped (`ledger::dedupe_window` reaches before `kept_from`, where the
/// kept ledger starts): the lookup cannot tell a resend from a new event
/// there, and applying it could count it twice. `kept_from` is read from
/// the ledger head's row holding its lock, which retention takes to drop
/// a day.
fn check_kept(events: &[SpendEvent], clock: i64, kept_from: i64) -> StoreResult<()> {
    let window = ledger::dedupe_window(events, clock);
    if kept_from == 0 || *window.start() >= kept_from {
        return Ok(());
    }
    let oldest = events
        .iter()
        .min_by_key(|e| e.at)
        .map_or("", |e| e.event_id.as_str());
    let from =
        DateTime::from_timestamp_micros(kept_from).map_or_else(String::new, |t| t.to_rfc3339());
    Err(StoreError::Invalid(format!(
        "spend event {oldest}: dated within {} min of ledger days retention dropped (the ledger \
         keeps entries from {from}); whether it was applied before cannot be told, so it is not \
         applied",
        ledger::MAX_AHEAD.num_minutes()
    )))
}

/// Which of `events` to apply: each at most once, first in the batch, not
/// among `known` (stored before) nor carried by an append in flight before
/// this one (`earlier`). Returns the flag of each event and the events
/// flagged.
fn first_unstored<'e>(
    events: &'e [SpendEvent],
    known: &[String],
    earlier: impl Fn(&str) -> bool,
) -> (Vec<bool>, Vec<&'e SpendEvent>) {
    let mut seen: std::collections::HashSet<&str> = known.iter().map(String::as_str).collect();
    let applied: Vec<bool> = events
        .iter()
        .map(|e| !earlier(&e.event_id) && seen.insert(&e.event_id))
        .collect();
    let fresh = events
        .iter()
        .zip(&applied)
        .filter_map(|(e, a)| a.then_some(e))
        .collect();
    (applied, fresh)
}

/// The ledger entries of `fresh`, chained in order onto `head`, and the
/// head they end at.
fn chain_entries<'e>(
    head: Head,
    fresh: &'e [Cow<'e, SpendEvent>],
    labels: &'e std::collections::HashMap<String, String>,
) -> (Vec<ChainedEntry<'e>>, Head) {
    let (mut seq, mut prev) = head;
    let entries = fresh
        .iter()
        .map(|event| {
            let event: &SpendEvent = event;
            seq += 1;
            let agent_run_label = labels.get(&event.key_id).map_or("", String::as_str);
            let hash = ledger::link(&prev, seq, agent_run_label, event);
            let entry = ChainedEntry {
                seq,
                event,
                agent_run_label,
                prev_hash: prev,
                hash,
            };
            prev = hash;
            entry
        })
        .collect();
    (entries, (seq, prev))
}
