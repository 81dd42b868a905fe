//! Inbound hooks (`crate::hooks`): registration, secret rolls, what the
//! proxies get through the policy stream, and the fleet-wide claim of an
//! event id that keeps a replayed event from being relayed twice.
//!
//! Secrets are sealed here before they reach the store and opened only for
//! the policy stream; an admin never reads one back, except keycap's relay
//! secret in the answer that registered the endpoint.

use chrono::{TimeDelta, Utc};

use super::{Control, Delta, KekRotation};
use crate::domain::invalid;
use crate::error::ApiError;
use crate::hooks::{
    check_signing_secret, fingerprint, relay_record, secrets_record, FleetHook, HookRequest,
    HookView, NewHook, StoredHook, CLAIM_HOLD_SECS, MAX_SECRETS,
};
use crate::webhook::delivery::Destinations;

/// An event id as a proxy names it: the vendor's id, or a signature.
const MAX_EVENT_ID_LEN: usize = 256;

impl Control {
    /// Registers an inbound hook; answers it with keycap's relay secret,
    /// shown this once.
    pub async fn create_hook(&self, req: &HookRequest) -> Result<(HookView, String), ApiError> {
        let new = NewHook::new(req, Utc::now())?;
        if let Some(courier) = self.courier.get() {
            courier
                .check_destination(&new.endpoint.destination_url)
                .await
                .map_err(|e| invalid("destination_url", e.to_string()))?;
        }
        let id = new.endpoint.id.clone();
        let secrets = vec![new.signing_secret.clone()];
        let stored = StoredHook {
            sealed_secrets: self.seal_hook_secrets(&id, &secrets)?,
            sealed_relay_secret: self
                .sealer
                .seal(&relay_record(&id), new.relay_secret.as_bytes()),
            endpoint: new.endpoint,
        };
        self.store.insert_hook(&stored).await?;
        self.changed().await;
        tracing::info!(hook = %id, vendor = %stored.endpoint.vendor, "inbound hook registered");
        Ok((
            HookView {
                endpoint: stored.endpoint,
                secret_fingerprints: secrets.iter().map(|s| fingerprint(s)).collect(),
            },
            new.relay_secret,
        ))
    }

    pub async fn list_hooks(&self) -> Result<Vec<HookView>, ApiError> {
        let mut out = Vec::new();
        for h in self.store.list_hooks().await? {
            out.push(self.hook_view(h)?);
        }
        Ok(out)
    }

    pub async fn get_hook(&self, id: &str) -> Result<HookView, ApiError> {
        self.hook_view(self.stored_hook(id).await?)
    }

    pub async fn delete_hook(&self, id: &str) -> Result<(), ApiError> {
        self.store.delete_hook(id).await?;
        self.changed().await;
        tracing::info!(hook = %id, "inbound hook deleted");
        Ok(())
    }

    /// Adds a vendor signing secret (the new one of a roll): events signed
    /// with either verify until the old one is removed.
    pub async fn add_hook_secret(&self, id: &str, secret: &str) -> Result<HookView, ApiError> {
        let hook = self.stored_hook(id).await?;
        let secret = check_signing_secret(hook.endpoint.vendor, secret)?;
        let mut secrets = self.open_hook_secrets(&hook)?;
        if secrets.contains(&secret) {
            return Err(ApiError::Conflict(format!(
                "hook {id} already has this secret"
            )));
        }
        if secrets.len() >= MAX_SECRETS {
            return Err(ApiError::Conflict(format!(
                "hook {id} already has {MAX_SECRETS} secrets; remove one first"
            )));
        }
        secrets.push(secret);
        self.store
            .set_hook_secrets(id, &self.seal_hook_secrets(id, &secrets)?)
            .await?;
        self.changed().await;
        tracing::info!(hook = %id, secrets = secrets.len(), "inbound hook secret added");
        self.get_hook(id).await
    }

    /// Removes the vendor signing secret with `fingerprint` (the old one,
    /// once the vendor signs with the new); the last one stays.
    pub async fn remove_hook_secret(
        &self,
        id: &str,
        fingerprint_: &str,
    ) -> Result<HookView, ApiError> {
        let hook = self.stored_hook(id).await?;
        let mut secrets = self.open_hook_secrets(&hook)?;
        let before = secrets.len();
        secrets.retain(|s| fingerprint(s) != fingerprint_);
        if secrets.len() == before {
            return Err(ApiError::NotFound(format!(
                "secret {fingerprint_} of hook {id}"
            )));
        }
        if secrets.is_empty() {
            return Err(ApiError::Conflict(format!(
                "{fingerprint_} is hook {id}'s only secret; add its successor first"
            )));
        }
        self.store
            .set_hook_secrets(id, &self.seal_hook_secrets(id, &secrets)?)
            .await?;
        self.changed().await;
        tracing::info!(hook = %id, secrets = secrets.len(), "inbound hook secret removed");
        self.get_hook(id).await
    }

    /// Every hook as proxies get it; one whose secrets cannot be opened is
    /// withheld (its events then meet a 404, never an unverified relay).
    pub async fn fleet_hooks(&self) -> Result<Vec<FleetHook>, ApiError> {
        let mut out = Vec::new();
        for h in self.store.list_hooks().await? {
            out.extend(self.fleet_hook(h));
        }
        Ok(out)
    }

    /// Adds the current state of hooks `ids` to `delta`.
    pub(super) async fn hook_delta(
        &self,
        ids: std::collections::BTreeSet<String>,
        delta: &mut Delta,
    ) -> Result<(), ApiError> {
        for id in ids {
            match self
                .store
                .get_hook(&id)
                .await?
                .and_then(|h| self.fleet_hook(h))
            {
                Some(h) => delta.upsert_hooks.push(h),
                None => delta.removed_hooks.push(id),
            }
        }
        Ok(())
    }

    /// Claims an event of hook `hook_id` for node `node_id` while it is
    /// relayed: true for exactly one caller fleet-wide. An unknown hook
    /// claims nothing.
    pub async fn claim_hook_event(
        &self,
        node_id: &str,
        hook_id: &str,
        event_id: &str,
    ) -> Result<bool, ApiError> {
        crate::domain::parse_node_id(node_id)?;
        check_event_id(event_id)?;
        if self.store.get_hook(hook_id).await?.is_none() {
            return Ok(false);
        }
        let now = Utc::now();
        let until = now + TimeDelta::seconds(CLAIM_HOLD_SECS);
        Ok(self
            .store
            .claim_hook_event(hook_id, event_id, now, until)
            .await?)
    }

    /// Ends a claim: the id is remembered for the hook's replay window once
    /// relayed, forgotten otherwise.
    pub async fn settle_hook_event(
        &self,
        node_id: &str,
        hook_id: &str,
        event_id: &str,
        relayed: bool,
    ) -> Result<(), ApiError> {
        crate::domain::parse_node_id(node_id)?;
        check_event_id(event_id)?;
        let keep_until = match (relayed, self.store.get_hook(hook_id).await?) {
            (true, Some(h)) => {
                Some(Utc::now() + TimeDelta::seconds(h.endpoint.replay_window_secs()))
            }
            _ => None,
        };
        Ok(self
            .store
            .settle_hook_event(hook_id, event_id, keep_until)
            .await?)
    }

    /// Re-wraps every hook's sealed secrets under this replica's primary
    /// KEK (part of `rotate_kek`). A hook rolled meanwhile was sealed under
    /// a current KEK anyway; one this replica cannot open is named.
    pub(super) async fn rewrap_hooks(&self, out: &mut KekRotation) -> Result<(), ApiError> {
        for h in self.store.list_hooks().await? {
            let id = h.endpoint.id.clone();
            let secrets = self.sealer.rewrap(&secrets_record(&id), &h.sealed_secrets);
            let relay = self
                .sealer
                .rewrap(&relay_record(&id), &h.sealed_relay_secret);
            match (secrets, relay) {
                (Ok(None), Ok(None)) => out.already_current += 1,
                (Ok(s), Ok(r)) => {
                    let new_secrets = s.unwrap_or_else(|| h.sealed_secrets.clone());
                    let new_relay = r.unwrap_or_else(|| h.sealed_relay_secret.clone());
                    let replaced = self
                        .store
                        .rewrap_hook_secrets(
                            &id,
                            (&h.sealed_secrets, &h.sealed_relay_secret),
                            (&new_secrets, &new_relay),
                        )
                        .await?;
                    if replaced {
                        out.rewrapped += 1;
                    } else {
                        out.already_current += 1;
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(hook = %id, error = %e, "inbound hook secrets cannot be re-wrapped");
                    out.failed_vendors.push(format!("hook {id}"));
                }
            }
        }
        Ok(())
    }

    async fn stored_hook(&self, id: &str) -> Result<StoredHook, ApiError> {
        self.store
            .get_hook(id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("hook {id}")))
    }

    fn hook_view(&self, h: StoredHook) -> Result<HookView, ApiError> {
        let secrets = self.open_hook_secrets(&h)?;
        Ok(HookView {
            secret_fingerprints: secrets.iter().map(|s| fingerprint(s)).collect(),
            endpoint: h.endpoint,
        })
    }

    fn fleet_hook(&self, h: StoredHook) -> Option<FleetHook> {
        let id = h.endpoint.id.clone();
        let opened = self.open_hook_secrets(&h).and_then(|secrets| {
            let relay = self
                .sealer
                .open(&relay_record(&id), &h.sealed_relay_secret)
                .map_err(|_| ApiError::Internal)?;
            Ok((
                secrets,
                String::from_utf8(relay).map_err(|_| ApiError::Internal)?,
            ))
        });
        match opened {
            Ok((signing_secrets, relay_secret)) => Some(FleetHook {
                signing_secrets,
                relay_secret,
                allow_private_destination: self
                    .courier
                    .get()
                    .is_some_and(|c| c.destinations() == Destinations::AllowPrivate),
                endpoint: h.endpoint,
            }),
            Err(_) => {
                tracing::error!(hook = %id, "inbound hook secrets cannot be opened; withheld from proxies");
                None
            }
        }
    }

    fn open_hook_secrets(&self, h: &StoredHook) -> Result<Vec<String>, ApiError> {
        let plain = self
            .sealer
            .open(&secrets_record(&h.endpoint.id), &h.sealed_secrets)
            .map_err(|e| {
                tracing::error!(hook = %h.endpoint.id, error = %e, "inbound hook secrets cannot be opened");
                ApiError::Internal
            })?;
        serde_json::from_slice(&plain).map_err(|_| ApiError::Internal)
    }

    fn seal_hook_secrets(&self, id: &str, secrets: &[String]) -> Result<Vec<u8>, ApiError> {
        let plain = serde_json::to_vec(secrets).map_err(|_| ApiError::Internal)?;
        Ok(self.sealer.seal(&secrets_record(id), &plain))
    }
}

fn check_event_id(event_id: &str) -> Result<(), ApiError> {
    if event_id.is_empty() || event_id.len() > MAX_EVENT_ID_LEN || event_id.contains('\0') {
        return Err(invalid("event_id", "must be 1-256 characters").into());
    }
    Ok(())
}
