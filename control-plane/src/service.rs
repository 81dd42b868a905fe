//! The control plane's operations, shared by the gRPC and REST front ends.
//!
//! `Control` takes validated inputs (see `domain`), talks to the `Store`,
//! seals and opens credentials and wakes policy watchers after each change.
//! It keeps the fleet table of connected proxies current (registrations,
//! acknowledged versions, heartbeats) and makes a change — a key minted or
//! revoked, a vendor written or deleted — wait for their confirmation, so
//! the answer means every connected proxy serves it. It owns authentication of admin, issuer and fleet tokens and what
//! an admin token may do (its scopes, vendors and lifetime; see `scope`).
//! It never returns a vendor credential except to an authenticated fleet
//! caller, and never stores a secret in plain text.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use keycap_proto::prices::{self, litellm};
use keycap_proto::secret::{self, SecretKind};
use keycap_proto::Micros;
use subtle::ConstantTimeEq;
use tokio::sync::watch;
use tracing::Instrument as _;

use crate::crypto::Sealer;
use crate::domain::{
    self, invalid, parse_profile, AdminToken, AuditEntry, AuditQuery, ChangeRef, KeyFilter,
    KeySpend, KeyStatus, LeaseGrant, LeaseGrantRequest, Profile, SpendEvent, SpendSummary,
    VaultKey, Vendor, VendorName, BOOTSTRAP_TOKEN_NAME,
};
use crate::error::ApiError;
use crate::ledger;
use crate::metrics::{ChangeKind, FleetState};
use crate::scope::{self, Operation, Scopes, VendorScope};
use crate::store::{Store, VendorWrite};

mod alerts;
mod approvals;
mod credentials;
mod hooks;
mod observe;
mod refusals;
mod rolls;
pub use alerts::SPOOL_BACKLOG;
pub use approvals::{ApprovalSettings, HeldCall};
pub use credentials::CredentialView;
pub use observe::EnforceChange;
pub use rolls::Rolled;
pub mod simulate;
pub mod suggest;

/// How long proxies keep knowing a key after it expired, to answer
/// `key_expired` rather than `invalid_key`.
pub const KEY_MEMORY: chrono::Duration = chrono::Duration::hours(24);

/// How long a lease lives unless it is returned first.
pub const LEASE_TTL: Duration = Duration::from_secs(3600);

/// How often a replica tells the database that the policy streams it serves
/// are still open.
pub const FLEET_HEARTBEAT: Duration = Duration::from_secs(1);

/// How often a replica creates the coming days' audit partitions and
/// applies the retention.
const LEDGER_MAINTENANCE_EVERY: Duration = Duration::from_secs(3600);
/// How often a replica signs a checkpoint of the ledger head (when it moved).
const LEDGER_CHECKPOINT_EVERY: Duration = Duration::from_secs(60);

/// The record id a ledger signing key is sealed under (bound as associated
/// data, as a vendor's name is for its credential).
fn signing_key_record(id: &str) -> String {
    format!("ledger-signing-key/{id}")
}

/// A registration whose heartbeat is older than this no longer counts as a
/// connected proxy: its replica stopped refreshing it (it died, or lost the
/// database).
pub const FLEET_NODE_STALE: chrono::Duration = chrono::Duration::seconds(5);

/// Registrations left this long without a heartbeat are deleted.
const FLEET_NODE_FORGET: chrono::Duration = chrono::Duration::hours(1);

/// While a revocation waits for proxies, how often it re-reads the versions
/// they acknowledged through other replicas. Acknowledgements that arrive
/// at this replica wake it at once.
const ACK_POLL: Duration = Duration::from_millis(5);

/// Which proxies confirmed a change: they applied the change-log `version`
/// that carries it, so they serve a new key or vendor as written and refuse
/// a revoked key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Confirmation {
    pub version: i64,
    /// Proxies connected when the change was written that confirmed it
    /// before the wait ended, by node id.
    pub confirmed: Vec<String>,
    /// Connected proxies that did not confirm in time; for a revocation
    /// also proxies not connected that still hold a lease of a revoked key,
    /// whose leases of the revoked keys are fenced.
    pub unconfirmed: Vec<String>,
    /// For a revocation, the unspent part of those leases: the most the
    /// unconfirmed proxies can still spend with the revoked keys.
    pub unconfirmed_lease: Micros,
}

/// A vendor write as the admin asked for it, validated.
#[derive(Clone, Debug)]
pub struct PutVendor {
    pub name: VendorName,
    pub profile: Profile,
    pub base_url: String,
    /// `None` keeps the stored credential (updates only).
    pub credential: Option<String>,
    pub currency_rates: BTreeMap<String, String>,
    /// Canonical JSON of the operator's price table; empty for the shipped
    /// prices.
    pub prices: String,
    /// Proxies forward the agent's trace context to the vendor.
    pub forward_trace_context: bool,
    /// How long a credential may be used before it is due for rotation.
    pub rotate_after: Option<chrono::TimeDelta>,
}

impl PutVendor {
    pub fn new(
        name: &str,
        profile: &str,
        base_url: &str,
        credential: Option<&str>,
        currency_rates: &BTreeMap<String, String>,
        prices: &str,
    ) -> Result<Self, domain::InvalidInput> {
        let profile = parse_profile(profile)?;
        let name = VendorName::parse(name)?;
        let base_url = domain::parse_base_url(base_url)?;
        let currency_rates = domain::parse_currency_rates(currency_rates)?;
        let prices = domain::parse_prices(profile, prices)?;
        let credential = match credential {
            Some(c) if !c.is_empty() => {
                domain::check_credential(profile, &prices, c)?;
                Some(c.to_string())
            }
            _ => None,
        };
        Ok(PutVendor {
            name,
            profile,
            base_url,
            credential,
            currency_rates,
            prices,
            forward_trace_context: false,
            rotate_after: None,
        })
    }

    /// Whether the proxies forward the agent's trace context to the vendor.
    pub fn forwarding_trace_context(mut self, forward: bool) -> Self {
        self.forward_trace_context = forward;
        self
    }

    /// Sets `rotate_after` from its text ("90d"; empty: never).
    pub fn with_rotate_after(mut self, text: &str) -> Result<Self, domain::InvalidInput> {
        self.rotate_after = domain::parse_rotate_after(text)?;
        Ok(self)
    }
}

/// An authenticated admin token: what it may do, on which vendors, until
/// when.
#[derive(Clone, Debug)]
pub struct AdminPrincipal {
    pub token_id: String,
    pub scopes: Scopes,
    pub vendors: VendorScope,
    pub expires_at: Option<DateTime<Utc>>,
}

impl AdminPrincipal {
    /// When a token this one creates, living `expires_in` from `now`
    /// (`None`: forever), expires; refused if that is after this token
    /// expires, so no token outlives the one that made it.
    fn expiry_within(
        &self,
        expires_in: Option<Duration>,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, ApiError> {
        let expires_at = expires_in
            .map(|d| chrono::Duration::from_std(d).map(|d| now + d))
            .transpose()
            .map_err(|_| invalid("expires_in", "too large"))?;
        if let Some(limit) = self.expires_at {
            if expires_at.is_none_or(|e| e > limit) {
                return Err(invalid(
                    "expires_in",
                    format!(
                        "must end by {}, when the admin token creating it expires",
                        limit.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    ),
                )
                .into());
            }
        }
        Ok(expires_at)
    }

    /// `MissingScope` naming the first scope `op` needs that this token
    /// lacks (see `scope::required`).
    pub fn require(&self, op: Operation) -> Result<(), ApiError> {
        match scope::missing_for(self.scopes, op) {
            Some(s) => Err(ApiError::MissingScope(s)),
            None => Ok(()),
        }
    }

    /// Refuses scopes or vendors beyond this token's own: no token can mint
    /// (or revoke, or see) a more powerful one.
    pub fn check_within(&self, scopes: Scopes, vendors: &VendorScope) -> Result<(), ApiError> {
        if let Some(s) = self.scopes.first_missing(scopes) {
            return Err(ApiError::MissingScope(s));
        }
        if let Some(v) = self.vendors.first_uncovered(vendors) {
            return Err(ApiError::VendorNotAllowed(v));
        }
        Ok(())
    }
}

/// An admin token to mint, validated.
#[derive(Clone, Debug)]
pub struct NewAdminToken {
    pub name: String,
    pub scopes: Scopes,
    pub vendors: VendorScope,
    /// `None`: never expires.
    pub expires_in: Option<Duration>,
}

impl NewAdminToken {
    pub fn new<S: AsRef<str>>(
        name: &str,
        scopes: &[S],
        vendors: &[S],
        expires_in: Option<Duration>,
    ) -> Result<Self, domain::InvalidInput> {
        Ok(NewAdminToken {
            name: domain::parse_token_name(name)?,
            scopes: Scopes::parse_list(scopes)?,
            vendors: VendorScope::parse_list(vendors)?,
            expires_in: expires_in.map(domain::check_lifetime).transpose()?,
        })
    }
}

fn new_admin_token_id() -> String {
    format!("adm_{}", uuid::Uuid::new_v4().simple())
}

/// The caller behind an issuer token: it may mint child keys of `key_id`
/// and nothing else.
#[derive(Clone, Debug)]
pub struct IssuerPrincipal {
    pub token_id: String,
    pub key_id: String,
}

/// Who may mint a key: an admin token with `keys:issue`, or an issuer token
/// (children of its own key only).
#[derive(Clone, Debug)]
pub enum KeyMinter {
    Admin(AdminPrincipal),
    Issuer(IssuerPrincipal),
}

/// An issuer token to mint, validated.
#[derive(Clone, Debug)]
pub struct NewIssuerToken {
    pub name: String,
    /// `None`: lives as long as its key.
    pub expires_in: Option<Duration>,
}

impl NewIssuerToken {
    pub fn new(name: &str, expires_in: Option<Duration>) -> Result<Self, domain::InvalidInput> {
        Ok(NewIssuerToken {
            name: domain::parse_token_name(name)?,
            expires_in: expires_in.map(domain::check_lifetime).transpose()?,
        })
    }
}

/// A key to mint, validated.
#[derive(Clone, Debug)]
pub struct NewKey {
    pub vendor: VendorName,
    pub allowed_endpoints: Vec<String>,
    pub daily_cap: Micros,
    pub per_call_cap: Option<Micros>,
    pub lifetime_cap: Option<Micros>,
    pub expires_in: Duration,
    pub agent_run_label: String,
    pub metadata: BTreeMap<String, String>,
    pub limits: domain::KeyLimits,
    /// The key to mint this one under (a budget tree), if any.
    pub parent_id: Option<String>,
    /// Calls reserving more than this need a person's approval; `None`:
    /// none (or the parent's).
    pub approval_above: Option<Micros>,
    /// Set: mint the key in observe mode with this daily ceiling.
    pub observe_ceiling: Option<Micros>,
}

impl NewKey {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vendor: &str,
        allowed_endpoints: &[String],
        daily_cap: Micros,
        per_call_cap: Option<Micros>,
        lifetime_cap: Option<Micros>,
        expires_in: Duration,
        agent_run_label: &str,
        metadata: BTreeMap<String, String>,
        limits: domain::KeyLimits,
        parent_id: Option<&str>,
    ) -> Result<Self, domain::InvalidInput> {
        let parent_id = match parent_id.map(str::trim) {
            None | Some("") => None,
            Some(p)
                if p.len() > 128 || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                return Err(invalid("parent_id", "not a key id"))
            }
            Some(p) => Some(p.to_string()),
        };
        let vendor = VendorName::parse(vendor).map_err(|e| invalid("vendor", e.reason))?;
        let allowed_endpoints = domain::parse_allowed_endpoints(allowed_endpoints)?;
        if metadata.len() > 64
            || metadata
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 1024)
        {
            return Err(invalid(
                "metadata",
                "at most 64 entries, keys 1-128 and values up to 1024 characters",
            ));
        }
        Ok(NewKey {
            vendor,
            allowed_endpoints,
            daily_cap: domain::parse_cap("daily_usd_cap", daily_cap)?,
            per_call_cap: per_call_cap
                .map(|c| domain::parse_cap("per_call_usd_cap", c))
                .transpose()?,
            lifetime_cap: lifetime_cap
                .map(|c| domain::parse_cap("lifetime_usd_cap", c))
                .transpose()?,
            expires_in: domain::check_lifetime(expires_in)?,
            agent_run_label: domain::parse_run_label(agent_run_label)?,
            metadata,
            limits,
            parent_id,
            approval_above: None,
            observe_ceiling: None,
        })
    }

    /// Sets the key's mode (docs/observe.md): `""` or `enforce` enforces
    /// and takes no ceiling; `observe` needs `observe_ceiling`, the daily
    /// amount actually enforced, and is for a root key only.
    pub fn with_mode(
        mut self,
        mode: &str,
        observe_ceiling: Option<Micros>,
    ) -> Result<Self, domain::InvalidInput> {
        self.observe_ceiling = match (mode, observe_ceiling) {
            ("" | "enforce", None) => None,
            ("" | "enforce", Some(_)) => {
                return Err(invalid(
                    "observe_ceiling_usd",
                    "only a key in mode \"observe\" has an observe ceiling",
                ))
            }
            ("observe", None) => {
                return Err(invalid(
                    "observe_ceiling_usd",
                    "required for mode \"observe\": the daily amount the key may never exceed",
                ))
            }
            ("observe", Some(c)) => Some(domain::parse_cap("observe_ceiling_usd", c)?),
            _ => return Err(invalid("mode", "must be \"enforce\" or \"observe\"")),
        };
        if self.observe_ceiling.is_some() && self.parent_id.is_some() {
            return Err(invalid(
                "mode",
                "a child key cannot observe: observe mode is for a scenario's root key",
            ));
        }
        Ok(self)
    }

    /// Sets `approval_above` (`None` or 0: no gate of its own).
    pub fn with_approval_above(
        mut self,
        above: Option<Micros>,
    ) -> Result<Self, domain::InvalidInput> {
        self.approval_above = match above {
            None | Some(Micros::ZERO) => None,
            Some(m) => Some(domain::parse_cap("approval_above_usd", m)?),
        };
        Ok(self)
    }
}

/// What a KEK rotation did.
#[derive(Debug, Default)]
pub struct KekRotation {
    /// Id of the KEK every data key is now wrapped under.
    pub kek_id: String,
    pub rewrapped: u32,
    pub already_current: u32,
    /// Vendors whose credential this replica could not open (a version
    /// other than 1 is named `vendor#vN`), and inbound hooks whose secrets
    /// it could not open (as `hook <id>`).
    pub failed_vendors: Vec<String>,
}

/// A key with its status and spend, as admin reads show it.
#[derive(Clone, Debug)]
pub struct KeyView {
    pub key: VaultKey,
    pub status: KeyStatus,
    pub spend: KeySpend,
    pub remaining_today: Micros,
}

/// A vendor as admin reads show it: with the connected proxies that
/// reported they cannot load it.
#[derive(Clone, Debug)]
pub struct VendorView {
    pub vendor: Vendor,
    pub proxy_errors: Vec<domain::VendorLoadError>,
    /// Its credential versions, newest first (never their material).
    pub credentials: Vec<CredentialView>,
}

/// A vendor with its opened credential: only for the fleet API.
#[derive(Clone)]
pub struct FleetVendor {
    pub vendor: Vendor,
    pub credential: String,
    /// The version `credential` is, recorded with each call it makes.
    pub credential_version: i64,
    /// The proxy may connect to private addresses for this vendor: only
    /// under the control plane's `--allow-private-upstreams`.
    pub allow_private_upstream: bool,
}

pub struct Control {
    store: Arc<dyn Store>,
    sealer: Sealer,
    fleet_token_hash: [u8; 32],
    key_env: String,
    /// Latest change-log version this replica knows; watchers wait on it.
    version: watch::Sender<i64>,
    /// This replica's name in the fleet table, drawn at start: a restarted
    /// replica never refreshes the registrations of the one before it.
    replica_id: String,
    /// Moves whenever a proxy acknowledges a version through this replica;
    /// waiting revocations wake on it.
    acks: watch::Sender<u64>,
    /// How long a change waits for proxies unless the caller says.
    ack_timeout: Duration,
    /// Where vendors' base URLs may point (`--allow-private-upstreams`).
    upstreams: domain::UpstreamPolicy,
    /// Joins concurrent spend reports into one store batch.
    spend: crate::ingest::SpendIngest,
    /// Keys, days and minutes whose alerts wait to be checked.
    pending: alerts::PendingChecks,
    /// This replica's webhook sender, once `deliver_webhooks` started it;
    /// without one, events wait in the outbox for a replica that has one.
    courier: std::sync::OnceLock<Arc<crate::webhook::delivery::Courier>>,
    /// How approvals are offered (`configure_approvals`); the defaults
    /// until then.
    approvals: std::sync::OnceLock<approvals::ApprovalSettings>,
    /// Dry runs counted per admin token (`simulate`).
    dry_runs: simulate::DryRunLimiter,
}

impl Control {
    /// `key_env` is the environment tag minted into vault keys ("live",
    /// "dev"); `ack_timeout` how long a change waits for proxies to confirm
    /// unless the caller asks otherwise; `upstreams` where vendors' base
    /// URLs may point.
    pub async fn new(
        store: Arc<dyn Store>,
        sealer: Sealer,
        fleet_token: &str,
        key_env: &str,
        ack_timeout: Duration,
        upstreams: domain::UpstreamPolicy,
    ) -> Result<Arc<Self>, ApiError> {
        let v = store.latest_version().await?;
        let (version, _) = watch::channel(v);
        let (acks, _) = watch::channel(0);
        Ok(Arc::new(Control {
            sealer,
            fleet_token_hash: secret::hash(fleet_token),
            key_env: key_env.to_string(),
            version,
            replica_id: uuid::Uuid::new_v4().simple().to_string(),
            acks,
            ack_timeout,
            upstreams,
            spend: crate::ingest::SpendIngest::start(store.clone()),
            pending: alerts::PendingChecks::default(),
            courier: std::sync::OnceLock::new(),
            approvals: std::sync::OnceLock::new(),
            dry_runs: simulate::DryRunLimiter::default(),
            store,
        }))
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The fleet as the database shows it now, for the metrics: the change
    /// log's head and this replica's place in it, the connected proxies
    /// with the versions they applied, and the live leases.
    pub async fn fleet_state(&self) -> Result<FleetState, ApiError> {
        let now = Utc::now();
        let head = self.store.latest_version().await?;
        let connected_after = now - FLEET_NODE_STALE;
        let proxies = self
            .store
            .fleet_nodes()
            .await?
            .into_iter()
            .filter(|n| n.heartbeat_at > connected_after)
            .map(|n| (n.node_id, n.applied_version))
            .collect();
        let (leases, unreported) = self.store.outstanding_leases(now).await?;
        Ok(FleetState {
            head,
            replica_version: *self.version.borrow(),
            proxies,
            leases,
            lease_unreported_micros: unreported.0,
        })
    }

    /// The master-key sealer; the dashboard seals its session cookies with
    /// it so that every replica can open them.
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Keeps the version every policy stream follows current with changes
    /// made through other replicas: wakes on the store's change feed
    /// (PostgreSQL LISTEN/NOTIFY) and re-reads the log head every `poll`,
    /// for a missed signal or a store without a feed. One reader per
    /// replica, however many proxies watch it.
    /// Also trims the change log to its newest `keep` entries as the head
    /// moves: a proxy that resumes from a version trimmed away gets a
    /// snapshot instead.
    pub fn follow_changes(self: &Arc<Self>, poll: std::time::Duration, keep: i64) {
        if let Some(mut feed) = self.store.change_feed() {
            let me = Arc::downgrade(self);
            tokio::spawn(async move {
                while feed.changed().await.is_ok() {
                    let Some(control) = me.upgrade() else { return };
                    control.changed().await;
                }
            });
        }
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut trimmed_at = 0;
            loop {
                tick.tick().await;
                let Some(control) = me.upgrade() else { return };
                control.changed().await;
                let head = *control.version.borrow();
                if head - keep > trimmed_at {
                    match control.store.prune_changes(head - keep).await {
                        Ok(_) => trimmed_at = head - keep,
                        Err(e) => tracing::warn!(error = %e, "cannot trim the change log"),
                    }
                }
            }
        });
    }

    /// Runs `job` every `period` (delayed, never bunched, when late) for as
    /// long as the control plane lives.
    fn every<F, Fut>(self: &Arc<Self>, period: Duration, job: F)
    where
        F: Fn(Arc<Control>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(control) = me.upgrade() else { return };
                job(control).await;
            }
        });
    }

    /// Refreshes the heartbeat of every policy stream this replica serves,
    /// every `FLEET_HEARTBEAT`, so its proxies keep counting as connected;
    /// if the replica dies they stop counting after `FLEET_NODE_STALE`.
    pub fn heartbeat_fleet(self: &Arc<Self>) {
        self.every(FLEET_HEARTBEAT, |control| async move {
            let now = Utc::now();
            if let Err(e) = control
                .store
                .heartbeat_fleet_nodes(&control.replica_id, now, now - FLEET_NODE_FORGET)
                .await
            {
                tracing::warn!(error = %e, "cannot refresh the fleet heartbeat");
            }
        });
    }

    /// Keeps the audit ledger's storage: every `LEDGER_MAINTENANCE_EVERY`
    /// (and at once) creates the partitions of the coming days and, with a
    /// retention of `retention_days`, drops the days older than that which
    /// a signed checkpoint and an export both cover (`ledger::retention`).
    pub fn maintain_ledger_periodically(self: &Arc<Self>, retention_days: Option<u32>) {
        self.every(LEDGER_MAINTENANCE_EVERY, move |control| async move {
            if let Err(e) = control.maintain_ledger(retention_days).await {
                tracing::warn!(error = %e, "cannot maintain the audit ledger's partitions");
            }
        });
    }

    /// One round of `maintain_ledger_periodically`; the partitions dropped.
    pub async fn maintain_ledger(
        &self,
        retention_days: Option<u32>,
    ) -> Result<Vec<String>, ApiError> {
        self.store.ensure_audit_partitions().await?;
        let Some(days) = retention_days else {
            return Ok(Vec::new());
        };
        let retention = self.store.ledger_retention().await?;
        // Only checkpoints verify trusts count (`verify_audit`).
        let trusted = self.trusted_checkpoint_keys().await?;
        let checkpoints = self.store.checkpoints(Some(&trusted), 16).await?;
        let covered = retention.droppable_through(&checkpoints);
        let before = Utc::now().date_naive() - chrono::Days::new(u64::from(days));
        let dropped = self.store.drop_audit_partitions(before, covered).await?;
        for table in &dropped {
            tracing::info!(partition = %table, covered, "dropped an audit partition past retention");
        }
        Ok(dropped)
    }

    /// Signs a checkpoint of the ledger head every `LEDGER_CHECKPOINT_EVERY`
    /// while it moves (every replica does; one checkpoint per head is kept).
    pub fn checkpoint_ledger_periodically(self: &Arc<Self>) {
        self.every(LEDGER_CHECKPOINT_EVERY, |control| async move {
            if let Err(e) = control.checkpoint_ledger().await {
                tracing::warn!(error = %e, "cannot sign a ledger checkpoint");
            }
        });
    }

    /// Signs and stores a checkpoint of the ledger head unless the latest
    /// checkpoint is already of it; returns the newest checkpoint.
    pub async fn checkpoint_ledger(&self) -> Result<Option<ledger::Checkpoint>, ApiError> {
        let (seq, hash) = self.store.ledger_head().await?;
        // The latest this replica's keys signed: one stored under any other
        // key does not stand for the head.
        let trusted = self.trusted_checkpoint_keys().await?;
        let latest = self
            .store
            .checkpoints(Some(&trusted), 1)
            .await?
            .into_iter()
            .next();
        if seq == 0 || latest.as_ref().is_some_and(|cp| cp.seq >= seq) {
            return Ok(latest);
        }
        let key = self.ledger_signing_key().await?;
        let cp = ledger::Checkpoint::sign(&key, seq, hash, Utc::now());
        self.store.insert_checkpoint(&cp).await?;
        Ok(Some(cp))
    }

    /// The ledger signing keys this replica's master key opens, each the
    /// private half of the public key stored beside it, newest first. Only
    /// checkpoints signed by one of them are trusted: a stored public key
    /// alone proves nothing to a verifier, as anyone who can write the
    /// database can store a key pair of their own.
    async fn opened_signing_keys(&self) -> Result<Vec<ed25519_dalek::SigningKey>, ApiError> {
        let mut keys = Vec::new();
        for (id, public_key, sealed) in self.store.ledger_signing_keys().await? {
            let Ok(secret) = self.sealer.open(&signing_key_record(&id), &sealed) else {
                continue;
            };
            let Ok(secret) = <[u8; 32]>::try_from(secret.as_slice()) else {
                continue;
            };
            let key = ed25519_dalek::SigningKey::from_bytes(&secret);
            if key.verifying_key().to_bytes()[..] == public_key[..] {
                keys.push(key);
            }
        }
        Ok(keys)
    }

    /// The newest ledger signing key this replica's master key opens; a new
    /// one (sealed under the master key) when there is none, e.g. after a
    /// master key change. Old checkpoints keep their public keys.
    async fn ledger_signing_key(&self) -> Result<ed25519_dalek::SigningKey, ApiError> {
        if let Some(key) = self.opened_signing_keys().await?.into_iter().next() {
            return Ok(key);
        }
        let key = ledger::checkpoint::new_signing_key();
        let public_key = key.verifying_key().to_bytes();
        let id = hex::encode(&public_key[..8]);
        let sealed = self
            .sealer
            .seal(&signing_key_record(&id), key.to_bytes().as_slice());
        self.store
            .insert_ledger_signing_key(&id, &public_key, &sealed, Utc::now())
            .await?;
        Ok(key)
    }

    /// The ledger (entries at or after `since`, before `until`), oldest
    /// first, as a stream of export records read a page at a time: memory
    /// stays flat whatever its length. The chain spans every vendor, so
    /// only a caller over all of them may export it.
    pub fn export_audit(
        &self,
        vendors: &VendorScope,
        format: ledger::export::Format,
        since: Option<chrono::DateTime<Utc>>,
        until: Option<chrono::DateTime<Utc>>,
    ) -> Result<impl futures_util::Stream<Item = Result<String, crate::store::StoreError>>, ApiError>
    {
        vendors.check_all()?;
        Ok(ledger::export::stream(
            self.store.clone(),
            format,
            since,
            until,
        ))
    }

    /// Stored checkpoints signed by a key this replica's master key opens
    /// (the ones verify trusts, and worth keeping), newest first.
    pub async fn ledger_checkpoints(
        &self,
        vendors: &VendorScope,
        limit: u32,
    ) -> Result<Vec<ledger::Checkpoint>, ApiError> {
        vendors.check_all()?;
        if !(1..=1000).contains(&limit) {
            return Err(domain::invalid("limit", "must be between 1 and 1000").into());
        }
        let trusted = self.trusted_checkpoint_keys().await?;
        Ok(self.store.checkpoints(Some(&trusted), limit).await?)
    }

    // --- admin tokens -------------------------------------------------------

    /// Records the `--admin-token` token (hashed) as `bootstrap` with every
    /// scope, unless it is already stored: a bootstrap token that was
    /// retired stays retired when the same token is given again.
    pub async fn record_bootstrap_token(&self, token: &str) -> Result<(), ApiError> {
        if !secret::is_well_formed(SecretKind::AdminToken, token) {
            return Err(invalid(
                "admin_token",
                "not a keycap admin token (kcadm_<env>_...); make one with `keycap admin-token generate`",
            )
            .into());
        }
        let record = AdminToken {
            id: new_admin_token_id(),
            token_hash: secret::hash(token),
            token_prefix: secret::display_prefix(token),
            name: BOOTSTRAP_TOKEN_NAME.to_string(),
            scopes: Scopes::ADMIN,
            vendors: VendorScope::All,
            created_at: Utc::now(),
            expires_at: None,
            revoked_at: None,
        };
        Ok(self.store.ensure_admin_token(&record).await?)
    }

    /// Checks `Bearer <admin token>`: a malformed token (wrong prefix or
    /// checksum) is refused before any lookup; an unknown, expired or
    /// revoked one is refused after it. Every failure is the same
    /// `Unauthenticated`.
    pub async fn authenticate_admin(
        &self,
        authorization: Option<&str>,
    ) -> Result<AdminPrincipal, ApiError> {
        let token = bearer(authorization).ok_or(ApiError::Unauthenticated)?;
        if secret::is_well_formed(SecretKind::IssuerToken, token) {
            // A valid issuer token is told plainly that it may only mint;
            // an invalid one gets the same 401 as any bad token.
            self.authenticate_issuer(authorization).await?;
            return Err(ApiError::IssuerScope);
        }
        if !secret::is_well_formed(SecretKind::AdminToken, token) {
            return Err(ApiError::Unauthenticated);
        }
        let Some(t) = self.store.find_admin_token(&secret::hash(token)).await? else {
            return Err(ApiError::Unauthenticated);
        };
        if t.status(Utc::now()) != KeyStatus::Active {
            return Err(ApiError::Unauthenticated);
        }
        Ok(AdminPrincipal {
            token_id: t.id,
            scopes: t.scopes,
            vendors: t.vendors,
            expires_at: t.expires_at,
        })
    }

    /// Authenticates and checks the scopes `op` needs (`scope::required`):
    /// `MissingScope` names the first one the token lacks.
    pub async fn authorize(
        &self,
        authorization: Option<&str>,
        op: Operation,
    ) -> Result<AdminPrincipal, ApiError> {
        let caller = self.authenticate_admin(authorization).await?;
        caller.require(op)?;
        Ok(caller)
    }

    /// Mints an admin token within the caller's own scopes, vendors and
    /// lifetime. Returns its record and the token text, which exists nowhere
    /// else after this returns.
    pub async fn create_admin_token(
        &self,
        caller: &AdminPrincipal,
        req: NewAdminToken,
    ) -> Result<(AdminToken, String), ApiError> {
        caller.check_within(req.scopes, &req.vendors)?;
        let now = Utc::now();
        let expires_at = caller.expiry_within(req.expires_in, now)?;
        let text = secret::generate(SecretKind::AdminToken, &self.key_env);
        let record = AdminToken {
            id: new_admin_token_id(),
            token_hash: secret::hash(&text),
            token_prefix: secret::display_prefix(&text),
            name: req.name,
            scopes: req.scopes,
            vendors: req.vendors,
            created_at: now,
            expires_at,
            revoked_at: None,
        };
        self.store.insert_admin_token(&record).await?;
        tracing::info!(id = %record.id, by = %caller.token_id, scopes = ?record.scopes, "admin token created");
        let stored = self
            .store
            .get_admin_token(&record.id)
            .await?
            .ok_or(ApiError::Internal)?;
        Ok((stored, text))
    }

    /// Tokens within the caller's own scopes and vendors, newest first;
    /// revoked and expired ones only when asked for.
    pub async fn list_admin_tokens(
        &self,
        caller: &AdminPrincipal,
        include_inactive: bool,
    ) -> Result<Vec<AdminToken>, ApiError> {
        let now = Utc::now();
        Ok(self
            .store
            .list_admin_tokens()
            .await?
            .into_iter()
            .filter(|t| include_inactive || t.status(now) == KeyStatus::Active)
            .filter(|t| caller.check_within(t.scopes, &t.vendors).is_ok())
            .collect())
    }

    /// Revokes a token within the caller's own scopes and vendors. The last
    /// active token with every scope over every vendor (at first, the
    /// bootstrap token) cannot be revoked: `Conflict`.
    pub async fn revoke_admin_token(
        &self,
        caller: &AdminPrincipal,
        id: &str,
    ) -> Result<AdminToken, ApiError> {
        let target = self
            .store
            .get_admin_token(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("admin token {id:?} not found")))?;
        caller.check_within(target.scopes, &target.vendors)?;
        let revoked = self.store.revoke_admin_token(id, Utc::now()).await?;
        tracing::info!(id, by = %caller.token_id, "admin token revoked");
        Ok(revoked)
    }

    // --- issuer tokens ------------------------------------------------------

    /// Checks `Bearer <issuer token>` like an admin token: malformed,
    /// unknown, expired or revoked are all the same `Unauthenticated`. The
    /// key's own state is checked when minting (`check_child_key`).
    pub async fn authenticate_issuer(
        &self,
        authorization: Option<&str>,
    ) -> Result<IssuerPrincipal, ApiError> {
        let token = bearer(authorization).ok_or(ApiError::Unauthenticated)?;
        if !secret::is_well_formed(SecretKind::IssuerToken, token) {
            return Err(ApiError::Unauthenticated);
        }
        let Some(t) = self.store.find_issuer_token(&secret::hash(token)).await? else {
            return Err(ApiError::Unauthenticated);
        };
        if t.status(Utc::now()) != KeyStatus::Active {
            return Err(ApiError::Unauthenticated);
        }
        Ok(IssuerPrincipal {
            token_id: t.id,
            key_id: t.key_id,
        })
    }

    /// Authenticates a key mint: an issuer token, or an admin token holding
    /// what `CreateKey` needs.
    pub async fn authorize_mint(&self, authorization: Option<&str>) -> Result<KeyMinter, ApiError> {
        match bearer(authorization) {
            Some(t) if t.starts_with(&format!("{}_", SecretKind::IssuerToken.prefix())) => Ok(
                KeyMinter::Issuer(self.authenticate_issuer(authorization).await?),
            ),
            _ => Ok(KeyMinter::Admin(
                self.authorize(authorization, Operation::CreateKey).await?,
            )),
        }
    }

    /// Mints a key for `minter` and waits until the proxies serve it (see
    /// `confirm_change`), so the key works on its first call through any of
    /// them. An issuer token mints only children of its own key (a missing
    /// `parent_id` means that key; another one is `IssuerScope`), each
    /// checked against that key like any child.
    pub async fn mint_key(
        &self,
        minter: &KeyMinter,
        mut req: NewKey,
        ack_timeout: Option<Duration>,
    ) -> Result<(KeyView, String, Confirmation), ApiError> {
        let (view, secret, version) = match minter {
            KeyMinter::Admin(caller) => self.create_key(&caller.vendors, req).await?,
            KeyMinter::Issuer(issuer) => {
                match &req.parent_id {
                    None => req.parent_id = Some(issuer.key_id.clone()),
                    Some(p) if *p == issuer.key_id => {}
                    Some(_) => return Err(ApiError::IssuerScope),
                }
                let minted = self.create_key(&VendorScope::All, req).await?;
                tracing::info!(id = %minted.0.key.id, parent = %issuer.key_id, issuer = %issuer.token_id, "key minted by issuer token");
                minted
            }
        };
        let confirmation = self
            .confirm_change(version, ack_timeout, ChangeKind::KeyCreation)
            .await?;
        Ok((view, secret, confirmation))
    }

    /// Mints an issuer token for an active key of a vendor the caller may
    /// act on, ending no later than the caller's own token. Returns its
    /// record and the token text, which exists nowhere else after this
    /// returns.
    pub async fn create_issuer_token(
        &self,
        caller: &AdminPrincipal,
        key_id: &str,
        req: NewIssuerToken,
    ) -> Result<(domain::IssuerToken, String), ApiError> {
        let key = self.key_of_allowed_vendor(&caller.vendors, key_id).await?;
        let now = Utc::now();
        match key.status(now) {
            KeyStatus::Active => {}
            KeyStatus::Revoked => return Err(invalid("key_id", "the key is revoked").into()),
            KeyStatus::Expired => return Err(invalid("key_id", "the key has expired").into()),
        }
        if key.observe_ceiling.is_some() {
            return Err(invalid(
                "key_id",
                "the key is in observe mode and cannot have child keys; switch it to enforce first",
            )
            .into());
        }
        let expires_at = caller.expiry_within(req.expires_in, now)?;
        let text = secret::generate(SecretKind::IssuerToken, &self.key_env);
        let record = domain::IssuerToken {
            id: format!("iss_{}", uuid::Uuid::new_v4().simple()),
            token_hash: secret::hash(&text),
            token_prefix: secret::display_prefix(&text),
            key_id: key.id,
            name: req.name,
            created_at: now,
            expires_at,
            revoked_at: None,
        };
        self.store.insert_issuer_token(&record).await?;
        tracing::info!(id = %record.id, key = %record.key_id, by = %caller.token_id, "issuer token created");
        let stored = self
            .store
            .get_issuer_token(&record.id)
            .await?
            .ok_or(ApiError::Internal)?;
        Ok((stored, text))
    }

    /// A key's issuer tokens, newest first; revoked and expired ones only
    /// when asked for.
    pub async fn list_issuer_tokens(
        &self,
        caller: &AdminPrincipal,
        key_id: &str,
        include_inactive: bool,
    ) -> Result<Vec<domain::IssuerToken>, ApiError> {
        self.key_of_allowed_vendor(&caller.vendors, key_id).await?;
        let now = Utc::now();
        Ok(self
            .store
            .list_issuer_tokens(key_id)
            .await?
            .into_iter()
            .filter(|t| include_inactive || t.status(now) == KeyStatus::Active)
            .collect())
    }

    /// Revokes an issuer token of a key of a vendor the caller may act on;
    /// revoking a revoked one changes nothing.
    pub async fn revoke_issuer_token(
        &self,
        caller: &AdminPrincipal,
        id: &str,
    ) -> Result<domain::IssuerToken, ApiError> {
        let not_found = || ApiError::NotFound(format!("issuer token {id:?} not found"));
        let target = self
            .store
            .get_issuer_token(id)
            .await?
            .ok_or_else(not_found)?;
        self.key_of_allowed_vendor(&caller.vendors, &target.key_id)
            .await
            .map_err(|_| not_found())?;
        let revoked = self.store.revoke_issuer_token(id, Utc::now()).await?;
        tracing::info!(id, by = %caller.token_id, "issuer token revoked");
        Ok(revoked)
    }

    /// Checks `Bearer <fleet token>` in constant time.
    pub fn authenticate_fleet(&self, authorization: Option<&str>) -> Result<(), ApiError> {
        let token = bearer(authorization).ok_or(ApiError::Unauthenticated)?;
        if bool::from(secret::hash(token).ct_eq(&self.fleet_token_hash)) {
            Ok(())
        } else {
            Err(ApiError::Unauthenticated)
        }
    }

    /// Tells local watchers about a new change-log version.
    async fn changed(&self) {
        if let Err(e) = self.publish_head().await {
            tracing::warn!(error = %e, "cannot read change-log version");
        }
    }

    /// Reads the change log's head and wakes local watchers if it moved.
    /// Returns the head: after a write it covers that write's entries.
    async fn publish_head(&self) -> Result<i64, crate::store::StoreError> {
        let v = self.store.latest_version().await?;
        self.version.send_if_modified(|cur| {
            if v > *cur {
                *cur = v;
                true
            } else {
                false
            }
        });
        Ok(v)
    }

    /// Re-wraps every vendor credential's data key under this replica's
    /// primary KEK. Safe while proxies are served and other replicas write:
    /// each record is replaced only if unchanged since it was read, and a
    /// record changed meanwhile was sealed under a current KEK anyway. A
    /// record this replica cannot open is named, not skipped silently.
    pub async fn rotate_kek(&self) -> Result<KekRotation, ApiError> {
        let mut out = KekRotation {
            kek_id: self.sealer.kek_id(),
            ..KekRotation::default()
        };
        // Every version with material: the active one, those staged and
        // those still in grace. Retired versions have none left.
        for c in self.store.sealed_credentials().await? {
            let record = crate::credential::record_id(&c.vendor, c.version);
            let label = if c.version == 1 {
                c.vendor.clone()
            } else {
                format!("{}#v{}", c.vendor, c.version)
            };
            match self.sealer.rewrap(&record, &c.sealed) {
                Ok(None) => out.already_current += 1,
                Ok(Some(rewrapped)) => {
                    if self
                        .store
                        .replace_sealed_credential(&c.vendor, c.version, &c.sealed, &rewrapped)
                        .await?
                    {
                        out.rewrapped += 1;
                    } else {
                        // Replaced meanwhile (re-wrapped by another
                        // replica) or erased (retired): look again.
                        match self.store.get_credential(&c.vendor, c.version).await? {
                            Some((_, Some(now)))
                                if !matches!(self.sealer.rewrap(&record, &now), Ok(None)) =>
                            {
                                out.failed_vendors.push(label)
                            }
                            _ => out.already_current += 1,
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(vendor = %c.vendor, version = c.version, error = %e, "credential cannot be re-wrapped");
                    out.failed_vendors.push(label);
                }
            }
        }
        // Inbound hooks' secrets are sealed under the same KEKs.
        self.rewrap_hooks(&mut out).await?;
        tracing::info!(
            kek = %out.kek_id,
            rewrapped = out.rewrapped,
            already_current = out.already_current,
            failed = out.failed_vendors.len(),
            "key-encryption key rotation"
        );
        Ok(out)
    }

    pub fn subscribe_versions(&self) -> watch::Receiver<i64> {
        self.version.subscribe()
    }

    // --- vendors ------------------------------------------------------------

    /// The operation a vendor put amounts to, for its scope check. Besides
    /// setting a credential, changing a stored vendor's base URL or profile
    /// (where its credential goes) or its prices or rates (what its calls
    /// count against caps) needs `credentials:write` too: each could spend
    /// or send away the credential already stored.
    pub async fn vendor_put_operation(&self, put: &PutVendor) -> Result<Operation, ApiError> {
        if put.credential.is_some() {
            return Ok(Operation::PutVendorWithCredential);
        }
        Ok(match self.store.get_vendor(put.name.as_str()).await? {
            Some(v)
                if v.profile != put.profile
                    || v.base_url != put.base_url
                    || v.prices != put.prices
                    || v.currency_rates != put.currency_rates =>
            {
                Operation::PutVendorWithCredential
            }
            _ => Operation::PutVendor,
        })
    }

    /// Writes a vendor and waits until the proxies serve it as written.
    pub async fn put_vendor(
        &self,
        vendors: &VendorScope,
        req: PutVendor,
        ack_timeout: Option<Duration>,
    ) -> Result<(Vendor, bool, Confirmation), ApiError> {
        vendors.check(req.name.as_str())?;
        self.check_upstream(&req.base_url).await?;
        if req.credential.is_none() {
            self.check_stored_credential(&req).await?;
        }
        let now = Utc::now();
        let vendor = Vendor {
            name: req.name,
            profile: req.profile,
            base_url: req.base_url,
            currency_rates: req.currency_rates,
            prices: req.prices,
            forward_trace_context: req.forward_trace_context,
            created_at: now,
            updated_at: now,
            credential_set_at: now,
            rotate_after: req.rotate_after,
        };
        // A credential is sealed as the vendor's next version (its record
        // id binds the version); a concurrent write that took that version
        // makes the store refuse, and it is sealed again as the next.
        let mut attempts = 0;
        let out = loop {
            attempts += 1;
            let credential_version = match &req.credential {
                Some(_) => self.next_credential_version(vendor.name.as_str()).await?,
                None => 0,
            };
            let sealed_credential = req.credential.as_deref().map(|c| {
                let record = crate::credential::record_id(vendor.name.as_str(), credential_version);
                self.sealer.seal(&record, c.as_bytes())
            });
            let write = VendorWrite {
                vendor: vendor.clone(),
                sealed_credential,
                credential_version,
            };
            match self.store.put_vendor(write).await {
                Ok(out) => break out,
                Err(crate::store::StoreError::Conflict(_)) if req.credential.is_none() => {
                    return Err(invalid("credential", "a new vendor needs its credential").into())
                }
                Err(crate::store::StoreError::Conflict(m)) if attempts >= 5 => {
                    return Err(ApiError::Conflict(m))
                }
                Err(crate::store::StoreError::Conflict(_)) => continue,
                Err(other) => return Err(other.into()),
            }
        };
        let version = self.publish_head().await?;
        let confirmation = self
            .confirm_change(version, ack_timeout, ChangeKind::VendorWrite)
            .await?;
        Ok((out.0, out.1, confirmation))
    }

    /// An update that keeps the stored credential but changes the profile
    /// or prices (where it goes): the stored credential must still fit, or
    /// every proxy would refuse the vendor.
    async fn check_stored_credential(&self, req: &PutVendor) -> Result<(), ApiError> {
        let name = req.name.as_str();
        let Some((version, sealed)) = self.store.get_vendor_credential(name).await? else {
            return Ok(());
        };
        // One that cannot be opened is withheld from proxies anyway (and
        // logged where the policy is built).
        let Ok(plain) = self
            .sealer
            .open(&crate::credential::record_id(name, version), &sealed)
        else {
            return Ok(());
        };
        let plain = String::from_utf8(plain).unwrap_or_default();
        domain::check_credential(req.profile, &req.prices, &plain).map_err(|e| {
            invalid(
                "credential",
                format!(
                    "the stored credential does not fit this vendor ({}); send a new one",
                    e.reason
                ),
            )
        })?;
        Ok(())
    }

    /// Whether vendor calls may go to `base_url` under this control
    /// plane's upstream policy, resolving its host: every address it
    /// resolves to must be public. Proxies check again each address they
    /// connect to, since DNS answers change.
    async fn check_upstream(&self, base_url: &str) -> Result<(), ApiError> {
        let Some((host, port)) = domain::check_upstream(base_url, self.upstreams)? else {
            return Ok(());
        };
        let addrs = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| {
                invalid(
                    "base_url",
                    format!("{} does not resolve: {e}", keycap_proto::clip(&host, 128)),
                )
            })?;
        for addr in addrs {
            if !keycap_proto::network::is_public_upstream(addr.ip()) {
                return Err(domain::private_upstream(&host, addr.ip()).into());
            }
        }
        Ok(())
    }

    /// Converts LiteLLM's price file into the vendor's price table (the
    /// converter `keycap prices import` uses) and stores it as the vendor's
    /// `prices`, exactly as a vendor put with that table would. Facts the
    /// file does not carry (image token bounds) come from the vendor's
    /// current table, or the shipped one. A file the converter refuses
    /// changes nothing.
    pub async fn import_vendor_prices(
        &self,
        vendors: &VendorScope,
        name: &str,
        litellm_json: &str,
    ) -> Result<(Vendor, litellm::ImportReport), ApiError> {
        vendors.check(name)?;
        let current = self
            .store
            .get_vendor(name)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("vendor {name:?} not found")))?;
        let (vendor, shipped) = match current.profile {
            Profile::Openai => (litellm::LlmVendor::Openai, prices::shipped::OPENAI),
            Profile::Anthropic => (litellm::LlmVendor::Anthropic, prices::shipped::ANTHROPIC),
            other => {
                return Err(invalid(
                    "name",
                    format!(
                        "vendor {name:?} has profile {}: LiteLLM prices only openai and \
                         anthropic vendors",
                        other.as_str()
                    ),
                )
                .into())
            }
        };
        let base_text = if current.prices.is_empty() {
            shipped
        } else {
            current.prices.as_str()
        };
        let base = prices::TokenPrices::from_json(base_text)
            .map_err(|e| invalid("prices", format!("the vendor's current table: {e}")))?;
        let as_of = Utc::now().format("%Y-%m-%d").to_string();
        let import = litellm::import(
            litellm_json,
            vendor,
            &litellm::ImportOptions {
                as_of: &as_of,
                source: None,
                base: Some(&base),
            },
        )
        .map_err(|e| invalid("litellm_json", e.0))?;
        let put = PutVendor {
            name: current.name,
            profile: current.profile,
            base_url: current.base_url,
            credential: None,
            currency_rates: current.currency_rates,
            prices: domain::parse_prices(current.profile, &import.table.to_json())?,
            forward_trace_context: current.forward_trace_context,
            rotate_after: current.rotate_after,
        };
        let (v, _, _) = self.put_vendor(vendors, put, None).await?;
        Ok((v, import.report))
    }

    pub async fn get_vendor(
        &self,
        vendors: &VendorScope,
        name: &str,
    ) -> Result<VendorView, ApiError> {
        vendors.check(name)?;
        let vendor = self
            .store
            .get_vendor(name)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("vendor {name:?} not found")))?;
        let proxy_errors = self.store.vendor_load_errors(Some(name)).await?;
        let credentials = self.credential_views(&vendor).await?;
        Ok(VendorView {
            vendor,
            proxy_errors,
            credentials,
        })
    }

    pub async fn list_vendors(&self, vendors: &VendorScope) -> Result<Vec<VendorView>, ApiError> {
        let mut all = self.store.list_vendors().await?;
        all.retain(|v| vendors.allows(v.name.as_str()));
        let mut errors = self.store.vendor_load_errors(None).await?;
        let mut out = Vec::with_capacity(all.len());
        for vendor in all {
            let (mine, rest) = errors
                .drain(..)
                .partition(|e| e.vendor == vendor.name.as_str());
            errors = rest;
            let credentials = self.credential_views(&vendor).await?;
            out.push(VendorView {
                vendor,
                proxy_errors: mine,
                credentials,
            });
        }
        Ok(out)
    }

    /// Records the vendors `node_id` says it cannot load (the whole list,
    /// replacing its last report), for the vendor reads to show.
    pub async fn report_vendor_errors(
        &self,
        node_id: &str,
        errors: Vec<(String, String)>,
    ) -> Result<(), ApiError> {
        domain::parse_node_id(node_id)?;
        if errors.len() > 10_000 {
            return Err(invalid("vendor_errors", "too many entries").into());
        }
        let errors: Vec<(String, String)> = errors
            .into_iter()
            .map(|(vendor, error)| {
                (
                    keycap_proto::clip(&vendor, 64),
                    keycap_proto::clip(&error, domain::MAX_VENDOR_ERROR_LEN),
                )
            })
            .collect();
        for (vendor, error) in &errors {
            tracing::warn!(node = node_id, vendor = %vendor, error = %error, "a proxy cannot load a vendor");
        }
        self.store
            .report_vendor_errors(node_id, &errors, Utc::now())
            .await?;
        Ok(())
    }

    /// Deletes a vendor and waits until the proxies no longer serve it.
    pub async fn delete_vendor(
        &self,
        vendors: &VendorScope,
        name: &str,
        ack_timeout: Option<Duration>,
    ) -> Result<Confirmation, ApiError> {
        vendors.check(name)?;
        self.store.delete_vendor(name, Utc::now()).await?;
        let version = self.publish_head().await?;
        self.confirm_change(version, ack_timeout, ChangeKind::VendorDelete)
            .await
    }

    // --- keys ---------------------------------------------------------------

    /// Mints a key. Returns its view, the secret, which exists nowhere else
    /// after this returns, and the change-log version that carries it.
    async fn create_key(
        &self,
        vendors: &VendorScope,
        req: NewKey,
    ) -> Result<(KeyView, String, i64), ApiError> {
        vendors.check(req.vendor.as_str())?;
        if self.store.get_vendor(req.vendor.as_str()).await?.is_none() {
            return Err(ApiError::Invalid(invalid(
                "vendor",
                format!(
                    "unknown vendor {:?}; register it first",
                    req.vendor.as_str()
                ),
            )));
        }
        let now = Utc::now();
        let expires_in = chrono::Duration::from_std(req.expires_in)
            .map_err(|_| invalid("expires_in", "too large"))?;
        let secret_text = secret::generate(SecretKind::VaultKey, &self.key_env);
        let mut key = VaultKey {
            id: format!("key_{}", uuid::Uuid::new_v4().simple()),
            key_hash: secret::hash(&secret_text),
            key_prefix: secret::display_prefix(&secret_text),
            vendor: req.vendor,
            allowed_endpoints: req.allowed_endpoints,
            daily_cap: req.daily_cap,
            per_call_cap: req.per_call_cap,
            lifetime_cap: req.lifetime_cap,
            expires_at: now + expires_in,
            agent_run_label: req.agent_run_label,
            metadata: req.metadata,
            created_at: now,
            revoked_at: None,
            limits: req.limits,
            parent_id: req.parent_id,
            approval_above: req.approval_above,
            roll: domain::KeyRoll::default(),
            observe_ceiling: req.observe_ceiling,
        };
        if let Some(parent_id) = &key.parent_id {
            // A parent of a vendor the caller may not act on is not found,
            // like an unknown one.
            let parent = self
                .key_of_allowed_vendor(vendors, parent_id)
                .await
                .map_err(|_| ApiError::NotFound(format!("parent key {parent_id:?} not found")))?;
            if parent.observe_ceiling.is_some() {
                return Err(ApiError::Invalid(invalid(
                    "parent_id",
                    "the parent key is in observe mode and cannot have child keys; switch it to enforce first",
                )));
            }
            // Network limits the child leaves out are its parent's.
            key.limits = parent.limits.for_child(&key.limits)?;
            // The gate a child is held to is the lowest along its
            // ancestors: stored as such, so a proxy reads one number.
            key.approval_above =
                crate::approval::within_parent(parent.approval_above, key.approval_above);
            domain::check_child_key(&parent, &key, now)?;
        }
        self.store.insert_key(&key).await.map_err(|e| match e {
            // The parent changed since it was checked, or the tree is as
            // deep as it may be.
            crate::store::StoreError::Conflict(why) if key.parent_id.is_some() => {
                ApiError::Invalid(invalid("parent_id", why))
            }
            other => other.into(),
        })?;
        let version = self.publish_head().await?;
        let view = self.view(key, now).await?;
        Ok((view, secret_text, version))
    }

    async fn view(&self, key: VaultKey, now: DateTime<Utc>) -> Result<KeyView, ApiError> {
        let spend = self
            .store
            .key_spend(&key.id, &keycap_proto::time::utc_day(now))
            .await?;
        let status = key.status(now);
        let remaining_today = key
            .enforced_daily_cap()
            .saturating_sub(spend.spent_day)
            .max(Micros::ZERO);
        Ok(KeyView {
            key,
            status,
            spend,
            remaining_today,
        })
    }

    pub async fn get_key(&self, vendors: &VendorScope, id: &str) -> Result<KeyView, ApiError> {
        let key = self.key_of_allowed_vendor(vendors, id).await?;
        self.view(key, Utc::now()).await
    }

    /// The key, if the caller may act on its vendor. A key of another
    /// vendor is not found, like an unknown one, so a vendor-restricted
    /// token learns nothing of other vendors' keys from their ids.
    async fn key_of_allowed_vendor(
        &self,
        vendors: &VendorScope,
        id: &str,
    ) -> Result<VaultKey, ApiError> {
        self.store
            .get_key(id)
            .await?
            .filter(|k| vendors.allows(k.vendor.as_str()))
            .ok_or_else(|| ApiError::NotFound(format!("key {id:?} not found")))
    }

    pub async fn list_keys(
        &self,
        vendors: &VendorScope,
        filter: &KeyFilter,
    ) -> Result<Vec<KeyView>, ApiError> {
        if let Some(v) = &filter.vendor {
            vendors.check(v)?;
        }
        let now = Utc::now();
        let keys = self.store.list_keys(filter, now).await?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if vendors.allows(k.vendor.as_str()) {
                out.push(self.view(k, now).await?);
            }
        }
        Ok(out)
    }

    /// Revokes a key with its whole subtree and waits for the proxies to
    /// confirm every one of them (see
    /// `confirm_revocation`). Revoking a revoked key changes nothing and
    /// reports the confirmation state again.
    pub async fn revoke_key(
        self: &Arc<Self>,
        vendors: &VendorScope,
        id: &str,
        ack_timeout: Option<Duration>,
    ) -> Result<(KeyView, Confirmation), ApiError> {
        self.key_of_allowed_vendor(vendors, id).await?;
        let revoked = self.store.revoke_key(id, Utc::now()).await?;
        let version = self.publish_head().await?;
        // Its whole subtree was revoked with it: proxies must refuse every
        // key in it before the revocation is confirmed.
        let ids = std::iter::once(revoked.key.id.clone())
            .chain(revoked.descendants.iter().cloned())
            .collect();
        let confirmation = self.confirm_revocation(ids, version, ack_timeout).await?;
        self.alert_key_revoked(&revoked.key, &revoked.descendants, &confirmation)
            .await;
        Ok((self.view(revoked.key, Utc::now()).await?, confirmation))
    }

    /// Revokes the run's keys — only those of the caller's vendors — and
    /// waits for the proxies to confirm. Returns the ids revoked by this
    /// call; the confirmation covers every revoked key of the run the
    /// caller may see, so a repeated call reports it again.
    pub async fn revoke_run(
        self: &Arc<Self>,
        vendors: &VendorScope,
        label: &str,
        ack_timeout: Option<Duration>,
    ) -> Result<(Vec<String>, Confirmation), ApiError> {
        let label = domain::parse_run_label(label)?;
        let now = Utc::now();
        let ids = self
            .store
            .revoke_run(&label, vendors.list().as_deref(), now)
            .await?;
        let version = self.publish_head().await?;
        let filter = KeyFilter {
            agent_run_label: Some(label.clone()),
            vendor: None,
            include_inactive: true,
        };
        let revoked: Vec<String> = self
            .store
            .list_keys(&filter, now)
            .await?
            .into_iter()
            .filter(|k| k.revoked_at.is_some() && vendors.allows(k.vendor.as_str()))
            .map(|k| k.id)
            .collect();
        let confirmation = self
            .confirm_revocation(revoked, version, ack_timeout)
            .await?;
        self.alert_run_revoked(&label, &ids, &confirmation).await;
        Ok((ids, confirmation))
    }

    /// Waits until every proxy connected now has applied `version` (which
    /// carries the revocation of `key_ids`), or until the timeout. Proxies
    /// that did not confirm by then, and proxies not connected that still
    /// hold a lease of one of the keys, are named unconfirmed and their
    /// leases of the keys are fenced: they can spend at most what those
    /// leases hold. Runs in its own task, so the fence is set even if the
    /// caller hangs up.
    async fn confirm_revocation(
        self: &Arc<Self>,
        key_ids: Vec<String>,
        version: i64,
        ack_timeout: Option<Duration>,
    ) -> Result<Confirmation, ApiError> {
        if key_ids.is_empty() {
            return Ok(Confirmation {
                version,
                ..Confirmation::default()
            });
        }
        let me = self.clone();
        let timeout = ack_timeout.unwrap_or(self.ack_timeout);
        // A child of the admin's call (which continues the admin's trace):
        // the wait for the fleet shows in that trace.
        let span = confirm_span(version, ChangeKind::Revocation);
        let wait = async move { me.await_revocation(key_ids, version, timeout).await };
        tokio::spawn(wait.instrument(span)).await.map_err(|e| {
            tracing::error!(error = %e, "revocation confirmation task failed");
            ApiError::Internal
        })?
    }

    /// Waits until every proxy connected now has applied `version` (which
    /// carries a new key or a vendor write), or until the timeout, and says
    /// which did. Nothing is fenced: a proxy that has not applied a creation
    /// yet refuses the new key (or asks the control plane for it) rather
    /// than spending with it.
    async fn confirm_change(
        &self,
        version: i64,
        ack_timeout: Option<Duration>,
        kind: ChangeKind,
    ) -> Result<Confirmation, ApiError> {
        let span = confirm_span(version, kind);
        let timeout = ack_timeout.unwrap_or(self.ack_timeout);
        let started = tokio::time::Instant::now();
        let acks = self
            .await_acks(version, started + timeout)
            .instrument(span.clone())
            .await?;
        let all = acks.waiting.is_empty();
        crate::metrics::METRICS.confirmed(kind, started.elapsed(), all);
        span.record("keycap.confirmed_nodes", acks.confirmed.len());
        span.record("keycap.unconfirmed_nodes", acks.waiting.len());
        let waited_ms = started.elapsed().as_millis() as u64;
        if acks.waiting.is_empty() {
            tracing::debug!(
                version,
                confirmed = acks.confirmed.len(),
                waited_ms,
                "change confirmed by every connected proxy"
            );
        } else {
            tracing::warn!(version, unconfirmed = ?acks.waiting, waited_ms, "change not confirmed by every connected proxy");
        }
        Ok(Confirmation {
            version,
            confirmed: acks.confirmed.into_iter().collect(),
            unconfirmed: acks.waiting.into_iter().collect(),
            unconfirmed_lease: Micros::ZERO,
        })
    }

    /// Waits until every proxy connected now has applied `version`, or
    /// until `deadline`.
    async fn await_acks(
        &self,
        version: i64,
        deadline: tokio::time::Instant,
    ) -> Result<Acks, ApiError> {
        // Subscribed before the first read, so no acknowledgement between
        // the read and the wait goes unnoticed.
        let mut acks = self.acks.subscribe();
        let connected_after = Utc::now() - FLEET_NODE_STALE;
        let mut nodes = self.store.fleet_nodes().await?;
        let mut waiting: BTreeSet<String> = nodes
            .iter()
            .filter(|n| n.heartbeat_at > connected_after)
            .map(|n| n.node_id.clone())
            .collect();
        let mut confirmed = BTreeSet::new();
        loop {
            for n in &nodes {
                if n.applied_version >= version && waiting.remove(&n.node_id) {
                    confirmed.insert(n.node_id.clone());
                }
            }
            if waiting.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::select! {
                _ = acks.changed() => {}
                _ = tokio::time::sleep(ACK_POLL) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
            // A slow database does not hold the answer past the deadline.
            match tokio::time::timeout_at(deadline, self.store.fleet_nodes()).await {
                Ok(read) => nodes = read?,
                Err(_) => break,
            }
        }
        Ok(Acks { confirmed, waiting })
    }

    async fn await_revocation(
        &self,
        key_ids: Vec<String>,
        version: i64,
        timeout: Duration,
    ) -> Result<Confirmation, ApiError> {
        let started = tokio::time::Instant::now();
        let Acks { confirmed, waiting } = self.await_acks(version, started + timeout).await?;
        // A proxy that is not connected cannot confirm; one that still
        // holds budget of a revoked key could spend it.
        let now = Utc::now();
        let mut unconfirmed = waiting;
        for holder in self.store.lease_holders(&key_ids, now).await? {
            if !confirmed.contains(&holder) {
                unconfirmed.insert(holder);
            }
        }
        let unconfirmed: Vec<String> = unconfirmed.into_iter().collect();
        let unconfirmed_lease = if unconfirmed.is_empty() {
            Micros::ZERO
        } else {
            self.store.fence_leases(&unconfirmed, &key_ids, now).await?
        };
        crate::metrics::METRICS.confirmed(
            ChangeKind::Revocation,
            started.elapsed(),
            unconfirmed.is_empty(),
        );
        let span = tracing::Span::current();
        span.record("keycap.confirmed_nodes", confirmed.len());
        span.record("keycap.unconfirmed_nodes", unconfirmed.len());
        let waited_ms = started.elapsed().as_millis() as u64;
        if unconfirmed.is_empty() {
            tracing::info!(version, keys = ?key_ids, confirmed = confirmed.len(), waited_ms, "revocation confirmed by every connected proxy");
        } else {
            tracing::warn!(version, keys = ?key_ids, unconfirmed = ?unconfirmed, fenced_micros = unconfirmed_lease.0, waited_ms, "revocation not confirmed by every proxy; their leases of the keys are fenced");
        }
        Ok(Confirmation {
            version,
            confirmed: confirmed.into_iter().collect(),
            unconfirmed,
            unconfirmed_lease,
        })
    }

    // --- audit --------------------------------------------------------------

    /// Audit entries of the caller's vendors only.
    pub async fn query_audit(
        &self,
        vendors: &VendorScope,
        q: &AuditQuery,
    ) -> Result<Vec<AuditEntry>, ApiError> {
        if let Some(v) = &q.vendor {
            vendors.check(v)?;
        }
        let mut q = q.clone();
        q.vendors = vendors.list();
        Ok(self.store.query_audit(&q).await?)
    }

    /// Recomputes the ledger's chain from `from` and holds its end against
    /// the latest checkpoint this replica's master key signed and against
    /// `held`, a checkpoint the caller kept (`SEQ:HASH`; see
    /// `ledger::verify_to_checkpoint`). The chain spans every vendor, so
    /// only a caller over all of them may.
    pub async fn verify_audit(
        &self,
        vendors: &VendorScope,
        from: Option<i64>,
        held: Option<&str>,
    ) -> Result<ledger::Verification, ApiError> {
        vendors.check_all()?;
        if from.is_some_and(|f| f < 1) {
            return Err(domain::invalid("from", "must be a seq of at least 1").into());
        }
        let held = held
            .map(str::parse::<ledger::KnownPoint>)
            .transpose()
            .map_err(|e| domain::invalid("checkpoint", e))?;
        if let Some(point) = held {
            // A point the check never reaches would pass unseen.
            let dropped = self.store.ledger_retention().await?.dropped_through;
            let first = from.unwrap_or(1).max(dropped + 1);
            if point.seq < first {
                let why = format!(
                    "seq {} is before the first entry checked, {first}",
                    point.seq
                );
                return Err(domain::invalid("checkpoint", why).into());
            }
        }
        let trusted = self.trusted_checkpoint_keys().await?;
        Ok(ledger::verify_to_checkpoint(&*self.store, from, &trusted, held).await?)
    }

    /// The public keys of the ledger signing keys this replica's master
    /// key opens: only checkpoints they signed are trusted.
    async fn trusted_checkpoint_keys(&self) -> Result<Vec<[u8; 32]>, ApiError> {
        Ok(self
            .opened_signing_keys()
            .await?
            .iter()
            .map(|k| k.verifying_key().to_bytes())
            .collect())
    }

    /// A run's spend over the caller's vendors only.
    pub async fn spend_summary(
        &self,
        vendors: &VendorScope,
        label: &str,
    ) -> Result<SpendSummary, ApiError> {
        let label = domain::parse_run_label(label)?;
        let all = self.store.spend_summary(&label).await?;
        if *vendors == VendorScope::All {
            return Ok(all);
        }
        let mut out = SpendSummary::default();
        for (vendor, total, calls) in all.vendors {
            if vendors.allows(&vendor) {
                out.total = out.total.saturating_add(total);
                out.calls += calls;
                out.vendors.push((vendor, total, calls));
            }
        }
        Ok(out)
    }

    /// Spend, calls and refusals grouped as `q` asks, over the caller's
    /// vendors only. `q.top` 0 means every group up to the most a report
    /// holds.
    pub async fn spend_report(
        &self,
        vendors: &VendorScope,
        q: &domain::SpendReportQuery,
    ) -> Result<domain::SpendReport, ApiError> {
        if q.top > domain::MAX_REPORT_GROUPS {
            return Err(domain::invalid(
                "top",
                format!("must be between 1 and {}", domain::MAX_REPORT_GROUPS),
            )
            .into());
        }
        if let (Some(since), Some(until)) = (q.since, q.until) {
            if since >= until {
                return Err(domain::invalid("from", "must be before to").into());
            }
        }
        let mut q = q.clone();
        if q.top == 0 {
            q.top = domain::MAX_REPORT_GROUPS;
        }
        if let Some(label) = &q.agent_run_label {
            q.agent_run_label = Some(domain::parse_run_label(label)?);
        }
        q.vendors = vendors.list();
        Ok(self.store.spend_report(&q).await?)
    }

    // --- fleet --------------------------------------------------------------

    /// Registers `node_id`'s policy stream as connected through this
    /// replica; the registration ends when the returned value is dropped.
    pub async fn open_node_stream(&self, node_id: &str) -> Result<NodeStream, ApiError> {
        let node_id = domain::parse_node_id(node_id)?.to_string();
        let stream_id = uuid::Uuid::new_v4().simple().to_string();
        self.store
            .register_fleet_node(&node_id, &self.replica_id, &stream_id, Utc::now())
            .await?;
        Ok(NodeStream {
            store: self.store.clone(),
            node_id,
            stream_id,
        })
    }

    /// Records that `node_id` has applied the policy up to `version`
    /// (never lowering what it said before) and wakes revocations waiting
    /// here. A node without an open stream is ignored: it counts for no
    /// revocation.
    pub async fn ack_policy(&self, node_id: &str, version: i64) -> Result<(), ApiError> {
        let node_id = domain::parse_node_id(node_id)?;
        if version < 0 {
            return Err(invalid("version", "must not be negative").into());
        }
        if self.store.ack_policy(node_id, version).await? {
            self.acks.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(())
    }

    /// The key whose secret hashes to `key_hash`, if proxies should know it
    /// (as in `snapshot`: not expired more than `KEY_MEMORY` ago), and the
    /// change-log version read after it: a policy at or past that version
    /// holds the key as answered, or newer.
    pub async fn lookup_key(&self, key_hash: &[u8]) -> Result<(Option<VaultKey>, i64), ApiError> {
        let hash: [u8; 32] = key_hash
            .try_into()
            .map_err(|_| invalid("key_hash", "must be a SHA-256 digest (32 bytes)"))?;
        let key = self
            .store
            .find_key_by_hash(&hash)
            .await?
            .filter(|k| k.expires_at > Utc::now() - KEY_MEMORY);
        // Read after the key: the key's own change is at or below it.
        let version = self.store.latest_version().await?;
        Ok((key, version))
    }

    /// The leases granted to `node_id` that still count against caps.
    pub async fn node_leases(&self, node_id: &str) -> Result<Vec<domain::NodeLease>, ApiError> {
        let node_id = domain::parse_node_id(node_id)?;
        let counted_after = Utc::now() - crate::store::unreturned_lease_grace();
        Ok(self.store.node_leases(node_id, counted_after).await?)
    }

    /// Everything a proxy needs to start: vendors with opened credentials
    /// and live keys, at the returned version.
    pub async fn snapshot(&self) -> Result<(i64, Vec<FleetVendor>, Vec<VaultKey>), ApiError> {
        // Read the version first: anything changed after it is re-sent as a
        // delta, so the proxy can only be ahead, never behind.
        let version = self.store.latest_version().await?;
        let mut vendors = Vec::new();
        for v in self.store.list_vendors().await? {
            if let Some(fv) = self.fleet_vendor(v).await? {
                vendors.push(fv);
            }
        }
        let keys = self.store.policy_keys(Utc::now() - KEY_MEMORY).await?;
        Ok((version, vendors, keys))
    }

    /// A fingerprint of vendor `name`'s credential, for an operator to tell
    /// which credential is set without seeing it: `sha256:` and the first 12
    /// hex digits of the credential's SHA-256 (what `printf %s "$KEY" |
    /// sha256sum | cut -c1-12` prints). `None` when no credential is set or
    /// it cannot be opened.
    pub async fn credential_fingerprint(&self, name: &str) -> Result<Option<String>, ApiError> {
        let Some((version, sealed)) = self.store.get_vendor_credential(name).await? else {
            return Ok(None);
        };
        let record = crate::credential::record_id(name, version);
        Ok(self.sealer.open(&record, &sealed).ok().map(|plain| {
            let digest = <sha2::Sha256 as sha2::Digest>::digest(&plain);
            format!("sha256:{}", &hex::encode(digest)[..12])
        }))
    }

    async fn fleet_vendor(&self, v: Vendor) -> Result<Option<FleetVendor>, ApiError> {
        let Some((version, sealed)) = self.store.get_vendor_credential(v.name.as_str()).await?
        else {
            return Ok(None);
        };
        let record = crate::credential::record_id(v.name.as_str(), version);
        match self.sealer.open(&record, &sealed) {
            Ok(plain) => Ok(Some(FleetVendor {
                credential: String::from_utf8(plain).map_err(|_| ApiError::Internal)?,
                credential_version: version,
                vendor: v,
                allow_private_upstream: self.upstreams == domain::UpstreamPolicy::AllowPrivate,
            })),
            Err(e) => {
                // A credential that cannot be opened (wrong master key,
                // tampering) is withheld: the proxy then refuses the vendor.
                tracing::error!(vendor = %v.name, error = %e, "vendor credential cannot be opened");
                Ok(None)
            }
        }
    }

    /// Changes after `after`, as current state: `None` when the log no
    /// longer reaches back that far (the proxy needs a snapshot).
    ///
    /// A version beyond the log's head (a proxy that outlived a database
    /// restore or a fresh dev data dir) also needs a snapshot: resuming from
    /// it would skip every change up to that number, revocations included.
    pub async fn delta_since(&self, after: i64) -> Result<Option<Delta>, ApiError> {
        let oldest = self.store.oldest_version().await?;
        if oldest > 0 && after + 1 < oldest {
            return Ok(None);
        }
        if after > self.store.latest_version().await? {
            return Ok(None);
        }
        let changes = self.store.changes_since(after, 10_000).await?;
        // Another replica may have trimmed the log between the two reads:
        // then what was read may lack changes the proxy never saw.
        let oldest = self.store.oldest_version().await?;
        if oldest > 0 && after + 1 < oldest {
            return Ok(None);
        }
        let mut delta = Delta {
            version: after,
            ..Delta::default()
        };
        let now = Utc::now();
        let mut seen_vendors = std::collections::BTreeSet::new();
        let mut seen_keys = std::collections::BTreeSet::new();
        let mut seen_hooks = std::collections::BTreeSet::new();
        for c in changes {
            delta.version = delta.version.max(c.version);
            match c.what {
                ChangeRef::Vendor(name) => {
                    seen_vendors.insert(name);
                }
                ChangeRef::Key(id) => {
                    seen_keys.insert(id);
                }
                ChangeRef::Hook(id) => {
                    seen_hooks.insert(id);
                }
            }
        }
        self.hook_delta(seen_hooks, &mut delta).await?;
        for name in seen_vendors {
            match self.store.get_vendor(&name).await? {
                Some(v) => match self.fleet_vendor(v).await? {
                    Some(fv) => delta.upsert_vendors.push(fv),
                    None => delta.removed_vendors.push(name),
                },
                None => delta.removed_vendors.push(name),
            }
        }
        for id in seen_keys {
            match self.store.get_key(&id).await? {
                // Revoked and recently expired keys travel as such, so the
                // proxy can say `key_revoked` / `key_expired` rather than
                // `invalid_key`.
                Some(k) if k.expires_at > now - KEY_MEMORY => delta.upsert_keys.push(k),
                _ => delta.removed_keys.push(id),
            }
        }
        Ok(Some(delta))
    }

    pub async fn grant_lease(&self, mut req: LeaseGrantRequest) -> Result<LeaseGrant, ApiError> {
        if req.requested.0 <= 0 || req.minimum.is_negative() || req.minimum > req.requested {
            return Err(ApiError::Invalid(invalid(
                "requested_micros",
                "must be positive and at least minimum_micros",
            )));
        }
        let now = Utc::now();
        check_lease_day(&req.day, now)?;
        req.expires_at = now + chrono::Duration::from_std(LEASE_TTL).expect("constant fits");
        Ok(self.store.grant_lease(&req, now).await?)
    }

    /// Closes a lease. With `node`, only a lease granted to that node is
    /// found.
    pub async fn return_lease(
        &self,
        lease_id: &str,
        node: Option<&str>,
        spent: Micros,
    ) -> Result<(), ApiError> {
        if spent.is_negative() {
            return Err(ApiError::Invalid(invalid(
                "spent_micros",
                "must not be negative",
            )));
        }
        Ok(self.store.return_lease(lease_id, node, spent).await?)
    }

    /// Gives back what an open lease holds beyond `keep` while the lease
    /// stays open, if its grant is still `granted`. With `node`, only a
    /// lease granted to that node is found.
    pub async fn shrink_lease(
        &self,
        lease_id: &str,
        node: Option<&str>,
        granted: Micros,
        keep: Micros,
    ) -> Result<bool, ApiError> {
        if keep.is_negative() || keep > granted {
            return Err(ApiError::Invalid(invalid(
                "spent_micros",
                "must be between 0 and granted_micros",
            )));
        }
        Ok(self
            .store
            .shrink_lease(lease_id, node, granted, keep)
            .await?)
    }

    /// Applies a proxy's spend report, joined with the reports of other
    /// calls arriving meanwhile (`ingest`).
    pub async fn report_spend(
        self: &Arc<Self>,
        events: Vec<SpendEvent>,
    ) -> Result<(u32, u32), ApiError> {
        if events.len() > 10_000 {
            return Err(ApiError::Invalid(invalid(
                "events",
                "at most 10000 per batch",
            )));
        }
        // The thresholds are checked on the keys and days the batch touched,
        // and cap refusals on its keys' minutes, once it is stored (soon
        // after the answer).
        let touched = alerts::touched(&events);
        let cap_refusals = alerts::cap_refusal_windows(&events);
        let recorded = self.spend.record(events).await?;
        self.check_alerts_soon(touched, cap_refusals);
        Ok(recorded)
    }
}

/// A proxy's open policy stream, registered in the fleet table until this
/// is dropped.
/// Which proxies applied a version while a change waited for them.
struct Acks {
    confirmed: BTreeSet<String>,
    /// Connected when the wait began, and not confirmed by its end.
    waiting: BTreeSet<String>,
}

pub struct NodeStream {
    store: Arc<dyn Store>,
    node_id: String,
    stream_id: String,
}

impl Drop for NodeStream {
    fn drop(&mut self) {
        let store = self.store.clone();
        let (node, stream) = (
            std::mem::take(&mut self.node_id),
            std::mem::take(&mut self.stream_id),
        );
        // A replica shutting down may not get to run this; its heartbeat
        // stops too, so the registration stops counting soon anyway.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.unregister_fleet_node(&node, &stream).await {
                    tracing::warn!(node = %node, error = %e, "cannot unregister a closed policy stream");
                }
            });
        }
    }
}

/// Policy changes since a version, as current state.
#[derive(Default)]
pub struct Delta {
    pub version: i64,
    pub upsert_vendors: Vec<FleetVendor>,
    pub removed_vendors: Vec<String>,
    pub upsert_keys: Vec<VaultKey>,
    pub removed_keys: Vec<String>,
    pub upsert_hooks: Vec<crate::hooks::FleetHook>,
    pub removed_hooks: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.upsert_vendors.is_empty()
            && self.removed_vendors.is_empty()
            && self.upsert_keys.is_empty()
            && self.removed_keys.is_empty()
            && self.upsert_hooks.is_empty()
            && self.removed_hooks.is_empty()
    }
}

/// The token of an `Authorization: Bearer <token>` value.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let v = authorization?.trim();
    let (scheme, token) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then_some(token)
}

/// The span of waiting for the fleet to confirm a change: a child of the
/// call that made it (which continues its caller's trace).
fn confirm_span(version: i64, kind: ChangeKind) -> tracing::Span {
    tracing::info_span!(
        "confirm change",
        otel.name = %format_args!("confirm {}", kind.as_str()),
        keycap.change = kind.as_str(),
        keycap.version = version,
        keycap.confirmed_nodes = tracing::field::Empty,
        keycap.unconfirmed_nodes = tracing::field::Empty,
    )
}

/// A lease draws on the budget of the UTC day it names, the day of the
/// proxy's clock. It is granted only for the control plane's own day, or
/// the day next to it while the clocks are within `ledger::MAX_AHEAD` of
/// midnight: a proxy whose clock is a day off would otherwise spend
/// another day's cap today, on top of today's.
fn check_lease_day(day: &str, now: DateTime<Utc>) -> Result<(), ApiError> {
    let skew = ledger::MAX_AHEAD;
    if [now - skew, now, now + skew]
        .into_iter()
        .any(|t| keycap_proto::time::utc_day(t) == day)
    {
        return Ok(());
    }
    Err(ApiError::Invalid(invalid(
        "day",
        format!(
            "{day} is not the control plane's UTC day ({}): a lease is for the day of the \
             call; check the proxy's clock",
            keycap_proto::time::utc_day(now)
        ),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SqliteStore;

    #[test]
    fn a_lease_is_granted_for_the_control_planes_day_or_the_next_near_midnight() {
        let at = |t: &str| t.parse::<DateTime<Utc>>().unwrap();
        let ok = |day: &str, now: &str| check_lease_day(day, at(now)).is_ok();
        assert!(ok("2026-12-07", "2026-12-07T12:00:00Z"));
        assert!(!ok("2026-12-06", "2026-12-07T12:00:00Z"));
        assert!(!ok("2026-12-08", "2026-12-07T12:00:00Z"));
        // Within MAX_AHEAD (an hour) of midnight, either side of it.
        assert!(ok("2026-12-06", "2026-12-07T00:30:00Z"));
        assert!(!ok("2026-12-06", "2026-12-07T01:30:00Z"));
        assert!(ok("2026-12-08", "2026-12-07T23:30:00Z"));
        assert!(!ok("2026-12-08", "2026-12-07T22:30:00Z"));
        assert!(!ok("2026-12-09", "2026-12-07T23:30:00Z"));
        let refused = check_lease_day("2030-01-01", at("2026-12-07T12:00:00Z")).unwrap_err();
        assert!(
            refused.to_string().contains("2026-12-07"),
            "names the control plane's day: {refused}"
        );
    }

    /// A `Control` whose store fails every query: any lookup shows up as
    /// `Internal` instead of `Unauthenticated`.
    async fn control_without_a_store() -> Arc<Control> {
        let (control, store, pool) = control_in_memory(Sealer::generate_key_text()).await;
        drop(store);
        pool.close().await;
        control
    }

    /// A `Control` over a fresh in-memory store; also the store and its pool.
    /// Moves the ledger head, as appends leave it (the entries themselves
    /// are not needed).
    async fn set_ledger_head(pool: &sqlx::SqlitePool, seq: i64, hash: [u8; 32]) {
        sqlx::query("UPDATE ledger_head SET seq = $1, hash = $2")
            .bind(seq)
            .bind(&hash[..])
            .execute(pool)
            .await
            .unwrap();
    }

    async fn control_in_memory(
        master_key: String,
    ) -> (Arc<Control>, Arc<dyn Store>, sqlx::SqlitePool) {
        let store = SqliteStore::in_memory().await.unwrap();
        store.migrate().await.unwrap();
        let pool = store.pool().clone();
        let store: Arc<dyn Store> = Arc::new(store);
        let control = Control::new(
            store.clone(),
            Sealer::from_key_text(&master_key).unwrap(),
            &secret::generate(SecretKind::FleetToken, "test"),
            "test",
            Duration::from_secs(2),
            domain::UpstreamPolicy::PublicHttps,
        )
        .await
        .unwrap();
        (control, store, pool)
    }

    fn spend(id: &str, cost: i64) -> SpendEvent {
        SpendEvent {
            lease_id: "l1".into(),
            path: "/v1/payment_intents".into(),
            node_id: "n1".into(),
            ..SpendEvent::settled(id, "k1", cost, cost)
        }
    }

    async fn put_stripe(store: &dyn Store) {
        let now = Utc::now();
        store
            .put_vendor(VendorWrite {
                vendor: domain::Vendor {
                    name: VendorName::parse("stripe").unwrap(),
                    profile: domain::Profile::Stripe,
                    base_url: "https://api.stripe.com".into(),
                    currency_rates: BTreeMap::new(),
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

    /// A root Stripe key of run `run-1` with this daily cap.
    fn run_key(id: &str, daily_cap: i64) -> VaultKey {
        let now = Utc::now();
        VaultKey {
            id: id.into(),
            key_hash: secret::hash(id),
            key_prefix: format!("kc_test_{id}"),
            vendor: VendorName::parse("stripe").unwrap(),
            allowed_endpoints: vec!["POST /v1/payment_intents".into()],
            daily_cap: Micros(daily_cap),
            per_call_cap: None,
            lifetime_cap: None,
            expires_at: now + chrono::Duration::hours(1),
            agent_run_label: "run-1".into(),
            metadata: BTreeMap::new(),
            created_at: now,
            revoked_at: None,
            limits: domain::KeyLimits::default(),
            parent_id: None,
            approval_above: None,
            roll: domain::KeyRoll::default(),
            observe_ceiling: None,
        }
    }

    /// An endpoint wanting `cap.threshold` at `percent` alone.
    async fn threshold_endpoint(
        control: &Control,
        percent: u32,
    ) -> crate::webhook::WebhookEndpoint {
        control
            .create_webhook(&crate::webhook::EndpointRequest {
                url: "https://hooks.example.com/caps".into(),
                events: vec!["cap.threshold".into()],
                thresholds: vec![percent],
                ..Default::default()
            })
            .await
            .unwrap()
            .0
    }

    /// The run's daily cap and spend count a roll chain's budget once: a
    /// key rolled to a successor leaves two keys of the run on one budget,
    /// and the run's alert shows that budget's cap and spend, not twice.
    #[tokio::test]
    async fn a_runs_threshold_counts_a_roll_chains_budget_once() {
        let (control, store, _pool) = control_in_memory(Sealer::generate_key_text()).await;
        put_stripe(&*store).await;
        let k1 = run_key("k1", 10_000_000);
        store.insert_key(&k1).await.unwrap();
        let successor = VaultKey {
            roll: domain::KeyRoll {
                budget_id: Some("k1".into()),
                rolled_from: Some("k1".into()),
                ..Default::default()
            },
            ..run_key("k1b", 10_000_000)
        };
        let now = Utc::now();
        store
            .roll_key("k1", &successor, now + chrono::Duration::hours(1), now)
            .await
            .unwrap();
        let endpoint = threshold_endpoint(&control, 50).await;
        let spent = SpendEvent {
            key_id: "k1b".into(),
            ..spend("e1", 6_000_000)
        };
        store.record_spend(&[spent]).await.unwrap();
        let touched = BTreeSet::from([("k1b".to_string(), "2026-12-06".to_string())]);
        control.check_thresholds(touched).await;
        let runs: Vec<serde_json::Value> = store
            .webhook_deliveries(&endpoint.id, 10)
            .await
            .unwrap()
            .iter()
            .map(|d| serde_json::from_str::<serde_json::Value>(&d.payload).unwrap()["data"].clone())
            .filter(|data| data["subject"] == "run")
            .collect();
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert_eq!(runs[0]["cap_usd"], Micros(10_000_000).to_string());
        assert_eq!(runs[0]["spent_usd"], Micros(6_000_000).to_string());
    }

    /// A report's answer does not wait for the check of its key's cap
    /// thresholds: while a pass holds the checker, a report is answered
    /// and its key waits. Once the checker is free a pass takes it and
    /// raises each threshold k1 crossed (the key's and its run's 50%) once.
    #[tokio::test]
    async fn a_report_is_answered_before_its_thresholds_are_checked_and_none_is_lost() {
        let (control, store, endpoint) = k1_wanting_its_50_percent().await;

        let pass = answered_while_a_pass_holds_the_checker(&control, spend("e1", 6_000_000)).await;
        assert_eq!(
            deliveries(&*store, &endpoint.id).await,
            0,
            "not checked yet"
        );
        assert!(control
            .pending
            .waiting()
            .contains(&("k1".to_string(), "2026-12-06".to_string())));
        drop(pass);
        another_report_then_every_check_done(&control, &*store, &endpoint.id, 2).await;
        // A later pass raises nothing again.
        let touched = BTreeSet::from([("k1".to_string(), "2026-12-06".to_string())]);
        control.check_thresholds(touched).await;
        assert_eq!(
            deliveries(&*store, &endpoint.id).await,
            2,
            "each threshold is raised once"
        );
    }

    /// A report carrying a burst of cap refusals is answered before the
    /// burst is checked: while a pass holds the checker, the report is
    /// answered and its (key, minute) waits; a pass after raises the
    /// `cap.refusals` event once.
    #[tokio::test]
    async fn a_report_is_answered_before_its_cap_refusals_are_checked() {
        let (control, store, _pool) = control_in_memory(Sealer::generate_key_text()).await;
        put_stripe(&*store).await;
        store.insert_key(&run_key("k1", 10_000_000)).await.unwrap();
        let endpoint = control
            .create_webhook(&crate::webhook::EndpointRequest {
                url: "https://hooks.example.com/refusals".into(),
                events: vec!["cap.refusals".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .0;
        let burst = SpendEvent {
            outcome: domain::Outcome::Refused,
            refusal_reason: "daily_cap_exceeded".into(),
            refused_calls: crate::webhook::REFUSAL_BURST,
            upstream_status: 0,
            ..spend("r1", 0)
        };

        let pass = answered_while_a_pass_holds_the_checker(&control, burst).await;
        assert_eq!(
            deliveries(&*store, &endpoint.id).await,
            0,
            "not checked yet"
        );
        assert_eq!(control.pending.waiting_windows().len(), 1);
        drop(pass);
        another_report_then_every_check_done(&control, &*store, &endpoint.id, 1).await;
        assert_eq!(deliveries(&*store, &endpoint.id).await, 1);
    }

    /// A stopping replica checks what its last reports left waiting: a
    /// report answered while a pass ran leaves its key to the next pass,
    /// and the last pass at shutdown raises its alerts once the running
    /// one lets go.
    #[tokio::test]
    async fn a_stopping_replica_checks_what_its_last_reports_left_waiting() {
        let (control, store, endpoint) = k1_wanting_its_50_percent().await;

        let pass = answered_while_a_pass_holds_the_checker(&control, spend("e1", 6_000_000)).await;
        let finish = tokio::spawn({
            let control = control.clone();
            async move { control.finish_alert_checks(Duration::from_secs(10)).await }
        });
        assert_eq!(
            deliveries(&*store, &endpoint.id).await,
            0,
            "not checked yet"
        );
        drop(pass);
        finish.await.unwrap();
        assert_eq!(
            deliveries(&*store, &endpoint.id).await,
            2,
            "the key's and the run's 50%"
        );
        assert!(control.pending.is_empty());
    }

    /// A control plane with a Stripe key `k1` (a $10 daily cap, run
    /// `run-1`) and an endpoint wanting its 50% thresholds.
    async fn k1_wanting_its_50_percent() -> (
        Arc<Control>,
        Arc<dyn Store>,
        crate::webhook::WebhookEndpoint,
    ) {
        let (control, store, _pool) = control_in_memory(Sealer::generate_key_text()).await;
        put_stripe(&*store).await;
        store.insert_key(&run_key("k1", 10_000_000)).await.unwrap();
        let endpoint = threshold_endpoint(&control, 50).await;
        (control, store, endpoint)
    }

    async fn deliveries(store: &dyn Store, endpoint: &str) -> usize {
        store.webhook_deliveries(endpoint, 10).await.unwrap().len()
    }

    /// Reports `event` while the test holds the checker, as a running pass
    /// would; the answer must come all the same. Returns the checker.
    async fn answered_while_a_pass_holds_the_checker(
        control: &Arc<Control>,
        event: SpendEvent,
    ) -> tokio::sync::MutexGuard<'_, ()> {
        let pass = control.pending.checking.lock().await;
        let answer =
            tokio::time::timeout(Duration::from_secs(10), control.report_spend(vec![event]))
                .await
                .expect("answered while a pass holds the checker");
        assert_eq!(answer.unwrap(), (1, 0));
        pass
    }

    /// Once the checker is free: another key's report starts a pass,
    /// unless the first report's own task already has (then the second
    /// waits out that pass's second). Either way, `endpoint` gets `raised`
    /// deliveries and nothing is left waiting.
    async fn another_report_then_every_check_done(
        control: &Arc<Control>,
        store: &dyn Store,
        endpoint: &str,
        raised: usize,
    ) {
        let other = SpendEvent {
            key_id: "k2".into(),
            ..spend("e2", 1)
        };
        control.report_spend(vec![other]).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while deliveries(store, endpoint).await < raised || !control.pending.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the alerts were not raised, or checks still wait"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // A current-thread runtime runs the calls' tasks in order before the
    // writer task gets its turn, so they are all queued when it looks.
    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_spend_reports_join_one_batch_and_each_gets_its_own_answer() {
        let (control, store, _pool) = control_in_memory(Sealer::generate_key_text()).await;
        // 20 calls of 30 events; each call repeats 10 events of the one
        // before it, and the last call is a retry of the first.
        let calls: Vec<Vec<SpendEvent>> = (0..20)
            .map(|c| {
                (0..30)
                    .map(|i| {
                        let n = if c == 19 { i } else { c * 20 + i };
                        spend(&format!("e{n}"), 1 + n as i64)
                    })
                    .collect()
            })
            .collect();
        let unique: std::collections::BTreeMap<&str, i64> = calls
            .iter()
            .flatten()
            .map(|e| (e.event_id.as_str(), e.cost.0))
            .collect();
        let tasks: Vec<_> = calls
            .iter()
            .cloned()
            .map(|events| {
                let control = control.clone();
                tokio::spawn(async move { control.report_spend(events).await.unwrap() })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.unwrap());
        }
        assert!(
            control.spend.batches_written() < 20,
            "the calls were joined: {} batches for 20 calls",
            control.spend.batches_written()
        );
        for (a, d) in &answers {
            assert_eq!(a + d, 30, "each call answers for its own events");
        }
        let applied: u32 = answers.iter().map(|(a, _)| a).sum();
        assert_eq!(applied as usize, unique.len(), "each event applied once");
        // Whichever call carried an event first applied it; the first
        // call is first in the queue, so its retry applied nothing.
        assert_eq!(answers[0], (30, 0));
        assert_eq!(answers[19], (0, 30));
        let spent = store.key_spend("k1", "2026-12-06").await.unwrap();
        assert_eq!(spent.spent_day, Micros(unique.values().sum()));
        let v = ledger::verify(&*store, None, &[]).await.unwrap();
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.checked as usize, unique.len());
    }

    #[tokio::test]
    async fn a_whole_ledger_export_is_noted_for_retention_and_a_bounded_one_is_not() {
        use futures_util::TryStreamExt;
        let (control, store, _pool) = control_in_memory(Sealer::generate_key_text()).await;
        let events: Vec<SpendEvent> = (0..2_500).map(|i| spend(&format!("x{i}"), 1)).collect();
        control.report_spend(events).await.unwrap();
        let export = |since| {
            control
                .export_audit(
                    &VendorScope::All,
                    ledger::export::Format::Jsonl,
                    since,
                    None,
                )
                .unwrap()
                .try_collect::<Vec<String>>()
        };
        export(Some(Utc::now() - chrono::TimeDelta::hours(1)))
            .await
            .unwrap();
        assert_eq!(store.ledger_retention().await.unwrap().exported_through, 0);
        // More than one page: the mark is the last entry of the last page.
        let lines: usize = export(None)
            .await
            .unwrap()
            .iter()
            .map(|c| c.lines().count())
            .sum();
        assert_eq!(lines, 2_500);
        let (head, _) = store.ledger_head().await.unwrap();
        assert_eq!(
            store.ledger_retention().await.unwrap().exported_through,
            head
        );
        // SQLite keeps one table: retention has nothing to drop.
        assert!(control.maintain_ledger(Some(1)).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn checkpoints_are_signed_once_per_head_with_a_sealed_key() {
        let master_key = Sealer::generate_key_text();
        let sealer = || Sealer::from_key_text(&master_key).unwrap();
        let (control, store, pool) = control_in_memory(master_key.clone()).await;
        assert_eq!(control.checkpoint_ledger().await.unwrap(), None, "empty");

        set_ledger_head(&pool, 5, [3; 32]).await;
        let cp = control.checkpoint_ledger().await.unwrap().expect("signed");
        assert_eq!((cp.seq, cp.hash), (5, [3; 32]));
        assert!(cp.signature_holds());
        // Same head: no second checkpoint.
        assert_eq!(control.checkpoint_ledger().await.unwrap(), Some(cp.clone()));
        let listed = control
            .ledger_checkpoints(&VendorScope::All, 10)
            .await
            .unwrap();
        assert_eq!(listed, std::slice::from_ref(&cp));
        let restricted = VendorScope::parse_list(&["stripe"]).unwrap();
        assert!(control.ledger_checkpoints(&restricted, 10).await.is_err());

        // The private key is stored sealed under the master key, and the
        // next checkpoint uses the same key.
        let keys = store.ledger_signing_keys().await.unwrap();
        assert_eq!(keys.len(), 1);
        let (id, public_key, sealed) = &keys[0];
        assert_eq!(public_key[..], cp.public_key[..]);
        let secret = sealer().open(&signing_key_record(id), sealed).unwrap();
        assert!(
            !sealed.windows(32).any(|w| w == secret.as_slice()),
            "the private key is not stored in the clear"
        );
        let opened = ed25519_dalek::SigningKey::from_bytes(&secret.try_into().unwrap());
        assert_eq!(opened.verifying_key().to_bytes(), cp.public_key);
        set_ledger_head(&pool, 6, [3; 32]).await;
        let next = control.checkpoint_ledger().await.unwrap().unwrap();
        assert_eq!((next.seq, next.public_key), (6, cp.public_key));
    }

    #[tokio::test]
    async fn verify_trusts_only_checkpoints_a_key_its_master_key_opens_signed() {
        let (control, store, pool) = control_in_memory(Sealer::generate_key_text()).await;
        let verify = |held: Option<&'static str>| {
            let control = control.clone();
            async move { control.verify_audit(&VendorScope::All, None, held).await }
        };
        // An empty ledger, and a checkpoint of seq 5 that whoever can
        // write the database stored with a key pair of their own: not used.
        let stranger = ledger::checkpoint::new_signing_key();
        let forged = ledger::Checkpoint::sign(&stranger, 5, [3; 32], Utc::now());
        assert!(forged.signature_holds());
        store.insert_checkpoint(&forged).await.unwrap();
        let v = verify(None).await.unwrap();
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.checkpoint_seq, None);

        // A checkpoint keycap's own key signed is held: its entry is
        // missing. Another forged one, ahead of the head, neither stops
        // keycap signing the head nor is listed.
        let ahead = ledger::Checkpoint::sign(&stranger, 100, [4; 32], Utc::now());
        store.insert_checkpoint(&ahead).await.unwrap();
        set_ledger_head(&pool, 6, [3; 32]).await;
        let signed = control.checkpoint_ledger().await.unwrap().expect("signed");
        assert_eq!(signed.seq, 6);
        let listed = control
            .ledger_checkpoints(&VendorScope::All, 10)
            .await
            .unwrap();
        assert_eq!(
            listed,
            std::slice::from_ref(&signed),
            "the forged ones are not listed"
        );
        assert_eq!(store.checkpoints(None, 10).await.unwrap().len(), 3);
        set_ledger_head(&pool, 0, ledger::GENESIS).await;
        let v = verify(None).await.unwrap();
        assert_eq!(v.checkpoint_seq, Some(6));
        assert_eq!(v.broken.map(|b| b.seq), Some(1));
        // Stored checkpoints are kept as the ledger is.
        let delete = sqlx::query("DELETE FROM ledger_checkpoints")
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(delete.to_string().contains("append-only"), "{delete}");

        // A kept checkpoint is read as SEQ:HASH, and must lie where the
        // check reaches.
        let bad = verify(Some("5:zz")).await.unwrap_err();
        assert!(bad.to_string().contains("checkpoint"), "{bad}");
        let held = "7:0000000000000000000000000000000000000000000000000000000000000000";
        let v = verify(Some(held)).await.unwrap();
        assert_eq!(v.broken.map(|b| b.seq), Some(1));
        let early = control
            .verify_audit(&VendorScope::All, Some(9), Some(held))
            .await
            .unwrap_err();
        assert!(
            early.to_string().contains("before the first entry checked"),
            "{early}"
        );
    }

    #[tokio::test]
    async fn a_malformed_admin_token_is_refused_without_a_lookup() {
        let control = control_without_a_store().await;
        let good = secret::generate(SecretKind::AdminToken, "live");
        let mut bad_check = good.clone().into_bytes();
        let last = bad_check.len() - 1;
        bad_check[last] = if bad_check[last] == b'a' { b'b' } else { b'a' };
        let bad_check = String::from_utf8(bad_check).unwrap();
        let vault_key = secret::generate(SecretKind::VaultKey, "live");
        let fleet = secret::generate(SecretKind::FleetToken, "live");
        for token in [
            bad_check.as_str(),
            &vault_key,
            &fleet,
            "kcadm_live_short",
            "x",
        ] {
            let auth = format!("Bearer {token}");
            assert!(
                matches!(
                    control.authenticate_admin(Some(&auth)).await,
                    Err(ApiError::Unauthenticated)
                ),
                "{token}"
            );
        }
        // A well-formed token does reach the store (which fails here).
        let auth = format!("Bearer {good}");
        assert!(matches!(
            control.authenticate_admin(Some(&auth)).await,
            Err(ApiError::Internal)
        ));
    }

    fn put(profile: &str, credential: Option<&str>) -> Result<PutVendor, domain::InvalidInput> {
        PutVendor::new(
            "v",
            profile,
            "https://api.twilio.com",
            credential,
            &BTreeMap::new(),
            "",
        )
    }

    #[test]
    fn a_twilio_credential_must_be_sid_and_token() {
        let ok = put(
            "twilio",
            Some("AC0123456789abcdef0123456789abcdef:authtoken"),
        )
        .unwrap();
        assert_eq!(
            ok.credential.as_deref(),
            Some("AC0123456789abcdef0123456789abcdef:authtoken")
        );
        assert!(put("twilio", Some("SKabc:secret12")).is_ok());
        // The proxy masks the secret in responses: a short one is refused.
        assert_eq!(
            put("twilio", Some("AC1:token")).err().unwrap().field,
            "credential"
        );
        // An update that keeps the stored credential is not checked here.
        assert!(put("twilio", None).unwrap().credential.is_none());
        for bad in ["token", "AC123:", ":token", ":"] {
            let err = put("twilio", Some(bad)).err().unwrap();
            assert_eq!(err.field, "credential", "{bad}");
            assert!(
                err.reason.contains("ACCOUNT_SID:AUTH_TOKEN"),
                "{}",
                err.reason
            );
        }
        // Other profiles take a bare token.
        assert!(put("stripe", Some("sk_live_1")).is_ok());
    }
}
