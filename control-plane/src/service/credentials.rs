//! Credential versions as operations: stage a new version without using
//! it, probe one against the vendor, promote one (acknowledged by the
//! proxies like a revocation), and the sweep that retires previous
//! versions once their grace ends (material erased).
//!
//! Plaintext credentials exist here only in memory, while a version is
//! sealed or probed; nothing returned from this module carries one, and a
//! probe's result never carries the vendor's body.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};

use super::{Confirmation, Control};
use crate::credential::{record_id, CredentialProbe, CredentialVersion, Promotion};
use crate::domain::{self, invalid};
use crate::error::ApiError;
use crate::metrics::ChangeKind;
use crate::probe::ProbeOutcome;
use crate::scope::VendorScope;
use crate::store::StoreError;

/// A version as reads show it: its record, and whether (being active) it
/// is older than the vendor's `rotate_after`.
#[derive(Clone, Debug)]
pub struct CredentialView {
    pub credential: CredentialVersion,
    pub rotation_due: bool,
}

impl Control {
    /// The version a credential written now would be.
    pub(super) async fn next_credential_version(&self, vendor: &str) -> Result<i64, ApiError> {
        let versions = self.store.list_credentials(vendor).await?;
        Ok(versions.iter().map(|c| c.version).max().unwrap_or(0) + 1)
    }

    /// Stores `credential` as the vendor's next version, staged: no proxy
    /// uses it until it is promoted. Checked by the code the proxy injects
    /// with, as a vendor put checks it.
    pub async fn stage_credential(
        &self,
        vendors: &VendorScope,
        name: &str,
        credential: &str,
    ) -> Result<CredentialVersion, ApiError> {
        vendors.check(name)?;
        let vendor = self.vendor_or_not_found(name).await?;
        domain::check_credential(vendor.profile, &vendor.prices, credential)?;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let version = self.next_credential_version(name).await?;
            let sealed = self
                .sealer
                .seal(&record_id(name, version), credential.as_bytes());
            match self
                .store
                .stage_credential(name, version, &sealed, Utc::now())
                .await
            {
                Ok(staged) => {
                    tracing::info!(vendor = %name, version, "credential version staged");
                    return Ok(staged);
                }
                // Another write took the version: seal again as the next.
                Err(StoreError::Conflict(_)) if attempts < 5 => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A vendor's versions, newest first, with the active one's rotation
    /// state.
    pub async fn list_credentials(
        &self,
        vendors: &VendorScope,
        name: &str,
    ) -> Result<Vec<CredentialView>, ApiError> {
        vendors.check(name)?;
        let vendor = self.vendor_or_not_found(name).await?;
        self.credential_views(&vendor).await
    }

    /// Makes one cheap authenticated read against the vendor with
    /// `version` (what `ProbeRequest` names for the vendor's profile) and
    /// records whether the vendor accepted it: a 2xx answer.
    pub async fn probe_credential(
        &self,
        vendors: &VendorScope,
        name: &str,
        version: i64,
    ) -> Result<CredentialVersion, ApiError> {
        vendors.check(name)?;
        let vendor = self.vendor_or_not_found(name).await?;
        let (record, sealed) =
            self.store
                .get_credential(name, version)
                .await?
                .ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "credential version {version} of {name:?} not found"
                    ))
                })?;
        let Some(sealed) = sealed else {
            return Err(ApiError::Conflict(format!(
                "credential version {version} is {}: its material is erased",
                record.state.as_str()
            )));
        };
        let plain = self.sealer.open(&record_id(name, version), &sealed).map_err(|e| {
            tracing::error!(vendor = %name, version, error = %e, "credential version cannot be opened");
            ApiError::Internal
        })?;
        let plain = String::from_utf8(plain).map_err(|_| ApiError::Internal)?;
        let generic = match vendor.profile {
            keycap_proto::profile::Profile::Generic => {
                keycap_proto::prices::GenericRules::from_json(&vendor.prices)
                    .map_err(|e| invalid("prices_json", e.to_string()))?
            }
            _ => keycap_proto::prices::GenericRules {
                as_of: None,
                rules: Vec::new(),
                credential_header: None,
                probe_path: None,
            },
        };
        let injection = keycap_proto::profile::CredentialInjection::new(
            vendor.profile,
            generic.credential_header.as_deref(),
            &plain,
        )
        .map_err(|e| invalid("credential", e.to_string()))?;
        let request = keycap_proto::profile::ProbeRequest::new(
            vendor.profile,
            generic.probe_path.as_deref(),
            &plain,
        )
        .map_err(|e| invalid("version", e.to_string()))?;
        drop(plain);
        let outcome =
            crate::probe::probe(self.upstreams, &vendor.base_url, &request.path, &injection).await;
        let probe = match outcome {
            ProbeOutcome::Answered(status) if (200..300).contains(&status) => CredentialProbe {
                ok: true,
                status: Some(i64::from(status)),
                error: String::new(),
                at: Utc::now(),
            },
            ProbeOutcome::Answered(status) => CredentialProbe {
                ok: false,
                status: Some(i64::from(status)),
                error: format!("the vendor answered {status} to GET {}", request.path),
                at: Utc::now(),
            },
            ProbeOutcome::Failed(why) => CredentialProbe {
                ok: false,
                status: None,
                error: why,
                at: Utc::now(),
            },
        };
        tracing::info!(vendor = %name, version, ok = probe.ok, status = ?probe.status, "credential version probed");
        Ok(self
            .store
            .record_credential_probe(name, version, &probe)
            .await?)
    }

    /// Makes `version` the vendor's active credential and waits until the
    /// connected proxies inject it. The version active before stays usable
    /// for `grace` (calls that already picked it finish with it; a promote
    /// of it rolls back), then the sweep retires it.
    pub async fn promote_credential(
        &self,
        vendors: &VendorScope,
        name: &str,
        version: i64,
        grace: TimeDelta,
        ack_timeout: Option<Duration>,
    ) -> Result<(Promotion, Confirmation), ApiError> {
        vendors.check(name)?;
        let vendor = self.vendor_or_not_found(name).await?;
        // A version that no longer fits the vendor (its profile changed
        // since it was staged) would make every proxy refuse the vendor.
        if let Some((_, Some(sealed))) = self.store.get_credential(name, version).await? {
            if let Ok(plain) = self.sealer.open(&record_id(name, version), &sealed) {
                let plain = String::from_utf8(plain).unwrap_or_default();
                domain::check_credential(vendor.profile, &vendor.prices, &plain)?;
            }
        }
        let promotion = self
            .store
            .promote_credential(name, version, grace, Utc::now())
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => ApiError::NotFound(format!(
                    "credential version {version} of {name:?} not found"
                )),
                other => other.into(),
            })?;
        let head = self.publish_head().await?;
        let confirmation = self
            .confirm_change(head, ack_timeout, ChangeKind::VendorWrite)
            .await?;
        tracing::info!(
            vendor = %name,
            version,
            previous = ?promotion.previous.as_ref().map(|p| p.version),
            changed = promotion.changed,
            unconfirmed = confirmation.unconfirmed.len(),
            "credential version promoted"
        );
        Ok((promotion, confirmation))
    }

    /// Retires the previous versions whose grace has ended (their material
    /// erased); what it retired.
    pub async fn retire_due_credentials(&self, now: DateTime<Utc>) -> Vec<(String, i64)> {
        match self.store.retire_credentials(now).await {
            Ok(retired) => {
                for (vendor, version) in &retired {
                    tracing::info!(vendor = %vendor, version, "credential version retired; material erased");
                }
                retired
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot retire credential versions");
                Vec::new()
            }
        }
    }

    /// Every `period`, retires the previous versions whose grace ended.
    /// Every replica sweeps; a version retires once (the store's update is
    /// conditional).
    pub fn retire_credentials_every(self: &Arc<Self>, period: Duration) {
        self.every(period, |control| async move {
            control.retire_due_credentials(Utc::now()).await;
        });
    }

    /// A vendor's versions as reads show them.
    pub(super) async fn credential_views(
        &self,
        vendor: &domain::Vendor,
    ) -> Result<Vec<CredentialView>, ApiError> {
        let now = Utc::now();
        Ok(self
            .store
            .list_credentials(vendor.name.as_str())
            .await?
            .into_iter()
            .map(|c| CredentialView {
                rotation_due: c.rotation_due(vendor.rotate_after, now),
                credential: c,
            })
            .collect())
    }

    async fn vendor_or_not_found(&self, name: &str) -> Result<domain::Vendor, ApiError> {
        self.store
            .get_vendor(name)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("vendor {name:?} not found")))
    }
}
