//! Inbound webhooks: how each vendor signs the events it sends to a
//! scenario, and how keycap signs the events it relays on.
//!
//! Owns the verifiers (`stripe`, `twilio`, `svix` for Resend), written the
//! way each vendor documents its scheme, and keycap's own `Keycap-Signature`
//! (`keycap`), the one signer both planes use (alert webhooks and the
//! inbound relay). Everything here is a pure function of the headers, the
//! body, the secrets and a clock reading handed in: it never reads a clock,
//! remembers an event id (replay is the caller's, fleet-wide) or sends
//! anything.

pub mod check;
pub mod keycap;
pub mod stripe;
pub mod svix;
pub mod twilio;

use std::fmt;
use std::str::FromStr;

use http::HeaderMap;

/// The largest event body keycap accepts from a vendor; larger ones are
/// refused before any signature work (413).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// How far a signed timestamp may be from now, in seconds, unless the
/// endpoint names its own: Stripe's and Svix's documented default.
pub const DEFAULT_TOLERANCE_SECS: i64 = 300;

/// The vendors whose webhooks keycap verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HookVendor {
    Stripe,
    Twilio,
    /// Resend signs with Svix.
    Resend,
}

impl HookVendor {
    pub const ALL: [HookVendor; 3] = [HookVendor::Stripe, HookVendor::Twilio, HookVendor::Resend];

    pub fn as_str(self) -> &'static str {
        match self {
            HookVendor::Stripe => "stripe",
            HookVendor::Twilio => "twilio",
            HookVendor::Resend => "resend",
        }
    }

    /// Whether `secret` has the shape this vendor's signing secrets have,
    /// so a registration with a pasted API key or a truncated secret is
    /// refused at once rather than failing every event later.
    pub fn check_secret(self, secret: &str) -> Result<(), &'static str> {
        match self {
            HookVendor::Stripe => stripe::check_secret(secret),
            HookVendor::Twilio => twilio::check_secret(secret),
            HookVendor::Resend => svix::check_secret(secret),
        }
    }
}

impl fmt::Display for HookVendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HookVendor {
    type Err = UnknownHookVendor;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HookVendor::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or(UnknownHookVendor)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("vendor must be one of stripe, twilio, resend")]
pub struct UnknownHookVendor;

/// Why an event was not verified. The relay answers every one alike (a
/// forger learns nothing from the difference) but records which in the
/// audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the vendor's signature headers are missing")]
    Unsigned,
    #[error("the vendor's signature headers are malformed")]
    Malformed,
    #[error("no signature matches the endpoint's signing secret")]
    Forged,
    #[error("the signed timestamp is outside the endpoint's tolerance")]
    Stale,
}

impl Refusal {
    /// The stable name recorded in the audit.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Unsigned => "unsigned",
            Refusal::Malformed => "malformed",
            Refusal::Forged => "forged",
            Refusal::Stale => "stale",
        }
    }
}

/// One event as it reached keycap.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    /// The URL the vendor called, as the vendor saw it (Twilio signs it):
    /// the endpoint's public URL followed by the request's query, if any.
    pub url: &'a str,
}

/// A verified event: the id that names it for replay detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub event_id: String,
}

/// Verifies `event` against any of `secrets` (several during a secret
/// roll) as `vendor` documents it, with `now` in unix seconds.
pub fn verify(
    vendor: HookVendor,
    secrets: &[&str],
    event: &Inbound<'_>,
    now: i64,
    tolerance_secs: i64,
) -> Result<Verified, Refusal> {
    match vendor {
        HookVendor::Stripe => stripe::verify(secrets, event, now, tolerance_secs),
        HookVendor::Twilio => twilio::verify(secrets, event),
        HookVendor::Resend => svix::verify(secrets, event, now, tolerance_secs),
    }
}

/// A header's value as text; `Unsigned` when absent, `Malformed` when not
/// visible ASCII.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, Refusal> {
    headers
        .get(name)
        .ok_or(Refusal::Unsigned)?
        .to_str()
        .map_err(|_| Refusal::Malformed)
}

/// Whether `t` is within `tolerance` seconds of `now`, either way: a
/// timestamp from the future is as suspect as an old one.
fn fresh(t: i64, now: i64, tolerance: i64) -> bool {
    t.abs_diff(now) <= tolerance.max(0) as u64
}

/// Equality that takes the same time wherever the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}
