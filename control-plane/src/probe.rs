//! The credential probe's one HTTP call: a `GET` of the vendor's probe path
//! (`keycap_proto::profile::ProbeRequest`) with the credential injected as
//! the proxy injects it, under the same upstream rule as the proxy: `https`
//! to public addresses only, unless the control plane runs with
//! `--allow-private-upstreams` (then any address, plain `http` too). The
//! connection goes to the addresses checked here (no second lookup).
//!
//! What comes back is the vendor's status or why there was none, in
//! keycap's words: never the vendor's body (it may echo the credential) and
//! never the credential.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use keycap_proto::profile::CredentialInjection;

use crate::domain::UpstreamPolicy;

/// How long one probe may take, connection included.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the vendor said: its status, or why nothing came.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    Answered(u16),
    Failed(String),
}

#[derive(Clone, Copy)]
struct CheckedResolver {
    policy: UpstreamPolicy,
}

#[derive(Debug, thiserror::Error)]
#[error("the vendor's host resolves to a loopback, private or link-local address; probes there need --allow-private-upstreams")]
struct PrivateUpstream;

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
        let policy = self.policy;
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if policy == UpstreamPolicy::PublicHttps
                && addrs
                    .iter()
                    .any(|a| !keycap_proto::network::is_public_upstream(a.ip()))
            {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    PrivateUpstream,
                ));
            }
            Ok(addrs.into_iter())
        })
    }
}

type ProbeClient =
    Client<hyper_rustls::HttpsConnector<HttpConnector<CheckedResolver>>, Empty<Bytes>>;

fn client(policy: UpstreamPolicy) -> Result<&'static ProbeClient, String> {
    static PUBLIC: OnceLock<ProbeClient> = OnceLock::new();
    static PRIVATE: OnceLock<ProbeClient> = OnceLock::new();
    let cell = match policy {
        UpstreamPolicy::PublicHttps => &PUBLIC,
        UpstreamPolicy::AllowPrivate => &PRIVATE,
    };
    if let Some(c) = cell.get() {
        return Ok(c);
    }
    let tls = keycap_proto::tls::client_config(keycap_proto::tls::Trust::SystemAnd(None), None)
        .map_err(|e| format!("cannot build the TLS client: {e}"))?;
    let mut http = HttpConnector::new_with_resolver(CheckedResolver { policy });
    http.enforce_http(false);
    http.set_connect_timeout(Some(PROBE_TIMEOUT));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    let c = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(https);
    Ok(cell.get_or_init(|| c))
}

/// `GET base_url + path` with the credential injected; the answer's status.
pub async fn probe(
    policy: UpstreamPolicy,
    base_url: &str,
    path: &str,
    injection: &CredentialInjection,
) -> ProbeOutcome {
    match exchange(policy, base_url, path, injection).await {
        Ok(status) => ProbeOutcome::Answered(status),
        Err(why) => ProbeOutcome::Failed(why),
    }
}

async fn exchange(
    policy: UpstreamPolicy,
    base_url: &str,
    path: &str,
    injection: &CredentialInjection,
) -> Result<u16, String> {
    let url = format!("{}{}", base_url.trim_end_matches('/'), path);
    let uri: http::Uri = url
        .parse()
        .map_err(|_| "the vendor's base URL and probe path do not make a URL".to_string())?;
    if policy == UpstreamPolicy::PublicHttps {
        if uri.scheme_str() != Some("https") {
            return Err("probes go over https only (see --allow-private-upstreams)".into());
        }
        // An address written in the URL never reaches the resolver.
        let literal = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|h| h.parse::<std::net::IpAddr>().ok());
        if literal.is_some_and(|a| !keycap_proto::network::is_public_upstream(a)) {
            return Err(PrivateUpstream.to_string());
        }
    }
    let mut value = http::HeaderValue::from_str(&injection.value)
        .map_err(|_| "the credential cannot be a header value".to_string())?;
    value.set_sensitive(true);
    let req = http::Request::get(uri)
        .header(injection.header.as_str(), value)
        .header(http::header::ACCEPT, "application/json")
        .header(
            http::header::USER_AGENT,
            concat!("keycap-probe/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|_| "cannot build the probe request".to_string())?;
    let client = client(policy)?;
    let call = async {
        let resp = client.request(req).await.map_err(describe)?;
        let status = resp.status().as_u16();
        // Read (and drop) a bounded answer so the connection can be reused;
        // it is never shown.
        let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await;
        Ok::<u16, String>(status)
    };
    tokio::time::timeout(PROBE_TIMEOUT, call)
        .await
        .map_err(|_| format!("no answer within {} s", PROBE_TIMEOUT.as_secs()))?
}

/// A client error as an operator reads it: the innermost cause.
fn describe(e: hyper_util::client::legacy::Error) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    let mut last = e.to_string();
    while let Some(c) = cause {
        if let Some(p) = c.downcast_ref::<PrivateUpstream>() {
            return p.to_string();
        }
        last = c.to_string();
        cause = c.source();
    }
    format!("the vendor could not be reached: {last}")
}
