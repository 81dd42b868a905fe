//! Vault key rolls as operations: minting a key's successor, and retiring
//! rolled keys when their grace ends.
//!
//! A successor has its predecessor's policy and spends its predecessor's
//! budget (`VaultKey::budget_id`, the chain's first key): the store counts
//! spend and leases by that budget and the proxies pool their leases by it,
//! so no roll, however many, gives a chain more than its caps. This module
//! never revokes a budget on its own: a grace's end revokes the rolled key
//! alone, through the store's revocation and the proxies' confirmation.
//! Deadlines are stored with the key, so a restarted replica (or another
//! one) retires what is due.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use keycap_proto::secret::{self, SecretKind};

use super::{Confirmation, Control, KeyView};
use crate::domain::{KeyRoll, VaultKey};
use crate::error::ApiError;
use crate::metrics::ChangeKind;
use crate::scope::VendorScope;
use crate::store::StoreError;

/// How often each replica looks for rolled keys whose grace has ended. A
/// rolled key may serve this much past its deadline (plus the proxies'
/// confirmation); it spends the chain's one budget meanwhile, so the caps
/// hold whatever the delay.
const RETIRE_EVERY: Duration = Duration::from_millis(250);
/// Rolled keys retired per round at most.
const RETIRE_BATCH: u32 = 100;

/// What a roll answers: the successor (with its secret, shown once), the
/// rolled key as now stored, and which proxies serve the successor.
pub struct Rolled {
    pub successor: KeyView,
    pub secret: String,
    pub rolled: KeyView,
    pub confirmation: Confirmation,
}

impl Control {
    /// Mints the successor of key `id` (same policy, same budget) and waits
    /// until the proxies serve it, like a creation; `id` keeps working for
    /// `grace`, then is revoked. Refused for a key of a vendor the caller may
    /// not act on (not found), one revoked or expired (`conflict`) or one
    /// already rolled (`key_already_rolled`).
    pub async fn roll_key(
        &self,
        vendors: &VendorScope,
        id: &str,
        grace: TimeDelta,
        ack_timeout: Option<Duration>,
    ) -> Result<Rolled, ApiError> {
        let old = self.key_of_allowed_vendor(vendors, id).await?;
        if let Some(next) = &old.roll.successor_id {
            return Err(already_rolled(id, next));
        }
        let now = Utc::now();
        let secret_text = secret::generate(SecretKind::VaultKey, &self.key_env);
        let successor = VaultKey {
            id: format!("key_{}", uuid::Uuid::new_v4().simple()),
            key_hash: secret::hash(&secret_text),
            key_prefix: secret::display_prefix(&secret_text),
            created_at: now,
            revoked_at: None,
            roll: KeyRoll {
                budget_id: Some(old.budget_id().to_string()),
                rolled_from: Some(old.id.clone()),
                successor_id: None,
                retire_at: None,
            },
            ..old.clone()
        };
        let rolled = match self.store.roll_key(id, &successor, now + grace, now).await {
            Ok(rolled) => rolled,
            // Another roll got there first.
            Err(StoreError::Conflict(why)) => {
                return Err(match self.store.get_key(id).await? {
                    Some(k) if k.roll.successor_id.is_some() => {
                        already_rolled(id, k.roll.successor_id.as_deref().unwrap_or_default())
                    }
                    _ => ApiError::Conflict(why),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let version = self.publish_head().await?;
        tracing::info!(key = %id, successor = %successor.id, budget = %successor.budget_id(), grace_s = grace.num_seconds(), "key rolled");
        let confirmation = self
            .confirm_change(version, ack_timeout, ChangeKind::KeyCreation)
            .await?;
        let now = Utc::now();
        Ok(Rolled {
            successor: self.view(successor, now).await?,
            secret: secret_text,
            rolled: self.view(rolled, now).await?,
            confirmation,
        })
    }

    /// Every `RETIRE_EVERY`, revokes the rolled keys whose grace has ended
    /// (`retire_due`).
    pub fn retire_rolled_keys_periodically(self: &Arc<Self>) {
        self.every(RETIRE_EVERY, |control| async move {
            if let Err(e) = control.retire_due().await {
                tracing::warn!(error = %e, "cannot retire rolled keys");
            }
        });
    }

    /// Revokes each rolled key whose grace has ended and waits for the
    /// proxies to confirm. Only the rolled key goes: its successor spends
    /// the budget on, so nothing is fenced (an unconfirmed proxy that still
    /// serves the old key draws on the same budget, inside the same caps).
    /// Replicas may race on a key; revoking is idempotent. Returns the keys
    /// retired.
    pub async fn retire_due(&self) -> Result<Vec<String>, ApiError> {
        let due = self.store.due_retirements(Utc::now(), RETIRE_BATCH).await?;
        if due.is_empty() {
            return Ok(due);
        }
        for id in &due {
            self.store.revoke_key(id, Utc::now()).await?;
        }
        let version = self.publish_head().await?;
        let confirmation = self
            .confirm_change(version, None, ChangeKind::Revocation)
            .await?;
        if confirmation.unconfirmed.is_empty() {
            tracing::info!(keys = ?due, version, "rolled keys retired; every connected proxy confirmed");
        } else {
            tracing::warn!(keys = ?due, version, unconfirmed = ?confirmation.unconfirmed, "rolled keys retired; not every proxy confirmed");
        }
        Ok(due)
    }
}

fn already_rolled(id: &str, successor: &str) -> ApiError {
    ApiError::KeyAlreadyRolled(format!(
        "key {id:?} was already rolled (its successor is {successor:?}); roll the successor instead"
    ))
}
