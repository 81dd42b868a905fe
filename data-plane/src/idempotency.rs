//! Idempotent retries: a request repeated with the same idempotency key
//! rides on its original's charge, reserved and counted once, not once per
//! attempt.
//!
//! Owns the proxy's memory of idempotency keys it has forwarded (with a
//! digest of the request), per vault key: in flight (a concurrent repeat is
//! refused, as the vendor would refuse it), or counted, with what the
//! original counted. A later repeat of a counted call is forwarded with
//! nothing reserved and counts only what its answer costs beyond that: the
//! vendor either replays the original's saved response (charging nothing)
//! or, when the original never reached it, executes the request once now.
//! A call counts when its settlement spent something: settled from the
//! response, or settled at its reservation because its outcome was unknown
//! (a timeout, a connection cut after sending), since the vendor may have
//! charged it. One that was released is forgotten, so its retry is priced
//! again.
//!
//! It must forget a counted key before the vendor does (`REMEMBER`, under
//! Stripe's 24 hours), or a retry the vendor executes afresh would go out
//! unreserved. It is bounded (`MAX_KEYS`): when full, the oldest entries
//! are dropped, which only makes a retry reserve again. The memory is per
//! proxy process: across a fleet, a retry through another proxy is priced
//! and reserved again (under a cap it may not fit), and settles at 0 when
//! the vendor marks its answer a replay.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use keycap_proto::Micros;

/// How long a counted key is remembered.
pub const REMEMBER: Duration = Duration::hours(23);
/// Most keys remembered at once.
pub const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    /// Counted at this cost.
    Counted(Micros),
}

#[derive(Default)]
struct Inner {
    entries: HashMap<(String, String), (State, DateTime<Utc>)>,
    /// Keys in the order they were first seen, for expiry and eviction.
    order: VecDeque<((String, String), DateTime<Utc>)>,
}

impl Inner {
    fn prune(&mut self, now: DateTime<Utc>) {
        while let Some((k, at)) = self.order.front() {
            let stale = *at + REMEMBER <= now || self.order.len() > MAX_KEYS;
            if !stale {
                break;
            }
            // Remove the entry only if it is the one this queue slot was
            // written for (it may have been forgotten and seen again).
            if self.entries.get(k).is_some_and(|(_, seen)| seen == at) {
                self.entries.remove(k);
            }
            self.order.pop_front();
        }
    }
}

/// What the memory says about a request carrying an idempotency key.
#[derive(Debug)]
pub enum Begin {
    /// First time seen (or forgotten): price and reserve it; the guard
    /// records how it ended.
    New(Guard),
    /// The same key is being forwarded right now.
    InFlight,
    /// Already counted, at this cost: the retry rides on that charge.
    Counted(Micros),
}

/// Shared by every serving thread of one proxy.
#[derive(Clone, Default)]
pub struct IdempotencyMemory {
    inner: Arc<Mutex<Inner>>,
}

impl IdempotencyMemory {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn begin(&self, key_id: &str, idempotency_key: &str, now: DateTime<Utc>) -> Begin {
        let mut inner = self.inner.lock().expect("idempotency memory poisoned");
        inner.prune(now);
        let k = (key_id.to_string(), idempotency_key.to_string());
        match inner.entries.get(&k) {
            Some((State::InFlight, _)) => Begin::InFlight,
            Some((State::Counted(cost), _)) => Begin::Counted(*cost),
            None => {
                inner.entries.insert(k.clone(), (State::InFlight, now));
                inner.order.push_back((k.clone(), now));
                Begin::New(Guard {
                    memory: self.clone(),
                    key: Some(k),
                })
            }
        }
    }

    fn finish(&self, key: (String, String), counted: Option<Micros>) {
        let mut inner = self.inner.lock().expect("idempotency memory poisoned");
        match counted {
            Some(cost) => {
                if let Some(e) = inner.entries.get_mut(&key) {
                    e.0 = State::Counted(cost);
                }
            }
            None => {
                inner.entries.remove(&key);
            }
        }
    }
}

/// A request in flight under an idempotency key. Dropped without `done`
/// (the call was never forwarded, or was abandoned), the key is forgotten.
#[derive(Debug)]
pub struct Guard {
    memory: IdempotencyMemory,
    key: Option<(String, String)>,
}

impl std::fmt::Debug for IdempotencyMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyMemory").finish_non_exhaustive()
    }
}

impl Guard {
    /// The call settled: `counted` is what it spent, when it spent
    /// something (`None` for a call released or spent nothing).
    pub fn done(mut self, counted: Option<Micros>) {
        if let Some(k) = self.key.take() {
            self.memory.finish(k, counted);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.memory.finish(k, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn a_counted_key_is_replayed_and_an_uncounted_one_priced_again() {
        let m = IdempotencyMemory::new();
        let Begin::New(g) = m.begin("key_1", "idem-a", t0()) else {
            panic!("first sight is new")
        };
        assert!(matches!(m.begin("key_1", "idem-a", t0()), Begin::InFlight));
        // Another vault key's idempotency keys are its own.
        assert!(matches!(m.begin("key_2", "idem-a", t0()), Begin::New(_)));
        g.done(Some(Micros(25_000_000)));
        assert!(matches!(
            m.begin("key_1", "idem-a", t0()),
            Begin::Counted(Micros(25_000_000))
        ));

        let Begin::New(g) = m.begin("key_1", "idem-b", t0()) else {
            panic!()
        };
        g.done(None);
        assert!(matches!(m.begin("key_1", "idem-b", t0()), Begin::New(_)));
    }

    #[test]
    fn a_dropped_guard_forgets_the_key() {
        let m = IdempotencyMemory::new();
        let Begin::New(g) = m.begin("k", "i", t0()) else {
            panic!()
        };
        drop(g);
        assert!(matches!(m.begin("k", "i", t0()), Begin::New(_)));
    }

    #[test]
    fn counted_keys_are_forgotten_before_the_vendor_forgets_them() {
        let m = IdempotencyMemory::new();
        let Begin::New(g) = m.begin("k", "i", t0()) else {
            panic!()
        };
        g.done(Some(Micros(1)));
        let almost = t0() + REMEMBER - Duration::seconds(1);
        assert!(matches!(m.begin("k", "i", almost), Begin::Counted(_)));
        assert!(REMEMBER < Duration::hours(24));
        assert!(matches!(m.begin("k", "i", t0() + REMEMBER), Begin::New(_)));
    }

    #[test]
    fn memory_is_bounded_by_dropping_the_oldest() {
        let m = IdempotencyMemory::new();
        for i in 0..=MAX_KEYS {
            if let Begin::New(g) = m.begin("k", &i.to_string(), t0()) {
                g.done(Some(Micros(1)));
            }
        }
        assert!(matches!(m.begin("k", "0", t0()), Begin::New(_)));
        let len = m.inner.lock().unwrap().entries.len();
        assert!(len <= MAX_KEYS + 1, "{len}");
        assert!(matches!(
            m.begin("k", &MAX_KEYS.to_string(), t0()),
            Begin::Counted(_)
        ));
    }
}
