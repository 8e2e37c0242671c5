//! Projections: read models built from the global event log, and the runner that keeps each one at the log's head.
//! Beside them, the typed queries the rest of the webserver reads (and, for `jobs` and `host_heartbeats`, writes)
//! those tables with, so that no SQL against a read model lives outside this crate.
//!
//! Architecture invariant: a projection only reads events and writes its own tables, inside the transaction that
//! also moves its checkpoint. It calls no outside service and never sends commands, so it can be replayed from
//! position 0 at any time with the same result.

pub mod aggregate_index;
pub mod catalog;
pub mod chain;
pub mod fleet;
pub mod fleet_queries;
pub mod heartbeats;
pub mod jobs;
mod projection;
mod read;
mod runner;

pub use projection::{Projection, ProjectionError, ShadowRun, Tables};
pub use runner::{
    checkpoint_position, step_lease, ProjectionRunner, ProjectionStatus, RebuildProgress,
    RebuildReport, RunnerError, StepOutcome, TableDifference, Together, VerifyReport,
    PROJECTIONS_LEASE, STEP_LEASE,
};

use std::sync::Arc;

/// Every projection the webserver maintains, in the order they are registered.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(aggregate_index::AggregateIndex),
        Arc::new(fleet::Instances),
        Arc::new(fleet::Mandelboxes),
        Arc::new(catalog::Images),
        Arc::new(chain::EventChain),
        Arc::new(jobs::JobPlanner),
    ]
}
