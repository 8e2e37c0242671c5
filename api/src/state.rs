//! What every handler can reach.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use metrics_exporter_prometheus::PrometheusHandle;
use whist_adapters::config::Settings;
use whist_adapters::store::Database;
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
    draining: Arc<AtomicBool>,
}

impl AppState {
    pub fn new(
        settings: Arc<Settings>,
        database: Database,
        projections: ProjectionRunner,
        services: Arc<Services>,
    ) -> Self {
        Self {
            settings,
            database,
            projections,
            services,
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
