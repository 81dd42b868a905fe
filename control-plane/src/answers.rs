//! The REST mapping's answer bodies: one typed definition of each JSON
//! shape keycap prints, built from domain types by the REST handlers and
//! from gRPC messages by the `keycap` CLI, so REST and the CLI cannot drift
//! apart (docs/api-conventions.md). Field names, status names and money
//! follow that page; every struct derives `ToSchema` for the OpenAPI
//! document. Nothing here ever holds a vendor credential.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use keycap_proto::pb;
use keycap_proto::prices::litellm;
use keycap_proto::time::from_proto;
use keycap_proto::Micros;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

use crate::domain::{self, Vendor};
use crate::service::{Confirmation, KeyView, VendorView};

/// Times in answers: RFC 3339 in UTC, whole seconds.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A US dollar amount in an answer: a JSON number written from the exact
/// micro-dollar integer (at most six decimals), never computed in floats.
#[derive(Clone, Copy)]
pub struct Usd(pub Micros);

impl Serialize for Usd {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.to_json_usd().serialize(s)
    }
}

impl utoipa::PartialSchema for Usd {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Number)
            .description(Some(
                "US dollars, at most six decimals (the exact integer travels beside it as `*_micros` where arithmetic matters)",
            ))
            .examples([json!(12.5)])
            .into()
    }
}

impl ToSchema for Usd {}

/// A vendor. Its real credential is never part of an answer.
#[derive(Serialize, ToSchema)]
pub struct VendorAnswer {
    pub name: String,
    /// The vendor profile: how its calls are priced, settled and refused.
    pub profile: String,
    pub base_url: String,
    /// Exchange rates to USD for the currencies its prices may come in.
    pub currency_rates: BTreeMap<String, String>,
    /// The operator's price table; null when the prices shipped with keycap
    /// apply.
    #[schema(value_type = Option<Object>)]
    pub prices: Option<Value>,
    /// Whether the agent's W3C trace context is forwarded to the vendor.
    pub forward_trace_context: bool,
    /// When the credential was last set (a master key rotation does not
    /// count).
    #[schema(format = DateTime)]
    pub credential_set_at: Option<String>,
    /// How long a credential may be used before it is due for rotation, in
    /// seconds; null: never.
    pub rotate_after_seconds: Option<i64>,
    /// The credential is older than `rotate_after`: rotate it.
    pub rotation_overdue: bool,
    /// The same as `rotation_overdue`: the active credential version is
    /// older than `rotate_after`.
    pub rotation_due: bool,
    /// The active credential version (docs/rotation.md); null in the
    /// answer to a write, which lists no versions.
    pub credential_version: Option<i64>,
    /// Every credential version, newest first: state, age, probe result;
    /// never the credential.
    pub credentials: Vec<crate::rest::CredentialAnswer>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    /// Connected proxies that reported they cannot load this vendor.
    pub proxy_errors: Vec<ProxyErrorAnswer>,
}

#[derive(Serialize, ToSchema)]
pub struct ProxyErrorAnswer {
    pub node_id: String,
    pub error: String,
    #[schema(format = DateTime)]
    pub at: String,
}

impl VendorAnswer {
    /// A vendor as written: no proxy has loaded this configuration yet.
    pub fn written(v: &Vendor) -> Self {
        Self::with_errors(v, Vec::new(), Vec::new())
    }

    /// A vendor as written, with its credential versions.
    pub fn written_with_versions(v: &Vendor, versions: &[crate::service::CredentialView]) -> Self {
        let credentials = versions
            .iter()
            .map(crate::rest::CredentialAnswer::from)
            .collect();
        Self::with_errors(v, Vec::new(), credentials)
    }

    pub fn view(view: &VendorView) -> Self {
        let errors = view
            .proxy_errors
            .iter()
            .map(|e| ProxyErrorAnswer {
                node_id: e.node_id.clone(),
                error: e.error.clone(),
                at: rfc3339(e.at),
            })
            .collect();
        let credentials = view
            .credentials
            .iter()
            .map(crate::rest::CredentialAnswer::from)
            .collect();
        Self::with_errors(&view.vendor, errors, credentials)
    }

    fn with_errors(
        v: &Vendor,
        proxy_errors: Vec<ProxyErrorAnswer>,
        credentials: Vec<crate::rest::CredentialAnswer>,
    ) -> Self {
        let overdue = v.rotation_overdue(Utc::now());
        VendorAnswer {
            name: v.name.as_str().to_string(),
            profile: v.profile.as_str().to_string(),
            base_url: v.base_url.clone(),
            currency_rates: v.currency_rates.clone(),
            prices: serde_json::from_str::<Value>(&v.prices)
                .ok()
                .filter(|p| !p.is_null()),
            forward_trace_context: v.forward_trace_context,
            credential_set_at: Some(rfc3339(v.credential_set_at)),
            rotate_after_seconds: v.rotate_after.map(|d| d.num_seconds()),
            rotation_overdue: overdue,
            rotation_due: overdue,
            credential_version: credentials
                .iter()
                .find(|c: &&crate::rest::CredentialAnswer| c.state == "active")
                .map(|c| c.version),
            credentials,
            created_at: rfc3339(v.created_at),
            updated_at: rfc3339(v.updated_at),
            proxy_errors,
        }
    }
}

/// A written vendor and which proxies confirmed serving the change.
#[derive(Serialize, ToSchema)]
pub struct PutVendorAnswer {
    #[serde(flatten)]
    pub vendor: VendorAnswer,
    pub confirmation: ConfirmationAnswer,
}

#[derive(Serialize, ToSchema)]
pub struct VendorList {
    pub vendors: Vec<VendorAnswer>,
}

#[derive(Serialize, ToSchema)]
pub struct DeletedVendor {
    /// The deleted vendor's name.
    pub deleted: String,
    pub confirmation: ConfirmationAnswer,
}

/// Which proxies confirmed a change (see docs/fleet.md).
#[derive(Serialize, ToSchema)]
pub struct ConfirmationAnswer {
    /// The change log version of the change.
    pub version: i64,
    /// Every proxy that had to confirm did so in time.
    pub all_confirmed: bool,
    pub confirmed_nodes: Vec<String>,
    pub unconfirmed_nodes: Vec<String>,
    /// For a revocation: the most the unconfirmed proxies can still spend
    /// with the revoked keys, from the leases they hold.
    pub unconfirmed_lease_usd: Usd,
}

impl From<&Confirmation> for ConfirmationAnswer {
    fn from(c: &Confirmation) -> Self {
        ConfirmationAnswer {
            version: c.version,
            all_confirmed: c.unconfirmed.is_empty(),
            confirmed_nodes: c.confirmed.clone(),
            unconfirmed_nodes: c.unconfirmed.clone(),
            unconfirmed_lease_usd: Usd(c.unconfirmed_lease),
        }
    }
}

/// A price import's outcome: what was priced, skipped and left out.
#[derive(Serialize, ToSchema)]
pub struct ImportReportAnswer {
    pub vendor: String,
    pub as_of: String,
    /// Entries of this vendor in the file.
    pub entries: usize,
    pub models: Vec<String>,
    pub embeddings: Vec<String>,
    pub images: Vec<String>,
    /// Entries not in the table, each with the reason.
    pub skipped: Vec<SkippedEntry>,
    /// Kinds of price present in the file that the table leaves out.
    pub unused_prices: Vec<UnusedPriceAnswer>,
}

#[derive(Serialize, ToSchema)]
pub struct SkippedEntry {
    pub name: String,
    pub reason: String,
}

#[derive(Serialize, ToSchema)]
pub struct UnusedPriceAnswer {
    pub kind: String,
    pub reason: String,
    /// How many of the priced entries carried such prices.
    pub entries: usize,
}

impl From<litellm::ImportReport> for ImportReportAnswer {
    fn from(r: litellm::ImportReport) -> Self {
        ImportReportAnswer {
            vendor: r.vendor,
            as_of: r.as_of,
            entries: r.entries,
            models: r.models,
            embeddings: r.embeddings,
            images: r.images,
            skipped: r
                .skipped
                .into_iter()
                .map(|s| SkippedEntry {
                    name: s.name,
                    reason: s.reason,
                })
                .collect(),
            unused_prices: r
                .unused_prices
                .into_iter()
                .map(|u| UnusedPriceAnswer {
                    kind: u.kind,
                    reason: u.reason,
                    entries: u.entries,
                })
                .collect(),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct ImportAnswer {
    pub vendor: VendorAnswer,
    pub report: ImportReportAnswer,
}

/// `active`, `expired` or `revoked`: the one spelling of REST, the CLI and
/// the SDKs.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StatusName {
    Active,
    Expired,
    Revoked,
}

impl From<domain::KeyStatus> for StatusName {
    fn from(s: domain::KeyStatus) -> Self {
        match s {
            domain::KeyStatus::Active => StatusName::Active,
            domain::KeyStatus::Expired => StatusName::Expired,
            domain::KeyStatus::Revoked => StatusName::Revoked,
        }
    }
}

/// A vault key with today's spend. Its secret is only in the answer that
/// minted it (`CreatedKeyAnswer`).
#[derive(Serialize, ToSchema)]
pub struct KeyAnswer {
    pub id: String,
    /// The first characters of the secret, to recognise it.
    pub key_prefix: String,
    pub vendor: String,
    pub status: StatusName,
    /// `METHOD /path` patterns with `*` globs.
    pub allowed_endpoints: Vec<String>,
    pub daily_usd_cap: Usd,
    pub daily_cap_micros: i64,
    pub per_call_usd_cap: Option<Usd>,
    pub lifetime_usd_cap: Option<Usd>,
    pub spent_today_usd: Usd,
    pub spent_today_micros: i64,
    pub remaining_today_usd: Usd,
    pub remaining_today_micros: i64,
    pub calls_today: i64,
    pub spent_lifetime_usd: Usd,
    #[schema(format = DateTime)]
    pub expires_at: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub revoked_at: Option<String>,
    pub agent_run_label: String,
    pub metadata: BTreeMap<String, String>,
    /// Null: no limit.
    pub rate_limit_per_minute: Option<u32>,
    pub allowed_cidrs: Vec<String>,
    pub zone: Option<String>,
    /// The key whose caps this one also draws on; null for a root key.
    pub parent_id: Option<String>,
    /// Calls reserving more than this need a person's approval
    /// (docs/approvals.md); the lowest along the key's ancestors. Null: no
    /// gate.
    pub approval_above_usd: Option<Usd>,
    /// `enforce`, or `observe` (docs/observe.md): then the caps, endpoints
    /// and rate limit above only mark the calls they would refuse, and
    /// `observe_ceiling_usd` is what the key may spend a day.
    pub mode: &'static str,
    /// Observe mode's hard daily ceiling; null when enforcing.
    pub observe_ceiling_usd: Option<Usd>,
    /// The key this one succeeded in a roll; null if none.
    pub rolled_from: Option<String>,
    /// The key that succeeded this one; null until it is rolled.
    pub successor: Option<String>,
    /// When this rolled key's grace ends and it is revoked; null if not
    /// rolled.
    #[schema(format = DateTime)]
    pub grace_ends_at: Option<String>,
    /// The budget this key spends: its roll chain's first key (its own id
    /// if it was never rolled into).
    pub budget_id: String,
}

impl From<&KeyView> for KeyAnswer {
    fn from(v: &KeyView) -> Self {
        let k = &v.key;
        KeyAnswer {
            id: k.id.clone(),
            key_prefix: k.key_prefix.clone(),
            vendor: k.vendor.as_str().to_string(),
            status: v.status.into(),
            allowed_endpoints: k.allowed_endpoints.clone(),
            daily_usd_cap: Usd(k.daily_cap),
            daily_cap_micros: k.daily_cap.0,
            per_call_usd_cap: k.per_call_cap.map(Usd),
            lifetime_usd_cap: k.lifetime_cap.map(Usd),
            spent_today_usd: Usd(v.spend.spent_day),
            spent_today_micros: v.spend.spent_day.0,
            remaining_today_usd: Usd(v.remaining_today),
            remaining_today_micros: v.remaining_today.0,
            calls_today: v.spend.calls_day,
            spent_lifetime_usd: Usd(v.spend.spent_lifetime),
            expires_at: rfc3339(k.expires_at),
            created_at: rfc3339(k.created_at),
            revoked_at: k.revoked_at.map(rfc3339),
            agent_run_label: k.agent_run_label.clone(),
            metadata: k.metadata.clone(),
            rate_limit_per_minute: k.limits.rate_limit_per_minute,
            allowed_cidrs: k.limits.cidr_strings(),
            zone: k.limits.zone.clone(),
            parent_id: k.parent_id.clone(),
            approval_above_usd: k.approval_above.map(Usd),
            mode: k.mode(),
            observe_ceiling_usd: k.observe_ceiling.map(Usd),
            rolled_from: k.roll.rolled_from.clone(),
            successor: k.roll.successor_id.clone(),
            grace_ends_at: k.roll.retire_at.map(rfc3339),
            budget_id: k.budget_id().to_string(),
        }
    }
}

/// A minted key, with its secret: shown this once.
#[derive(Serialize, ToSchema)]
pub struct CreatedKeyAnswer {
    #[serde(flatten)]
    pub info: KeyAnswer,
    /// The vault key (`kc_<env>_...`): the agent's credential.
    pub key: String,
    pub confirmation: ConfirmationAnswer,
}

/// A roll: the successor with its secret (shown this once), answered like a
/// creation, and the rolled key with its grace deadline.
#[derive(Serialize, ToSchema)]
pub struct RolledKeyAnswer {
    #[serde(flatten)]
    pub info: KeyAnswer,
    /// The successor's vault key (`kc_<env>_...`).
    pub key: String,
    /// Which proxies serve the successor.
    pub confirmation: ConfirmationAnswer,
    /// The rolled key: `successor` and `grace_ends_at` set.
    pub rolled: KeyAnswer,
}

/// A revoked key and which proxies confirmed they stopped serving it.
#[derive(Serialize, ToSchema)]
pub struct RevokedKeyAnswer {
    #[serde(flatten)]
    pub info: KeyAnswer,
    pub confirmation: ConfirmationAnswer,
}

/// A key switched from observe mode to enforcing, and which proxies
/// confirmed they enforce it.
#[derive(Serialize, ToSchema)]
pub struct EnforcedKeyAnswer {
    #[serde(flatten)]
    pub info: KeyAnswer,
    pub confirmation: ConfirmationAnswer,
}

#[derive(Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyAnswer>,
}

#[derive(Serialize, ToSchema)]
pub struct RunRevocationAnswer {
    pub agent_run_label: String,
    /// How many keys were revoked.
    pub revoked: usize,
    pub revoked_ids: Vec<String>,
    pub confirmation: ConfirmationAnswer,
}

/// An admin token. Its secret is only in the answer that minted it.
#[derive(Serialize, ToSchema)]
pub struct AdminTokenAnswer {
    pub id: String,
    pub name: String,
    pub token_prefix: String,
    pub scopes: Vec<String>,
    /// The vendors it may act on; null: every vendor.
    pub vendors: Option<Vec<String>>,
    pub status: StatusName,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    #[schema(format = DateTime)]
    pub revoked_at: Option<String>,
}

impl From<&domain::AdminToken> for AdminTokenAnswer {
    fn from(t: &domain::AdminToken) -> Self {
        AdminTokenAnswer {
            id: t.id.clone(),
            name: t.name.clone(),
            token_prefix: t.token_prefix.clone(),
            scopes: t.scopes.names().into_iter().map(str::to_string).collect(),
            vendors: t.vendors.list(),
            status: t.status(Utc::now()).into(),
            created_at: rfc3339(t.created_at),
            expires_at: t.expires_at.map(rfc3339),
            revoked_at: t.revoked_at.map(rfc3339),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct CreatedAdminTokenAnswer {
    #[serde(flatten)]
    pub info: AdminTokenAnswer,
    /// The admin token (`kcadm_...`), shown this once.
    pub token: String,
}

#[derive(Serialize, ToSchema)]
pub struct AdminTokenList {
    pub admin_tokens: Vec<AdminTokenAnswer>,
}

/// An issuer token: mints child keys of one key. Its secret is only in the
/// answer that minted it.
#[derive(Serialize, ToSchema)]
pub struct IssuerTokenAnswer {
    pub id: String,
    pub key_id: String,
    pub name: String,
    pub token_prefix: String,
    pub status: StatusName,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub expires_at: Option<String>,
    #[schema(format = DateTime)]
    pub revoked_at: Option<String>,
}

impl From<&domain::IssuerToken> for IssuerTokenAnswer {
    fn from(t: &domain::IssuerToken) -> Self {
        IssuerTokenAnswer {
            id: t.id.clone(),
            key_id: t.key_id.clone(),
            name: t.name.clone(),
            token_prefix: t.token_prefix.clone(),
            status: t.status(Utc::now()).into(),
            created_at: rfc3339(t.created_at),
            expires_at: t.expires_at.map(rfc3339),
            revoked_at: t.revoked_at.map(rfc3339),
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct CreatedIssuerTokenAnswer {
    #[serde(flatten)]
    pub info: IssuerTokenAnswer,
    /// The issuer token (`kciss_...`), shown this once.
    pub token: String,
}

#[derive(Serialize, ToSchema)]
pub struct IssuerTokenList {
    pub issuer_tokens: Vec<IssuerTokenAnswer>,
}

/// What an agent run spent, in total and per vendor.
#[derive(Serialize, ToSchema)]
pub struct SpendAnswer {
    pub agent_run_label: String,
    pub total_usd: Usd,
    pub total_micros: i64,
    pub calls: i64,
    pub vendors: Vec<VendorSpendAnswer>,
}

#[derive(Serialize, ToSchema)]
pub struct VendorSpendAnswer {
    pub vendor: String,
    pub total_usd: Usd,
    pub total_micros: i64,
    pub calls: i64,
}

/// A spend report: spend, forwarded calls and refused calls, grouped.
#[derive(Serialize, ToSchema)]
pub struct SpendReportAnswer {
    /// The dimensions grouped by: `run_label`, `key`, `vendor`, `day`.
    pub group_by: Vec<&'static str>,
    #[schema(format = DateTime)]
    pub from: Option<String>,
    #[schema(format = DateTime)]
    pub to: Option<String>,
    /// Largest spend first.
    pub groups: Vec<SpendGroupAnswer>,
    /// Over every entry asked about, not only the groups shown.
    pub total_usd: Usd,
    pub total_micros: i64,
    pub calls: i64,
    pub refused_calls: i64,
    /// Groups beyond `top` were left out.
    pub more: bool,
    /// Forwarded calls of keys in observe mode that enforcement would have
    /// refused (docs/observe.md), and what they spent.
    pub would_refuse_calls: i64,
    pub would_refuse_usd: Usd,
}

/// One group of a spend report: the dimensions grouped by, and what they
/// spent.
#[derive(Serialize, ToSchema)]
pub struct SpendGroupAnswer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_run_label: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vendor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<String>,
    pub total_usd: Usd,
    pub total_micros: i64,
    pub calls: i64,
    pub refused_calls: i64,
    /// Calls of keys in observe mode enforcement would have refused, and
    /// what they spent.
    pub would_refuse_calls: i64,
    pub would_refuse_usd: Usd,
}

/// `GET /vault/spend`: a run's summary, or a report.
#[derive(Serialize, ToSchema)]
#[serde(untagged)]
pub enum SpendResult {
    Summary(SpendAnswer),
    Report(SpendReportAnswer),
}

/// One audit ledger entry: one call through a proxy.
#[derive(Serialize, ToSchema)]
pub struct AuditEntryAnswer {
    pub seq: i64,
    pub event_id: String,
    pub key_id: String,
    pub agent_run_label: String,
    pub vendor: String,
    pub method: String,
    pub path: String,
    pub upstream_status: i32,
    pub reserved_usd: Usd,
    pub reserved_micros: i64,
    pub cost_usd: Usd,
    pub cost_micros: i64,
    /// How the call ended (`settled`, `refused`, ...).
    pub outcome: String,
    #[schema(format = DateTime)]
    pub at: String,
    pub node_id: String,
    pub lease_id: String,
    /// The UTC day (YYYY-MM-DD) of the budget window the call was reserved in.
    pub day: String,
    /// What the proxy recorded about the call; null when nothing.
    #[schema(value_type = Option<Object>)]
    pub detail: Option<Value>,
    pub trace_id: String,
    pub context: BTreeMap<String, String>,
    /// For a refusal (outcome `refused`): the error code the calls got, and
    /// how many calls of the key in that minute the entry stands for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused_calls: Option<i64>,
    /// For a call forwarded under an approval (docs/approvals.md): its id,
    /// who decided it and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval: Option<AuditApprovalAnswer>,
    /// The vendor credential version the call was forwarded with
    /// (docs/rotation.md); null for a refusal or an entry written before
    /// versions.
    pub credential_version: Option<i64>,
    /// For a call of a key in observe mode that enforcement would have
    /// refused (docs/observe.md): the refusal code and the rule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_refuse: Option<WouldRefuseAnswer>,
    /// Hex SHA-256 of the entry before; null for entries written before the
    /// ledger was chained.
    pub prev_hash: Option<String>,
    pub hash: Option<String>,
}

impl From<&domain::AuditEntry> for AuditEntryAnswer {
    fn from(e: &domain::AuditEntry) -> Self {
        let ev = &e.event;
        let refused = ev.outcome == domain::Outcome::Refused;
        AuditEntryAnswer {
            seq: e.seq,
            event_id: ev.event_id.clone(),
            key_id: ev.key_id.clone(),
            agent_run_label: e.agent_run_label.clone(),
            vendor: ev.vendor.clone(),
            method: ev.method.clone(),
            path: ev.path.clone(),
            upstream_status: ev.upstream_status,
            reserved_usd: Usd(ev.reserved),
            reserved_micros: ev.reserved.0,
            cost_usd: Usd(ev.cost),
            cost_micros: ev.cost.0,
            outcome: ev.outcome.as_str().to_string(),
            at: ev.at.to_rfc3339_opts(SecondsFormat::Micros, true),
            node_id: ev.node_id.clone(),
            lease_id: ev.lease_id.clone(),
            day: ev.day.clone(),
            detail: serde_json::from_str::<Value>(&ev.detail_json)
                .ok()
                .filter(|d| !d.is_null()),
            trace_id: ev.trace_id.clone(),
            context: ev.context.clone(),
            refusal_reason: refused.then(|| ev.refusal_reason.clone()),
            refused_calls: refused.then_some(ev.refused_calls),
            approval: AuditApprovalAnswer::of(crate::approval::AuditApproval::of(&ev.detail_json)),
            credential_version: (ev.credential_version != 0).then_some(ev.credential_version),
            would_refuse: WouldRefuseAnswer::of(&ev.would_refuse),
            prev_hash: e.prev_hash.map(hex::encode),
            hash: e.hash.map(hex::encode),
        }
    }
}

/// What enforcement would have answered a call observe mode forwarded.
#[derive(Serialize, ToSchema)]
pub struct WouldRefuseAnswer {
    /// The refusal code (`endpoint_not_allowed`, `rate_limited`,
    /// `per_call_cap_exceeded`, `daily_cap_exceeded`,
    /// `lifetime_cap_exceeded`).
    pub code: String,
    /// The rule that would have fired (`allowed_endpoints`, `rate_limit`,
    /// `per_call_cap`, `daily_cap`, `lifetime_cap`).
    pub rule: String,
}

impl WouldRefuseAnswer {
    pub fn of(code: &str) -> Option<Self> {
        (!code.is_empty()).then(|| WouldRefuseAnswer {
            code: code.to_string(),
            rule: domain::would_refuse_rule(code)
                .unwrap_or_default()
                .to_string(),
        })
    }
}

/// The approval a forwarded call was made under.
#[derive(Serialize, ToSchema)]
pub struct AuditApprovalAnswer {
    /// `apr_...`
    pub id: String,
    /// The admin token that approved it, "<id> (<name>)".
    pub decided_by: String,
    pub reason: String,
}

impl AuditApprovalAnswer {
    fn of(a: crate::approval::AuditApproval) -> Option<Self> {
        (!a.id.is_empty()).then_some(AuditApprovalAnswer {
            id: a.id,
            decided_by: a.decided_by,
            reason: a.reason,
        })
    }
}

#[derive(Serialize, ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<AuditEntryAnswer>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Whether the audit ledger's hash chain holds.
#[derive(Serialize, ToSchema)]
pub struct VerifyAnswer {
    pub ok: bool,
    /// Chained entries whose hash was recomputed and matched.
    pub checked: u64,
    /// Entries written before the ledger was chained (counted, not checked).
    pub legacy: u64,
    pub head_seq: Option<i64>,
    pub head_hash: Option<String>,
    /// Null when the chain holds.
    pub broken: Option<BrokenAnswer>,
    /// The checkpoint the end was held against, if any.
    pub checkpoint_seq: Option<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct BrokenAnswer {
    pub seq: i64,
    /// A stable name for what is wrong (`hash_mismatch`, ...).
    pub reason: String,
    pub message: String,
}

/// A signed checkpoint of the ledger's head.
#[derive(Serialize, ToSchema)]
pub struct CheckpointAnswer {
    pub seq: i64,
    /// Hex SHA-256 of the entry at `seq`.
    pub hash: String,
    #[schema(format = DateTime)]
    pub at: String,
    /// Hex Ed25519 public key.
    pub public_key: String,
    /// Hex Ed25519 signature.
    pub signature: String,
}

#[derive(Serialize, ToSchema)]
pub struct CheckpointList {
    pub checkpoints: Vec<CheckpointAnswer>,
}

// --- from the gRPC messages (the CLI) -------------------------------------------
//
// The same shapes from what the admin gRPC API answers: a field the message
// leaves at its zero value ("" or 0) is what REST writes as null.

fn proto_time(t: &Option<prost_types::Timestamp>, precision: SecondsFormat) -> Option<String> {
    t.as_ref()
        .and_then(from_proto)
        .map(|t| t.to_rfc3339_opts(precision, true))
}

fn proto_secs(t: &Option<prost_types::Timestamp>) -> String {
    proto_time(t, SecondsFormat::Secs).unwrap_or_default()
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn non_zero(m: i64) -> Option<Usd> {
    (m != 0).then_some(Usd(Micros(m)))
}

fn hex_or_null(b: &[u8]) -> Option<String> {
    (!b.is_empty()).then(|| hex::encode(b))
}

impl From<i32> for StatusName {
    /// A `KeyStatus` of the gRPC API (an unknown value reads as revoked:
    /// never shown as usable).
    fn from(status: i32) -> Self {
        match pb::KeyStatus::try_from(status) {
            Ok(pb::KeyStatus::Active) => StatusName::Active,
            Ok(pb::KeyStatus::Expired) => StatusName::Expired,
            _ => StatusName::Revoked,
        }
    }
}

impl From<&pb::Vendor> for VendorAnswer {
    fn from(v: &pb::Vendor) -> Self {
        VendorAnswer {
            name: v.name.clone(),
            profile: v.profile.clone(),
            base_url: v.base_url.clone(),
            currency_rates: v.currency_rates.clone().into_iter().collect(),
            prices: serde_json::from_str::<Value>(&v.prices_json)
                .ok()
                .filter(|p| !p.is_null()),
            forward_trace_context: v.forward_trace_context,
            credential_set_at: proto_time(&v.credential_set_at, SecondsFormat::Secs),
            rotate_after_seconds: (v.rotate_after_seconds != 0).then_some(v.rotate_after_seconds),
            rotation_overdue: v.rotation_overdue,
            rotation_due: v.rotation_overdue,
            credential_version: (v.credential_version != 0).then_some(v.credential_version),
            credentials: v
                .credentials
                .iter()
                .map(crate::rest::CredentialAnswer::from)
                .collect(),
            created_at: proto_secs(&v.created_at),
            updated_at: proto_secs(&v.updated_at),
            proxy_errors: v
                .proxy_errors
                .iter()
                .map(|e| ProxyErrorAnswer {
                    node_id: e.node_id.clone(),
                    error: e.error.clone(),
                    at: proto_secs(&e.at),
                })
                .collect(),
        }
    }
}

impl From<&pb::FleetConfirmation> for ConfirmationAnswer {
    fn from(c: &pb::FleetConfirmation) -> Self {
        ConfirmationAnswer {
            version: c.version,
            all_confirmed: c.unconfirmed_nodes.is_empty(),
            confirmed_nodes: c.confirmed_nodes.clone(),
            unconfirmed_nodes: c.unconfirmed_nodes.clone(),
            unconfirmed_lease_usd: Usd(Micros(c.unconfirmed_lease_micros)),
        }
    }
}

impl From<&pb::VaultKey> for KeyAnswer {
    fn from(k: &pb::VaultKey) -> Self {
        KeyAnswer {
            id: k.id.clone(),
            key_prefix: k.key_prefix.clone(),
            vendor: k.vendor.clone(),
            status: k.status.into(),
            allowed_endpoints: k.allowed_endpoints.clone(),
            daily_usd_cap: Usd(Micros(k.daily_cap_micros)),
            daily_cap_micros: k.daily_cap_micros,
            per_call_usd_cap: non_zero(k.per_call_cap_micros),
            lifetime_usd_cap: non_zero(k.lifetime_cap_micros),
            spent_today_usd: Usd(Micros(k.spent_today_micros)),
            spent_today_micros: k.spent_today_micros,
            remaining_today_usd: Usd(Micros(k.remaining_today_micros)),
            remaining_today_micros: k.remaining_today_micros,
            calls_today: k.calls_today,
            spent_lifetime_usd: Usd(Micros(k.spent_lifetime_micros)),
            expires_at: proto_secs(&k.expires_at),
            created_at: proto_secs(&k.created_at),
            revoked_at: proto_time(&k.revoked_at, SecondsFormat::Secs),
            agent_run_label: k.agent_run_label.clone(),
            metadata: k.metadata.clone().into_iter().collect(),
            rate_limit_per_minute: (k.rate_limit_per_minute > 0).then_some(k.rate_limit_per_minute),
            allowed_cidrs: k.allowed_cidrs.clone(),
            zone: non_empty(&k.zone),
            parent_id: non_empty(&k.parent_id),
            approval_above_usd: (k.approval_above_micros != 0)
                .then_some(Usd(Micros(k.approval_above_micros))),
            mode: if k.mode == "observe" {
                "observe"
            } else {
                "enforce"
            },
            observe_ceiling_usd: (k.observe_ceiling_micros != 0)
                .then_some(Usd(Micros(k.observe_ceiling_micros))),
            rolled_from: non_empty(&k.rolled_from),
            successor: non_empty(&k.successor),
            grace_ends_at: proto_time(&k.grace_ends_at, SecondsFormat::Secs),
            budget_id: if k.budget_id.is_empty() {
                k.id.clone()
            } else {
                k.budget_id.clone()
            },
        }
    }
}

impl From<&pb::AdminToken> for AdminTokenAnswer {
    fn from(t: &pb::AdminToken) -> Self {
        AdminTokenAnswer {
            id: t.id.clone(),
            name: t.name.clone(),
            token_prefix: t.token_prefix.clone(),
            scopes: t.scopes.clone(),
            vendors: (!t.vendors.is_empty()).then(|| t.vendors.clone()),
            status: t.status.into(),
            created_at: proto_secs(&t.created_at),
            expires_at: proto_time(&t.expires_at, SecondsFormat::Secs),
            revoked_at: proto_time(&t.revoked_at, SecondsFormat::Secs),
        }
    }
}

impl From<&pb::IssuerToken> for IssuerTokenAnswer {
    fn from(t: &pb::IssuerToken) -> Self {
        IssuerTokenAnswer {
            id: t.id.clone(),
            key_id: t.key_id.clone(),
            name: t.name.clone(),
            token_prefix: t.token_prefix.clone(),
            status: t.status.into(),
            created_at: proto_secs(&t.created_at),
            expires_at: proto_time(&t.expires_at, SecondsFormat::Secs),
            revoked_at: proto_time(&t.revoked_at, SecondsFormat::Secs),
        }
    }
}

impl From<&pb::SpendSummaryResponse> for SpendAnswer {
    fn from(s: &pb::SpendSummaryResponse) -> Self {
        SpendAnswer {
            agent_run_label: s.agent_run_label.clone(),
            total_usd: Usd(Micros(s.total_micros)),
            total_micros: s.total_micros,
            calls: s.calls,
            vendors: s
                .vendors
                .iter()
                .map(|v| VendorSpendAnswer {
                    vendor: v.vendor.clone(),
                    total_usd: Usd(Micros(v.total_micros)),
                    total_micros: v.total_micros,
                    calls: v.calls,
                })
                .collect(),
        }
    }
}

impl SpendReportAnswer {
    /// The report as REST answers it, from the gRPC answer and the bounds
    /// asked for.
    pub fn from_pb(
        r: &pb::SpendReportResponse,
        (from, to): &(Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    ) -> Self {
        let time =
            |t: &Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(SecondsFormat::Micros, true));
        let by = |dim: &str, value: &str| {
            r.group_by
                .iter()
                .any(|g| g == dim)
                .then(|| value.to_string())
        };
        SpendReportAnswer {
            group_by: r
                .group_by
                .iter()
                .filter_map(|g| domain::SpendDimension::parse(g).ok().map(|d| d.as_str()))
                .collect(),
            from: time(from),
            to: time(to),
            groups: r
                .groups
                .iter()
                .map(|g| SpendGroupAnswer {
                    agent_run_label: by("run_label", &g.agent_run_label),
                    key_id: by("key", &g.key_id),
                    vendor: by("vendor", &g.vendor),
                    day: by("day", &g.day),
                    total_usd: Usd(Micros(g.total_micros)),
                    total_micros: g.total_micros,
                    calls: g.calls,
                    refused_calls: g.refused_calls,
                    would_refuse_calls: g.would_refuse_calls,
                    would_refuse_usd: Usd(Micros(g.would_refuse_micros)),
                })
                .collect(),
            total_usd: Usd(Micros(r.total_micros)),
            total_micros: r.total_micros,
            calls: r.calls,
            refused_calls: r.refused_calls,
            more: r.more,
            would_refuse_calls: r.would_refuse_calls,
            would_refuse_usd: Usd(Micros(r.would_refuse_micros)),
        }
    }
}

impl From<&pb::AuditEntry> for AuditEntryAnswer {
    fn from(e: &pb::AuditEntry) -> Self {
        AuditEntryAnswer {
            seq: e.seq,
            event_id: e.event_id.clone(),
            key_id: e.key_id.clone(),
            agent_run_label: e.agent_run_label.clone(),
            vendor: e.vendor.clone(),
            method: e.method.clone(),
            path: e.path.clone(),
            upstream_status: e.upstream_status,
            reserved_usd: Usd(Micros(e.reserved_micros)),
            reserved_micros: e.reserved_micros,
            cost_usd: Usd(Micros(e.cost_micros)),
            cost_micros: e.cost_micros,
            outcome: e.outcome.clone(),
            at: proto_time(&e.at, SecondsFormat::Micros).unwrap_or_default(),
            node_id: e.node_id.clone(),
            lease_id: e.lease_id.clone(),
            day: e.day.clone(),
            detail: serde_json::from_str::<Value>(&e.detail_json)
                .ok()
                .filter(|d| !d.is_null()),
            trace_id: e.trace_id.clone(),
            context: e.context.clone().into_iter().collect(),
            refusal_reason: (e.outcome == "refused").then(|| e.refusal_reason.clone()),
            refused_calls: (e.outcome == "refused").then_some(e.refused_calls),
            approval: AuditApprovalAnswer::of(crate::approval::AuditApproval {
                id: e.approval_id.clone(),
                decided_by: e.approval_decided_by.clone(),
                reason: e.approval_reason.clone(),
            }),
            credential_version: (e.credential_version != 0).then_some(e.credential_version),
            would_refuse: WouldRefuseAnswer::of(&e.would_refuse),
            prev_hash: hex_or_null(&e.prev_hash),
            hash: hex_or_null(&e.hash),
        }
    }
}

impl From<&pb::QueryAuditResponse> for AuditPage {
    fn from(r: &pb::QueryAuditResponse) -> Self {
        AuditPage {
            entries: r.entries.iter().map(AuditEntryAnswer::from).collect(),
            next_cursor: non_empty(&r.next_page_token),
        }
    }
}

impl From<&pb::VerifyAuditResponse> for VerifyAnswer {
    fn from(r: &pb::VerifyAuditResponse) -> Self {
        let head = !r.head_hash.is_empty();
        VerifyAnswer {
            ok: r.ok,
            checked: r.checked.max(0) as u64,
            legacy: r.legacy.max(0) as u64,
            head_seq: head.then_some(r.head_seq),
            head_hash: hex_or_null(&r.head_hash),
            broken: (!r.ok).then(|| BrokenAnswer {
                seq: r.broken_seq,
                reason: r.broken_reason.clone(),
                message: r.broken_message.clone(),
            }),
            checkpoint_seq: (r.checkpoint_seq != 0).then_some(r.checkpoint_seq),
        }
    }
}

impl From<&pb::Checkpoint> for CheckpointAnswer {
    fn from(cp: &pb::Checkpoint) -> Self {
        CheckpointAnswer {
            seq: cp.seq,
            hash: hex::encode(&cp.hash),
            at: proto_time(&cp.at, SecondsFormat::Micros).unwrap_or_default(),
            public_key: hex::encode(&cp.public_key),
            signature: hex::encode(&cp.signature),
        }
    }
}
