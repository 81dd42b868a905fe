//! Posting the outbox: every replica runs one `Courier`, which claims due
//! deliveries from the store (a lease, so one replica delivers each), signs
//! and posts them, and records each attempt with what it leaves the
//! delivery as: delivered on a 2xx, else retried with exponential backoff
//! and jitter until 24 hours after the event, then failed.
//!
//! Where a delivery may go is decided here, at delivery time: the URL's
//! host is resolved and every address it resolves to must be public unless
//! the control plane runs with `--allow-private-webhooks`; the connection
//! goes to those checked addresses only (no second lookup an attacker's DNS
//! could answer differently). Redirects are never followed.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::{DateTime, Utc};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::Rng as _;
use tokio::sync::Notify;

use super::{
    secret_record, signature, slack_body, Attempt, AttemptOutcome, ClaimedDelivery, PayloadFormat,
    SIGNATURE_HEADER,
};
use crate::crypto::Sealer;
use crate::domain::{invalid, InvalidInput};
use crate::store::Store;

/// How long after its event a delivery is retried before it fails.
pub const RETRY_FOR: chrono::TimeDelta = chrono::TimeDelta::hours(24);

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// How many deliveries one replica posts at once (each to another
/// endpoint: an endpoint's deliveries go one at a time, in order).
const CLAIM_BATCH: u32 = 32;

/// How often a replica looks for due deliveries when nothing woke it.
const POLL: Duration = Duration::from_millis(250);

/// The wait before attempt `attempts + 1` after `attempts` failed ones:
/// 1 s, 2 s, 4 s ... capped at an hour, each drawn between half and all
/// of that (jitter, so endpoints that failed together do not retry
/// together).
pub fn backoff(attempts: i32) -> Duration {
    let exp = attempts.saturating_sub(1).clamp(0, 12) as u32;
    let full = Duration::from_secs(1u64 << exp).min(MAX_BACKOFF);
    let ms = full.as_millis() as u64;
    Duration::from_millis(rand::thread_rng().gen_range(ms / 2..=ms))
}

/// What an attempt at `at` that failed leaves a delivery made at
/// `created_at` as, after `attempts` attempts including this one.
pub fn after_failure(
    created_at: DateTime<Utc>,
    at: DateTime<Utc>,
    attempts: i32,
) -> AttemptOutcome {
    let next = at + chrono::TimeDelta::from_std(backoff(attempts)).unwrap_or(RETRY_FOR);
    if next > created_at + RETRY_FOR {
        AttemptOutcome::Failed
    } else {
        AttemptOutcome::Retry(next)
    }
}

/// Where deliveries may connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destinations {
    /// Hosts whose every address is public (the default).
    PublicOnly,
    /// Any address, loopback and private networks included
    /// (`--allow-private-webhooks`, for tests and private receivers).
    AllowPrivate,
}

/// A name refused because it resolves to an address deliveries may not
/// reach.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves to {addr}, a loopback, private or link-local address; deliveries there need --allow-private-webhooks")]
pub struct PrivateDestination {
    host: String,
    addr: std::net::IpAddr,
}

/// The IP address a URL names literally (`http://10.0.0.1/`,
/// `http://[::1]:8080/`), if it names one.
fn literal_address(url: &str) -> Option<std::net::IpAddr> {
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Resolves a host with the system resolver and refuses it unless every
/// address is allowed.
#[derive(Clone)]
struct CheckedResolver {
    destinations: Destinations,
}

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, std::io::Error>> + Send>>;

impl tower::Service<Name> for CheckedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let destinations = self.destinations;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if destinations == Destinations::PublicOnly {
                if let Some(bad) = addrs
                    .iter()
                    .find(|a| !keycap_proto::network::is_public_upstream(a.ip()))
                {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        PrivateDestination {
                            host,
                            addr: bad.ip(),
                        },
                    ));
                }
            }
            Ok(addrs.into_iter())
        })
    }
}

type HttpsClient =
    Client<hyper_rustls::HttpsConnector<HttpConnector<CheckedResolver>>, Full<Bytes>>;

/// One replica's webhook sender.
pub struct Courier {
    store: Arc<dyn Store>,
    sealer: Sealer,
    client: HttpsClient,
    destinations: Destinations,
    /// This replica's name on the leases it takes.
    worker: String,
    /// How long one attempt may take; a claim's lease outlives it.
    timeout: Duration,
    /// Woken when this replica enqueues an event, so it goes out at once.
    wake: Notify,
}

impl Courier {
    pub fn new(
        store: Arc<dyn Store>,
        sealer: Sealer,
        destinations: Destinations,
        timeout: Duration,
    ) -> anyhow::Result<Arc<Courier>> {
        let tls =
            keycap_proto::tls::client_config(keycap_proto::tls::Trust::SystemAnd(None), None)?;
        let mut http = HttpConnector::new_with_resolver(CheckedResolver { destinations });
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(https);
        Ok(Arc::new(Courier {
            store,
            sealer,
            client,
            destinations,
            worker: format!("courier-{}", uuid::Uuid::new_v4().simple()),
            timeout,
            wake: Notify::new(),
        }))
    }

    pub fn destinations(&self) -> Destinations {
        self.destinations
    }

    /// Refuses, as bad input, a URL whose host does not resolve or
    /// resolves to an address deliveries may not reach. Deliveries check
    /// again, each time: DNS answers change.
    pub async fn check_destination(&self, url: &str) -> Result<(), InvalidInput> {
        let uri: http::Uri = url
            .parse()
            .map_err(|e| invalid("url", format!("not a URL: {e}")))?;
        let host = uri
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']');
        let name: Name = host
            .parse()
            .map_err(|_| invalid("url", "not a host name"))?;
        let mut resolver = CheckedResolver {
            destinations: self.destinations,
        };
        match tower::Service::call(&mut resolver, name).await {
            Ok(_) => Ok(()),
            Err(e) => match e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<PrivateDestination>())
            {
                Some(p) => Err(invalid("url", p.to_string())),
                None => Err(invalid(
                    "url",
                    format!("{} does not resolve: {e}", keycap_proto::clip(host, 128)),
                )),
            },
        }
    }

    /// Says that a delivery may be due now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Delivers until the courier is dropped.
    pub fn run(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(courier) = me.upgrade() else { return };
                let claimed = courier.deliver_due().await;
                if claimed == 0 {
                    tokio::select! {
                        _ = courier.wake.notified() => {}
                        _ = tokio::time::sleep(POLL) => {}
                    }
                }
            }
        });
    }

    /// Claims the due deliveries and posts them all; how many it claimed.
    pub async fn deliver_due(&self) -> usize {
        let now = Utc::now();
        // The lease outlives the attempt (its connect and response
        // timeouts) with room to record it.
        let lease = now
            + chrono::TimeDelta::from_std(self.timeout * 2 + Duration::from_secs(5))
                .unwrap_or(chrono::TimeDelta::seconds(60));
        let claimed = match self
            .store
            .claim_webhook_deliveries(&self.worker, now, lease, CLAIM_BATCH)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot claim webhook deliveries");
                return 0;
            }
        };
        let n = claimed.len();
        let attempts = claimed.into_iter().map(|d| self.attempt(d));
        futures_util::future::join_all(attempts).await;
        n
    }

    async fn attempt(&self, d: ClaimedDelivery) {
        let started = std::time::Instant::now();
        let at = Utc::now();
        let result = self.post(&d).await;
        let duration_ms = started.elapsed().as_millis() as i64;
        let number = d.attempts + 1;
        let (attempt, outcome) = match result {
            Ok(status) if (200..300).contains(&status) => (
                Attempt {
                    attempt: number,
                    at,
                    status: Some(status),
                    error: String::new(),
                    duration_ms,
                },
                AttemptOutcome::Delivered,
            ),
            Ok(status) => (
                Attempt {
                    attempt: number,
                    at,
                    status: Some(status),
                    error: format!("the receiver answered {status}"),
                    duration_ms,
                },
                after_failure(d.created_at, at, number),
            ),
            Err(error) => (
                Attempt {
                    attempt: number,
                    at,
                    status: None,
                    error,
                    duration_ms,
                },
                after_failure(d.created_at, at, number),
            ),
        };
        match outcome {
            AttemptOutcome::Delivered => {
                tracing::info!(endpoint = %d.endpoint_id, event = %d.event_id, attempt = number, "webhook delivered")
            }
            AttemptOutcome::Retry(next) => {
                tracing::warn!(endpoint = %d.endpoint_id, event = %d.event_id, attempt = number, error = %attempt.error, next = %next, "webhook delivery failed; will retry")
            }
            AttemptOutcome::Failed => {
                tracing::error!(endpoint = %d.endpoint_id, event = %d.event_id, attempt = number, error = %attempt.error, "webhook delivery failed for 24 hours; given up")
            }
        }
        match self
            .store
            .finish_webhook_attempt(d.seq, &self.worker, &attempt, outcome)
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(endpoint = %d.endpoint_id, event = %d.event_id, "webhook delivery lease lost before its attempt was recorded; another replica retries it")
            }
            Err(e) => tracing::warn!(error = %e, "cannot record a webhook attempt"),
        }
    }

    /// Posts one delivery; the receiver's status, or why there was none.
    async fn post(&self, d: &ClaimedDelivery) -> Result<i32, String> {
        let secret = self
            .sealer
            .open(&secret_record(&d.endpoint_id), &d.sealed_secret)
            .map_err(|e| {
                tracing::error!(endpoint = %d.endpoint_id, error = %e, "cannot open a webhook secret");
                "the endpoint's secret cannot be opened with this control plane's master key"
                    .to_string()
            })?;
        let body = match d.format {
            PayloadFormat::Keycap => d.payload.clone(),
            PayloadFormat::Slack => slack_body(&d.payload),
        };
        // The connector resolves names through `CheckedResolver`, but an
        // address written in the URL never reaches a resolver: check it here.
        if self.destinations == Destinations::PublicOnly {
            if let Some(addr) = literal_address(&d.url) {
                if !keycap_proto::network::is_public_upstream(addr) {
                    return Err(PrivateDestination {
                        host: addr.to_string(),
                        addr,
                    }
                    .to_string());
                }
            }
        }
        let t = Utc::now().timestamp();
        let req = http::Request::post(d.url.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("keycap-webhooks/", env!("CARGO_PKG_VERSION")),
            )
            .header(SIGNATURE_HEADER, signature(&secret, t, body.as_bytes()))
            .header("Keycap-Event-Id", d.event_id.as_str())
            .header("Keycap-Event-Type", d.event_type.as_str())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(describe)?;
            let status = resp.status().as_u16() as i32;
            // Read (and drop) a bounded answer so the connection can be reused.
            let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await;
            Ok::<i32, String>(status)
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("no answer within {} ms", self.timeout.as_millis()))?
    }
}

/// A client error as an operator reads it: the innermost cause (a refused
/// destination, a refused connection) rather than "client error (Connect)".
fn describe(e: hyper_util::client::legacy::Error) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut last = e.to_string();
    while let Some(c) = cause {
        if let Some(p) = c.downcast_ref::<PrivateDestination>() {
            return p.to_string();
        }
        last = c.to_string();
        cause = c.source();
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_written_in_the_url_is_found_for_checking() {
        use std::net::IpAddr;
        let v4: IpAddr = "169.254.169.254".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(literal_address("http://169.254.169.254/latest"), Some(v4));
        assert_eq!(literal_address("https://[::1]:8443/hook"), Some(v6));
        assert_eq!(literal_address("https://hooks.example.com/x"), None);
        assert!(!keycap_proto::network::is_public_upstream(v4));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        for (attempts, full) in [(1, 1000u128), (2, 2000), (3, 4000), (12, 2_048_000)] {
            for _ in 0..50 {
                let b = backoff(attempts).as_millis();
                assert!(b >= full / 2 && b <= full, "attempt {attempts}: {b} ms");
            }
        }
        assert!(backoff(40) <= MAX_BACKOFF);
    }

    #[test]
    fn retries_stop_after_a_day() {
        let created = Utc::now();
        assert!(matches!(
            after_failure(created, created, 1),
            AttemptOutcome::Retry(_)
        ));
        let late = created + RETRY_FOR - chrono::TimeDelta::milliseconds(10);
        assert_eq!(after_failure(created, late, 20), AttemptOutcome::Failed);
    }

    #[tokio::test]
    async fn private_destinations_are_refused_unless_allowed() {
        use tower::Service as _;
        let mut public = CheckedResolver {
            destinations: Destinations::PublicOnly,
        };
        for host in [
            "127.0.0.1",
            "localhost",
            "169.254.169.254",
            "10.1.2.3",
            "::1",
        ] {
            let name: Name = host.parse().unwrap();
            let err = public.call(name).await.unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{host}");
        }
        let mut private = CheckedResolver {
            destinations: Destinations::AllowPrivate,
        };
        let addrs: Vec<_> = private
            .call("127.0.0.1".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert_eq!(addrs[0].ip().to_string(), "127.0.0.1");
    }
}
