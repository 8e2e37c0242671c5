//! The event store: cqrs-es aggregates persisted by postgres-es (or sqlite-es for the embedded default), plus the
//! global log in commit order that projections and the reconciler read.

mod aggregate_store;
mod append_batcher;
mod cached_store;
mod database;
mod log;
mod postgres_repository;
mod sequencer;

pub use aggregate_store::{AggregateStore, CommandError};
pub use database::{redact_url, Backend, Database, DatabaseError};
pub use log::{EventLog, LogSignal, LoggedEvent};
pub use sequencer::{Sequencer, SequencerPass};
