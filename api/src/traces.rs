//! Traces: every `tracing` span of this process is an OpenTelemetry span, so that
//!
//! - a request continues the W3C trace context its caller sent, and the calls and jobs it causes continue it in
//!   turn (`whist_adapters::trace_context`);
//! - every log line names the trace and the span it was written in (`trace_id`, `span_id`), so that logs and traces
//!   can be joined;
//! - with `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, spans are exported over
//!   OTLP/HTTP (protobuf) in batches, as any OpenTelemetry collector takes them. `OTEL_SERVICE_NAME` names the
//!   service (default `whist`); the other `OTEL_EXPORTER_OTLP_*` variables (headers, timeout, compression) apply
//!   as the OpenTelemetry specification defines them.
//!
//! Without an endpoint, spans still get trace and span ids (for the logs and the headers) and are exported nowhere.

use std::fmt::Write as _;
use std::sync::Mutex;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::{Event, Subscriber};
use tracing_opentelemetry::{OpenTelemetryLayer, OtelData};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The variables whose presence switches the export on (the specification's names).
const ENDPOINT_VARIABLES: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// The tracer provider of this process, kept to flush its last spans at exit ([`flush`]).
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Where this process's spans go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Export {
    /// Nowhere: spans only carry ids.
    Off,
    /// To the OTLP/HTTP endpoint named by the environment.
    Otlp,
    /// The environment names an endpoint, but no exporter could be built for it (the reason): spans carry ids and
    /// go nowhere, and the process says so at start.
    Failed(String),
}

/// The OpenTelemetry layer for this process's subscriber, with where its spans go. Export is on when the
/// environment names an OTLP endpoint.
pub fn layer<S>() -> (OpenTelemetryLayer<S, SdkTracer>, Export)
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "whist".to_string());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let wanted = ENDPOINT_VARIABLES
        .iter()
        .any(|variable| std::env::var(variable).is_ok_and(|value| !value.is_empty()));
    let export = if wanted {
        match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => {
                builder = builder.with_batch_exporter(exporter);
                Export::Otlp
            }
            Err(error) => Export::Failed(crate::telemetry::Chain(&error).to_string()),
        }
    } else {
        Export::Off
    };
    let provider = builder.build();
    let tracer = provider.tracer("whist");
    if let Ok(mut kept) = PROVIDER.lock() {
        *kept = Some(provider);
    }
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Only ids and timings: span fields are attributes already, events stay in the logs.
        .with_tracked_inactivity(false)
        .with_location(false)
        .with_threads(false);
    (layer, export)
}

/// Exports the spans still waiting in the batch (at most a few seconds): call once before the process exits.
pub fn flush() {
    let provider = PROVIDER.lock().ok().and_then(|mut kept| kept.take());
    if let Some(provider) = provider {
        if let Err(error) = provider.shutdown() {
            tracing::warn!(error = %error, "spans could not all be exported at exit");
        }
    }
}

/// A log line formatter that adds the trace and span ids of the span the event was written in to the JSON object
/// the inner formatter writes (`"trace_id"`, `"span_id"`, W3C hex): the same ids the span is exported with.
pub struct WithTraceIds<F>(pub F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
    N: for<'writer> FormatFields<'writer> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let ids = context.parent_span().and_then(|span| {
            let extensions = span.extensions();
            let data = extensions.get::<OtelData>()?;
            Some((data.trace_id()?, data.span_id()?))
        });
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(context, writer, event);
        };
        let mut line = String::with_capacity(256);
        self.0
            .format_event(context, Writer::new(&mut line), event)?;
        // The inner formatter writes one JSON object and a newline: the ids go in before its closing brace.
        let body = line.trim_end_matches('\n');
        match body.strip_suffix('}') {
            Some(open) => {
                let mut out = String::with_capacity(line.len() + 64);
                out.push_str(open);
                write!(
                    out,
                    ",\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\"}}"
                )?;
                out.push('\n');
                writer.write_str(&out)
            }
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;

    /// Collects what the fmt layer writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut lines) = self.0.lock() {
                lines.extend_from_slice(bytes);
            }
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_log_line_in_a_span_names_its_trace_and_span_and_one_outside_names_none() {
        let lines = Lines::default();
        let writer = lines.clone();
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(move || writer.clone())
                    .map_event_format(WithTraceIds),
            );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", request_id = "r-1");
            whist_adapters::trace_context::continue_trace(
                &span,
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                None,
            );
            span.in_scope(|| tracing::info!(answer = 42, "inside"));
            tracing::info!("outside");
        });
        let text = String::from_utf8(lines.0.lock().expect("the lines").clone()).expect("UTF-8");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is one JSON object"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        let span_id = lines[0]["span_id"].as_str().expect("a span id");
        assert_eq!(span_id.len(), 16);
        assert_ne!(
            span_id, "00f067aa0ba902b7",
            "the line's own span, not the caller's"
        );
        assert_eq!(lines[0]["fields"]["answer"], 42);
        assert_eq!(lines[0]["span"]["request_id"], "r-1");
        assert!(lines[1].get("trace_id").is_none(), "{}", lines[1]);
    }
}
