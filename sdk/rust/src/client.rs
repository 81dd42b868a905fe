//! The typed surface over the raw gRPC clients: the operations of the
//! Python and TypeScript SDKs (vendors, keys, issuer tokens, audit, spend),
//! with every failure an [`Error`] carrying keycap's stable code. It checks
//! no rule of the server's itself; answers are the protobuf messages of
//! `keycap_proto::pb`, money in integer micro-dollars ([`Micros`]).

use std::path::Path;
use std::time::Duration;

use keycap_proto::pb;
use keycap_proto::Micros;
use tonic::{Code, Status};

use crate::{AdminClient, ConnectError};

/// Audit entries fetched per call while `audit_query` walks the pages.
const AUDIT_PAGE_SIZE: i32 = 500;

/// A failed operation. `code()` is keycap's stable code, the `error` of its
/// REST bodies (`invalid_request`, `not_found`, `unauthenticated`, ...).
/// The admin token never appears in it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The control plane refused the call.
    #[error("{code}: {message}")]
    Api {
        code: String,
        message: String,
        /// The input an `invalid_request` is about.
        field: Option<String>,
    },
    /// The control plane could not be reached or did not answer.
    #[error("unavailable: the control plane at {addr} is unreachable")]
    Unavailable { addr: String },
}

impl Error {
    pub fn code(&self) -> &str {
        match self {
            Error::Connect(_) | Error::Unavailable { .. } => "unavailable",
            Error::Api { code, .. } => code,
        }
    }

    /// The input field the server named, for `invalid_request`.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::Api { field, .. } => field.as_deref(),
            _ => None,
        }
    }

    fn from_status(s: Status, addr: &str) -> Error {
        let text = |name: &str| {
            s.metadata()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if let Some(code) = text("keycap-error") {
            return Error::Api {
                code,
                message: s.message().to_string(),
                field: text("keycap-field"),
            };
        }
        let code = match s.code() {
            Code::Unavailable | Code::DeadlineExceeded => {
                return Error::Unavailable {
                    addr: addr.to_string(),
                }
            }
            Code::InvalidArgument => "invalid_request",
            Code::NotFound => "not_found",
            Code::FailedPrecondition | Code::AlreadyExists => "conflict",
            Code::Unauthenticated => "unauthenticated",
            Code::PermissionDenied => "permission_denied",
            _ => "internal",
        };
        Error::Api {
            code: code.to_string(),
            message: s.message().to_string(),
            field: None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A vault key to mint. Caps are integer micro-dollars.
#[derive(Clone, Debug, Default)]
pub struct NewKey {
    pub vendor: String,
    pub daily_usd_cap: Micros,
    pub allowed_endpoints: Vec<String>,
    pub expires_in: Duration,
    pub agent_run_label: String,
    pub per_call_usd_cap: Option<Micros>,
    pub lifetime_usd_cap: Option<Micros>,
    pub rate_limit_per_minute: Option<u32>,
    pub allowed_cidrs: Vec<String>,
    pub zone: Option<String>,
    pub parent_id: Option<String>,
    /// Calls reserving more than this need a person's approval
    /// (docs/approvals.md).
    pub approval_above_usd: Option<Micros>,
    /// Set: mint the key in observe mode (docs/observe.md) with this hard
    /// daily ceiling; its caps, endpoints and rate limit then only mark the
    /// calls they would refuse.
    pub observe_ceiling_usd: Option<Micros>,
}

/// What a key in observe mode enforces once switched; each part left
/// `None` (or empty) keeps the key's own.
#[derive(Clone, Debug, Default)]
pub struct Enforce {
    pub daily_usd_cap: Option<Micros>,
    pub per_call_usd_cap: Option<Micros>,
    pub lifetime_usd_cap: Option<Micros>,
    pub allowed_endpoints: Vec<String>,
}

/// A newly minted key: `key` is its secret, shown this once and kept out of
/// the `Debug` output.
#[derive(Clone)]
pub struct CreatedKey {
    pub key: String,
    pub info: pb::VaultKey,
    pub confirmation: Option<pb::FleetConfirmation>,
}

impl CreatedKey {
    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// The base URL an official vendor SDK takes to call this key's vendor
    /// through the proxy at `proxy` (see [`base_url`]).
    pub fn base_url(&self, proxy: &str, sdk: &str) -> String {
        base_url(proxy, &self.info.vendor, sdk)
    }
}

impl std::fmt::Debug for CreatedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreatedKey")
            .field("key", &"<secret>")
            .field("info", &self.info)
            .field("confirmation", &self.confirmation)
            .finish()
    }
}

/// `{proxy}/{vendor}/v1` for the OpenAI SDKs (they expect the version in
/// the base URL), `{proxy}/{vendor}` for the others.
pub fn base_url(proxy: &str, vendor: &str, sdk: &str) -> String {
    let root = format!("{}/{vendor}", proxy.trim_end_matches('/'));
    if sdk == "openai" {
        format!("{root}/v1")
    } else {
        root
    }
}

/// Which audit entries to read; empty fields match everything.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub key_id: String,
    pub agent_run_label: String,
    pub vendor: String,
    pub since: Option<prost_types::Timestamp>,
    pub until: Option<prost_types::Timestamp>,
    /// Only the entries of the call with this trace id.
    pub trace_id: String,
    /// `key=value`: only entries whose agent context has it.
    pub context: String,
    /// Only entries with this outcome (`refused`: the recorded refusals).
    pub outcome: String,
    /// Only refusals with this error code.
    pub refusal_reason: String,
}

/// keycap's admin API with typed errors.
#[derive(Clone)]
pub struct Client {
    raw: AdminClient,
    addr: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.addr).finish()
    }
}

impl Client {
    /// Connects to the control plane at `addr` (`http://` or `https://`),
    /// verifying https against the PEM CAs in `ca` or the system's roots.
    pub async fn connect(addr: &str, admin_token: &str, ca: Option<&Path>) -> Result<Client> {
        Ok(Client {
            raw: AdminClient::connect(addr, admin_token, ca).await?,
            addr: addr.to_string(),
        })
    }

    /// The raw gRPC clients, for calls this surface does not cover.
    pub fn raw(&mut self) -> &mut AdminClient {
        &mut self.raw
    }

    fn fail(&self) -> impl Fn(Status) -> Error + '_ {
        |s| Error::from_status(s, &self.addr)
    }

    pub async fn put_vendor(
        &mut self,
        name: &str,
        profile: &str,
        base_url: &str,
        credential: Option<&str>,
    ) -> Result<pb::PutVendorResponse> {
        let req = pb::PutVendorRequest {
            name: name.to_string(),
            profile: profile.to_string(),
            base_url: base_url.to_string(),
            credential: credential.unwrap_or_default().to_string(),
            ..Default::default()
        };
        let r = self.raw.vendors.put_vendor(req).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    pub async fn get_vendor(&mut self, name: &str) -> Result<pb::Vendor> {
        let req = pb::GetVendorRequest {
            name: name.to_string(),
        };
        let r = self.raw.vendors.get_vendor(req).await;
        Ok(r.map_err(self.fail())?
            .into_inner()
            .vendor
            .unwrap_or_default())
    }

    pub async fn list_vendors(&mut self) -> Result<Vec<pb::Vendor>> {
        let r = self
            .raw
            .vendors
            .list_vendors(pb::ListVendorsRequest {})
            .await;
        Ok(r.map_err(self.fail())?.into_inner().vendors)
    }

    pub async fn delete_vendor(&mut self, name: &str) -> Result<pb::FleetConfirmation> {
        let req = pb::DeleteVendorRequest {
            name: name.to_string(),
            ack_timeout_ms: 0,
        };
        let r = self.raw.vendors.delete_vendor(req).await;
        Ok(r.map_err(self.fail())?
            .into_inner()
            .confirmation
            .unwrap_or_default())
    }

    pub async fn create_key(&mut self, k: NewKey) -> Result<CreatedKey> {
        let req = pb::CreateKeyRequest {
            vendor: k.vendor,
            allowed_endpoints: k.allowed_endpoints,
            daily_cap_micros: k.daily_usd_cap.0,
            per_call_cap_micros: k.per_call_usd_cap.map_or(0, |m| m.0),
            lifetime_cap_micros: k.lifetime_usd_cap.map_or(0, |m| m.0),
            expires_in_seconds: i64::try_from(k.expires_in.as_secs()).unwrap_or(i64::MAX),
            agent_run_label: k.agent_run_label,
            rate_limit_per_minute: k.rate_limit_per_minute.unwrap_or(0),
            allowed_cidrs: k.allowed_cidrs,
            zone: k.zone.unwrap_or_default(),
            parent_id: k.parent_id.unwrap_or_default(),
            approval_above_micros: k.approval_above_usd.map_or(0, |m| m.0),
            mode: if k.observe_ceiling_usd.is_some() {
                "observe".into()
            } else {
                String::new()
            },
            observe_ceiling_micros: k.observe_ceiling_usd.map_or(0, |m| m.0),
            ..Default::default()
        };
        let r = self.raw.keys.create_key(req).await;
        let r = r.map_err(self.fail())?.into_inner();
        Ok(CreatedKey {
            key: r.secret,
            info: r.key.unwrap_or_default(),
            confirmation: r.confirmation,
        })
    }

    pub async fn get_key(&mut self, id: &str) -> Result<pb::VaultKey> {
        let req = pb::GetKeyRequest { id: id.to_string() };
        let r = self.raw.keys.get_key(req).await;
        Ok(r.map_err(self.fail())?.into_inner().key.unwrap_or_default())
    }

    pub async fn list_keys(
        &mut self,
        agent_run_label: &str,
        include_inactive: bool,
    ) -> Result<Vec<pb::VaultKey>> {
        let req = pb::ListKeysRequest {
            agent_run_label: agent_run_label.to_string(),
            vendor: String::new(),
            include_inactive,
        };
        let r = self.raw.keys.list_keys(req).await;
        Ok(r.map_err(self.fail())?.into_inner().keys)
    }

    /// Revokes a key; returns once the proxies confirmed (or the wait ended).
    pub async fn revoke_key(&mut self, id: &str) -> Result<pb::RevokeKeyResponse> {
        let req = pb::RevokeKeyRequest {
            id: id.to_string(),
            ack_timeout_ms: 0,
        };
        let r = self.raw.keys.revoke_key(req).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    /// Rolls a key: mints a successor with the same policy that spends the
    /// same budget; the key keeps working for `grace` ("10m", "90s"; empty:
    /// 10 minutes), then is revoked. The answer carries the successor's
    /// secret, shown only here. A key already rolled is refused with
    /// `key_already_rolled`.
    pub async fn roll_key(&mut self, id: &str, grace: &str) -> Result<pb::RollKeyResponse> {
        let req = pb::RollKeyRequest {
            id: id.to_string(),
            grace: grace.to_string(),
            ack_timeout_ms: 0,
        };
        let r = self.raw.keys.roll_key(req).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    /// Switches a key in observe mode to enforcing, in place (same id,
    /// secret and budget); answers once every connected proxy enforces it.
    pub async fn enforce_key(&mut self, id: &str, e: Enforce) -> Result<pb::EnforceKeyResponse> {
        let req = pb::EnforceKeyRequest {
            id: id.to_string(),
            daily_cap_micros: e.daily_usd_cap.map_or(0, |m| m.0),
            per_call_cap_micros: e.per_call_usd_cap.map_or(0, |m| m.0),
            lifetime_cap_micros: e.lifetime_usd_cap.map_or(0, |m| m.0),
            allowed_endpoints: e.allowed_endpoints,
            ack_timeout_ms: 0,
        };
        let r = self.raw.keys.enforce_key(req).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    /// Revokes every key of an agent run.
    pub async fn revoke_run(&mut self, agent_run_label: &str) -> Result<pb::RevokeRunResponse> {
        let req = pb::RevokeRunRequest {
            agent_run_label: agent_run_label.to_string(),
            ack_timeout_ms: 0,
        };
        let r = self.raw.keys.revoke_run(req).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    /// An issuer token for `key_id`: `(secret, token)`.
    pub async fn create_issuer_token(
        &mut self,
        key_id: &str,
        name: &str,
        expires_in: Duration,
    ) -> Result<(String, pb::IssuerToken)> {
        let req = pb::CreateIssuerTokenRequest {
            key_id: key_id.to_string(),
            name: name.to_string(),
            expires_in_seconds: i64::try_from(expires_in.as_secs()).unwrap_or(i64::MAX),
        };
        let r = self.raw.keys.create_issuer_token(req).await;
        let r = r.map_err(self.fail())?.into_inner();
        Ok((r.secret, r.token.unwrap_or_default()))
    }

    /// Every matching audit entry, newest first, over all pages.
    pub async fn audit_query(&mut self, filter: &AuditFilter) -> Result<Vec<pb::AuditEntry>> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = pb::QueryAuditRequest {
                key_id: filter.key_id.clone(),
                agent_run_label: filter.agent_run_label.clone(),
                vendor: filter.vendor.clone(),
                since: filter.since,
                until: filter.until,
                page_size: AUDIT_PAGE_SIZE,
                page_token,
                trace_id: filter.trace_id.clone(),
                context: filter.context.clone(),
                outcome: filter.outcome.clone(),
                refusal_reason: filter.refusal_reason.clone(),
            };
            let r = self.raw.audit.query_audit(req).await;
            let r = r.map_err(self.fail())?.into_inner();
            out.extend(r.entries);
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            page_token = r.next_page_token;
        }
    }

    /// What an agent run spent, in total and per vendor.
    pub async fn spend(&mut self, agent_run_label: &str) -> Result<pb::SpendSummaryResponse> {
        let req = pb::SpendSummaryRequest {
            agent_run_label: agent_run_label.to_string(),
        };
        let r = self.raw.audit.spend_summary(req).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    /// Recomputes the audit ledger's hash chain (from `from_seq`, trusting
    /// the hash stored before it) and holds its end against the latest
    /// checkpoint keycap signed and against `checkpoint`, one kept from
    /// earlier as `SEQ:HASH` (hash in hex).
    pub async fn verify_audit(
        &mut self,
        from_seq: Option<i64>,
        checkpoint: Option<&str>,
    ) -> Result<pb::VerifyAuditResponse> {
        let req = pb::VerifyAuditRequest {
            from_seq: from_seq.unwrap_or(0),
            checkpoint: checkpoint.unwrap_or_default().to_string(),
        };
        let r = self.raw.audit.verify_audit(req).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    /// The ledger's signed checkpoints, newest first (at most `limit`; 0:
    /// the server's default).
    pub async fn checkpoints(&mut self, limit: u32) -> Result<Vec<pb::Checkpoint>> {
        let req = pb::ListCheckpointsRequest {
            limit: i32::try_from(limit).unwrap_or(i32::MAX),
        };
        let r = self.raw.audit.list_checkpoints(req).await;
        Ok(r.map_err(self.fail())?.into_inner().checkpoints)
    }

    /// A key's issuer tokens.
    pub async fn list_issuer_tokens(
        &mut self,
        key_id: &str,
        include_inactive: bool,
    ) -> Result<Vec<pb::IssuerToken>> {
        let req = pb::ListIssuerTokensRequest {
            key_id: key_id.to_string(),
            include_inactive,
        };
        let r = self.raw.keys.list_issuer_tokens(req).await;
        Ok(r.map_err(self.fail())?.into_inner().tokens)
    }

    pub async fn revoke_issuer_token(&mut self, id: &str) -> Result<pb::IssuerToken> {
        let req = pb::RevokeIssuerTokenRequest { id: id.to_string() };
        let r = self.raw.keys.revoke_issuer_token(req).await;
        Ok(r.map_err(self.fail())?
            .into_inner()
            .token
            .unwrap_or_default())
    }

    /// An admin token with `scopes`, restricted to `vendors` unless empty,
    /// expiring after `expires_in` if given: `(secret, token)`.
    pub async fn create_admin_token(
        &mut self,
        name: &str,
        scopes: &[&str],
        vendors: &[&str],
        expires_in: Option<Duration>,
    ) -> Result<(String, pb::AdminToken)> {
        let req = pb::CreateAdminTokenRequest {
            name: name.to_string(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            vendors: vendors.iter().map(|v| v.to_string()).collect(),
            expires_in_seconds: expires_in
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        };
        let r = self.raw.admin_tokens.create_admin_token(req).await;
        let r = r.map_err(self.fail())?.into_inner();
        Ok((r.secret, r.token.unwrap_or_default()))
    }

    pub async fn list_admin_tokens(
        &mut self,
        include_inactive: bool,
    ) -> Result<Vec<pb::AdminToken>> {
        let req = pb::ListAdminTokensRequest { include_inactive };
        let r = self.raw.admin_tokens.list_admin_tokens(req).await;
        Ok(r.map_err(self.fail())?.into_inner().tokens)
    }

    pub async fn revoke_admin_token(&mut self, id: &str) -> Result<pb::AdminToken> {
        let req = pb::RevokeAdminTokenRequest { id: id.to_string() };
        let r = self.raw.admin_tokens.revoke_admin_token(req).await;
        Ok(r.map_err(self.fail())?
            .into_inner()
            .token
            .unwrap_or_default())
    }

    /// Replaces a vendor's prices with those of LiteLLM's price file (its
    /// JSON text as published).
    pub async fn import_vendor_prices(
        &mut self,
        name: &str,
        litellm_json: String,
    ) -> Result<pb::ImportVendorPricesResponse> {
        let req = pb::ImportVendorPricesRequest {
            name: name.to_string(),
            litellm_json,
        };
        let r = self.raw.vendors.import_vendor_prices(req).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    /// Calls held for approval, newest first: those in `state` ("pending",
    /// "approved", "denied", "expired", "used"; empty: all) of `key_id`
    /// (empty: every key). Needs `keys:read`.
    pub async fn list_approvals(&mut self, state: &str, key_id: &str) -> Result<Vec<pb::Approval>> {
        let req = pb::ListApprovalsRequest {
            state: state.to_string(),
            key_id: key_id.to_string(),
            limit: 0,
        };
        let r = self.raw.approvals.list_approvals(req).await;
        Ok(r.map_err(self.fail())?.into_inner().approvals)
    }

    pub async fn get_approval(&mut self, id: &str) -> Result<pb::Approval> {
        let req = pb::GetApprovalRequest { id: id.to_string() };
        let r = self.raw.approvals.get_approval(req).await;
        Ok(r.map_err(self.fail())?
            .into_inner()
            .approval
            .unwrap_or_default())
    }

    /// Approves a held call with a reason (needs `approvals:decide`); the
    /// agent's identical retry with `Keycap-Approval` is forwarded once.
    pub async fn approve(&mut self, id: &str, reason: &str) -> Result<pb::Approval> {
        let req = pb::DecideApprovalRequest {
            id: id.to_string(),
            reason: reason.to_string(),
        };
        let r = self.raw.approvals.approve_approval(req).await;
        Ok(r.map_err(self.fail())?
            .into_inner()
            .approval
            .unwrap_or_default())
    }

    /// Denies a held call with a reason (needs `approvals:decide`).
    pub async fn deny(&mut self, id: &str, reason: &str) -> Result<pb::Approval> {
        let req = pb::DecideApprovalRequest {
            id: id.to_string(),
            reason: reason.to_string(),
        };
        let r = self.raw.approvals.deny_approval(req).await;
        Ok(r.map_err(self.fail())?
            .into_inner()
            .approval
            .unwrap_or_default())
    }

    /// Re-wraps every vendor credential under the answering control
    /// plane's primary master key.
    pub async fn rotate_kek(&mut self) -> Result<pb::RotateKekResponse> {
        let r = self.raw.vendors.rotate_kek(pb::RotateKekRequest {}).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    /// Spend, calls and refused calls grouped by any of `run_label`,
    /// `key`, `vendor`, `day`, over a time range, top N (see
    /// `pb::SpendReportRequest`).
    pub async fn spend_report(
        &mut self,
        req: pb::SpendReportRequest,
    ) -> Result<pb::SpendReportResponse> {
        let r = self.raw.audit.spend_report(req).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    /// The ledger as JSON Lines or CSV, a page of records per message,
    /// streamed: take each with `message()` and write it as it comes.
    pub async fn export_audit(
        &mut self,
        req: pb::ExportAuditRequest,
    ) -> Result<tonic::Streaming<pb::ExportAuditChunk>> {
        let r = self.raw.audit.export_audit(req).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    /// What the proxy would do with one call of key `key_id` — allowed or
    /// the refusal code and rule, the price quote, what the key has left —
    /// without forwarding or reserving anything. `path` is the path as the
    /// vendor sees it (`/v1/payment_intents`).
    pub async fn simulate(
        &mut self,
        key_id: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Vec<u8>>,
    ) -> Result<pb::SimulateResponse> {
        let req = pb::SimulateRequest {
            key_id: key_id.to_string(),
            request: Some(pb::SimulatedCall {
                method: method.to_string(),
                path: path.to_string(),
                headers: headers
                    .iter()
                    .map(|(name, value)| pb::SimulatedHeader {
                        name: name.to_string(),
                        value: value.to_string(),
                    })
                    .collect(),
                body: body.into(),
            }),
        };
        let r = self.raw.simulate.simulate(req).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }

    /// An enforcing policy for key `key_id` drawn from its forwarded calls
    /// in the audit ledger (endpoint templates, caps from the observed
    /// maxima plus `margin_percent`, 25 when `None`).
    pub async fn suggest_policy(
        &mut self,
        key_id: &str,
        margin_percent: Option<u32>,
    ) -> Result<pb::SuggestPolicyResponse> {
        let req = pb::SuggestPolicyRequest {
            key_id: key_id.to_string(),
            margin_percent,
        };
        let r = self.raw.suggest.suggest_policy(req).await;
        Ok(r.map_err(self.fail())?.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    #[test]
    fn a_refusal_carries_keycaps_code_and_field() {
        let mut s = Status::invalid_argument("daily_cap_micros: must be greater than 0");
        s.metadata_mut().insert(
            "keycap-error",
            MetadataValue::from_static("invalid_request"),
        );
        s.metadata_mut().insert(
            "keycap-field",
            MetadataValue::from_static("daily_cap_micros"),
        );
        let e = Error::from_status(s, "http://127.0.0.1:1");
        assert_eq!(e.code(), "invalid_request");
        assert_eq!(e.field(), Some("daily_cap_micros"));
        assert_eq!(
            e.to_string(),
            "invalid_request: daily_cap_micros: must be greater than 0"
        );
    }

    #[test]
    fn a_transport_failure_names_the_address_only() {
        let e = Error::from_status(Status::unavailable("tcp connect error: ..."), "http://h:1");
        assert_eq!(e.code(), "unavailable");
        assert_eq!(
            e.to_string(),
            "unavailable: the control plane at http://h:1 is unreachable"
        );
    }

    #[test]
    fn base_urls_follow_each_sdks_convention() {
        assert_eq!(
            base_url("http://p:8080/", "openai", "openai"),
            "http://p:8080/openai/v1"
        );
        assert_eq!(
            base_url("http://p:8080", "claude", "anthropic"),
            "http://p:8080/claude"
        );
    }
}
