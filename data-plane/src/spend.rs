//! Delivers spend events to the control plane in batches.
//!
//! The request path hands each event to an unbounded in-memory queue and
//! moves on; a background task sends batches and, while the control plane is
//! away, keeps retrying the same batch with capped backoff. Events carry ids
//! and the control plane applies each once, so a batch resent after a lost
//! answer is not counted twice. Order within the queue is kept.

use std::time::Duration;

use keycap_proto::pb;
use tokio::sync::mpsc;

use crate::fleet::Fleet;

const MAX_BATCH: usize = 1000;

#[derive(Clone)]
pub struct SpendReporter {
    tx: mpsc::UnboundedSender<pb::SpendEvent>,
}

impl SpendReporter {
    /// Starts the delivery task.
    pub fn start(fleet: Fleet) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(deliver(fleet, rx));
        SpendReporter { tx }
    }

    pub fn send(&self, event: pb::SpendEvent) {
        if self.tx.send(event).is_err() {
            tracing::error!("spend delivery task is gone; event lost");
        }
    }
}

async fn deliver(fleet: Fleet, mut rx: mpsc::UnboundedReceiver<pb::SpendEvent>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let req = pb::ReportSpendRequest {
            node_id: fleet.node_id.clone(),
            events: std::mem::take(&mut batch),
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut client = fleet.client();
            match client.report_spend(req.clone()).await {
                Ok(_) => break,
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    // The control plane will never take this batch; keeping it
                    // would block every later event.
                    tracing::error!(
                        message = s.message(),
                        events = req.events.len(),
                        "spend batch refused"
                    );
                    break;
                }
                Err(s) => {
                    tracing::warn!(code = ?s.code(), events = req.events.len(), "spend report failed; will retry");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
