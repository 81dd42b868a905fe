//! Signed checkpoints: the ledger head (seq, hash) at a time, signed with
//! Ed25519. Anyone holding one can tell that the chain still reaches it, so
//! removing or rewriting the last entries — which the chain alone cannot
//! show — is caught.
//!
//! Signed bytes (version 1): the ASCII tag `keycap-ledger-checkpoint-v1`,
//! the seq as 8 bytes big-endian, the 32-byte hash, the time as
//! microseconds since the Unix epoch, 8 bytes big-endian.

use chrono::{DateTime, Utc};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

const TAG: &[u8] = b"keycap-ledger-checkpoint-v1";

/// One signed checkpoint, with the public key that verifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: i64,
    pub hash: [u8; 32],
    pub at: DateTime<Utc>,
    pub public_key: [u8; 32],
    pub signature: [u8; 64],
}

/// The bytes a checkpoint's signature covers.
pub fn signed_bytes(seq: i64, hash: &[u8; 32], at: DateTime<Utc>) -> Vec<u8> {
    let mut out = Vec::with_capacity(TAG.len() + 48);
    out.extend_from_slice(TAG);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(hash);
    out.extend_from_slice(&at.timestamp_micros().to_be_bytes());
    out
}

impl Checkpoint {
    /// Signs the head `(seq, hash)` at `at` (kept to whole microseconds).
    pub fn sign(key: &SigningKey, seq: i64, hash: [u8; 32], at: DateTime<Utc>) -> Checkpoint {
        let at = DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at);
        let signature = key.sign(&signed_bytes(seq, &hash, at));
        Checkpoint {
            seq,
            hash,
            at,
            public_key: key.verifying_key().to_bytes(),
            signature: signature.to_bytes(),
        }
    }

    /// Whether the signature is the public key's over this checkpoint.
    pub fn signature_holds(&self) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.public_key) else {
            return false;
        };
        key.verify(
            &signed_bytes(self.seq, &self.hash, self.at),
            &Signature::from_bytes(&self.signature),
        )
        .is_ok()
    }
}

/// A fresh signing key from the operating system's randomness.
pub fn new_signing_key() -> SigningKey {
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut secret);
    SigningKey::from_bytes(&secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_and_any_change_breaks_it() {
        let key = new_signing_key();
        let cp = Checkpoint::sign(&key, 42, [7; 32], Utc::now());
        assert!(cp.signature_holds());
        let mut other = cp.clone();
        other.seq = 41;
        assert!(!other.signature_holds());
        let mut other = cp.clone();
        other.hash[0] ^= 1;
        assert!(!other.signature_holds());
        let mut other = cp.clone();
        other.public_key = new_signing_key().verifying_key().to_bytes();
        assert!(!other.signature_holds());
    }
}
