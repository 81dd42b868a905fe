//! A run's audit entries as they arrive: `GET /ui/runs/{label}/events`, a
//! server-sent event stream for the Run page's script (`assets/live.js`).
//!
//! Fed from the store by sequence number, not from this replica's memory,
//! so an entry written through any replica appears. Each stream polls the
//! ledger for entries above the last one it sent, re-checks its session
//! now and then (a revoked token ends the stream), and the number of open
//! streams per replica is bounded. It never writes anything and shows only
//! what the session's token may read through `GET /vault/audit`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

use super::{html, page_session, pages, session, Ctl, TlsOn};
use crate::domain::{AuditEntry, AuditQuery};
use crate::scope::{Operation, VendorScope};
use crate::service::Control;

/// Open live streams per replica; more are answered 503 (the page still
/// shows its entries, and the browser retries).
pub const MAX_STREAMS: usize = 64;
/// How often a stream looks for new entries.
const POLL: Duration = Duration::from_secs(1);
/// A stream re-authenticates its session every this many polls.
const RECHECK_EVERY: u32 = 10;
/// Entries read per page while catching up; a stream behind by more than
/// `PAGE * MAX_PAGES` entries skips to the newest ones.
const PAGE: u32 = 200;
const MAX_PAGES: u32 = 5;

static STREAMS: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(MAX_STREAMS)));

/// One row's cells, as the Run page's table shows them (the page and the
/// stream render entries alike).
pub fn cells(e: &AuditEntry) -> [String; 8] {
    let ev = &e.event;
    let outcome = if ev.refused_calls > 0 {
        format!("refused: {} × {}", ev.refusal_reason, ev.refused_calls)
    } else {
        ev.outcome.as_str().to_string()
    };
    let call = if ev.method.is_empty() {
        ev.vendor.clone()
    } else {
        format!("{} {} {}", ev.vendor, ev.method, ev.path)
    };
    [
        e.seq.to_string(),
        ev.at.format("%Y-%m-%d %H:%M:%S").to_string(),
        ev.key_id.clone(),
        call,
        ev.upstream_status.to_string(),
        format!("${}", ev.cost),
        outcome,
        ev.node_id.clone(),
    ]
}

pub(super) async fn events(
    State(c): Ctl,
    tls: TlsOn,
    headers: HeaderMap,
    Path(label): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let s = match page_session(&c, &headers, tls, Operation::QueryAudit).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let Ok(permit) = STREAMS.clone().try_acquire_owned() else {
        return html(
            StatusCode::SERVICE_UNAVAILABLE,
            pages::message(Some(&s), "Busy", "Too many live streams; reload later."),
        );
    };
    // Where to start: the browser's Last-Event-ID on a reconnect, else the
    // newest entry the page showed, else now.
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let after = match last_id.or_else(|| q.get("after").and_then(|a| a.parse().ok())) {
        Some(seq) => seq,
        None => match newest(&c, &s.principal.vendors, &label, None).await {
            Ok(entries) => entries.first().map_or(0, |e| e.seq),
            Err(e) => return super::api_error(&s, e),
        },
    };
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(64);
    let vendors = s.principal.vendors;
    tokio::spawn(async move {
        let _permit = permit;
        follow(c, headers, vendors, label, after, tx).await;
    });
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

/// The run's newest entries (newest first), below `before` if given.
async fn newest(
    c: &Control,
    vendors: &VendorScope,
    label: &str,
    before: Option<i64>,
) -> Result<Vec<AuditEntry>, crate::error::ApiError> {
    let q = AuditQuery {
        agent_run_label: Some(label.to_string()),
        before_seq: before,
        limit: PAGE,
        ..AuditQuery::default()
    };
    c.query_audit(vendors, &q).await
}

/// Sends the run's entries above `after` until the browser goes away or
/// the session ends. `vendors` is the scope of the session the request was
/// served under; a session ended since is found at the next re-check and
/// told with an `end` event, so the browser stops instead of reconnecting.
async fn follow(
    c: Arc<Control>,
    headers: HeaderMap,
    mut vendors: VendorScope,
    label: String,
    mut after: i64,
    tx: mpsc::Sender<Result<Event, Infallible>>,
) {
    let mut polls = 0u32;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = tx.closed() => return,
        }
        polls += 1;
        if polls.is_multiple_of(RECHECK_EVERY) {
            match session::current(&c, &headers).await {
                Some(s) if s.principal.require(Operation::QueryAudit).is_ok() => {
                    vendors = s.principal.vendors;
                }
                _ => {
                    let _ = tx
                        .send(Ok(Event::default().event("end").data("session ended")))
                        .await;
                    return;
                }
            }
        }
        let mut fresh: Vec<AuditEntry> = Vec::new();
        let mut before = None;
        for _ in 0..MAX_PAGES {
            let page = match newest(&c, &vendors, &label, before).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "live audit stream cannot read the ledger");
                    break;
                }
            };
            let full = page.len() == PAGE as usize;
            let mut reached = false;
            for e in page {
                if e.seq <= after {
                    reached = true;
                    break;
                }
                before = Some(e.seq);
                fresh.push(e);
            }
            if reached || !full {
                break;
            }
        }
        fresh.sort_by_key(|e| e.seq);
        for e in fresh {
            let data = serde_json::json!({"seq": e.seq, "cells": cells(&e)});
            let event = Event::default()
                .event("audit")
                .id(e.seq.to_string())
                .data(data.to_string());
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
            after = after.max(e.seq);
        }
    }
}
