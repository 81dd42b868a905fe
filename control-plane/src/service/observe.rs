//! Observe mode's switch to enforcement (docs/observe.md): a key minted in
//! observe mode starts enforcing in place — same id, same budget, same
//! secret — with the policy it was observed against or one given now (a
//! suggestion's, say). The answer comes once every connected proxy
//! enforces it, like a revocation's.
//!
//! The switch lowers what the budget machinery holds the key to (from the
//! observe ceiling to its daily cap, plus its lifetime cap). Grants after
//! the switch are decided under the new caps with every lease already out
//! counted, and each proxy hands back the key's lease as it applies the
//! switch, so from the confirmation on no call is served from budget
//! granted under the ceiling. The answer waits for those leases too: a
//! proxy still holding one when the wait ends is named unconfirmed.

use std::time::Duration;

use chrono::Utc;
use keycap_proto::Micros;

use super::{Confirmation, Control, KeyView};
use crate::domain::{self, EnforcedTerms, InvalidInput};
use crate::error::ApiError;
use crate::metrics::ChangeKind;
use crate::scope::VendorScope;

/// How often a switch looks whether the proxies handed the key's leases
/// back.
const LEASE_POLL: Duration = Duration::from_millis(10);

/// What an operator changes as a key starts enforcing; unset parts keep
/// the key's own.
#[derive(Clone, Debug, Default)]
pub struct EnforceChange {
    daily_cap: Option<Micros>,
    per_call_cap: Option<Micros>,
    lifetime_cap: Option<Micros>,
    allowed_endpoints: Option<Vec<String>>,
}

impl EnforceChange {
    pub fn new(
        daily_cap: Option<Micros>,
        per_call_cap: Option<Micros>,
        lifetime_cap: Option<Micros>,
        allowed_endpoints: Option<&[String]>,
    ) -> Result<Self, InvalidInput> {
        let allowed_endpoints = allowed_endpoints
            .map(domain::parse_allowed_endpoints)
            .transpose()?;
        Ok(EnforceChange {
            daily_cap: daily_cap
                .map(|c| domain::parse_cap("daily_usd_cap", c))
                .transpose()?,
            per_call_cap: per_call_cap
                .map(|c| domain::parse_cap("per_call_usd_cap", c))
                .transpose()?,
            lifetime_cap: lifetime_cap
                .map(|c| domain::parse_cap("lifetime_usd_cap", c))
                .transpose()?,
            allowed_endpoints,
        })
    }

    /// The terms `key` enforces after the switch.
    fn terms_for(&self, key: &domain::VaultKey) -> EnforcedTerms {
        EnforcedTerms {
            daily_cap: self.daily_cap.unwrap_or(key.daily_cap),
            per_call_cap: self.per_call_cap.or(key.per_call_cap),
            lifetime_cap: self.lifetime_cap.or(key.lifetime_cap),
            allowed_endpoints: self
                .allowed_endpoints
                .clone()
                .unwrap_or_else(|| key.allowed_endpoints.clone()),
        }
    }
}

impl Control {
    /// Switches key `id` from observe mode to enforcing (see module docs)
    /// and waits until the proxies enforce it. A key of a vendor the caller
    /// may not act on is not found; one revoked or not observing is a
    /// `conflict`.
    pub async fn enforce_key(
        &self,
        vendors: &VendorScope,
        id: &str,
        change: &EnforceChange,
        ack_timeout: Option<Duration>,
    ) -> Result<(KeyView, Confirmation), ApiError> {
        let key = self.key_of_allowed_vendor(vendors, id).await?;
        let terms = change.terms_for(&key);
        let started = tokio::time::Instant::now();
        let deadline = started + ack_timeout.unwrap_or(self.ack_timeout);
        let key = self.store.enforce_key(id, &terms).await?;
        let version = self.publish_head().await?;
        tracing::info!(key = %id, budget = %key.budget_id(), daily_cap = %terms.daily_cap, "key switched from observe to enforce");
        let mut confirmation = self
            .confirm_change(version, ack_timeout, ChangeKind::KeyEnforce)
            .await?;
        // A proxy hands the key's lease back as it applies the switch; until
        // it is back, it counts against the new caps as if spent, and a
        // call right after this answer could be refused for it.
        let budget = [key.budget_id().to_string()];
        loop {
            let holders = self.store.lease_holders(&budget, Utc::now()).await?;
            if holders.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                for node in holders {
                    if !confirmation.unconfirmed.contains(&node) {
                        confirmation.unconfirmed.push(node);
                    }
                }
                confirmation
                    .confirmed
                    .retain(|n| !confirmation.unconfirmed.contains(n));
                break;
            }
            tokio::time::sleep(LEASE_POLL).await;
        }
        let view = self.view(key, Utc::now()).await?;
        Ok((view, confirmation))
    }
}
