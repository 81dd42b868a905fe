//! When old ledger entries may go: only once a signed checkpoint and an
//! export both cover them, so the chain stays checkable from what is kept
//! (the last dropped entry's hash, held in the store) up to a signed head,
//! and every dropped entry is in an export an auditor can verify on its
//! own. This module decides the bound; the store drops whole partitions
//! (PostgreSQL) below it and never anything else.

use super::Checkpoint;

/// What was exported and what was dropped (one row in the store).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Every entry with `seq` up to this was in a completed export of the
    /// whole ledger (0: none).
    pub exported_through: i64,
    /// Entries up to this `seq` were dropped (0: none).
    pub dropped_through: i64,
    /// The hash of entry `dropped_through`: the `prev_hash` the first
    /// entry kept must carry (zeros when nothing was dropped, or when the
    /// last entry dropped was written before the ledger was chained).
    pub dropped_hash: [u8; 32],
}

impl Retention {
    /// The highest `seq` that may be dropped: covered by the newest
    /// checkpoint whose signature holds and by an export. 0 when either is
    /// missing.
    pub fn droppable_through(&self, checkpoints: &[Checkpoint]) -> i64 {
        let signed = checkpoints
            .iter()
            .filter(|cp| cp.signature_holds())
            .map(|cp| cp.seq)
            .max()
            .unwrap_or(0);
        signed.min(self.exported_through)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_a_signed_checkpoint_and_an_export_must_cover() {
        let key = super::super::checkpoint::new_signing_key();
        let cp = |seq| Checkpoint::sign(&key, seq, [1; 32], chrono::Utc::now());
        let r = |exported_through| Retention {
            exported_through,
            dropped_through: 0,
            dropped_hash: [0; 32],
        };
        assert_eq!(r(100).droppable_through(&[]), 0, "no checkpoint");
        assert_eq!(r(0).droppable_through(&[cp(50)]), 0, "no export");
        assert_eq!(r(100).droppable_through(&[cp(50), cp(70)]), 70);
        assert_eq!(r(60).droppable_through(&[cp(70)]), 60);
        let mut forged = cp(90);
        forged.signature[0] ^= 1;
        assert_eq!(r(100).droppable_through(&[cp(70), forged]), 70);
    }
}
