//! gRPC front end: admin services (vendors, keys and their issuer tokens, audit,
//! admin tokens) and the fleet
//! service proxies use. Converts wire messages into validated domain inputs
//! on receipt and domain values back into messages; all logic lives in
//! `service::Control`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use keycap_proto::pb;
use keycap_proto::prices::litellm;
use keycap_proto::time::{from_proto, opt_to_proto, to_proto};
use keycap_proto::Micros;
use tonic::{Request, Response, Status};

use crate::domain::{self, invalid, AuditQuery, KeyFilter, KeyStatus, LeaseGrantRequest, Vendor};
use crate::error::ApiError;
use crate::ledger;
use crate::scope::Operation;
use crate::service::{
    AdminPrincipal, Confirmation, Control, Delta, FleetVendor, KeyView, NewAdminToken,
    NewIssuerToken, NewKey, PutVendor, VendorView,
};
use crate::tls::{self, FleetIdentity, PeerCertificate};

mod approvals;
mod simulate;
mod suggest;
pub(crate) use simulate::answer_to_pb as simulate_answer_to_pb;
mod hooks;
pub(crate) use suggest::suggestion_to_pb;
mod credentials;
mod webhooks;

/// Implements every keycap gRPC service over one `Control`.
#[derive(Clone)]
pub struct Api {
    control: Arc<Control>,
    fleet_identity: FleetIdentity,
}

impl Api {
    pub fn new(control: Arc<Control>, fleet_identity: FleetIdentity) -> Self {
        Api {
            control,
            fleet_identity,
        }
    }

    /// Authenticates the admin token and checks the scopes `op` needs.
    async fn admin<T>(&self, req: &Request<T>, op: Operation) -> Result<AdminPrincipal, Status> {
        Ok(self.control.authorize(auth(req), op).await?)
    }

    /// Authenticates a fleet call made for `node_id`: the fleet token, and
    /// under mutual TLS a client certificate naming that node.
    fn fleet<T>(&self, req: &Request<T>, node_id: &str) -> Result<(), Status> {
        let auth = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.control.authenticate_fleet(auth)?;
        match self.fleet_identity {
            FleetIdentity::TokenOnly => Ok(()),
            FleetIdentity::ClientCertificate => {
                tls::check_node(req.extensions().get::<PeerCertificate>(), node_id)
            }
        }
    }
}

/// The request's `authorization` metadata, if it is text.
fn auth<T>(req: &Request<T>) -> Option<&str> {
    req.metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
}

pub fn vendor_view_to_pb(view: &VendorView) -> pb::Vendor {
    pb::Vendor {
        proxy_errors: view
            .proxy_errors
            .iter()
            .map(|e| pb::VendorProxyError {
                node_id: e.node_id.clone(),
                error: e.error.clone(),
                at: Some(to_proto(e.at)),
            })
            .collect(),
        credential_version: view
            .credentials
            .iter()
            .find(|c| c.credential.state == crate::credential::CredentialState::Active)
            .map_or(0, |c| c.credential.version),
        credentials: view
            .credentials
            .iter()
            .map(credentials::view_to_pb)
            .collect(),
        ..vendor_to_pb(&view.vendor)
    }
}

pub fn vendor_to_pb(v: &Vendor) -> pb::Vendor {
    pb::Vendor {
        name: v.name.to_string(),
        profile: v.profile.as_str().to_string(),
        base_url: v.base_url.clone(),
        currency_rates: v.currency_rates.clone().into_iter().collect(),
        prices_json: v.prices.clone(),
        forward_trace_context: v.forward_trace_context,
        created_at: Some(to_proto(v.created_at)),
        updated_at: Some(to_proto(v.updated_at)),
        // A vendor as written: no proxy has loaded it yet.
        proxy_errors: Vec::new(),
        rotate_after_seconds: v.rotate_after.map_or(0, |d| d.num_seconds()),
        credential_set_at: Some(to_proto(v.credential_set_at)),
        rotation_overdue: v.rotation_overdue(chrono::Utc::now()),
        // A vendor as written: its versions are read with it.
        credential_version: 0,
        credentials: Vec::new(),
    }
}

pub fn key_to_pb(v: &KeyView) -> pb::VaultKey {
    let k = &v.key;
    pb::VaultKey {
        id: k.id.clone(),
        key_prefix: k.key_prefix.clone(),
        vendor: k.vendor.to_string(),
        allowed_endpoints: k.allowed_endpoints.clone(),
        daily_cap_micros: k.daily_cap.0,
        per_call_cap_micros: k.per_call_cap.map_or(0, |c| c.0),
        lifetime_cap_micros: k.lifetime_cap.map_or(0, |c| c.0),
        expires_at: Some(to_proto(k.expires_at)),
        agent_run_label: k.agent_run_label.clone(),
        metadata: k.metadata.clone().into_iter().collect(),
        created_at: Some(to_proto(k.created_at)),
        revoked_at: opt_to_proto(k.revoked_at),
        status: status_to_pb(v.status) as i32,
        spent_today_micros: v.spend.spent_day.0,
        remaining_today_micros: v.remaining_today.0,
        spent_lifetime_micros: v.spend.spent_lifetime.0,
        calls_today: v.spend.calls_day,
        rate_limit_per_minute: k.limits.rate_limit_per_minute.unwrap_or(0),
        allowed_cidrs: k.limits.cidr_strings(),
        zone: k.limits.zone.clone().unwrap_or_default(),
        parent_id: k.parent_id.clone().unwrap_or_default(),
        approval_above_micros: k.approval_above.map_or(0, |c| c.0),
        mode: k.mode().to_string(),
        observe_ceiling_micros: k.observe_ceiling.map_or(0, |c| c.0),
        rolled_from: k.roll.rolled_from.clone().unwrap_or_default(),
        successor: k.roll.successor_id.clone().unwrap_or_default(),
        grace_ends_at: opt_to_proto(k.roll.retire_at),
        budget_id: k.budget_id().to_string(),
    }
}

fn entry_to_pb(e: &domain::AuditEntry) -> pb::AuditEntry {
    let ev = &e.event;
    let approval = crate::approval::AuditApproval::of(&ev.detail_json);
    pb::AuditEntry {
        seq: e.seq,
        event_id: ev.event_id.clone(),
        key_id: ev.key_id.clone(),
        agent_run_label: e.agent_run_label.clone(),
        vendor: ev.vendor.clone(),
        method: ev.method.clone(),
        path: ev.path.clone(),
        upstream_status: ev.upstream_status,
        reserved_micros: ev.reserved.0,
        cost_micros: ev.cost.0,
        outcome: ev.outcome.as_str().to_string(),
        at: Some(to_proto(ev.at)),
        node_id: ev.node_id.clone(),
        detail_json: ev.detail_json.clone(),
        lease_id: ev.lease_id.clone(),
        day: ev.day.clone(),
        trace_id: ev.trace_id.clone(),
        context: ev.context.clone().into_iter().collect(),
        prev_hash: e.prev_hash.map(|h| h.to_vec()).unwrap_or_default(),
        hash: e.hash.map(|h| h.to_vec()).unwrap_or_default(),
        refusal_reason: ev.refusal_reason.clone(),
        refused_calls: ev.refused_calls,
        approval_id: approval.id,
        approval_decided_by: approval.decided_by,
        approval_reason: approval.reason,
        credential_version: ev.credential_version,
        would_refuse: ev.would_refuse.clone(),
        would_refuse_rule: domain::would_refuse_rule(&ev.would_refuse)
            .unwrap_or_default()
            .to_string(),
    }
}

fn fleet_vendor_to_pb(v: &FleetVendor) -> pb::FleetVendor {
    pb::FleetVendor {
        name: v.vendor.name.to_string(),
        profile: v.vendor.profile.as_str().to_string(),
        base_url: v.vendor.base_url.clone(),
        credential: v.credential.clone(),
        credential_version: v.credential_version,
        currency_rates: v.vendor.currency_rates.clone().into_iter().collect(),
        prices_json: v.vendor.prices.clone(),
        allow_private_upstream: v.allow_private_upstream,
        forward_trace_context: v.vendor.forward_trace_context,
    }
}

fn fleet_key_to_pb(k: &domain::VaultKey) -> pb::FleetKey {
    pb::FleetKey {
        id: k.id.clone(),
        key_hash: k.key_hash.to_vec(),
        vendor: k.vendor.to_string(),
        allowed_endpoints: k.allowed_endpoints.clone(),
        daily_cap_micros: k.daily_cap.0,
        per_call_cap_micros: k.per_call_cap.map_or(0, |c| c.0),
        lifetime_cap_micros: k.lifetime_cap.map_or(0, |c| c.0),
        expires_at: Some(to_proto(k.expires_at)),
        agent_run_label: k.agent_run_label.clone(),
        revoked: k.revoked_at.is_some(),
        rate_limit_per_minute: k.limits.rate_limit_per_minute.unwrap_or(0),
        allowed_cidrs: k.limits.cidr_strings(),
        zone: k.limits.zone.clone().unwrap_or_default(),
        approval_above_micros: k.approval_above.map_or(0, |c| c.0),
        observe_ceiling_micros: k.observe_ceiling.map_or(0, |c| c.0),
        budget_id: k.budget_id().to_string(),
    }
}

fn confirmation_to_pb(c: Confirmation) -> pb::FleetConfirmation {
    pb::FleetConfirmation {
        version: c.version,
        confirmed_nodes: c.confirmed,
        unconfirmed_nodes: c.unconfirmed,
        unconfirmed_lease_micros: c.unconfirmed_lease.0,
    }
}

fn ack_timeout(ms: u32) -> Result<Option<Duration>, ApiError> {
    Ok(domain::parse_ack_timeout_ms(u64::from(ms))?)
}

fn opt_cap(v: i64) -> Option<Micros> {
    (v != 0).then_some(Micros(v))
}

impl TryFrom<pb::CreateKeyRequest> for NewKey {
    type Error = domain::InvalidInput;

    fn try_from(r: pb::CreateKeyRequest) -> Result<Self, Self::Error> {
        if r.expires_in_seconds <= 0 {
            return Err(invalid("expires_in_seconds", "must be positive"));
        }
        NewKey::new(
            &r.vendor,
            &r.allowed_endpoints,
            Micros(r.daily_cap_micros),
            opt_cap(r.per_call_cap_micros),
            opt_cap(r.lifetime_cap_micros),
            Duration::from_secs(r.expires_in_seconds as u64),
            &r.agent_run_label,
            r.metadata.into_iter().collect(),
            domain::KeyLimits::parse(
                i64::from(r.rate_limit_per_minute),
                &r.allowed_cidrs,
                &r.zone,
            )?,
            Some(r.parent_id.as_str()),
        )
        .and_then(|k| k.with_approval_above(opt_cap(r.approval_above_micros)))
        .and_then(|k| k.with_mode(&r.mode, opt_cap(r.observe_ceiling_micros)))
        .map_err(|mut e| {
            e.field = grpc_key_field(e.field);
            e
        })
    }
}

/// Validation speaks REST's field names; a gRPC caller should be told the
/// field it actually sent.
fn grpc_key_field(rest: &'static str) -> &'static str {
    match rest {
        "daily_usd_cap" => "daily_cap_micros",
        "per_call_usd_cap" => "per_call_cap_micros",
        "lifetime_usd_cap" => "lifetime_cap_micros",
        "expires_in" => "expires_in_seconds",
        "approval_above_usd" => "approval_above_micros",
        "observe_ceiling_usd" => "observe_ceiling_micros",
        other => other,
    }
}

impl TryFrom<pb::PutVendorRequest> for PutVendor {
    type Error = domain::InvalidInput;

    fn try_from(r: pb::PutVendorRequest) -> Result<Self, Self::Error> {
        PutVendor::new(
            &r.name,
            &r.profile,
            &r.base_url,
            Some(r.credential.as_str()),
            &r.currency_rates.into_iter().collect(),
            &r.prices_json,
        )?
        .with_rotate_after(&r.rotate_after)
        .map(|put| put.forwarding_trace_context(r.forward_trace_context))
    }
}

impl TryFrom<pb::QueryAuditRequest> for AuditQuery {
    type Error = domain::InvalidInput;

    fn try_from(r: pb::QueryAuditRequest) -> Result<Self, Self::Error> {
        let ts = |field, t: Option<prost_types::Timestamp>| {
            t.map(|t| from_proto(&t).ok_or_else(|| invalid(field, "out of range")))
                .transpose()
        };
        if !(0..=1000).contains(&r.page_size) {
            return Err(invalid("page_size", "must be between 1 and 1000"));
        }
        let before_seq = if r.page_token.is_empty() {
            None
        } else {
            Some(
                r.page_token
                    .parse::<i64>()
                    .map_err(|_| invalid("page_token", "not a token from a previous page"))?,
            )
        };
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        Ok(AuditQuery {
            key_id: nonempty(r.key_id),
            agent_run_label: nonempty(r.agent_run_label),
            vendor: nonempty(r.vendor),
            vendors: None,
            since: ts("since", r.since)?,
            until: ts("until", r.until)?,
            before_seq,
            trace_id: nonempty(r.trace_id)
                .map(|t| domain::parse_trace_filter(&t))
                .transpose()?,
            context: nonempty(r.context)
                .map(|c| domain::parse_context_filter(&c))
                .transpose()?,
            outcome: nonempty(r.outcome)
                .map(|o| domain::Outcome::parse(&o))
                .transpose()?,
            refusal_reason: nonempty(r.refusal_reason),
            limit: if r.page_size == 0 {
                100
            } else {
                r.page_size as u32
            },
        })
    }
}

impl TryFrom<pb::SpendReportRequest> for domain::SpendReportQuery {
    type Error = domain::InvalidInput;

    fn try_from(r: pb::SpendReportRequest) -> Result<Self, Self::Error> {
        let ts = |field, t: Option<prost_types::Timestamp>| {
            t.map(|t| from_proto(&t).ok_or_else(|| invalid(field, "out of range")))
                .transpose()
        };
        Ok(domain::SpendReportQuery {
            group_by: domain::SpendDimension::parse_list(r.group_by.iter().map(String::as_str))?,
            since: ts("from", r.from)?,
            until: ts("to", r.to)?,
            agent_run_label: (!r.agent_run_label.is_empty()).then_some(r.agent_run_label),
            vendors: None,
            top: u32::try_from(r.top).map_err(|_| invalid("top", "must be between 1 and 10000"))?,
        })
    }
}

pub fn spend_report_to_pb(
    group_by: &[domain::SpendDimension],
    r: domain::SpendReport,
) -> pb::SpendReportResponse {
    pb::SpendReportResponse {
        group_by: group_by.iter().map(|d| d.as_str().to_string()).collect(),
        groups: r
            .groups
            .into_iter()
            .map(|g| pb::SpendGroup {
                agent_run_label: g.agent_run_label.unwrap_or_default(),
                key_id: g.key_id.unwrap_or_default(),
                vendor: g.vendor.unwrap_or_default(),
                day: g.day.unwrap_or_default(),
                total_micros: g.total.0,
                calls: g.calls,
                refused_calls: g.refused_calls,
                would_refuse_calls: g.would_refuse_calls,
                would_refuse_micros: g.would_refuse.0,
            })
            .collect(),
        total_micros: r.total.0,
        calls: r.calls,
        refused_calls: r.refused_calls,
        more: r.more,
        would_refuse_calls: r.would_refuse_calls,
        would_refuse_micros: r.would_refuse.0,
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<pb::ExportAuditChunk, Status>> + Send>>;

/// The page token for the page after `entries` (empty when it was short).
pub fn next_page_token(entries: &[domain::AuditEntry], limit: u32) -> Option<i64> {
    (entries.len() as u32 >= limit)
        .then(|| entries.last().map(|e| e.seq))
        .flatten()
}

#[tonic::async_trait]
impl pb::vendor_service_server::VendorService for Api {
    async fn put_vendor(
        &self,
        req: Request<pb::PutVendorRequest>,
    ) -> Result<Response<pb::PutVendorResponse>, Status> {
        let caller = self.admin(&req, Operation::PutVendor).await?;
        let r = req.into_inner();
        let timeout = ack_timeout(r.ack_timeout_ms)?;
        let put = PutVendor::try_from(r).map_err(ApiError::from)?;
        caller.require(self.control.vendor_put_operation(&put).await?)?;
        let (v, created, confirmation) = self
            .control
            .put_vendor(&caller.vendors, put, timeout)
            .await?;
        // The vendor as written, with its credential versions as a read
        // shows them.
        let versions = self
            .control
            .list_credentials(&caller.vendors, v.name.as_str())
            .await?;
        Ok(Response::new(pb::PutVendorResponse {
            vendor: Some(pb::Vendor {
                credential_version: versions
                    .iter()
                    .find(|c| c.credential.state == crate::credential::CredentialState::Active)
                    .map_or(0, |c| c.credential.version),
                credentials: versions.iter().map(credentials::view_to_pb).collect(),
                ..vendor_to_pb(&v)
            }),
            created,
            confirmation: Some(confirmation_to_pb(confirmation)),
        }))
    }

    async fn get_vendor(
        &self,
        req: Request<pb::GetVendorRequest>,
    ) -> Result<Response<pb::GetVendorResponse>, Status> {
        let caller = self.admin(&req, Operation::GetVendor).await?;
        let v = self
            .control
            .get_vendor(&caller.vendors, &req.get_ref().name)
            .await?;
        Ok(Response::new(pb::GetVendorResponse {
            vendor: Some(vendor_view_to_pb(&v)),
        }))
    }

    async fn list_vendors(
        &self,
        req: Request<pb::ListVendorsRequest>,
    ) -> Result<Response<pb::ListVendorsResponse>, Status> {
        let caller = self.admin(&req, Operation::ListVendors).await?;
        let vs = self.control.list_vendors(&caller.vendors).await?;
        Ok(Response::new(pb::ListVendorsResponse {
            vendors: vs.iter().map(vendor_view_to_pb).collect(),
        }))
    }

    async fn delete_vendor(
        &self,
        req: Request<pb::DeleteVendorRequest>,
    ) -> Result<Response<pb::DeleteVendorResponse>, Status> {
        let caller = self.admin(&req, Operation::DeleteVendor).await?;
        let r = req.into_inner();
        let confirmation = self
            .control
            .delete_vendor(&caller.vendors, &r.name, ack_timeout(r.ack_timeout_ms)?)
            .await?;
        Ok(Response::new(pb::DeleteVendorResponse {
            confirmation: Some(confirmation_to_pb(confirmation)),
        }))
    }

    async fn rotate_kek(
        &self,
        req: Request<pb::RotateKekRequest>,
    ) -> Result<Response<pb::RotateKekResponse>, Status> {
        let caller = self.admin(&req, Operation::RotateKek).await?;
        // It touches every vendor's credential.
        caller.vendors.check_all()?;
        let r = self.control.rotate_kek().await?;
        Ok(Response::new(pb::RotateKekResponse {
            kek_id: r.kek_id,
            rewrapped: r.rewrapped,
            already_current: r.already_current,
            failed_vendors: r.failed_vendors,
        }))
    }

    async fn import_vendor_prices(
        &self,
        req: Request<pb::ImportVendorPricesRequest>,
    ) -> Result<Response<pb::ImportVendorPricesResponse>, Status> {
        let caller = self.admin(&req, Operation::ImportVendorPrices).await?;
        let r = req.get_ref();
        let (v, report) = self
            .control
            .import_vendor_prices(&caller.vendors, &r.name, &r.litellm_json)
            .await?;
        Ok(Response::new(pb::ImportVendorPricesResponse {
            vendor: Some(vendor_to_pb(&v)),
            report: Some(report_to_pb(report)),
        }))
    }
}

/// A price import's report on the wire.
fn report_to_pb(r: litellm::ImportReport) -> pb::PriceImportReport {
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    pb::PriceImportReport {
        as_of: r.as_of,
        entries: count(r.entries),
        models: r.models,
        embeddings: r.embeddings,
        images: r.images,
        skipped: r
            .skipped
            .into_iter()
            .map(|s| pb::SkippedPriceEntry {
                name: s.name,
                reason: s.reason,
            })
            .collect(),
        unused_prices: r
            .unused_prices
            .into_iter()
            .map(|u| pb::UnusedPrice {
                kind: u.kind,
                reason: u.reason,
                entries: count(u.entries),
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl pb::key_service_server::KeyService for Api {
    async fn create_key(
        &self,
        req: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let minter = self.control.authorize_mint(auth(&req)).await?;
        let r = req.into_inner();
        let timeout = ack_timeout(r.ack_timeout_ms)?;
        let new = NewKey::try_from(r).map_err(ApiError::from)?;
        // Checks against a parent key are made by the service, in REST's
        // field names too.
        let (view, secret, confirmation) = self
            .control
            .mint_key(&minter, new, timeout)
            .await
            .map_err(|e| match e {
                ApiError::Invalid(mut i) => {
                    i.field = grpc_key_field(i.field);
                    ApiError::Invalid(i)
                }
                other => other,
            })?;
        Ok(Response::new(pb::CreateKeyResponse {
            key: Some(key_to_pb(&view)),
            secret,
            confirmation: Some(confirmation_to_pb(confirmation)),
        }))
    }

    async fn create_issuer_token(
        &self,
        req: Request<pb::CreateIssuerTokenRequest>,
    ) -> Result<Response<pb::CreateIssuerTokenResponse>, Status> {
        let caller = self.admin(&req, Operation::CreateIssuerToken).await?;
        let r = req.into_inner();
        let expires_in = match r.expires_in_seconds {
            0 => None,
            s if s < 0 => {
                return Err(
                    ApiError::from(invalid("expires_in_seconds", "must not be negative")).into(),
                )
            }
            s => Some(Duration::from_secs(s as u64)),
        };
        let new = NewIssuerToken::new(&r.name, expires_in).map_err(ApiError::from)?;
        let (token, secret) = self
            .control
            .create_issuer_token(&caller, &r.key_id, new)
            .await
            .map_err(|e| match e {
                ApiError::Invalid(mut i) if i.field == "expires_in" => {
                    i.field = "expires_in_seconds";
                    ApiError::Invalid(i)
                }
                other => other,
            })?;
        Ok(Response::new(pb::CreateIssuerTokenResponse {
            token: Some(issuer_token_to_pb(&token)),
            secret,
        }))
    }

    async fn list_issuer_tokens(
        &self,
        req: Request<pb::ListIssuerTokensRequest>,
    ) -> Result<Response<pb::ListIssuerTokensResponse>, Status> {
        let caller = self.admin(&req, Operation::ListIssuerTokens).await?;
        let r = req.get_ref();
        let tokens = self
            .control
            .list_issuer_tokens(&caller, &r.key_id, r.include_inactive)
            .await?;
        Ok(Response::new(pb::ListIssuerTokensResponse {
            tokens: tokens.iter().map(issuer_token_to_pb).collect(),
        }))
    }

    async fn revoke_issuer_token(
        &self,
        req: Request<pb::RevokeIssuerTokenRequest>,
    ) -> Result<Response<pb::RevokeIssuerTokenResponse>, Status> {
        let caller = self.admin(&req, Operation::RevokeIssuerToken).await?;
        let token = self
            .control
            .revoke_issuer_token(&caller, &req.get_ref().id)
            .await?;
        Ok(Response::new(pb::RevokeIssuerTokenResponse {
            token: Some(issuer_token_to_pb(&token)),
        }))
    }

    async fn get_key(
        &self,
        req: Request<pb::GetKeyRequest>,
    ) -> Result<Response<pb::GetKeyResponse>, Status> {
        let caller = self.admin(&req, Operation::GetKey).await?;
        let v = self
            .control
            .get_key(&caller.vendors, &req.get_ref().id)
            .await?;
        Ok(Response::new(pb::GetKeyResponse {
            key: Some(key_to_pb(&v)),
        }))
    }

    async fn list_keys(
        &self,
        req: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let caller = self.admin(&req, Operation::ListKeys).await?;
        let r = req.into_inner();
        let filter = KeyFilter {
            agent_run_label: (!r.agent_run_label.is_empty()).then_some(r.agent_run_label),
            vendor: (!r.vendor.is_empty()).then_some(r.vendor),
            include_inactive: r.include_inactive,
        };
        let keys = self.control.list_keys(&caller.vendors, &filter).await?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: keys.iter().map(key_to_pb).collect(),
        }))
    }

    async fn revoke_key(
        &self,
        req: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::RevokeKeyResponse>, Status> {
        let caller = self.admin(&req, Operation::RevokeKey).await?;
        let r = req.into_inner();
        let (v, confirmation) = self
            .control
            .revoke_key(&caller.vendors, &r.id, ack_timeout(r.ack_timeout_ms)?)
            .await?;
        Ok(Response::new(pb::RevokeKeyResponse {
            key: Some(key_to_pb(&v)),
            confirmation: Some(confirmation_to_pb(confirmation)),
        }))
    }

    async fn roll_key(
        &self,
        req: Request<pb::RollKeyRequest>,
    ) -> Result<Response<pb::RollKeyResponse>, Status> {
        let caller = self.admin(&req, Operation::RollKey).await?;
        let r = req.into_inner();
        let grace = domain::roll::parse_grace(&r.grace).map_err(ApiError::from)?;
        let rolled = self
            .control
            .roll_key(
                &caller.vendors,
                &r.id,
                grace,
                ack_timeout(r.ack_timeout_ms)?,
            )
            .await?;
        Ok(Response::new(pb::RollKeyResponse {
            key: Some(key_to_pb(&rolled.successor)),
            secret: rolled.secret,
            confirmation: Some(confirmation_to_pb(rolled.confirmation)),
            rolled: Some(key_to_pb(&rolled.rolled)),
        }))
    }

    async fn enforce_key(
        &self,
        req: Request<pb::EnforceKeyRequest>,
    ) -> Result<Response<pb::EnforceKeyResponse>, Status> {
        let caller = self.admin(&req, Operation::EnforceKey).await?;
        let r = req.into_inner();
        let change = crate::service::EnforceChange::new(
            opt_cap(r.daily_cap_micros),
            opt_cap(r.per_call_cap_micros),
            opt_cap(r.lifetime_cap_micros),
            (!r.allowed_endpoints.is_empty()).then_some(r.allowed_endpoints.as_slice()),
        )
        .map_err(|mut e| {
            e.field = grpc_key_field(e.field);
            ApiError::from(e)
        })?;
        let (key, confirmation) = self
            .control
            .enforce_key(
                &caller.vendors,
                &r.id,
                &change,
                ack_timeout(r.ack_timeout_ms)?,
            )
            .await?;
        Ok(Response::new(pb::EnforceKeyResponse {
            key: Some(key_to_pb(&key)),
            confirmation: Some(confirmation_to_pb(confirmation)),
        }))
    }

    async fn revoke_run(
        &self,
        req: Request<pb::RevokeRunRequest>,
    ) -> Result<Response<pb::RevokeRunResponse>, Status> {
        let caller = self.admin(&req, Operation::RevokeRun).await?;
        let r = req.into_inner();
        let (ids, confirmation) = self
            .control
            .revoke_run(
                &caller.vendors,
                &r.agent_run_label,
                ack_timeout(r.ack_timeout_ms)?,
            )
            .await?;
        Ok(Response::new(pb::RevokeRunResponse {
            revoked_ids: ids,
            confirmation: Some(confirmation_to_pb(confirmation)),
        }))
    }
}

#[tonic::async_trait]
impl pb::audit_service_server::AuditService for Api {
    async fn query_audit(
        &self,
        req: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<pb::QueryAuditResponse>, Status> {
        let caller = self.admin(&req, Operation::QueryAudit).await?;
        let q = AuditQuery::try_from(req.into_inner()).map_err(ApiError::from)?;
        let entries = self.control.query_audit(&caller.vendors, &q).await?;
        Ok(Response::new(pb::QueryAuditResponse {
            next_page_token: next_page_token(&entries, q.limit)
                .map(|s| s.to_string())
                .unwrap_or_default(),
            entries: entries.iter().map(entry_to_pb).collect(),
        }))
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let caller = self.admin(&req, Operation::VerifyAudit).await?;
        let req = req.into_inner();
        let from = req.from_seq;
        let held = (!req.checkpoint.is_empty()).then_some(req.checkpoint.as_str());
        let v = self
            .control
            .verify_audit(&caller.vendors, (from != 0).then_some(from), held)
            .await?;
        let (head_seq, head_hash) = v.head.unwrap_or_default();
        Ok(Response::new(pb::VerifyAuditResponse {
            ok: v.ok(),
            checked: v.checked as i64,
            legacy: v.legacy as i64,
            head_seq,
            head_hash: if v.head.is_some() {
                head_hash.to_vec()
            } else {
                Vec::new()
            },
            broken_seq: v.broken.as_ref().map_or(0, |b| b.seq),
            broken_reason: v
                .broken
                .as_ref()
                .map_or("", |b| b.reason.as_str())
                .to_string(),
            broken_message: v
                .broken
                .as_ref()
                .map_or("", |b| b.reason.describe())
                .to_string(),
            checkpoint_seq: v.checkpoint_seq.unwrap_or(0),
        }))
    }

    async fn list_checkpoints(
        &self,
        req: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        let caller = self.admin(&req, Operation::ListCheckpoints).await?;
        let limit = match req.into_inner().limit {
            0 => 100,
            n => u32::try_from(n).unwrap_or(0),
        };
        let cps = self
            .control
            .ledger_checkpoints(&caller.vendors, limit)
            .await?;
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: cps
                .into_iter()
                .map(|cp| pb::Checkpoint {
                    seq: cp.seq,
                    hash: cp.hash.to_vec(),
                    at: Some(to_proto(cp.at)),
                    public_key: cp.public_key.to_vec(),
                    signature: cp.signature.to_vec(),
                })
                .collect(),
        }))
    }

    async fn spend_report(
        &self,
        req: Request<pb::SpendReportRequest>,
    ) -> Result<Response<pb::SpendReportResponse>, Status> {
        let caller = self.admin(&req, Operation::SpendSummary).await?;
        let q = domain::SpendReportQuery::try_from(req.into_inner()).map_err(ApiError::from)?;
        let report = self.control.spend_report(&caller.vendors, &q).await?;
        Ok(Response::new(spend_report_to_pb(&q.group_by, report)))
    }

    type ExportAuditStream = ExportStream;

    async fn export_audit(
        &self,
        req: Request<pb::ExportAuditRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let caller = self.admin(&req, Operation::QueryAudit).await?;
        let r = req.into_inner();
        let format = if r.format.is_empty() {
            "jsonl"
        } else {
            &r.format
        };
        let format = ledger::export::Format::parse(format)
            .ok_or_else(|| ApiError::from(invalid("format", "must be jsonl or csv")))?;
        let ts = |field, t: Option<prost_types::Timestamp>| {
            t.map(|t| from_proto(&t).ok_or_else(|| invalid(field, "out of range")))
                .transpose()
                .map_err(ApiError::from)
        };
        let (since, until) = (ts("from", r.from)?, ts("to", r.to)?);
        let records = self
            .control
            .export_audit(&caller.vendors, format, since, until)?;
        // A page of records per message; the next page is read only when
        // the client has taken this one (tonic polls the stream as the
        // transport has room), so memory stays flat.
        let chunks = records.map(|r| match r {
            Ok(text) => Ok(pb::ExportAuditChunk {
                data: text.into_bytes(),
            }),
            Err(e) => {
                tracing::error!(error = %e, "audit export stopped");
                Err(Status::internal("audit export stopped"))
            }
        });
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn spend_summary(
        &self,
        req: Request<pb::SpendSummaryRequest>,
    ) -> Result<Response<pb::SpendSummaryResponse>, Status> {
        let caller = self.admin(&req, Operation::SpendSummary).await?;
        let label = req.into_inner().agent_run_label;
        let s = self.control.spend_summary(&caller.vendors, &label).await?;
        Ok(Response::new(pb::SpendSummaryResponse {
            agent_run_label: label,
            total_micros: s.total.0,
            calls: s.calls,
            vendors: s
                .vendors
                .into_iter()
                .map(|(vendor, total, calls)| pb::VendorSpend {
                    vendor,
                    total_micros: total.0,
                    calls,
                })
                .collect(),
        }))
    }
}

pub fn issuer_token_to_pb(t: &domain::IssuerToken) -> pb::IssuerToken {
    pb::IssuerToken {
        id: t.id.clone(),
        key_id: t.key_id.clone(),
        name: t.name.clone(),
        token_prefix: t.token_prefix.clone(),
        created_at: Some(to_proto(t.created_at)),
        expires_at: opt_to_proto(t.expires_at),
        revoked_at: opt_to_proto(t.revoked_at),
        status: status_to_pb(t.status(chrono::Utc::now())) as i32,
    }
}

pub fn admin_token_to_pb(t: &domain::AdminToken) -> pb::AdminToken {
    pb::AdminToken {
        id: t.id.clone(),
        name: t.name.clone(),
        scopes: t.scopes.names().into_iter().map(String::from).collect(),
        vendors: t.vendors.list().unwrap_or_default(),
        token_prefix: t.token_prefix.clone(),
        created_at: Some(to_proto(t.created_at)),
        expires_at: opt_to_proto(t.expires_at),
        revoked_at: opt_to_proto(t.revoked_at),
        status: status_to_pb(t.status(chrono::Utc::now())) as i32,
    }
}

impl TryFrom<pb::CreateAdminTokenRequest> for NewAdminToken {
    type Error = domain::InvalidInput;

    fn try_from(r: pb::CreateAdminTokenRequest) -> Result<Self, Self::Error> {
        let expires_in = match r.expires_in_seconds {
            0 => None,
            s if s < 0 => return Err(invalid("expires_in_seconds", "must not be negative")),
            s => Some(Duration::from_secs(s as u64)),
        };
        NewAdminToken::new(&r.name, &r.scopes, &r.vendors, expires_in).map_err(|mut e| {
            if e.field == "expires_in" {
                e.field = "expires_in_seconds";
            }
            e
        })
    }
}

#[tonic::async_trait]
impl pb::admin_token_service_server::AdminTokenService for Api {
    async fn create_admin_token(
        &self,
        req: Request<pb::CreateAdminTokenRequest>,
    ) -> Result<Response<pb::CreateAdminTokenResponse>, Status> {
        let caller = self.admin(&req, Operation::CreateAdminToken).await?;
        let new = NewAdminToken::try_from(req.into_inner()).map_err(ApiError::from)?;
        let (token, secret) = self.control.create_admin_token(&caller, new).await?;
        Ok(Response::new(pb::CreateAdminTokenResponse {
            token: Some(admin_token_to_pb(&token)),
            secret,
        }))
    }

    async fn list_admin_tokens(
        &self,
        req: Request<pb::ListAdminTokensRequest>,
    ) -> Result<Response<pb::ListAdminTokensResponse>, Status> {
        let caller = self.admin(&req, Operation::ListAdminTokens).await?;
        let tokens = self
            .control
            .list_admin_tokens(&caller, req.get_ref().include_inactive)
            .await?;
        Ok(Response::new(pb::ListAdminTokensResponse {
            tokens: tokens.iter().map(admin_token_to_pb).collect(),
        }))
    }

    async fn revoke_admin_token(
        &self,
        req: Request<pb::RevokeAdminTokenRequest>,
    ) -> Result<Response<pb::RevokeAdminTokenResponse>, Status> {
        let caller = self.admin(&req, Operation::RevokeAdminToken).await?;
        let token = self
            .control
            .revoke_admin_token(&caller, &req.get_ref().id)
            .await?;
        Ok(Response::new(pb::RevokeAdminTokenResponse {
            token: Some(admin_token_to_pb(&token)),
        }))
    }
}

fn delta_to_pb(d: Delta) -> pb::PolicyUpdate {
    pb::PolicyUpdate {
        version: d.version,
        update: Some(pb::policy_update::Update::Delta(pb::PolicyDelta {
            upsert_vendors: d.upsert_vendors.iter().map(fleet_vendor_to_pb).collect(),
            removed_vendors: d.removed_vendors,
            upsert_keys: d.upsert_keys.iter().map(fleet_key_to_pb).collect(),
            removed_keys: d.removed_keys,
            upsert_hooks: d.upsert_hooks.iter().map(hooks::fleet_hook_to_pb).collect(),
            removed_hooks: d.removed_hooks,
        })),
    }
}

type PolicyStream = Pin<Box<dyn Stream<Item = Result<pb::PolicyUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl pb::fleet_service_server::FleetService for Api {
    type WatchPolicyStream = PolicyStream;

    async fn watch_policy(
        &self,
        req: Request<pb::WatchPolicyRequest>,
    ) -> Result<Response<Self::WatchPolicyStream>, Status> {
        self.fleet(&req, &req.get_ref().node_id)?;
        let r = req.into_inner();
        domain::parse_node_id(&r.node_id).map_err(ApiError::from)?;
        let control = self.control.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<pb::PolicyUpdate, Status>>(16);
        tracing::info!(node = %r.node_id, from_version = r.from_version, "proxy watching policy");
        let beats = tx.clone();
        tokio::spawn(async move {
            // Heartbeats go out from the moment the stream opens, a snapshot
            // that takes long to read included, until the updates below end.
            tokio::select! {
                _ = send_updates(control, r, tx) => {}
                _ = send_heartbeats(beats) => {}
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn ack_policy(
        &self,
        req: Request<pb::AckPolicyRequest>,
    ) -> Result<Response<pb::AckPolicyResponse>, Status> {
        self.fleet(&req, &req.get_ref().node_id)?;
        let r = req.into_inner();
        self.control.ack_policy(&r.node_id, r.version).await?;
        let errors = r
            .vendor_errors
            .into_iter()
            .map(|e| (e.vendor, e.error))
            .collect();
        self.control
            .report_vendor_errors(&r.node_id, errors)
            .await?;
        Ok(Response::new(pb::AckPolicyResponse {}))
    }

    async fn lookup_key(
        &self,
        req: Request<pb::LookupKeyRequest>,
    ) -> Result<Response<pb::LookupKeyResponse>, Status> {
        self.fleet(&req, &req.get_ref().node_id)?;
        let r = req.into_inner();
        let (key, version) = self.control.lookup_key(&r.key_hash).await?;
        Ok(Response::new(pb::LookupKeyResponse {
            key: key.as_ref().map(fleet_key_to_pb),
            version,
        }))
    }

    async fn list_leases(
        &self,
        req: Request<pb::ListLeasesRequest>,
    ) -> Result<Response<pb::ListLeasesResponse>, Status> {
        self.fleet(&req, &req.get_ref().node_id)?;
        let leases = self.control.node_leases(&req.get_ref().node_id).await?;
        Ok(Response::new(pb::ListLeasesResponse {
            leases: leases
                .into_iter()
                .map(|l| pb::NodeLease {
                    lease_id: l.id,
                    key_id: l.key_id,
                    day: l.day,
                    granted_micros: l.granted.0,
                    reported_micros: l.reported.0,
                    expires_at: Some(to_proto(l.expires_at)),
                })
                .collect(),
        }))
    }

    async fn grant_lease(
        &self,
        req: Request<pb::GrantLeaseRequest>,
    ) -> Result<Response<pb::GrantLeaseResponse>, Status> {
        self.fleet(&req, &req.get_ref().node_id)?;
        let r = req.into_inner();
        let nonempty = |field: &'static str, s: String| {
            if s.is_empty() || s.len() > 128 {
                Err(ApiError::from(invalid(field, "must be 1-128 characters")))
            } else {
                Ok(s)
            }
        };
        let grant = LeaseGrantRequest {
            grant_id: nonempty("grant_id", r.grant_id)?,
            lease_id: nonempty("lease_id", r.lease_id)?,
            key_id: nonempty("key_id", r.key_id)?,
            node_id: nonempty("node_id", r.node_id)?,
            day: parse_day(r.day)?,
            requested: Micros(r.requested_micros),
            minimum: Micros(r.minimum_micros),
            expires_at: chrono::Utc::now(),
        };
        let g = self.control.grant_lease(grant).await?;
        Ok(Response::new(pb::GrantLeaseResponse {
            granted_micros: g.granted.0,
            lease_total_micros: g.lease_total.0,
            unleased_micros: g.unleased.0,
            lifetime_bound: g.lifetime_bound,
            expires_at: Some(to_proto(g.expires_at)),
        }))
    }

    async fn return_lease(
        &self,
        req: Request<pb::ReturnLeaseRequest>,
    ) -> Result<Response<pb::ReturnLeaseResponse>, Status> {
        self.fleet(&req, &req.get_ref().node_id)?;
        let r = req.into_inner();
        let node = (!r.node_id.is_empty()).then_some(r.node_id.as_str());
        if r.keep_open {
            self.control
                .shrink_lease(
                    &r.lease_id,
                    node,
                    Micros(r.granted_micros),
                    Micros(r.spent_micros),
                )
                .await?;
        } else {
            self.control
                .return_lease(&r.lease_id, node, Micros(r.spent_micros))
                .await?;
        }
        Ok(Response::new(pb::ReturnLeaseResponse {}))
    }

    async fn request_approval(
        &self,
        req: Request<pb::RequestApprovalRequest>,
    ) -> Result<Response<pb::RequestApprovalResponse>, Status> {
        self.fleet_request_approval(req).await
    }

    async fn consume_approval(
        &self,
        req: Request<pb::ConsumeApprovalRequest>,
    ) -> Result<Response<pb::ConsumeApprovalResponse>, Status> {
        self.fleet_consume_approval(req).await
    }

    async fn report_spend(
        &self,
        req: Request<pb::ReportSpendRequest>,
    ) -> Result<Response<pb::ReportSpendResponse>, Status> {
        self.fleet(&req, &req.get_ref().node_id)?;
        let r = req.into_inner();
        // Each traced call's event is ingested in a span of the call's own
        // trace (the batch mixes many), linked to this batch's span.
        let ingesting: Vec<tracing::Span> = r
            .events
            .iter()
            .filter(|e| !e.traceparent.is_empty())
            .map(|e| {
                let span = tracing::info_span!(
                    "ingest spend",
                    otel.kind = "consumer",
                    keycap.call_id = %e.event_id,
                    keycap.key_id = %e.key_id,
                    keycap.vendor = %e.vendor,
                    keycap.cost_usd = %Micros(e.cost_micros),
                    keycap.outcome = %e.outcome,
                    keycap.batch_events = r.events.len(),
                );
                keycap_telemetry::continue_from(&span, &e.traceparent);
                span.follows_from(tracing::Span::current());
                span
            })
            .collect();
        let events = r
            .events
            .into_iter()
            .map(|e| spend_event_from_pb(e, &r.node_id))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ApiError::from)?;
        let (applied, duplicates) = self.control.report_spend(events).await?;
        drop(ingesting);
        crate::metrics::METRICS.spend_reported(applied as u64, duplicates as u64);
        self.control
            .note_spool_depth(&r.node_id, r.spool_depth)
            .await;
        Ok(Response::new(pb::ReportSpendResponse {
            applied: applied as i32,
            duplicates: duplicates as i32,
        }))
    }
}

/// How often a policy stream carries a heartbeat: a proxy takes a stream
/// silent for about a second (four beats) as a replica that stopped.
const POLICY_HEARTBEAT: Duration = Duration::from_millis(250);

async fn send_heartbeats(tx: tokio::sync::mpsc::Sender<Result<pb::PolicyUpdate, Status>>) {
    let mut tick = tokio::time::interval(POLICY_HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let beat = pb::PolicyUpdate {
            version: 0,
            update: Some(pb::policy_update::Update::Heartbeat(pb::Heartbeat {})),
        };
        if tx.send(Ok(beat)).await.is_err() {
            return;
        }
    }
}

/// A proxy's policy stream: a snapshot (or the changes since the version it
/// resumes from), then a delta whenever the change log moves.
async fn send_updates(
    control: Arc<Control>,
    r: pb::WatchPolicyRequest,
    tx: tokio::sync::mpsc::Sender<Result<pb::PolicyUpdate, Status>>,
) {
    // Registered before the first update is read: a revocation
    // either waits for this node or is already in what it gets.
    let _registration = match control.open_node_stream(&r.node_id).await {
        Ok(registration) => registration,
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            return;
        }
    };
    let mut versions = control.subscribe_versions();
    let mut at = r.from_version;
    let resumed = if at > 0 {
        control.delta_since(at).await
    } else {
        Ok(None)
    };
    let first = match resumed {
        Ok(Some(d)) => {
            at = d.version;
            delta_to_pb(d)
        }
        Ok(None) => match snapshot_with_hooks(&control).await {
            Ok((version, vendors, keys, hooks)) => {
                at = version;
                pb::PolicyUpdate {
                    version,
                    update: Some(pb::policy_update::Update::Snapshot(pb::PolicySnapshot {
                        vendors: vendors.iter().map(fleet_vendor_to_pb).collect(),
                        keys: keys.iter().map(fleet_key_to_pb).collect(),
                        hooks: hooks.iter().map(hooks::fleet_hook_to_pb).collect(),
                    })),
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        },
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            return;
        }
    };
    if tx.send(Ok(first)).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            changed = versions.changed() => if changed.is_err() { return },
            _ = tx.closed() => return,
        }
        if *versions.borrow_and_update() <= at {
            continue;
        }
        match control.delta_since(at).await {
            Ok(Some(d)) if d.version > at => {
                at = d.version;
                if tx.send(Ok(delta_to_pb(d))).await.is_err() {
                    return;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => {
                // The log was trimmed past us: make the proxy start
                // over with a snapshot.
                let _ = tx
                    .send(Err(Status::out_of_range("resume version is gone")))
                    .await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
    }
}

/// The snapshot and the inbound hooks, read after its version (so a hook
/// changed meanwhile is only ever newer than the version says).
async fn snapshot_with_hooks(
    control: &Control,
) -> Result<
    (
        i64,
        Vec<FleetVendor>,
        Vec<domain::VaultKey>,
        Vec<crate::hooks::FleetHook>,
    ),
    ApiError,
> {
    let (version, vendors, keys) = control.snapshot().await?;
    let hooks = control.fleet_hooks().await?;
    Ok((version, vendors, keys, hooks))
}

/// A UTC day exactly as `YYYY-MM-DD`. The day is kept as written and
/// keys a budget's spend (`key_spend_daily`), so forms a date parser also
/// reads (`2026-1-5`, ` 2026-01-05`, `+2026-01-05`) would name another
/// budget day than `2026-01-05`: they are refused.
fn parse_day(day: String) -> Result<String, ApiError> {
    let shaped = day.len() == 10
        && day.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if shaped && day.parse::<chrono::NaiveDate>().is_ok() {
        Ok(day)
    } else {
        Err(ApiError::from(invalid(
            "day",
            "must be a UTC day YYYY-MM-DD",
        )))
    }
}

fn spend_event_from_pb(
    e: pb::SpendEvent,
    node_id: &str,
) -> Result<domain::SpendEvent, domain::InvalidInput> {
    if e.event_id.is_empty() || e.event_id.len() > 128 {
        return Err(invalid("event_id", "must be 1-128 characters"));
    }
    if e.cost_micros < 0 || e.reserved_micros < 0 {
        return Err(invalid("cost_micros", "must not be negative"));
    }
    // No database stores a NUL in text (PostgreSQL refuses the whole
    // batch): refused here, with the field named.
    for (field, text) in [
        ("event_id", &e.event_id),
        ("lease_id", &e.lease_id),
        ("key_id", &e.key_id),
        ("vendor", &e.vendor),
        ("method", &e.method),
        ("path", &e.path),
        ("detail_json", &e.detail_json),
    ] {
        if text.contains('\0') {
            return Err(invalid(field, "must not contain a NUL character"));
        }
    }
    let day = parse_day(e.day).map_err(|_| invalid("day", "must be a UTC day YYYY-MM-DD"))?;
    domain::validate_trace_id(&e.trace_id)?;
    let context: std::collections::BTreeMap<String, String> = e.context.into_iter().collect();
    domain::validate_context(&context)?;
    let outcome = domain::Outcome::parse(&e.outcome)?;
    if outcome == domain::Outcome::Refused {
        domain::validate_refusal_reason(&e.refusal_reason)?;
        if e.refused_calls < 1 {
            return Err(invalid(
                "refused_calls",
                "a refusal stands for at least 1 call",
            ));
        }
        if e.cost_micros != 0 || e.reserved_micros != 0 {
            return Err(invalid(
                "cost_micros",
                "a refusal costs and reserves nothing",
            ));
        }
    } else if outcome == domain::Outcome::Relayed && (e.cost_micros != 0 || e.reserved_micros != 0)
    {
        return Err(invalid(
            "cost_micros",
            "a relayed inbound hook event costs and reserves nothing",
        ));
    } else if !e.refusal_reason.is_empty() || e.refused_calls != 0 {
        return Err(invalid(
            "refusal_reason",
            "only a refused event has a refusal reason and count",
        ));
    }
    if e.credential_version < 0
        || (outcome == domain::Outcome::Refused && e.credential_version != 0)
    {
        return Err(invalid(
            "credential_version",
            "a forwarded call's credential version is 0 or more; a refusal has none",
        ));
    }
    if !e.would_refuse.is_empty()
        && (!outcome.is_call() || domain::would_refuse_rule(&e.would_refuse).is_none())
    {
        return Err(invalid(
            "would_refuse",
            "only a forwarded call is marked, with a refusal code observe mode forwards",
        ));
    }
    Ok(domain::SpendEvent {
        event_id: e.event_id,
        lease_id: e.lease_id,
        key_id: e.key_id,
        day,
        vendor: e.vendor,
        method: e.method,
        path: e.path,
        upstream_status: e.upstream_status,
        reserved: Micros(e.reserved_micros),
        cost: Micros(e.cost_micros),
        outcome,
        at: e
            .at
            .as_ref()
            .and_then(from_proto)
            .ok_or_else(|| invalid("at", "missing or out of range"))?,
        node_id: node_id.to_string(),
        detail_json: e.detail_json,
        trace_id: e.trace_id,
        context,
        refusal_reason: e.refusal_reason,
        refused_calls: e.refused_calls,
        credential_version: e.credential_version,
        would_refuse: e.would_refuse,
    })
}

fn status_to_pb(status: KeyStatus) -> pb::KeyStatus {
    match status {
        KeyStatus::Active => pb::KeyStatus::Active,
        KeyStatus::Expired => pb::KeyStatus::Expired,
        KeyStatus::Revoked => pb::KeyStatus::Revoked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nul_in_a_spend_event_is_refused_with_its_field_named() {
        let good = pb::SpendEvent {
            event_id: "e1".into(),
            day: "2026-12-06".into(),
            outcome: "settled".into(),
            path: "/v1/payment_intents".into(),
            at: Some(to_proto(chrono::Utc::now())),
            ..Default::default()
        };
        assert!(spend_event_from_pb(good.clone(), "n1").is_ok());
        for (field, edit) in [
            (
                "path",
                (|e: &mut pb::SpendEvent| e.path.push('\0')) as fn(&mut _),
            ),
            ("event_id", |e| e.event_id.push('\0')),
            ("detail_json", |e| e.detail_json = "{\"a\":\"\0\"}".into()),
        ] {
            let mut bad = good.clone();
            edit(&mut bad);
            let err = spend_event_from_pb(bad, "n1").unwrap_err();
            assert_eq!(err.field, field);
        }
    }

    #[test]
    fn a_day_is_taken_only_as_yyyy_mm_dd() {
        assert_eq!(
            parse_day("2026-01-05".into()).ok().as_deref(),
            Some("2026-01-05")
        );
        // Each would be its own budget day next to 2026-01-05.
        for day in [
            "2026-1-5",
            "2026-01-5",
            " 2026-01-05",
            "+2026-01-05",
            "2026-01-05 ",
            "2026-02-30",
            "2026/01/05",
            "",
        ] {
            assert!(parse_day(day.into()).is_err(), "{day:?} was taken");
        }
    }
}
