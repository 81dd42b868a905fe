//! Row shape of the inbound hook tables (migration 0022) and its
//! conversion to `crate::hooks`. Encoding as in `store::sql`: times in
//! microseconds; secrets only ever sealed.

use super::sql::from_micros;
use super::{StoreError, StoreResult};
use crate::hooks::{HookEndpoint, StoredHook};

pub(super) const HOOK_COLUMNS: &str = "id, vendor, sealed_secrets, sealed_relay_secret, \
     destination_url, public_url, tolerance_secs, description, created_at";

/// The change-log kind of an inbound hook: proxies learn endpoints (and
/// their secrets) through the policy stream, as they learn vendors.
pub(super) const CHANGE_HOOK: &str = "hook";

#[derive(sqlx::FromRow)]
pub struct HookRow {
    id: String,
    vendor: String,
    sealed_secrets: Vec<u8>,
    sealed_relay_secret: Vec<u8>,
    destination_url: String,
    public_url: String,
    tolerance_secs: i64,
    description: String,
    created_at: i64,
}

impl HookRow {
    pub(super) fn into_domain(self) -> StoreResult<StoredHook> {
        Ok(StoredHook {
            endpoint: HookEndpoint {
                vendor: self
                    .vendor
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("hook_endpoints.vendor: {e}")))?,
                id: self.id,
                destination_url: self.destination_url,
                public_url: self.public_url,
                tolerance_secs: self.tolerance_secs,
                description: self.description,
                created_at: from_micros(self.created_at, "hook_endpoints.created_at")?,
            },
            sealed_secrets: self.sealed_secrets,
            sealed_relay_secret: self.sealed_relay_secret,
        })
    }
}
