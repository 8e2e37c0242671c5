//! What the process's parts reach: [`Context`] for use cases and background workers (the settings, the store, the
//! projections, the services; nothing of HTTP), and [`AppState`] for HTTP handlers (the context plus the metrics
//! handle and the draining flag).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use whist_adapters::config::Settings;
use whist_adapters::store::Database;
use whist_adapters::supervision::BackgroundLoops;
use whist_projections::ProjectionRunner;

use crate::services::Services;

/// What use cases and workers act through: nothing of HTTP. Cheap to clone.
#[derive(Clone)]
pub struct Context {
    pub settings: Arc<Settings>,
    pub database: Database,
    pub projections: ProjectionRunner,
    pub services: Arc<Services>,
    /// The standing of the process's supervised background loops (the store's own), which `/readyz` reports.
    pub background_loops: BackgroundLoops,
}

impl Context {
    pub fn new(
        settings: Arc<Settings>,
        database: Database,
        projections: ProjectionRunner,
        services: Arc<Services>,
    ) -> Self {
        // The settings are read by now: the loops that started with the store (the append batcher) learn whether
        // one of them is to fail on purpose, and those started later find the decision made.
        let background_loops = database.background_loops().clone();
        background_loops.decide_fault_injection(settings.fault_panic_loop.clone());
        Self {
            settings,
            database,
            projections,
            services,
            background_loops,
        }
    }
}

/// Shared state of one `serve` process's HTTP handlers: the [`Context`] (reached through `Deref`), the metrics
/// handle `/metrics` renders and the flag that refuses new requests while shutting down.
#[derive(Clone)]
pub struct AppState {
    pub context: Context,
    pub metrics: PrometheusHandle,
    draining: Arc<AtomicBool>,
}

impl std::ops::Deref for AppState {
    type Target = Context;

    fn deref(&self) -> &Context {
        &self.context
    }
}

impl AppState {
    pub fn new(
        settings: Arc<Settings>,
        database: Database,
        projections: ProjectionRunner,
        services: Arc<Services>,
    ) -> Self {
        Self::over(Context::new(settings, database, projections, services))
    }

    /// The HTTP state over an existing context.
    pub fn over(context: Context) -> Self {
        Self {
            context,
            metrics: crate::telemetry::metrics_handle(),
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// From now on new requests are refused with 503 while those in flight finish.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}
