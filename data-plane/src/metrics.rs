//! The proxy's Prometheus metrics, served on their own listener
//! (`--metrics-listen`), never on the one agents call.
//!
//! Labels carry only bounded values keycap itself chose: an outcome code
//! (`forwarded` or a refusal's error code) and vendor names from the
//! policy. Never a key, a key id, a run label, a path or an address.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;

use crate::budget::HeldLeases;
use crate::policy::PolicyCache;
use crate::spend::Pending;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VendorLabel {
    vendor: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusClassLabel {
    vendor: String,
    /// `1xx` ... `5xx`.
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// Latency buckets from half a millisecond to about 16 seconds.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Where the gauges read at each scrape come from.
pub struct Gauges {
    /// What the leases hold now (`Budget::held`).
    pub leases: Arc<dyn Fn() -> HeldLeases + Send + Sync>,
    pub pending_spend: Arc<Pending>,
    pub control_plane_connected: Arc<dyn Fn() -> bool + Send + Sync>,
}

pub struct Metrics {
    registry: Registry,
    gauges: Gauges,
    leases: Gauge,
    lease_available: Gauge,
    lease_reserved: Gauge,
    spend_pending: Gauge,
    spend_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    connected: Gauge,
    requests: Family<OutcomeLabel, Counter>,
    calls_settled: Family<VendorLabel, Counter>,
    settled_micros: Family<VendorLabel, Counter>,
    policy_version: Gauge,
    policy: Arc<PolicyCache>,
    overhead: Family<VendorLabel, Histogram>,
    vendor_time: Family<VendorLabel, Histogram>,
    upstream: Family<StatusClassLabel, Counter>,
    spans_dropped: Counter,
}

impl Metrics {
    pub fn new(policy: Arc<PolicyCache>, gauges: Gauges) -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("keycap_proxy");
        let leases = Gauge::default();
        registry.register(
            "leases",
            "Budget leases this proxy draws on now (at most one per key)",
            leases.clone(),
        );
        let lease_available = Gauge::default();
        registry.register(
            "lease_available_micros",
            "Budget its leases hold that no call has reserved or spent, in micro-dollars: what it can serve without the control plane",
            lease_available.clone(),
        );
        let lease_reserved = Gauge::default();
        registry.register(
            "lease_reserved_micros",
            "Budget reserved by calls in flight and not yet settled, in micro-dollars",
            lease_reserved.clone(),
        );
        let spend_pending = Gauge::default();
        registry.register(
            "spend_events_pending",
            "Spend events not yet applied by the control plane (on disk too with --spool-dir)",
            spend_pending.clone(),
        );
        let spend_lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register_with_unit(
            "spend_delivery_lag",
            "How long the oldest spend event not yet applied by the control plane has waited; 0 when none waits",
            Unit::Seconds,
            spend_lag.clone(),
        );
        let connected = Gauge::default();
        registry.register(
            "control_plane_connected",
            "1 while a control-plane replica's policy stream is open, else 0",
            connected.clone(),
        );
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
        // A gauge at 1 rather than an OpenMetrics info, which the classic
        // text format (and promtool) does not know.
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running keycap-proxy's version", build);
        let overhead = Family::<VendorLabel, Histogram>::new_with_constructor(seconds);
        registry.register_with_unit(
            "call_overhead",
            "keycap's own time in a forwarded call up to its response head: the whole minus the vendor's",
            Unit::Seconds,
            overhead.clone(),
        );
        let vendor_time = Family::<VendorLabel, Histogram>::new_with_constructor(seconds);
        registry.register_with_unit(
            "vendor_response",
            "The vendor's time in a forwarded call: from sending it to its response head (and whole body, for a body keycap reads to settle)",
            Unit::Seconds,
            vendor_time.clone(),
        );
        let upstream = Family::<StatusClassLabel, Counter>::default();
        registry.register(
            "upstream_responses",
            "Vendor responses, by vendor and status class",
            upstream.clone(),
        );
        let spans_dropped = Counter::default();
        registry.register(
            "trace_spans_dropped",
            "Trace spans dropped: the export queue was full or the collector did not take them",
            spans_dropped.clone(),
        );
        Arc::new(Metrics {
            registry,
            gauges,
            leases,
            lease_available,
            lease_reserved,
            spend_pending,
            spend_lag,
            connected,
            requests,
            calls_settled,
            settled_micros,
            policy_version,
            policy,
            overhead,
            vendor_time,
            upstream,
            spans_dropped,
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

    /// One vendor response of `status` to a call of `vendor`.
    pub fn upstream(&self, vendor: &str, status: u16) {
        let class = match status {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.upstream
            .get_or_create(&StatusClassLabel {
                vendor: vendor.to_string(),
                class,
            })
            .inc();
    }

    /// One forwarded call of `vendor`: `total` from arrival to response
    /// head, `vendor_time` of it spent waiting on the vendor.
    pub fn timed(&self, vendor: &str, total: Duration, vendor_time: Duration) {
        let label = VendorLabel {
            vendor: vendor.to_string(),
        };
        self.vendor_time
            .get_or_create(&label)
            .observe(vendor_time.as_secs_f64());
        self.overhead
            .get_or_create(&label)
            .observe(total.saturating_sub(vendor_time).as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.policy_version.set(self.policy.version());
        let held = (self.gauges.leases)();
        self.leases.set(held.leases);
        self.lease_available.set(held.available_micros);
        self.lease_reserved.set(held.reserved_micros);
        let (pending, lag) = self.gauges.pending_spend.backlog();
        self.spend_pending.set(pending as i64);
        self.spend_lag.set(lag.as_secs_f64());
        self.connected
            .set(i64::from((self.gauges.control_plane_connected)()));
        let dropped = keycap_telemetry::dropped_spans();
        self.spans_dropped
            .inc_by(dropped.saturating_sub(self.spans_dropped.get()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves.
/// Also answers `/livez` and `/readyz` (`ready` says whether the proxy can
/// serve), so a balancer can probe the proxy away from agent traffic.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    ready: Arc<dyn Fn() -> Result<(), &'static str> + Send + Sync>,
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
        let ready = ready.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let metrics = metrics.clone();
            let ready = ready.clone();
            async move { Ok::<_, Infallible>(answer(&metrics, &*ready, &req)) }
        });
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn answer(
    metrics: &Metrics,
    ready: &(dyn Fn() -> Result<(), &'static str> + Send + Sync),
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let health = match req.uri().path() {
        "/livez" => Some((StatusCode::OK, r#"{"status":"ok"}"#.to_string())),
        "/readyz" => Some(crate::proxy::health_answer(ready())),
        _ => None,
    };
    if let Some((status, body)) = health {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        return r;
    }
    if req.uri().path() != "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        return r;
    }
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok());
    let (content_type, body) = keycap_telemetry::exposition::negotiate(metrics.render(), accept);
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pricing::Catalog;

    fn gauges(connected: bool) -> Gauges {
        Gauges {
            leases: Arc::new(|| HeldLeases {
                leases: 2,
                available_micros: 7_000_000,
                reserved_micros: 1_000_000,
            }),
            pending_spend: Arc::new(Pending::default()),
            control_plane_connected: Arc::new(move || connected),
        }
    }

    #[test]
    fn gauges_are_read_at_each_scrape() {
        let m = Metrics::new(PolicyCache::new(Catalog::builtin()), gauges(false));
        let text = m.render();
        for line in [
            "keycap_proxy_leases 2\n",
            "keycap_proxy_lease_available_micros 7000000\n",
            "keycap_proxy_lease_reserved_micros 1000000\n",
            "keycap_proxy_spend_events_pending 0\n",
            "keycap_proxy_spend_delivery_lag_seconds 0.0\n",
            "keycap_proxy_control_plane_connected 0\n",
        ] {
            assert!(text.contains(line), "{line}: {text}");
        }
        let m = Metrics::new(PolicyCache::new(Catalog::builtin()), gauges(true));
        assert!(m
            .render()
            .contains("keycap_proxy_control_plane_connected 1\n"));
    }

    #[test]
    fn counts_land_under_their_labels() {
        let m = Metrics::new(PolicyCache::new(Catalog::builtin()), gauges(true));
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
