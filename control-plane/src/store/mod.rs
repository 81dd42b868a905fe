//! Persistence: what the control plane keeps, behind one `Store` trait.
//!
//! Stored: admin tokens (hash, scopes, vendor restriction, expiry);
//! vendors with their sealed (encrypted) credentials; vault keys (SHA-256 of the secret only); the change log that
//! proxies follow; the proxies connected to it and the version each has
//! applied; budget leases and their grants; daily spend per key; the
//! append-only audit ledger. One implementation, `SqlStore`, with each
//! query written once over a `Dialect` — PostgreSQL for production and
//! SQLite for the embedded single-node default — passes the same test suite (`control-plane/tests/store.rs`). Migrations are embedded
//! in the binary.
//!
//! The store never sees plaintext credentials or secrets, and never decides
//! policy beyond what must be atomic with the data: the budget arithmetic of
//! a lease grant and the once-only application of a spend event live here
//! because each must happen inside one transaction.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::approval::{Approval, ApprovalFilter};
use crate::credential::{CredentialProbe, CredentialVersion, Promotion};
use crate::domain::EnforcedTerms;
use crate::domain::{
    AdminToken, AuditEntry, AuditQuery, Change, FleetNode, IssuerToken, KeyFilter, KeySpend,
    LeaseGrant, LeaseGrantRequest, NodeLease, SpendEvent, SpendReport, SpendReportQuery,
    SpendSummary, VaultKey, Vendor, VendorLoadError,
};
use crate::hooks::StoredHook;
use crate::ledger::{Checkpoint, Retention};
use crate::webhook::{
    Attempt, AttemptOutcome, ClaimedDelivery, Delivery, WebhookEndpoint, WebhookEvent,
};

mod approval_rows;
mod cockpit_rows;
mod credential_rows;
pub mod dialect;
mod hook_rows;
mod sql;
mod sql_store;
mod timed;
mod webhook_rows;

pub use cockpit_rows::{LineageSpend, RefusalCount, RefusalCountQuery, MAX_REFUSAL_GROUPS};
pub use dialect::{Dialect, CHANGE_CHANNEL};
pub use sql_store::{PgStore, SqlStore, SqliteStore};
pub use timed::TimedStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    /// The operation conflicts with current state (e.g. deleting a vendor
    /// that active keys still use, granting on a revoked key).
    #[error("{0}")]
    Conflict(String),
    /// The input can never be applied as given (e.g. a spend event older
    /// than the ledger retention keeps).
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// How long after it expires a lease that was never returned still counts in
/// full. Its proxy stopped drawing on it before it expired, but may have
/// been killed with spend not yet delivered: restarted within this, it
/// delivers that spend from its spool before the budget is granted again.
pub fn unreturned_lease_grace() -> chrono::TimeDelta {
    chrono::TimeDelta::hours(1)
}

/// What revoking a key did: the key as now stored, and the ids of every
/// key below it in its budget tree (revoked with it, or before).
#[derive(Clone, Debug)]
pub struct RevokedKey {
    pub key: VaultKey,
    pub descendants: Vec<String>,
}

/// One level of a key's budget tree — the key itself (depth 0) or an
/// ancestor — with what weighs on its caps: settled spend and the unspent
/// part of counting leases, each summed over the level's whole subtree (the
/// same sums a lease grant decides on). Read for dry runs, which reserve
/// nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetLevel {
    pub key_id: String,
    pub depth: i64,
    pub daily_cap: keycap_proto::Micros,
    pub lifetime_cap: Option<keycap_proto::Micros>,
    pub spent_day: keycap_proto::Micros,
    pub spent_life: keycap_proto::Micros,
    pub leased_day: keycap_proto::Micros,
    pub leased_life: keycap_proto::Micros,
}

/// A vendor write: the record plus, when the credential changes, its sealed
/// form (opaque bytes from `crypto::Sealer`) and the version it was sealed
/// as (`credential::record_id`): the vendor's next version.
#[derive(Clone, Debug)]
pub struct VendorWrite {
    pub vendor: Vendor,
    pub sealed_credential: Option<Vec<u8>>,
    pub credential_version: i64,
}

/// One version's sealed material, for a KEK rotation.
#[derive(Clone, Debug)]
pub struct SealedCredential {
    pub vendor: String,
    pub version: i64,
    pub sealed: Vec<u8>,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Applies embedded migrations. Idempotent.
    async fn migrate(&self) -> StoreResult<()>;

    // --- admin tokens -----------------------------------------------------
    /// Records a token unless one with its hash is already stored, whatever
    /// that one's state: a revoked (retired) bootstrap token presented again
    /// at start-up stays revoked.
    async fn ensure_admin_token(&self, token: &AdminToken) -> StoreResult<()>;
    /// Inserts a new token; `Conflict` if its id or hash is taken.
    async fn insert_admin_token(&self, token: &AdminToken) -> StoreResult<()>;
    /// The token with this hash, whatever its state.
    async fn find_admin_token(&self, token_hash: &[u8; 32]) -> StoreResult<Option<AdminToken>>;
    async fn get_admin_token(&self, id: &str) -> StoreResult<Option<AdminToken>>;
    /// Every token, newest first.
    async fn list_admin_tokens(&self) -> StoreResult<Vec<AdminToken>>;
    /// Revokes a token (idempotent: a revoked token keeps its first
    /// `revoked_at`). `NotFound` if absent. `Conflict` when it is the last
    /// token active at `now` with every scope over every vendor: checked in
    /// the same transaction, so two concurrent revocations cannot both pass.
    async fn revoke_admin_token(&self, id: &str, now: DateTime<Utc>) -> StoreResult<AdminToken>;

    // Issuer tokens: each belongs to one key (see `IssuerToken`).
    /// `Conflict` if its id or hash is taken. The key must exist.
    async fn insert_issuer_token(&self, token: &IssuerToken) -> StoreResult<()>;
    async fn find_issuer_token(&self, token_hash: &[u8; 32]) -> StoreResult<Option<IssuerToken>>;
    async fn get_issuer_token(&self, id: &str) -> StoreResult<Option<IssuerToken>>;
    /// A key's issuer tokens, newest first.
    async fn list_issuer_tokens(&self, key_id: &str) -> StoreResult<Vec<IssuerToken>>;
    /// Sets `revoked_at`; revoking a revoked token changes nothing.
    /// `NotFound` for an unknown id.
    async fn revoke_issuer_token(&self, id: &str, now: DateTime<Utc>) -> StoreResult<IssuerToken>;

    // --- vendors ------------------------------------------------------------
    /// Creates or replaces a vendor. Creating one requires a sealed
    /// credential (`Conflict` otherwise), which becomes version 1, active;
    /// on update `None` keeps the stored credentials and `created_at`, and a
    /// credential is staged and promoted at once: it becomes active as the
    /// next version and the version active before retires at once (its
    /// material erased), as an overwrite did before versions. `Conflict`
    /// when `credential_version` is not the vendor's next version (another
    /// write took it). Returns the stored vendor and whether it was
    /// created. Appends a change-log entry.
    async fn put_vendor(&self, write: VendorWrite) -> StoreResult<(Vendor, bool)>;
    async fn get_vendor(&self, name: &str) -> StoreResult<Option<Vendor>>;
    /// The active credential version of a vendor and its sealed material,
    /// for the fleet snapshot.
    async fn get_vendor_credential(&self, name: &str) -> StoreResult<Option<(i64, Vec<u8>)>>;
    async fn list_vendors(&self) -> StoreResult<Vec<Vendor>>;
    /// Every credential version that still has sealed material (retired
    /// ones have none), for a KEK rotation.
    async fn sealed_credentials(&self) -> StoreResult<Vec<SealedCredential>>;
    /// Replaces a version's sealed material only if it is still `expected`,
    /// so a rotation never overwrites material changed (or erased)
    /// meanwhile. Returns whether it was replaced. Appends no change-log
    /// entry: the credential a proxy sees is the same.
    async fn replace_sealed_credential(
        &self,
        name: &str,
        version: i64,
        expected: &[u8],
        sealed: &[u8],
    ) -> StoreResult<bool>;

    // --- credential versions (see `crate::credential`) ---------------------
    /// Stores `sealed` as `version` of `vendor`, staged (not served).
    /// `NotFound` for an unknown vendor, `Conflict` when the version is
    /// taken (the caller seals again as the next one).
    async fn stage_credential(
        &self,
        vendor: &str,
        version: i64,
        sealed: &[u8],
        now: DateTime<Utc>,
    ) -> StoreResult<CredentialVersion>;
    /// A vendor's versions, newest first (empty for an unknown vendor).
    async fn list_credentials(&self, vendor: &str) -> StoreResult<Vec<CredentialVersion>>;
    /// One version and its sealed material (`None` once retired).
    async fn get_credential(
        &self,
        vendor: &str,
        version: i64,
    ) -> StoreResult<Option<(CredentialVersion, Option<Vec<u8>>)>>;
    /// Records a probe of a version; `NotFound` if absent.
    async fn record_credential_probe(
        &self,
        vendor: &str,
        version: i64,
        probe: &CredentialProbe,
    ) -> StoreResult<CredentialVersion>;
    /// Makes `version` the vendor's active one, in one transaction: the
    /// version active before becomes previous until `now + grace` (retired
    /// at once, material erased, when `grace` is zero). A staged version or
    /// a previous one still in grace (a rollback) may be promoted;
    /// promoting the active one changes nothing. `NotFound` if absent,
    /// `Conflict` for a retired one. Appends a change-log entry when
    /// something changed, so proxies inject the new version.
    async fn promote_credential(
        &self,
        vendor: &str,
        version: i64,
        grace: chrono::TimeDelta,
        now: DateTime<Utc>,
    ) -> StoreResult<Promotion>;
    /// Retires every previous version whose grace ended at or before `now`:
    /// its sealed material is erased. The (vendor, version) retired.
    async fn retire_credentials(&self, now: DateTime<Utc>) -> StoreResult<Vec<(String, i64)>>;

    /// Deletes a vendor; `NotFound` if absent, `Conflict` if an active
    /// (unrevoked, unexpired at `now`) key uses it. Appends a change-log entry.
    async fn delete_vendor(&self, name: &str, now: DateTime<Utc>) -> StoreResult<()>;

    // --- vault keys ---------------------------------------------------------
    /// Inserts a new key and its rows in the ancestor closure table;
    /// `NotFound` if its vendor or parent does not exist, `Conflict` if the
    /// parent is revoked, expired (at the key's `created_at`) or already at
    /// the deepest level a tree may have. Appends a change-log entry.
    async fn insert_key(&self, key: &VaultKey) -> StoreResult<()>;
    async fn get_key(&self, id: &str) -> StoreResult<Option<VaultKey>>;
    /// The key whose secret hashes to `key_hash`, whatever its state.
    async fn find_key_by_hash(&self, key_hash: &[u8; 32]) -> StoreResult<Option<VaultKey>>;
    /// Keys matching the filter, newest first; inactive keys (revoked or
    /// expired at `now`) only when the filter asks for them.
    async fn list_keys(&self, filter: &KeyFilter, now: DateTime<Utc>)
        -> StoreResult<Vec<VaultKey>>;
    /// The keys of `ids` that exist, whatever their state, in no set order.
    async fn keys_by_id(&self, ids: &[String]) -> StoreResult<Vec<VaultKey>>;
    /// Every key of the runs `labels`, whatever its state, in no set order.
    async fn run_keys(&self, labels: &[String]) -> StoreResult<Vec<VaultKey>>;
    /// Revokes a key and its whole subtree (idempotent: a revoked key keeps
    /// its first `revoked_at`). `NotFound` if absent. Appends one change-log
    /// entry per key it revoked, so proxies refuse the descendants too.
    /// The subtree is the key's budget's: every key of its roll chain goes
    /// with it. A rolled key (one with a successor) is revoked alone: its
    /// budget and subtree live on in the successor.
    async fn revoke_key(&self, id: &str, now: DateTime<Utc>) -> StoreResult<RevokedKey>;
    /// Revokes every unrevoked key with this run label — only those of
    /// `vendors` when given — and every unrevoked key below one of them in
    /// its budget tree, and returns their ids.
    async fn revoke_run(
        &self,
        agent_run_label: &str,
        vendors: Option<&[String]>,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<String>>;
    /// Rolls key `id`: inserts `successor` (which names `id` in
    /// `roll.rolled_from` and spends `id`'s budget, `roll.budget_id`) and
    /// records it on `id` with `retire_at`, when `id`'s grace ends, in one
    /// transaction with a change-log entry for both. `NotFound` if `id` is
    /// absent; `Conflict` if it is revoked, expired at `now`, or was already
    /// rolled (a key has at most one successor). Returns `id` as now stored.
    async fn roll_key(
        &self,
        id: &str,
        successor: &VaultKey,
        retire_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<VaultKey>;
    /// Switches key `id`, in observe mode, to enforcing `terms`: every key
    /// of its roll chain (the chain's first key holds the budget's caps)
    /// drops its observe ceiling and takes the terms, with a change-log
    /// entry for each, in one transaction. `NotFound` if `id` is absent;
    /// `Conflict` if it is revoked or not in observe mode. Returns `id` as
    /// now stored.
    async fn enforce_key(&self, id: &str, terms: &EnforcedTerms) -> StoreResult<VaultKey>;
    /// Rolled keys whose grace ended at or before `now` and that are not
    /// revoked yet, oldest deadline first, at most `limit`.
    async fn due_retirements(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<String>>;
    /// Settled spend of a key on a UTC day (YYYY-MM-DD) and over its life.
    async fn key_spend(&self, id: &str, day: &str) -> StoreResult<KeySpend>;
    /// What each budget of `budget_ids` (a key id, not resolved through
    /// `budget_id`) settled on a UTC day; a budget with nothing settled
    /// that day is left out.
    async fn budgets_spent_on(
        &self,
        budget_ids: &[String],
        day: &str,
    ) -> StoreResult<Vec<(String, keycap_proto::Micros)>>;
    /// The key's budget tree on a UTC day (YYYY-MM-DD), key first, as a
    /// lease grant would weigh it at `now`; empty for an unknown key.
    /// Reads only: nothing is locked or reserved.
    async fn budget_levels(
        &self,
        key_id: &str,
        day: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<BudgetLevel>>;

    // --- change log (what proxies follow) -----------------------------------
    /// A signal that moves whenever the database says the change log may
    /// have grown, from whichever replica; `None` when the database says
    /// nothing (SQLite) and only polling finds other replicas' changes.
    /// The log stays the truth: a missed signal only delays.
    fn change_feed(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
    /// Highest change-log version (0 when empty).
    async fn latest_version(&self) -> StoreResult<i64>;
    /// Changes with version > `after`, oldest first, at most `limit`.
    async fn changes_since(&self, after: i64, limit: u32) -> StoreResult<Vec<Change>>;
    /// Deletes the changes with version <= `through`; returns how many.
    async fn prune_changes(&self, through: i64) -> StoreResult<u64>;
    /// Lowest version still held (0 when empty); a proxy resuming from below
    /// it needs a snapshot.
    async fn oldest_version(&self) -> StoreResult<i64>;
    /// Keys a proxy should know, revoked ones included: every key whose
    /// expiry is after `expired_after`, so a proxy can tell a revoked or a
    /// recently expired key from an unknown one.
    async fn policy_keys(&self, expired_after: DateTime<Utc>) -> StoreResult<Vec<VaultKey>>;

    // --- fleet nodes (who must confirm a revocation) ------------------------
    /// Records that `node` has a policy stream (`stream`) open on
    /// `replica`, replacing any earlier registration of the node: its
    /// applied version starts again at 0 until the node acknowledges one on
    /// this stream.
    async fn register_fleet_node(
        &self,
        node: &str,
        replica: &str,
        stream: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<()>;
    /// Removes the node's registration if it is still the one `stream`
    /// made (the node may have reconnected since).
    async fn unregister_fleet_node(&self, node: &str, stream: &str) -> StoreResult<()>;
    /// Raises the node's applied version to `version`; a lower version than
    /// the one recorded changes nothing. Whether the node is registered.
    async fn ack_policy(&self, node: &str, version: i64) -> StoreResult<bool>;
    /// Marks every stream `replica` serves as alive at `now` and forgets
    /// registrations whose heartbeat is older than `forget_before` (their
    /// replica died without unregistering them). One statement per call,
    /// whatever the number of streams.
    async fn heartbeat_fleet_nodes(
        &self,
        replica: &str,
        now: DateTime<Utc>,
        forget_before: DateTime<Utc>,
    ) -> StoreResult<()>;
    /// Every registered node, by node id.
    async fn fleet_nodes(&self) -> StoreResult<Vec<FleetNode>>;
    /// Replaces what `node` last reported it cannot load with `errors`
    /// (vendor, why); an empty list clears them.
    async fn report_vendor_errors(
        &self,
        node: &str,
        errors: &[(String, String)],
        at: DateTime<Utc>,
    ) -> StoreResult<()>;
    /// What registered nodes reported they cannot load, of `vendor` (of
    /// every vendor for `None`), by vendor then node.
    async fn vendor_load_errors(&self, vendor: Option<&str>) -> StoreResult<Vec<VendorLoadError>>;

    // --- budget -------------------------------------------------------------
    /// Grows (or creates) a lease in one transaction so that, for the key
    /// and day, settled spend + the unreported part of every counting lease
    /// never exceeds the daily cap — for the key and for every ancestor, each
    /// counting its whole subtree — (a lease counts until it expires; one never
    /// returned until `unreturned_lease_grace` after that; a returned one
    /// until its spend has all been reported), and likewise over the key's life for the
    /// lifetime cap. Grants min(requested, available) when that is at least
    /// `minimum`, else 0. Idempotent by `grant_id`: a retried grant returns
    /// the first answer. `Conflict` for a revoked or expired key or ancestor, `NotFound`
    /// for an unknown one. Also `Conflict` when the lease cannot grow: it
    /// was returned, has expired, was fenced, belongs to another key or
    /// day, or (new)
    /// would already be expired; or when the grant id was used for another
    /// lease.
    async fn grant_lease(
        &self,
        req: &LeaseGrantRequest,
        now: DateTime<Utc>,
    ) -> StoreResult<LeaseGrant>;
    /// Closes a lease: its grant shrinks to what the proxy says it spent, so
    /// the rest returns to the key. Idempotent; `NotFound` if unknown.
    /// With `node`, a lease granted to another node is `NotFound`.
    async fn return_lease(
        &self,
        lease_id: &str,
        node: Option<&str>,
        spent: keycap_proto::Micros,
    ) -> StoreResult<()>;
    /// Shrinks an open lease's grant from `from` to `to` (never below what
    /// was reported spent from it), giving the rest back to the key while
    /// the lease stays open. Applied only while the grant is still `from`,
    /// so a late retry never undoes a grant made after it; returns whether
    /// it shrank. `NotFound` if unknown (or, with `node`, another node's).
    async fn shrink_lease(
        &self,
        lease_id: &str,
        node: Option<&str>,
        from: keycap_proto::Micros,
        to: keycap_proto::Micros,
    ) -> StoreResult<bool>;
    /// Nodes holding a lease of one of `key_ids` that is open, unexpired at
    /// `now` and not fully reported: each could still spend with the key.
    async fn lease_holders(
        &self,
        key_ids: &[String],
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<String>>;
    /// The leases granted to `node` that are not returned and still count
    /// against caps: unexpired, or expired after `counted_after` (an
    /// unreturned lease counts for `unreturned_lease_grace` past its
    /// expiry).
    async fn node_leases(
        &self,
        node: &str,
        counted_after: DateTime<Utc>,
    ) -> StoreResult<Vec<NodeLease>>;
    /// Fences the open, unexpired leases of `key_ids` held by `node_ids`: a
    /// fenced lease is never grown again (`grant_lease` answers
    /// `Conflict`), but keeps counting against the caps until it is
    /// returned or expires, and spend reports on it still apply. A lease
    /// keeps the time it was first fenced. Returns the unspent part of those
    /// leases (granted minus reported): the most their nodes can still spend.
    async fn fence_leases(
        &self,
        node_ids: &[String],
        key_ids: &[String],
        now: DateTime<Utc>,
    ) -> StoreResult<keycap_proto::Micros>;
    /// Applies spend events in one transaction, each at most once (by
    /// `event_id`): one audit entry, the key's daily and lifetime spend, and
    /// the lease's reported spend. For each event, whether it was applied
    /// (false: stored before, or earlier in the same batch).
    async fn apply_spend(&self, events: &[SpendEvent]) -> StoreResult<Vec<bool>>;
    /// `apply_spend`, counted: (applied, duplicates).
    async fn record_spend(&self, events: &[SpendEvent]) -> StoreResult<(u32, u32)> {
        let applied = self.apply_spend(events).await?;
        let n = applied.iter().filter(|a| **a).count() as u32;
        Ok((n, events.len() as u32 - n))
    }
    /// Leases live at `now` (not closed, not expired), fleet-wide: how
    /// many, and the budget they hold that their nodes have not reported
    /// spent (for metrics).
    async fn outstanding_leases(
        &self,
        now: DateTime<Utc>,
    ) -> StoreResult<(i64, keycap_proto::Micros)>;

    // --- audit --------------------------------------------------------------
    /// Audit entries matching the query (`vendors` included), newest first
    /// (by `seq`).
    async fn query_audit(&self, q: &AuditQuery) -> StoreResult<Vec<AuditEntry>>;
    /// Up to `limit` audit entries with `seq` > `after_seq`, oldest first
    /// (the ledger in chain order, a page at a time), only those at or
    /// after `since` and before `until` when given.
    async fn audit_chain(
        &self,
        after_seq: i64,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
        limit: u32,
    ) -> StoreResult<Vec<AuditEntry>>;
    /// The ledger head: the last appended entry's seq and hash (seq 0 and
    /// 32 zero bytes before the first, or the last unchained seq).
    async fn ledger_head(&self) -> StoreResult<(i64, [u8; 32])>;
    /// Stores a signed checkpoint; one already stored for its seq (another
    /// replica's) is kept. Whether this one was stored.
    async fn insert_checkpoint(&self, cp: &Checkpoint) -> StoreResult<bool>;
    /// Stored checkpoints, newest (highest seq) first, at most `limit`;
    /// with `signed_by`, only those whose public key is one of these.
    async fn checkpoints(
        &self,
        signed_by: Option<&[[u8; 32]]>,
        limit: u32,
    ) -> StoreResult<Vec<Checkpoint>>;
    /// Every ledger signing key: (id, public key, sealed private key),
    /// newest first.
    async fn ledger_signing_keys(&self) -> StoreResult<Vec<(String, Vec<u8>, Vec<u8>)>>;
    /// Stores a signing key (sealed); `Conflict` if its id is taken.
    async fn insert_ledger_signing_key(
        &self,
        id: &str,
        public_key: &[u8],
        sealed_private: &[u8],
        at: DateTime<Utc>,
    ) -> StoreResult<()>;
    /// Creates the audit ledger's partitions for today and the next days
    /// by the database's clock (PostgreSQL, where the ledger is partitioned
    /// by UTC day; nothing on SQLite, which keeps one table). Idempotent;
    /// replicas call it at start and every hour.
    async fn ensure_audit_partitions(&self) -> StoreResult<()>;
    /// Detaches and drops, oldest first, the audit partitions of days
    /// before `before` whose entries all have `seq <= covered`, stopping at
    /// the first that is not covered; records the last entry dropped in
    /// the retention row (where verify starts from then on). The names of
    /// the partitions dropped; nothing on SQLite.
    async fn drop_audit_partitions(
        &self,
        before: chrono::NaiveDate,
        covered: i64,
    ) -> StoreResult<Vec<String>>;
    /// Notes that an export held every entry up to `seq` (the mark only
    /// rises).
    async fn record_export(&self, through_seq: i64) -> StoreResult<()>;
    /// What was exported and what was dropped.
    async fn ledger_retention(&self) -> StoreResult<Retention>;
    /// Total settled spend and call count of a run label, per vendor
    /// (refusal entries are not calls and are left out).
    async fn spend_summary(&self, agent_run_label: &str) -> StoreResult<SpendSummary>;
    /// Spend, forwarded calls and refused calls of the entries the query
    /// names, grouped as it asks: the `top` groups by spend (then calls),
    /// and the totals over all of them.
    async fn spend_report(&self, q: &SpendReportQuery) -> StoreResult<SpendReport>;

    // --- alert webhooks (see `crate::webhook`) -------------------------------
    /// Registers an endpoint with its sealed signing secret; `Conflict` if
    /// its id is taken.
    async fn insert_webhook_endpoint(
        &self,
        endpoint: &WebhookEndpoint,
        sealed_secret: &[u8],
    ) -> StoreResult<()>;
    /// Every endpoint, oldest first.
    async fn list_webhook_endpoints(&self) -> StoreResult<Vec<WebhookEndpoint>>;
    async fn get_webhook_endpoint(&self, id: &str) -> StoreResult<Option<WebhookEndpoint>>;
    /// Deletes an endpoint and its deliveries; `NotFound` if absent.
    async fn delete_webhook_endpoint(&self, id: &str) -> StoreResult<()>;
    /// Stores `event` and a pending delivery of it to each of
    /// `endpoint_ids`, due at `now`, in one transaction — unless an event
    /// with the same `dedupe` is already stored (by this replica or
    /// another, now or before), when nothing is written. The unique
    /// constraint on `dedupe` decides, so concurrent callers raise an event
    /// once. Whether it was stored.
    async fn enqueue_webhook_event(
        &self,
        event: &WebhookEvent,
        dedupe: Option<&str>,
        endpoint_ids: &[String],
        now: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Claims up to `limit` deliveries for `worker` until `lease_until`:
    /// each the oldest pending delivery of its endpoint (so an endpoint
    /// gets its events in order), due at `now`, not leased to a worker
    /// whose lease still runs. Two workers never claim the same delivery
    /// (row locks skipped on PostgreSQL, one writer at a time on SQLite).
    async fn claim_webhook_deliveries(
        &self,
        worker: &str,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> StoreResult<Vec<ClaimedDelivery>>;
    /// Records an attempt of a delivery `worker` holds and what it leaves
    /// the delivery as, releasing the lease. Ignored (false) when the lease
    /// was lost to another worker meanwhile.
    async fn finish_webhook_attempt(
        &self,
        seq: i64,
        worker: &str,
        attempt: &Attempt,
        outcome: AttemptOutcome,
    ) -> StoreResult<bool>;
    /// An endpoint's newest deliveries with their attempts, newest first.
    async fn webhook_deliveries(&self, endpoint_id: &str, limit: u32)
        -> StoreResult<Vec<Delivery>>;

    // --- the cockpit's reads (see `cockpit_rows`) -------------------------------
    /// Refused calls of the refusal entries the query names, summed per
    /// key and reason, most calls first (at most `MAX_REFUSAL_GROUPS`).
    async fn refusal_counts(&self, q: &RefusalCountQuery) -> StoreResult<Vec<RefusalCount>>;
    /// The keys of `key_ids` and each of their ancestors, once each,
    /// nearest first (by the least depth at which one of `key_ids` sees
    /// it, then id), each with the spend of its whole subtree on `day` and
    /// over its lifetime. Unknown keys add nothing.
    async fn lineage_spend(&self, key_ids: &[String], day: &str) -> StoreResult<Vec<LineageSpend>>;
    // --- approvals (see `crate::approval`) ----------------------------------
    /// Stores a call held for approval; `NotFound` if its key does not
    /// exist, `Conflict` if its id is taken.
    async fn insert_approval(&self, approval: &Approval) -> StoreResult<()>;
    async fn get_approval(&self, id: &str) -> StoreResult<Option<Approval>>;
    /// Approvals matching the filter, newest first; the state is judged at
    /// `now` (an undecided one past its expiry is expired).
    async fn list_approvals(
        &self,
        filter: &ApprovalFilter,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<Approval>>;
    /// Records a decision on a pending approval unexpired at `now`, in one
    /// conditional statement, so of two concurrent deciders one wins.
    /// Whether it was recorded.
    async fn decide_approval(
        &self,
        id: &str,
        approved: bool,
        by: &str,
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Uses an approval for the call `event_id`, in one conditional UPDATE:
    /// approved, unexpired at `now`, unused, of `key_id`, with this
    /// fingerprint and a quote of at least `amount`. Of any number of
    /// concurrent callers, on any replica, at most one gets true.
    async fn consume_approval(
        &self,
        id: &str,
        key_id: &str,
        fingerprint: &[u8; 32],
        amount: keycap_proto::Micros,
        event_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<bool>;
    // --- inbound hooks (see `crate::hooks`) ----------------------------------
    /// Registers an inbound hook and logs the change for the proxies;
    /// `Conflict` if its id is taken.
    async fn insert_hook(&self, hook: &StoredHook) -> StoreResult<()>;
    /// Every inbound hook, oldest first.
    async fn list_hooks(&self) -> StoreResult<Vec<StoredHook>>;
    async fn get_hook(&self, id: &str) -> StoreResult<Option<StoredHook>>;
    /// Replaces a hook's sealed vendor secrets (a roll) and logs the
    /// change; `NotFound` if absent.
    async fn set_hook_secrets(&self, id: &str, sealed_secrets: &[u8]) -> StoreResult<()>;
    /// Replaces a hook's sealed secrets with re-wrapped ones (a KEK
    /// rotation: the plaintext is unchanged, so no change is logged), only
    /// if both are still `old` (a roll meanwhile sealed them afresh).
    /// Whether they were replaced.
    async fn rewrap_hook_secrets(
        &self,
        id: &str,
        old: (&[u8], &[u8]),
        new: (&[u8], &[u8]),
    ) -> StoreResult<bool>;
    /// Deletes a hook and its claimed event ids, and logs the change;
    /// `NotFound` if absent.
    async fn delete_hook(&self, id: &str) -> StoreResult<()>;
    /// Claims event `event_id` of hook `hook_id` until `until`: true for
    /// exactly one caller across every replica while the claim stands (the
    /// primary key decides); a claim past its expiry is free again.
    async fn claim_hook_event(
        &self,
        hook_id: &str,
        event_id: &str,
        now: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Ends a claim: kept until `keep_until` (the event was relayed), or
    /// dropped (`None`: it was not, so the vendor's retry may be).
    async fn settle_hook_event(
        &self,
        hook_id: &str,
        event_id: &str,
        keep_until: Option<DateTime<Utc>>,
    ) -> StoreResult<()>;
}
