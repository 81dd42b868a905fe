//! Envelope encryption of vendor credentials.
//!
//! Each credential gets its own random 256-bit data key; the credential is
//! sealed with AES-256-GCM under the data key and the data key is sealed
//! under the key-encryption key (KEK). The record id (the vendor name) is
//! bound as associated data to both layers, so a sealed blob moved to another
//! record, or with any bit flipped, fails to open. The KEK comes from
//! `KEYCAP_MASTER_KEY` or a key file; it is never stored next to the data.
//! Plaintext exists only in memory, in the values this module returns.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use rand::RngCore;

const MAGIC: &[u8; 4] = b"kcv1";
const NONCE_LEN: usize = 12;
const WRAPPED_DEK_LEN: usize = 32 + 16;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("master key must be 32 bytes, given as 64 hex characters or base64")]
    BadMasterKey,
    #[error("cannot read master key file {0}: {1}")]
    KeyFile(String, std::io::Error),
    /// Deliberately says nothing about why: wrong key, tampering and a blob
    /// moved to another record all look the same.
    #[error("sealed credential cannot be opened")]
    Open,
}

/// Seals and opens credentials under one key-encryption key.
#[derive(Clone)]
pub struct Sealer {
    kek: Aes256Gcm,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    pub fn from_key_bytes(key: &[u8; 32]) -> Self {
        Sealer {
            kek: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key)),
        }
    }

    /// Parses the master key text: 64 hex characters or standard base64 of
    /// 32 bytes, surrounding whitespace ignored.
    pub fn from_key_text(text: &str) -> Result<Self, CryptoError> {
        let t = text.trim();
        let bytes = if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(t).map_err(|_| CryptoError::BadMasterKey)?
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(t)
                .map_err(|_| CryptoError::BadMasterKey)?
        };
        let key: [u8; 32] = bytes.try_into().map_err(|_| CryptoError::BadMasterKey)?;
        Ok(Self::from_key_bytes(&key))
    }

    pub fn from_key_file(path: &Path) -> Result<Self, CryptoError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CryptoError::KeyFile(path.display().to_string(), e))?;
        Self::from_key_text(&text)
    }

    /// A fresh random master key as hex, for `keycap dev` and operators.
    pub fn generate_key_text() -> String {
        let mut k = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        hex::encode(k)
    }

    pub fn seal(&self, record_id: &str, plaintext: &[u8]) -> Vec<u8> {
        let aad = aad(record_id);
        let dek_key = Aes256Gcm::generate_key(OsRng);
        let dek = Aes256Gcm::new(&dek_key);
        let data_nonce = Aes256Gcm::generate_nonce(OsRng);
        let ciphertext = dek
            .encrypt(
                &data_nonce,
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let kek_nonce = Aes256Gcm::generate_nonce(OsRng);
        let wrapped = self
            .kek
            .encrypt(
                &kek_nonce,
                Payload {
                    msg: dek_key.as_slice(),
                    aad: &aad,
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = Vec::with_capacity(4 + 2 * NONCE_LEN + WRAPPED_DEK_LEN + ciphertext.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&kek_nonce);
        out.extend_from_slice(&wrapped);
        out.extend_from_slice(&data_nonce);
        out.extend_from_slice(&ciphertext);
        out
    }

    pub fn open(&self, record_id: &str, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let head = 4 + NONCE_LEN + WRAPPED_DEK_LEN + NONCE_LEN;
        if sealed.len() < head + 16 || &sealed[..4] != MAGIC {
            return Err(CryptoError::Open);
        }
        let aad = aad(record_id);
        let kek_nonce = Nonce::from_slice(&sealed[4..4 + NONCE_LEN]);
        let wrapped = &sealed[4 + NONCE_LEN..4 + NONCE_LEN + WRAPPED_DEK_LEN];
        let data_nonce = Nonce::from_slice(&sealed[4 + NONCE_LEN + WRAPPED_DEK_LEN..head]);
        let dek_bytes = self
            .kek
            .decrypt(
                kek_nonce,
                Payload {
                    msg: wrapped,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::Open)?;
        let dek = Aes256Gcm::new_from_slice(&dek_bytes).map_err(|_| CryptoError::Open)?;
        dek.decrypt(
            data_nonce,
            Payload {
                msg: &sealed[head..],
                aad: &aad,
            },
        )
        .map_err(|_| CryptoError::Open)
    }
}

fn aad(record_id: &str) -> Vec<u8> {
    format!("keycap/vendor-credential/{record_id}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::from_key_text(&Sealer::generate_key_text()).unwrap()
    }

    #[test]
    fn round_trip() {
        let s = sealer();
        let blob = s.seal("stripe", b"sk_live_secret");
        assert!(!blob.windows(14).any(|w| w == b"sk_live_secret"));
        assert_eq!(s.open("stripe", &blob).unwrap(), b"sk_live_secret");
    }

    #[test]
    fn every_flipped_bit_fails() {
        let s = sealer();
        let blob = s.seal("stripe", b"sk_live_secret");
        for i in 0..blob.len() {
            for bit in [0x01u8, 0x80] {
                let mut b = blob.clone();
                b[i] ^= bit;
                assert!(s.open("stripe", &b).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn moved_record_or_other_key_fails() {
        let s = sealer();
        let blob = s.seal("stripe", b"sk_live_secret");
        assert!(s.open("openai", &blob).is_err());
        assert!(sealer().open("stripe", &blob).is_err());
        assert!(s.open("stripe", &blob[..10]).is_err());
    }

    #[test]
    fn key_text_forms() {
        let hexkey = "11".repeat(32);
        assert!(Sealer::from_key_text(&hexkey).is_ok());
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert!(Sealer::from_key_text(&format!(" {b64}\n")).is_ok());
        assert!(Sealer::from_key_text("short").is_err());
        assert!(Sealer::from_key_text(&"zz".repeat(32)).is_err());
    }
}
