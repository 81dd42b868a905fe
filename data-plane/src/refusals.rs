//! Refused calls of known keys, counted per key, reason and minute, and
//! reported to the audit ledger as one spend event (outcome `refused`) per
//! key, reason and minute once that minute is over, or at shutdown.
//!
//! A storm of refused calls thus costs the request path a counter
//! increment each, and the ledger one entry per key, reason and minute
//! from this proxy, whatever the storm's size. A call whose key is unknown
//! is never recorded: there is no key to tie it to, and recording it
//! would let anyone write to the ledger. The tally never delays or decides
//! a call; it only counts what was already refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use keycap_proto::pb;
use tokio::sync::watch;

use crate::spend::SpendReporter;

/// One window: a key, the code its calls were refused with, and the
/// minute (seconds since the Unix epoch / 60).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Window {
    minute: i64,
    key_id: String,
    reason: &'static str,
}

/// What a window counted.
#[derive(Clone, Debug)]
struct Count {
    vendor: String,
    calls: i64,
}

/// A window whose minute is over: what becomes one ledger entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClosedWindow {
    pub key_id: String,
    pub vendor: String,
    pub reason: &'static str,
    /// The minute's start.
    pub at: DateTime<Utc>,
    pub calls: i64,
}

impl ClosedWindow {
    /// The spend event that carries this window to the ledger.
    pub fn event(&self, event_id: String) -> pb::SpendEvent {
        pb::SpendEvent {
            event_id,
            key_id: self.key_id.clone(),
            vendor: self.vendor.clone(),
            outcome: "refused".into(),
            at: Some(keycap_proto::time::to_proto(self.at)),
            day: self.at.format("%Y-%m-%d").to_string(),
            refusal_reason: self.reason.into(),
            refused_calls: self.calls,
            ..Default::default()
        }
    }
}

/// The refusals counted since their windows were last reported, shared by
/// every serving thread.
#[derive(Clone, Default)]
pub struct RefusalTally {
    windows: Arc<Mutex<HashMap<Window, Count>>>,
}

fn minute_of(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(60)
}

impl RefusalTally {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one call of `key_id` (a key of `vendor`) refused with
    /// `reason` at `at`.
    pub fn record(&self, key_id: &str, vendor: &str, reason: &'static str, at: DateTime<Utc>) {
        let window = Window {
            minute: minute_of(at),
            key_id: key_id.to_string(),
            reason,
        };
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows
            .entry(window)
            .or_insert_with(|| Count {
                vendor: vendor.to_string(),
                calls: 0,
            })
            .calls += 1;
    }

    /// Takes the windows whose minute is over at `now` (every window with
    /// `all`), oldest first.
    pub fn take_closed(&self, now: DateTime<Utc>, all: bool) -> Vec<ClosedWindow> {
        let current = minute_of(now);
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let closed: Vec<Window> = windows
            .keys()
            .filter(|w| all || w.minute < current)
            .cloned()
            .collect();
        let mut out: Vec<ClosedWindow> = closed
            .into_iter()
            .filter_map(|w| {
                let count = windows.remove(&w)?;
                Some(ClosedWindow {
                    at: DateTime::from_timestamp(w.minute * 60, 0).unwrap_or_default(),
                    key_id: w.key_id,
                    vendor: count.vendor,
                    reason: w.reason,
                    calls: count.calls,
                })
            })
            .collect();
        drop(windows);
        out.sort_by(|a, b| (a.at, &a.key_id, a.reason).cmp(&(b.at, &b.key_id, b.reason)));
        out
    }
}

/// Reports each window once its minute is over, and every window left
/// when `stop` turns true (after the serving threads have ended), then
/// returns, dropping its reporter so spend delivery can finish.
pub async fn report(tally: RefusalTally, spend: SpendReporter, mut stop: watch::Receiver<bool>) {
    loop {
        // Just after the next minute starts, so the one before is over.
        let now = Utc::now();
        let into_minute = now.timestamp().rem_euclid(60) as u64;
        let wait = Duration::from_secs(60 - into_minute) + Duration::from_millis(200);
        let stopping = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        for w in tally.take_closed(Utc::now(), stopping) {
            spend.send(w.event(spend.next_event_id()));
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_storm_is_one_window_per_key_reason_and_minute() {
        let tally = RefusalTally::new();
        let t0 = Utc.with_ymd_and_hms(2026, 12, 6, 10, 0, 5).unwrap();
        for i in 0..500 {
            tally.record("key_a", "stripe", "daily_cap_exceeded", t0);
            if i % 2 == 0 {
                tally.record("key_a", "stripe", "rate_limited", t0);
            }
        }
        tally.record("key_b", "openai", "key_revoked", t0);
        let next_minute = t0 + chrono::TimeDelta::seconds(60);
        tally.record("key_a", "stripe", "daily_cap_exceeded", next_minute);

        // Nothing is taken while its minute runs.
        assert!(tally.take_closed(t0, false).is_empty());
        let closed = tally.take_closed(next_minute, false);
        let minute = Utc.with_ymd_and_hms(2026, 12, 6, 10, 0, 0).unwrap();
        let found: Vec<(&str, &str, i64)> = closed
            .iter()
            .inspect(|w| assert_eq!(w.at, minute))
            .map(|w| (w.key_id.as_str(), w.reason, w.calls))
            .collect();
        assert_eq!(
            found,
            vec![
                ("key_a", "daily_cap_exceeded", 500),
                ("key_a", "rate_limited", 250),
                ("key_b", "key_revoked", 1),
            ]
        );
        // Taken once; the running minute comes at shutdown.
        assert!(tally.take_closed(next_minute, false).is_empty());
        let rest = tally.take_closed(next_minute, true);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].calls, 1);
        assert_eq!(rest[0].at, next_minute - chrono::TimeDelta::seconds(5));
    }

    #[test]
    fn a_window_becomes_a_refused_spend_event() {
        let at = Utc.with_ymd_and_hms(2026, 12, 6, 23, 59, 0).unwrap();
        let e = ClosedWindow {
            key_id: "key_a".into(),
            vendor: "stripe".into(),
            reason: "endpoint_not_allowed",
            at,
            calls: 7,
        }
        .event("ev_1".into());
        assert_eq!(e.outcome, "refused");
        assert_eq!(e.refusal_reason, "endpoint_not_allowed");
        assert_eq!(e.refused_calls, 7);
        assert_eq!(e.day, "2026-12-06");
        assert_eq!((e.cost_micros, e.reserved_micros), (0, 0));
        assert!(e.lease_id.is_empty());
    }
}
