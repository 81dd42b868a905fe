//! The proxy's Prometheus metrics, served on their own listener
//! (`--metrics-listen`), never on the one agents call.
//!
//! Labels carry only bounded values keycap itself chose: an outcome code
//! (`forwarded` or a refusal's error code) and vendor names from the
//! policy. Never a key, a key id, a run label, a path or an address.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::policy::PolicyCache;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VendorLabel {
    vendor: String,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabel, Counter>,
    calls_settled: Family<VendorLabel, Counter>,
    settled_micros: Family<VendorLabel, Counter>,
    policy_version: Gauge,
    policy: Arc<PolicyCache>,
}

impl Metrics {
    pub fn new(policy: Arc<PolicyCache>) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("keycap_proxy");
        let requests = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "requests",
            "Agent calls to vendors, by outcome: forwarded, or the error code they were refused with",
            requests.clone(),
        );
        let calls_settled = Family::<VendorLabel, Counter>::default();
        registry.register(
            "calls_settled",
            "Forwarded calls settled and reported as spend events",
            calls_settled.clone(),
        );
        let settled_micros = Family::<VendorLabel, Counter>::default();
        registry.register(
            "settled_micros",
            "Settled cost of forwarded calls, in micro-dollars",
            settled_micros.clone(),
        );
        let policy_version = Gauge::default();
        registry.register(
            "policy_version",
            "Change-log version of the policy this proxy applied",
            policy_version.clone(),
        );
        Arc::new(Metrics {
            registry,
            requests,
            calls_settled,
            settled_micros,
            policy_version,
            policy,
        })
    }

    /// One agent call: `forwarded`, or the code it was refused with.
    pub fn request(&self, outcome: &'static str) {
        self.requests.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// One settled call of `vendor` (a name from the policy).
    pub fn settled(&self, vendor: &str, cost_micros: i64) {
        let label = VendorLabel {
            vendor: vendor.to_string(),
        };
        self.calls_settled.get_or_create(&label).inc();
        self.settled_micros
            .get_or_create(&label)
            .inc_by(cost_micros.max(0) as u64);
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.policy_version.set(self.policy.version());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let metrics = metrics.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let metrics = metrics.clone();
            async move { Ok::<_, Infallible>(answer(&metrics, &req)) }
        });
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn answer(metrics: &Metrics, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let mut r = Response::new(Full::new(Bytes::from(metrics.render())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::Catalog;

    #[test]
    fn counts_land_under_their_labels() {
        let m = Metrics::new(PolicyCache::new(Catalog::builtin()));
        m.request("forwarded");
        m.request("forwarded");
        m.request("invalid_key");
        m.settled("stripe", 1_500_000);
        m.settled("stripe", -3);
        let text = m.render();
        assert!(
            text.contains("keycap_proxy_requests_total{outcome=\"forwarded\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("keycap_proxy_requests_total{outcome=\"invalid_key\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("keycap_proxy_calls_settled_total{vendor=\"stripe\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("keycap_proxy_settled_micros_total{vendor=\"stripe\"} 1500000\n"),
            "{text}"
        );
        assert!(text.contains("keycap_proxy_policy_version 0\n"), "{text}");
    }
}
