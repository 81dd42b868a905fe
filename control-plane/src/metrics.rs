//! The control plane's Prometheus metrics, served on their own listener
//! (`--metrics-listen`), never on the API's.
//!
//! Labels carry only bounded values keycap chose: gRPC service and method
//! names of keycap's own services (`unknown` for anything else), status
//! codes, store operations (the `Store` trait's method names), kinds of
//! change, and the node ids of connected proxies (the fleet's own names).
//! Never a key, a token, a node address or a path.
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

/// How a counted thing ended: a spend event `applied` or a `duplicate`; a
/// batch written ahead of the ledger head's lock `committed` or `missed`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabel {
    /// The `Store` method.
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeLabel {
    /// `revocation`, `key_creation`, `vendor_write`, `vendor_delete` or
    /// `key_enforce`.
    change: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

/// A change proxies must confirm before the call that made it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Revocation,
    KeyCreation,
    VendorWrite,
    VendorDelete,
    /// A key switched from observe mode to enforcement.
    KeyEnforce,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Revocation => "revocation",
            ChangeKind::KeyCreation => "key_creation",
            ChangeKind::VendorWrite => "vendor_write",
            ChangeKind::VendorDelete => "vendor_delete",
            ChangeKind::KeyEnforce => "key_enforce",
        }
    }
}

/// The fleet as the database shows it at a scrape
/// (`Control::fleet_state`).
#[derive(Clone, Debug, Default)]
pub struct FleetState {
    /// The change log's newest version in the database.
    pub head: i64,
    /// The newest version this replica has taken from it.
    pub replica_version: i64,
    /// Connected proxies and the version each has applied.
    pub proxies: Vec<(String, i64)>,
    /// Live leases, fleet-wide, and what they hold unreported.
    pub leases: i64,
    pub lease_unreported_micros: i64,
}

pub struct ControlMetrics {
    registry: Registry,
    requests: Family<RpcCodeLabel, Counter>,
    durations: Family<RpcLabel, Histogram>,
    spend_events: Family<ResultLabel, Counter>,
    appends_ahead: Family<ResultLabel, Counter>,
    spans_dropped: Counter,
    store_queries: Family<StoreLabel, Histogram>,
    confirmations: Family<ChangeLabel, Histogram>,
    unconfirmed: Family<ChangeLabel, Counter>,
    proxies: Gauge,
    proxy_versions: Family<NodeLabel, Gauge>,
    change_log_head: Gauge,
    change_log_lag: Gauge,
    leases: Gauge,
    lease_unreported: Gauge,
}

/// This process's metrics.
pub static METRICS: LazyLock<ControlMetrics> = LazyLock::new(ControlMetrics::new);

/// The services whose calls are counted by name.
const SERVICES: [&str; 9] = [
    "keycap.v1.VendorService",
    "keycap.v1.KeyService",
    "keycap.v1.AuditService",
    "keycap.v1.AdminTokenService",
    "keycap.v1.WebhookService",
    "keycap.v1.SimulateService",
    "keycap.v1.SuggestService",
    "keycap.v1.FleetService",
    "keycap.v1.CredentialService",
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
        let spend_events = Family::<ResultLabel, Counter>::default();
        registry.register(
            "spend_events_ingested",
            "Spend events proxies reported: applied, or a duplicate of one already applied",
            spend_events.clone(),
        );
        let appends_ahead = Family::<ResultLabel, Counter>::default();
        registry.register(
            "ledger_appends_ahead",
            "Spend batches written ahead of the ledger head's lock behind another in flight: \
             committed, or missed (another replica appended in between; appended again under the lock)",
            appends_ahead.clone(),
        );
        let spans_dropped = Counter::default();
        registry.register(
            "trace_spans_dropped",
            "Trace spans dropped: the export queue was full or the collector did not take them",
            spans_dropped.clone(),
        );
        let store_queries = Family::<StoreLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 16))
        });
        registry.register_with_unit(
            "store_query_duration",
            "Time of one store operation (its queries and transaction), by operation",
            prometheus_client::registry::Unit::Seconds,
            store_queries.clone(),
        );
        let confirmations = Family::<ChangeLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register_with_unit(
            "change_confirmation_duration",
            "Time from a change's write until every connected proxy confirmed it (or the wait ended), by kind of change",
            prometheus_client::registry::Unit::Seconds,
            confirmations.clone(),
        );
        let unconfirmed = Family::<ChangeLabel, Counter>::default();
        // Each kind is there from the start, at 0, so `increase()` over it
        // sees the first change that stays unconfirmed.
        for kind in [
            ChangeKind::Revocation,
            ChangeKind::KeyCreation,
            ChangeKind::VendorWrite,
            ChangeKind::VendorDelete,
            ChangeKind::KeyEnforce,
        ] {
            let _ = unconfirmed.get_or_create(&ChangeLabel {
                change: kind.as_str(),
            });
        }
        registry.register(
            "changes_unconfirmed",
            "Changes some connected proxy had not confirmed when the wait for them ended, by kind of change",
            unconfirmed.clone(),
        );
        let proxies = Gauge::default();
        registry.register(
            "proxies_connected",
            "Proxies whose policy stream some replica serves now",
            proxies.clone(),
        );
        let proxy_versions = Family::<NodeLabel, Gauge>::default();
        registry.register(
            "proxy_policy_version",
            "Change-log version each connected proxy has applied, by node id",
            proxy_versions.clone(),
        );
        let change_log_head = Gauge::default();
        registry.register(
            "change_log_version",
            "Newest change-log version in the database",
            change_log_head.clone(),
        );
        let change_log_lag = Gauge::default();
        registry.register(
            "change_log_lag_versions",
            "Change-log versions in the database this replica has not yet sent its proxies",
            change_log_lag.clone(),
        );
        let leases = Gauge::default();
        registry.register(
            "leases_outstanding",
            "Live budget leases, fleet-wide",
            leases.clone(),
        );
        let lease_unreported = Gauge::default();
        registry.register(
            "leases_outstanding_micros",
            "Budget live leases hold that their proxies have not reported spent, in micro-dollars",
            lease_unreported.clone(),
        );
        ControlMetrics {
            registry,
            requests,
            durations,
            spend_events,
            appends_ahead,
            spans_dropped,
            store_queries,
            confirmations,
            unconfirmed,
            proxies,
            proxy_versions,
            change_log_head,
            change_log_lag,
            leases,
            lease_unreported,
        }
    }

    /// One store operation `op` took `took`.
    pub fn store_query(&self, op: &'static str, took: Duration) {
        self.store_queries
            .get_or_create(&StoreLabel { op })
            .observe(took.as_secs_f64());
    }

    /// A change of `kind` waited `took` for the proxies; `all` whether
    /// every connected one confirmed it.
    pub fn confirmed(&self, kind: ChangeKind, took: Duration, all: bool) {
        let label = ChangeLabel {
            change: kind.as_str(),
        };
        self.confirmations
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        if !all {
            self.unconfirmed.get_or_create(&label).inc();
        }
    }

    /// The fleet's state as of this scrape.
    pub fn fleet(&self, state: &FleetState) {
        self.proxies.set(state.proxies.len() as i64);
        self.proxy_versions.clear();
        for (node, version) in &state.proxies {
            self.proxy_versions
                .get_or_create(&NodeLabel { node: node.clone() })
                .set(*version);
        }
        self.change_log_head.set(state.head);
        self.change_log_lag
            .set((state.head - state.replica_version).max(0));
        self.leases.set(state.leases);
        self.lease_unreported.set(state.lease_unreported_micros);
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
            .get_or_create(&ResultLabel { result: "applied" })
            .inc_by(applied);
        self.spend_events
            .get_or_create(&ResultLabel {
                result: "duplicate",
            })
            .inc_by(duplicates);
    }

    /// One spend batch written ahead of the ledger head's lock
    /// (`ledger::pipeline`): committed so, or missed.
    pub fn append_ahead(&self, committed: bool) {
        let result = if committed { "committed" } else { "missed" };
        self.appends_ahead
            .get_or_create(&ResultLabel { result })
            .inc();
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

/// `GET /metrics` on its own listener. The fleet's gauges are read from
/// the database at each scrape; when it does not answer, they keep their
/// last values and the rest is served.
pub fn router(control: std::sync::Arc<crate::service::Control>) -> axum::Router {
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: http::HeaderMap| async move {
            let state = tokio::time::timeout(Duration::from_secs(2), control.fleet_state()).await;
            match state {
                Ok(Ok(state)) => METRICS.fleet(&state),
                Ok(Err(e)) => tracing::warn!(error = %e, "metrics: fleet state not read"),
                Err(_) => tracing::warn!("metrics: fleet state not read within 2 s"),
            }
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
        m.append_ahead(true);
        m.append_ahead(false);
        m.append_ahead(true);
        let text = m.render();
        for line in [
            "keycap_control_grpc_requests_total{service=\"keycap.v1.FleetService\",method=\"GrantLease\",code=\"0\"} 1",
            "keycap_control_grpc_requests_total{service=\"keycap.v1.FleetService\",method=\"GrantLease\",code=\"9\"} 1",
            "keycap_control_grpc_request_duration_seconds_count{service=\"keycap.v1.FleetService\",method=\"GrantLease\"} 2",
            "keycap_control_spend_events_ingested_total{result=\"applied\"} 3",
            "keycap_control_ledger_appends_ahead_total{result=\"committed\"} 2",
            "keycap_control_ledger_appends_ahead_total{result=\"missed\"} 1",
            "keycap_control_build_info{version=\"",
        ] {
            assert!(text.contains(line), "{line} not in {text}");
        }
    }
}
