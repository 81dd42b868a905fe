//! An OTLP trace collector of the tests' own: a tonic server of the OTLP
//! trace service (from `opentelemetry-proto`) on 127.0.0.1 that keeps every
//! span it is sent, so a test can follow one trace through keycap's
//! processes. It can also be stopped, to show a dead collector fails no
//! call.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;

use crate::harness::{wait_for, within};

/// One exported span, flattened for assertions.
#[derive(Clone, Debug)]
pub struct CollectedSpan {
    /// The `service.name` of the process that sent it.
    pub service: String,
    pub name: String,
    /// Lowercase hex, as in `traceparent`.
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    /// `SPAN_KIND_SERVER`, `SPAN_KIND_CLIENT`, `SPAN_KIND_INTERNAL`, ...
    pub kind: String,
    /// Every attribute, its value as text.
    pub attributes: BTreeMap<String, String>,
}

impl CollectedSpan {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attributes.get(name).map(String::as_str)
    }
}

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<CollectedSpan>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .map(value_text)
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(CollectedSpan {
                        service: service.clone(),
                        kind: opentelemetry_proto::tonic::trace::v1::span::SpanKind::try_from(
                            s.kind,
                        )
                        .map(|k| k.as_str_name().to_string())
                        .unwrap_or_default(),
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        attributes: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), value_text(a)))
                            .collect(),
                    });
                }
            }
        }
        self.0.lock().expect("collector lock").extend(got);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value_text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// A running collector.
pub struct Collector {
    addr: SocketAddr,
    received: Received,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Collector {
    pub async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("collector: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("collector address");
        let received = Received::default();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let service = TraceServiceServer::new(received.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async {
                        let _ = stopped.await;
                    },
                ),
        );
        Collector {
            addr,
            received,
            stop: Some(stop),
        }
    }

    /// `OTEL_EXPORTER_OTLP_ENDPOINT` for a process that should export here.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `OTEL_*` environment that exports every span here, at once.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), self.endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        ]
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<CollectedSpan> {
        self.received.0.lock().expect("collector lock").clone()
    }

    /// Waits (up to 15 s) until the spans of `trace_id` include one named
    /// `name` from `service` for each `(service, name)` in `names`; returns
    /// that trace's spans.
    pub async fn wait_trace(&self, trace_id: &str, names: &[(&str, &str)]) -> Vec<CollectedSpan> {
        let got = wait_for(within(Duration::from_secs(15)), || async {
            let spans: Vec<CollectedSpan> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            names
                .iter()
                .all(|(service, name)| {
                    spans
                        .iter()
                        .any(|s| s.service == *service && s.name == *name)
                })
                .then_some(spans)
        })
        .await;
        got.unwrap_or_else(|| {
            panic!(
                "trace {trace_id} never had spans {names:?}; got {:#?}",
                self.spans()
            )
        })
    }

    /// Stops answering: later exports fail to connect.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Counts the spans it is sent and keeps none: the collector for a load
/// that exports far more than a test would look at (bench/run.sh's traced
/// runs, through `keycap-otlp-sink`). With a delay it is a slow collector:
/// each export is answered only after it, as from a collector that is
/// overloaded or far away.
#[derive(Clone, Default)]
pub struct SpanCounter {
    spans: Arc<std::sync::atomic::AtomicU64>,
    delay: Duration,
}

impl SpanCounter {
    /// A collector that answers each export after `delay`.
    pub fn answering_after(delay: Duration) -> Self {
        SpanCounter {
            delay,
            ..SpanCounter::default()
        }
    }

    /// Spans received so far.
    pub fn count(&self) -> u64 {
        self.spans.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Serves the OTLP trace service on `listener` until the process ends.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
    ) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(self))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    }
}

#[tonic::async_trait]
impl TraceService for SpanCounter {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .map(|ss| ss.spans.len())
            .sum();
        self.spans
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}
