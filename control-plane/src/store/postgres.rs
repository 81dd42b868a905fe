//! PostgreSQL store: production, shared by every control-plane replica.
//!
//! Replicas are stateless over this database, so every rule that must hold
//! across them is enforced by Postgres locks inside one transaction
//! (READ COMMITTED):
//! * a lease grant locks its key row (`FOR UPDATE`) and the lease row, then
//!   reads everything that weighs on the caps in ONE statement, so the sums
//!   come from one snapshot taken after the lock (a spend batch committing
//!   in between is seen whole or not at all);
//! * a key insert holds its vendor row `FOR SHARE` and a vendor delete holds
//!   it `FOR UPDATE` before counting active keys, so neither can slip past
//!   the other;
//! * change-log appends take `LOCK TABLE change_log IN EXCLUSIVE MODE` as
//!   the last step before commit, so versions commit in increasing order and
//!   a follower reading `version > after` never skips one. The lock blocks
//!   other appenders only, never readers.
//!
//! Inserting into `change_log` notifies channel `keycap_changes` (see
//! `CHANGE_CHANNEL`). Encoding (times as microseconds, money as
//! micro-dollars, JSON text) is described in `store::sql`; the schema is
//! `migrations/postgres`.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keycap_proto::Micros;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{PgConnection, Postgres, QueryBuilder};

use super::sql::{
    admin_token_lists, would_strand_admin, AdminTokenRow, ADMIN_TOKEN_COLUMNS, LAST_ADMIN,
};
use super::sql::{
    audit_limit, check_ancestors, check_grant, check_tree_depth, conflict_on_unique,
    decide_tree_grant, distinct_key_ids, from_micros, micros, push_audit_values, spend_chunks,
    spend_totals, to_json, tree_levels_sql, truncate, AuditRow, ChangeRow, GrantRow, KeyInsert,
    KeyRow, LeaseRow, TreeLevelRow, VendorRow, AUDIT_COLUMNS, CHANGE_KEY, CHANGE_VENDOR,
    KEY_COLUMNS, VENDOR_COLUMNS,
};
use super::sql::{vendor_load_errors_sql, VendorLoadErrorRow};
use super::sql::{
    FleetNodeRow, NodeLeaseRow, FLEET_NODE_COLUMNS, LEASE_COLUMNS, NODE_LEASE_COLUMNS,
};
use super::sql::{IssuerTokenRow, ISSUER_TOKEN_COLUMNS};
use super::{RevokedKey, Store, StoreError, StoreResult, VendorWrite};
use crate::domain::{
    AdminToken, AuditEntry, AuditQuery, Change, FleetNode, IssuerToken, KeyFilter, KeySpend,
    KeyStatus, LeaseGrant, LeaseGrantRequest, NodeLease, SpendEvent, SpendSummary, VaultKey,
    Vendor, VendorLoadError,
};

/// The channel notified (empty payload) whenever the change log grows.
pub const CHANGE_CHANNEL: &str = "keycap_changes";

const MAX_CONNECTIONS: u32 = 16;
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects a pool to `url` (`postgres://...`). Call `migrate` before use.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect(url)
            .await?;
        Ok(Self::from_pool(pool))
    }

    /// Wraps a pool configured by the caller.
    pub fn from_pool(pool: PgPool) -> Self {
        PgStore { pool }
    }

    /// The pool, e.g. for a `PgListener` on `CHANGE_CHANNEL`.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Appends change-log entries; call it last in a transaction (see module
/// docs for why it locks).
async fn append_changes(conn: &mut PgConnection, kind: &str, ref_ids: &[&str]) -> StoreResult<()> {
    if ref_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("LOCK TABLE change_log IN EXCLUSIVE MODE")
        .execute(&mut *conn)
        .await?;
    for ref_id in ref_ids {
        sqlx::query("INSERT INTO change_log (kind, ref_id) VALUES ($1, $2)")
            .bind(kind)
            .bind(ref_id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
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

/// Inserts an admin token; with `keep_existing`, a token whose hash is
/// already stored is left as it is.
async fn insert_admin_token(pool: &PgPool, t: &AdminToken, keep_existing: bool) -> StoreResult<()> {
    let (scopes, vendors) = admin_token_lists(t)?;
    let on_conflict = if keep_existing {
        " ON CONFLICT (token_hash) DO NOTHING"
    } else {
        ""
    };
    sqlx::query(&format!(
        "INSERT INTO admin_tokens ({ADMIN_TOKEN_COLUMNS}) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9){on_conflict}"
    ))
    .bind(&t.id)
    .bind(&t.token_hash[..])
    .bind(&t.token_prefix)
    .bind(&t.name)
    .bind(scopes)
    .bind(vendors)
    .bind(micros(t.created_at))
    .bind(t.expires_at.map(micros))
    .bind(t.revoked_at.map(micros))
    .execute(pool)
    .await
    .map_err(|e| conflict_on_unique(e, || format!("admin token {} already exists", t.id)))?;
    Ok(())
}

/// The ancestors of a new key's parent, the parent itself included, each
/// with its depth below the parent; `NotFound` for an unknown parent,
/// `Conflict` for a revoked or expired one (at `now`) or one already at the
/// deepest level. Holds the parent row `FOR SHARE` until commit, so a
/// concurrent revocation of the parent either sees the child (and revokes
/// it) or happens first (and the child is refused).
async fn parent_ancestors(
    conn: &mut PgConnection,
    parent: &str,
    now: i64,
) -> StoreResult<Vec<(String, i64)>> {
    let state: Option<(Option<i64>, i64)> =
        sqlx::query_as("SELECT revoked_at, expires_at FROM vault_keys WHERE id = $1 FOR SHARE")
            .bind(parent)
            .fetch_optional(&mut *conn)
            .await?;
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
    .bind(parent)
    .fetch_all(&mut *conn)
    .await?;
    check_tree_depth(parent, &ancestors)?;
    Ok(ancestors)
}

async fn fetch_key(
    conn: &mut PgConnection,
    id: &str,
    for_update: bool,
) -> StoreResult<Option<VaultKey>> {
    let lock = if for_update { " FOR UPDATE" } else { "" };
    let sql = format!("SELECT {KEY_COLUMNS} FROM vault_keys WHERE id = $1{lock}");
    sqlx::query_as::<_, KeyRow>(&sql)
        .bind(id)
        .fetch_optional(conn)
        .await?
        .map(KeyRow::into_domain)
        .transpose()
}

#[async_trait]
impl Store for PgStore {
    async fn migrate(&self) -> StoreResult<()> {
        // sqlx takes an advisory lock, so replicas starting together are safe.
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    async fn ensure_admin_token(&self, token: &AdminToken) -> StoreResult<()> {
        insert_admin_token(&self.pool, token, true).await
    }

    async fn insert_admin_token(&self, token: &AdminToken) -> StoreResult<()> {
        insert_admin_token(&self.pool, token, false).await
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
        let mut tx = self.pool.begin().await?;
        // Conflicts with itself: revocations run one at a time across
        // replicas, so two cannot each see the other's token as the admin
        // that remains. Readers (authentication) are not blocked.
        sqlx::query("LOCK TABLE admin_tokens IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let sql = format!("SELECT {ADMIN_TOKEN_COLUMNS} FROM admin_tokens");
        let all = sqlx::query_as::<_, AdminTokenRow>(&sql)
            .fetch_all(&mut *tx)
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
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        target.revoked_at = Some(truncate(now));
        Ok(target)
    }

    async fn insert_issuer_token(&self, t: &IssuerToken) -> StoreResult<()> {
        let sql = format!(
            "INSERT INTO issuer_tokens ({ISSUER_TOKEN_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        );
        sqlx::query(&sql)
            .bind(&t.id)
            .bind(&t.token_hash[..])
            .bind(&t.token_prefix)
            .bind(&t.key_id)
            .bind(&t.name)
            .bind(micros(t.created_at))
            .bind(t.expires_at.map(micros))
            .bind(t.revoked_at.map(micros))
            .execute(&self.pool)
            .await
            .map_err(|e| {
                conflict_on_unique(e, || format!("issuer token {} already exists", t.id))
            })?;
        Ok(())
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
        // One statement: a concurrent revocation keeps the first time.
        sqlx::query(
            "UPDATE issuer_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(micros(now))
        .bind(id)
        .execute(&self.pool)
        .await?;
        self.get_issuer_token(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("issuer token {id}")))
    }

    async fn put_vendor(&self, write: VendorWrite) -> StoreResult<(Vendor, bool)> {
        let v = &write.vendor;
        let rates = to_json(&v.currency_rates, "currency_rates")?;
        let mut tx = self.pool.begin().await?;
        let existing: Option<i64> =
            sqlx::query_scalar("SELECT created_at FROM vendors WHERE name = $1 FOR UPDATE")
                .bind(v.name.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let (created_at, created) = match (existing, &write.sealed_credential) {
            (None, None) => {
                return Err(StoreError::Conflict(format!(
                    "vendor {} does not exist; creating it needs a credential",
                    v.name
                )))
            }
            (None, Some(sealed)) => {
                sqlx::query(
                    "INSERT INTO vendors (name, profile, base_url, currency_rates, prices, \
                     sealed_credential, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(v.name.as_str())
                .bind(v.profile.as_str())
                .bind(&v.base_url)
                .bind(&rates)
                .bind(&v.prices)
                .bind(sealed.as_slice())
                .bind(micros(v.created_at))
                .bind(micros(v.updated_at))
                .execute(&mut *tx)
                .await
                .map_err(|e| {
                    conflict_on_unique(e, || format!("vendor {} was created concurrently", v.name))
                })?;
                (truncate(v.created_at), true)
            }
            (Some(created_at), sealed) => {
                sqlx::query(
                    "UPDATE vendors SET profile = $1, base_url = $2, currency_rates = $3, \
                     prices = $4, sealed_credential = COALESCE($5, sealed_credential), \
                     updated_at = $6 WHERE name = $7",
                )
                .bind(v.profile.as_str())
                .bind(&v.base_url)
                .bind(&rates)
                .bind(&v.prices)
                .bind(sealed.as_deref())
                .bind(micros(v.updated_at))
                .bind(v.name.as_str())
                .execute(&mut *tx)
                .await?;
                (from_micros(created_at, "vendors.created_at")?, false)
            }
        };
        append_changes(&mut tx, CHANGE_VENDOR, &[v.name.as_str()]).await?;
        tx.commit().await?;
        let stored = Vendor {
            created_at,
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

    async fn get_vendor_credential(&self, name: &str) -> StoreResult<Option<Vec<u8>>> {
        Ok(
            sqlx::query_scalar("SELECT sealed_credential FROM vendors WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn sealed_credentials(&self) -> StoreResult<Vec<(String, Vec<u8>)>> {
        Ok(
            sqlx::query_as("SELECT name, sealed_credential FROM vendors ORDER BY name")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    async fn replace_sealed_credential(
        &self,
        name: &str,
        expected: &[u8],
        sealed: &[u8],
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE vendors SET sealed_credential = $3 WHERE name = $1 AND sealed_credential = $2",
        )
        .bind(name)
        .bind(expected)
        .bind(sealed)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
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
        let mut tx = self.pool.begin().await?;
        let exists: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM vendors WHERE name = $1 FOR UPDATE")
                .bind(name)
                .fetch_optional(&mut *tx)
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
        .fetch_one(&mut *tx)
        .await?;
        if active > 0 {
            return Err(StoreError::Conflict(format!(
                "vendor {name} is used by {active} active key(s); revoke them first"
            )));
        }
        sqlx::query("DELETE FROM vendors WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        append_changes(&mut tx, CHANGE_VENDOR, &[name]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn insert_key(&self, key: &VaultKey) -> StoreResult<()> {
        let k = KeyInsert::new(key)?;
        let mut tx = self.pool.begin().await?;
        let vendor: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM vendors WHERE name = $1 FOR SHARE")
                .bind(k.vendor)
                .fetch_optional(&mut *tx)
                .await?;
        if vendor.is_none() {
            return Err(StoreError::NotFound(format!("vendor {}", k.vendor)));
        }
        let ancestors = match k.parent_id {
            Some(parent) => parent_ancestors(&mut tx, parent, k.created_at).await?,
            None => Vec::new(),
        };
        let sql = format!(
            "INSERT INTO vault_keys ({KEY_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
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
            .execute(&mut *tx)
            .await
            .map_err(|e| conflict_on_unique(e, || format!("key {} already exists", k.id)))?;
        let own = (k.id.to_string(), -1);
        for (ancestor, depth) in std::iter::once(&own).chain(&ancestors) {
            sqlx::query(
                "INSERT INTO key_ancestors (key_id, ancestor_id, depth) VALUES ($1, $2, $3)",
            )
            .bind(k.id)
            .bind(ancestor)
            .bind(i32::try_from(depth + 1).unwrap_or(i32::MAX))
            .execute(&mut *tx)
            .await?;
        }
        append_changes(&mut tx, CHANGE_KEY, &[k.id]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_key(&self, id: &str) -> StoreResult<Option<VaultKey>> {
        let mut conn = self.pool.acquire().await?;
        fetch_key(&mut conn, id, false).await
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
        let mut q = QueryBuilder::<Postgres>::new(format!(
            "SELECT {KEY_COLUMNS} FROM vault_keys WHERE TRUE"
        ));
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
        q.build_query_as::<KeyRow>()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(KeyRow::into_domain)
            .collect()
    }

    async fn revoke_key(&self, id: &str, now: DateTime<Utc>) -> StoreResult<RevokedKey> {
        let mut tx = self.pool.begin().await?;
        // The subtree's rows are locked in id order, the order a grant locks
        // a key's ancestors in, so a revocation and a grant below it cannot
        // deadlock.
        let _: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM vault_keys WHERE id IN \
               (SELECT key_id FROM key_ancestors WHERE ancestor_id = $1) \
             ORDER BY id FOR UPDATE",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        let mut key = fetch_key(&mut tx, id, false)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("key {id}")))?;
        // A statement begun after the locks sees every child committed
        // before them; a child minted later waits on the key's lock and
        // then finds it revoked.
        let mut revoked: Vec<String> = sqlx::query_scalar(
            "UPDATE vault_keys SET revoked_at = $1 WHERE revoked_at IS NULL \
             AND id IN (SELECT key_id FROM key_ancestors WHERE ancestor_id = $2) RETURNING id",
        )
        .bind(micros(now))
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        revoked.sort();
        let refs: Vec<&str> = revoked.iter().map(String::as_str).collect();
        append_changes(&mut tx, CHANGE_KEY, &refs).await?;
        if key.revoked_at.is_none() {
            key.revoked_at = Some(truncate(now));
        }
        let descendants: Vec<String> = sqlx::query_scalar(
            "SELECT key_id FROM key_ancestors WHERE ancestor_id = $1 AND key_id <> $1 \
             ORDER BY key_id",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(RevokedKey { key, descendants })
    }

    async fn revoke_run(
        &self,
        agent_run_label: &str,
        vendors: Option<&[String]>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<String>> {
        let mut tx = self.pool.begin().await?;
        // The run's keys and everything below them: a child key spends
        // only while its ancestors may. Locked in id order first, the order
        // grants lock a key's ancestors in.
        let subtrees = |q: &mut QueryBuilder<'_, Postgres>| {
            q.push(
                "id IN (SELECT a.key_id FROM key_ancestors a \
                 JOIN vault_keys r ON r.id = a.ancestor_id WHERE r.agent_run_label = ",
            )
            .push_bind(agent_run_label.to_string());
            if let Some(vendors) = vendors {
                q.push(" AND r.vendor = ANY(")
                    .push_bind(vendors.to_vec())
                    .push(")");
            }
            q.push(")");
        };
        let mut lock = QueryBuilder::<Postgres>::new(
            "SELECT id FROM vault_keys WHERE revoked_at IS NULL AND ",
        );
        subtrees(&mut lock);
        lock.push(" ORDER BY id FOR UPDATE");
        let _: Vec<String> = lock.build_query_scalar().fetch_all(&mut *tx).await?;
        let mut q = QueryBuilder::<Postgres>::new("UPDATE vault_keys SET revoked_at = ");
        q.push_bind(micros(now))
            .push(" WHERE revoked_at IS NULL AND ");
        subtrees(&mut q);
        q.push(" RETURNING id");
        let mut ids: Vec<String> = q.build_query_scalar().fetch_all(&mut *tx).await?;
        ids.sort();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        append_changes(&mut tx, CHANGE_KEY, &refs).await?;
        tx.commit().await?;
        Ok(ids)
    }

    async fn key_spend(&self, id: &str, day: &str) -> StoreResult<KeySpend> {
        let (spent_day, calls_day, spent_lifetime): (i64, i64, i64) = sqlx::query_as(
            "SELECT \
               COALESCE(SUM(spent) FILTER (WHERE day = $2), 0)::BIGINT, \
               COALESCE(SUM(calls) FILTER (WHERE day = $2), 0)::BIGINT, \
               COALESCE(SUM(spent), 0)::BIGINT \
             FROM key_spend_daily WHERE key_id = $1",
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

    fn change_feed(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        tokio::spawn(listen_for_changes(self.pool.clone(), tx));
        Some(rx)
    }

    async fn latest_version(&self) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MAX(version), 0)::BIGINT FROM change_log")
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
        Ok(sqlx::query("DELETE FROM change_log WHERE version <= $1")
            .bind(through)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    async fn oldest_version(&self) -> StoreResult<i64> {
        Ok(
            sqlx::query_scalar("SELECT COALESCE(MIN(version), 0)::BIGINT FROM change_log")
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
        let mut tx = self.pool.begin().await?;
        // Locking the key and every ancestor, in id order, serialises every
        // grant that draws on any of them, across replicas: grants on
        // sibling keys meet at their common parent.
        let locked: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM vault_keys WHERE id IN \
               (SELECT ancestor_id FROM key_ancestors WHERE key_id = $1) \
             ORDER BY id FOR UPDATE",
        )
        .bind(&req.key_id)
        .fetch_all(&mut *tx)
        .await?;
        if locked.is_empty() {
            return Err(StoreError::NotFound(format!("key {}", req.key_id)));
        }
        let levels: Vec<TreeLevelRow> =
            sqlx::query_as(&tree_levels_sql("$1", "$2", "$3", "GREATEST"))
                .bind(&req.key_id)
                .bind(&req.day)
                .bind(micros(now - super::unreturned_lease_grace()))
                .fetch_all(&mut *tx)
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
        .fetch_optional(&mut *tx)
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
            "SELECT {LEASE_COLUMNS} FROM leases WHERE id = $1 FOR UPDATE"
        ))
        .bind(&req.lease_id)
        .fetch_optional(&mut *tx)
        .await?;
        check_grant(
            &req.key_id,
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
                    .execute(&mut *tx)
                    .await?;
                (l.granted + granted, l.expires_at)
            }
            None => {
                sqlx::query(
                    "INSERT INTO leases (id, key_id, node_id, day, granted, reported, expires_at, closed) \
                     VALUES ($1, $2, $3, $4, $5, 0, $6, FALSE)",
                )
                .bind(&req.lease_id)
                .bind(&req.key_id)
                .bind(&req.node_id)
                .bind(&req.day)
                .bind(granted)
                .bind(micros(req.expires_at))
                .execute(&mut *tx)
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
        .execute(&mut *tx)
        .await
        .map_err(|e| conflict_on_unique(e, || format!("grant {} exists", req.grant_id)))?;
        tx.commit().await?;
        answer.into_domain()
    }

    async fn return_lease(
        &self,
        lease_id: &str,
        node: Option<&str>,
        spent: Micros,
    ) -> StoreResult<()> {
        // A closed lease keeps the spend of its first return.
        let done = sqlx::query(
            "UPDATE leases SET granted = CASE WHEN closed THEN granted ELSE $1 END, closed = TRUE \
             WHERE id = $2 AND ($3::TEXT IS NULL OR node_id = $3)",
        )
        .bind(spent.0.max(0))
        .bind(lease_id)
        .bind(node)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("lease {lease_id}")));
        }
        Ok(())
    }

    async fn shrink_lease(
        &self,
        lease_id: &str,
        node: Option<&str>,
        from: Micros,
        to: Micros,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE leases SET granted = GREATEST($1, reported) \
             WHERE id = $2 AND ($3::TEXT IS NULL OR node_id = $3) AND NOT closed AND granted = $4",
        )
        .bind(to.0)
        .bind(lease_id)
        .bind(node)
        .bind(from.0)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() > 0 {
            return Ok(true);
        }
        let known: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM leases WHERE id = $1 AND ($2::TEXT IS NULL OR node_id = $2)",
        )
        .bind(lease_id)
        .bind(node)
        .fetch_optional(&self.pool)
        .await?;
        match known {
            Some(_) => Ok(false),
            None => Err(StoreError::NotFound(format!("lease {lease_id}"))),
        }
    }

    async fn register_fleet_node(
        &self,
        node: &str,
        replica: &str,
        stream: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO fleet_nodes \
             (node_id, replica, stream_id, applied_version, connected_at, heartbeat_at) \
             VALUES ($1, $2, $3, 0, $4, $4) \
             ON CONFLICT (node_id) DO UPDATE SET replica = EXCLUDED.replica, \
               stream_id = EXCLUDED.stream_id, applied_version = 0, \
               connected_at = EXCLUDED.connected_at, heartbeat_at = EXCLUDED.heartbeat_at",
        )
        .bind(node)
        .bind(replica)
        .bind(stream)
        .bind(micros(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn unregister_fleet_node(&self, node: &str, stream: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM fleet_nodes WHERE node_id = $1 AND stream_id = $2")
            .bind(node)
            .bind(stream)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn ack_policy(&self, node: &str, version: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE fleet_nodes SET applied_version = GREATEST(applied_version, $2) \
             WHERE node_id = $1",
        )
        .bind(node)
        .bind(version)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn heartbeat_fleet_nodes(
        &self,
        replica: &str,
        now: DateTime<Utc>,
        forget_before: DateTime<Utc>,
    ) -> StoreResult<()> {
        // One statement: the refresh and the clean-up share a round trip.
        sqlx::query(
            "WITH gone AS (DELETE FROM fleet_nodes WHERE heartbeat_at < $3 AND replica <> $1) \
             UPDATE fleet_nodes SET heartbeat_at = $2 WHERE replica = $1",
        )
        .bind(replica)
        .bind(micros(now))
        .bind(micros(forget_before))
        .execute(&self.pool)
        .await?;
        Ok(())
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
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM vendor_load_errors WHERE node_id = $1")
            .bind(node)
            .execute(&mut *tx)
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
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn vendor_load_errors(&self, vendor: Option<&str>) -> StoreResult<Vec<VendorLoadError>> {
        sqlx::query_as::<_, VendorLoadErrorRow>(&vendor_load_errors_sql("$1::TEXT"))
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
        Ok(sqlx::query_scalar(
            "SELECT DISTINCT node_id FROM leases WHERE key_id = ANY($1) AND NOT closed \
             AND expires_at > $2 AND granted > reported ORDER BY node_id",
        )
        .bind(key_ids)
        .bind(micros(now))
        .fetch_all(&self.pool)
        .await?)
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
        let unspent: Vec<i64> = sqlx::query_scalar(
            "UPDATE leases SET fenced_at = COALESCE(fenced_at, $3) \
             WHERE node_id = ANY($1) AND key_id = ANY($2) AND NOT closed AND expires_at > $3 \
             RETURNING GREATEST(granted - reported, 0)",
        )
        .bind(node_ids)
        .bind(key_ids)
        .bind(micros(now))
        .fetch_all(&self.pool)
        .await?;
        Ok(Micros(unspent.into_iter().fold(0i64, i64::saturating_add)))
    }

    async fn record_spend(&self, events: &[SpendEvent]) -> StoreResult<(u32, u32)> {
        if events.is_empty() {
            return Ok((0, 0));
        }
        let mut tx = self.pool.begin().await?;
        // One multi-row insert per chunk; RETURNING names the events that
        // were new, and only those count towards spend.
        let mut fresh = std::collections::HashSet::new();
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT id, agent_run_label FROM vault_keys WHERE id = ANY($1)")
                .bind(distinct_key_ids(events))
                .fetch_all(&mut *tx)
                .await?;
        let labels: std::collections::HashMap<String, String> = rows.into_iter().collect();
        for chunk in spend_chunks(events) {
            let mut q = QueryBuilder::<Postgres>::new("");
            push_audit_values(&mut q, chunk, &labels);
            let ids: Vec<String> = q.build_query_scalar().fetch_all(&mut *tx).await?;
            fresh.extend(ids);
        }
        let mut seen = std::collections::HashSet::new();
        let totals = spend_totals(
            events
                .iter()
                .filter(|e| fresh.contains(&e.event_id) && seen.insert(e.event_id.as_str())),
        );
        for ((key_id, day), spent, calls) in &totals.daily {
            sqlx::query(
                "INSERT INTO key_spend_daily (key_id, day, spent, calls) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (key_id, day) DO UPDATE \
                 SET spent = key_spend_daily.spent + EXCLUDED.spent, \
                     calls = key_spend_daily.calls + EXCLUDED.calls",
            )
            .bind(key_id)
            .bind(day)
            .bind(spent)
            .bind(calls)
            .execute(&mut *tx)
            .await?;
        }
        for ((lease_id, node_id), reported) in &totals.leases {
            sqlx::query(
                "UPDATE leases SET reported = reported + $1 WHERE id = $2 AND node_id = $3",
            )
            .bind(reported)
            .bind(lease_id)
            .bind(node_id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let applied = fresh.len() as u32;
        Ok((applied, events.len() as u32 - applied))
    }

    async fn query_audit(&self, aq: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        let mut q =
            QueryBuilder::<Postgres>::new(format!("SELECT {AUDIT_COLUMNS} FROM audit WHERE TRUE"));
        if let Some(key_id) = &aq.key_id {
            q.push(" AND key_id = ").push_bind(key_id);
        }
        if let Some(label) = &aq.agent_run_label {
            q.push(" AND agent_run_label = ").push_bind(label);
        }
        if let Some(vendor) = &aq.vendor {
            q.push(" AND vendor = ").push_bind(vendor);
        }
        if let Some(vendors) = &aq.vendors {
            q.push(" AND vendor = ANY(")
                .push_bind(vendors.clone())
                .push(")");
        }
        if let Some(since) = aq.since {
            q.push(" AND at >= ").push_bind(micros(since));
        }
        if let Some(until) = aq.until {
            q.push(" AND at < ").push_bind(micros(until));
        }
        if let Some(before) = aq.before_seq {
            q.push(" AND seq < ").push_bind(before);
        }
        q.push(" ORDER BY seq DESC LIMIT ")
            .push_bind(audit_limit(aq.limit));
        q.build_query_as::<AuditRow>()
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(AuditRow::into_domain)
            .collect()
    }

    async fn spend_summary(&self, agent_run_label: &str) -> StoreResult<SpendSummary> {
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT vendor, COALESCE(SUM(cost), 0)::BIGINT, COUNT(*) FROM audit \
             WHERE agent_run_label = $1 GROUP BY vendor ORDER BY vendor",
        )
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
}
