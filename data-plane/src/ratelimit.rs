//! Per-key request rate limits, kept in this proxy's memory.
//!
//! A key limited to N calls a minute may burst up to N calls at once, and
//! earns a call back every 60/N seconds (GCRA: the generic cell rate
//! algorithm, a token bucket that stores one instant per key — the
//! "theoretical arrival time" at which the bucket would be full again).
//! Each proxy enforces the limit on its own: behind a balancer spreading a
//! key over N proxies the key may make up to N times its limit in total.
//!
//! The clock is passed in (`now`), so the arithmetic is tested without
//! waiting. The memory holds one instant per recently used key and drops
//! keys whose bucket has refilled; it never holds a secret.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};

/// The window a limit is stated over.
pub const WINDOW: Duration = Duration::from_secs(60);
/// How the limit is named in the RateLimit header fields.
const POLICY_NAME: &str = "per-key";

pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// Where a key stands after a call was counted or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateStatus {
    /// The key's limit, calls per `WINDOW`.
    pub limit: u32,
    /// Calls the key could make right now.
    pub remaining: u32,
    /// Refused: how long until one call is allowed again. Allowed: how
    /// long until the bucket is full again.
    pub reset: Duration,
}

impl RateStatus {
    /// `reset` in whole seconds, rounded up, at least 1: what `Retry-After`
    /// and the RateLimit `t` parameter say.
    pub fn reset_secs(&self) -> u64 {
        let whole = self.reset.as_secs() + u64::from(self.reset.subsec_nanos() > 0);
        whole.max(1)
    }

    /// Adds `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-
    /// ratelimit-headers), e.g. `"per-key";q=60;w=60` and
    /// `"per-key";r=0;t=12`.
    pub fn insert_headers(&self, h: &mut HeaderMap) {
        let policy = format!("\"{POLICY_NAME}\";q={};w={}", self.limit, WINDOW.as_secs());
        let state = format!(
            "\"{POLICY_NAME}\";r={};t={}",
            self.remaining,
            self.reset_secs()
        );
        if let Ok(v) = HeaderValue::from_str(&policy) {
            h.insert(RATELIMIT_POLICY, v);
        }
        if let Ok(v) = HeaderValue::from_str(&state) {
            h.insert(RATELIMIT, v);
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Per key id: when its bucket would be full again.
    full_at: HashMap<String, Instant>,
    /// Size at which the map is next swept for refilled buckets.
    sweep_at: usize,
}

/// The rate limits of every key this proxy serves, shared by its threads.
#[derive(Clone, Default)]
pub struct RateLimiter {
    inner: Arc<Mutex<Inner>>,
}

/// Fewest entries before a sweep is worth it.
const MIN_SWEEP: usize = 1024;

impl RateLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one call of `key_id`, limited to `per_minute` calls a minute,
    /// at `now`: `Ok` with what is left if it fits, `Err` with when to come
    /// back if it does not (a refused call is not counted).
    pub fn check(
        &self,
        key_id: &str,
        per_minute: u32,
        now: Instant,
    ) -> Result<RateStatus, RateStatus> {
        let limit = per_minute.max(1);
        // One call's share of the window, and the window as exactly
        // `limit` shares so rounding never grants an extra call.
        let interval = WINDOW / limit;
        let window = interval * limit;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let full_at = inner.full_at.get(key_id).copied().unwrap_or(now).max(now);
        let after = full_at + interval;
        let backlog = after - now;
        if backlog > window {
            return Err(RateStatus {
                limit,
                remaining: 0,
                reset: backlog - window,
            });
        }
        let remaining = ((window - backlog).as_nanos() / interval.as_nanos()) as u32;
        if inner.full_at.len() >= inner.sweep_at {
            inner.full_at.retain(|_, t| *t > now);
            inner.sweep_at = (inner.full_at.len() * 2).max(MIN_SWEEP);
        }
        inner.full_at.insert(key_id.to_string(), after);
        Ok(RateStatus {
            limit,
            remaining,
            reset: backlog,
        })
    }

    /// Keys currently remembered (for tests of the sweep).
    pub fn tracked(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .full_at
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: f64) -> Duration {
        Duration::from_secs_f64(s)
    }

    #[test]
    fn a_full_bucket_allows_a_burst_of_the_limit_then_refuses() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        for i in 0..60 {
            let s = rl.check("k", 60, t0).expect("within the burst");
            assert_eq!(s.remaining, 59 - i);
            assert_eq!(s.limit, 60);
        }
        let refused = rl.check("k", 60, t0).unwrap_err();
        assert_eq!(refused.remaining, 0);
        // One call comes back a second later (60 a minute).
        assert_eq!(refused.reset, secs(1.0));
        assert_eq!(refused.reset_secs(), 1);
        // Refusals are not counted: still one second, not more.
        assert_eq!(rl.check("k", 60, t0).unwrap_err().reset, secs(1.0));
    }

    #[test]
    fn the_bucket_refills_continuously() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        for _ in 0..6 {
            rl.check("k", 6, t0).unwrap();
        }
        // 6 a minute: one call every 10 s.
        let r = rl.check("k", 6, t0 + secs(4.5)).unwrap_err();
        assert_eq!(r.reset, secs(5.5));
        assert_eq!(r.reset_secs(), 6);
        assert!(rl.check("k", 6, t0 + secs(9.9)).is_err());
        let ok = rl.check("k", 6, t0 + secs(10.0)).unwrap();
        assert_eq!(ok.remaining, 0);
        // 25 s later two more have come back.
        let ok = rl.check("k", 6, t0 + secs(35.0)).unwrap();
        assert_eq!(ok.remaining, 1);
        rl.check("k", 6, t0 + secs(35.0)).unwrap();
        assert!(rl.check("k", 6, t0 + secs(35.0)).is_err());
        // After a quiet minute the whole burst is back, and no more.
        let later = t0 + secs(200.0);
        for _ in 0..6 {
            rl.check("k", 6, later).unwrap();
        }
        assert!(rl.check("k", 6, later).is_err());
    }

    #[test]
    fn keys_are_limited_separately_and_reset_counts_to_a_full_bucket() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        let first = rl.check("a", 2, t0).unwrap();
        // Full again one interval (30 s) after the call.
        assert_eq!(first.reset, secs(30.0));
        assert_eq!(first.remaining, 1);
        rl.check("a", 2, t0).unwrap();
        assert!(rl.check("a", 2, t0).is_err());
        assert_eq!(rl.check("b", 2, t0).unwrap().remaining, 1);
    }

    #[test]
    fn refilled_keys_are_swept() {
        let rl = RateLimiter::new();
        let t0 = Instant::now();
        for i in 0..MIN_SWEEP {
            rl.check(&format!("k{i}"), 600, t0).unwrap();
        }
        assert_eq!(rl.tracked(), MIN_SWEEP);
        // A minute on, every bucket is full: the next call sweeps them.
        rl.check("fresh", 600, t0 + WINDOW).unwrap();
        assert_eq!(rl.tracked(), 1);
    }

    #[test]
    fn headers_follow_the_draft_syntax() {
        let mut h = HeaderMap::new();
        RateStatus {
            limit: 60,
            remaining: 0,
            reset: secs(11.2),
        }
        .insert_headers(&mut h);
        assert_eq!(h["ratelimit-policy"], "\"per-key\";q=60;w=60");
        assert_eq!(h["ratelimit"], "\"per-key\";r=0;t=12");
        let zero = RateStatus {
            limit: 1,
            remaining: 0,
            reset: Duration::ZERO,
        };
        assert_eq!(zero.reset_secs(), 1);
    }
}
