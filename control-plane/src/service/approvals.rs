//! The approval gate as operations (docs/approvals.md): a proxy holds a
//! call priced above its key's `approval_above` and asks for an approval;
//! a person with `approvals:decide` approves or denies it with a reason;
//! the proxy's retry uses it once.
//!
//! What must be atomic lives in the store (a decision and a use are each
//! one conditional statement, so two deciders or fifty retries across the
//! fleet race on the database, not here). This module never decides a
//! price or a cap: the proxy quotes, and the retry still reserves against
//! every cap before it uses the approval.

use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use keycap_proto::Micros;
use serde_json::json;

use super::{AdminPrincipal, Control};
use crate::approval::{self, Approval, ApprovalFilter, ConsumeRefusal};
use crate::domain::{self, invalid};
use crate::error::ApiError;
use crate::scope::VendorScope;
use crate::webhook::{EventType, Subject};

/// How approvals are offered: how long one lives, and where the dashboard
/// a person decides in is reached.
#[derive(Clone, Debug)]
pub struct ApprovalSettings {
    /// From the request to the last moment it can be decided or used.
    pub ttl: Duration,
    /// The control plane's URL as people reach it (`--public-url`); without
    /// it the approval URL is a path on the control plane.
    pub public_url: Option<String>,
}

impl Default for ApprovalSettings {
    fn default() -> Self {
        ApprovalSettings {
            ttl: Duration::from_secs(approval::DEFAULT_TTL_SECS),
            public_url: None,
        }
    }
}

/// What a proxy sends to hold a call for approval, validated.
#[derive(Clone, Debug)]
pub struct HeldCall {
    pub key_id: String,
    pub method: String,
    pub path: String,
    pub fingerprint: [u8; 32],
    pub quote: Micros,
}

impl HeldCall {
    pub fn new(
        key_id: String,
        method: String,
        path: String,
        fingerprint: &[u8],
        quote: Micros,
    ) -> Result<Self, domain::InvalidInput> {
        if key_id.is_empty() || key_id.len() > 128 {
            return Err(invalid("key_id", "must be 1-128 characters"));
        }
        if method.is_empty() || method.len() > 16 {
            return Err(invalid("method", "must be 1-16 characters"));
        }
        let fingerprint: [u8; 32] = fingerprint
            .try_into()
            .map_err(|_| invalid("fingerprint", "must be 32 bytes"))?;
        if quote <= Micros::ZERO {
            return Err(invalid("quote_micros", "must be positive"));
        }
        Ok(HeldCall {
            key_id,
            method,
            // For people to read; the fingerprint is what binds the retry.
            path: keycap_proto::clip(&path, 2048),
            fingerprint,
            quote,
        })
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Control {
    /// Sets how approvals are offered (at start, from the configuration).
    pub fn configure_approvals(&self, settings: ApprovalSettings) {
        let _ = self.approvals.set(settings);
    }

    fn approval_settings(&self) -> ApprovalSettings {
        self.approvals.get().cloned().unwrap_or_default()
    }

    /// The dashboard's page for an approval.
    pub fn approval_url(&self, id: &str) -> String {
        let path = format!("/ui/approvals/{id}");
        match self.approval_settings().public_url {
            Some(base) => format!("{}{path}", base.trim_end_matches('/')),
            None => path,
        }
    }

    /// Holds `call` for approval on behalf of proxy `node_id`: stores it
    /// pending until the configured TTL and raises `approval.requested`.
    pub async fn request_approval(
        &self,
        node_id: &str,
        call: HeldCall,
    ) -> Result<Approval, ApiError> {
        domain::parse_node_id(node_id)?;
        let key = self
            .store
            .get_key(&call.key_id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("key {:?} not found", call.key_id)))?;
        let now = Utc::now();
        let ttl = chrono::Duration::from_std(self.approval_settings().ttl)
            .map_err(|_| ApiError::Internal)?;
        let approval = Approval {
            id: approval::new_id(),
            key_id: key.id.clone(),
            vendor: key.vendor.to_string(),
            method: call.method,
            path: call.path,
            fingerprint: call.fingerprint,
            quote: call.quote,
            node_id: node_id.to_string(),
            agent_run_label: key.agent_run_label.clone(),
            requested_at: now,
            expires_at: now + ttl,
            decision: None,
            consumed_at: None,
            consumed_event: None,
        };
        self.store.insert_approval(&approval).await?;
        tracing::info!(approval = %approval.id, key = %approval.key_id, quote = %approval.quote, "call held for approval");
        self.alert_approval(EventType::ApprovalRequested, &approval)
            .await;
        Ok(approval)
    }

    /// Uses approval `id` for the call `event_id` of `key_id` that now
    /// reserves `amount`: Ok with the approval (its decision says who and
    /// why) when this call is the one that used it; else why not.
    pub async fn consume_approval(
        &self,
        node_id: &str,
        id: &str,
        key_id: &str,
        fingerprint: &[u8],
        amount: Micros,
        event_id: &str,
    ) -> Result<Result<Approval, ConsumeRefusal>, ApiError> {
        domain::parse_node_id(node_id)?;
        let Ok(id) = approval::parse_id(id) else {
            return Ok(Err(ConsumeRefusal::Unknown));
        };
        let Ok(fingerprint) = <[u8; 32]>::try_from(fingerprint) else {
            return Err(invalid("fingerprint", "must be 32 bytes").into());
        };
        if event_id.is_empty() || event_id.len() > 128 {
            return Err(invalid("event_id", "must be 1-128 characters").into());
        }
        let now = Utc::now();
        let used = self
            .store
            .consume_approval(id, key_id, &fingerprint, amount, event_id, now)
            .await?;
        let Some(approval) = self.store.get_approval(id).await? else {
            return Ok(Err(ConsumeRefusal::Unknown));
        };
        if used {
            tracing::info!(approval = %id, key = %key_id, event = %event_id, "approval used");
            return Ok(Ok(approval));
        }
        // The same call asking again (its first answer was lost and the
        // proxy asked another replica): it is the one that used it.
        if approval.key_id == key_id && approval.consumed_event.as_deref() == Some(event_id) {
            return Ok(Ok(approval));
        }
        Ok(Err(approval.refusal_for(key_id, &fingerprint, amount, now)))
    }

    pub async fn list_approvals(
        &self,
        vendors: &VendorScope,
        filter: &ApprovalFilter,
    ) -> Result<Vec<Approval>, ApiError> {
        let mut all = self.store.list_approvals(filter, Utc::now()).await?;
        all.retain(|a| vendors.allows(&a.vendor));
        Ok(all)
    }

    /// One approval, if the caller may act on its key's vendor (another
    /// vendor's is not found, like an unknown one).
    pub async fn get_approval(
        &self,
        vendors: &VendorScope,
        id: &str,
    ) -> Result<Approval, ApiError> {
        let id = approval::parse_id(id)?;
        self.store
            .get_approval(id)
            .await?
            .filter(|a| vendors.allows(&a.vendor))
            .ok_or_else(|| ApiError::NotFound(format!("approval {id:?} not found")))
    }

    /// Approves or denies a pending approval with a reason, recording the
    /// caller's token as who decided; `Conflict` once it is decided or
    /// expired. Raises `approval.decided`.
    pub async fn decide_approval(
        &self,
        caller: &AdminPrincipal,
        id: &str,
        approve: bool,
        reason: &str,
    ) -> Result<Approval, ApiError> {
        let reason = approval::parse_reason(reason)?;
        let current = self.get_approval(&caller.vendors, id).await?;
        let by = match self.store.get_admin_token(&caller.token_id).await? {
            Some(t) => format!("{} ({})", t.id, t.name),
            None => caller.token_id.clone(),
        };
        let now = Utc::now();
        if !self
            .store
            .decide_approval(&current.id, approve, &by, &reason, now)
            .await?
        {
            let state = self
                .store
                .get_approval(&current.id)
                .await?
                .map_or(current.state(now), |a| a.state(now));
            return Err(ApiError::Conflict(format!(
                "approval {} is {}; only a pending approval can be decided",
                current.id,
                state.as_str()
            )));
        }
        let decided = self
            .store
            .get_approval(&current.id)
            .await?
            .ok_or(ApiError::Internal)?;
        tracing::info!(approval = %decided.id, approved = approve, by = %by, "approval decided");
        self.alert_approval(EventType::ApprovalDecided, &decided)
            .await;
        Ok(decided)
    }

    /// `approval.requested` or `approval.decided`, once per approval.
    async fn alert_approval(&self, kind: EventType, a: &Approval) {
        let Some(endpoints) = self.endpoints_for(kind).await else {
            return;
        };
        let subject = Subject {
            run_label: Some(&a.agent_run_label),
            key_id: Some(&a.key_id),
        };
        let decision = a.decision.as_ref();
        self.raise(
            &endpoints,
            |e| e.wants(kind, &subject),
            kind,
            Some(format!("{}|{}", kind.as_str(), a.id)),
            json!({
                "approval_id": a.id,
                "key_id": a.key_id,
                "run_label": a.agent_run_label,
                "vendor": a.vendor,
                "method": a.method,
                "path": a.path,
                "quote_usd": a.quote.to_string(),
                "expires_at": rfc3339(a.expires_at),
                "approval_url": self.approval_url(&a.id),
                "state": a.state(Utc::now()).as_str(),
                "decided_by": decision.map(|d| d.by.as_str()),
                "reason": decision.map(|d| d.reason.as_str()),
            }),
        )
        .await;
    }
}
