//! Row shapes of `vendor_credentials` (migration 0021) and their conversion
//! to `crate::credential` types. Encoding as in `store::sql`: times in
//! microseconds. The sealed material is read only by the queries that need
//! it (fleet snapshot, probe, KEK rotation), never with a version's record.

use super::sql::from_micros;
use super::{StoreError, StoreResult};
use crate::credential::{CredentialProbe, CredentialState, CredentialVersion};

pub(super) const CREDENTIAL_COLUMNS: &str = "vendor, version, state, created_at, promoted_at, \
     grace_until, retired_at, probe_ok, probe_status, probe_error, probed_at";

#[derive(sqlx::FromRow)]
pub struct CredentialRow {
    vendor: String,
    version: i64,
    state: String,
    created_at: i64,
    promoted_at: Option<i64>,
    grace_until: Option<i64>,
    retired_at: Option<i64>,
    probe_ok: Option<bool>,
    probe_status: Option<i64>,
    probe_error: Option<String>,
    probed_at: Option<i64>,
}

fn opt_time(v: Option<i64>, column: &str) -> StoreResult<Option<chrono::DateTime<chrono::Utc>>> {
    v.map(|v| from_micros(v, column)).transpose()
}

impl CredentialRow {
    pub(super) fn into_domain(self) -> StoreResult<CredentialVersion> {
        let probe = match (self.probe_ok, self.probed_at) {
            (Some(ok), Some(at)) => Some(CredentialProbe {
                ok,
                status: self.probe_status,
                error: self.probe_error.unwrap_or_default(),
                at: from_micros(at, "vendor_credentials.probed_at")?,
            }),
            _ => None,
        };
        Ok(CredentialVersion {
            state: CredentialState::parse(&self.state).ok_or_else(|| {
                StoreError::Corrupt(format!("vendor_credentials.state: {:?}", self.state))
            })?,
            vendor: self.vendor,
            version: self.version,
            created_at: from_micros(self.created_at, "vendor_credentials.created_at")?,
            promoted_at: opt_time(self.promoted_at, "vendor_credentials.promoted_at")?,
            grace_until: opt_time(self.grace_until, "vendor_credentials.grace_until")?,
            retired_at: opt_time(self.retired_at, "vendor_credentials.retired_at")?,
            probe,
        })
    }
}

/// A version's sealed material, for a KEK rotation.
#[derive(sqlx::FromRow)]
pub struct SealedCredentialRow {
    pub vendor: String,
    pub version: i64,
    pub sealed: Vec<u8>,
}
