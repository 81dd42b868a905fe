//! The export formats of the ledger: one self-contained record per entry,
//! chain fields included, so an export verifies on its own (see
//! `docs/ledger.md` and `docs/verify_ledger.py`).

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::Stream;

use crate::domain::AuditEntry;
use crate::store::{Store, StoreError};

/// Entries read (and sent as one piece) at a time: large enough to
/// amortise a round trip, small enough that an export of any length holds
/// about a megabyte.
pub const PAGE: u32 = 2_000;

/// The export of the entries at or after `since` and before `until`, in
/// `seq` order: the header, then one piece of text per page of records.
/// The next page is read only when the consumer asks for it, so memory
/// stays flat whatever the ledger's length and however slow the reader.
///
/// An export of the whole ledger that reaches its end is noted (the
/// highest seq it held), so retention knows those entries are kept outside
/// the database too. A time-bounded export holds a range of times, not of
/// seqs, and is not noted.
pub fn stream(
    store: Arc<dyn Store>,
    format: Format,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> impl Stream<Item = Result<String, StoreError>> + Send + 'static {
    let whole = since.is_none() && until.is_none();
    futures_util::stream::try_unfold(
        (Some(0i64), format.header(), 0i64),
        move |(after, header, last)| {
            let store = store.clone();
            async move {
                let finished = |last: i64| {
                    let store = store.clone();
                    async move {
                        if whole && last > 0 {
                            store.record_export(last).await?;
                        }
                        Ok::<_, StoreError>(None)
                    }
                };
                // Polled again only once the last piece was taken.
                let Some(after) = after else {
                    return finished(last).await;
                };
                let page = store.audit_chain(after, since, until, PAGE).await?;
                let last = page.last().map_or(last, |e| e.seq);
                let next = (page.len() == PAGE as usize).then_some(last);
                let mut chunk = header.unwrap_or_default();
                for e in &page {
                    chunk.push_str(&format.record(e));
                }
                if chunk.is_empty() && next.is_none() {
                    return finished(last).await;
                }
                Ok(Some((chunk, (next, None, last))))
            }
        },
    )
}

/// An export's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "jsonl" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Jsonl => "application/jsonl",
            Format::Csv => "text/csv; charset=utf-8",
        }
    }

    /// What comes before the first record.
    pub fn header(self) -> Option<String> {
        (self == Format::Csv).then(csv_header)
    }

    pub fn record(self, e: &AuditEntry) -> String {
        match self {
            Format::Jsonl => jsonl(e),
            Format::Csv => csv(e),
        }
    }
}

/// The columns of a CSV export, in order (also the JSONL field names).
pub const FIELDS: [&str; 25] = [
    "seq",
    "event_id",
    "key_id",
    "agent_run_label",
    "vendor",
    "method",
    "path",
    "upstream_status",
    "reserved_micros",
    "cost_micros",
    "outcome",
    "at",
    "at_micros",
    "node_id",
    "lease_id",
    "day",
    "detail_json",
    "trace_id",
    "context",
    "refusal_reason",
    "refused_calls",
    "credential_version",
    "would_refuse",
    "prev_hash",
    "hash",
];

fn hex32(h: Option<[u8; 32]>) -> String {
    h.map(hex::encode).unwrap_or_default()
}

/// The entry's fields as text, in `FIELDS` order; the context as a JSON
/// object, hashes as lowercase hex (empty for an unchained entry).
pub fn fields(e: &AuditEntry) -> [String; 25] {
    let ev = &e.event;
    [
        e.seq.to_string(),
        ev.event_id.clone(),
        ev.key_id.clone(),
        e.agent_run_label.clone(),
        ev.vendor.clone(),
        ev.method.clone(),
        ev.path.clone(),
        ev.upstream_status.to_string(),
        ev.reserved.0.to_string(),
        ev.cost.0.to_string(),
        ev.outcome.as_str().to_string(),
        ev.at.to_rfc3339_opts(SecondsFormat::Micros, true),
        ev.at.timestamp_micros().to_string(),
        ev.node_id.clone(),
        ev.lease_id.clone(),
        ev.day.clone(),
        ev.detail_json.clone(),
        ev.trace_id.clone(),
        serde_json::to_string(&ev.context).unwrap_or_else(|_| "{}".into()),
        ev.refusal_reason.clone(),
        ev.refused_calls.to_string(),
        ev.credential_version.to_string(),
        ev.would_refuse.clone(),
        hex32(e.prev_hash),
        hex32(e.hash),
    ]
}

/// A JSON Lines record: the entry's fields, borrowed, in `FIELDS` order.
#[derive(serde::Serialize)]
struct JsonRecord<'a> {
    seq: i64,
    event_id: &'a str,
    key_id: &'a str,
    agent_run_label: &'a str,
    vendor: &'a str,
    method: &'a str,
    path: &'a str,
    upstream_status: i32,
    reserved_micros: i64,
    cost_micros: i64,
    outcome: &'static str,
    at: String,
    at_micros: i64,
    node_id: &'a str,
    lease_id: &'a str,
    day: &'a str,
    detail_json: &'a str,
    trace_id: &'a str,
    context: &'a std::collections::BTreeMap<String, String>,
    refusal_reason: &'a str,
    refused_calls: i64,
    credential_version: i64,
    would_refuse: &'a str,
    prev_hash: String,
    hash: String,
}

/// One JSON Lines record (with its newline), written straight from the
/// entry (an export writes millions).
pub fn jsonl(e: &AuditEntry) -> String {
    let ev = &e.event;
    let record = JsonRecord {
        seq: e.seq,
        event_id: &ev.event_id,
        key_id: &ev.key_id,
        agent_run_label: &e.agent_run_label,
        vendor: &ev.vendor,
        method: &ev.method,
        path: &ev.path,
        upstream_status: ev.upstream_status,
        reserved_micros: ev.reserved.0,
        cost_micros: ev.cost.0,
        outcome: ev.outcome.as_str(),
        at: ev.at.to_rfc3339_opts(SecondsFormat::Micros, true),
        at_micros: ev.at.timestamp_micros(),
        node_id: &ev.node_id,
        lease_id: &ev.lease_id,
        day: &ev.day,
        detail_json: &ev.detail_json,
        trace_id: &ev.trace_id,
        context: &ev.context,
        refusal_reason: &ev.refusal_reason,
        refused_calls: ev.refused_calls,
        credential_version: ev.credential_version,
        would_refuse: &ev.would_refuse,
        prev_hash: hex32(e.prev_hash),
        hash: hex32(e.hash),
    };
    // Strings and integers only: serializing cannot fail.
    let mut line = serde_json::to_string(&record).unwrap_or_default();
    line.push('\n');
    line
}

/// One CSV record (RFC 4180 quoting, with its CRLF).
pub fn csv(e: &AuditEntry) -> String {
    csv_record(fields(e).iter().map(String::as_str))
}

/// The CSV header record.
pub fn csv_header() -> String {
    csv_record(FIELDS.iter().copied())
}

fn csv_record<'a>(values: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (i, v) in values.enumerate() {
        if i > 0 {
            out.push(',');
        }
        if v.contains([',', '"', '\r', '\n']) {
            out.push('"');
            out.push_str(&v.replace('"', "\"\""));
            out.push('"');
        } else {
            out.push_str(v);
        }
    }
    out.push_str("\r\n");
    out
}
