//! Policy suggestions: an enforcing key policy drawn from what a key was
//! seen doing in the audit ledger — the endpoints it called as `METHOD
//! /path` templates (ids collapsed to `*`), and daily and per-call caps from
//! the observed maxima plus a stated margin — shaped like a create-key body
//! (docs/observe.md).
//!
//! It reads only the key's own audit entries of forwarded calls (refusal
//! entries stand for calls that never happened) and changes nothing. It must
//! never propose a cap below what was observed: amounts round up to whole
//! cents, and the margin only adds.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use keycap_proto::Micros;

use super::{AdminPrincipal, Control};
use crate::domain::{invalid, AuditQuery, Outcome, VaultKey};
use crate::error::ApiError;

/// The margin added to observed maxima unless the caller names one.
pub const DEFAULT_MARGIN_PERCENT: u32 = 25;
/// The largest margin a caller may ask for.
pub const MAX_MARGIN_PERCENT: u32 = 1000;
/// How many of the key's most recent audit entries are read.
pub const MAX_OBSERVED_ENTRIES: usize = 10_000;
const PAGE: u32 = 1000;

/// What the suggestion was drawn from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Forwarded calls read.
    pub calls: u64,
    /// UTC days with at least one of them.
    pub days: u64,
    /// The largest settled spend of one UTC day.
    pub max_daily: Micros,
    /// The largest single reservation (what a per-call cap is held to).
    pub max_call: Micros,
    pub first_at: Option<DateTime<Utc>>,
    pub last_at: Option<DateTime<Utc>>,
    /// Only the most recent `MAX_OBSERVED_ENTRIES` entries were read.
    pub truncated: bool,
}

/// An enforcing policy for a key, as a create-key body would state it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suggestion {
    pub vendor: String,
    pub allowed_endpoints: Vec<String>,
    pub daily_cap: Micros,
    pub per_call_cap: Micros,
    pub margin_percent: u32,
    pub observed: Observed,
}

/// A path segment that names one object rather than a collection: all
/// digits, a prefixed id (`cus_NffrFeUfNV2Hib`, `AC0123...`), a UUID, or a
/// long token mixing letters and digits. API versions (`v1`, `2010-04-01`)
/// and file-like names (`Messages.json`) stay literal.
fn is_id(segment: &str) -> bool {
    let bytes = segment.as_bytes();
    if bytes.is_empty() {
        return false;
    }
    let digits = bytes.iter().filter(|b| b.is_ascii_digit()).count();
    let letters = bytes.iter().filter(|b| b.is_ascii_alphabetic()).count();
    if digits == bytes.len() {
        return true;
    }
    // v1, v2beta: a version, not an id.
    if segment.len() <= 8
        && segment.starts_with('v')
        && segment[1..].starts_with(|c: char| c.is_ascii_digit())
    {
        return false;
    }
    // A dated version (2010-04-01, 2023-06-01).
    if segment.len() == 10 && bytes[4] == b'-' && bytes[7] == b'-' && digits == 8 {
        return false;
    }
    if segment.contains('.') {
        return false;
    }
    let uuid = segment.len() == 36
        && segment.chars().filter(|&c| c == '-').count() == 4
        && segment.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    let prefixed = segment
        .split_once('_')
        .is_some_and(|(p, rest)| !p.is_empty() && rest.len() >= 6 && digits > 0);
    let token = segment.len() >= 16 && digits > 0 && letters > 0;
    uuid || prefixed || token
}

/// `METHOD /path` with every id-like segment collapsed to `*`.
pub fn template(method: &str, path: &str) -> String {
    let segments: Vec<&str> = path
        .trim_start_matches('/')
        .split('/')
        .map(|s| if is_id(s) { "*" } else { s })
        .collect();
    format!("{method} /{}", segments.join("/"))
}

/// `m` plus `percent` percent, rounded up to whole cents.
fn with_margin(m: Micros, percent: u32) -> Micros {
    const CENT: i64 = 10_000;
    // Ceiling divisions of non-negative amounts.
    let up = |n: i128, d: i128| (n + d - 1) / d;
    let raised = up(i128::from(m.0.max(0)) * i128::from(100 + percent), 100);
    let cents = up(raised, i128::from(CENT)).max(1);
    Micros(i64::try_from(cents * i128::from(CENT)).unwrap_or(i64::MAX))
}

/// One forwarded call of the key, as its audit entry recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedCall {
    pub method: String,
    pub path: String,
    /// The UTC day of its budget window.
    pub day: String,
    pub reserved: Micros,
    pub cost: Micros,
    pub at: DateTime<Utc>,
}

/// The suggestion from the key's forwarded calls (any order).
pub fn suggest(
    key: &VaultKey,
    calls: &[ObservedCall],
    margin_percent: u32,
    truncated: bool,
) -> Suggestion {
    let mut endpoints = BTreeSet::new();
    let mut per_day: BTreeMap<&str, i64> = BTreeMap::new();
    let mut max_call = Micros::ZERO;
    let (mut first_at, mut last_at) = (None::<DateTime<Utc>>, None::<DateTime<Utc>>);
    for c in calls {
        endpoints.insert(template(&c.method, &c.path));
        *per_day.entry(c.day.as_str()).or_default() += c.cost.0;
        max_call = max_call.max(c.reserved).max(c.cost);
        first_at = Some(first_at.map_or(c.at, |f| f.min(c.at)));
        last_at = Some(last_at.map_or(c.at, |l| l.max(c.at)));
    }
    let max_daily = Micros(per_day.values().copied().max().unwrap_or(0));
    let per_call_cap = with_margin(max_call, margin_percent);
    // A day's cap must also admit its largest call's reservation.
    let daily_cap = with_margin(max_daily, margin_percent).max(per_call_cap);
    Suggestion {
        vendor: key.vendor.as_str().to_string(),
        allowed_endpoints: endpoints.into_iter().collect(),
        daily_cap,
        per_call_cap,
        margin_percent,
        observed: Observed {
            calls: calls.len() as u64,
            days: per_day.len() as u64,
            max_daily,
            max_call,
            first_at,
            last_at,
            truncated,
        },
    }
}

impl Control {
    /// Suggests an enforcing policy for key `id` from its audit entries
    /// (scope checked by the front end). `margin_percent` `None`: the
    /// default.
    pub async fn suggest_policy(
        &self,
        caller: &AdminPrincipal,
        id: &str,
        margin_percent: Option<u32>,
    ) -> Result<Suggestion, ApiError> {
        let margin = margin_percent.unwrap_or(DEFAULT_MARGIN_PERCENT);
        if margin > MAX_MARGIN_PERCENT {
            return Err(invalid(
                "margin_percent",
                format!("must be between 0 and {MAX_MARGIN_PERCENT}"),
            )
            .into());
        }
        let key = self.key_of_allowed_vendor(&caller.vendors, id).await?;
        let mut calls = Vec::new();
        let mut before_seq = None;
        let mut truncated = false;
        loop {
            let page = self
                .store
                .query_audit(&AuditQuery {
                    key_id: Some(key.id.clone()),
                    before_seq,
                    limit: PAGE,
                    ..AuditQuery::default()
                })
                .await?;
            let last = page.last().map(|e| e.seq);
            let full = page.len() == PAGE as usize;
            for e in page {
                if e.event.outcome == Outcome::Refused {
                    continue;
                }
                let ev = e.event;
                calls.push(ObservedCall {
                    method: ev.method,
                    path: ev.path,
                    day: ev.day,
                    reserved: ev.reserved,
                    cost: ev.cost,
                    at: ev.at,
                });
            }
            if calls.len() >= MAX_OBSERVED_ENTRIES {
                truncated = full;
                break;
            }
            match (full, last) {
                (true, Some(seq)) => before_seq = Some(seq),
                _ => break,
            }
        }
        if calls.is_empty() {
            return Err(ApiError::Conflict(format!(
                "key {id:?} has no forwarded calls in the audit ledger to suggest a policy from"
            )));
        }
        Ok(suggest(&key, &calls, margin, truncated))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_collapse_and_versions_and_collections_stay() {
        assert_eq!(
            template("POST", "/v1/customers/cus_NffrFeUfNV2Hib/sources"),
            "POST /v1/customers/*/sources"
        );
        assert_eq!(
            template("POST", "/v1/payment_intents"),
            "POST /v1/payment_intents"
        );
        assert_eq!(template("GET", "/v1/orders/12345"), "GET /v1/orders/*");
        assert_eq!(
            template(
                "POST",
                "/2010-04-01/Accounts/AC0123456789abcdef0123456789abcdef/Messages.json"
            ),
            "POST /2010-04-01/Accounts/*/Messages.json"
        );
        assert_eq!(
            template("GET", "/v1/files/0b6f2c1e-8a1d-4c3b-9f4e-2a7d5c6b8e90"),
            "GET /v1/files/*"
        );
        assert_eq!(
            template("POST", "/v1/chat/completions"),
            "POST /v1/chat/completions"
        );
        assert_eq!(template("POST", "/v2beta/emails"), "POST /v2beta/emails");
        // Every template is a valid allowed endpoint that admits its call.
        for (m, p) in [
            ("POST", "/v1/customers/cus_NffrFeUfNV2Hib/sources"),
            ("GET", "/v1/orders/12345"),
        ] {
            let pattern = keycap_proto::endpoint::EndpointPattern::parse(&template(m, p)).unwrap();
            assert!(pattern.matches(m, p), "{m} {p}");
        }
    }

    #[test]
    fn caps_are_the_observed_maxima_plus_the_margin_in_whole_cents() {
        assert_eq!(with_margin(Micros(2_000_000), 25), Micros(2_500_000));
        assert_eq!(with_margin(Micros(1), 0), Micros(10_000));
        assert_eq!(with_margin(Micros(1_000_001), 0), Micros(1_010_000));
        assert_eq!(with_margin(Micros::ZERO, 25), Micros(10_000));
    }
}
