//! The audit ledger's rules: how an entry is encoded and chained, in what
//! order a replica's appends commit (`pipeline`), how a chain is checked
//! (`verify`, also against signed or kept checkpoints, `checkpoint`), what
//! an export holds (`export`) and when old entries may go (`retention`).
//! The store keeps the rows and appends them inside the transaction that
//! applies their spend; this module decides what each row's hash is and
//! what counts as a break. It writes no SQL of its own (verify and export
//! read through the `Store` trait) and never changes a row.
//!
//! Every entry has a sequence number (`seq`, increasing, decided under the
//! ledger head's lock, so replicas appending at once still form one chain)
//! and `hash = SHA-256(prev_hash ‖ canonical bytes of the entry)`, where
//! `prev_hash` is the hash of the entry before it (32 zero bytes for the
//! first). The encoding is written down in `docs/ledger.md` so that anyone
//! holding an export can check it without keycap.

pub mod chain;
pub mod checkpoint;
pub mod export;
pub mod observe;
pub mod pipeline;
pub mod retention;
pub mod verify;

/// How far ahead of the ledger's clock a spend event may be dated and still
/// be appended. Every report of one event carries the same time (a call's,
/// or a refusal window's minute), so an event stored was logged at or after
/// its own time less this; the dedupe lookup reads the ledger only from the
/// batch's oldest event time less this (on PostgreSQL: that day's partition
/// and later), and costs the same whatever the retention. An event dated
/// further ahead, from a proxy whose clock runs fast, is answered
/// `failed_precondition` and delivered once the clocks agree: it waits in
/// the proxy's spool, never lost and never counted twice.
use crate::domain::SpendEvent;

pub const MAX_AHEAD: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// The first event of `events` dated more than `MAX_AHEAD` after `clock`
/// (micros since the epoch, the ledger's clock), if any.
pub fn dated_ahead(events: &[SpendEvent], clock: i64) -> Option<&SpendEvent> {
    let limit = clock.saturating_add(MAX_AHEAD.num_microseconds().unwrap_or(i64::MAX));
    events.iter().find(|e| e.at.timestamp_micros() > limit)
}

/// When the entries the dedupe lookup of `events` must see were logged
/// (micros, the ledger's clock, which reads `clock` now): from the oldest
/// event's time less `MAX_AHEAD` to now (plus `MAX_AHEAD`, should the
/// clock have stepped back).
pub fn dedupe_window(events: &[SpendEvent], clock: i64) -> std::ops::RangeInclusive<i64> {
    let ahead = MAX_AHEAD.num_microseconds().unwrap_or(i64::MAX);
    let oldest = events
        .iter()
        .map(|e| e.at.timestamp_micros())
        .min()
        .unwrap_or(i64::MIN);
    oldest.saturating_sub(ahead)..=clock.saturating_add(ahead)
}

pub use chain::{canonical_bytes, link, ChainBreak, ChainCheck, GENESIS};
pub use checkpoint::Checkpoint;
pub use retention::Retention;
pub use verify::{verify, verify_to_checkpoint, BrokenEntry, KnownPoint, Verification};
