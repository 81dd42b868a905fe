//! `keycap key enforce`: switch a key in observe mode to enforcing, in
//! place (docs/observe.md), with its own policy, flags, or the policy
//! suggested from what it was seen doing.

use clap::Args;
use keycap_client::{pb, AdminClient};
use serde_json::Value;

#[derive(Args)]
pub struct EnforceArgs {
    /// The key in observe mode (key_...).
    id: String,
    /// Start from the policy suggested from the key's calls (`keycap key
    /// suggest`): its endpoints and daily and per-call caps; the flags
    /// below override it.
    #[arg(long)]
    suggested: bool,
    /// With --suggested: percent added to the observed maxima (default 25).
    #[arg(long = "margin", requires = "suggested")]
    margin_percent: Option<u32>,
    #[arg(long = "daily-usd-cap")]
    daily_usd_cap: Option<String>,
    #[arg(long = "per-call-usd-cap")]
    per_call_usd_cap: Option<String>,
    #[arg(long = "lifetime-usd-cap")]
    lifetime_usd_cap: Option<String>,
    /// Allowed endpoint, e.g. "POST /v1/charges" (repeatable); none: the
    /// key's own (or the suggestion's).
    #[arg(long = "allow")]
    allow: Vec<String>,
}

pub async fn enforce(c: &mut AdminClient, args: EnforceArgs) -> anyhow::Result<()> {
    let usd = |field: &str, v: &Option<String>| -> anyhow::Result<i64> {
        v.as_deref()
            .map(|s| crate::parse_usd(field, s))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let mut req = pb::EnforceKeyRequest {
        id: args.id.clone(),
        daily_cap_micros: usd("daily-usd-cap", &args.daily_usd_cap)?,
        per_call_cap_micros: usd("per-call-usd-cap", &args.per_call_usd_cap)?,
        lifetime_cap_micros: usd("lifetime-usd-cap", &args.lifetime_usd_cap)?,
        allowed_endpoints: args.allow,
        ack_timeout_ms: 0,
    };
    if args.suggested {
        let s = c
            .suggest
            .suggest_policy(pb::SuggestPolicyRequest {
                key_id: args.id.clone(),
                margin_percent: args.margin_percent,
            })
            .await?
            .into_inner();
        if req.daily_cap_micros == 0 {
            req.daily_cap_micros = s.daily_cap_micros;
        }
        if req.per_call_cap_micros == 0 {
            req.per_call_cap_micros = s.per_call_cap_micros;
        }
        if req.allowed_endpoints.is_empty() {
            req.allowed_endpoints = s.allowed_endpoints;
        }
    }
    eprintln!(
        "switching key {} to enforce: waiting for the proxies to enforce it...",
        args.id
    );
    let r = c.keys.enforce_key(req).await?.into_inner();
    let mut out = r.key.as_ref().map(crate::key_json).unwrap_or(Value::Null);
    out["confirmation"] = crate::confirmation_json(r.confirmation.as_ref());
    crate::print(out);
    crate::warn_unconfirmed("key switched to enforce", r.confirmation.as_ref());
    Ok(())
}
