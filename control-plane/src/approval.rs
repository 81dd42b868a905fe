//! The approval gate's domain (docs/approvals.md): a call a key priced
//! above its `approval_above` is held as an `Approval` until a person
//! approves or denies it, and an approved one is used by exactly one
//! forwarded retry.
//!
//! This module owns the approval's states, the refusal codes a retry can
//! get, and the validation of a decision's reason. It never touches the
//! database or the wire: the store applies a decision and a use each in one
//! conditional statement, and this module only names what the row shows.

use chrono::{DateTime, Utc};
use keycap_proto::Micros;

use crate::domain::{invalid, InvalidInput};

/// How long an approval stays decidable and usable unless the control
/// plane says otherwise (`--approval-ttl-secs`).
pub const DEFAULT_TTL_SECS: u64 = 3600;
/// A decision's reason: required, at most this many characters.
pub const MAX_REASON_LEN: usize = 500;

/// A call held for a decision, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Approval {
    /// `apr_<32 hex>`.
    pub id: String,
    pub key_id: String,
    pub vendor: String,
    pub method: String,
    /// The vendor's path with its query, for people to read.
    pub path: String,
    /// SHA-256 of the request's canonical form (the proxy's
    /// `approval::fingerprint`); a retry must carry the same.
    pub fingerprint: [u8; 32],
    /// The reservation quoted when it was held: a retry may reserve at
    /// most this.
    pub quote: Micros,
    pub node_id: String,
    pub agent_run_label: String,
    pub requested_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub decision: Option<Decision>,
    pub consumed_at: Option<DateTime<Utc>>,
    /// The event id (call id) of the retry that used it.
    pub consumed_event: Option<String>,
}

/// Who decided an approval, how and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub approved: bool,
    /// The deciding admin token, as "<id> (<name>)".
    pub by: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApprovalState {
    Pending,
    Approved,
    Denied,
    Expired,
    /// Approved and used by a forwarded call.
    Used,
}

impl ApprovalState {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Approved => "approved",
            ApprovalState::Denied => "denied",
            ApprovalState::Expired => "expired",
            ApprovalState::Used => "used",
        }
    }

    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        Ok(match s {
            "pending" => ApprovalState::Pending,
            "approved" => ApprovalState::Approved,
            "denied" => ApprovalState::Denied,
            "expired" => ApprovalState::Expired,
            "used" => ApprovalState::Used,
            other => {
                return Err(invalid(
                    "state",
                    format!(
                        "unknown state {other:?}; one of pending, approved, denied, expired, used"
                    ),
                ))
            }
        })
    }
}

impl Approval {
    pub fn state(&self, now: DateTime<Utc>) -> ApprovalState {
        if self.consumed_at.is_some() {
            return ApprovalState::Used;
        }
        match &self.decision {
            Some(d) if !d.approved => ApprovalState::Denied,
            _ if self.expires_at <= now => ApprovalState::Expired,
            Some(_) => ApprovalState::Approved,
            None => ApprovalState::Pending,
        }
    }

    /// Why a retry carrying this approval was not allowed to use it, read
    /// from the row after the conditional update refused: the first rule,
    /// in the order a person would check them, that the retry breaks.
    pub fn refusal_for(
        &self,
        key_id: &str,
        fingerprint: &[u8; 32],
        amount: Micros,
        now: DateTime<Utc>,
    ) -> ConsumeRefusal {
        if self.key_id != key_id {
            return ConsumeRefusal::KeyMismatch;
        }
        match self.state(now) {
            ApprovalState::Used => return ConsumeRefusal::Used,
            ApprovalState::Denied => return ConsumeRefusal::Denied,
            ApprovalState::Expired => return ConsumeRefusal::Expired,
            ApprovalState::Pending => return ConsumeRefusal::Pending,
            ApprovalState::Approved => {}
        }
        if &self.fingerprint != fingerprint {
            return ConsumeRefusal::RequestMismatch;
        }
        if amount > self.quote {
            return ConsumeRefusal::AmountExceeded;
        }
        // Every condition holds now: the row changed between the update
        // and this read (another retry used it a moment ago).
        ConsumeRefusal::Used
    }
}

/// Why a retry's approval could not be used; each is the refusal code the
/// agent gets (docs/errors.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConsumeRefusal {
    Unknown,
    Pending,
    Denied,
    Expired,
    Used,
    RequestMismatch,
    KeyMismatch,
    AmountExceeded,
}

impl ConsumeRefusal {
    pub fn code(self) -> &'static str {
        match self {
            ConsumeRefusal::Unknown => "approval_unknown",
            ConsumeRefusal::Pending => "approval_pending",
            ConsumeRefusal::Denied => "approval_denied",
            ConsumeRefusal::Expired => "approval_expired",
            ConsumeRefusal::Used => "approval_used",
            ConsumeRefusal::RequestMismatch => "approval_request_mismatch",
            ConsumeRefusal::KeyMismatch => "approval_key_mismatch",
            ConsumeRefusal::AmountExceeded => "approval_amount_exceeded",
        }
    }
}

/// A filter over approvals, newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApprovalFilter {
    pub state: Option<ApprovalState>,
    pub key_id: Option<String>,
    /// 0: 100; at most 1000.
    pub limit: u32,
}

/// A decision's reason, trimmed: required (an approval records why), at
/// most `MAX_REASON_LEN` characters, no control characters.
pub fn parse_reason(s: &str) -> Result<String, InvalidInput> {
    let s = s.trim();
    if s.is_empty() {
        return Err(invalid("reason", "a reason is required"));
    }
    if s.chars().count() > MAX_REASON_LEN {
        return Err(invalid("reason", "at most 500 characters"));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid("reason", "no control characters"));
    }
    Ok(s.to_string())
}

/// An approval id as a client sent it: `apr_` and 32 lowercase hex digits.
pub fn parse_id(s: &str) -> Result<&str, InvalidInput> {
    let ok = s
        .strip_prefix("apr_")
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(s)
    } else {
        Err(invalid("approval_id", "not an approval id (apr_...)"))
    }
}

/// The approval a forwarded call was made under, as its audit entry
/// carries it: the proxy writes `{"approval": {"id", "decided_by",
/// "reason"}}` into the entry's detail, so it is part of the hash-chained
/// entry; reads lift it out into fields of their own. Empty when none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditApproval {
    pub id: String,
    pub decided_by: String,
    pub reason: String,
}

impl AuditApproval {
    pub fn of(detail_json: &str) -> AuditApproval {
        // Cheap test first: almost no entry has one.
        if !detail_json.contains("\"approval\"") {
            return AuditApproval::default();
        }
        let Ok(detail) = serde_json::from_str::<serde_json::Value>(detail_json) else {
            return AuditApproval::default();
        };
        let field = |name: &str| {
            detail["approval"][name]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        AuditApproval {
            id: field("id"),
            decided_by: field("decided_by"),
            reason: field("reason"),
        }
    }
}

/// A child key's approval threshold under a parent's: the lower of the
/// two (a child may ask for approval sooner, never later).
pub fn within_parent(parent: Option<Micros>, child: Option<Micros>) -> Option<Micros> {
    match (parent, child) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    }
}

pub fn new_id() -> String {
    format!("apr_{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approval(now: DateTime<Utc>) -> Approval {
        Approval {
            id: new_id(),
            key_id: "key_a".into(),
            vendor: "stripe".into(),
            method: "POST".into(),
            path: "/v1/payment_intents".into(),
            fingerprint: [1; 32],
            quote: Micros(5_000_000),
            node_id: "n1".into(),
            agent_run_label: "run".into(),
            requested_at: now,
            expires_at: now + chrono::TimeDelta::hours(1),
            decision: None,
            consumed_at: None,
            consumed_event: None,
        }
    }

    #[test]
    fn each_broken_rule_has_its_own_code() {
        let now = Utc::now();
        let mut a = approval(now);
        let fp = [1; 32];
        assert_eq!(
            a.refusal_for("key_a", &fp, Micros(1), now),
            ConsumeRefusal::Pending
        );
        assert_eq!(
            a.refusal_for("key_b", &fp, Micros(1), now),
            ConsumeRefusal::KeyMismatch
        );
        a.decision = Some(Decision {
            approved: true,
            by: "t".into(),
            reason: "ok".into(),
            at: now,
        });
        assert_eq!(
            a.refusal_for("key_a", &[2; 32], Micros(1), now),
            ConsumeRefusal::RequestMismatch
        );
        assert_eq!(
            a.refusal_for("key_a", &fp, Micros(5_000_001), now),
            ConsumeRefusal::AmountExceeded
        );
        assert_eq!(
            a.refusal_for("key_a", &fp, Micros(1), a.expires_at),
            ConsumeRefusal::Expired
        );
        a.consumed_at = Some(now);
        assert_eq!(
            a.refusal_for("key_a", &fp, Micros(1), now),
            ConsumeRefusal::Used
        );
        a.consumed_at = None;
        a.decision.as_mut().unwrap().approved = false;
        assert_eq!(
            a.refusal_for("key_a", &fp, Micros(1), now),
            ConsumeRefusal::Denied
        );
    }

    #[test]
    fn a_child_is_gated_at_the_lowest_threshold_along_its_ancestors() {
        let m = |v| Some(Micros(v));
        assert_eq!(within_parent(m(10), m(20)), m(10));
        assert_eq!(within_parent(m(30), m(20)), m(20));
        assert_eq!(within_parent(m(10), None), m(10));
        assert_eq!(within_parent(None, m(5)), m(5));
        assert_eq!(within_parent(None, None), None);
    }

    #[test]
    fn a_reason_is_required_and_bounded() {
        assert!(parse_reason("  ").is_err());
        assert!(parse_reason(&"x".repeat(501)).is_err());
        assert!(parse_reason("a\u{7}").is_err());
        assert_eq!(parse_reason(" invoice 42 ").unwrap(), "invoice 42");
        assert!(parse_id("apr_0123456789abcdef0123456789abcdef").is_ok());
        assert!(parse_id("apr_../x").is_err());
    }
}
