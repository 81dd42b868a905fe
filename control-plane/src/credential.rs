//! Vendor credential versions: what a version is, the states it moves
//! through (staged -> active -> previous -> retired), the record id its
//! sealed material is bound to, and the rules of a promote's grace window.
//!
//! Owns validated types only; never holds plaintext credentials (those
//! exist only in `service::credentials`, in memory, while a probe or the
//! fleet snapshot needs them) and never touches the store.

use chrono::{DateTime, TimeDelta, Utc};

use crate::domain::{invalid, InvalidInput};

/// Where a credential version is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CredentialState {
    /// Stored (and perhaps probed), never served.
    Staged,
    /// What every proxy injects; one per vendor.
    Active,
    /// The active one before the last promote: calls that already picked
    /// it finish with it, and a rollback may make it active again, until
    /// its grace ends and it retires.
    Previous,
    /// Its sealed material is erased; only its record remains.
    Retired,
}

impl CredentialState {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialState::Staged => "staged",
            CredentialState::Active => "active",
            CredentialState::Previous => "previous",
            CredentialState::Retired => "retired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            CredentialState::Staged,
            CredentialState::Active,
            CredentialState::Previous,
            CredentialState::Retired,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// The last probe of a version: whether the vendor accepted it, with the
/// vendor's status or why there was none. Never the vendor's body or the
/// credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialProbe {
    pub ok: bool,
    /// The vendor's HTTP status; `None` when no answer came.
    pub status: Option<i64>,
    /// Why the probe failed, in keycap's words; empty when it passed.
    pub error: String,
    pub at: DateTime<Utc>,
}

/// One credential version as stored, without its material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CredentialVersion {
    pub vendor: String,
    pub version: i64,
    pub state: CredentialState,
    pub created_at: DateTime<Utc>,
    /// When it last became active.
    pub promoted_at: Option<DateTime<Utc>>,
    /// For a `Previous` version: when it retires.
    pub grace_until: Option<DateTime<Utc>>,
    pub retired_at: Option<DateTime<Utc>>,
    pub probe: Option<CredentialProbe>,
}

impl CredentialVersion {
    /// Whether this (active) version is older than the vendor's
    /// `rotate_after` at `now`.
    pub fn rotation_due(&self, rotate_after: Option<TimeDelta>, now: DateTime<Utc>) -> bool {
        self.state == CredentialState::Active
            && rotate_after.is_some_and(|d| self.created_at + d <= now)
    }
}

/// What a promote did.
#[derive(Clone, Debug)]
pub struct Promotion {
    /// The version now active.
    pub active: CredentialVersion,
    /// The version active before, now previous (in grace) or retired
    /// (no grace); `None` when the promoted version was already active.
    pub previous: Option<CredentialVersion>,
    /// Whether anything changed (promoting the active version does not).
    pub changed: bool,
}

/// The record id a version's sealed material is bound to (associated
/// data): the vendor and the version, so material moved to another vendor
/// or version fails to open. Version 1 keeps the bare vendor name, the id
/// every vendor credential was sealed under before versions existed (vendor
/// names hold no '#').
pub fn record_id(vendor: &str, version: i64) -> String {
    if version == 1 {
        vendor.to_string()
    } else {
        format!("{vendor}#credential-v{version}")
    }
}

/// Longest grace a promote may give the previous version.
pub const MAX_GRACE: TimeDelta = TimeDelta::days(7);

/// The grace used when a promote names none.
pub const DEFAULT_GRACE: TimeDelta = TimeDelta::minutes(10);

/// Parses a promote's `grace` ("1h", "10m", "0s"); empty for the default.
pub fn parse_grace(s: &str) -> Result<TimeDelta, InvalidInput> {
    let t = s.trim();
    if t.is_empty() {
        return Ok(DEFAULT_GRACE);
    }
    let d = humantime::parse_duration(t)
        .map_err(|e| invalid("grace", format!("{s:?} is not a duration like \"1h\": {e}")))?;
    let d = TimeDelta::from_std(d).map_err(|_| invalid("grace", "too large"))?;
    if d > MAX_GRACE {
        return Err(invalid("grace", "must be at most 7 days"));
    }
    Ok(d)
}

/// A version number from a path: 1 or more.
pub fn parse_version(s: &str) -> Result<i64, InvalidInput> {
    s.parse::<i64>()
        .ok()
        .filter(|v| *v >= 1)
        .ok_or_else(|| invalid("version", "a credential version is a number from 1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_bind_vendor_and_version() {
        assert_eq!(record_id("stripe", 1), "stripe");
        assert_eq!(record_id("stripe", 2), "stripe#credential-v2");
        assert_ne!(record_id("a", 12), record_id("a1", 2));
    }

    #[test]
    fn grace_parses_within_bounds() {
        assert_eq!(parse_grace("").unwrap(), DEFAULT_GRACE);
        assert_eq!(parse_grace("1h").unwrap(), TimeDelta::hours(1));
        assert_eq!(parse_grace("0s").unwrap(), TimeDelta::zero());
        assert!(parse_grace("8d").is_err());
        assert!(parse_grace("soon").is_err());
        assert!(parse_version("0").is_err());
        assert_eq!(parse_version("3").unwrap(), 3);
    }

    #[test]
    fn states_round_trip() {
        for s in ["staged", "active", "previous", "retired"] {
            assert_eq!(CredentialState::parse(s).unwrap().as_str(), s);
        }
        assert!(CredentialState::parse("Active").is_none());
    }
}
