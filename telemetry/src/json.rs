//! `--log-format json`: one JSON object a line, with the trace and span
//! ids of the span the line was written in, so a log line can be found
//! from its trace and back.

use std::fmt;

use opentelemetry::trace::{SpanContext, TraceContextExt};
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::registry::LookupSpan;

pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                .into(),
        );
        line.insert("level".into(), meta.level().as_str().into());
        line.insert("target".into(), meta.target().into());
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        if let Some(message) = fields.0.remove("message") {
            line.insert("message".into(), message);
        }
        if !fields.0.is_empty() {
            line.insert("fields".into(), Value::Object(fields.0));
        }
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
        }
        if let Some(sc) = traced_context(ctx) {
            line.insert("trace_id".into(), sc.trace_id().to_string().into());
            line.insert("span_id".into(), sc.span_id().to_string().into());
        }
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// The trace and span a line belongs to: the current span's when it is
/// traced, else the nearest traced span it sits in (a span only the log
/// filter lets through, such as a library's debug span, has no trace of
/// its own but lies inside one). Sampled out or not: the ids are there
/// whenever traces are on, so a line can be tied to its call either way.
fn traced_context<S, N>(ctx: &FmtContext<'_, S, N>) -> Option<SpanContext>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    let valid = |cx: opentelemetry::Context| {
        let sc = cx.span().span_context().clone();
        sc.is_valid().then_some(sc)
    };
    if let Some(sc) = valid(tracing::Span::current().context()) {
        return Some(sc);
    }
    let scope: Vec<tracing::span::Id> = ctx.lookup_current()?.scope().map(|s| s.id()).collect();
    tracing::dispatcher::get_default(|dispatch| {
        scope
            .iter()
            .find_map(|id| valid(tracing_opentelemetry::get_otel_context(id, dispatch)?))
    })
}

struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use serde_json::Value;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::{EnvFilter, Layer as _};

    use super::JsonLines;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The binaries install their subscriber globally, and so does this
    /// test (a scoped one is not reached from inside its own formatting):
    /// traces on, half the calls sampled out, the log filter letting
    /// through a debug span the trace filter does not.
    #[test]
    fn every_line_inside_a_span_names_its_trace_and_span() {
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::TraceIdRatioBased(0.5))
            .build();
        let out = Lines::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::registry()
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer("test"))
                    .with_filter(EnvFilter::new("info")),
            )
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(move || writer.clone())
                    .event_format(JsonLines)
                    .with_filter(EnvFilter::new("debug")),
            );
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        const CALLS: usize = 40;
        for _ in 0..CALLS {
            tracing::info!("before any span");
            let call = tracing::info_span!("call");
            let _call = call.enter();
            tracing::info!("in the call");
            let inner = tracing::debug_span!("library detail");
            let _inner = inner.enter();
            tracing::debug!("in a span only logs see");
            tracing::warn!("a warning in it");
        }
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(lines.len(), 4 * CALLS);
        let mut traces = std::collections::BTreeSet::new();
        for call in lines.chunks(4) {
            assert!(call[0].get("trace_id").is_none(), "{}", call[0]);
            let trace = call[1]["trace_id"].as_str().expect("trace_id");
            assert_eq!(trace.len(), 32, "{}", call[1]);
            traces.insert(trace.to_string());
            for line in &call[1..] {
                assert!(line.get("span").is_some(), "{line}");
                assert_eq!(line["trace_id"], trace, "{line}");
                assert_eq!(line["span_id"].as_str().map(str::len), Some(16), "{line}");
            }
            // The debug span has no trace of its own: its lines name the
            // call's span.
            assert_eq!(call[2]["span_id"], call[1]["span_id"]);
        }
        assert_eq!(traces.len(), CALLS, "one trace per call");
    }
}
