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
//! Lease size follows the node's own recent spend on the key: a slice asks
//! for about `HORIZON` of it (and at least a sixteenth of what is left
//! outside leases, so a key far from its cap rides out a control-plane
//! outage), never more than a quarter of the daily cap.
//! Near the cap (when the control plane has less left outside leases than
//! that) the node asks for exactly what the waiting call needs: slices
//! shrink to exactly-one-call grants. A node refused for lack of budget gives
//! back the part of its lease it cannot use, so another node can. While the
//! key is far from its cap a lease is topped up ahead of need, off the
//! request path, once it covers less than `RENEW_AHEAD` of recent spend.
//! A lease not drawn on for `IDLE_SHRINK` gives back what it holds beyond
//! its calls in flight, and one not drawn on for `IDLE_RETURN` goes back.
//!
//! Leases and reservations are keyed by the budget a key spends
//! (`KeyPolicy::budget_id`), not by the key: a rolled key and its successor
//! spend one budget and draw on one lease pool, so a roll never lets a node
//! hold two leases' worth of one chain's budget.
//!
//! Invariant kept here: for every lease, reserved + spent <= granted, except
//! where a settled cost exceeded its reservation (recorded at true cost).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

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
/// A lease is sized to cover this much of the node's recent spend on a key.
const HORIZON: Duration = Duration::from_secs(10);
/// Top a lease up, off the request path, once it covers less than this much
/// of the node's recent spend (or is within two margins of expiring).
const RENEW_AHEAD: Duration = Duration::from_secs(3);
/// Time constant of the spend-rate estimate.
const RATE_WINDOW: Duration = Duration::from_secs(5);
/// Before any spend rate is known, a slice covers this many calls of the
/// size that asked.
const FIRST_CALLS: i64 = 4;
/// A node never asks for more than this share of a key's daily cap.
const MAX_SHARE: i64 = 4;
/// A slice takes at least this share of what is left outside leases: far
/// from the cap, holding more costs no other node anything and carries this
/// one through a control-plane outage; near it, the share is small.
const LEFT_SHARE: i64 = 16;
/// A lease not drawn on for this long gives back what it holds beyond its
/// calls in flight, so budget never sits on an idle node for longer while a
/// busy one is refused.
const IDLE_SHRINK: Duration = Duration::from_secs(2);
/// A lease not drawn on for this long goes back to the key.
const IDLE_RETURN: Duration = Duration::from_secs(30);
/// How often idle leases are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// A reserved amount; resolve it exactly once with `Budget::resolve`.
#[derive(Debug)]
#[must_use = "a reservation must be resolved"]
pub struct Reservation {
    pub key_id: String,
    pub lease_id: String,
    pub day: String,
    pub amount: Micros,
}

/// A reservation held for one call, resolved exactly once: `resolve`
/// consumes it, and one dropped unresolved is released. Only a call that
/// never left drops it so; a call that has left resolves it when it
/// settles (see `proxy::Call`), so the drop is never the path that money
/// takes once the vendor may have charged.
#[must_use = "a held reservation is released when dropped"]
pub struct Held {
    budget: Arc<Budget>,
    reservation: Option<Reservation>,
}

impl Held {
    pub fn amount(&self) -> Micros {
        self.reservation().amount
    }

    pub fn lease_id(&self) -> &str {
        &self.reservation().lease_id
    }

    pub fn day(&self) -> &str {
        &self.reservation().day
    }

    fn reservation(&self) -> &Reservation {
        self.reservation.as_ref().expect("held until resolved")
    }

    /// Resolves the reservation to `cost` (0 releases it).
    pub fn resolve(mut self, cost: Micros) {
        let r = self.reservation.take().expect("held until resolved");
        self.budget.resolve(r, cost);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            self.budget.resolve(r, Micros::ZERO);
        }
    }
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

/// How fast this node draws on a key: an exponentially decaying sum of
/// reserved amounts. Only sizes lease requests; money itself stays integer.
#[derive(Debug, Default)]
struct SpendRate {
    decayed: f64,
    at: Option<Instant>,
}

impl SpendRate {
    fn decay(&mut self, now: Instant) {
        if let Some(at) = self.at {
            let elapsed = now.saturating_duration_since(at).as_secs_f64();
            self.decayed *= (-elapsed / RATE_WINDOW.as_secs_f64()).exp();
        }
        self.at = Some(now);
    }

    fn add(&mut self, amount: i64, now: Instant) {
        self.decay(now);
        self.decayed += amount as f64;
    }

    /// About what this node will draw over `span` at its recent rate.
    fn over(&mut self, span: Duration, now: Instant) -> i64 {
        self.decay(now);
        (self.decayed / RATE_WINDOW.as_secs_f64() * span.as_secs_f64()) as i64
    }
}

#[derive(Debug, Default)]
struct KeyLeases {
    day: String,
    current: Option<LocalLease>,
    /// Leases no longer drawn on whose reservations are still in flight.
    retiring: Vec<LocalLease>,
    /// The control plane's last word on budget left outside every lease.
    unleased: i64,
    /// Its last word on which cap binds: the lifetime cap, not the daily.
    lifetime_bound: bool,
    rate: SpendRate,
    last_used: Option<Instant>,
    /// A top-up is under way off the request path.
    renewing: bool,
    /// The caps (daily, lifetime) the current lease was asked for under: a
    /// key held to other caps since (a switch from observe mode) is served
    /// by a new lease, never by one granted under the old caps.
    terms: (i64, Option<i64>),
}

/// The caps a key's budget holds it to, as `KeyLeases::terms` keeps them.
fn terms_of(key: &KeyPolicy) -> (i64, Option<i64>) {
    (
        key.budget_daily_cap().0,
        key.budget_lifetime_cap().map(|m| m.0),
    )
}

impl KeyLeases {
    fn drew(&mut self, amount: i64, now: Instant) {
        self.rate.add(amount, now);
        self.last_used = Some(now);
    }

    /// What to ask for when `need` more is needed for a call of `amount`:
    /// about `HORIZON` of recent spend, at least a few calls' worth and a
    /// share of what is left, at most a share of the daily cap, and exactly
    /// `need` near the cap.
    fn ask_size(&mut self, daily_cap: i64, need: i64, amount: i64, now: Instant) -> i64 {
        let wanted = self
            .rate
            .over(HORIZON, now)
            .max(amount.saturating_mul(FIRST_CALLS))
            .max(self.unleased / LEFT_SHARE)
            .min(daily_cap / MAX_SHARE)
            .max(need);
        if self.unleased < wanted {
            need
        } else {
            wanted
        }
    }

    /// Whether the current lease should be topped up ahead of need: it is
    /// today's, the key is far from its cap, and the lease covers less than
    /// `RENEW_AHEAD` of recent spend or is close to expiring.
    fn wants_renewal(&mut self, day: &str, now: DateTime<Utc>, clock: Instant) -> bool {
        if self.renewing || self.day != day {
            return false;
        }
        let soon = self.rate.over(RENEW_AHEAD, clock);
        let horizon = self.rate.over(HORIZON, clock);
        let Some(lease) = &self.current else {
            return false;
        };
        let expiring = now + EXPIRY_MARGIN * 2 >= lease.usable_until;
        (lease.available() < soon || expiring) && self.unleased >= horizon
    }
}

/// One key's leases. `state` is only ever held for a few arithmetic steps,
/// never across an await, so settling a call needs no async lock and can
/// happen anywhere (even while a dropped call unwinds). `granting` is held
/// across a lease grant or shrink, and only its holder may change which
/// lease is current: calls that fit the current lease never wait on it.
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

/// What a node's leases hold at one moment (`Budget::held`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HeldLeases {
    /// Usable leases this node draws on: one per key at most.
    pub leases: i64,
    /// What they hold that no call has reserved or spent.
    pub available_micros: i64,
    /// What calls in flight have reserved (and not yet settled).
    pub reserved_micros: i64,
}

impl HeldLeases {
    /// Whether a call could be served from a lease without the control
    /// plane.
    pub fn can_serve(&self) -> bool {
        self.available_micros > 0
    }
}

pub struct Budget {
    source: Arc<dyn LeaseSource>,
    node_id: String,
    /// This run's mark in the ids of the leases it opens, telling them
    /// from the leases an earlier run of the same node left.
    run: String,
    keys: Mutex<HashMap<String, Arc<KeySlot>>>,
    /// Leases to hand back, to a task on the runtime that created the
    /// budget, so retiring a lease never needs a runtime where it happens.
    returns: tokio::sync::mpsc::UnboundedSender<LocalLease>,
    /// The runtime that created the budget: top-ups run there, not on the
    /// serving thread that noticed the need.
    runtime: tokio::runtime::Handle,
}

impl Budget {
    /// A budget drawing on `source`. Must be called within a tokio runtime:
    /// it starts the tasks that hand retired leases back and look for idle
    /// ones.
    pub fn new(source: Arc<dyn LeaseSource>, node_id: &str) -> Arc<Self> {
        let (returns, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(return_leases(source.clone(), rx));
        let budget = Arc::new(Budget {
            source,
            node_id: node_id.to_string(),
            run: uuid::Uuid::new_v4().simple().to_string()[..12].to_string(),
            keys: Mutex::new(HashMap::new()),
            returns,
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(sweep_idle(Arc::downgrade(&budget)));
        budget
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
        self: &Arc<Self>,
        key: &KeyPolicy,
        amount: Micros,
        now: DateTime<Utc>,
    ) -> Result<Reservation, Refusal> {
        let day = utc_day(now);
        if amount.0 <= 0 {
            return Ok(Reservation {
                key_id: key.budget_id.clone(),
                lease_id: String::new(),
                day,
                amount: Micros::ZERO,
            });
        }
        let slot = self.entry(&key.budget_id);
        let clock = Instant::now();
        // Fast path: the current lease is today's, not about to expire, and
        // covers the call.
        {
            let mut st = slot.state();
            if let Some(r) = take_from_current(&mut st, key, amount, &day, now) {
                st.drew(amount.0, clock);
                if st.wants_renewal(&day, now, clock) {
                    st.renewing = true;
                    drop(st);
                    let cap = key.budget_daily_cap().0;
                    self.top_up(slot.clone(), key.budget_id.clone(), cap, day);
                }
                return Ok(r);
            }
        }
        let _granting = slot.granting.lock().await;
        {
            let mut st = slot.state();
            if st.day != day || st.terms != terms_of(key) {
                self.retire_current(&mut st);
                st.day = day.clone();
                st.unleased = key.budget_daily_cap().0;
                st.terms = terms_of(key);
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
                st.drew(amount.0, clock);
                return Ok(r);
            }
        }
        // At most two asks: the second only after handing back the part of
        // this node's lease the call could not use, in case other nodes
        // handed theirs back meanwhile.
        let mut gave_back = false;
        loop {
            let req = {
                let mut st = slot.state();
                let available = st.current.as_ref().map_or(0, LocalLease::available);
                let need = amount.0 - available;
                let requested = if gave_back {
                    need
                } else {
                    st.ask_size(key.budget_daily_cap().0, need, amount.0, clock)
                };
                self.grant_request(&st, &key.budget_id, &day, requested, need)
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
            // Only the holder of `granting` changes the current lease, so it
            // is still the one the grant was for (or still none).
            let shrink = {
                let mut st = slot.state();
                apply_grant(&mut st, lease_id, &resp, now);
                let available = st.current.as_ref().map_or(0, LocalLease::available);
                if available >= amount.0 {
                    st.drew(amount.0, clock);
                    let lease = st.current.as_mut().expect("lease present after grant");
                    lease.reserved += amount.0;
                    return Ok(Reservation {
                        key_id: key.budget_id.clone(),
                        lease_id: lease.id.clone(),
                        day,
                        amount,
                    });
                }
                match st.current.as_mut().and_then(take_leftover) {
                    // Refused: what this lease holds beyond its calls is no
                    // use to this call, but may be to another node's. It
                    // leaves the local lease first, so no call draws on it
                    // meanwhile.
                    Some(shrink) if !gave_back => shrink,
                    _ => {
                        // Only the daily cap resets at midnight; saying so
                        // when the lifetime cap is what ran out would send
                        // the agent back to a key that can never serve it.
                        let remaining = Micros((available + st.unleased).max(0));
                        return Err(match key.budget_lifetime_cap() {
                            Some(cap) if st.lifetime_bound => {
                                Refusal::LifetimeCapExceeded { cap, remaining }
                            }
                            _ => Refusal::DailyCapExceeded {
                                cap: key.budget_daily_cap(),
                                remaining,
                                resets_at: next_utc_midnight(now),
                            },
                        });
                    }
                }
            };
            gave_back = true;
            self.send_shrink(shrink).await;
        }
    }

    /// `reserve`, held by a guard that resolves it exactly once.
    pub async fn hold(
        self: &Arc<Self>,
        key: &KeyPolicy,
        amount: Micros,
        now: DateTime<Utc>,
    ) -> Result<Held, Refusal> {
        let reservation = self.reserve(key, amount, now).await?;
        Ok(Held {
            budget: self.clone(),
            reservation: Some(reservation),
        })
    }

    /// What `key_id` has left as this node knows it: what its current
    /// lease still holds plus what the control plane last said was left
    /// outside every lease (so leases other nodes hold count as spent: a
    /// lower bound). `None` before this node has drawn on the key.
    pub fn remaining(&self, key_id: &str) -> Option<Micros> {
        let slot = self
            .keys
            .lock()
            .expect("budget map lock")
            .get(key_id)?
            .clone();
        let st = slot.state();
        let lease = st.current.as_ref()?;
        Some(Micros((lease.available() + st.unleased).max(0)))
    }

    /// The leases this node holds now (those it still draws on, not those
    /// retiring): how many are usable, what they hold unspent and
    /// unreserved, and what calls in flight have reserved of them.
    pub fn held(&self, now: DateTime<Utc>) -> HeldLeases {
        let slots: Vec<Arc<KeySlot>> = self
            .keys
            .lock()
            .expect("budget map lock")
            .values()
            .cloned()
            .collect();
        let mut held = HeldLeases::default();
        let today = utc_day(now);
        for slot in slots {
            let st = slot.state();
            let all = st.current.iter().chain(st.retiring.iter());
            for lease in all {
                held.reserved_micros += lease.reserved.max(0);
            }
            let usable = |l: &&LocalLease| st.day == today && now + EXPIRY_MARGIN < l.usable_until;
            if let Some(lease) = st.current.as_ref().filter(usable) {
                held.leases += 1;
                held.available_micros += lease.available().max(0);
            }
        }
        held
    }

    /// This run's mark in the ids of the leases it opens.
    pub fn run(&self) -> &str {
        &self.run
    }

    /// Whether the run marked `run` opened the lease `id`.
    fn opened_by(id: &str, run: &str) -> bool {
        id.strip_prefix("lease_")
            .and_then(|rest| rest.strip_prefix(run))
            .is_some_and(|rest| rest.starts_with('_'))
    }

    /// Hands back the leases the run marked `previous` (this node's last
    /// run) left open, each at what the control plane has been told it
    /// spent. Only for a restart whose spool holds every record that run
    /// wrote (`spool::Recovered::previous_run`) and has been delivered: then
    /// every cost those leases carried has been reported, and their rest is
    /// budget nobody can spend until they expire. Leases of older runs keep
    /// counting until they expire: one of them may have died with the
    /// machine. Retries while the control plane is away.
    pub async fn return_previous_run(&self, previous: &str) {
        let mut backoff = Duration::from_millis(100);
        let held = loop {
            match self.source.held().await {
                Ok(held) => break held,
                Err(s) => {
                    tracing::warn!(code = ?s.code(), "cannot list this node's leases; will retry");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        for l in held
            .into_iter()
            .filter(|l| Self::opened_by(&l.lease_id, previous))
        {
            loop {
                match self.source.give_back(&l.lease_id, l.reported_micros).await {
                    Ok(()) => break,
                    Err(s) if s.code() == tonic::Code::NotFound => break,
                    Err(s) => {
                        tracing::warn!(code = ?s.code(), lease = %l.lease_id, "cannot return a lease of the previous run; will retry");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            tracing::info!(
                lease = %l.lease_id,
                key = %l.key_id,
                granted = l.granted_micros,
                spent = l.reported_micros,
                "lease left by the previous run returned"
            );
        }
    }

    fn grant_request(
        &self,
        st: &KeyLeases,
        key_id: &str,
        day: &str,
        requested: i64,
        minimum: i64,
    ) -> pb::GrantLeaseRequest {
        pb::GrantLeaseRequest {
            grant_id: format!("grant_{}", uuid::Uuid::new_v4().simple()),
            lease_id: st.current.as_ref().map_or_else(
                || format!("lease_{}_{}", self.run, uuid::Uuid::new_v4().simple()),
                |l| l.id.clone(),
            ),
            key_id: key_id.to_string(),
            node_id: self.node_id.clone(),
            day: day.to_string(),
            requested_micros: requested,
            minimum_micros: minimum,
        }
    }

    /// Tops the key's lease up off the request path: grows it by about
    /// `HORIZON` of recent spend, or replaces it when it is close to
    /// expiring. Any failure only leaves the request path to ask itself.
    fn top_up(self: &Arc<Self>, slot: Arc<KeySlot>, key_id: String, daily_cap: i64, day: String) {
        let budget = self.clone();
        self.runtime.spawn(async move {
            let _granting = slot.granting.lock().await;
            let now = Utc::now();
            let clock = Instant::now();
            let req = {
                let mut st = slot.state();
                st.renewing = false;
                if st.day != day || st.current.is_none() {
                    return;
                }
                if st
                    .current
                    .as_ref()
                    .is_some_and(|l| now + EXPIRY_MARGIN * 2 >= l.usable_until)
                {
                    budget.retire_current(&mut st);
                }
                let size = st.ask_size(daily_cap, 1, 1, clock);
                budget.grant_request(&st, &key_id, &day, size, 1)
            };
            let lease_id = req.lease_id.clone();
            match budget.source.grant(req).await {
                Ok(resp) => apply_grant(&mut slot.state(), lease_id, &resp, now),
                Err(s) => tracing::debug!(code = ?s.code(), key = %key_id, "lease top-up failed"),
            }
        });
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

    /// Looks at every key's lease as of `clock`: one not drawn on for
    /// `IDLE_SHRINK` gives back what it holds beyond its calls, so a busy
    /// node can have it; one not drawn on for `IDLE_RETURN` goes back whole,
    /// and a key with nothing left to track is dropped. A key whose lease
    /// is being granted or shrunk right now is busy, not idle.
    async fn sweep(&self, clock: Instant) {
        let slots: Vec<(String, Arc<KeySlot>)> = {
            let keys = self.keys.lock().expect("budget map lock");
            keys.iter().map(|(k, s)| (k.clone(), s.clone())).collect()
        };
        for (key_id, slot) in slots {
            let Ok(granting) = slot.granting.try_lock() else {
                continue;
            };
            let (shrink, empty) = {
                let mut st = slot.state();
                let idle_for = st
                    .last_used
                    .map_or(IDLE_RETURN, |t| clock.saturating_duration_since(t));
                if idle_for >= IDLE_RETURN && st.current.as_ref().is_some_and(|l| l.reserved == 0) {
                    self.retire_current(&mut st);
                }
                let shrink = match st.current.as_mut() {
                    Some(l) if idle_for >= IDLE_SHRINK => take_leftover(l),
                    _ => None,
                };
                let empty = st.current.is_none() && st.retiring.is_empty();
                (shrink, empty)
            };
            if let Some(shrink) = shrink {
                self.send_shrink(shrink).await;
            }
            drop(granting);
            if empty {
                let mut keys = self.keys.lock().expect("budget map lock");
                // Only when nothing else holds the slot: a call between
                // looking it up and locking it keeps it.
                if keys
                    .get(&key_id)
                    .is_some_and(|s| Arc::ptr_eq(s, &slot) && Arc::strong_count(s) == 2)
                {
                    keys.remove(&key_id);
                }
            }
        }
    }

    /// Tells the control plane a lease gave up its leftover (already gone
    /// from the local lease). Call holding the key's `granting`.
    async fn send_shrink(&self, (id, from, keep): (String, i64, i64)) {
        if let Err(s) = self.source.shrink(&id, from, keep).await {
            // The control plane keeps counting the part given up until the
            // lease is returned: safe, only idle.
            tracing::debug!(code = ?s.code(), lease = %id, "lease not shrunk");
        }
    }
}

/// Takes what a lease holds beyond what its calls spent and reserved out of
/// it, for `Budget::send_shrink`: (lease id, grant before, grant after).
fn take_leftover(lease: &mut LocalLease) -> Option<(String, i64, i64)> {
    let leftover = lease.available();
    if leftover <= 0 {
        return None;
    }
    let from = lease.granted;
    lease.granted -= leftover;
    Some((lease.id.clone(), from, lease.granted))
}

/// Records a grant's answer: the control plane's view of what is left and
/// the lease's total grant.
fn apply_grant(
    st: &mut KeyLeases,
    lease_id: String,
    resp: &pb::GrantLeaseResponse,
    now: DateTime<Utc>,
) {
    st.unleased = resp.unleased_micros;
    st.lifetime_bound = resp.lifetime_bound;
    let usable_until = resp.expires_at.as_ref().and_then(from_proto).unwrap_or(now);
    match &mut st.current {
        Some(l) if l.id == lease_id => {
            // Only what this answer grants is added. Taking the control
            // plane's total instead would undo a shrink that had not landed
            // yet but still could, leaving the lease here larger than the
            // control plane counts it; adding never can, and a grant whose
            // answer was lost only stays idle until the lease is returned.
            l.granted += resp.granted_micros;
            l.usable_until = l.usable_until.min(usable_until);
        }
        Some(_) => {
            // Cannot happen: only the holder of `granting` changes the
            // current lease. The grant stays counted on the control plane
            // until it expires.
            tracing::error!(lease = %lease_id, "grant answer for a lease no longer current");
        }
        None if resp.granted_micros > 0 => {
            st.current = Some(LocalLease {
                id: lease_id,
                granted: resp.granted_micros,
                reserved: 0,
                spent: 0,
                usable_until,
            })
        }
        None => {}
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
    if st.day != day || st.terms != terms_of(key) {
        return None;
    }
    let lease = st.current.as_mut()?;
    if now + EXPIRY_MARGIN >= lease.usable_until || lease.available() < amount.0 {
        return None;
    }
    lease.reserved += amount.0;
    Some(Reservation {
        key_id: key.budget_id.clone(),
        lease_id: lease.id.clone(),
        day: day.to_string(),
        amount,
    })
}

/// Looks for idle leases every `SWEEP_EVERY` while the budget lives.
async fn sweep_idle(budget: Weak<Budget>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match budget.upgrade() {
            Some(b) => b.sweep(Instant::now()).await,
            None => return,
        }
    }
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

    #[derive(Default)]
    struct Ledger {
        /// lease -> granted
        leases: Map<String, i64>,
        /// lease -> spent, for returned leases
        returned: Map<String, i64>,
        /// (requested, minimum) of every grant asked for
        asks: Vec<(i64, i64)>,
        /// lease -> spend reported against it
        reported: Map<String, i64>,
    }

    /// An in-memory control plane for one day, with the control plane's
    /// grant rule: never beyond the cap minus what leases hold.
    struct FakeLedger {
        cap: i64,
        state: Mutex<Ledger>,
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
            st.asks.push((req.requested_micros, req.minimum_micros));
            let avail = self.cap - st.leases.values().sum::<i64>();
            let want = req.requested_micros.min(avail);
            let g = if want > 0 && want >= req.minimum_micros {
                want
            } else {
                0
            };
            let total = st.leases.entry(req.lease_id).or_default();
            *total += g;
            let lease_total = *total;
            Ok(pb::GrantLeaseResponse {
                granted_micros: g,
                lease_total_micros: lease_total,
                unleased_micros: avail - g,
                lifetime_bound: false,
                // Long enough for tests that move to the next day.
                expires_at: Some(keycap_proto::time::to_proto(
                    Utc::now() + chrono::Duration::days(3),
                )),
            })
        }

        async fn give_back(&self, lease_id: &str, spent: i64) -> Result<(), Status> {
            let mut st = self.state.lock().unwrap();
            st.leases.insert(lease_id.to_string(), spent);
            st.returned.insert(lease_id.to_string(), spent);
            Ok(())
        }

        async fn shrink(&self, lease_id: &str, granted: i64, keep: i64) -> Result<(), Status> {
            let mut st = self.state.lock().unwrap();
            let total = st.leases.get_mut(lease_id).expect("known lease");
            if *total == granted {
                *total = keep;
            }
            Ok(())
        }

        async fn held(&self) -> Result<Vec<pb::NodeLease>, Status> {
            let st = self.state.lock().unwrap();
            Ok(st
                .leases
                .iter()
                .filter(|(id, _)| !st.returned.contains_key(*id))
                .map(|(id, granted)| pb::NodeLease {
                    lease_id: id.clone(),
                    granted_micros: *granted,
                    reported_micros: st.reported.get(id).copied().unwrap_or(0),
                    ..Default::default()
                })
                .collect())
        }
    }

    fn key(cap: i64) -> KeyPolicy {
        KeyPolicy {
            id: "key_1".into(),
            budget_id: "key_1".into(),
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
            approval_above: None,
            observe_ceiling: None,
        }
    }

    fn ledger(cap: i64) -> Arc<FakeLedger> {
        Arc::new(FakeLedger {
            cap,
            state: Mutex::default(),
            fail: false.into(),
        })
    }

    async fn returned(l: &FakeLedger, count: usize) -> Map<String, i64> {
        for _ in 0..10_000 {
            if l.state.lock().unwrap().returned.len() >= count {
                break;
            }
            tokio::task::yield_now().await;
        }
        l.state.lock().unwrap().returned.clone()
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
    async fn a_restart_returns_the_previous_run_s_leases_at_their_reported_spend() {
        let l = ledger(10_000);
        // The previous run of this node: a lease of 4000 with 1500
        // reported. And one of a run before it, which may have lost records
        // in a machine crash.
        {
            let mut st = l.state.lock().unwrap();
            st.leases.insert("lease_0123456789ab_old".into(), 4_000);
            st.reported.insert("lease_0123456789ab_old".into(), 1_500);
            st.leases.insert("lease_ba9876543210_older".into(), 2_000);
        }
        let b = Budget::new(l.clone(), "n1");
        let k = key(10_000);
        let r = b.reserve(&k, Micros(100), Utc::now()).await.unwrap();
        let own = r.lease_id.clone();
        assert!(Budget::opened_by(&own, b.run()), "{own}");

        b.return_previous_run("0123456789ab").await;
        let st = l.state.lock().unwrap();
        assert_eq!(
            st.returned.get("lease_0123456789ab_old"),
            Some(&1_500),
            "returned at what was reported, the rest freed"
        );
        assert!(!st.returned.contains_key(&own), "this run's lease stays");
        assert!(
            !st.returned.contains_key("lease_ba9876543210_older"),
            "an older run's lease keeps counting until it expires"
        );
        drop(st);
        b.resolve(r, Micros(100));
    }

    async fn serve_until_refused(b: &Arc<Budget>, k: &KeyPolicy, amount: i64) -> usize {
        let mut served = 0;
        while let Ok(r) = b.reserve(k, Micros(amount), Utc::now()).await {
            b.resolve(r, Micros(amount));
            served += 1;
        }
        served
    }

    #[tokio::test]
    async fn no_budget_is_stranded_on_an_idle_node() {
        // $10 in $1 calls. Node 2 makes one call and goes idle holding the
        // rest of its slice; node 1 is busy.
        let l = ledger(10_000);
        let (busy, idle) = (Budget::new(l.clone(), "n1"), Budget::new(l.clone(), "n2"));
        let k = key(10_000);
        let r = idle.reserve(&k, Micros(1_000), Utc::now()).await.unwrap();
        idle.resolve(r, Micros(1_000));
        let first = serve_until_refused(&busy, &k, 1_000).await;
        assert!(first < 9, "the idle node held no budget back: {first}");
        // A refused node gave back what it could not use.
        let asks = l.state.lock().unwrap().asks.clone();
        assert!(asks.iter().any(|&(req, min)| req == min), "{asks:?}");
        // Once idle for a moment, node 2 gives back what it holds beyond
        // its calls, and node 1 serves until exactly the cap is spent.
        idle.sweep(Instant::now() + IDLE_SHRINK).await;
        let second = serve_until_refused(&busy, &k, 1_000).await;
        assert_eq!(1 + first + second, 10);
        // The idle node still has its lease, spent as it was, and serves
        // nothing more: the cap is spent.
        assert!(l.state.lock().unwrap().returned.is_empty());
        assert!(idle.reserve(&k, Micros(1), Utc::now()).await.is_err());
    }

    #[tokio::test]
    async fn a_refused_node_gives_back_what_it_cannot_use() {
        // Two nodes each hold less than a call while, together with what is
        // left, there is enough for one: a refusal hands the leftover back
        // and the other node serves the call.
        let l = ledger(1_000);
        let (a, b) = (Budget::new(l.clone(), "a"), Budget::new(l.clone(), "b"));
        let k = key(1_000);
        // Each node's first slice is a quarter of the cap: 250, of which
        // 200 is spent; 500 stays outside both leases.
        for node in [&a, &b] {
            let r = node.reserve(&k, Micros(200), Utc::now()).await.unwrap();
            node.resolve(r, Micros(200));
        }
        // 50 + 50 + 500 is 600: node a is refused a 600 call (it can get
        // at most 50 + 500), gives its 50 back, and node b then gets 600.
        assert!(a.reserve(&k, Micros(600), Utc::now()).await.is_err());
        let r = b.reserve(&k, Micros(600), Utc::now()).await.unwrap();
        b.resolve(r, Micros(600));
        assert!(b.reserve(&k, Micros(1), Utc::now()).await.is_err());
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
        let l = ledger(1_000);
        l.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let b = Budget::new(l.clone(), "n1");
        let k = key(1_000);
        assert!(matches!(
            b.reserve(&k, Micros(10), Utc::now()).await,
            Err(Refusal::BudgetUnavailable)
        ));
        // With a lease in hand (a first slice: a sixteenth of what is left,
        // 62), the proxy keeps serving from it while the control plane is
        // away, and refuses once the lease is spent.
        l.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        let r = b.reserve(&k, Micros(10), Utc::now()).await.unwrap();
        b.resolve(r, Micros(10));
        assert_eq!(l.state.lock().unwrap().asks, vec![(62, 10)]);
        l.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        for _ in 0..5 {
            let r = b.reserve(&k, Micros(10), Utc::now()).await.unwrap();
            b.resolve(r, Micros(10));
        }
        assert!(matches!(
            b.reserve(&k, Micros(10), Utc::now()).await,
            Err(Refusal::BudgetUnavailable)
        ));
    }

    #[tokio::test]
    async fn a_switch_from_observe_mode_serves_no_call_from_the_ceiling_s_lease() {
        let l = ledger(100);
        let b = Budget::new(l.clone(), "n1");
        let observing = KeyPolicy {
            observe_ceiling: Some(Micros(100)),
            ..key(5)
        };
        let now = Utc::now();
        // Held to the ceiling, not its daily cap of 5.
        let r = b.reserve(&observing, Micros(40), now).await.unwrap();
        b.resolve(r, Micros(30));
        assert!(b.remaining(&observing.budget_id).unwrap() > Micros(5));
        // Switched: the lease asked for under the ceiling goes back with
        // its spend, and the next call asks for a lease under the new caps.
        let enforcing = key(5);
        let r = b.reserve(&enforcing, Micros(1), now).await.unwrap();
        let back = returned(&l, 1).await;
        assert_eq!(back.values().copied().collect::<Vec<_>>(), vec![30]);
        assert_ne!(r.lease_id, "", "{r:?}");
        assert!(!back.contains_key(&r.lease_id), "a new lease serves it");
        b.resolve(r, Micros(1));
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
        // goes back with its 25 spent.
        let r = b.reserve(&k, Micros(10), tomorrow).await.unwrap();
        b.resolve(r, Micros(10));
        let back = returned(&l, 1).await;
        assert_eq!(back.values().copied().collect::<Vec<_>>(), vec![25]);
        // The fake ledger has one window: of its 100, 25 went yesterday and
        // 10 today, so 65 are left whichever lease holds them.
        assert!(b.reserve(&k, Micros(66), tomorrow).await.is_err());
        let r = b.reserve(&k, Micros(65), tomorrow).await.unwrap();
        b.resolve(r, Micros(65));
        assert!(b.reserve(&k, Micros(1), tomorrow).await.is_err());
    }

    #[tokio::test]
    async fn an_idle_lease_goes_back_and_a_busy_one_stays() {
        let l = ledger(1_000);
        let b = Budget::new(l.clone(), "n1");
        let k = key(1_000);
        let r = b.reserve(&k, Micros(10), Utc::now()).await.unwrap();
        // A reservation in flight keeps the lease however long it takes.
        b.sweep(Instant::now() + IDLE_RETURN * 2).await;
        assert!(l.state.lock().unwrap().returned.is_empty());
        b.resolve(r, Micros(7));
        // Drawn on just now: not idle.
        b.sweep(Instant::now()).await;
        assert!(l.state.lock().unwrap().returned.is_empty());
        b.sweep(Instant::now() + IDLE_RETURN).await;
        let back = returned(&l, 1).await;
        assert_eq!(back.values().copied().collect::<Vec<_>>(), vec![7]);
        assert!(b.keys.lock().unwrap().is_empty(), "idle key forgotten");
        // The key is served again from a fresh lease.
        let r = b.reserve(&k, Micros(10), Utc::now()).await.unwrap();
        assert_ne!(back.keys().next(), Some(&r.lease_id));
        b.resolve(r, Micros(10));
    }

    #[tokio::test]
    async fn a_busy_lease_is_topped_up_off_the_request_path() {
        let l = ledger(1_600);
        let b = Budget::new(l.clone(), "n1");
        let k = key(1_600);
        // The first call asks on the request path, for four calls' worth (a
        // quarter of this small cap).
        let r = b.reserve(&k, Micros(100), Utc::now()).await.unwrap();
        b.resolve(r, Micros(100));
        assert_eq!(l.state.lock().unwrap().asks, vec![(400, 100)]);
        // The next calls fit the lease; one of them finds it running low
        // and starts a top-up that no call waits on (minimum 1).
        for _ in 0..3 {
            let r = b.reserve(&k, Micros(100), Utc::now()).await.unwrap();
            b.resolve(r, Micros(100));
        }
        for _ in 0..10_000 {
            if l.state.lock().unwrap().asks.len() >= 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
        let asks = l.state.lock().unwrap().asks.clone();
        assert_eq!(asks.len(), 2, "{asks:?}");
        assert_eq!(asks[1].1, 1, "a top-up needs no minimum: {asks:?}");
        assert!(asks[1].0 >= 400, "sized from recent spend: {asks:?}");
        // The grown lease serves the next call without another ask.
        let r = b.reserve(&k, Micros(100), Utc::now()).await.unwrap();
        b.resolve(r, Micros(100));
        assert_eq!(l.state.lock().unwrap().asks.len(), 2);
    }

    #[test]
    fn slices_follow_the_spend_rate_and_shrink_to_one_call_near_the_cap() {
        let mut st = KeyLeases {
            unleased: 16_000,
            ..KeyLeases::default()
        };
        let t0 = Instant::now();
        // Nothing known yet: four calls' worth.
        assert_eq!(st.ask_size(1_000_000_000, 500, 500, t0), 2_000);
        // 1000 micro-dollars a second for a minute: about ten seconds' worth.
        let mut t = t0;
        for _ in 0..600 {
            t += Duration::from_millis(100);
            st.rate.add(100, t);
        }
        let size = st.ask_size(1_000_000_000, 500, 500, t);
        assert!((9_000..=11_000).contains(&size), "{size}");
        // Never more than a quarter of the daily cap.
        assert_eq!(st.ask_size(20_000, 500, 500, t), 5_000);
        // Far from the cap, a sixteenth of what is left when that is more.
        st.unleased = 1_000_000_000;
        assert_eq!(st.ask_size(1_000_000_000, 500, 500, t), 62_500_000);
        // Less left outside leases than a slice: exactly what the call needs.
        st.unleased = 3_000;
        assert_eq!(st.ask_size(1_000_000_000, 500, 500, t), 500);
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
