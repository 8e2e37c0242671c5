//! Logs (JSON lines through `tracing`) and metrics (Prometheus text).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Installs the JSON log subscriber for this process (filter from `RUST_LOG`, default `info`). Safe to call more
/// than once: later calls do nothing.
pub fn init_logs() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,sqlx=warn,poem=info,hyper=warn,aws_smithy_runtime=warn")
    });
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The process-wide Prometheus recorder (installed on first use).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .map(PrometheusBuilder::build_recorder)
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); this handle then renders nothing new,
            // which is the right behaviour for a process that chose its own recorder.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
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
