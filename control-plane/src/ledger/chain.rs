//! Canonical encoding of a ledger entry and the hash chain over entries.
//!
//! The encoding (version 1, see `docs/ledger.md`): the sequence number as
//! 8 bytes big-endian, then each field in a fixed order, a string as its
//! UTF-8 length (4 bytes big-endian) followed by its bytes, an integer as 8
//! bytes big-endian two's complement, and the context as its entry count (4
//! bytes) followed by each key and value as strings, keys in byte order.
//! Nothing is optional and nothing depends on a serializer's choices. A
//! refusal entry (outcome `refused`) then has its reason (string) and the
//! number of calls it stands for (integer); other entries end at the
//! context, so their bytes are what they were before refusals were kept.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::domain::{Outcome, SpendEvent};

/// The `prev_hash` of the first entry.
pub const GENESIS: [u8; 32] = [0; 32];

fn put_str(out: &mut Vec<u8>, s: &str) {
    // A field is far below 4 GiB (requests bound every one of them).
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_int(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_context(out: &mut Vec<u8>, context: &BTreeMap<String, String>) {
    let n = u32::try_from(context.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    // BTreeMap<String, _> iterates in byte order of the keys.
    for (k, v) in context {
        put_str(out, k);
        put_str(out, v);
    }
}

/// The bytes an entry's hash covers (besides the previous hash).
pub fn canonical_bytes(seq: i64, agent_run_label: &str, e: &SpendEvent) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + e.path.len() + e.detail_json.len());
    put_int(&mut out, seq);
    put_str(&mut out, &e.event_id);
    put_str(&mut out, &e.key_id);
    put_str(&mut out, agent_run_label);
    put_str(&mut out, &e.vendor);
    put_str(&mut out, &e.method);
    put_str(&mut out, &e.path);
    put_int(&mut out, i64::from(e.upstream_status));
    put_int(&mut out, e.reserved.0);
    put_int(&mut out, e.cost.0);
    put_str(&mut out, e.outcome.as_str());
    put_int(&mut out, e.at.timestamp_micros());
    put_str(&mut out, &e.node_id);
    put_str(&mut out, &e.lease_id);
    put_str(&mut out, &e.day);
    put_str(&mut out, &e.detail_json);
    put_str(&mut out, &e.trace_id);
    put_context(&mut out, &e.context);
    if e.outcome == Outcome::Refused {
        put_str(&mut out, &e.refusal_reason);
        put_int(&mut out, e.refused_calls);
    }
    // Only when known, so entries written before versions keep their
    // bytes (and hashes); a refusal never has one.
    // A call observe mode marked carries the version field too (0 when
    // none), then the code: the field count stays readable from the
    // length, and unmarked entries keep their bytes.
    if e.credential_version != 0 || !e.would_refuse.is_empty() {
        put_int(&mut out, e.credential_version);
    }
    if !e.would_refuse.is_empty() {
        put_str(&mut out, &e.would_refuse);
    }
    out
}

/// The hash of the entry that follows the one hashed `prev`.
pub fn link(prev: &[u8; 32], seq: i64, agent_run_label: &str, e: &SpendEvent) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(canonical_bytes(seq, agent_run_label, e));
    h.finalize().into()
}

/// Why the chain is broken at an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainBreak {
    /// The entry's stored `prev_hash` is not the hash of the entry before
    /// it: an entry between them was removed, or the one before was
    /// rewritten together with its hash.
    PrevMismatch,
    /// The entry's content does not hash to its stored hash: it was edited.
    HashMismatch,
    /// A chained ledger has an entry without a hash after its start.
    Unchained,
    /// The chain ends before (or differs from) a signed checkpoint:
    /// entries at its end were removed or rewritten.
    Truncated,
}

impl ChainBreak {
    pub fn as_str(&self) -> &'static str {
        match self {
            ChainBreak::PrevMismatch => "prev_hash_mismatch",
            ChainBreak::HashMismatch => "hash_mismatch",
            ChainBreak::Unchained => "unchained_entry",
            ChainBreak::Truncated => "truncated",
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            ChainBreak::PrevMismatch => {
                "its prev_hash is not the hash of the entry before it: an entry was removed \
                 or the one before was rewritten"
            }
            ChainBreak::HashMismatch => "its content does not match its hash: it was edited",
            ChainBreak::Unchained => "it has no hash although the chain started before it",
            ChainBreak::Truncated => {
                "the chain does not reach the signed checkpoint: entries at its end were \
                 removed or rewritten"
            }
        }
    }
}

/// Checks a chain one entry at a time, in `seq` order, holding only the
/// last hash: constant memory whatever the ledger's length. Entries written
/// before the ledger was chained (no hash) are counted, not checked, as
/// long as they all come before the first chained entry.
#[derive(Clone, Debug)]
pub struct ChainCheck {
    prev: Option<[u8; 32]>,
    last_seq: Option<i64>,
    checked: u64,
    legacy: u64,
}

impl ChainCheck {
    /// A check from the start of the ledger.
    pub fn new() -> Self {
        ChainCheck {
            prev: None,
            last_seq: None,
            checked: 0,
            legacy: 0,
        }
    }

    /// A check that starts after an entry already trusted: `prev` is that
    /// entry's hash.
    pub fn after(seq: i64, prev: [u8; 32]) -> Self {
        ChainCheck {
            prev: Some(prev),
            last_seq: Some(seq),
            checked: 0,
            legacy: 0,
        }
    }

    /// Feeds the next entry; `Err` names why the chain breaks at it.
    pub fn push(
        &mut self,
        seq: i64,
        agent_run_label: &str,
        event: &SpendEvent,
        prev_hash: Option<&[u8]>,
        hash: Option<&[u8]>,
    ) -> Result<(), ChainBreak> {
        let (Some(prev_hash), Some(hash)) = (prev_hash, hash) else {
            if self.prev.is_some() {
                return Err(ChainBreak::Unchained);
            }
            self.legacy += 1;
            self.last_seq = Some(seq);
            return Ok(());
        };
        let expected_prev = self.prev.unwrap_or(GENESIS);
        if prev_hash != expected_prev {
            return Err(ChainBreak::PrevMismatch);
        }
        let computed = link(&expected_prev, seq, agent_run_label, event);
        if hash != computed {
            return Err(ChainBreak::HashMismatch);
        }
        self.prev = Some(computed);
        self.last_seq = Some(seq);
        self.checked += 1;
        Ok(())
    }

    /// Hash of the last chained entry fed (`None` before the first).
    pub fn head(&self) -> Option<(i64, [u8; 32])> {
        Some((self.last_seq?, self.prev?))
    }

    pub fn checked(&self) -> u64 {
        self.checked
    }

    pub fn legacy(&self) -> u64 {
        self.legacy
    }
}

impl Default for ChainCheck {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use keycap_proto::Micros;

    fn event(id: &str, cost: i64) -> SpendEvent {
        SpendEvent {
            event_id: id.into(),
            lease_id: "l1".into(),
            key_id: "k1".into(),
            day: "2026-01-02".into(),
            vendor: "openai".into(),
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            upstream_status: 200,
            reserved: Micros(500),
            cost: Micros(cost),
            outcome: Outcome::Settled,
            at: chrono::Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            node_id: "n1".into(),
            detail_json: "{}".into(),
            trace_id: String::new(),
            context: BTreeMap::from([("b".into(), "2".into()), ("a".into(), "1".into())]),
            refusal_reason: String::new(),
            refused_calls: 0,
            credential_version: 0,
            would_refuse: String::new(),
        }
    }

    fn refusal(calls: i64) -> SpendEvent {
        SpendEvent {
            outcome: Outcome::Refused,
            refusal_reason: "daily_cap_exceeded".into(),
            refused_calls: calls,
            reserved: Micros(0),
            cost: Micros(0),
            ..event("r1", 0)
        }
    }

    #[test]
    fn a_spend_entry_encodes_as_before_refusals_were_kept() {
        // The reason and count are encoded for refusals only, so every
        // hash written before them still holds.
        let mut e = event("e1", 100);
        let before = canonical_bytes(1, "run", &e);
        e.refusal_reason = "ignored".into();
        e.refused_calls = 9;
        assert_eq!(canonical_bytes(1, "run", &e), before);
    }

    #[test]
    fn a_refusal_hashes_its_reason_and_count() {
        let r = refusal(500);
        let h = link(&GENESIS, 1, "run", &r);
        let mut other = r.clone();
        other.refused_calls = 499;
        assert_ne!(link(&GENESIS, 1, "run", &other), h);
        let mut other = r.clone();
        other.refusal_reason = "rate_limited".into();
        assert_ne!(link(&GENESIS, 1, "run", &other), h);
        let tail = [
            &[0, 0, 0, 18][..],
            b"daily_cap_exceeded",
            &500i64.to_be_bytes(),
        ]
        .concat();
        assert!(canonical_bytes(1, "run", &r).ends_with(&tail));
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = event("e1", 100);
        let h = link(&GENESIS, 1, "run", &base);
        let mut variants = vec![
            link(&GENESIS, 2, "run", &base),
            link(&GENESIS, 1, "run2", &base),
            link(&[1; 32], 1, "run", &base),
        ];
        let edits: Vec<fn(&mut SpendEvent)> = vec![
            |e| e.event_id.push('x'),
            |e| e.key_id.push('x'),
            |e| e.vendor.push('x'),
            |e| e.method.push('x'),
            |e| e.path.push('x'),
            |e| e.upstream_status += 1,
            |e| e.reserved.0 += 1,
            |e| e.cost.0 += 1,
            |e| e.outcome = Outcome::Released,
            |e| e.at += chrono::TimeDelta::microseconds(1),
            |e| e.node_id.push('x'),
            |e| e.lease_id.push('x'),
            |e| e.day.push('x'),
            |e| e.detail_json.push(' '),
            |e| e.trace_id.push('0'),
            |e| {
                e.context.insert("c".into(), String::new());
            },
            |e| e.credential_version = 2,
            |e| e.would_refuse = "daily_cap_exceeded".into(),
        ];
        for edit in edits {
            let mut e = base.clone();
            edit(&mut e);
            variants.push(link(&GENESIS, 1, "run", &e));
        }
        for v in &variants {
            assert_ne!(*v, h);
        }
    }

    #[test]
    fn an_observed_call_keeps_the_version_field_so_the_tail_reads_one_way() {
        // Unmarked entries encode as before observe mode existed.
        let plain = event("e1", 100);
        let mut marked = plain.clone();
        marked.would_refuse = "rate_limited".into();
        let base = canonical_bytes(1, "run", &plain);
        let tail = [&0i64.to_be_bytes()[..], &[0, 0, 0, 12], b"rate_limited"].concat();
        assert_eq!(canonical_bytes(1, "run", &marked), [base, tail].concat());
        // A version whose bytes spell a length and a code is no marked
        // entry: the two tails differ in length.
        let mut versioned = plain.clone();
        versioned.credential_version = i64::from_be_bytes(*b"\0\0\0\x04abcd");
        let mut coded = plain;
        coded.would_refuse = "abcd".into();
        assert_ne!(
            canonical_bytes(1, "run", &versioned),
            canonical_bytes(1, "run", &coded)
        );
    }

    #[test]
    fn field_boundaries_are_unambiguous() {
        // "ab" + "c" and "a" + "bc" must not encode alike.
        let mut one = event("e1", 1);
        one.method = "ab".into();
        one.path = "c".into();
        let mut two = one.clone();
        two.method = "a".into();
        two.path = "bc".into();
        assert_ne!(canonical_bytes(1, "", &one), canonical_bytes(1, "", &two));
    }

    #[test]
    fn check_names_the_break() {
        let a = event("e1", 1);
        let b = event("e2", 2);
        let ha = link(&GENESIS, 1, "", &a);
        let hb = link(&ha, 2, "", &b);
        let mut ok = ChainCheck::new();
        ok.push(1, "", &a, Some(&GENESIS), Some(&ha)).unwrap();
        ok.push(2, "", &b, Some(&ha), Some(&hb)).unwrap();
        assert_eq!(ok.head(), Some((2, hb)));
        assert_eq!(ok.checked(), 2);

        let mut edited = b.clone();
        edited.cost = Micros(3);
        let mut c = ChainCheck::new();
        c.push(1, "", &a, Some(&GENESIS), Some(&ha)).unwrap();
        assert_eq!(
            c.push(2, "", &edited, Some(&ha), Some(&hb)),
            Err(ChainBreak::HashMismatch)
        );

        // The first entry missing: the second's prev is not genesis.
        let mut c = ChainCheck::new();
        assert_eq!(
            c.push(2, "", &b, Some(&ha), Some(&hb)),
            Err(ChainBreak::PrevMismatch)
        );

        // Legacy rows first are counted; after the start they break it.
        let mut c = ChainCheck::new();
        c.push(0, "", &a, None, None).unwrap();
        c.push(1, "", &a, Some(&GENESIS), Some(&ha)).unwrap();
        assert_eq!(c.legacy(), 1);
        assert_eq!(c.push(2, "", &b, None, None), Err(ChainBreak::Unchained));
    }
}
