//! Spend ingest with group commit: the spend batches of concurrent
//! `ReportSpend` calls on one replica are joined into one store batch —
//! one transaction, one hold of the ledger head, one bulk write — so N
//! proxies reporting at once cost one transaction instead of N taking
//! turns on the head's lock.
//!
//! One writer task per replica takes whatever calls are waiting when it is
//! free and applies them together, with up to three joined batches in
//! flight (each chained behind the one before, `ledger::pipeline`); each call
//! still gets its own answer (its events applied and its duplicates, in
//! the joined batch's order of arrival, so an event sent twice counts once
//! whichever call carried it).
//! A joined batch that fails is applied again call by call, so one bad
//! batch fails only its own call. This module never decides what an event
//! means; the store applies it.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};

use crate::domain::SpendEvent;
use crate::store::{Store, StoreResult};

/// Most events one joined batch takes (one call alone may bring more, up
/// to what a call may carry).
const MAX_GROUP_EVENTS: usize = 10_000;
/// Joined batches being written at once: the next ones' lookups and bulk
/// writes run while the one before them holds the ledger head and commits
/// (`ledger::pipeline`). A third in flight measured ~5% more events per
/// second than two, with the cores 3-5 points less idle (BENCHMARKS.md,
/// "Fleet ingest").
const IN_FLIGHT: usize = 3;
/// Calls waiting for the writer before new ones wait to be queued.
const QUEUE: usize = 1024;

/// One call's answer: (applied, duplicates) for its events alone.
type Answer = StoreResult<(u32, u32)>;

struct Pending {
    events: Vec<SpendEvent>,
    reply: oneshot::Sender<Answer>,
}

/// The replica's spend writer (see module docs).
pub struct SpendIngest {
    queue: mpsc::Sender<Pending>,
    batches: Arc<AtomicU64>,
}

impl SpendIngest {
    /// Starts the writer task; it ends when this is dropped.
    pub fn start(store: Arc<dyn Store>) -> SpendIngest {
        let (ingest, writer) = SpendIngest::held(store);
        tokio::spawn(writer);
        ingest
    }

    /// The ingest and its writer, not yet running: calls queue up until
    /// the writer is spawned, so a test can have it join exactly the
    /// calls it queued.
    fn held(store: Arc<dyn Store>) -> (SpendIngest, impl Future<Output = ()> + Send + 'static) {
        let (queue, rx) = mpsc::channel(QUEUE);
        let batches = Arc::new(AtomicU64::new(0));
        let writer = write(store, rx, batches.clone());
        (SpendIngest { queue, batches }, writer)
    }

    /// Store batches written so far (joined ones count once).
    pub fn batches_written(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Applies `events` (each at most once by event id); returns (applied,
    /// duplicates) for this call alone.
    pub async fn record(&self, events: Vec<SpendEvent>) -> StoreResult<(u32, u32)> {
        let answer = self.enqueue(events).await?;
        answer.await.map_err(|_| writer_gone())?
    }

    /// Queues one call for the writer; its answer comes on the receiver.
    async fn enqueue(&self, events: Vec<SpendEvent>) -> StoreResult<oneshot::Receiver<Answer>> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Pending { events, reply })
            .await
            .map_err(|_| writer_gone())?;
        Ok(answer)
    }
}

fn writer_gone() -> crate::store::StoreError {
    crate::store::StoreError::Database(sqlx::Error::Protocol("the spend writer stopped".into()))
}

async fn write(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Pending>, batches: Arc<AtomicU64>) {
    let mut writing = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(()) = writing.next(), if !writing.is_empty() => {}
            first = rx.recv(), if writing.len() < IN_FLIGHT => {
                let Some(first) = first else { break };
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
                writing.push(apply(store.clone(), group));
            }
        }
    }
    while writing.next().await.is_some() {}
}

/// Applies one group of calls as one store batch and answers each call.
async fn apply(store: Arc<dyn Store>, mut group: Vec<Pending>) {
    if group.len() == 1 {
        let p = group.pop().expect("one call");
        let answer = store.record_spend(&p.events).await;
        let _ = p.reply.send(answer);
        return;
    }
    let sizes: Vec<usize> = group.iter().map(|p| p.events.len()).collect();
    let mut joined = Vec::with_capacity(sizes.iter().sum());
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

#[cfg(test)]
mod tests {
    use keycap_proto::Micros;

    use super::*;
    use crate::store::{PgStore, SqliteStore};

    const DAY: &str = "2026-12-06";

    fn event(id: &str, cost: i64) -> SpendEvent {
        SpendEvent {
            lease_id: "lease-1".to_string(),
            day: DAY.to_string(),
            path: "/v1/payment_intents".to_string(),
            node_id: "node-a".to_string(),
            ..SpendEvent::settled(id, "key-1", cost, cost)
        }
    }

    /// Three calls joined into one batch, the middle one carrying an event
    /// the database refuses: the joined batch fails whole, then each call
    /// is applied on its own, so only the middle call fails and the
    /// others' events are in the ledger once each (an event the third call
    /// resends counts as a duplicate of the first call's).
    async fn one_refused_call_in_a_joined_batch_fails_only_itself(store: Arc<dyn Store>) {
        let (ingest, writer) = SpendIngest::held(store.clone());
        let first = ingest
            .enqueue(vec![event("a1", 10), event("a2", 20)])
            .await
            .unwrap();
        let refused = ingest
            .enqueue(vec![event("b1", 100), event("refused-by-db", 200)])
            .await
            .unwrap();
        let third = ingest
            .enqueue(vec![event("c1", 1_000), event("a2", 20)])
            .await
            .unwrap();
        // All three are queued before the writer runs: it takes them as
        // one group.
        tokio::spawn(writer);
        assert_eq!(first.await.unwrap().unwrap(), (2, 0));
        let err = refused.await.unwrap().expect_err("the refused call fails");
        assert!(
            matches!(err, crate::store::StoreError::Database(_)),
            "{err}"
        );
        assert_eq!(third.await.unwrap().unwrap(), (1, 1));
        assert_eq!(ingest.batches_written(), 1, "the three calls were joined");

        let spend = store.key_spend("key-1", DAY).await.unwrap();
        assert_eq!(
            (spend.spent_day, spend.calls_day),
            (Micros(1_030), 3),
            "a1, a2 and c1 once each; nothing of the refused call"
        );
        let entries = store.audit_chain(0, None, None, 100).await.unwrap();
        let ids: Vec<&str> = entries.iter().map(|e| e.event.event_id.as_str()).collect();
        assert_eq!(ids, ["a1", "a2", "c1"]);
        let verified = crate::ledger::verify(&*store, None, &[]).await.unwrap();
        assert!(verified.ok(), "{verified:?}");
        assert_eq!(verified.checked, 3);
    }

    #[tokio::test]
    async fn sqlite_one_refused_call_in_a_joined_batch_fails_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::connect(dir.path().join("keycap.db").to_str().unwrap())
            .await
            .unwrap();
        store.migrate().await.unwrap();
        sqlx::query(
            "CREATE TRIGGER refuse_one_event BEFORE INSERT ON audit \
             WHEN NEW.event_id = 'refused-by-db' \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        )
        .execute(store.pool())
        .await
        .unwrap();
        one_refused_call_in_a_joined_batch_fails_only_itself(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn postgres_one_refused_call_in_a_joined_batch_fails_only_itself() {
        let Some(db) = keycap_tests::pg::fresh_database_or_skip().await.unwrap() else {
            return;
        };
        let store = PgStore::connect(&db.url).await.unwrap();
        store.migrate().await.unwrap();
        sqlx::query(
            "ALTER TABLE audit ADD CONSTRAINT refuse_one_event \
             CHECK (event_id <> 'refused-by-db')",
        )
        .execute(store.pool())
        .await
        .unwrap();
        one_refused_call_in_a_joined_batch_fails_only_itself(Arc::new(store)).await;
        drop(db);
    }
}
