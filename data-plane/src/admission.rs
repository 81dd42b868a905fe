//! What an agent's connection may hold of the proxy while it is served,
//! beyond the `--max-connections` slot it takes when accepted.
//!
//! Owns two bounds. A request whose body is read before anyone has checked
//! its credential (the `/vault` relay: the control plane checks the token
//! only once the whole request reaches it) and that carries not even the
//! shape of one may hold only a share of the connections
//! (`UnauthenticatedShare`), so clients without a key that trickle bodies
//! cannot crowd out agents that have one. And a connection with no request
//! in flight is closed after the header read timeout (`Activity`), HTTP/2
//! included, whose connections would otherwise stay open idle for ever.
//!
//! It never authenticates anything: the shape of a credential only decides
//! which bound applies, never whether a call is allowed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use keycap_proto::secret::{self, SecretKind};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::body::{BoxError, ProxyBody};

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

/// Requests in flight on one connection (from the head's arrival until the
/// response body is sent or dropped), and how many ever started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Load {
    in_flight: usize,
    started: u64,
}

/// What a connection is doing, as its idle timer sees it.
#[derive(Clone)]
pub struct Activity {
    load: Arc<watch::Sender<Load>>,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity::new()
    }
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            load: Arc::new(watch::channel(Load::default()).0),
        }
    }

    /// A request has arrived; it is in flight until the guard is dropped.
    pub fn begin(&self) -> InFlight {
        self.load.send_modify(|l| {
            l.in_flight += 1;
            l.started += 1;
        });
        InFlight {
            load: self.load.clone(),
        }
    }

    /// Resolves once the connection has had no request in flight, and
    /// none started, for `idle`.
    pub async fn idle_for(&self, idle: Duration) {
        let mut load = self.load.subscribe();
        loop {
            let Ok(quiet) = load.wait_for(|l| l.in_flight == 0).await.map(|l| *l) else {
                return;
            };
            let busy = load.wait_for(|l| l.in_flight > 0 || l.started != quiet.started);
            if tokio::time::timeout(idle, busy).await.is_err() {
                return;
            }
        }
    }
}

/// One request in flight; dropping it ends it.
pub struct InFlight {
    load: Arc<watch::Sender<Load>>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.send_modify(|l| l.in_flight -= 1);
    }
}

/// A response body that keeps its request in flight until it has been
/// sent or dropped. Everything else passes through, its length included.
pub struct InFlightBody {
    inner: ProxyBody,
    _request: InFlight,
}

impl InFlightBody {
    pub fn new(inner: ProxyBody, request: InFlight) -> InFlightBody {
        InFlightBody {
            inner,
            _request: request,
        }
    }
}

impl Body for InFlightBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

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

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_with_nothing_in_flight_for_the_whole_time() {
        let activity = Activity::new();
        let idle = Duration::from_secs(10);
        let start = tokio::time::Instant::now();
        activity.idle_for(idle).await;
        assert_eq!(start.elapsed(), idle, "a connection that never asks");

        // A request in flight for 25 s, then quiet: idle 10 s after it ends.
        let request = activity.begin();
        let start = tokio::time::Instant::now();
        let ended = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(25)).await;
            drop(request);
        });
        activity.idle_for(idle).await;
        assert_eq!(start.elapsed(), Duration::from_secs(35));
        ended.await.unwrap();

        // Short requests every 6 s keep it open; the quiet after the last
        // one is what counts.
        let start = tokio::time::Instant::now();
        let a = activity.clone();
        let requests = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_secs(6)).await;
                drop(a.begin());
            }
        });
        activity.idle_for(idle).await;
        assert_eq!(start.elapsed(), Duration::from_secs(28));
        requests.await.unwrap();
    }
}
