//! The Postgres event repository: postgres-es for reading, one statement for appending.
//!
//! postgres-es appends with three round trips (BEGIN, one INSERT per event, COMMIT). A single multi-row INSERT is
//! atomic on its own, so this repository appends a command's events in one round trip, and a command's single event
//! through the group commit of `append_batcher`; reads are postgres-es's own.
//! Optimistic concurrency is unchanged: the primary key (aggregate_type, aggregate_id, sequence) refuses a second
//! writer of the same sequence number.

use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlx::PgPool;

use super::append_batcher::AppendBatcher;

/// Events of one command at most per statement (7 parameters each, far under Postgres's 65,535).
const MAX_EVENTS_PER_COMMAND: usize = 1_000;

/// See the module documentation.
pub struct PostgresRepository {
    reads: PostgresEventRepository,
    pool: PgPool,
    batcher: AppendBatcher,
}

impl PostgresRepository {
    /// A repository over `pool`; starts its append batcher on the current tokio runtime.
    pub fn new(pool: PgPool) -> Self {
        Self {
            reads: PostgresEventRepository::new(pool.clone()),
            batcher: AppendBatcher::start(pool.clone()),
            pool,
        }
    }
}

fn classify(error: sqlx::Error) -> PersistenceError {
    match &error {
        sqlx::Error::Database(database_error)
            if database_error.code().as_deref() == Some("23505") =>
        {
            PersistenceError::OptimisticLockError
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed => PersistenceError::ConnectionError(Box::new(error)),
        _ => PersistenceError::UnknownError(Box::new(error)),
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
        match events {
            [] => return Ok(()),
            [event] => return self.batcher.append(event.clone()).await,
            _ => {}
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
        let mut sql = String::from(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, \
             metadata) VALUES ",
        );
        sql.push_str(&super::values_placeholders(events.len(), 7));
        let mut query = sqlx::query(&sql);
        for event in events {
            let sequence = i64::try_from(event.sequence)
                .map_err(|error| PersistenceError::UnknownError(Box::new(error)))?;
            query = query
                .bind(&event.aggregate_type)
                .bind(&event.aggregate_id)
                .bind(sequence)
                .bind(&event.event_type)
                .bind(&event.event_version)
                .bind(&event.payload)
                .bind(&event.metadata);
        }
        query.execute(&self.pool).await.map_err(classify)?;
        Ok(())
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
