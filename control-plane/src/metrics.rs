//! The control plane's Prometheus metrics, served on their own listener
//! (`--metrics-listen`), never on the API's.
//!
//! Labels carry only bounded values keycap chose: gRPC service and method
//! names of keycap's own services (`unknown` for anything else) and status
//! codes. Never a key, a token, a node address or a path.
//!
//! One set per process (a control plane is one per process), so the gRPC
//! layer and the handlers reach it without threading it through.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabel {
    service: &'static str,
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcCodeLabel {
    service: &'static str,
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SpendLabel {
    /// `applied` or `duplicate`.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

pub struct ControlMetrics {
    registry: Registry,
    requests: Family<RpcCodeLabel, Counter>,
    durations: Family<RpcLabel, Histogram>,
    spend_events: Family<SpendLabel, Counter>,
    spans_dropped: Counter,
}

/// This process's metrics.
pub static METRICS: LazyLock<ControlMetrics> = LazyLock::new(ControlMetrics::new);

/// The services whose calls are counted by name.
const SERVICES: [&str; 6] = [
    "keycap.v1.VendorService",
    "keycap.v1.KeyService",
    "keycap.v1.AuditService",
    "keycap.v1.AdminTokenService",
    "keycap.v1.WebhookService",
    "keycap.v1.FleetService",
];

/// `service`, if it is one of keycap's own (a `'static` label), else
/// `unknown`; the method the same way.
pub fn rpc_names(path: &str) -> (&'static str, String) {
    let (service, method) = path
        .trim_start_matches('/')
        .split_once('/')
        .unwrap_or(("", ""));
    match SERVICES.iter().find(|s| **s == service) {
        Some(s)
            if !method.is_empty()
                && method.len() <= 64
                && method.bytes().all(|b| b.is_ascii_alphanumeric()) =>
        {
            (s, method.to_string())
        }
        _ => ("unknown", "unknown".to_string()),
    }
}

impl ControlMetrics {
    fn new() -> ControlMetrics {
        let mut registry = Registry::with_prefix("keycap_control");
        // A gauge at 1 rather than an OpenMetrics info, which the classic
        // text format (and promtool) does not know.
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running keycap-control's version", build);
        let requests = Family::<RpcCodeLabel, Counter>::default();
        registry.register(
            "grpc_requests",
            "gRPC calls answered, by service, method and status code (the head's status; 0 for calls that stream)",
            requests.clone(),
        );
        let durations = Family::<RpcLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register_with_unit(
            "grpc_request_duration",
            "Time from a gRPC call's arrival to its response head",
            prometheus_client::registry::Unit::Seconds,
            durations.clone(),
        );
        let spend_events = Family::<SpendLabel, Counter>::default();
        registry.register(
            "spend_events_ingested",
            "Spend events proxies reported: applied, or a duplicate of one already applied",
            spend_events.clone(),
        );
        let spans_dropped = Counter::default();
        registry.register(
            "trace_spans_dropped",
            "Trace spans dropped: the export queue was full or the collector did not take them",
            spans_dropped.clone(),
        );
        ControlMetrics {
            registry,
            requests,
            durations,
            spend_events,
            spans_dropped,
        }
    }

    /// One gRPC call of `path` answered with `code` after `took`.
    pub fn rpc(&self, path: &str, code: i64, took: Duration) {
        let (service, method) = rpc_names(path);
        self.durations
            .get_or_create(&RpcLabel {
                service,
                method: method.clone(),
            })
            .observe(took.as_secs_f64());
        self.requests
            .get_or_create(&RpcCodeLabel {
                service,
                method,
                code: code.to_string(),
            })
            .inc();
    }

    /// One spend report: `applied` new events, `duplicates` already seen.
    pub fn spend_reported(&self, applied: u64, duplicates: u64) {
        self.spend_events
            .get_or_create(&SpendLabel { result: "applied" })
            .inc_by(applied);
        self.spend_events
            .get_or_create(&SpendLabel {
                result: "duplicate",
            })
            .inc_by(duplicates);
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let dropped = keycap_telemetry::dropped_spans();
        self.spans_dropped
            .inc_by(dropped.saturating_sub(self.spans_dropped.get()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// `GET /metrics` on its own listener.
pub fn router() -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(|headers: http::HeaderMap| async move {
            let accept = headers
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok());
            let (content_type, body) =
                keycap_telemetry::exposition::negotiate(METRICS.render(), accept);
            ([(http::header::CONTENT_TYPE, content_type)], body)
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_keycaps_own_services_are_named() {
        assert_eq!(
            rpc_names("/keycap.v1.FleetService/GrantLease"),
            ("keycap.v1.FleetService", "GrantLease".to_string())
        );
        for path in [
            "/other.Service/Call",
            "/keycap.v1.FleetService/a/b",
            "/keycap.v1.FleetService/",
            "/",
        ] {
            assert_eq!(rpc_names(path).0, "unknown", "{path}");
        }
    }

    #[test]
    fn calls_land_under_service_method_and_code() {
        let m = ControlMetrics::new();
        m.rpc(
            "/keycap.v1.FleetService/GrantLease",
            0,
            Duration::from_millis(2),
        );
        m.rpc(
            "/keycap.v1.FleetService/GrantLease",
            9,
            Duration::from_millis(2),
        );
        m.spend_reported(3, 1);
        let text = m.render();
        for line in [
            "keycap_control_grpc_requests_total{service=\"keycap.v1.FleetService\",method=\"GrantLease\",code=\"0\"} 1",
            "keycap_control_grpc_requests_total{service=\"keycap.v1.FleetService\",method=\"GrantLease\",code=\"9\"} 1",
            "keycap_control_grpc_request_duration_seconds_count{service=\"keycap.v1.FleetService\",method=\"GrantLease\"} 2",
            "keycap_control_spend_events_ingested_total{result=\"applied\"} 3",
            "keycap_control_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line} not in {text}");
        }
    }
}
