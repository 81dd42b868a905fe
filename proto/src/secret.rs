//! Secret formats: vault keys, admin tokens, issuer tokens and fleet tokens.
//!
//! A secret is `<prefix>_<env>_<body><check>`: 43 base62 characters of
//! randomness (256 bits) and a 6-character base62 checksum of everything
//! before it, so a scanner — or the proxy, before any lookup — can tell a
//! real secret from random text offline. Secrets are stored and looked up
//! only as SHA-256; this module never logs or keeps one.

use rand::Rng;
use sha2::{Digest, Sha256};

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const BODY_LEN: usize = 43;
const CHECK_LEN: usize = 6;

/// What a secret grants; each kind has its own prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecretKind {
    /// `kc_`: a vault key an agent presents to the proxy.
    VaultKey,
    /// `kcadm_`: an admin token for the admin API.
    AdminToken,
    /// `kcfleet_`: the token proxies present to the fleet API.
    FleetToken,
    /// `kciss_`: an issuer token, which may only mint child keys of the one
    /// key it belongs to.
    IssuerToken,
}

impl SecretKind {
    pub fn prefix(self) -> &'static str {
        match self {
            SecretKind::VaultKey => "kc",
            SecretKind::AdminToken => "kcadm",
            SecretKind::FleetToken => "kcfleet",
            SecretKind::IssuerToken => "kciss",
        }
    }
}

impl SecretKind {
    /// A regular expression that finds secrets of this kind in text, for
    /// secret scanners (docs/key-formats.md); `is_well_formed` then
    /// tells a real one from a look-alike by its checksum.
    pub fn scanner_pattern(self) -> &'static str {
        match self {
            SecretKind::VaultKey => r"\bkc_[a-z]{1,16}_[0-9A-Za-z]{49}\b",
            SecretKind::AdminToken => r"\bkcadm_[a-z]{1,16}_[0-9A-Za-z]{49}\b",
            SecretKind::FleetToken => r"\bkcfleet_[a-z]{1,16}_[0-9A-Za-z]{49}\b",
            SecretKind::IssuerToken => r"\bkciss_[a-z]{1,16}_[0-9A-Za-z]{49}\b",
        }
    }
}

/// SHA-256 of a secret's full text: the only form keycap stores.
pub type SecretHash = [u8; 32];

pub fn hash(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

fn checksum(head: &str) -> String {
    let d = Sha256::digest(head.as_bytes());
    let mut n = u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as u64;
    let mut out = [b'0'; CHECK_LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(out.to_vec()).expect("alphabet is ASCII")
}

/// Mints a fresh secret of `kind` for environment `env` (e.g. "live", "dev").
pub fn generate(kind: SecretKind, env: &str) -> String {
    let mut rng = rand::rngs::OsRng;
    let body: String = (0..BODY_LEN)
        .map(|_| ALPHABET[rng.gen_range(0..62)] as char)
        .collect();
    let head = format!("{}_{}_{}", kind.prefix(), env, body);
    let check = checksum(&head);
    format!("{head}{check}")
}

/// Checks shape and checksum without any lookup. Constant work for a given
/// length; says nothing about whether the secret exists.
pub fn is_well_formed(kind: SecretKind, secret: &str) -> bool {
    let Some(rest) = secret
        .strip_prefix(kind.prefix())
        .and_then(|r| r.strip_prefix('_'))
    else {
        return false;
    };
    let Some((env, tail)) = rest.split_once('_') else {
        return false;
    };
    if env.is_empty() || env.len() > 16 || !env.bytes().all(|b| b.is_ascii_lowercase()) {
        return false;
    }
    if tail.len() != BODY_LEN + CHECK_LEN || !tail.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return false;
    }
    let (head, check) = secret.split_at(secret.len() - CHECK_LEN);
    checksum(head).as_bytes() == check.as_bytes()
}

/// The first characters of a secret, safe to show in listings.
pub fn display_prefix(secret: &str) -> String {
    let keep = secret.len().min(secret.find('_').map_or(0, |i| i + 1) + 12);
    format!("{}…", &secret[..keep])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_validate_and_differ() {
        let a = generate(SecretKind::VaultKey, "live");
        let b = generate(SecretKind::VaultKey, "live");
        assert_ne!(a, b);
        assert!(a.starts_with("kc_live_"));
        assert_eq!(a.len(), "kc_live_".len() + 49);
        assert!(is_well_formed(SecretKind::VaultKey, &a));
        assert!(!is_well_formed(SecretKind::AdminToken, &a));
    }

    #[test]
    fn a_changed_character_breaks_the_checksum() {
        let a = generate(SecretKind::AdminToken, "dev");
        assert!(is_well_formed(SecretKind::AdminToken, &a));
        let mut bytes = a.clone().into_bytes();
        let i = bytes.len() - 10;
        bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
        assert!(!is_well_formed(
            SecretKind::AdminToken,
            &String::from_utf8(bytes).unwrap()
        ));
        assert!(!is_well_formed(SecretKind::VaultKey, "kc_live_short"));
        assert!(!is_well_formed(SecretKind::VaultKey, "sk_live_abc"));
    }

    #[test]
    fn scanner_patterns_find_each_kind_and_only_it() {
        let kinds = [
            SecretKind::VaultKey,
            SecretKind::AdminToken,
            SecretKind::FleetToken,
            SecretKind::IssuerToken,
        ];
        let documented = include_str!("../../docs/key-formats.md");
        for kind in kinds {
            let re = regex::Regex::new(kind.scanner_pattern()).unwrap();
            for other in kinds {
                for _ in 0..50 {
                    let s = generate(other, "live");
                    let text = format!("export TOKEN={s}; echo done");
                    let found: Vec<&str> = re.find_iter(&text).map(|m| m.as_str()).collect();
                    if other == kind {
                        assert_eq!(found, [s.as_str()], "{kind:?} in {text}");
                    } else {
                        assert!(
                            found.is_empty(),
                            "{kind:?} pattern matched a {other:?}: {text}"
                        );
                    }
                }
            }
        }
        for kind in [
            SecretKind::VaultKey,
            SecretKind::AdminToken,
            SecretKind::IssuerToken,
        ] {
            assert!(
                documented.contains(&format!("`{}`", kind.scanner_pattern())),
                "docs/key-formats.md does not show the {kind:?} pattern"
            );
        }
    }

    #[test]
    fn issuer_tokens_are_their_own_kind() {
        let t = generate(SecretKind::IssuerToken, "live");
        assert!(t.starts_with("kciss_live_"));
        assert_eq!(t.len(), "kciss_live_".len() + 49);
        assert!(is_well_formed(SecretKind::IssuerToken, &t));
        for other in [
            SecretKind::VaultKey,
            SecretKind::AdminToken,
            SecretKind::FleetToken,
        ] {
            assert!(!is_well_formed(other, &t), "{other:?}");
            assert!(!is_well_formed(
                SecretKind::IssuerToken,
                &generate(other, "live")
            ));
        }
        let mut bytes = t.into_bytes();
        let i = bytes.len() - 1;
        bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
        assert!(!is_well_formed(
            SecretKind::IssuerToken,
            &String::from_utf8(bytes).unwrap()
        ));
        assert!(display_prefix(&generate(SecretKind::IssuerToken, "dev")).starts_with("kciss_dev_"));
    }

    #[test]
    fn prefix_shows_only_the_start() {
        let a = generate(SecretKind::VaultKey, "live");
        let p = display_prefix(&a);
        assert!(p.starts_with("kc_live_"));
        assert!(p.len() < a.len());
    }
}
