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
//!
//! With a spool, the running minute survives a SIGKILL too: at most every
//! `CHECKPOINT_EVERY`, each window whose count changed is written to the
//! spool as the event it would report now, under the event id its final
//! report will carry (fixed at its first checkpoint). The final report
//! supersedes its checkpoints; a killed run's last checkpoint is delivered
//! by the next run instead, and the control plane applies each event id
//! once, so a window counts once whichever run delivers it. What a kill
//! loses is bounded: the calls refused since the last checkpoint (at most
//! `CHECKPOINT_EVERY` of them). A storm costs one spool write per window
//! per checkpoint, never one per call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use keycap_proto::pb;
use tokio::sync::watch;

use crate::spend::SpendReporter;

/// How often, at most, the running windows are checkpointed to the spool:
/// the most a SIGKILL can take from the ledger's refusal counts.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

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
    /// `calls` when last checkpointed (0: never).
    checkpointed: i64,
    /// The id of the window's ledger entry, fixed when it is first
    /// checkpointed or reported: its checkpoints and its final report are
    /// one event.
    event_id: Option<String>,
}

/// A window's count as reported (or checkpointed): one ledger entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowCount {
    pub event_id: String,
    pub key_id: String,
    pub vendor: String,
    pub reason: &'static str,
    /// The minute's start.
    pub at: DateTime<Utc>,
    pub calls: i64,
}

impl WindowCount {
    fn of(window: &Window, count: &Count, event_id: String) -> WindowCount {
        WindowCount {
            event_id,
            at: DateTime::from_timestamp(window.minute * 60, 0).unwrap_or_default(),
            key_id: window.key_id.clone(),
            vendor: count.vendor.clone(),
            reason: window.reason,
            calls: count.calls,
        }
    }

    /// The spend event that carries this window to the ledger.
    pub fn event(&self) -> pb::SpendEvent {
        pb::SpendEvent {
            event_id: self.event_id.clone(),
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
                checkpointed: 0,
                event_id: None,
            })
            .calls += 1;
    }

    /// Takes the windows whose minute is over at `now` (every window with
    /// `all`), oldest first; a window never checkpointed gets its event id
    /// from `ids`.
    pub fn take_closed(
        &self,
        now: DateTime<Utc>,
        all: bool,
        ids: &mut dyn FnMut() -> String,
    ) -> Vec<WindowCount> {
        let current = minute_of(now);
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let closed: Vec<Window> = windows
            .keys()
            .filter(|w| all || w.minute < current)
            .cloned()
            .collect();
        let mut out: Vec<WindowCount> = closed
            .into_iter()
            .filter_map(|w| {
                let count = windows.remove(&w)?;
                let id = count.event_id.clone().unwrap_or_else(&mut *ids);
                Some(WindowCount::of(&w, &count, id))
            })
            .collect();
        drop(windows);
        sort(&mut out);
        out
    }

    /// The windows still counting whose count changed since their last
    /// checkpoint, as they stand now, oldest first; each is marked
    /// checkpointed at that count, and keeps its event id (from `ids` the
    /// first time).
    pub fn checkpoint(&self, ids: &mut dyn FnMut() -> String) -> Vec<WindowCount> {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<WindowCount> = windows
            .iter_mut()
            .filter(|(_, c)| c.calls != c.checkpointed)
            .map(|(w, c)| {
                c.checkpointed = c.calls;
                let id = c.event_id.get_or_insert_with(&mut *ids).clone();
                WindowCount::of(w, c, id)
            })
            .collect();
        drop(windows);
        sort(&mut out);
        out
    }
}

fn sort(windows: &mut [WindowCount]) {
    windows.sort_by(|a, b| (a.at, &a.key_id, a.reason).cmp(&(b.at, &b.key_id, b.reason)));
}

/// Reports each window once its minute is over, and every window left
/// when `stop` turns true (after the serving threads have ended), then
/// returns, dropping its reporter so spend delivery can finish. With a
/// spool, checkpoints the running windows every `CHECKPOINT_EVERY` in
/// between (see module docs).
pub async fn report(tally: RefusalTally, spend: SpendReporter, mut stop: watch::Receiver<bool>) {
    let mut ids = || spend.next_event_id();
    loop {
        // Just after the next minute starts, so the one before is over.
        let now = Utc::now();
        let into_minute = now.timestamp().rem_euclid(60) as u64;
        let mut wait = Duration::from_secs(60 - into_minute) + Duration::from_millis(200);
        if spend.spooled() {
            wait = wait.min(CHECKPOINT_EVERY);
        }
        let stopping = tokio::select! {
            _ = tokio::time::sleep(wait) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        for w in tally.take_closed(Utc::now(), stopping, &mut ids) {
            spend.send(w.event());
        }
        if stopping {
            return;
        }
        let running: Vec<pb::SpendEvent> = match spend.spooled() {
            true => tally
                .checkpoint(&mut ids)
                .iter()
                .map(WindowCount::event)
                .collect(),
            false => Vec::new(),
        };
        if !running.is_empty() {
            if let Err(e) = spend.checkpoint(running).await {
                // The windows still report when their minute is over;
                // only a kill before then loses them.
                tracing::warn!(error = %e, "refusal counts not checkpointed to the spool");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// Event ids ev0, ev1, ... in the order asked for.
    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("ev{}", n - 1)
        }
    }

    #[test]
    fn a_storm_is_one_window_per_key_reason_and_minute() {
        let tally = RefusalTally::new();
        let mut ids = ids();
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
        assert!(tally.take_closed(t0, false, &mut ids).is_empty());
        let closed = tally.take_closed(next_minute, false, &mut ids);
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
        let mut event_ids: Vec<&str> = closed.iter().map(|w| w.event_id.as_str()).collect();
        event_ids.sort();
        event_ids.dedup();
        assert_eq!(event_ids.len(), 3, "an event id each");
        // Taken once; the running minute comes at shutdown.
        assert!(tally.take_closed(next_minute, false, &mut ids).is_empty());
        let rest = tally.take_closed(next_minute, true, &mut ids);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].calls, 1);
        assert_eq!(rest[0].at, next_minute - chrono::TimeDelta::seconds(5));
    }

    #[test]
    fn a_running_window_is_checkpointed_when_it_changed_under_its_final_id() {
        let tally = RefusalTally::new();
        let mut ids = ids();
        let t0 = Utc.with_ymd_and_hms(2026, 12, 6, 10, 0, 5).unwrap();
        assert!(tally.checkpoint(&mut ids).is_empty(), "nothing counted");
        for _ in 0..3 {
            tally.record("key_a", "stripe", "rate_limited", t0);
        }
        let first = tally.checkpoint(&mut ids);
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].event_id.as_str(), first[0].calls), ("ev0", 3));
        // Unchanged: nothing to write, however often asked.
        assert!(tally.checkpoint(&mut ids).is_empty());
        tally.record("key_a", "stripe", "rate_limited", t0);
        tally.record("key_b", "openai", "key_revoked", t0);
        let second = tally.checkpoint(&mut ids);
        let got: Vec<(&str, &str, i64)> = second
            .iter()
            .map(|w| (w.event_id.as_str(), w.key_id.as_str(), w.calls))
            .collect();
        assert_eq!(got, vec![("ev0", "key_a", 4), ("ev1", "key_b", 1)]);
        // The final report carries the id its checkpoints did, and the
        // calls counted since.
        tally.record("key_a", "stripe", "rate_limited", t0);
        let closed = tally.take_closed(t0 + chrono::TimeDelta::seconds(60), false, &mut ids);
        let got: Vec<(&str, &str, i64)> = closed
            .iter()
            .map(|w| (w.event_id.as_str(), w.key_id.as_str(), w.calls))
            .collect();
        assert_eq!(got, vec![("ev0", "key_a", 5), ("ev1", "key_b", 1)]);
        assert!(
            tally.checkpoint(&mut ids).is_empty(),
            "closed windows are gone"
        );
    }

    #[test]
    fn a_window_becomes_a_refused_spend_event() {
        let at = Utc.with_ymd_and_hms(2026, 12, 6, 23, 59, 0).unwrap();
        let e = WindowCount {
            event_id: "ev_1".into(),
            key_id: "key_a".into(),
            vendor: "stripe".into(),
            reason: "endpoint_not_allowed",
            at,
            calls: 7,
        }
        .event();
        assert_eq!(e.event_id, "ev_1");
        assert_eq!(e.outcome, "refused");
        assert_eq!(e.refusal_reason, "endpoint_not_allowed");
        assert_eq!(e.refused_calls, 7);
        assert_eq!(e.day, "2026-12-06");
        assert_eq!((e.cost_micros, e.reserved_micros), (0, 0));
        assert!(e.lease_id.is_empty());
    }

    /// A run killed mid-minute: the next run recovers each running
    /// window's last checkpoint from the spool, and a window whose final
    /// report was spooled that report, under the same id; only calls
    /// counted after the last checkpoint are lost.
    #[test]
    fn a_killed_run_leaves_each_window_at_its_last_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Utc.with_ymd_and_hms(2026, 12, 6, 10, 1, 5).unwrap();
        let minute_before = t0 - chrono::TimeDelta::seconds(60);
        let (closed_id, running_id) = {
            let (spool, _) = crate::spool::Spool::open(dir.path(), "run1").unwrap();
            let tally = RefusalTally::new();
            let mut ids = ids();
            let mut checkpoint = |tally: &RefusalTally| {
                for w in tally.checkpoint(&mut ids) {
                    spool.reserve(&w.event()).unwrap();
                }
            };
            for _ in 0..3 {
                tally.record("key_a", "stripe", "rate_limited", t0);
                tally.record("key_b", "stripe", "rate_limited", minute_before);
                checkpoint(&tally);
            }
            tally.record("key_a", "stripe", "rate_limited", t0);
            checkpoint(&tally);
            assert!(tally.checkpoint(&mut || unreachable!()).is_empty());
            // key_b's minute is over: its final count is spooled for
            // delivery. key_a counts one more call that no checkpoint
            // sees before the kill.
            let closed = tally.take_closed(t0, false, &mut || unreachable!());
            assert_eq!(closed.len(), 1);
            spool.event(&closed[0].event()).unwrap();
            tally.record("key_a", "stripe", "rate_limited", t0);
            let running = tally.take_closed(t0, true, &mut || unreachable!());
            assert_eq!(running[0].calls, 5);
            (closed[0].event_id.clone(), running[0].event_id.clone())
            // Dropped without delivering anything, as SIGKILL would.
        };
        let (_spool, recovered) = crate::spool::Spool::open(dir.path(), "run2").unwrap();
        let got: Vec<(&str, &str, i64)> = recovered
            .events
            .iter()
            .map(|e| (e.event_id.as_str(), e.key_id.as_str(), e.refused_calls))
            .collect();
        assert_eq!(
            got,
            vec![
                (closed_id.as_str(), "key_b", 3),
                (running_id.as_str(), "key_a", 4),
            ]
        );
    }
}
