//! W3C trace context (`traceparent`, `tracestate`) in and out of this process.
//!
//! - A request that arrives with a `traceparent` (from a client or a balancer) continues that trace: its span's
//!   parent is the caller's span ([`continue_trace`]).
//! - A call this process makes (to a host service) carries the trace context of the span making it
//!   ([`inject`]), so the callee's spans join the trace.
//! - A decision records the `traceparent` of the span that took it in its event's metadata; the reconciler's span
//!   for the job the decision planned continues it, so that one trace shows a request and the side effects it caused.
//!
//! The spans are `tracing` spans; their trace and span ids come from the OpenTelemetry layer the binary installs
//! (`whist_api::telemetry`). Without that layer (a library test) there is no trace context: nothing is sent or
//! recorded, and nothing fails.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header that carries the trace id, the caller's span id and the sampling flag.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header that carries vendors' trace state alongside.
pub const TRACESTATE: &str = "tracestate";

/// Makes `span` continue the trace of `traceparent` (with its `tracestate`). A missing or malformed value leaves the
/// span the root of a trace of its own. Call it before the span is first entered.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert(TRACEPARENT.to_string(), traceparent.to_string());
    if let Some(tracestate) = tracestate {
        carrier.insert(TRACESTATE.to_string(), tracestate.to_string());
    }
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        // Refused only for a span already entered, whose trace is then its own: nothing to undo.
        let _ = span.set_parent(context);
    }
}

/// The trace context of `span` as W3C headers (`traceparent`, and `tracestate` when there is one); empty when the
/// span has no trace context.
pub fn headers_of(span: &tracing::Span) -> HashMap<String, String> {
    let context = span.context();
    let mut carrier = HashMap::with_capacity(2);
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut carrier);
    }
    carrier
}

/// The `traceparent` of the current span, if it has a trace context: what a decision records, what a call sends.
pub fn current_traceparent() -> Option<String> {
    headers_of(&tracing::Span::current()).remove(TRACEPARENT)
}

/// `request` with the current span's trace context as headers.
pub fn inject(mut request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    for (name, value) in headers_of(&tracing::Span::current()) {
        request = request.header(name, value);
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;

    const CALLER: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn with_tracing(test: impl FnOnce()) {
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, test);
    }

    #[test]
    fn a_span_continues_its_callers_trace_and_passes_it_on_with_its_own_span_id() {
        with_tracing(|| {
            let span = tracing::info_span!("request");
            continue_trace(&span, Some(CALLER), Some("vendor=value"));
            let _entered = span.enter();
            let headers = headers_of(&tracing::Span::current());
            let sent = headers.get(TRACEPARENT).expect("a traceparent");
            assert!(
                sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{sent}"
            );
            assert!(
                !sent.contains("00f067aa0ba902b7"),
                "our own span is the parent now: {sent}"
            );
            assert!(sent.ends_with("-01"), "sampled as the caller said: {sent}");
            assert_eq!(
                headers.get(TRACESTATE).map(String::as_str),
                Some("vendor=value")
            );
        });
    }

    #[test]
    fn a_malformed_traceparent_starts_a_trace_of_its_own() {
        with_tracing(|| {
            let span = tracing::info_span!("request");
            continue_trace(&span, Some("00-not-a-trace-01"), None);
            let _entered = span.enter();
            let sent = current_traceparent().expect("a traceparent");
            assert!(!sent.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
            assert_eq!(sent.len(), 55, "{sent}");
        });
    }

    #[test]
    fn without_a_tracing_layer_nothing_is_sent() {
        let span = tracing::info_span!("request");
        continue_trace(&span, Some(CALLER), None);
        let _entered = span.enter();
        assert_eq!(current_traceparent(), None);
    }
}
