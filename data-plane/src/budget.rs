//! Reservations against a key's budget, drawn from leases.
//!
//! A proxy never spends budget the control plane has not granted it: each
//! key has a lease for the current UTC day (a slice of the key's remaining
//! daily budget, granted in one database transaction). A call reserves its
//! price from the lease before it is forwarded; after the response the
//! reservation resolves exactly once, to the real cost (settle) or to 0
//! (release). When the lease cannot cover a reservation the proxy asks for
//! more; when the control plane grants nothing, the call is refused — the
//! proxy fails closed. Leases of a past day, an expiring lease or a revoked
//! key's lease are handed back with what was spent from them.
//!
//! Invariant kept here: for every lease, reserved + spent <= granted, except
//! where a settled cost exceeded its reservation (recorded at true cost).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use keycap_proto::pb;
use keycap_proto::time::{from_proto, next_utc_midnight, utc_day};
use keycap_proto::Micros;

use crate::error::Refusal;
use crate::fleet::LeaseSource;
use crate::policy::KeyPolicy;

/// Stop drawing on a lease this long before it expires, so calls in flight
/// settle while the control plane still counts it.
const EXPIRY_MARGIN: Duration = Duration::from_secs(120);

/// A reserved amount; resolve it exactly once with `Budget::resolve`.
#[derive(Debug)]
#[must_use = "a reservation must be resolved"]
pub struct Reservation {
    pub key_id: String,
    pub lease_id: String,
    pub day: String,
    pub amount: Micros,
}

#[derive(Debug)]
struct LocalLease {
    id: String,
    granted: i64,
    reserved: i64,
    spent: i64,
    usable_until: DateTime<Utc>,
}

impl LocalLease {
    fn available(&self) -> i64 {
        self.granted - self.reserved - self.spent
    }
}

#[derive(Debug, Default)]
struct KeyLeases {
    day: String,
    current: Option<LocalLease>,
    /// Leases no longer drawn on whose reservations are still in flight.
    retiring: Vec<LocalLease>,
    /// The control plane's last word on budget left outside our lease.
    unleased: i64,
    /// Its last word on which cap binds: the lifetime cap, not the daily.
    lifetime_bound: bool,
}

/// One key's leases. `state` is only ever held for a few arithmetic steps,
/// never across an await, so settling a call needs no async lock and can
/// happen anywhere (even while a dropped call unwinds). `granting` is held
/// across a lease grant, and only its holder may change which lease is
/// current: calls that fit the current lease never wait on a grant.
#[derive(Default)]
struct KeySlot {
    state: Mutex<KeyLeases>,
    granting: tokio::sync::Mutex<()>,
}

impl KeySlot {
    fn state(&self) -> std::sync::MutexGuard<'_, KeyLeases> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub struct Budget {
    source: Arc<dyn LeaseSource>,
    node_id: String,
    keys: Mutex<HashMap<String, Arc<KeySlot>>>,
    /// Leases to hand back, to a task on the runtime that created the
    /// budget, so retiring a lease never needs a runtime where it happens.
    returns: tokio::sync::mpsc::UnboundedSender<LocalLease>,
}

impl Budget {
    /// A budget drawing on `source`. Must be called within a tokio runtime:
    /// it starts the task that hands retired leases back.
    pub fn new(source: Arc<dyn LeaseSource>, node_id: &str) -> Arc<Self> {
        let (returns, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(return_leases(source.clone(), rx));
        Arc::new(Budget {
            source,
            node_id: node_id.to_string(),
            keys: Mutex::new(HashMap::new()),
            returns,
        })
    }

    fn entry(&self, key_id: &str) -> Arc<KeySlot> {
        let mut keys = self.keys.lock().expect("budget map lock");
        if let Some(slot) = keys.get(key_id) {
            return slot.clone();
        }
        keys.entry(key_id.to_string()).or_default().clone()
    }

    /// Reserves `amount` for one call on `key`, asking the control plane for
    /// more lease when needed. Zero-cost calls reserve nothing.
    pub async fn reserve(
        &self,
        key: &KeyPolicy,
        amount: Micros,
        now: DateTime<Utc>,
    ) -> Result<Reservation, Refusal> {
        let day = utc_day(now);
        if amount.0 <= 0 {
            return Ok(Reservation {
                key_id: key.id.clone(),
                lease_id: String::new(),
                day,
                amount: Micros::ZERO,
            });
        }
        let slot = self.entry(&key.id);
        // Fast path: the current lease is today's, not about to expire, and
        // covers the call.
        if let Some(r) = take_from_current(&mut slot.state(), key, amount, &day, now) {
            return Ok(r);
        }
        let _granting = slot.granting.lock().await;
        let req = {
            let mut st = slot.state();
            if st.day != day {
                self.retire_current(&mut st);
                st.day = day.clone();
                st.unleased = key.daily_cap.0;
            } else if st
                .current
                .as_ref()
                .is_some_and(|l| now + EXPIRY_MARGIN >= l.usable_until)
            {
                self.retire_current(&mut st);
            }
            // Another call may have been granted budget while this one
            // waited its turn.
            if let Some(r) = take_from_current(&mut st, key, amount, &day, now) {
                return Ok(r);
            }
            let available = st.current.as_ref().map_or(0, LocalLease::available);
            let need = amount.0 - available;
            pb::GrantLeaseRequest {
                grant_id: format!("grant_{}", uuid::Uuid::new_v4().simple()),
                lease_id: st.current.as_ref().map_or_else(
                    || format!("lease_{}", uuid::Uuid::new_v4().simple()),
                    |l| l.id.clone(),
                ),
                key_id: key.id.clone(),
                node_id: self.node_id.clone(),
                day: day.clone(),
                // Ask for a slice well beyond this call so most calls never
                // wait on the control plane; it grants at most what is left.
                requested_micros: need.max(key.daily_cap.0 / 8),
                minimum_micros: need,
            }
        };
        let lease_id = req.lease_id.clone();
        let resp = match self.source.grant(req.clone()).await {
            Ok(r) => r,
            // One retry with the same grant id: idempotent on the control
            // plane, so a lost answer is not granted twice.
            Err(_) => self.source.grant(req).await.map_err(|s| {
                tracing::warn!(code = ?s.code(), key = %key.id, "lease grant failed");
                Refusal::BudgetUnavailable
            })?,
        };
        // Only the holder of `granting` changes the current lease, so it is
        // still the one the grant was for (or still none).
        let mut st = slot.state();
        st.unleased = resp.unleased_micros;
        st.lifetime_bound = resp.lifetime_bound;
        if resp.granted_micros > 0 {
            let usable_until = resp.expires_at.as_ref().and_then(from_proto).unwrap_or(now);
            match &mut st.current {
                Some(l) => {
                    l.granted += resp.granted_micros;
                    l.usable_until = l.usable_until.min(usable_until);
                }
                None => {
                    st.current = Some(LocalLease {
                        id: lease_id,
                        granted: resp.granted_micros,
                        reserved: 0,
                        spent: 0,
                        usable_until,
                    })
                }
            }
        }
        let available = st.current.as_ref().map_or(0, LocalLease::available);
        if available < amount.0 {
            // Only the daily cap resets at midnight; saying so when the
            // lifetime cap is what ran out would send the agent back to a
            // key that can never serve it.
            let remaining = Micros((available + st.unleased).max(0));
            return Err(match key.lifetime_cap {
                Some(cap) if st.lifetime_bound => Refusal::LifetimeCapExceeded { cap, remaining },
                _ => Refusal::DailyCapExceeded {
                    cap: key.daily_cap,
                    remaining,
                    resets_at: next_utc_midnight(now),
                },
            });
        }
        let lease = st.current.as_mut().expect("lease present after grant");
        lease.reserved += amount.0;
        Ok(Reservation {
            key_id: key.id.clone(),
            lease_id: lease.id.clone(),
            day,
            amount,
        })
    }

    fn retire_current(&self, st: &mut KeyLeases) {
        if let Some(l) = st.current.take() {
            if l.reserved == 0 {
                self.give_back(l);
            } else {
                st.retiring.push(l);
            }
        }
    }

    fn give_back(&self, l: LocalLease) {
        if let Err(e) = self.returns.send(l) {
            // The budget's runtime is gone (shutting down); the lease
            // expires on the control plane and its unspent part comes back.
            tracing::warn!(lease = %e.0.id, "lease not returned; it will expire");
        }
    }

    /// Resolves a reservation to its real cost (0 releases it). Never
    /// waits: safe to call from `Drop`.
    pub fn resolve(&self, r: Reservation, cost: Micros) {
        if r.lease_id.is_empty() {
            return;
        }
        let slot = self.entry(&r.key_id);
        let mut st = slot.state();
        if let Some(l) = st.current.as_mut().filter(|l| l.id == r.lease_id) {
            l.reserved -= r.amount.0;
            l.spent += cost.0;
            return;
        }
        if let Some(i) = st.retiring.iter().position(|l| l.id == r.lease_id) {
            let l = &mut st.retiring[i];
            l.reserved -= r.amount.0;
            l.spent += cost.0;
            if l.reserved == 0 {
                let l = st.retiring.swap_remove(i);
                self.give_back(l);
            }
        }
    }

    /// A key went away (revoked, removed): hand its leases back as soon as
    /// their calls in flight have settled.
    pub async fn forget_key(&self, key_id: &str) {
        let slot = {
            let keys = self.keys.lock().expect("budget map lock");
            keys.get(key_id).cloned()
        };
        if let Some(slot) = slot {
            let _granting = slot.granting.lock().await;
            self.retire_current(&mut slot.state());
        }
    }
}

/// Reserves from the current lease when it is today's, usable a while
/// longer and covers `amount`; anything else is left to the grant path.
fn take_from_current(
    st: &mut KeyLeases,
    key: &KeyPolicy,
    amount: Micros,
    day: &str,
    now: DateTime<Utc>,
) -> Option<Reservation> {
    if st.day != day {
        return None;
    }
    let lease = st.current.as_mut()?;
    if now + EXPIRY_MARGIN >= lease.usable_until || lease.available() < amount.0 {
        return None;
    }
    lease.reserved += amount.0;
    Some(Reservation {
        key_id: key.id.clone(),
        lease_id: lease.id.clone(),
        day: day.to_string(),
        amount,
    })
}

/// Hands retired leases back with what was spent from them, each retried
/// with backoff on its own so one slow return holds up no other.
async fn return_leases(
    source: Arc<dyn LeaseSource>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<LocalLease>,
) {
    while let Some(l) = rx.recv().await {
        let source = source.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            for _ in 0..8 {
                match source.give_back(&l.id, l.spent).await {
                    Ok(()) => return,
                    Err(s) => {
                        tracing::debug!(code = ?s.code(), lease = %l.id, "lease return failed; retrying")
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            // The lease expires on the control plane anyway; its unspent
            // part becomes available again then.
            tracing::warn!(lease = %l.id, "lease not returned; it will expire");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use std::collections::HashMap as Map;
    use tonic::Status;

    /// An in-memory control plane ledger for one day: grants never exceed
    /// the cap minus what live leases hold.
    struct FakeLedger {
        cap: i64,
        state: Mutex<(Map<String, i64>, Map<String, i64>)>, // lease -> granted, lease -> returned spent
        fail: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl LeaseSource for FakeLedger {
        async fn grant(
            &self,
            req: pb::GrantLeaseRequest,
        ) -> Result<pb::GrantLeaseResponse, Status> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Status::unavailable("down"));
            }
            let mut st = self.state.lock().unwrap();
            let used: i64 = st.0.values().sum();
            let avail = self.cap - used;
            let g = if avail >= req.minimum_micros {
                req.requested_micros.min(avail)
            } else {
                0
            };
            *st.0.entry(req.lease_id).or_default() += g;
            Ok(pb::GrantLeaseResponse {
                granted_micros: g,
                lease_total_micros: 0,
                unleased_micros: avail - g,
                lifetime_bound: false,
                expires_at: Some(keycap_proto::time::to_proto(
                    Utc::now() + chrono::Duration::hours(1),
                )),
            })
        }
        async fn give_back(&self, lease_id: &str, spent: i64) -> Result<(), Status> {
            let mut st = self.state.lock().unwrap();
            st.0.insert(lease_id.to_string(), spent);
            st.1.insert(lease_id.to_string(), spent);
            Ok(())
        }
    }

    fn key(cap: i64) -> KeyPolicy {
        KeyPolicy {
            id: "key_1".into(),
            hash: [0; 32],
            vendor: "stripe".into(),
            endpoints: crate::endpoint::EndpointSet::parse(&["POST /v1/x".to_string()]).unwrap(),
            daily_cap: Micros(cap),
            per_call_cap: None,
            lifetime_cap: None,
            expires_at: Utc::now() + chrono::Duration::hours(1),
            agent_run_label: "run".into(),
            revoked: false,
            rate_limit_per_minute: None,
            allowed_cidrs: Vec::new(),
            zone: None,
        }
    }

    fn ledger(cap: i64) -> Arc<FakeLedger> {
        Arc::new(FakeLedger {
            cap,
            state: Mutex::new((Map::new(), Map::new())),
            fail: false.into(),
        })
    }

    #[tokio::test]
    async fn concurrent_reservations_never_exceed_the_cap() {
        let l = ledger(1_000);
        let b = Budget::new(l.clone(), "n1");
        let k = Arc::new(key(1_000));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (b, k) = (b.clone(), k.clone());
            tasks.push(tokio::spawn(async move {
                b.reserve(&k, Micros(30), Utc::now()).await.ok()
            }));
        }
        let mut ok = Vec::new();
        for t in tasks {
            if let Some(r) = t.await.unwrap() {
                ok.push(r);
            }
        }
        // 1000 / 30 = 33 calls fit, and exactly that many must be admitted.
        assert_eq!(ok.len(), 33);
        for r in ok {
            b.resolve(r, Micros(30));
        }
        let err = b.reserve(&k, Micros(30), Utc::now()).await.unwrap_err();
        match err {
            Refusal::DailyCapExceeded { remaining, cap, .. } => {
                assert_eq!(cap, Micros(1_000));
                assert_eq!(remaining, Micros(10));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn released_reservations_return_budget() {
        let l = ledger(100);
        let b = Budget::new(l, "n1");
        let k = key(100);
        let r = b.reserve(&k, Micros(100), Utc::now()).await.unwrap();
        assert!(b.reserve(&k, Micros(1), Utc::now()).await.is_err());
        b.resolve(r, Micros::ZERO);
        let r2 = b.reserve(&k, Micros(100), Utc::now()).await.unwrap();
        assert_eq!(r2.amount, Micros(100));
    }

    #[tokio::test]
    async fn control_plane_away_fails_closed_without_lease() {
        let l = ledger(100);
        l.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let b = Budget::new(l.clone(), "n1");
        let k = key(100);
        assert!(matches!(
            b.reserve(&k, Micros(10), Utc::now()).await,
            Err(Refusal::BudgetUnavailable)
        ));
        // With a lease in hand (an eighth of the cap: 12), the proxy keeps
        // serving from it while the control plane is away, and refuses once
        // the lease is spent.
        l.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        let r = b.reserve(&k, Micros(5), Utc::now()).await.unwrap();
        b.resolve(r, Micros(5));
        l.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = b.reserve(&k, Micros(5), Utc::now()).await.unwrap();
        b.resolve(r, Micros(5));
        assert!(matches!(
            b.reserve(&k, Micros(5), Utc::now()).await,
            Err(Refusal::BudgetUnavailable)
        ));
    }

    #[tokio::test]
    async fn a_new_day_returns_the_old_lease_with_its_spend() {
        let l = ledger(100);
        let b = Budget::new(l.clone(), "n1");
        let k = key(100);
        let today = Utc::now();
        let r = b.reserve(&k, Micros(40), today).await.unwrap();
        b.resolve(r, Micros(25));
        let tomorrow = today + chrono::Duration::days(1);
        // The first reservation of a new day retires yesterday's lease; it
        // goes back with its 25 spent, freeing 15 of the 40 it held.
        let r = b.reserve(&k, Micros(10), tomorrow).await.unwrap();
        b.resolve(r, Micros(10));
        for _ in 0..10_000 {
            if !l.state.lock().unwrap().1.is_empty() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let returned = l.state.lock().unwrap().1.clone();
        assert_eq!(returned.values().copied().collect::<Vec<_>>(), vec![25]);
        // The fake ledger has one window: 25 + 12 leased leaves 63.
        let r = b.reserve(&k, Micros(63), tomorrow).await.unwrap();
        b.resolve(r, Micros(63));
        assert!(b.reserve(&k, Micros(3), tomorrow).await.is_err());
    }

    #[tokio::test]
    async fn zero_cost_calls_reserve_nothing() {
        let l = ledger(1);
        l.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let b = Budget::new(l, "n1");
        let r = b.reserve(&key(1), Micros::ZERO, Utc::now()).await.unwrap();
        assert!(r.lease_id.is_empty());
        b.resolve(r, Micros::ZERO);
    }
}
