//! The audit ledger's rules: how an entry is encoded and chained, and how a
//! chain is checked. The store keeps the rows and appends them inside the
//! transaction that applies their spend; this module decides what each
//! row's hash is and what counts as a break. It never talks to a database
//! itself and never changes a row.
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
pub mod retention;
pub mod verify;

pub use chain::{canonical_bytes, link, ChainBreak, ChainCheck, GENESIS};
pub use checkpoint::Checkpoint;
pub use retention::Retention;
pub use verify::{verify, verify_to_checkpoint, BrokenEntry, KnownPoint, Verification};
