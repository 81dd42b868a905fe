//! Envelope encryption of vendor credentials.
//!
//! Each credential gets its own random 256-bit data key; the credential is
//! sealed with AES-256-GCM under the data key and the data key is sealed
//! under the key-encryption key (KEK). The record id (the vendor name) is
//! bound as associated data to both layers, so a sealed blob moved to another
//! record, or with any bit flipped, fails to open. The KEK comes from
//! `KEYCAP_MASTER_KEY` or a key file; it is never stored next to the data.
//! Plaintext exists only in memory, in the values this module returns.
//!
//! A sealed blob names the KEK that wrapped its data key by a short id (a
//! hash of the KEK, not the KEK). A `Sealer` seals under its primary KEK and
//! opens under the primary or any previous KEK it was given, so replicas can
//! move to a new KEK one at a time; [`Sealer::rewrap`] then moves each data
//! key to the primary without touching the sealed credential itself.

use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, OsRng, Payload};
use aes_gcm::{AeadCore, Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// The first format: no KEK id; opened by trying every KEK held.
const MAGIC_V1: &[u8; 4] = b"kcv1";
const MAGIC: &[u8; 4] = b"kcv2";
const KEK_ID_LEN: usize = 8;
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
    /// The blob names a KEK this control plane was not given. The id is a
    /// hash of the KEK, safe to show.
    #[error("sealed under key-encryption key {0}, which this control plane does not hold")]
    UnknownKek(String),
}

/// One key-encryption key and its public id.
#[derive(Clone)]
struct Kek {
    id: [u8; KEK_ID_LEN],
    cipher: Aes256Gcm,
}

impl Kek {
    fn new(key: &[u8; 32]) -> Kek {
        let digest = Sha256::new()
            .chain_update(b"keycap/kek-id/")
            .chain_update(key)
            .finalize();
        let mut id = [0u8; KEK_ID_LEN];
        id.copy_from_slice(&digest[..KEK_ID_LEN]);
        Kek {
            id,
            cipher: Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(key)),
        }
    }

    fn wrap(&self, aad: &[u8], dek: &[u8]) -> ([u8; NONCE_LEN], Vec<u8>) {
        let nonce = Aes256Gcm::generate_nonce(OsRng);
        let wrapped = self
            .cipher
            .encrypt(&nonce, Payload { msg: dek, aad })
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        (nonce.into(), wrapped)
    }

    fn unwrap(&self, aad: &[u8], nonce: &[u8], wrapped: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: wrapped, aad })
            .map_err(|_| CryptoError::Open)
    }
}

/// A sealed blob cut into its parts.
struct Parts<'a> {
    /// `None` for the first format, which does not name its KEK.
    kek_id: Option<&'a [u8]>,
    kek_nonce: &'a [u8],
    wrapped: &'a [u8],
    /// Data nonce and ciphertext: never changed by a rewrap.
    sealed_data: &'a [u8],
}

fn parts(sealed: &[u8]) -> Result<Parts<'_>, CryptoError> {
    let (kek_id, rest) = match sealed.get(..4) {
        Some(m) if m == MAGIC && sealed.len() >= 4 + KEK_ID_LEN => {
            (Some(&sealed[4..4 + KEK_ID_LEN]), &sealed[4 + KEK_ID_LEN..])
        }
        Some(m) if m == MAGIC_V1 => (None, &sealed[4..]),
        _ => return Err(CryptoError::Open),
    };
    if rest.len() < NONCE_LEN + WRAPPED_DEK_LEN + NONCE_LEN + 16 {
        return Err(CryptoError::Open);
    }
    Ok(Parts {
        kek_id,
        kek_nonce: &rest[..NONCE_LEN],
        wrapped: &rest[NONCE_LEN..NONCE_LEN + WRAPPED_DEK_LEN],
        sealed_data: &rest[NONCE_LEN + WRAPPED_DEK_LEN..],
    })
}

/// Seals under one primary key-encryption key; opens under it or any
/// previous one.
#[derive(Clone)]
pub struct Sealer {
    primary: Kek,
    previous: Vec<Kek>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    pub fn from_key_bytes(key: &[u8; 32]) -> Self {
        Sealer {
            primary: Kek::new(key),
            previous: Vec::new(),
        }
    }

    /// Parses the master key text: 64 hex characters or standard base64 of
    /// 32 bytes, surrounding whitespace ignored.
    pub fn from_key_text(text: &str) -> Result<Self, CryptoError> {
        Ok(Self::from_key_bytes(&key_bytes(text)?))
    }

    pub fn from_key_file(path: &Path) -> Result<Self, CryptoError> {
        Self::from_key_text(&read_key_file(path)?)
    }

    /// Also opens blobs sealed under `previous` (a KEK being rotated away
    /// from, or one not yet made primary everywhere).
    pub fn with_previous(mut self, previous: &Sealer) -> Self {
        for kek in std::iter::once(&previous.primary).chain(&previous.previous) {
            if kek.id != self.primary.id && !self.previous.iter().any(|k| k.id == kek.id) {
                self.previous.push(kek.clone());
            }
        }
        self
    }

    /// The primary KEK's id, as hex: what new blobs are sealed under.
    pub fn kek_id(&self) -> String {
        hex::encode(self.primary.id)
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
        let mut sealed_data = Vec::with_capacity(NONCE_LEN + ciphertext.len());
        sealed_data.extend_from_slice(&data_nonce);
        sealed_data.extend_from_slice(&ciphertext);
        self.assemble(&aad, dek_key.as_slice(), &sealed_data)
    }

    pub fn open(&self, record_id: &str, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let aad = aad(record_id);
        let p = parts(sealed)?;
        let dek_bytes = self.unwrap_dek(&aad, &p)?;
        let dek = Aes256Gcm::new_from_slice(&dek_bytes).map_err(|_| CryptoError::Open)?;
        let (data_nonce, ciphertext) = p.sealed_data.split_at(NONCE_LEN);
        dek.decrypt(
            Nonce::from_slice(data_nonce),
            Payload {
                msg: ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| CryptoError::Open)
    }

    /// Re-wraps a blob's data key under the primary KEK; `None` when it is
    /// already there. The sealed credential is not decrypted, only proven
    /// to open (so a damaged blob is reported, not carried forward).
    pub fn rewrap(&self, record_id: &str, sealed: &[u8]) -> Result<Option<Vec<u8>>, CryptoError> {
        self.open(record_id, sealed)?;
        let p = parts(sealed)?;
        if p.kek_id == Some(&self.primary.id[..]) {
            return Ok(None);
        }
        let aad = aad(record_id);
        let dek = self.unwrap_dek(&aad, &p)?;
        Ok(Some(self.assemble(&aad, &dek, p.sealed_data)))
    }

    fn assemble(&self, aad: &[u8], dek: &[u8], sealed_data: &[u8]) -> Vec<u8> {
        let (kek_nonce, wrapped) = self.primary.wrap(aad, dek);
        let mut out =
            Vec::with_capacity(4 + KEK_ID_LEN + NONCE_LEN + WRAPPED_DEK_LEN + sealed_data.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.primary.id);
        out.extend_from_slice(&kek_nonce);
        out.extend_from_slice(&wrapped);
        out.extend_from_slice(sealed_data);
        out
    }

    fn unwrap_dek(&self, aad: &[u8], p: &Parts<'_>) -> Result<Vec<u8>, CryptoError> {
        let mut keks = std::iter::once(&self.primary).chain(&self.previous);
        match p.kek_id {
            Some(id) => keks
                .find(|k| k.id[..] == *id)
                .ok_or_else(|| CryptoError::UnknownKek(hex::encode(id)))?
                .unwrap(aad, p.kek_nonce, p.wrapped),
            None => keks
                .find_map(|k| k.unwrap(aad, p.kek_nonce, p.wrapped).ok())
                .ok_or(CryptoError::Open),
        }
    }
}

fn key_bytes(text: &str) -> Result<[u8; 32], CryptoError> {
    let t = text.trim();
    let bytes = if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(t).map_err(|_| CryptoError::BadMasterKey)?
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(t)
            .map_err(|_| CryptoError::BadMasterKey)?
    };
    bytes.try_into().map_err(|_| CryptoError::BadMasterKey)
}

fn read_key_file(path: &Path) -> Result<String, CryptoError> {
    std::fs::read_to_string(path).map_err(|e| CryptoError::KeyFile(path.display().to_string(), e))
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
    fn a_previous_kek_opens_and_rewrap_moves_the_data_key_to_the_primary() {
        let old = sealer();
        let blob = old.seal("stripe", b"sk_live_secret");
        let new_only = sealer();
        let rotating = new_only.clone().with_previous(&old);
        assert!(matches!(
            new_only.open("stripe", &blob),
            Err(CryptoError::UnknownKek(id)) if id == old.kek_id()
        ));
        assert_eq!(rotating.open("stripe", &blob).unwrap(), b"sk_live_secret");

        let moved = rotating
            .rewrap("stripe", &blob)
            .unwrap()
            .expect("rewrapped");
        // Only the wrapped data key changed: the sealed credential is the same bytes.
        let (a, b) = (parts(&blob).unwrap(), parts(&moved).unwrap());
        assert_eq!(a.sealed_data, b.sealed_data);
        assert_ne!(a.wrapped, b.wrapped);
        assert_eq!(new_only.open("stripe", &moved).unwrap(), b"sk_live_secret");
        assert!(old.open("stripe", &moved).is_err());
        assert!(rotating.rewrap("stripe", &moved).unwrap().is_none());
        // A rewrapped blob is still bound to its record.
        assert!(new_only.open("openai", &moved).is_err());
        assert!(rotating.rewrap("openai", &blob).is_err());
    }

    #[test]
    fn first_format_blobs_still_open_and_rewrap() {
        // A kcv1 blob is a kcv2 blob without the KEK id.
        let s = sealer();
        let v2 = s.seal("stripe", b"sk_live_secret");
        let mut v1 = MAGIC_V1.to_vec();
        v1.extend_from_slice(&v2[4 + KEK_ID_LEN..]);
        assert_eq!(s.open("stripe", &v1).unwrap(), b"sk_live_secret");
        let moved = s.rewrap("stripe", &v1).unwrap().expect("moved to kcv2");
        assert_eq!(&moved[..4], MAGIC);
        assert_eq!(s.open("stripe", &moved).unwrap(), b"sk_live_secret");
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
