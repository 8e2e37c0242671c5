//! The Postgres event repository: postgres-es for reading, one statement for appending.
//!
//! postgres-es appends with three round trips (BEGIN, one INSERT per event, COMMIT). This repository hands a
//! command's events to the database's group commit (`append_batcher`) as one all-or-nothing unit, so many commands
//! share one statement and one commit. Reads are postgres-es's own, except the catch-up read of the events after a
//! version: postgres-es writes that version into the SQL text, so every version is a statement of its own that the
//! server parses and plans anew and sqlx prepares with an extra round trip (and evicts from its statement cache);
//! here it is a parameter of one prepared statement, run on a connection the store keeps for these reads
//! (`held`), since there are several per request.
//! Optimistic concurrency is unchanged: the primary key (aggregate_type, aggregate_id, sequence) refuses a second
//! writer of the same sequence number.

use cqrs_es::persist::{
    PersistedEventRepository, PersistenceError, ReplayStream, SerializedEvent, SerializedSnapshot,
};
use cqrs_es::Aggregate;
use postgres_es::PostgresEventRepository;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Row};

use super::append_batcher::failure;
use super::cached_store::CatchUpMany;
use super::database::Database;
use super::held::HeldConnections;

/// Events of one command at most (a unit is never split across statements).
const MAX_EVENTS_PER_COMMAND: usize = 1_000;

/// See the module documentation.
pub struct PostgresRepository {
    reads: PostgresEventRepository,
    /// The connections the catch-up reads keep between reads (the store's, shared by every repository).
    catch_up_reads: HeldConnections<Postgres>,
    database: Database,
}

impl PostgresRepository {
    /// A repository reading through `pool` and appending through `database`'s group commit.
    pub fn new(pool: PgPool, database: Database) -> Self {
        let catch_up_reads = database
            .catch_up_reads()
            .cloned()
            .unwrap_or_else(|| HeldConnections::new(pool.clone(), 0));
        Self {
            reads: PostgresEventRepository::new(pool),
            catch_up_reads,
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
        let last_sequence = i64::try_from(last_sequence).map_err(|_| {
            PersistenceError::UnknownError(
                format!("sequence {last_sequence} is beyond what the store holds").into(),
            )
        })?;
        let query = sqlx::query(
            "SELECT aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata \
             FROM events WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 ORDER BY sequence",
        )
        .bind(A::TYPE)
        .bind(aggregate_id)
        .bind(last_sequence);
        self.read_events(query).await
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

impl PostgresRepository {
    /// Runs a read of stored events on a held connection.
    async fn read_events(
        &self,
        query: sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let read = async {
            let mut connection = self.catch_up_reads.take().await?;
            let rows = query.fetch_all(&mut *connection).await?;
            connection.keep();
            Ok(rows)
        };
        let rows = read.await.map_err(|error: sqlx::Error| {
            let shared = std::sync::Arc::new(error);
            failure(&shared, shared.clone())
        })?;
        rows.iter()
            .map(|row| {
                let sequence: i64 = row.try_get("sequence")?;
                Ok(SerializedEvent::new(
                    row.try_get("aggregate_id")?,
                    usize::try_from(sequence).unwrap_or_default(),
                    row.try_get("aggregate_type")?,
                    row.try_get("event_type")?,
                    row.try_get("event_version")?,
                    row.try_get("payload")?,
                    row.try_get("metadata")?,
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(|error| PersistenceError::DeserializationError(Box::new(error)))
    }
}

impl CatchUpMany for PostgresRepository {
    async fn get_events_after_each<A: Aggregate>(
        &self,
        after: &[(String, usize)],
    ) -> Result<Vec<SerializedEvent>, PersistenceError> {
        let mut ids = Vec::with_capacity(after.len());
        let mut sequences = Vec::with_capacity(after.len());
        for (id, sequence) in after {
            ids.push(id.clone());
            sequences.push(i64::try_from(*sequence).map_err(|_| {
                PersistenceError::UnknownError(
                    format!("sequence {sequence} is beyond what the store holds").into(),
                )
            })?);
        }
        let query = sqlx::query(
            "SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version, e.payload, \
             e.metadata FROM unnest($2::text[], $3::bigint[]) AS after_each(aggregate_id, sequence) \
             JOIN events e ON e.aggregate_type = $1 AND e.aggregate_id = after_each.aggregate_id \
             AND e.sequence > after_each.sequence ORDER BY e.aggregate_id, e.sequence",
        )
        .bind(A::TYPE)
        .bind(ids)
        .bind(sequences);
        self.read_events(query).await
    }
}
