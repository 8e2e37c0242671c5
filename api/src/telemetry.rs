//! Logs (JSON lines through `tracing`) and metrics (Prometheus text).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tracing_subscriber::EnvFilter;

pub mod catalogue;

/// What a server process logs unless `RUST_LOG` says otherwise.
///
/// `stripe_webhook` (async-stripe's webhook parser) is off: it logs an error for every signed event whose object it
/// cannot parse fully, which our adapter accepts on purpose (it reads only the fields it needs) and reports itself.
pub const SERVER_LOGS: &str =
    "info,sqlx=warn,poem=info,hyper=warn,aws_smithy_runtime=warn,stripe_webhook=off";
/// What a benchmark or the load test logs unless `RUST_LOG` says otherwise: warnings only, so that its report is
/// not buried under the lines of the simulated hosts it runs (their servers' start and stop).
pub const TOOL_LOGS: &str = "warn";

/// Installs this process's subscriber: JSON log lines on standard error, each naming its trace and span, and
/// spans as OpenTelemetry spans, exported over OTLP when the environment names an endpoint (see [`crate::traces`]).
/// The filter comes from `RUST_LOG`, else `default_filter` ([`SERVER_LOGS`] or [`TOOL_LOGS`]). Safe to call more
/// than once: later calls do nothing. Call [`crate::traces::flush`] before the process exits.
pub fn init_logs(default_filter: &str) {
    use tracing_subscriber::layer::{Layer as _, SubscriberExt as _};
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let (spans, export) = crate::traces::layer();
    let logs = tracing_subscriber::fmt::layer()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_writer(std::io::stderr)
        .map_event_format(crate::traces::WithTraceIds);
    let installed = tracing_subscriber::registry()
        .with(filter)
        // Spans only: events stay in the logs, not copied into spans.
        .with(
            spans.with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                metadata.is_span()
            })),
        )
        .with(logs)
        .try_init()
        .is_ok();
    if installed {
        match export {
            crate::traces::Export::Off => {}
            crate::traces::Export::Otlp => tracing::info!("exporting spans over OTLP/HTTP"),
            crate::traces::Export::Failed(reason) => {
                tracing::error!(error = %reason, "spans cannot be exported: no OTLP exporter for the endpoint")
            }
        }
    }
}

/// The process-wide Prometheus recorder (installed on first use): every metric of [`catalogue::CATALOGUE`]
/// described (`# HELP`) and, for a histogram, with its own buckets; `whist_build_info` set to 1.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = prometheus_recorder();
            catalogue::describe_all(&recorder);
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); this handle then renders nothing new,
            // which is the right behaviour for a process that chose its own recorder.
            let _ = metrics::set_global_recorder(recorder);
            metrics::gauge!("whist_build_info", "version" => env!("CARGO_PKG_VERSION"),
                "git_commit" => crate::GIT_COMMIT)
            .set(1.0);
            handle
        })
        .clone()
}

/// A recorder with each histogram's buckets from the catalogue. A histogram missing from it (a test fails then)
/// still gets the seconds buckets rather than becoming a summary.
fn prometheus_recorder() -> PrometheusRecorder {
    let mut builder = PrometheusBuilder::new().set_buckets(catalogue::SECONDS_BUCKETS);
    for metric in catalogue::CATALOGUE {
        if let catalogue::Kind::Histogram(buckets) = metric.kind {
            builder = builder.and_then(|builder| {
                builder.set_buckets_for_metric(Matcher::Full(metric.name.to_string()), buckets)
            });
        }
    }
    // Only empty buckets are refused, and the catalogue has none.
    builder
        .map(PrometheusBuilder::build_recorder)
        .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder())
}

/// An error and every cause under it, `outer: cause: root cause`, for a log field (`error = %Chain(&error)`): the
/// `Display` of an error alone says what failed, its sources say why.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(formatter, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// Logs a failure with its whole cause chain; the caller answers with a generic body.
pub fn log_failure(context: &str, error: &(dyn std::error::Error + 'static)) {
    tracing::error!(error = %Chain(error), "{context}");
}
