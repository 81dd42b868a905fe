//! Delivers spend events to the control plane in batches.
//!
//! The request path hands each event to an unbounded in-memory queue and
//! moves on; a background task sends batches and, while the control plane is
//! away, keeps retrying the same batch with capped backoff. Events carry ids
//! and the control plane applies each once, so a batch resent after a lost
//! answer is not counted twice. Order within the queue is kept.
//!
//! With a spool (`--spool-dir`), every event is also on disk until the
//! control plane has applied it: a reservation record before the call is
//! forwarded, the event when it settles, one fsync per batch before the
//! batch is sent, and the records dropped once the batch is applied. A
//! restarted proxy delivers what its previous run left (`replay`). Without
//! one, events not yet delivered are lost if the proxy process dies.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keycap_proto::pb;
use tokio::sync::mpsc;

use crate::fleet::SpendSink;
use crate::spool::{Recovered, Spool};

const MAX_BATCH: usize = 1000;
/// How long a batch waits for more events once its first has arrived. Each
/// batch is one transaction on the control plane; a few milliseconds of
/// audit latency buy batches large enough that the ledger keeps up with the
/// proxy instead of competing with it for CPU.
const LINGER: Duration = Duration::from_millis(20);

#[derive(Clone)]
pub struct SpendReporter {
    tx: mpsc::UnboundedSender<pb::SpendEvent>,
    spool: Option<Arc<Spool>>,
    run_prefix: Arc<str>,
    seq: Arc<AtomicU64>,
    pending: Arc<Pending>,
}

/// Spend events handed to delivery and not yet applied (or refused) by
/// the control plane, by when each was handed over: the backlog a control
/// plane that is away leaves (metrics). Delivery keeps their order, so the
/// oldest is always first.
#[derive(Default)]
pub struct Pending(Mutex<VecDeque<Instant>>);

impl Pending {
    fn queued(&self) {
        self.lock().push_back(Instant::now());
    }

    fn delivered(&self, n: usize) {
        let mut q = self.lock();
        let n = n.min(q.len());
        q.drain(..n);
    }

    /// How many events wait, and how long the oldest has waited.
    pub fn backlog(&self) -> (usize, Duration) {
        let q = self.lock();
        (q.len(), q.front().map_or(Duration::ZERO, Instant::elapsed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Instant>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl SpendReporter {
    /// Starts the delivery task. It ends once every reporter clone is
    /// dropped and the events queued by then are delivered; await the
    /// handle to flush on shutdown.
    pub fn start(
        sink: Arc<dyn SpendSink>,
        spool: Option<Arc<Spool>>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(Pending::default());
        let task = tokio::spawn(deliver(sink, rx, spool.clone(), pending.clone()));
        let reporter = SpendReporter {
            tx,
            spool,
            run_prefix: uuid::Uuid::new_v4().simple().to_string().into(),
            seq: Arc::new(AtomicU64::new(0)),
            pending,
        };
        (reporter, task)
    }

    /// The events waiting for the control plane.
    pub fn pending(&self) -> Arc<Pending> {
        self.pending.clone()
    }

    /// A fresh event id. Ids from one proxy run share a random prefix and
    /// then count up, so they are unique across the fleet, cost no system
    /// call, and land next to each other in the ledger's `event_id` index.
    pub fn next_event_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("ev_{}{n:016x}", self.run_prefix)
    }

    /// Records, before a call is forwarded, what it reports if it never
    /// settles. An error means the call must not be forwarded.
    pub fn reserve(&self, at_reservation: &pb::SpendEvent) -> std::io::Result<()> {
        match &self.spool {
            Some(spool) => spool.reserve(at_reservation),
            None => Ok(()),
        }
    }

    /// Whether events are kept in a spool until delivered.
    pub fn spooled(&self) -> bool {
        self.spool.is_some()
    }

    /// Records in the spool, without sending them, events that are still
    /// growing (a refusal window's running count): if this run dies, the
    /// next delivers the last one recorded under each id; a later `send`
    /// of the same id supersedes them. Made durable with one fsync.
    pub async fn checkpoint(&self, events: Vec<pb::SpendEvent>) -> std::io::Result<()> {
        let Some(spool) = self.spool.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            for event in &events {
                spool.reserve(event)?;
            }
            spool.sync()
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// A call whose reservation record was written was not forwarded after
    /// all: drops the record, so a restart does not report it.
    pub fn never_sent(&self, event_id: &str) {
        if let Some(spool) = &self.spool {
            spool.delivered([event_id]);
        }
    }

    pub fn send(&self, event: pb::SpendEvent) {
        if let Some(spool) = &self.spool {
            if let Err(e) = spool.event(&event) {
                // The reservation record stays: a restart reports the call
                // at its reservation, never at less.
                tracing::error!(event = %event.event_id, error = %e, "spend event not spooled");
            }
        }
        self.pending.queued();
        if self.tx.send(event).is_err() {
            self.pending.delivered(1);
            tracing::error!("spend delivery task is gone; event lost");
        }
    }
}

async fn deliver(
    sink: Arc<dyn SpendSink>,
    mut rx: mpsc::UnboundedReceiver<pb::SpendEvent>,
    spool: Option<Arc<Spool>>,
    pending: Arc<Pending>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        // Linger without listening: events sent meanwhile queue up without
        // waking this task (from another serving thread) once per event.
        if batch.len() < MAX_BATCH && !rx.is_closed() {
            tokio::time::sleep(LINGER).await;
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(event) => batch.push(event),
                // Empty, or closed: send what there is; a closed queue ends
                // the loop on the next turn.
                Err(_) => break,
            }
        }
        if let Some(spool) = spool.clone() {
            // One fsync for the whole batch, before the control plane can
            // count it.
            match tokio::task::spawn_blocking(move || spool.sync()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "spend spool not synced"),
                Err(e) => tracing::error!(error = %e, "spend spool sync did not finish"),
            }
        }
        let n = batch.len();
        send_all(sink.as_ref(), std::mem::take(&mut batch), spool.as_deref()).await;
        pending.delivered(n);
    }
}

/// Sends events in order until each is applied or refused as invalid. A
/// batch the control plane refuses as invalid is split in halves until the
/// offending events stand alone, so one bad event costs only itself, never
/// its neighbours.
async fn send_all(sink: &dyn SpendSink, events: Vec<pb::SpendEvent>, spool: Option<&Spool>) {
    let mut pending = vec![events];
    while let Some(events) = pending.pop() {
        let result = send_until_answered(sink, &events).await;
        match result {
            Err(_) if events.len() > 1 => {
                let mut first = events;
                let second = first.split_off(first.len() / 2);
                pending.push(second);
                pending.push(first);
                continue;
            }
            Err(refused) => {
                // The control plane will never take this event; keeping it
                // would block every later one.
                tracing::error!(
                    event = %events[0].event_id,
                    key = %events[0].key_id,
                    message = refused.message(),
                    "spend event refused as invalid; dropped"
                );
            }
            Ok(()) => {}
        }
        // Applied, or never applicable: either way the disk need not keep
        // them.
        if let Some(spool) = spool {
            spool.delivered(events.iter().map(|e| e.event_id.as_str()));
        }
    }
}

/// Delivers what a previous run left in the spool, then deletes the old
/// segments. Handing back the leases those events drew on is the caller's
/// call: only a spool the previous run wrote in this boot is known to hold
/// every record (`Recovered::complete`); after a machine crash a record
/// lost before its fsync is not here, so the leases keep counting in full
/// until they expire (and the grace after that).
pub async fn replay(recovered: Recovered, sink: Arc<dyn SpendSink>, spool: Arc<Spool>) {
    if !recovered.events.is_empty() {
        tracing::info!(
            events = recovered.events.len(),
            "delivering spend a previous run left in the spool"
        );
        for chunk in recovered.events.chunks(MAX_BATCH) {
            send_all(sink.as_ref(), chunk.to_vec(), None).await;
        }
    }
    spool.forget_recovered(&recovered);
}

/// Sends one batch, retrying with capped backoff while the control plane is
/// away. Returns the refusal when it says the batch is invalid.
async fn send_until_answered(
    sink: &dyn SpendSink,
    events: &[pb::SpendEvent],
) -> Result<(), tonic::Status> {
    let mut backoff = Duration::from_millis(50);
    loop {
        match sink.report(events.to_vec()).await {
            Ok(_) => return Ok(()),
            Err(s) if s.code() == tonic::Code::InvalidArgument => return Err(s),
            Err(s) => {
                tracing::warn!(
                    code = ?s.code(),
                    message = s.message(),
                    events = events.len(),
                    "spend report failed; will retry"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use std::sync::Mutex;
    use tonic::Status;

    /// Refuses any batch holding a "bad" event, fails the first attempt of
    /// every batch as if the control plane were away, and records what it
    /// applied.
    #[derive(Default)]
    struct Sink {
        applied: Mutex<Vec<String>>,
        attempts: Mutex<std::collections::HashSet<Vec<String>>>,
        done: tokio::sync::Notify,
    }

    #[async_trait]
    impl SpendSink for Sink {
        async fn report(&self, events: Vec<pb::SpendEvent>) -> Result<(), Status> {
            let ids: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
            if self.attempts.lock().unwrap().insert(ids.clone()) {
                return Err(Status::unavailable("control plane away"));
            }
            if ids.iter().any(|id| id.starts_with("bad")) {
                return Err(Status::invalid_argument("event_id: bad"));
            }
            let mut applied = self.applied.lock().unwrap();
            applied.extend(ids);
            if applied.iter().any(|id| id == "ev9") {
                self.done.notify_one();
            }
            Ok(())
        }
    }

    fn event(id: &str) -> pb::SpendEvent {
        pb::SpendEvent {
            event_id: id.to_string(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn one_invalid_event_costs_only_itself_and_order_is_kept() {
        let sink = Arc::new(Sink::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let ids = [
            "ev0", "ev1", "bad2", "ev3", "ev4", "ev5", "bad6", "ev7", "ev8", "ev9",
        ];
        // Queued before delivery starts, so they travel as one batch.
        let pending = Arc::new(Pending::default());
        for id in ids {
            pending.queued();
            tx.send(event(id)).unwrap();
        }
        assert_eq!(pending.backlog().0, ids.len());
        let task = tokio::spawn(deliver(sink.clone(), rx, None, pending.clone()));
        tokio::time::timeout(Duration::from_secs(30), sink.done.notified())
            .await
            .expect("every valid event delivered");
        let applied = sink.applied.lock().unwrap().clone();
        let want: Vec<&str> = ids
            .iter()
            .copied()
            .filter(|id| !id.starts_with("bad"))
            .collect();
        assert_eq!(applied, want);
        assert!(
            sink.attempts
                .lock()
                .unwrap()
                .contains(&vec!["bad2".to_string()]),
            "the bad event was tried on its own before being dropped"
        );
        drop(tx);
        task.await.unwrap();
        assert_eq!(
            pending.backlog(),
            (0, Duration::ZERO),
            "delivered or dropped"
        );
    }

    /// Never answers: the control plane is away.
    struct Away;

    #[async_trait]
    impl SpendSink for Away {
        async fn report(&self, _: Vec<pb::SpendEvent>) -> Result<(), Status> {
            Err(Status::unavailable("control plane away"))
        }
    }

    #[tokio::test]
    async fn events_wait_in_the_backlog_while_the_control_plane_is_away() {
        let (reporter, _task) = SpendReporter::start(Arc::new(Away), None);
        let pending = reporter.pending();
        assert_eq!(pending.backlog(), (0, Duration::ZERO));
        for i in 0..3 {
            reporter.send(event(&format!("ev{i}")));
        }
        let (n, _) = pending.backlog();
        assert_eq!(n, 3);
        let deadline = Instant::now() + Duration::from_secs(10);
        while pending.backlog().1 == Duration::ZERO {
            assert!(Instant::now() < deadline, "the backlog's age never grew");
            tokio::task::yield_now().await;
        }
        assert_eq!(pending.backlog().0, 3, "nothing leaves while away");
    }
}
