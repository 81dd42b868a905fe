//! Verifying the ledger in the database: the chain recomputed a page at a
//! time (constant memory), then its end held against the ledger head and
//! the latest checkpoint, so removed or rewritten last entries are caught
//! too.

use super::chain::{ChainBreak, ChainCheck, GENESIS};
use crate::store::{Store, StoreResult};

/// Entries read per page: large enough to amortise a round trip, small
/// enough to keep memory flat.
const PAGE: u32 = 5_000;

/// The first entry where the chain breaks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokenEntry {
    /// The entry named: the first one that fails, or, for a truncation,
    /// the first one missing.
    pub seq: i64,
    pub reason: ChainBreak,
}

/// What a verification found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    /// Chained entries whose hash was recomputed and matched.
    pub checked: u64,
    /// Entries written before the ledger was chained (counted, not checked).
    pub legacy: u64,
    /// The last entry checked: its seq and hash.
    pub head: Option<(i64, [u8; 32])>,
    /// `None` when the chain holds.
    pub broken: Option<BrokenEntry>,
    /// The seq of the checkpoint the end was held against, if any.
    pub checkpoint_seq: Option<i64>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.broken.is_none()
    }
}

/// A point of the chain known from elsewhere (a signed checkpoint, or one
/// an auditor kept): the entry `seq` must still exist with this hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownPoint {
    pub seq: i64,
    pub hash: [u8; 32],
}

impl std::str::FromStr for KnownPoint {
    type Err = String;

    /// `SEQ:HASH`: a seq of at least 1 and the entry's hash as 64 hex
    /// digits, as a listed checkpoint gives them.
    fn from_str(s: &str) -> Result<KnownPoint, String> {
        let shape = || format!("{s:?} is not SEQ:HASH (a seq, a colon, 64 hex digits)");
        let (seq, hash) = s.split_once(':').ok_or_else(shape)?;
        let seq: i64 = seq.parse().ok().filter(|seq| *seq >= 1).ok_or_else(shape)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(hash, &mut out).map_err(|_| shape())?;
        Ok(KnownPoint { seq, hash: out })
    }
}

/// Recomputes the chain from `from` (the first entry when `None`; from a
/// later entry, its stored `prev_hash` is trusted; never before the first
/// entry retention kept, which must follow the hash recorded for the last
/// one dropped) to the end, and holds the end against the ledger head and
/// every point of `known`; `checkpoint_seq` reports the first of them.
pub async fn verify(
    store: &dyn Store,
    from: Option<i64>,
    known: &[KnownPoint],
) -> StoreResult<Verification> {
    // Entries dropped by retention are gone for good: the check starts
    // after the last of them, from the hash kept for it, whatever `from`
    // says below that.
    let retention = store.ledger_retention().await?;
    let dropped = retention.dropped_through;
    let (mut after, mut check) = match from {
        Some(f) if f > dropped.saturating_add(1) => (f - 1, None),
        _ if dropped > 0 && retention.dropped_hash != GENESIS => (
            dropped,
            Some(ChainCheck::after(dropped, retention.dropped_hash)),
        ),
        _ if dropped > 0 => (dropped, Some(ChainCheck::new())),
        Some(f) => (f.saturating_sub(1), None),
        None => (0, Some(ChainCheck::new())),
    };
    let out = Verification {
        checkpoint_seq: known.first().map(|c| c.seq),
        ..Verification::default()
    };
    let mut seen = vec![false; known.len()];
    loop {
        let page = store.audit_chain(after, None, None, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for e in &page {
            let c = check.get_or_insert_with(|| match e.prev_hash {
                Some(prev) => ChainCheck::after(e.seq - 1, prev),
                None => ChainCheck::new(),
            });
            if let Err(reason) = c.push(
                e.seq,
                &e.agent_run_label,
                &e.event,
                e.prev_hash.as_ref().map(|h| &h[..]),
                e.hash.as_ref().map(|h| &h[..]),
            ) {
                return Ok(finish(out, c, Some(BrokenEntry { seq: e.seq, reason })));
            }
            for (point, seen) in known.iter().zip(&mut seen) {
                if e.seq == point.seq {
                    *seen = true;
                    if e.hash != Some(point.hash) {
                        let broken = BrokenEntry {
                            seq: e.seq,
                            reason: ChainBreak::Truncated,
                        };
                        return Ok(finish(out, c, Some(broken)));
                    }
                }
            }
        }
        if page.len() < PAGE as usize {
            break;
        }
    }
    let check = check.unwrap_or_default();
    // The end: the database's head must be the last entry checked, and a
    // checkpoint's entry must not lie beyond it. The first entry missing
    // (or the last one, when it was rewritten) is the one named.
    let (head_seq, head_hash) = store.ledger_head().await?;
    let missing = match check.head() {
        Some(h) if h == (head_seq, head_hash) => None,
        Some((seq, _)) if head_seq > seq => Some(seq + 1),
        Some((seq, _)) => Some(seq),
        None if head_seq > after => Some(after + 1),
        None => None,
    };
    let end = check.head().map_or(after, |(seq, _)| seq);
    let missing = missing.or_else(|| {
        known
            .iter()
            .zip(&seen)
            .any(|(point, seen)| !seen && point.seq > end)
            .then_some(end + 1)
    });
    if let Some(seq) = missing {
        let broken = BrokenEntry {
            seq,
            reason: ChainBreak::Truncated,
        };
        return Ok(finish(out, &check, Some(broken)));
    }
    Ok(finish(out, &check, None))
}

fn finish(mut out: Verification, check: &ChainCheck, broken: Option<BrokenEntry>) -> Verification {
    out.checked = check.checked();
    out.legacy = check.legacy();
    out.head = check.head();
    out.broken = broken;
    out
}

/// `verify` held against the latest stored checkpoint signed by one of the
/// `trusted` public keys with a signature that holds (any other stored
/// checkpoint is not used: whoever can write the database can store one
/// signed with a key of their own), and against `held`, a point the
/// caller knows from elsewhere (a checkpoint copied out earlier).
pub async fn verify_to_checkpoint(
    store: &dyn Store,
    from: Option<i64>,
    trusted: &[[u8; 32]],
    held: Option<KnownPoint>,
) -> StoreResult<Verification> {
    let latest = store
        .checkpoints(Some(trusted), 16)
        .await?
        .into_iter()
        .find(|cp| cp.signature_holds())
        .map(|cp| KnownPoint {
            seq: cp.seq,
            hash: cp.hash,
        });
    let known: Vec<KnownPoint> = latest.into_iter().chain(held).collect();
    verify(store, from, &known).await
}

#[cfg(test)]
mod tests {
    use super::KnownPoint;

    #[test]
    fn a_kept_checkpoint_reads_as_seq_colon_hash() {
        let hash = "0a".repeat(32);
        let point: KnownPoint = format!("42:{hash}").parse().unwrap();
        assert_eq!(
            point,
            KnownPoint {
                seq: 42,
                hash: [10; 32]
            }
        );
        let upper: KnownPoint = format!("42:{}", hash.to_uppercase()).parse().unwrap();
        assert_eq!(upper, point);
        for bad in [
            format!("0:{hash}"),
            format!("-1:{hash}"),
            format!("x:{hash}"),
            format!("42 :{hash}"),
            format!("42:{}", &hash[2..]),
            format!("42:{hash}00"),
            format!("42:{}zz", &hash[2..]),
            hash.clone(),
            String::new(),
        ] {
            let err = bad.parse::<KnownPoint>().unwrap_err();
            assert!(err.contains("SEQ:HASH"), "{bad:?}: {err}");
        }
    }
}
