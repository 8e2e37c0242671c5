//! The Postgres event repository: postgres-es for reading, one statement for appending.
//!
//! postgres-es appends with three round trips (BEGIN, one INSERT per event, COMMIT). This repository hands a
//! command's events to the database's group commit (`append_batcher`) as one all-or-nothing unit, so many commands
//! share one statement and one commit; reads are postgres-es's own.
//! Optimistic concurrency is unchanged: the primary key (aggregate_type, aggregate_id, sequence) refuses a second
//! writer of the same sequence number.

use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlx::PgPool;

use super::database::Database;

/// Events of one command at most (a unit is never split across statements).
const MAX_EVENTS_PER_COMMAND: usize = 1_000;

/// See the module documentation.
pub struct PostgresRepository {
    reads: PostgresEventRepository,
    database: Database,
}

impl PostgresRepository {
    /// A repository reading through `pool` and appending through `database`'s group commit.
    pub fn new(pool: PgPool, database: Database) -> Self {
        Self {
            reads: PostgresEventRepository::new(pool),
            database,
        }
    }
}

impl PersistedEventRepository for PostgresRepository {
    async fn get_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.reads.get_events::<A>(aggregate_id).await
    }

    async fn get_last_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
        last_sequence: usize,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        self.reads
            .get_last_events::<A>(aggregate_id, last_sequence)
            .await
    }

    async fn get_snapshot<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<Option<SerializedSnapshot>, PersistenceError> {
        self.reads.get_snapshot::<A>(aggregate_id).await
    }

    async fn persist<A: Aggregate>(
        &self,
        events: &[SerializedEvent],
        snapshot_update: Option<(String, Value, usize)>,
    ) -> Result<(), PersistenceError> {
        if snapshot_update.is_some() {
            return Err(PersistenceError::UnknownError(
                "snapshots are not used: cqrs-es 0.5 applies events twice in its snapshot modes"
                    .into(),
            ));
        }
        if events.len() > MAX_EVENTS_PER_COMMAND {
            return Err(PersistenceError::UnknownError(
                format!(
                    "a command emitted {} events; at most {MAX_EVENTS_PER_COMMAND} are stored at once",
                    events.len()
                )
                .into(),
            ));
        }
        self.database.append_unit(events.to_vec()).await
    }

    async fn stream_events<A: Aggregate>(
        &self,
        aggregate_id: &str,
    ) -> Result<ReplayStream, PersistenceError> {
        self.reads.stream_events::<A>(aggregate_id).await
    }

    async fn stream_all_events<A: Aggregate>(&self) -> Result<ReplayStream, PersistenceError> {
        self.reads.stream_all_events::<A>().await
    }
}
