//! What the two SQL backends share: row shapes and their conversion to
//! domain types, the timestamp encoding, and the lease-grant arithmetic.
//!
//! Each backend owns its SQL and its locking; this module never touches a
//! connection, so the budget rule is written once and both backends apply it
//! to numbers they read inside their own transaction.
//!
//! Encoding, identical in both schemas:
//! * times are `BIGINT` microseconds since the Unix epoch (UTC). Writing
//!   truncates a `DateTime<Utc>` to whole microseconds, so a value read back
//!   equals the written one after `truncate` (`trunc_subsecs(6)`);
//! * money is `BIGINT` micro-dollars (`Micros`);
//! * maps and lists (currency rates, allowed endpoints, metadata) are JSON
//!   text.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, SubsecRound, Utc};
use keycap_proto::Micros;

use super::{StoreError, StoreResult};
use crate::domain::{
    parse_profile, AdminToken, AuditEntry, Change, ChangeRef, FleetNode, IssuerToken, KeyLimits,
    KeyRoll, LeaseGrant, NodeLease, Outcome, SpendEvent, VaultKey, Vendor, VendorName,
};
use crate::scope::{Scopes, VendorScope};

pub(super) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// `t` as the store keeps it: truncated to whole microseconds.
pub(super) fn truncate(t: DateTime<Utc>) -> DateTime<Utc> {
    t.trunc_subsecs(6)
}

pub(super) fn from_micros(v: i64, column: &str) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(v)
        .ok_or_else(|| StoreError::Corrupt(format!("{column}: timestamp {v} out of range")))
}

pub(super) fn to_json<T: serde::Serialize>(v: &T, column: &str) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str, column: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{column}: {e}")))
}

fn corrupt(column: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{column}: {e}"))
}

/// A unique-constraint violation becomes `Conflict(msg)`; anything else stays
/// a database error.
pub(super) fn conflict_on_unique(e: sqlx::Error, msg: impl FnOnce() -> String) -> StoreError {
    match e.as_database_error() {
        Some(db) if db.is_unique_violation() => StoreError::Conflict(msg()),
        _ => StoreError::Database(e),
    }
}

/// Clamps an audit page size: 0 means the default of 100, at most 1000.
pub(super) fn audit_limit(limit: u32) -> i64 {
    match limit {
        0 => 100,
        n => i64::from(n.min(1000)),
    }
}

pub(super) const VENDOR_COLUMNS: &str = "name, profile, base_url, currency_rates, prices, \
     forward_trace_context, created_at, updated_at, credential_set_at, rotate_after_secs";

#[derive(sqlx::FromRow)]
pub struct VendorRow {
    name: String,
    profile: String,
    base_url: String,
    currency_rates: String,
    prices: String,
    forward_trace_context: bool,
    created_at: i64,
    updated_at: i64,
    credential_set_at: i64,
    rotate_after_secs: Option<i64>,
}

impl VendorRow {
    pub(super) fn into_domain(self) -> StoreResult<Vendor> {
        Ok(Vendor {
            name: VendorName::parse(&self.name).map_err(|e| corrupt("vendors.name", e))?,
            profile: parse_profile(&self.profile).map_err(|e| corrupt("vendors.profile", e))?,
            base_url: self.base_url,
            currency_rates: from_json(&self.currency_rates, "vendors.currency_rates")?,
            prices: self.prices,
            forward_trace_context: self.forward_trace_context,
            created_at: from_micros(self.created_at, "vendors.created_at")?,
            updated_at: from_micros(self.updated_at, "vendors.updated_at")?,
            credential_set_at: from_micros(self.credential_set_at, "vendors.credential_set_at")?,
            rotate_after: self.rotate_after_secs.map(chrono::TimeDelta::seconds),
        })
    }
}

pub(super) const KEY_COLUMNS: &str = "id, key_hash, key_prefix, vendor, allowed_endpoints, \
     daily_cap, per_call_cap, lifetime_cap, expires_at, agent_run_label, metadata, created_at, \
     revoked_at, rate_limit_per_minute, allowed_cidrs, zone, parent_id, approval_above, \
     budget_id, rolled_from, successor_id, retire_at, observe_ceiling";

#[derive(sqlx::FromRow)]
pub struct KeyRow {
    id: String,
    key_hash: Vec<u8>,
    key_prefix: String,
    vendor: String,
    allowed_endpoints: String,
    daily_cap: i64,
    per_call_cap: Option<i64>,
    lifetime_cap: Option<i64>,
    expires_at: i64,
    agent_run_label: String,
    metadata: String,
    created_at: i64,
    revoked_at: Option<i64>,
    rate_limit_per_minute: Option<i64>,
    allowed_cidrs: String,
    zone: Option<String>,
    parent_id: Option<String>,
    approval_above: Option<i64>,
    budget_id: Option<String>,
    rolled_from: Option<String>,
    successor_id: Option<String>,
    retire_at: Option<i64>,
    observe_ceiling: Option<i64>,
}

impl KeyRow {
    pub(super) fn into_domain(self) -> StoreResult<VaultKey> {
        let key_hash: [u8; 32] = self
            .key_hash
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("vault_keys.key_hash", "not 32 bytes"))?;
        let allowed_endpoints: Vec<String> =
            from_json(&self.allowed_endpoints, "vault_keys.allowed_endpoints")?;
        let metadata: BTreeMap<String, String> = from_json(&self.metadata, "vault_keys.metadata")?;
        let cidrs: Vec<String> = from_json(&self.allowed_cidrs, "vault_keys.allowed_cidrs")?;
        let limits = KeyLimits {
            rate_limit_per_minute: self
                .rate_limit_per_minute
                .map(|r| {
                    u32::try_from(r).map_err(|e| corrupt("vault_keys.rate_limit_per_minute", e))
                })
                .transpose()?,
            allowed_cidrs: keycap_proto::network::parse_cidrs(&cidrs)
                .map_err(|e| corrupt("vault_keys.allowed_cidrs", e))?,
            zone: self.zone,
        };
        Ok(VaultKey {
            id: self.id,
            key_hash,
            key_prefix: self.key_prefix,
            vendor: VendorName::parse(&self.vendor).map_err(|e| corrupt("vault_keys.vendor", e))?,
            allowed_endpoints,
            daily_cap: Micros(self.daily_cap),
            per_call_cap: self.per_call_cap.map(Micros),
            lifetime_cap: self.lifetime_cap.map(Micros),
            expires_at: from_micros(self.expires_at, "vault_keys.expires_at")?,
            agent_run_label: self.agent_run_label,
            metadata,
            created_at: from_micros(self.created_at, "vault_keys.created_at")?,
            revoked_at: self
                .revoked_at
                .map(|v| from_micros(v, "vault_keys.revoked_at"))
                .transpose()?,
            limits,
            parent_id: self.parent_id,
            approval_above: self.approval_above.map(Micros),
            roll: KeyRoll {
                budget_id: self.budget_id,
                rolled_from: self.rolled_from,
                successor_id: self.successor_id,
                retire_at: self
                    .retire_at
                    .map(|v| from_micros(v, "vault_keys.retire_at"))
                    .transpose()?,
            },
            observe_ceiling: self.observe_ceiling.map(Micros),
        })
    }
}

/// A key's columns encoded for an insert, in `KEY_COLUMNS` order.
pub(super) struct KeyInsert<'a> {
    pub id: &'a str,
    pub key_hash: &'a [u8],
    pub key_prefix: &'a str,
    pub vendor: &'a str,
    pub allowed_endpoints: String,
    pub daily_cap: i64,
    pub per_call_cap: Option<i64>,
    pub lifetime_cap: Option<i64>,
    pub expires_at: i64,
    pub agent_run_label: &'a str,
    pub metadata: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
    pub rate_limit_per_minute: Option<i64>,
    pub allowed_cidrs: String,
    pub zone: Option<&'a str>,
    pub parent_id: Option<&'a str>,
    pub approval_above: Option<i64>,
    pub budget_id: Option<&'a str>,
    pub rolled_from: Option<&'a str>,
    pub successor_id: Option<&'a str>,
    pub retire_at: Option<i64>,
    pub observe_ceiling: Option<i64>,
}

impl<'a> KeyInsert<'a> {
    pub(super) fn new(k: &'a VaultKey) -> StoreResult<Self> {
        Ok(KeyInsert {
            id: &k.id,
            key_hash: &k.key_hash,
            key_prefix: &k.key_prefix,
            vendor: k.vendor.as_str(),
            allowed_endpoints: to_json(&k.allowed_endpoints, "allowed_endpoints")?,
            daily_cap: k.daily_cap.0,
            per_call_cap: k.per_call_cap.map(|m| m.0),
            lifetime_cap: k.lifetime_cap.map(|m| m.0),
            expires_at: micros(k.expires_at),
            agent_run_label: &k.agent_run_label,
            metadata: to_json(&k.metadata, "metadata")?,
            created_at: micros(k.created_at),
            revoked_at: k.revoked_at.map(micros),
            rate_limit_per_minute: k.limits.rate_limit_per_minute.map(i64::from),
            allowed_cidrs: to_json(&k.limits.cidr_strings(), "allowed_cidrs")?,
            zone: k.limits.zone.as_deref(),
            parent_id: k.parent_id.as_deref(),
            approval_above: k.approval_above.map(|m| m.0),
            budget_id: k.roll.budget_id.as_deref(),
            rolled_from: k.roll.rolled_from.as_deref(),
            successor_id: k.roll.successor_id.as_deref(),
            retire_at: k.roll.retire_at.map(micros),
            observe_ceiling: k.observe_ceiling.map(|m| m.0),
        })
    }
}

pub(super) const ADMIN_TOKEN_COLUMNS: &str =
    "id, token_hash, token_prefix, name, scopes, vendors, created_at, expires_at, revoked_at";

/// An admin token row. `scopes` is a JSON list of scope names; `vendors` a
/// JSON list of vendor names, NULL for every vendor.
#[derive(sqlx::FromRow)]
pub struct AdminTokenRow {
    id: String,
    token_hash: Vec<u8>,
    token_prefix: String,
    name: String,
    scopes: String,
    vendors: Option<String>,
    created_at: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl AdminTokenRow {
    pub(super) fn into_domain(self) -> StoreResult<AdminToken> {
        let token_hash: [u8; 32] = self
            .token_hash
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("admin_tokens.token_hash", "not 32 bytes"))?;
        let scopes: Vec<String> = from_json(&self.scopes, "admin_tokens.scopes")?;
        let vendors: Vec<String> = match &self.vendors {
            Some(v) => from_json(v, "admin_tokens.vendors")?,
            None => Vec::new(),
        };
        Ok(AdminToken {
            id: self.id,
            token_hash,
            token_prefix: self.token_prefix,
            name: self.name,
            scopes: Scopes::parse_list(&scopes).map_err(|e| corrupt("admin_tokens.scopes", e))?,
            vendors: VendorScope::parse_list(&vendors)
                .map_err(|e| corrupt("admin_tokens.vendors", e))?,
            created_at: from_micros(self.created_at, "admin_tokens.created_at")?,
            expires_at: self
                .expires_at
                .map(|v| from_micros(v, "admin_tokens.expires_at"))
                .transpose()?,
            revoked_at: self
                .revoked_at
                .map(|v| from_micros(v, "admin_tokens.revoked_at"))
                .transpose()?,
        })
    }
}

pub(super) const ISSUER_TOKEN_COLUMNS: &str =
    "id, token_hash, token_prefix, key_id, name, created_at, expires_at, revoked_at";

/// An issuer token row.
#[derive(sqlx::FromRow)]
pub struct IssuerTokenRow {
    id: String,
    token_hash: Vec<u8>,
    token_prefix: String,
    key_id: String,
    name: String,
    created_at: i64,
    expires_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl IssuerTokenRow {
    pub(super) fn into_domain(self) -> StoreResult<IssuerToken> {
        let token_hash: [u8; 32] = self
            .token_hash
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("issuer_tokens.token_hash", "not 32 bytes"))?;
        Ok(IssuerToken {
            id: self.id,
            token_hash,
            token_prefix: self.token_prefix,
            key_id: self.key_id,
            name: self.name,
            created_at: from_micros(self.created_at, "issuer_tokens.created_at")?,
            expires_at: self
                .expires_at
                .map(|v| from_micros(v, "issuer_tokens.expires_at"))
                .transpose()?,
            revoked_at: self
                .revoked_at
                .map(|v| from_micros(v, "issuer_tokens.revoked_at"))
                .transpose()?,
        })
    }
}

/// An admin token's `scopes` and `vendors` columns.
pub(super) fn admin_token_lists(t: &AdminToken) -> StoreResult<(String, Option<String>)> {
    Ok((
        to_json(&t.scopes.names(), "scopes")?,
        t.vendors
            .list()
            .map(|v| to_json(&v, "vendors"))
            .transpose()?,
    ))
}

/// Whether revoking `target` would leave no active token holding every
/// scope over every vendor (the admin API would then be out of reach).
/// `active` are the tokens active at the time of the revocation.
pub(super) fn would_strand_admin(target: &AdminToken, active: &[AdminToken]) -> bool {
    target.is_unrestricted_admin()
        && !active
            .iter()
            .any(|t| t.id != target.id && t.can_stand_in_for_admin())
}

pub(super) const LAST_ADMIN: &str = "this is the last active admin token with every scope over \
     every vendor; create another (scope \"admin\", no expiry) before revoking it";

#[derive(sqlx::FromRow)]
pub struct ChangeRow {
    version: i64,
    kind: String,
    ref_id: String,
}

pub(super) const CHANGE_VENDOR: &str = "vendor";
pub(super) const CHANGE_KEY: &str = "key";

impl ChangeRow {
    pub(super) fn into_domain(self) -> StoreResult<Change> {
        let what = match self.kind.as_str() {
            CHANGE_VENDOR => ChangeRef::Vendor(self.ref_id),
            CHANGE_KEY => ChangeRef::Key(self.ref_id),
            super::hook_rows::CHANGE_HOOK => ChangeRef::Hook(self.ref_id),
            other => {
                return Err(corrupt(
                    "change_log.kind",
                    format!("unknown kind {other:?}"),
                ))
            }
        };
        Ok(Change {
            version: self.version,
            what,
        })
    }
}

pub(super) const AUDIT_COLUMNS: &str = "seq, event_id, key_id, agent_run_label, vendor, method, \
     path, upstream_status, reserved, cost, outcome, at, node_id, lease_id, day, detail_json, \
     trace_id, context, prev_hash, hash, refusal_reason, refused_calls, credential_version, \
     would_refuse";

#[derive(sqlx::FromRow)]
pub struct AuditRow {
    seq: i64,
    event_id: String,
    key_id: String,
    agent_run_label: String,
    vendor: String,
    method: String,
    path: String,
    upstream_status: i32,
    reserved: i64,
    cost: i64,
    outcome: String,
    at: i64,
    node_id: String,
    lease_id: String,
    day: String,
    detail_json: String,
    trace_id: String,
    context: String,
    prev_hash: Option<Vec<u8>>,
    hash: Option<Vec<u8>>,
    refusal_reason: String,
    refused_calls: i64,
    credential_version: i64,
    would_refuse: String,
}

fn hash32(v: Option<Vec<u8>>, column: &str) -> StoreResult<Option<[u8; 32]>> {
    v.map(|v| <[u8; 32]>::try_from(v.as_slice()).map_err(|_| corrupt(column, "not 32 bytes")))
        .transpose()
}

impl AuditRow {
    pub(super) fn into_domain(self) -> StoreResult<AuditEntry> {
        Ok(AuditEntry {
            seq: self.seq,
            agent_run_label: self.agent_run_label,
            event: SpendEvent {
                event_id: self.event_id,
                lease_id: self.lease_id,
                key_id: self.key_id,
                day: self.day,
                vendor: self.vendor,
                method: self.method,
                path: self.path,
                upstream_status: self.upstream_status,
                reserved: Micros(self.reserved),
                cost: Micros(self.cost),
                outcome: Outcome::parse(&self.outcome).map_err(|e| corrupt("audit.outcome", e))?,
                at: from_micros(self.at, "audit.at")?,
                node_id: self.node_id,
                detail_json: self.detail_json,
                trace_id: self.trace_id,
                context: from_json(&self.context, "audit.context")?,
                refusal_reason: self.refusal_reason,
                refused_calls: self.refused_calls,
                credential_version: self.credential_version,
                would_refuse: self.would_refuse,
            },
            prev_hash: hash32(self.prev_hash, "audit.prev_hash")?,
            hash: hash32(self.hash, "audit.hash")?,
        })
    }
}

/// The stored answer of a grant, returned again when it is retried.
#[derive(sqlx::FromRow)]
pub struct GrantRow {
    pub lease_id: String,
    pub granted: i64,
    pub lease_total: i64,
    pub unleased: i64,
    pub expires_at: i64,
    pub lifetime_bound: bool,
}

impl GrantRow {
    pub(super) fn into_domain(self) -> StoreResult<LeaseGrant> {
        Ok(LeaseGrant {
            granted: Micros(self.granted),
            lease_total: Micros(self.lease_total),
            unleased: Micros(self.unleased),
            expires_at: from_micros(self.expires_at, "lease_grants.expires_at")?,
            lifetime_bound: self.lifetime_bound,
        })
    }
}

/// The caps and state of the key a grant draws on (read under its lock).
#[derive(sqlx::FromRow, Debug, Clone)]
pub struct KeyBudgetRow {
    pub daily_cap: i64,
    pub lifetime_cap: Option<i64>,
    pub expires_at: i64,
    pub revoked_at: Option<i64>,
}

/// The lease a grant grows, when it already exists.
#[derive(sqlx::FromRow)]
pub struct LeaseRow {
    pub key_id: String,
    pub node_id: String,
    pub day: String,
    pub granted: i64,
    pub expires_at: i64,
    pub closed: bool,
    pub fenced: bool,
}

/// Columns of `LeaseRow`, selected from `leases`.
pub(super) const LEASE_COLUMNS: &str =
    "key_id, node_id, day, granted, expires_at, closed, fenced_at IS NOT NULL AS fenced";

/// Columns of `NodeLeaseRow`, selected from `leases`.
pub(super) const NODE_LEASE_COLUMNS: &str = "id, key_id, day, granted, reported, expires_at";

#[derive(sqlx::FromRow)]
pub struct NodeLeaseRow {
    id: String,
    key_id: String,
    day: String,
    granted: i64,
    reported: i64,
    expires_at: i64,
}

impl NodeLeaseRow {
    pub fn into_domain(self) -> StoreResult<NodeLease> {
        Ok(NodeLease {
            expires_at: from_micros(self.expires_at, "leases.expires_at")?,
            id: self.id,
            key_id: self.key_id,
            day: self.day,
            granted: Micros(self.granted),
            reported: Micros(self.reported),
        })
    }
}

/// Load errors of nodes still registered: a node gone from `fleet_nodes`
/// no longer speaks for the fleet. `{vendor}` is a placeholder for the
/// vendor filter (or `NULL`).
pub(super) fn vendor_load_errors_sql(vendor_param: &str) -> String {
    format!(
        "SELECT e.vendor, e.node_id, e.error, e.at FROM vendor_load_errors e \
         JOIN fleet_nodes f ON f.node_id = e.node_id \
         WHERE {vendor_param} IS NULL OR e.vendor = {vendor_param} \
         ORDER BY e.vendor, e.node_id"
    )
}

#[derive(sqlx::FromRow)]
pub struct VendorLoadErrorRow {
    vendor: String,
    node_id: String,
    error: String,
    at: i64,
}

impl VendorLoadErrorRow {
    pub(super) fn into_domain(self) -> StoreResult<crate::domain::VendorLoadError> {
        Ok(crate::domain::VendorLoadError {
            vendor: self.vendor,
            node_id: self.node_id,
            error: self.error,
            at: from_micros(self.at, "vendor_load_errors.at")?,
        })
    }
}

pub(super) const FLEET_NODE_COLUMNS: &str = "node_id, replica, applied_version, heartbeat_at";

#[derive(sqlx::FromRow)]
pub struct FleetNodeRow {
    node_id: String,
    replica: String,
    applied_version: i64,
    heartbeat_at: i64,
}

impl FleetNodeRow {
    pub(super) fn into_domain(self) -> StoreResult<FleetNode> {
        Ok(FleetNode {
            node_id: self.node_id,
            replica: self.replica,
            applied_version: self.applied_version,
            heartbeat_at: from_micros(self.heartbeat_at, "fleet_nodes.heartbeat_at")?,
        })
    }
}

/// What already weighs on a key's caps, read in one statement so the four
/// sums come from one snapshot.
#[derive(sqlx::FromRow, Debug, Clone, Copy)]
pub struct UsageRow {
    /// Settled spend of the key on the grant's day.
    pub spent_day: i64,
    /// Settled spend of the key over all days.
    pub spent_life: i64,
    /// Unspent part of the key's unexpired leases for the grant's day.
    pub leased_day: i64,
    /// Unspent part of all the key's unexpired leases.
    pub leased_life: i64,
}

/// One level of a grant's budget tree — the key itself (depth 0) or one of
/// its ancestors — with what already weighs on that level's caps: the
/// settled spend and counting leases of every key in its subtree.
#[derive(sqlx::FromRow, Debug, Clone)]
pub struct TreeLevelRow {
    pub id: String,
    pub depth: i64,
    #[sqlx(flatten)]
    pub budget: KeyBudgetRow,
    #[sqlx(flatten)]
    pub usage: UsageRow,
}

impl TreeLevelRow {
    pub(super) fn into_level(self) -> super::BudgetLevel {
        super::BudgetLevel {
            key_id: self.id,
            depth: self.depth,
            daily_cap: Micros(self.budget.daily_cap),
            lifetime_cap: self.budget.lifetime_cap.map(Micros),
            spent_day: Micros(self.usage.spent_day),
            spent_life: Micros(self.usage.spent_life),
            leased_day: Micros(self.usage.leased_day),
            leased_life: Micros(self.usage.leased_life),
        }
    }
}

/// The columns of `TreeLevelRow` for the key `?1`/`$1` and each ancestor,
/// key first. `{p}` placeholders: key id, day, the time before which an
/// unreturned lease no longer counts; `{greatest}` is the backend's
/// two-argument max. A key in observe mode is held to its observe ceiling
/// a day and no lifetime cap: its own caps only mark calls (docs/observe.md).
/// Subtree sums go through the closure table, so a
/// level counts its own spend and leases and those of all its descendants,
/// with the same lease-counting rule as a single key.
pub(super) fn tree_levels_sql(key: &str, day: &str, grace: &str, greatest: &str) -> String {
    format!(
        "SELECT k.id, CAST(a.depth AS BIGINT) AS depth,            COALESCE(k.observe_ceiling, k.daily_cap) AS daily_cap,            CASE WHEN k.observe_ceiling IS NULL THEN k.lifetime_cap END AS lifetime_cap,            (SELECT MAX(c.expires_at) FROM vault_keys c WHERE c.id = k.id OR c.budget_id = k.id)              AS expires_at,            CASE WHEN EXISTS (SELECT 1 FROM vault_keys c              WHERE (c.id = k.id OR c.budget_id = k.id) AND c.revoked_at IS NULL)              THEN NULL ELSE k.revoked_at END AS revoked_at,            CAST(COALESCE((SELECT SUM(s.spent) FROM key_ancestors d              JOIN key_spend_daily s ON s.key_id = d.key_id              WHERE d.ancestor_id = k.id AND s.day = {day}), 0) AS BIGINT) AS spent_day,            CAST(COALESCE((SELECT SUM(s.spent) FROM key_ancestors d              JOIN key_spend_daily s ON s.key_id = d.key_id              WHERE d.ancestor_id = k.id), 0) AS BIGINT) AS spent_life,            CAST(COALESCE((SELECT SUM({greatest}(l.granted - l.reported, 0)) FROM key_ancestors d              JOIN leases l ON l.key_id = d.key_id              WHERE d.ancestor_id = k.id AND l.day = {day}                AND (l.expires_at > {grace} OR (l.closed AND l.granted > l.reported))), 0)              AS BIGINT) AS leased_day,            CAST(COALESCE((SELECT SUM({greatest}(l.granted - l.reported, 0)) FROM key_ancestors d              JOIN leases l ON l.key_id = d.key_id              WHERE d.ancestor_id = k.id                AND (l.expires_at > {grace} OR (l.closed AND l.granted > l.reported))), 0)              AS BIGINT) AS leased_life          FROM key_ancestors a JOIN vault_keys k ON k.id = a.ancestor_id          WHERE a.key_id = {key} ORDER BY a.depth"
    )
}

/// Refuses a grant when an ancestor of the key is revoked or expired: a
/// child may spend only while every key above it may.
pub(super) fn check_ancestors(levels: &[TreeLevelRow], now: DateTime<Utc>) -> StoreResult<()> {
    let now = micros(now);
    for l in levels.iter().filter(|l| l.depth > 0) {
        if l.budget.revoked_at.is_some() {
            return Err(StoreError::Conflict(format!(
                "ancestor key {} is revoked",
                l.id
            )));
        }
        if l.budget.expires_at <= now {
            return Err(StoreError::Conflict(format!(
                "ancestor key {} has expired",
                l.id
            )));
        }
    }
    Ok(())
}

/// The deepest a budget tree may go: a root and at most three levels of
/// descendants. Bounded so a grant's work (one budget per level) is too.
pub(super) const MAX_TREE_LEVELS: i64 = 4;

/// Refuses a new child of `parent` (whose ancestors, itself at depth 0, are
/// `ancestors`) when the child would sit below `MAX_TREE_LEVELS`.
pub(super) fn check_tree_depth(parent: &str, ancestors: &[(String, i64)]) -> StoreResult<()> {
    let parent_levels = ancestors.iter().map(|(_, d)| d + 1).max().unwrap_or(1);
    if parent_levels >= MAX_TREE_LEVELS {
        return Err(StoreError::Conflict(format!(
            "parent key {parent} is already {parent_levels} levels deep; a budget tree has at \
             most {MAX_TREE_LEVELS}"
        )));
    }
    Ok(())
}

/// Checks a grant against the key and the lease it grows; `Ok(())` when it
/// may proceed. Shared so both backends refuse the same things.
pub(super) fn check_grant(
    key_id: &str,
    key: &KeyBudgetRow,
    lease: Option<&LeaseRow>,
    req_node: &str,
    req_day: &str,
    req_expires_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> StoreResult<()> {
    let now = micros(now);
    if key.revoked_at.is_some() {
        return Err(StoreError::Conflict(format!("key {key_id} is revoked")));
    }
    if key.expires_at <= now {
        return Err(StoreError::Conflict(format!("key {key_id} has expired")));
    }
    match lease {
        Some(l) if l.key_id != key_id || l.day != req_day => Err(StoreError::Conflict(
            "lease belongs to another key or day".to_string(),
        )),
        // Only the node it was granted to may grow it (under mutual TLS the
        // node id is the one its certificate names).
        Some(l) if l.node_id != req_node => Err(StoreError::Conflict(
            "lease belongs to another node".to_string(),
        )),
        Some(l) if l.closed => Err(StoreError::Conflict("lease was returned".to_string())),
        // Its node did not confirm a revocation: whatever it still holds is
        // all it may spend.
        Some(l) if l.fenced => Err(StoreError::Conflict(
            "lease is fenced: its node did not confirm a revocation".to_string(),
        )),
        // Growing an expired lease would hand out budget nothing counts.
        Some(l) if l.expires_at <= now => {
            Err(StoreError::Conflict("lease has expired".to_string()))
        }
        Some(_) => Ok(()),
        None if micros(req_expires_at) <= now => Err(StoreError::Conflict(
            "a new lease must expire in the future".to_string(),
        )),
        None => Ok(()),
    }
}

/// What a grant decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GrantDecision {
    pub granted: i64,
    /// Left outside every live lease after this grant.
    pub unleased: i64,
    /// The lifetime cap, not the daily one, is what limits the key now.
    pub lifetime_bound: bool,
}

/// The budget rule of a lease grant for a key alone (a one-level tree):
/// how much of `requested` to grant and how much stays unleased afterwards.
///
/// available = min(daily_cap - spent_day - leased_day,
///                 lifetime_cap - spent_life - leased_life), at least 0;
/// granted = min(requested, available) when that is > 0 and >= minimum,
/// else 0.
#[cfg(test)]
fn decide_grant(
    key: &KeyBudgetRow,
    usage: UsageRow,
    requested: Micros,
    minimum: Micros,
) -> GrantDecision {
    decide_tree_grant([(key, usage)], requested, minimum)
}

/// What is left at one level of the tree and whether its lifetime cap, not
/// its daily one, is what limits it.
fn level_available(key: &KeyBudgetRow, usage: UsageRow) -> (i64, bool) {
    let day = key
        .daily_cap
        .saturating_sub(usage.spent_day)
        .saturating_sub(usage.leased_day);
    let life = key.lifetime_cap.map(|cap| {
        cap.saturating_sub(usage.spent_life)
            .saturating_sub(usage.leased_life)
    });
    let lifetime_bound = life.is_some_and(|l| l < day);
    (life.map_or(day, |l| day.min(l)).max(0), lifetime_bound)
}

/// The budget rule over a key and its ancestors (key first): each level
/// allows what `decide_grant` would for it alone; the grant is bounded by
/// the tightest level, whose lifetime-or-daily answer and remainder are the
/// ones reported. So for every level, subtree spend + subtree leases stays
/// within its caps.
pub(super) fn decide_tree_grant<'a>(
    levels: impl IntoIterator<Item = (&'a KeyBudgetRow, UsageRow)>,
    requested: Micros,
    minimum: Micros,
) -> GrantDecision {
    let mut tightest: Option<(i64, bool)> = None;
    for (key, usage) in levels {
        let level = level_available(key, usage);
        if tightest.is_none_or(|t| level.0 < t.0) {
            tightest = Some(level);
        }
    }
    let (available, lifetime_bound) = tightest.unwrap_or((0, false));
    let want = requested.0.min(available);
    let granted = if want > 0 && want >= minimum.0 {
        want
    } else {
        0
    };
    GrantDecision {
        granted,
        unleased: available - granted,
        lifetime_bound,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spend_chunks_are_powers_of_two_in_order_and_cover_the_batch() {
        for n in [0usize, 1, 2, 3, 7, 200, 255, 256, 257, 1000, 10_000] {
            let items: Vec<usize> = (0..n).collect();
            let chunks: Vec<&[usize]> = spend_chunks(&items).collect();
            assert!(
                chunks
                    .iter()
                    .all(|c| c.len().is_power_of_two() && c.len() <= SPEND_CHUNK),
                "{n}: {:?}",
                chunks.iter().map(|c| c.len()).collect::<Vec<_>>()
            );
            assert_eq!(chunks.concat(), items, "{n}: every event once, in order");
        }
        // A handful of statement shapes serve every batch size.
        let shapes: std::collections::BTreeSet<usize> = (1..=2000usize)
            .flat_map(|n| {
                let items = vec![0u8; n];
                spend_chunks(&items).map(<[u8]>::len).collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(shapes.len(), 9, "{shapes:?}");
    }

    #[test]
    fn the_sqlite_audit_insert_binds_plain_placeholders_in_order() {
        let event = SpendEvent::settled("e", "k", 2, 1);
        let entries: Vec<ChainedEntry<'_>> = (1..=3)
            .map(|seq| ChainedEntry {
                seq,
                event: &event,
                agent_run_label: "run",
                prev_hash: [0; 32],
                hash: [1; 32],
            })
            .collect();
        let q = audit_insert(&entries).unwrap();
        // Named placeholders would make binding cost the square of their
        // number on SQLite (see `Statement::anonymous`).
        assert!(!q.sql.contains('$'), "{}", q.sql);
        assert_eq!(q.sql.matches('?').count(), 3 * 24);
        assert_eq!(q.args.len(), 3 * 24);
        assert!(matches!(q.args[0], Arg::Int(1)) && matches!(q.args[24], Arg::Int(2)));
    }

    fn key(daily: i64, life: Option<i64>) -> KeyBudgetRow {
        KeyBudgetRow {
            daily_cap: daily,
            lifetime_cap: life,
            expires_at: i64::MAX,
            revoked_at: None,
        }
    }

    fn usage(spent_day: i64, spent_life: i64, leased_day: i64, leased_life: i64) -> UsageRow {
        UsageRow {
            spent_day,
            spent_life,
            leased_day,
            leased_life,
        }
    }

    fn pair(d: GrantDecision) -> (i64, i64) {
        (d.granted, d.unleased)
    }

    #[test]
    fn grants_what_is_left_of_the_tighter_cap() {
        let u = usage(30, 30, 20, 20);
        assert_eq!(
            pair(decide_grant(&key(100, None), u, Micros(80), Micros(0))),
            (50, 0)
        );
        assert_eq!(
            pair(decide_grant(&key(100, None), u, Micros(10), Micros(0))),
            (10, 40)
        );
        let u = usage(0, 900, 0, 50);
        assert_eq!(
            pair(decide_grant(
                &key(100, Some(1000)),
                u,
                Micros(80),
                Micros(0)
            )),
            (50, 0)
        );
    }

    #[test]
    fn says_which_cap_binds() {
        // Daily budget left 100, lifetime left 60: the lifetime cap binds.
        let d = decide_grant(
            &key(100, Some(1000)),
            usage(0, 940, 0, 0),
            Micros(80),
            Micros(0),
        );
        assert_eq!((d.granted, d.unleased, d.lifetime_bound), (60, 0, true));
        // Lifetime left 500, daily left 40: the daily cap binds.
        let d = decide_grant(
            &key(100, Some(1000)),
            usage(60, 500, 0, 0),
            Micros(80),
            Micros(0),
        );
        assert_eq!((d.granted, d.unleased, d.lifetime_bound), (40, 0, false));
        // No lifetime cap: always the daily one.
        let d = decide_grant(&key(100, None), usage(100, 100, 0, 0), Micros(1), Micros(1));
        assert_eq!((d.granted, d.lifetime_bound), (0, false));
    }

    #[test]
    fn a_tree_grants_what_its_tightest_level_allows() {
        let child = key(500, None);
        let parent = key(1000, Some(5000));
        // The child has 500 left, its parent 1000 - 700 = 300 by the day
        // and 5000 - 4900 = 100 over its life: the parent's lifetime binds.
        let levels = [
            (&child, usage(0, 0, 0, 0)),
            (&parent, usage(400, 4600, 300, 300)),
        ];
        let d = decide_tree_grant(levels, Micros(250), Micros(0));
        assert_eq!((d.granted, d.unleased, d.lifetime_bound), (100, 0, true));
        // With the parent far from its caps the child's own cap binds.
        let levels = [
            (&child, usage(450, 450, 0, 0)),
            (&parent, usage(450, 450, 0, 0)),
        ];
        let d = decide_tree_grant(levels, Micros(250), Micros(0));
        assert_eq!((d.granted, d.unleased, d.lifetime_bound), (50, 0, false));
        // An exhausted ancestor grants nothing, and says nothing is left.
        let levels = [
            (&child, usage(0, 0, 0, 0)),
            (&parent, usage(0, 0, 1000, 1000)),
        ];
        let d = decide_tree_grant(levels, Micros(1), Micros(1));
        assert_eq!((d.granted, d.unleased), (0, 0));
    }

    #[test]
    fn minimum_and_exhaustion_grant_nothing() {
        let u = usage(95, 95, 0, 0);
        assert_eq!(
            pair(decide_grant(&key(100, None), u, Micros(10), Micros(6))),
            (0, 5)
        );
        assert_eq!(
            pair(decide_grant(&key(100, None), u, Micros(10), Micros(5))),
            (5, 0)
        );
        let over = usage(150, 150, 0, 0);
        assert_eq!(
            pair(decide_grant(&key(100, None), over, Micros(10), Micros(0))),
            (0, 0)
        );
        assert_eq!(
            pair(decide_grant(
                &key(100, None),
                usage(0, 0, 0, 0),
                Micros(-5),
                Micros(0)
            )),
            (0, 100)
        );
    }
}

/// Most events per multi-row audit insert: 15 bound values each stays far
/// below both backends' parameter limits.
const SPEND_CHUNK: usize = 256;

/// Splits a batch into chunks whose lengths are powers of two, largest
/// first. Each chunk length is one SQL text, so a handful of prepared
/// statements serve every batch size instead of one fresh statement (and
/// its parse) per batch.
pub(super) fn spend_chunks<T>(mut items: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if items.is_empty() {
            return None;
        }
        let n = items.len().min(SPEND_CHUNK);
        let n = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let (chunk, rest) = items.split_at(n);
        items = rest;
        Some(chunk)
    })
}

/// The distinct key ids of a batch, for one run-label lookup per batch.
pub(super) fn distinct_key_ids(events: &[SpendEvent]) -> Vec<&str> {
    let mut ids: Vec<&str> = events.iter().map(|e| e.key_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// What a batch of newly applied spend events adds up to, so a settle
/// writes one row per (budget, day) and per lease instead of one per
/// event, in one statement of each kind (`settle_daily`, `settle_leases`).
/// Sorted, so the rows are written in the same order whatever the batch.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct SpendTotals<'a> {
    /// ((budget_id, day), spent, calls): spend counts against the budget
    /// its key spends (a roll chain's first key); the audit entry keeps
    /// the key itself.
    pub daily: Vec<((&'a str, &'a str), i64, i64)>,
    /// ((lease_id, node_id), reported): a lease's reported spend grows
    /// only by its own node's reports.
    pub leases: Vec<((&'a str, &'a str), i64)>,
}

/// `budgets` maps a key id to the budget it spends; a key not in it (one
/// the store does not hold) spends its own.
pub(super) fn spend_totals<'a>(
    applied: impl Iterator<Item = &'a SpendEvent>,
    budgets: &'a HashMap<String, String>,
) -> SpendTotals<'a> {
    let mut daily: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
    let mut leases: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    // A refusal (or a relayed inbound hook event) spends nothing and is no
    // call of the key's.
    for e in applied.filter(|e| e.outcome.is_call()) {
        let budget = budgets
            .get(&e.key_id)
            .map_or(e.key_id.as_str(), String::as_str);
        let d = daily.entry((budget, &e.day)).or_default();
        d.0 += e.cost.0;
        d.1 += 1;
        if !e.lease_id.is_empty() {
            *leases.entry((&e.lease_id, &e.node_id)).or_default() += e.cost.0;
        }
    }
    SpendTotals {
        daily: daily.into_iter().map(|(k, (s, c))| (k, s, c)).collect(),
        leases: leases.into_iter().collect(),
    }
}

/// A statement with `$N` placeholders, or plain `?` ones when `plain`
/// (SQLite, `Statement::anonymous`).
fn statement(plain: bool, sql: &str) -> Statement {
    if plain {
        Statement::anonymous(sql)
    } else {
        Statement::new(sql)
    }
}

/// The upsert adding `rows` of `SpendTotals::daily` to the budgets' daily
/// spend, one statement for them all.
pub(super) fn settle_daily(rows: &[((&str, &str), i64, i64)], plain: bool) -> Statement {
    let mut q = statement(
        plain,
        "INSERT INTO key_spend_daily (key_id, day, spent, calls) VALUES ",
    );
    for (i, ((budget, day), spent, calls)) in rows.iter().enumerate() {
        q.push(if i == 0 { "(" } else { ", (" });
        q.push_bind(*budget).push(", ").push_bind(*day);
        q.push(", ").push_bind(*spent).push(", ").push_bind(*calls);
        q.push(")");
    }
    q.push(
        " ON CONFLICT (key_id, day) DO UPDATE \
         SET spent = key_spend_daily.spent + excluded.spent, \
             calls = key_spend_daily.calls + excluded.calls",
    );
    q
}

/// The update adding `rows` of `SpendTotals::leases` to the leases'
/// reported spend, one statement for them all. A lease is matched by its
/// id and its node: another node's report on it changes nothing. (A
/// `VALUES` list's columns are `column1`, `column2`, … on both backends.)
pub(super) fn settle_leases(rows: &[((&str, &str), i64)], plain: bool) -> Statement {
    let mut q = statement(
        plain,
        "UPDATE leases SET reported = reported + v.column3 FROM (VALUES ",
    );
    for (i, ((lease, node), reported)) in rows.iter().enumerate() {
        q.push(if i == 0 { "(" } else { ", (" });
        q.push_bind(*lease).push(", ").push_bind(*node);
        q.push(", ").push_bind(*reported).push(")");
    }
    q.push(") AS v WHERE leases.id = v.column1 AND leases.node_id = v.column2");
    q
}

/// What spend ingest reads of each key of a batch: the run label its
/// entries carry and, for a key in observe mode, the caps its calls are
/// marked against (`ledger::observe`).
#[derive(sqlx::FromRow)]
pub struct SpendKeyRow {
    pub id: String,
    pub agent_run_label: String,
    pub budget_id: String,
    pub daily_cap: i64,
    pub lifetime_cap: Option<i64>,
    pub observe_ceiling: Option<i64>,
}

/// One entry about to be appended: its event, its place in the chain and
/// the run label of its key.
pub struct ChainedEntry<'a> {
    pub seq: i64,
    pub event: &'a SpendEvent,
    pub agent_run_label: &'a str,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// The multi-row insert of `entries` into the audit ledger (SQLite).
pub(super) fn audit_insert(entries: &[ChainedEntry<'_>]) -> StoreResult<Statement> {
    let mut q = Statement::anonymous(
        "INSERT INTO audit (seq, event_id, key_id, agent_run_label, vendor, method, path, \
         upstream_status, reserved, cost, outcome, at, node_id, lease_id, day, detail_json, \
         trace_id, context, prev_hash, hash, refusal_reason, refused_calls, \
         credential_version, would_refuse) VALUES ",
    );
    for (i, c) in entries.iter().enumerate() {
        let e = c.event;
        q.push(if i == 0 { "(" } else { ", (" });
        q.push_bind(c.seq);
        for text in [
            e.event_id.as_str(),
            e.key_id.as_str(),
            c.agent_run_label,
            e.vendor.as_str(),
            e.method.as_str(),
            e.path.as_str(),
        ] {
            q.push(", ").push_bind(text);
        }
        q.push(", ").push_bind(e.upstream_status);
        for int in [e.reserved.0, e.cost.0] {
            q.push(", ").push_bind(int);
        }
        q.push(", ").push_bind(e.outcome.as_str());
        q.push(", ").push_bind(micros(e.at));
        for text in [
            e.node_id.as_str(),
            e.lease_id.as_str(),
            e.day.as_str(),
            e.detail_json.as_str(),
            e.trace_id.as_str(),
        ] {
            q.push(", ").push_bind(text);
        }
        q.push(", ").push_bind(to_json(&e.context, "context")?);
        q.push(", ").push_bind(c.prev_hash.to_vec());
        q.push(", ").push_bind(c.hash.to_vec());
        q.push(", ").push_bind(e.refusal_reason.as_str());
        q.push(", ").push_bind(e.refused_calls);
        q.push(", ").push_bind(e.credential_version);
        q.push(", ").push_bind(e.would_refuse.as_str());
        q.push(")");
    }
    Ok(q)
}

/// One argument of a `Statement`.
#[derive(Clone, Debug)]
pub(super) enum Arg {
    Text(String),
    Int(i64),
    Int32(i32),
    Bytes(Vec<u8>),
}

impl From<Vec<u8>> for Arg {
    fn from(v: Vec<u8>) -> Self {
        Arg::Bytes(v)
    }
}

impl From<&str> for Arg {
    fn from(v: &str) -> Self {
        Arg::Text(v.to_string())
    }
}
impl From<&String> for Arg {
    fn from(v: &String) -> Self {
        Arg::Text(v.clone())
    }
}
impl From<String> for Arg {
    fn from(v: String) -> Self {
        Arg::Text(v)
    }
}
impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}
impl From<&&str> for Arg {
    fn from(v: &&str) -> Self {
        Arg::Text(v.to_string())
    }
}
impl From<&i64> for Arg {
    fn from(v: &i64) -> Self {
        Arg::Int(*v)
    }
}
impl From<i32> for Arg {
    fn from(v: i32) -> Self {
        Arg::Int32(v)
    }
}

/// A statement assembled piece by piece — a filter, an `IN` list, a
/// multi-row insert — with `$N` placeholders, which both databases read,
/// and its arguments, bound in order when it runs.
#[derive(Clone, Debug, Default)]
pub(super) struct Statement {
    sql: String,
    args: Vec<Arg>,
    /// Plain `?` placeholders instead of `$N` (SQLite only).
    anonymous: bool,
}

impl Statement {
    pub(super) fn new(sql: impl Into<String>) -> Self {
        Statement {
            sql: sql.into(),
            args: Vec::new(),
            anonymous: false,
        }
    }

    /// A statement for SQLite alone whose placeholders are plain `?`, each
    /// argument used once, where it is pushed. SQLite keeps named
    /// placeholders (`$N`, `?N`) in a list that each lookup walks, and the
    /// driver looks every one up when it binds, so binding P of them costs
    /// P²: a 256-row insert of 24 columns spent ~100 us per row there.
    pub(super) fn anonymous(sql: impl Into<String>) -> Self {
        Statement {
            anonymous: true,
            ..Statement::new(sql)
        }
    }

    pub(super) fn push(&mut self, sql: impl AsRef<str>) -> &mut Self {
        self.sql.push_str(sql.as_ref());
        self
    }

    pub(super) fn push_bind(&mut self, arg: impl Into<Arg>) -> &mut Self {
        let placeholder = self.arg(arg);
        self.push(placeholder)
    }

    /// Adds an argument without writing its placeholder; returns it.
    pub(super) fn arg(&mut self, arg: impl Into<Arg>) -> String {
        self.args.push(arg.into());
        if self.anonymous {
            "?".to_string()
        } else {
            format!("${}", self.args.len())
        }
    }

    /// ` AND ` and the condition `eq` writes for `column` and one
    /// argument's placeholder (`Dialect::indexed_text_eq`; it may write the
    /// placeholder twice, which only `$N` placeholders allow).
    pub(super) fn push_eq_as(
        &mut self,
        eq: fn(&str, &str) -> String,
        column: &str,
        arg: impl Into<Arg>,
    ) -> &mut Self {
        let value = self.arg(arg);
        debug_assert!(!self.anonymous, "a condition may repeat its placeholder");
        self.push(" AND ").push(eq(column, &value))
    }

    /// ` AND at >= since AND at < until`, each when given.
    pub(super) fn push_time_range(
        &mut self,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) -> &mut Self {
        if let Some(since) = since {
            self.push(" AND at >= ").push_bind(micros(since));
        }
        if let Some(until) = until {
            self.push(" AND at < ").push_bind(micros(until));
        }
        self
    }

    /// ` AND <column> IN (...)`; matches nothing for an empty list.
    pub(super) fn push_in<T>(&mut self, column: &str, values: &[T]) -> &mut Self
    where
        for<'v> &'v T: Into<Arg>,
    {
        if values.is_empty() {
            return self.push(" AND 1 = 0");
        }
        self.push(format!(" AND {column} IN ("));
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.push_bind(v);
        }
        self.push(")")
    }

    /// The statement's arguments in order. Text, integers and bytes always
    /// encode, on either backend.
    fn arguments<'q, DB>(&'q self) -> <DB as sqlx::Database>::Arguments<'q>
    where
        DB: sqlx::Database,
        &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i32: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    {
        use sqlx::Arguments as _;
        let mut args = <DB as sqlx::Database>::Arguments::<'q>::default();
        for a in &self.args {
            match a {
                Arg::Text(v) => args.add(v.as_str()),
                Arg::Int(v) => args.add(*v),
                Arg::Int32(v) => args.add(*v),
                Arg::Bytes(v) => args.add(v.as_slice()),
            }
            .expect("text, integers and bytes always encode");
        }
        args
    }

    pub(super) fn query_as<'q, DB, O>(
        &'q self,
    ) -> sqlx::query::QueryAs<'q, DB, O, <DB as sqlx::Database>::Arguments<'q>>
    where
        DB: sqlx::Database,
        O: for<'r> sqlx::FromRow<'r, DB::Row>,
        &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i32: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    {
        sqlx::query_as_with(&self.sql, self.arguments())
    }

    pub(super) fn query<'q, DB>(
        &'q self,
    ) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
    where
        DB: sqlx::Database,
        &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i32: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    {
        sqlx::query_with(&self.sql, self.arguments())
    }

    pub(super) fn query_scalar<'q, DB, O>(
        &'q self,
    ) -> sqlx::query::QueryScalar<'q, DB, O, <DB as sqlx::Database>::Arguments<'q>>
    where
        DB: sqlx::Database,
        (O,): for<'r> sqlx::FromRow<'r, DB::Row>,
        &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        i32: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
        <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    {
        sqlx::query_scalar_with(&self.sql, self.arguments())
    }
}
