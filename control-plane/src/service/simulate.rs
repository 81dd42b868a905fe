//! Dry runs: what the proxy would do with one vendor call of a key —
//! allowed or the refusal and the rule behind it, the price quote and how it
//! was reached, what the key's budget tree has left — answered by the
//! control plane without forwarding anything (docs/simulate.md).
//!
//! The checks are the proxy's own code where the proxy's decision depends
//! only on the call and the key: the allowed endpoints
//! (`keycap_proto::endpoint`), the headers that make a body ambiguous
//! (`keycap_vendors::body_headers`), pricing (`keycap_vendors::pricing`),
//! the per-call cap; the daily and lifetime remainders come from the same
//! sums a lease grant decides on. What depends on the caller or on one
//! proxy's memory (network, zone, rate, idempotency) is named as not
//! checked, never guessed.
//!
//! It must never reserve, forward, read a vendor or open a credential: a
//! call whose price needs a vendor object first (`PriceModel::lookups`) is
//! answered `quote_needs_lookup`, never with a made-up price. Dry runs are
//! counted per admin token (`DryRunLimiter`) so they cannot be used to
//! hammer the store.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use keycap_proto::Micros;
use keycap_vendors::pricing::{self, Catalog, PriceRequest, PricingError, QuoteKind};

use super::{AdminPrincipal, Control};
use crate::domain::{invalid, InvalidInput, KeyStatus};
use crate::error::ApiError;
use crate::store::BudgetLevel;

/// Dry runs one admin token may make per minute.
pub const DRY_RUNS_PER_MINUTE: u32 = 60;
/// The largest simulated body, in bytes (the proxy's default
/// `--max-body-bytes`).
pub const MAX_DRY_RUN_BODY: usize = 1024 * 1024;
const MAX_HEADERS: usize = 100;
const MAX_PATH: usize = 8 * 1024;

/// Checks a dry run cannot make: they depend on the caller's address, the
/// proxy that would serve the call, or that proxy's memory.
pub const NOT_CHECKED: [&str; 4] = ["network", "zone", "rate_limit", "idempotency"];

/// The price tables shipped with this build, parsed once. A vendor's own
/// `prices` replace them as they do on the proxy; a proxy started with its
/// own table files (`--openai-prices`, ...) prices by those instead.
static CATALOG: LazyLock<Catalog> = LazyLock::new(Catalog::builtin);

/// One call to simulate, validated.
#[derive(Clone, Debug)]
pub struct DryRun {
    pub key_id: String,
    pub method: String,
    /// The vendor path, without its query.
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl DryRun {
    /// `path` is the path as the vendor sees it, with its query string if
    /// any. The agent's credential headers are dropped as the proxy drops
    /// them before pricing.
    pub fn new(
        key_id: &str,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<Self, InvalidInput> {
        let key_id = key_id.trim();
        if key_id.is_empty() {
            return Err(invalid("key_id", "a key id (key_...) is required"));
        }
        let method = http::Method::from_bytes(method.as_bytes())
            .ok()
            .filter(|m| !m.as_str().is_empty())
            .ok_or_else(|| invalid("request.method", "an HTTP method (POST, GET, ...)"))?;
        if !path.starts_with('/') || path.len() > MAX_PATH {
            return Err(invalid(
                "request.path",
                "the path as the vendor sees it, starting with '/' (\"/v1/payment_intents\")",
            ));
        }
        if path.contains('#') || path.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return Err(invalid("request.path", "not a valid request path"));
        }
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (path.to_string(), None),
        };
        if headers.len() > MAX_HEADERS {
            return Err(invalid(
                "request.headers",
                format!("at most {MAX_HEADERS} headers"),
            ));
        }
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| invalid("request.headers", "a header name is not valid"))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| invalid("request.headers", "a header value is not valid"))?;
            map.append(name, value);
        }
        // The proxy removes the agent's credential before pricing.
        map.remove(http::header::AUTHORIZATION);
        map.remove("x-api-key");
        if body.len() > MAX_DRY_RUN_BODY {
            return Err(invalid(
                "request.body",
                format!("at most {MAX_DRY_RUN_BODY} bytes"),
            ));
        }
        Ok(DryRun {
            key_id: key_id.to_string(),
            method: method.as_str().to_string(),
            path,
            query,
            headers: map,
            body: Bytes::from(body),
        })
    }
}

/// Why the proxy would refuse the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRunRefusal {
    /// The code the proxy answers (`endpoint_not_allowed`, ...), or
    /// `quote_needs_lookup`.
    pub code: &'static str,
    /// The rule that decided it (`allowed_endpoints`, `daily_cap`, ...).
    pub rule: &'static str,
    pub message: String,
}

/// The quote the proxy's pricing makes.
#[derive(Clone, Debug, PartialEq)]
pub struct DryRunQuote {
    pub reserve: Micros,
    pub kind: &'static str,
    pub rule: String,
    pub detail: serde_json::Value,
    pub streaming: bool,
}

/// What the key's budget tree has left today and over its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRunBudget {
    pub daily_remaining: Micros,
    pub lifetime_remaining: Option<Micros>,
    /// Of the daily remainder, what no proxy holds in a lease.
    pub unleased: Micros,
    pub resets_at: DateTime<Utc>,
}

impl DryRunBudget {
    /// The tightest level: caps minus settled spend (what the key may still
    /// spend fleet-wide), and minus counting leases too (`unleased`).
    pub fn of(levels: &[BudgetLevel], now: DateTime<Utc>) -> Self {
        let mut daily = None::<i64>;
        let mut life = None::<i64>;
        let mut unleased = None::<i64>;
        for l in levels {
            let d = l.daily_cap.0.saturating_sub(l.spent_day.0);
            let u = d.saturating_sub(l.leased_day.0);
            let (lf, lu) = match l.lifetime_cap {
                Some(cap) => {
                    let lf = cap.0.saturating_sub(l.spent_life.0);
                    (Some(lf), Some(lf.saturating_sub(l.leased_life.0)))
                }
                None => (None, None),
            };
            daily = Some(daily.map_or(d, |x| x.min(d)));
            let u = lu.map_or(u, |lu| u.min(lu));
            unleased = Some(unleased.map_or(u, |x| x.min(u)));
            if let Some(lf) = lf {
                life = Some(life.map_or(lf, |x| x.min(lf)));
            }
        }
        DryRunBudget {
            daily_remaining: Micros(daily.unwrap_or(0).max(0)),
            lifetime_remaining: life.map(|l| Micros(l.max(0))),
            unleased: Micros(unleased.unwrap_or(0).max(0)),
            resets_at: keycap_proto::time::next_utc_midnight(now),
        }
    }
}

/// What the proxy would do with the call.
#[derive(Clone, Debug, PartialEq)]
pub struct DryRunAnswer {
    pub allowed: bool,
    pub refusal: Option<DryRunRefusal>,
    pub quote: Option<DryRunQuote>,
    pub budget: DryRunBudget,
    pub not_checked: Vec<&'static str>,
    /// For `quote_needs_lookup`: the vendor paths the proxy reads first.
    pub lookups: Vec<String>,
    /// For a key in observe mode: the first refusal enforcement would have
    /// answered, which observe mode forwards instead (docs/observe.md).
    pub would_refuse: Option<DryRunRefusal>,
    /// What the key's budget has settled today and over its life (the
    /// budget tree's own level).
    settled: Option<(Micros, Micros)>,
}

/// The stable name of a quote's kind, as the answer shows it.
pub fn kind_name(kind: &QuoteKind) -> &'static str {
    match kind {
        QuoteKind::Free => "free",
        QuoteKind::Stripe { .. } => "stripe",
        QuoteKind::OpenAiChat { .. } => "openai_chat",
        QuoteKind::OpenAiResponses { .. } => "openai_responses",
        QuoteKind::OpenAiEmbeddings { .. } => "openai_embeddings",
        QuoteKind::OpenAiImages { .. } => "openai_images",
        QuoteKind::AnthropicMessages { .. } => "anthropic_messages",
        QuoteKind::Resend { .. } => "resend",
        QuoteKind::Generic { .. } => "generic",
        QuoteKind::Twilio(_) => "twilio",
    }
}

/// Dry runs counted per admin token in fixed one-minute windows, in this
/// replica's memory (a token spread over M replicas gets M times the rate,
/// which bounds the load on each).
pub struct DryRunLimiter {
    per_minute: u32,
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl Default for DryRunLimiter {
    fn default() -> Self {
        DryRunLimiter::new(DRY_RUNS_PER_MINUTE)
    }
}

impl DryRunLimiter {
    pub fn new(per_minute: u32) -> Self {
        DryRunLimiter {
            per_minute,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Counts one dry run of `token_id` at `now`; `Err(retry_after)` once
    /// the token's minute is used up.
    pub fn check(&self, token_id: &str, now: Instant) -> Result<(), Duration> {
        const WINDOW: Duration = Duration::from_secs(60);
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        // Old windows go, so the map holds only tokens active this minute.
        if windows.len() > 10_000 {
            windows.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let (start, count) = windows.entry(token_id.to_string()).or_insert((now, 0));
        if now.duration_since(*start) >= WINDOW {
            *start = now;
            *count = 0;
        }
        if *count >= self.per_minute {
            return Err(WINDOW.saturating_sub(now.duration_since(*start)));
        }
        *count += 1;
        Ok(())
    }
}

/// For a key in observe mode a refusal observe mode forwards is kept as
/// the answer's `would_refuse` (the first only) and the dry run goes on;
/// any other refusal, and every refusal of an enforcing key, ends it.
fn observed(
    key: &crate::domain::VaultKey,
    answer: &mut DryRunAnswer,
    r: DryRunRefusal,
) -> Result<(), DryRunRefusal> {
    if key.observe_ceiling.is_none() || crate::domain::would_refuse_rule(r.code).is_none() {
        return Err(r);
    }
    answer.would_refuse.get_or_insert(r);
    Ok(())
}

/// Observe mode's daily and lifetime marks, as the control plane makes
/// them at ingest (`ledger::observe`): the key's own caps against what its
/// budget has settled (the levels' first is the key's own).
fn would_pass_caps(key: &crate::domain::VaultKey, reserve: Micros, answer: &mut DryRunAnswer) {
    let Some(own) = answer.settled else {
        return;
    };
    let over = |cap: Micros, spent: Micros| spent.0.saturating_add(reserve.0) > cap.0;
    let r = if reserve.0 > 0 && over(key.daily_cap, own.0) {
        refused(
            "daily_cap_exceeded",
            "daily_cap",
            format!(
                "this call reserves {reserve} USD; the key has settled {} USD of its {} USD \
                 daily cap today",
                own.0, key.daily_cap
            ),
        )
    } else if reserve.0 > 0 && key.lifetime_cap.is_some_and(|cap| over(cap, own.1)) {
        refused(
            "lifetime_cap_exceeded",
            "lifetime_cap",
            format!(
                "this call reserves {reserve} USD; the key has settled {} USD of its lifetime cap",
                own.1
            ),
        )
    } else {
        return;
    };
    answer.would_refuse.get_or_insert(r);
}

fn refused(code: &'static str, rule: &'static str, message: impl Into<String>) -> DryRunRefusal {
    DryRunRefusal {
        code,
        rule,
        message: message.into(),
    }
}

impl Control {
    /// Answers what the proxy would do with `run` (scope checked by the
    /// front end; counted against the caller's dry runs). Reserves nothing.
    pub async fn simulate(
        &self,
        caller: &AdminPrincipal,
        run: DryRun,
    ) -> Result<DryRunAnswer, ApiError> {
        self.dry_runs
            .check(&caller.token_id, Instant::now())
            .map_err(|retry_after| ApiError::RateLimited {
                retry_after_secs: retry_after.as_secs().max(1),
            })?;
        let key = self
            .key_of_allowed_vendor(&caller.vendors, &run.key_id)
            .await?;
        let now = Utc::now();
        let levels = self
            .store
            // A rolled key spends its chain's budget, kept under its first key.
            .budget_levels(key.budget_id(), &keycap_proto::time::utc_day(now), now)
            .await?;
        let budget = DryRunBudget::of(&levels, now);
        let mut answer = DryRunAnswer {
            allowed: false,
            refusal: None,
            quote: None,
            budget,
            not_checked: NOT_CHECKED.to_vec(),
            lookups: Vec::new(),
            would_refuse: None,
            settled: levels.first().map(|l| (l.spent_day, l.spent_life)),
        };
        let refusal = match key.status(now) {
            KeyStatus::Revoked => Some(refused("key_revoked", "key_status", "this key is revoked")),
            KeyStatus::Expired => {
                Some(refused("key_expired", "key_status", "this key has expired"))
            }
            KeyStatus::Active => None,
        };
        if let Some(r) = refusal {
            answer.refusal = Some(r);
            return Ok(answer);
        }
        if let Err(r) = self.price_dry_run(&key, &run, &mut answer).await {
            answer.refusal = Some(r);
            return Ok(answer);
        }
        answer.allowed = true;
        Ok(answer)
    }

    /// The proxy's steps 3-4 for the call, in the proxy's order, filling the
    /// quote in; the first refusal ends it.
    async fn price_dry_run(
        &self,
        key: &crate::domain::VaultKey,
        run: &DryRun,
        answer: &mut DryRunAnswer,
    ) -> Result<(), DryRunRefusal> {
        let vendor = match self.store.get_vendor(key.vendor.as_str()).await {
            Ok(Some(v)) => v,
            Ok(None) => {
                return Err(refused(
                    "unknown_vendor",
                    "vendor",
                    format!("vendor {:?} is not configured", key.vendor.as_str()),
                ))
            }
            Err(e) => {
                tracing::error!(error = %e, "dry run: reading the vendor failed");
                return Err(refused("internal", "vendor", "internal error"));
            }
        };
        let endpoints = keycap_proto::endpoint::EndpointSet::parse(&key.allowed_endpoints)
            .map_err(|e| refused("endpoint_not_allowed", "allowed_endpoints", e.to_string()))?;
        if !endpoints.allows(&run.method, &run.path) {
            observed(
                key,
                answer,
                refused(
                    "endpoint_not_allowed",
                    "allowed_endpoints",
                    format!(
                        "{} {} is not in this key's allowed endpoints",
                        run.method,
                        keycap_proto::clip(&run.path, 200)
                    ),
                ),
            )?;
        }
        keycap_vendors::body_headers::check(&run.headers)
            .map_err(|e| refused("ambiguous_request", "body_headers", e.to_string()))?;
        let model = pricing::model_for(
            vendor.profile.as_str(),
            &vendor.currency_rates,
            &CATALOG,
            &vendor.prices,
            &vendor.base_url,
        )
        .map_err(|e| refused(e.code(), "pricing", e.to_string()))?;
        let req = PriceRequest {
            method: &run.method,
            path: &run.path,
            query: run.query.as_deref(),
            content_type: run
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok()),
            headers: &run.headers,
            body: &run.body,
        };
        let unpriceable = |e: PricingError| refused(e.code(), "pricing", e.to_string());
        model.check_write_query(&req).map_err(unpriceable)?;
        let lookups = model.lookups(&req).map_err(unpriceable)?;
        if !lookups.is_empty() {
            let message = format!(
                "the proxy prices this call only after reading {} from the vendor; a dry run \
                 reads nothing from the vendor, so it cannot quote it",
                lookups.join(", ")
            );
            answer.lookups = lookups;
            return Err(refused("quote_needs_lookup", "price_lookup", message));
        }
        let quote = model.quote_with(&req, &[]).map_err(unpriceable)?;
        let reserve = quote.reserve;
        answer.quote = Some(DryRunQuote {
            reserve,
            kind: kind_name(&quote.kind),
            rule: model.rule_of(&req),
            detail: quote.detail,
            streaming: quote.streaming,
        });
        if let Some(cap) = key.per_call_cap {
            if reserve > cap {
                observed(
                    key,
                    answer,
                    refused(
                        "per_call_cap_exceeded",
                        "per_call_cap",
                        format!(
                            "this call reserves {reserve} USD; the key's per-call cap is {cap} USD"
                        ),
                    ),
                )?;
            }
        }
        // The proxy holds such a call for a person before it reserves.
        if let Some(above) = key.approval_above {
            if reserve > above {
                return Err(refused(
                    "approval_required",
                    "approval_above",
                    format!(
                        "this call reserves {reserve} USD; the key needs a person's approval \
                         above {above} USD (docs/approvals.md)"
                    ),
                ));
            }
        }
        if key.observe_ceiling.is_some() {
            would_pass_caps(key, reserve, answer);
        }
        let budget = &answer.budget;
        if reserve > budget.daily_remaining {
            if let Some(ceiling) = key.observe_ceiling {
                return Err(refused(
                    "daily_cap_exceeded",
                    "observe_ceiling",
                    format!(
                        "this call reserves {reserve} USD; the key in observe mode has {} USD \
                         left today under its {ceiling} USD ceiling",
                        budget.daily_remaining
                    ),
                ));
            }
            return Err(refused(
                "daily_cap_exceeded",
                "daily_cap",
                format!(
                    "this call reserves {reserve} USD; the key has {} USD left today",
                    budget.daily_remaining
                ),
            ));
        }
        if let Some(left) = budget.lifetime_remaining {
            if reserve > left {
                return Err(refused(
                    "lifetime_cap_exceeded",
                    "lifetime_cap",
                    format!("this call reserves {reserve} USD; the key has {left} USD left"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(daily: i64, life: Option<i64>, spent: i64, leased: i64) -> BudgetLevel {
        BudgetLevel {
            key_id: "k".into(),
            depth: 0,
            daily_cap: Micros(daily),
            lifetime_cap: life.map(Micros),
            spent_day: Micros(spent),
            spent_life: Micros(spent),
            leased_day: Micros(leased),
            leased_life: Micros(leased),
        }
    }

    #[test]
    fn the_budget_is_the_tightest_level_of_the_tree() {
        let now = Utc::now();
        let b = DryRunBudget::of(&[level(10, None, 2, 3), level(6, Some(20), 1, 4)], now);
        assert_eq!(b.daily_remaining, Micros(5));
        assert_eq!(b.lifetime_remaining, Some(Micros(19)));
        assert_eq!(b.unleased, Micros(1));
        let over = DryRunBudget::of(&[level(10, None, 12, 3)], now);
        assert_eq!(over.daily_remaining, Micros::ZERO);
        assert_eq!(over.unleased, Micros::ZERO);
    }

    #[test]
    fn a_token_gets_its_minute_of_dry_runs_then_waits() {
        let limiter = DryRunLimiter::new(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.check("tok_a", t0).is_ok());
        }
        let wait = limiter
            .check("tok_a", t0 + Duration::from_secs(20))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(40));
        // Another token has its own minute.
        assert!(limiter.check("tok_b", t0).is_ok());
        assert!(limiter.check("tok_a", t0 + Duration::from_secs(60)).is_ok());
    }

    #[test]
    fn credentials_in_the_simulated_headers_are_dropped_and_paths_split() {
        let run = DryRun::new(
            "key_1",
            "POST",
            "/v1/charges?expand[]=x",
            &[
                ("Authorization".into(), "Bearer kc_live_x".into()),
                ("x-api-key".into(), "kc_live_x".into()),
                (
                    "Content-Type".into(),
                    "application/x-www-form-urlencoded".into(),
                ),
            ],
            b"amount=100".to_vec(),
        )
        .unwrap();
        assert_eq!(run.path, "/v1/charges");
        assert_eq!(run.query.as_deref(), Some("expand[]=x"));
        assert!(run.headers.get("authorization").is_none());
        assert!(run.headers.get("x-api-key").is_none());
        assert!(DryRun::new("key_1", "POST", "v1/charges", &[], vec![]).is_err());
        assert!(DryRun::new("", "POST", "/v1/charges", &[], vec![]).is_err());
        assert!(DryRun::new("key_1", "PO ST", "/v1/charges", &[], vec![]).is_err());
    }
}
