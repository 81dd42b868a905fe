//! Row shape of the `approvals` table (migration 0019) and its conversion
//! to `crate::approval::Approval`. Encoding as in `store::sql`: times in
//! microseconds, money in micro-dollars; the fingerprint as 32 raw bytes.

use keycap_proto::Micros;

use super::sql::from_micros;
use super::{StoreError, StoreResult};
use crate::approval::{Approval, Decision};

pub(super) const APPROVAL_COLUMNS: &str = "id, key_id, vendor, method, path, fingerprint, quote, \
     node_id, agent_run_label, requested_at, expires_at, decision, decided_by, reason, decided_at, \
     consumed_at, consumed_event";

fn corrupt(column: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{column}: {e}"))
}

#[derive(sqlx::FromRow)]
pub struct ApprovalRow {
    id: String,
    key_id: String,
    vendor: String,
    method: String,
    path: String,
    fingerprint: Vec<u8>,
    quote: i64,
    node_id: String,
    agent_run_label: String,
    requested_at: i64,
    expires_at: i64,
    decision: Option<String>,
    decided_by: Option<String>,
    reason: Option<String>,
    decided_at: Option<i64>,
    consumed_at: Option<i64>,
    consumed_event: Option<String>,
}

impl ApprovalRow {
    pub(super) fn into_domain(self) -> StoreResult<Approval> {
        let fingerprint: [u8; 32] = self
            .fingerprint
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("approvals.fingerprint", "not 32 bytes"))?;
        let decision = match self.decision.as_deref() {
            None => None,
            Some(d @ ("approved" | "denied")) => Some(Decision {
                approved: d == "approved",
                by: self.decided_by.unwrap_or_default(),
                reason: self.reason.unwrap_or_default(),
                at: from_micros(
                    self.decided_at
                        .ok_or_else(|| corrupt("approvals.decided_at", "missing"))?,
                    "approvals.decided_at",
                )?,
            }),
            Some(other) => return Err(corrupt("approvals.decision", other)),
        };
        Ok(Approval {
            id: self.id,
            key_id: self.key_id,
            vendor: self.vendor,
            method: self.method,
            path: self.path,
            fingerprint,
            quote: Micros(self.quote),
            node_id: self.node_id,
            agent_run_label: self.agent_run_label,
            requested_at: from_micros(self.requested_at, "approvals.requested_at")?,
            expires_at: from_micros(self.expires_at, "approvals.expires_at")?,
            decision,
            consumed_at: self
                .consumed_at
                .map(|v| from_micros(v, "approvals.consumed_at"))
                .transpose()?,
            consumed_event: self.consumed_event,
        })
    }
}
