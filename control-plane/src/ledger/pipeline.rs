//! The order of one replica's appends in flight, so that the next batch's
//! dedupe lookup and bulk write run while the batch before it still holds
//! the ledger head (docs/ledger.md, "Ingest").
//!
//! Every append takes a [`Ticket`] in turn. A ticket behind an append
//! still in flight learns the head that append will leave once that append
//! has chained its entries ([`Ticket::start`]); only then does it look its
//! events up (every entry below that head is by then committed, or carried
//! by an append before it), drops every event the appends before it carry
//! ([`Ticket::earlier_holds`]), chains its own entries onto that head and
//! writes them, then waits for the append before
//! it to finish ([`Ticket::earlier_done`]) and takes the ledger head's lock.
//! It commits only if every append before it committed
//! ([`Ticket::earlier_committed`]) and the head under the lock is exactly
//! the one it chained onto (seq and hash): then no other replica appended
//! in between, so what its lookup saw plus what those appends carried is
//! everything stored. Otherwise it rolls back and appends again holding
//! the lock from the start, as an append with no ticket before it does.
//!
//! This module holds no rows and no connections: it only orders tickets.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// A ledger head: the last entry's seq and hash.
pub type Head = (i64, [u8; 32]);

/// After a ticket's chained head proved stale (another replica appended),
/// this many appends take the lock first: under contention between
/// replicas, work done ahead of the lock is mostly thrown away.
const BACK_OFF_APPENDS: u32 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Looking its events up; its head is not known yet.
    Working,
    /// Its entries are chained and end at this head, if it commits.
    Chained(Head),
    /// Finished: committed, leaving this head, or not (`None`).
    Done(Option<Head>),
}

/// The appends of one store, in the order they took their tickets.
#[derive(Default)]
pub struct Appends {
    tail: Mutex<Tail>,
    ahead: AtomicU64,
    missed: AtomicU64,
}

#[derive(Default)]
struct Tail {
    /// The tickets not yet finished, by ticket number (oldest first).
    in_flight: Vec<(u64, Earlier)>,
    next: u64,
    back_off: u32,
}

impl Appends {
    /// Appends committed ahead of the lock, and appends whose chained head
    /// proved stale, so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.ahead.load(Ordering::Relaxed),
            self.missed.load(Ordering::Relaxed),
        )
    }

    /// Takes the next ticket for an append of the events `ids`.
    pub fn ticket<'a, I: IntoIterator<Item = &'a str>>(&self, ids: I) -> Ticket<'_> {
        let ids: Arc<HashSet<String>> = Arc::new(ids.into_iter().map(str::to_owned).collect());
        let (stage, rx) = watch::channel(Stage::Working);
        let mut tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let number = tail.next;
        tail.next += 1;
        let earlier: Vec<Earlier> = tail.in_flight.iter().map(|(_, e)| e.clone()).collect();
        // Behind the latest append still in flight, if any, and not while
        // backing off.
        let behind = !earlier.is_empty() && tail.back_off == 0;
        tail.back_off = tail.back_off.saturating_sub(1);
        tail.in_flight.push((number, Earlier { stage: rx, ids }));
        Ticket {
            appends: self,
            number,
            stage,
            behind,
            earlier,
        }
    }
}

/// One append's place in line (see the module docs). Dropped without
/// [`Ticket::done`], it counts as an append that did not commit.
pub struct Ticket<'a> {
    appends: &'a Appends,
    number: u64,
    stage: watch::Sender<Stage>,
    /// Whether this append chains behind the last of `earlier`.
    behind: bool,
    /// The tickets before this one still in flight when it was taken.
    earlier: Vec<Earlier>,
}

/// A ticket taken earlier: its stage and its event ids.
#[derive(Clone)]
struct Earlier {
    stage: watch::Receiver<Stage>,
    ids: Arc<HashSet<String>>,
}

impl Ticket<'_> {
    /// Whether an append of this replica was in flight when this ticket
    /// was taken (otherwise this append takes the lock first).
    pub fn behind(&self) -> bool {
        self.behind
    }

    /// The stage of the append this one chains behind, if it does.
    fn prev(&mut self) -> Option<&mut watch::Receiver<Stage>> {
        let behind = self.behind;
        self.earlier
            .last_mut()
            .filter(|_| behind)
            .map(|e| &mut e.stage)
    }

    /// The head the append before this one leaves if it commits, once it
    /// is known; `None` when this append must take the lock first (no
    /// append in flight before it, or that one did not get as far).
    pub async fn start(&mut self) -> Option<Head> {
        let prev = self.prev()?;
        let stage = match prev.wait_for(|s| *s != Stage::Working).await {
            Ok(stage) => *stage,
            Err(_) => Stage::Done(None),
        };
        match stage {
            Stage::Chained(head) | Stage::Done(Some(head)) => Some(head),
            Stage::Working | Stage::Done(None) => None,
        }
    }

    /// Whether an append before this one, still in flight when this ticket
    /// was taken, carries event `id`. Such an event is stored once that
    /// append commits: an append that counts on it being stored commits
    /// only if [`Ticket::earlier_committed`].
    pub fn earlier_holds(&self, id: &str) -> bool {
        self.earlier.iter().any(|e| e.ids.contains(id))
    }

    /// Whether every append before this one that was still in flight when
    /// this ticket was taken has committed.
    pub fn earlier_committed(&self) -> bool {
        self.earlier
            .iter()
            .all(|e| matches!(*e.stage.borrow(), Stage::Done(Some(_))))
    }

    /// This append's entries are chained and end at `head`.
    pub fn chained(&self, head: Head) {
        self.stage.send_replace(Stage::Chained(head));
    }

    /// Waits until the append before this one has committed or failed.
    pub async fn earlier_done(&mut self) {
        if let Some(prev) = self.prev() {
            let _ = prev.wait_for(|s| matches!(s, Stage::Done(_))).await;
        }
    }

    /// The head this append found under the lock was not the one it
    /// chained onto: another replica appended in between.
    pub fn missed(&self) {
        self.appends.missed.fetch_add(1, Ordering::Relaxed);
        crate::metrics::METRICS.append_ahead(false);
        tracing::debug!(
            appends = BACK_OFF_APPENDS,
            "another replica appended to the ledger in between; the next appends take its lock first"
        );
        let mut tail = self.appends.tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.back_off = BACK_OFF_APPENDS;
    }

    /// This append finished: committed, leaving `head`, or not (`None`).
    pub fn done(&self, head: Option<Head>) {
        self.stage.send_replace(Stage::Done(head));
        self.leave(head.is_some());
    }

    /// Takes this ticket off the appends in flight. One that ends without
    /// a known commit (an error, or dropped mid-append) may still commit:
    /// its COMMIT can be on its way, its session holding the head's lock.
    /// A ticket taken after it no longer lists it, so could chain behind
    /// another and look up before that commit shows; the next appends take
    /// the lock first instead, and so wait for that session to finish.
    fn leave(&self, committed: bool) {
        let mut tail = self.appends.tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.in_flight.retain(|(n, _)| *n != self.number);
        if !committed {
            tail.back_off = BACK_OFF_APPENDS;
        }
    }

    /// This append committed ahead of the lock, leaving `head`.
    pub fn done_ahead(&self, head: Head) {
        self.appends.ahead.fetch_add(1, Ordering::Relaxed);
        crate::metrics::METRICS.append_ahead(true);
        self.done(Some(head));
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let unfinished = self.stage.send_if_modified(|s| match s {
            Stage::Done(_) => false,
            _ => {
                *s = Stage::Done(None);
                true
            }
        });
        if unfinished {
            self.leave(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    fn head(seq: i64) -> Head {
        (seq, [seq as u8; 32])
    }

    #[test]
    fn after_an_append_of_unknown_outcome_the_next_ones_take_the_lock_first() {
        for ends in ["dropped", "failed"] {
            let appends = Appends::default();
            let in_flight = appends.ticket(["a"]);
            let unknown = appends.ticket(["b"]);
            unknown.chained(head(3));
            if ends == "failed" {
                unknown.done(None);
            } else {
                drop(unknown);
            }
            // Another append is still in flight, yet the next ones do not
            // chain behind it: the one that ended may commit yet.
            let next = |appends: &Appends| {
                let t = appends.ticket(["c"]);
                let behind = t.behind();
                t.done(Some(head(4)));
                behind
            };
            for _ in 0..BACK_OFF_APPENDS {
                assert!(!next(&appends), "{ends}");
            }
            assert!(next(&appends), "{ends}: back to chaining");
            in_flight.done(Some(head(1)));
        }
        // A commit leaves the chaining as it was.
        let appends = Appends::default();
        let _in_flight = appends.ticket(["a"]);
        appends.ticket(["b"]).done(Some(head(2)));
        assert!(appends.ticket(["c"]).behind());
    }

    #[tokio::test]
    async fn a_ticket_behind_an_append_in_flight_chains_onto_the_head_it_will_leave() {
        let appends = Appends::default();
        let mut first = appends.ticket(["a", "b"]);
        assert_eq!(
            first.start().await,
            None,
            "nothing before it: it locks first"
        );
        let mut second = appends.ticket(["b", "c"]);
        assert!(second.earlier_holds("a") && second.earlier_holds("b"));
        assert!(!second.earlier_holds("c"), "its own events are not earlier");
        first.chained(head(2));
        assert_eq!(second.start().await, Some(head(2)));
        assert!(
            second.earlier_done().now_or_never().is_none(),
            "it waits for the first to finish"
        );
        assert!(!second.earlier_committed());
        first.done(Some(head(2)));
        second.earlier_done().await;
        assert!(second.earlier_committed());
        second.done(Some(head(3)));
        let third = appends.ticket(["d"]);
        assert!(
            !third.earlier_holds("a"),
            "finished appends are not in flight"
        );
        assert!(!third.behind(), "behind a finished append it locks first");
    }

    #[tokio::test]
    async fn a_third_append_in_flight_counts_on_both_before_it() {
        let appends = Appends::default();
        let first = appends.ticket(["a"]);
        let mut second = appends.ticket(["b"]);
        let mut third = appends.ticket(["c"]);
        assert!(third.earlier_holds("a") && third.earlier_holds("b"));
        first.chained(head(1));
        assert_eq!(second.start().await, Some(head(1)));
        assert!(
            third.start().now_or_never().is_none(),
            "it chains onto the second, not the first"
        );
        second.chained(head(2));
        assert_eq!(third.start().await, Some(head(2)));
        first.done(Some(head(1)));
        assert!(
            third.earlier_done().now_or_never().is_none(),
            "it waits for the second to finish"
        );
        second.earlier_done().await;
        drop(second);
        third.earlier_done().await;
        assert!(
            !third.earlier_committed(),
            "the first committed but the second did not: b may not be stored"
        );
    }

    #[tokio::test]
    async fn a_ticket_behind_an_append_that_failed_or_was_dropped_locks_first() {
        let appends = Appends::default();
        let first = appends.ticket(["a"]);
        let mut second = appends.ticket(["b"]);
        first.done(None);
        assert_eq!(second.start().await, None);
        let mut third = appends.ticket(["c"]);
        drop(second);
        assert_eq!(third.start().await, None, "a dropped ticket did not commit");
        third.earlier_done().await;
        assert!(
            third.earlier_holds("b"),
            "b was in flight when third was taken"
        );
        assert!(
            !third.earlier_committed(),
            "so third may not count on b being stored"
        );
    }

    #[tokio::test]
    async fn after_a_miss_appends_lock_first_for_a_while() {
        let appends = Appends::default();
        let first = appends.ticket(["a"]);
        first.missed();
        let mut held = vec![first];
        for n in 0..BACK_OFF_APPENDS {
            let t = appends.ticket([format!("x{n}").as_str()]);
            assert!(!t.behind(), "append {n} after the miss locks first");
            held.push(t);
        }
        let t = appends.ticket(["y"]);
        assert!(t.behind(), "then appends pipeline again");
    }
}
