//! Refused calls as the operator reads them: the proxies' refusal records
//! (audit entries with outcome `refused`, one per key, reason, minute and
//! proxy) summed per key and reason. Read-only; limited to the caller's
//! vendors like every audit read.

use chrono::Utc;

use super::Control;
use crate::error::ApiError;
use crate::scope::VendorScope;
use crate::store::{RefusalCount, RefusalCountQuery};

impl Control {
    /// Calls refused today (UTC) per key and reason, most first.
    pub async fn refusals_today(
        &self,
        vendors: &VendorScope,
    ) -> Result<Vec<RefusalCount>, ApiError> {
        let q = RefusalCountQuery {
            since: Utc::now()
                .date_naive()
                .and_hms_opt(0, 0, 0)
                .map(|t| t.and_utc()),
            vendors: vendors.list(),
            ..RefusalCountQuery::default()
        };
        Ok(self.store.refusal_counts(&q).await?)
    }
}
