//! keycap's logs and traces, set up the same way by both planes and the
//! `keycap dev` launcher: the global `tracing` subscriber (text or JSON
//! lines), OpenTelemetry trace export over OTLP/gRPC when the standard
//! `OTEL_*` variables ask for it, and W3C trace context in and out of HTTP
//! headers and gRPC metadata.
//!
//! Export never slows or fails a call: ended spans go into a bounded queue
//! that a task drains in batches; a span that does not fit, or whose batch
//! the collector does not take, is dropped and counted
//! (`dropped_spans`). Nothing here reads or records a secret: callers
//! choose the attributes.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer as _};

pub mod exposition;
mod json;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object a line, with the trace and span ids of the span it
    /// was written in.
    Json,
}

/// Spans waiting for export beyond this many are dropped (and counted):
/// `OTEL_BSP_MAX_QUEUE_SIZE`, 2048 by default as the specification says.
const DEFAULT_QUEUE: usize = 2048;
/// At most this many spans go to the collector in one export.
const BATCH: usize = 512;
/// A batch leaves at least this often while spans wait
/// (`OTEL_BSP_SCHEDULE_DELAY`, milliseconds).
const DEFAULT_DELAY: Duration = Duration::from_secs(1);
/// An export that takes longer is abandoned and its spans counted dropped
/// (`OTEL_BSP_EXPORT_TIMEOUT`, milliseconds).
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Spans dropped since start: the queue was full, or the collector did not
/// take their batch in time.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Whether this process exports traces (`init` found an OTLP endpoint).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether a call whose server span is `span` should open its phase spans.
/// Without export they cost nothing (filtered like any span) and carry
/// the log lines' context; with export, an unsampled call's phases would
/// each be built for the exporter and thrown away — a quarter of the
/// proxy's throughput at a 1% sample — so only a sampled call opens them.
pub fn phase_spans(span: &tracing::Span) -> bool {
    !EXPORTING.load(Ordering::Relaxed) || span.context().span().span_context().is_sampled()
}

/// Spans dropped since start (for the metrics of either plane).
pub fn dropped_spans() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Keeps trace export running; `shutdown` sends what is queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported (an OTLP endpoint is configured).
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends what is queued and stops export.
    pub fn shutdown(&self) {
        if let Some(p) = &self.provider {
            let _ = p.shutdown_with_timeout(Duration::from_secs(2));
        }
    }
}

/// Spans still queued when the process ends are sent first.
impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Installs the global subscriber: `KEYCAP_LOG` (or `default_filter`)
/// filters log lines written as `format`; with `OTEL_EXPORTER_OTLP_ENDPOINT`
/// (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, spans are also exported
/// to it over OTLP/gRPC as `service` (unless `OTEL_SERVICE_NAME` names it),
/// sampled by `OTEL_TRACES_SAMPLER`/`_ARG`, with
/// `OTEL_RESOURCE_ATTRIBUTES`. Must run inside a tokio runtime when
/// exporting.
pub fn init(service: &str, format: LogFormat, default_filter: &str) -> anyhow::Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter =
        || EnvFilter::try_from_env("KEYCAP_LOG").unwrap_or_else(|_| EnvFilter::new(default_filter));
    let provider = if export_configured() {
        Some(provider(service)?)
    } else {
        None
    };
    EXPORTING.store(provider.is_some(), Ordering::Relaxed);
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("keycap"))
            .with_filter(EnvFilter::new("info"))
    });
    let registry = tracing_subscriber::registry().with(otel);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(filter()),
            )
            .try_init()?,
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .event_format(json::JsonLines)
                    .with_filter(filter()),
            )
            .try_init()?,
    }
    Ok(Telemetry { provider })
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Whether the `OTEL_*` variables ask for trace export.
fn export_configured() -> bool {
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    !disabled
        && (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok()?.trim().parse().ok()
}

fn provider(service: &str) -> anyhow::Result<SdkTracerProvider> {
    let mut resource = Resource::builder();
    if !env_set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service.to_string());
    }
    let resource = resource.build();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    exporter.set_resource(&resource);
    let queue = env_number("OTEL_BSP_MAX_QUEUE_SIZE")
        .map_or(DEFAULT_QUEUE, |n| n as usize)
        .max(1);
    let delay = env_number("OTEL_BSP_SCHEDULE_DELAY").map_or(DEFAULT_DELAY, Duration::from_millis);
    let timeout =
        env_number("OTEL_BSP_EXPORT_TIMEOUT").map_or(DEFAULT_EXPORT_TIMEOUT, Duration::from_millis);
    let processor = QueuedExport::start(exporter, queue, delay, timeout);
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_span_processor(processor)
        .build())
}

/// Ended spans into a bounded queue; a task exports them in batches.
#[derive(Debug)]
struct QueuedExport {
    queue: tokio::sync::mpsc::Sender<Job>,
}

enum Job {
    Span(Box<SpanData>),
    Flush(std::sync::mpsc::SyncSender<()>),
}

impl QueuedExport {
    fn start<E: SpanExporter + 'static>(
        exporter: E,
        queue: usize,
        delay: Duration,
        timeout: Duration,
    ) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel(queue);
        tokio::spawn(async move {
            let mut batch: Vec<SpanData> = Vec::with_capacity(BATCH);
            let mut tick = tokio::time::interval(delay);
            let mut flushed = Vec::new();
            loop {
                let full = tokio::select! {
                    job = rx.recv() => match job {
                        Some(Job::Span(s)) => { batch.push(*s); batch.len() >= BATCH }
                        Some(Job::Flush(done)) => { flushed.push(done); true }
                        None => { export(&exporter, std::mem::take(&mut batch), timeout).await; break }
                    },
                    _ = tick.tick() => true,
                };
                if full && !batch.is_empty() {
                    export(&exporter, std::mem::take(&mut batch), timeout).await;
                }
                for done in flushed.drain(..) {
                    let _ = done.send(());
                }
            }
        });
        QueuedExport { queue: tx }
    }
}

async fn export<E: SpanExporter>(exporter: &E, batch: Vec<SpanData>, timeout: Duration) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    match tokio::time::timeout(timeout, exporter.export(batch)).await {
        Ok(Ok(())) => {}
        _ => {
            DROPPED.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl SpanProcessor for QueuedExport {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        if self.queue.try_send(Job::Span(Box::new(span))).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if self.queue.try_send(Job::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(Duration::from_secs(2));
        }
        Ok(())
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if self.queue.try_send(Job::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
        Ok(())
    }
}

/// The trace context an agent or a peer sent in HTTP headers
/// (`traceparent`, `tracestate`); empty when none or invalid.
pub fn extract_http(headers: &http::HeaderMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderReader(headers)))
}

/// Writes `span`'s trace context into `headers` (`traceparent`, and
/// `tracestate` when there is one).
pub fn inject_http(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderWriter(headers))
    });
}

/// Writes the current span's trace context into a gRPC request's metadata,
/// so the peer's spans join the trace.
pub fn inject_grpc(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    let mut headers = http::HeaderMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderWriter(&mut headers));
    for (name, value) in &headers {
        if let Ok(v) = tonic::metadata::MetadataValue::try_from(value.as_bytes()) {
            metadata.insert(
                tonic::metadata::MetadataKey::from_bytes(name.as_str().as_bytes())
                    .expect("traceparent and tracestate are valid metadata keys"),
                v,
            );
        }
    }
}

/// Makes the context in `headers` (a gRPC request's or an HTTP request's)
/// the parent of `span`.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    let parent = extract_http(headers);
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// Names `span` `name` in its export, whenever it learns its name (the
/// `otel.name` field is read only while the span is being built).
pub fn rename(span: &tracing::Span, name: String) {
    span.context().span().update_name(name);
}

/// `span`'s W3C `traceparent`, when it is sampled for export: what a
/// record handed on carries so its consumer's span joins the trace.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// A span for work done on behalf of a record that carried `traceparent`
/// (see `traceparent`): the span joins that trace as its child. An empty
/// or invalid `traceparent` leaves the span where it was.
pub fn continue_from(span: &tracing::Span, traceparent: &str) {
    if traceparent.is_empty() {
        return;
    }
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(traceparent) {
        headers.insert("traceparent", v);
        continue_trace(span, &headers);
    }
}

/// The trace id of `span` (32 lowercase hex digits) when it is traced.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

struct HeaderReader<'a>(&'a http::HeaderMap);

impl Extractor for HeaderReader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // Exactly one line: a repeated traceparent is no trace at all.
        let mut all = self.0.get_all(key).iter();
        let first = all.next()?;
        if all.next().is_some() {
            return None;
        }
        first.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderWriter<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderWriter<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
