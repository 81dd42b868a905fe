//! Inbound hooks: vendor webhooks (Stripe, Twilio, Resend) that a scenario
//! registers with keycap, so keycap holds the vendor's signing secret and
//! the scenario only ever sees events keycap verified and signed again.
//! Not to be confused with alert webhooks (`crate::webhook`), which keycap
//! sends: these it receives, at `/hooks/{id}` on the proxy.
//!
//! Owns what an endpoint is, how a registration is validated, and the
//! record ids its secrets are sealed under. The verification itself is the
//! vendors' (`keycap_vendors::webhooks`) and runs in the proxy. This module
//! never holds a secret longer than it takes to seal it, and never sends
//! anything.

use chrono::{DateTime, Utc};
use keycap_vendors::webhooks::{HookVendor, DEFAULT_TOLERANCE_SECS};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::domain::{invalid, InvalidInput};

/// At most this many vendor signing secrets at once: an old and a new one
/// during a roll, and one spare.
pub const MAX_SECRETS: usize = 3;

/// The widest tolerance an endpoint may ask for: a day. Event ids are kept
/// that long too, so the bound also bounds the claims table.
pub const MAX_TOLERANCE_SECS: i64 = 86_400;

/// How long a proxy holds an event's claim while the destination answers;
/// a proxy that dies meanwhile leaves it to lapse, so the vendor's retry is
/// relayed after this.
pub const CLAIM_HOLD_SECS: i64 = 60;

/// A registered inbound hook, as stored and read (no secret in it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookEndpoint {
    pub id: String,
    pub vendor: HookVendor,
    pub destination_url: String,
    /// The URL the vendor calls, as it sees it (Twilio signs it); empty
    /// when not given.
    pub public_url: String,
    pub tolerance_secs: i64,
    pub description: String,
    pub created_at: DateTime<Utc>,
}

impl HookEndpoint {
    /// What to give the vendor: the proxy's path for this endpoint.
    pub fn path(&self) -> String {
        format!("/hooks/{}", self.id)
    }

    /// How long a relayed event's id is remembered: past the tolerance on
    /// either side of now, no signed timestamp can make it fresh again.
    /// Twilio signs no timestamp, so its events are remembered for the
    /// longest tolerance.
    pub fn replay_window_secs(&self) -> i64 {
        match self.vendor {
            HookVendor::Twilio => MAX_TOLERANCE_SECS,
            _ => 2 * self.tolerance_secs,
        }
    }
}

/// An endpoint with its secrets sealed (opaque bytes from `crypto::Sealer`).
#[derive(Clone, Debug)]
pub struct StoredHook {
    pub endpoint: HookEndpoint,
    /// The vendor's signing secrets: a JSON list, sealed under
    /// `secrets_record(id)`.
    pub sealed_secrets: Vec<u8>,
    /// keycap's secret for `Keycap-Signature`, sealed under
    /// `relay_record(id)`.
    pub sealed_relay_secret: Vec<u8>,
}

/// An endpoint as read by an admin: no secret, but each vendor secret's
/// fingerprint, so a roll can be followed and the old one removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HookView {
    pub endpoint: HookEndpoint,
    pub secret_fingerprints: Vec<String>,
}

/// An endpoint as proxies get it: with its secrets opened.
#[derive(Clone, Debug)]
pub struct FleetHook {
    pub endpoint: HookEndpoint,
    pub signing_secrets: Vec<String>,
    pub relay_secret: String,
    pub allow_private_destination: bool,
}

/// Fields of a registration as received from a front end.
#[derive(Clone, Debug, Default)]
pub struct HookRequest {
    pub vendor: String,
    pub signing_secret: String,
    pub destination_url: String,
    pub public_url: String,
    /// Empty: 300 seconds. Seconds, or a duration such as `5m`.
    pub tolerance: String,
    pub description: String,
}

/// A validated registration; the secrets in plain text only until sealed.
#[derive(Clone, Debug)]
pub struct NewHook {
    pub endpoint: HookEndpoint,
    pub signing_secret: String,
    pub relay_secret: String,
}

impl NewHook {
    pub fn new(req: &HookRequest, now: DateTime<Utc>) -> Result<Self, InvalidInput> {
        let vendor: HookVendor = req.vendor.trim().parse().map_err(
            |e: keycap_vendors::webhooks::UnknownHookVendor| invalid("vendor", e.to_string()),
        )?;
        let signing_secret = check_signing_secret(vendor, &req.signing_secret)?;
        let destination_url = crate::webhook::parse_url(&req.destination_url)
            .map_err(|e| invalid("destination_url", e.to_string()))?;
        let public_url = if req.public_url.trim().is_empty() {
            if vendor == HookVendor::Twilio {
                return Err(invalid(
                    "public_url",
                    "Twilio signs the URL it calls: give the URL the proxy's /hooks/{id} has \
                     for Twilio (the endpoint's path is appended when the URL ends in /)",
                ));
            }
            String::new()
        } else {
            crate::webhook::parse_url(&req.public_url)
                .map_err(|e| invalid("public_url", e.to_string()))?
        };
        let tolerance_secs = parse_tolerance(&req.tolerance)?;
        if req.description.len() > 256 || req.description.chars().any(char::is_control) {
            return Err(invalid("description", "at most 256 printable characters"));
        }
        let id = format!("hk_{}", uuid::Uuid::new_v4().simple());
        // A public URL ending in `/` is the proxy's base: the endpoint's
        // own path goes after it, so one value serves every endpoint.
        let public_url = match public_url.strip_suffix('/') {
            Some(base) => format!("{base}/hooks/{id}"),
            None => public_url,
        };
        Ok(NewHook {
            endpoint: HookEndpoint {
                id,
                vendor,
                destination_url,
                public_url,
                tolerance_secs,
                description: req.description.clone(),
                created_at: now,
            },
            signing_secret,
            relay_secret: generate_relay_secret(),
        })
    }
}

/// A vendor signing secret as the vendor issues it.
pub fn check_signing_secret(vendor: HookVendor, secret: &str) -> Result<String, InvalidInput> {
    let secret = secret.trim();
    if secret.len() > 512 {
        return Err(invalid("signing_secret", "at most 512 characters"));
    }
    vendor
        .check_secret(secret)
        .map_err(|e| invalid("signing_secret", e))?;
    Ok(secret.to_string())
}

/// Seconds (`300`) or a duration (`5m`); empty: the vendors' 300 s.
pub fn parse_tolerance(s: &str) -> Result<i64, InvalidInput> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(DEFAULT_TOLERANCE_SECS);
    }
    let secs = match s.parse::<i64>() {
        Ok(n) => n,
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| invalid("tolerance", format!("not a duration: {e}")))?
            .as_secs() as i64,
    };
    if !(1..=MAX_TOLERANCE_SECS).contains(&secs) {
        return Err(invalid("tolerance", "must be 1 second to 24 hours"));
    }
    Ok(secs)
}

/// A signing secret's fingerprint, to tell secrets apart without showing
/// one: `sha256:` and the first 12 hex digits of its SHA-256.
pub fn fingerprint(secret: &str) -> String {
    format!(
        "sha256:{}",
        &hex::encode(Sha256::digest(secret.as_bytes()))[..12]
    )
}

/// The record id an endpoint's vendor secrets are sealed under.
pub fn secrets_record(id: &str) -> String {
    format!("hook/{id}")
}

/// The record id an endpoint's relay secret is sealed under.
pub fn relay_record(id: &str) -> String {
    format!("hook-relay/{id}")
}

fn generate_relay_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("kchook_{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(vendor: &str, secret: &str) -> HookRequest {
        HookRequest {
            vendor: vendor.into(),
            signing_secret: secret.into(),
            destination_url: "https://scenario.example/hook".into(),
            ..HookRequest::default()
        }
    }

    #[test]
    fn registrations_are_checked_per_vendor() {
        let h = NewHook::new(&req("stripe", "whsec_abc"), Utc::now()).unwrap();
        assert!(h.endpoint.id.starts_with("hk_"));
        assert_eq!(h.endpoint.tolerance_secs, 300);
        assert!(h.relay_secret.starts_with("kchook_"));
        assert!(NewHook::new(&req("stripe", "sk_live_x"), Utc::now()).is_err());
        assert!(NewHook::new(&req("github", "whsec_abc"), Utc::now()).is_err());
        assert!(NewHook::new(&req("resend", "whsec_bm90IGJhc2U2NA=="), Utc::now()).is_ok());
        // Twilio signs the URL it calls: it must be given.
        let mut t = req("twilio", "0123456789abcdef0123456789abcdef");
        assert!(NewHook::new(&t, Utc::now()).is_err());
        t.public_url = "https://hooks.example.com/".into();
        let h = NewHook::new(&t, Utc::now()).unwrap();
        assert_eq!(
            h.endpoint.public_url,
            format!("https://hooks.example.com/hooks/{}", h.endpoint.id)
        );
        assert_eq!(h.endpoint.replay_window_secs(), MAX_TOLERANCE_SECS);
    }

    #[test]
    fn tolerance_is_seconds_or_a_duration() {
        assert_eq!(parse_tolerance("").unwrap(), 300);
        assert_eq!(parse_tolerance("60").unwrap(), 60);
        assert_eq!(parse_tolerance("10m").unwrap(), 600);
        for bad in ["0", "-5", "2d", "soon"] {
            assert!(parse_tolerance(bad).is_err(), "{bad}");
        }
    }
}
