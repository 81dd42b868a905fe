//! Which addresses a vendor's calls may reach.
//!
//! Owns the proxy's half of the base-URL policy: unless the control plane
//! stamped a vendor `allow_private_upstream` (it runs with
//! `--allow-private-upstreams`), the vendor's base URL must be `https://`
//! and every address the proxy connects to for it must be public
//! (`keycap_proto::network::is_public_upstream`). An IP-literal host is
//! checked when the vendor is loaded; a name is checked on every
//! connection, on the addresses the resolver returns then, since DNS
//! answers change after the control plane checked them. It never lets a
//! refused address through to a connection, so the credential is never
//! sent there.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use keycap_proto::network::is_public_upstream;

/// Whether a vendor may be loaded with `base_url` when it may not reach
/// private addresses: `https://`, and an IP-literal host must be public.
pub fn check_base_url(base_url: &str, allow_private: bool) -> Result<(), String> {
    if allow_private {
        return Ok(());
    }
    let uri: http::Uri = base_url
        .parse()
        .map_err(|_| "base_url is not a valid URL".to_string())?;
    if uri.scheme_str() != Some("https") {
        return Err(
            "base_url: plain http needs the control plane's --allow-private-upstreams".into(),
        );
    }
    let host = uri.host().unwrap_or("");
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<IpAddr>() {
        Ok(ip) if !is_public_upstream(ip) => Err(format!(
            "base_url: {ip} is not a public address; it needs the control plane's --allow-private-upstreams"
        )),
        _ => Ok(()),
    }
}

/// A resolved name had no address a vendor call may go to.
#[derive(Debug, thiserror::Error)]
#[error("{host} resolves only to non-public addresses")]
pub struct AddressRefused {
    host: String,
}

/// Whether `e` (a client error, with its sources) is a connection this
/// module refused.
pub fn is_address_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<AddressRefused>() {
            return true;
        }
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<AddressRefused>())
            {
                return true;
            }
        }
        cause = c.source();
    }
    false
}

/// The system resolver, keeping only public addresses: a name that
/// resolves to none fails with `AddressRefused` before any connection.
#[derive(Clone)]
pub struct PublicResolver {
    inner: GaiResolver,
}

impl Default for PublicResolver {
    fn default() -> Self {
        Self::new()
    }
}

impl PublicResolver {
    pub fn new() -> Self {
        PublicResolver {
            inner: GaiResolver::new(),
        }
    }
}

type Resolving =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, std::io::Error>> + Send>>;

impl tower::Service<Name> for PublicResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Resolving;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().to_string();
        let resolving = self.inner.call(name);
        Box::pin(async move {
            let all: Vec<SocketAddr> = resolving.await?.collect();
            let public: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| is_public_upstream(a.ip()))
                .collect();
            if public.is_empty() {
                tracing::warn!(host = %host, addresses = ?all, "vendor host resolves only to non-public addresses; not connecting");
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    AddressRefused { host },
                ));
            }
            Ok(public.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::Service as _;

    #[test]
    fn a_vendor_without_the_opt_in_needs_https_and_a_public_literal() {
        for bad in [
            "http://api.stripe.com",
            "https://169.254.169.254",
            "https://127.0.0.1:8443",
            "https://[::1]",
            "https://[::ffff:10.0.0.1]",
        ] {
            assert!(check_base_url(bad, false).is_err(), "{bad}");
            assert!(check_base_url(bad, true).is_ok(), "{bad}");
        }
        assert!(check_base_url("https://api.stripe.com", false).is_ok());
        assert!(check_base_url("https://93.184.216.34", false).is_ok());
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_before_connecting() {
        let mut r = PublicResolver::new();
        std::future::poll_fn(|cx| r.poll_ready(cx)).await.unwrap();
        let e = r.call("localhost".parse().unwrap()).await.unwrap_err();
        assert!(is_address_refused(&e), "{e}");
        let other = std::io::Error::other("x");
        assert!(!is_address_refused(&other));
    }
}
