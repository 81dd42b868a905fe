//! What an agent's connection may hold of the proxy while it is served,
//! beyond the `--max-connections` slot it takes when accepted.
//!
//! Owns one bound: a request whose body is read before anyone has checked
//! its credential (the `/vault` relay: the control plane checks the token
//! only once the whole request reaches it) and that carries not even the
//! shape of one may hold only a share of the connections
//! (`UnauthenticatedShare`), so clients without a key that trickle bodies
//! cannot crowd out agents that have one.
//!
//! It never authenticates anything: the shape of a credential only decides
//! which bound applies, never whether a call is allowed.

use std::sync::Arc;

use http::HeaderMap;
use keycap_proto::secret::{self, SecretKind};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Whether the request presents something shaped like a keycap credential
/// — a vault key, an admin token or an issuer token, checksum included —
/// where the proxy or the control plane reads one. Anyone can compute a
/// well-formed token, so this is a classification, never a check.
pub fn claims_credential(headers: &HeaderMap) -> bool {
    crate::proxy::presented_key(headers).is_some_and(|k| {
        [
            SecretKind::VaultKey,
            SecretKind::AdminToken,
            SecretKind::IssuerToken,
        ]
        .into_iter()
        .any(|kind| secret::is_well_formed(kind, &k))
    })
}

/// The part of `--max-connections` that requests without a credential may
/// hold while their body is read: a quarter, at least one.
#[derive(Clone)]
pub struct UnauthenticatedShare {
    slots: Arc<Semaphore>,
}

impl UnauthenticatedShare {
    pub fn of(max_connections: u64) -> UnauthenticatedShare {
        let share = usize::try_from(max_connections / 4)
            .unwrap_or(usize::MAX)
            .clamp(1, Semaphore::MAX_PERMITS);
        UnauthenticatedShare {
            slots: Arc::new(Semaphore::new(share)),
        }
    }

    /// A place for a request with `headers` until the permit is dropped:
    /// `Ok(None)` when it claims a credential (it needs none), `Err` when
    /// it claims none and the share is taken.
    pub fn admit(&self, headers: &HeaderMap) -> Result<Option<OwnedSemaphorePermit>, Busy> {
        if claims_credential(headers) {
            return Ok(None);
        }
        self.slots
            .clone()
            .try_acquire_owned()
            .map(Some)
            .map_err(|_| Busy)
    }
}

/// The share of requests without a credential is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy;

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn bearer(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        h
    }

    #[test]
    fn only_well_formed_credentials_count_as_claimed() {
        for kind in [
            SecretKind::VaultKey,
            SecretKind::AdminToken,
            SecretKind::IssuerToken,
        ] {
            let token = secret::generate(kind, "live");
            assert!(claims_credential(&bearer(&token)), "{token}");
            // One character off breaks the checksum: no longer a claim.
            let mut broken = token.clone();
            let last = broken.pop().unwrap();
            broken.push(if last == 'a' { 'b' } else { 'a' });
            assert!(!claims_credential(&bearer(&broken)), "{broken}");
        }
        let key = secret::generate(SecretKind::VaultKey, "live");
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_str(&key).unwrap());
        assert!(claims_credential(&h));
        // The fleet token is no agent's or admin's credential.
        let fleet = secret::generate(SecretKind::FleetToken, "live");
        assert!(!claims_credential(&bearer(&fleet)));
        assert!(!claims_credential(&bearer("kcadm_live_notatoken")));
        assert!(!claims_credential(&HeaderMap::new()));
    }

    #[test]
    fn requests_without_a_credential_hold_at_most_a_quarter() {
        let share = UnauthenticatedShare::of(20);
        let none = HeaderMap::new();
        let held: Vec<_> = (0..5)
            .map(|_| share.admit(&none).unwrap().expect("a permit"))
            .collect();
        assert_eq!(share.admit(&none).unwrap_err(), Busy);
        // A claimed credential is not held to the share.
        let admin = bearer(&secret::generate(SecretKind::AdminToken, "live"));
        assert!(share.admit(&admin).unwrap().is_none());
        drop(held);
        assert!(share.admit(&none).unwrap().is_some());
        // Small caps still leave one.
        let one = UnauthenticatedShare::of(2);
        let _held = one.admit(&none).unwrap();
        assert_eq!(one.admit(&none).unwrap_err(), Busy);
    }
}
