//! Spend ingest with group commit: the spend batches of concurrent
//! `ReportSpend` calls on one replica are joined into one store batch —
//! one transaction, one hold of the ledger head, one bulk write — so N
//! proxies reporting at once cost one transaction instead of N taking
//! turns on the head's lock.
//!
//! One writer task per replica takes whatever calls are waiting when it is
//! free and applies them together; each call still gets its own answer
//! (its events applied and its duplicates, in the joined batch's order of
//! arrival, so an event sent twice counts once whichever call carried it).
//! A joined batch that fails is applied again call by call, so one bad
//! batch fails only its own call. This module never decides what an event
//! means; the store applies it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::domain::SpendEvent;
use crate::store::{Store, StoreResult};

/// Most events one joined batch takes (one call alone may bring more, up
/// to what a call may carry).
const MAX_GROUP_EVENTS: usize = 10_000;
/// Calls waiting for the writer before new ones wait to be queued.
const QUEUE: usize = 1024;

struct Pending {
    events: Vec<SpendEvent>,
    reply: oneshot::Sender<StoreResult<(u32, u32)>>,
}

/// The replica's spend writer (see module docs).
pub struct SpendIngest {
    queue: mpsc::Sender<Pending>,
    batches: Arc<AtomicU64>,
}

impl SpendIngest {
    /// Starts the writer task; it ends when this is dropped.
    pub fn start(store: Arc<dyn Store>) -> SpendIngest {
        let (queue, rx) = mpsc::channel(QUEUE);
        let batches = Arc::new(AtomicU64::new(0));
        tokio::spawn(write(store, rx, batches.clone()));
        SpendIngest { queue, batches }
    }

    /// Store batches written so far (joined ones count once).
    pub fn batches_written(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Applies `events` (each at most once by event id); returns (applied,
    /// duplicates) for this call alone.
    pub async fn record(&self, events: Vec<SpendEvent>) -> StoreResult<(u32, u32)> {
        let (reply, answer) = oneshot::channel();
        let gone = || {
            crate::store::StoreError::Database(sqlx::Error::Protocol(
                "the spend writer stopped".into(),
            ))
        };
        self.queue
            .send(Pending { events, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn write(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Pending>, batches: Arc<AtomicU64>) {
    while let Some(first) = rx.recv().await {
        batches.fetch_add(1, Ordering::Relaxed);
        let mut n = first.events.len();
        let mut group = vec![first];
        while n < MAX_GROUP_EVENTS {
            match rx.try_recv() {
                Ok(p) => {
                    n += p.events.len();
                    group.push(p);
                }
                Err(_) => break,
            }
        }
        if group.len() == 1 {
            let p = group.pop().expect("one call");
            let answer = store.record_spend(&p.events).await;
            let _ = p.reply.send(answer);
            continue;
        }
        let sizes: Vec<usize> = group.iter().map(|p| p.events.len()).collect();
        let mut joined = Vec::with_capacity(n);
        let mut replies = Vec::with_capacity(group.len());
        for p in group {
            joined.extend(p.events);
            replies.push(p.reply);
        }
        match store.apply_spend(&joined).await {
            Ok(applied) => {
                let mut flags = applied.into_iter();
                for (reply, size) in replies.into_iter().zip(sizes) {
                    let mine = flags.by_ref().take(size).filter(|a| *a).count() as u32;
                    let _ = reply.send(Ok((mine, size as u32 - mine)));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, calls = replies.len(), "a joined spend batch failed; applying its calls one by one");
                let mut rest = joined.as_slice();
                for (reply, size) in replies.into_iter().zip(sizes) {
                    let (mine, after) = rest.split_at(size);
                    rest = after;
                    let _ = reply.send(store.record_spend(mine).await);
                }
            }
        }
    }
}
