//! What every handler can reach.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use whist_adapters::config::Settings;
use whist_adapters::store::Database;
use whist_adapters::supervision::BackgroundLoops;
use whist_projections::ProjectionRunner;

use crate::services::Services;

/// Shared state of one `serve` process.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub database: Database,
    pub projections: ProjectionRunner,
    pub services: Arc<Services>,
    pub metrics: PrometheusHandle,
    /// The standing of the process's supervised background loops (the store's own), which `/readyz` reports.
    pub background_loops: BackgroundLoops,
    draining: Arc<AtomicBool>,
}

impl AppState {
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
            metrics: crate::telemetry::metrics_handle(),
            background_loops,
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
