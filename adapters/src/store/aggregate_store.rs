//! Executing commands against aggregates, whichever backend stores them.

use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, AggregateError, CqrsFramework, EventStore};
use postgres_es::PostgresEventRepository;
use sqlite_es::SqliteEventRepository;
use whist_domain::EventMetadata;

use super::database::{Backend, Database};
use super::log::LogSignal;

type PostgresStore<A> = PersistedEventStore<PostgresEventRepository, A>;
type SqliteStore<A> = PersistedEventStore<SqliteEventRepository, A>;

enum Frameworks<A: Aggregate> {
    Postgres {
        framework: CqrsFramework<A, PostgresStore<A>>,
        store: PostgresStore<A>,
    },
    Sqlite {
        framework: CqrsFramework<A, SqliteStore<A>>,
        store: SqliteStore<A>,
    },
}

/// Why a command did not record its events.
#[derive(Debug, thiserror::Error)]
pub enum CommandError<E: std::error::Error + 'static> {
    /// The aggregate refused the command: a business rule, stable and safe to show.
    #[error("command rejected: {0}")]
    Rejected(#[source] E),
    /// Another command on the same aggregate committed first (optimistic concurrency). Retrying may succeed.
    #[error("another command on the same aggregate committed first")]
    Conflict,
    /// The store failed: the database is unreachable or returned an error, or stored data could not be read.
    #[error("the event store failed")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl<E: std::error::Error + 'static> From<AggregateError<E>> for CommandError<E> {
    fn from(error: AggregateError<E>) -> Self {
        match error {
            AggregateError::UserError(rejection) => Self::Rejected(rejection),
            AggregateError::AggregateConflict => Self::Conflict,
            AggregateError::DatabaseConnectionError(source)
            | AggregateError::DeserializationError(source)
            | AggregateError::UnexpectedError(source) => Self::Store(source),
        }
    }
}

/// Loads aggregates and executes commands on them; every event is stored with its metadata.
///
/// Snapshots are deliberately not used: cqrs-es 0.5 applies every event twice in its snapshot modes.
pub struct AggregateStore<A: Aggregate> {
    frameworks: Frameworks<A>,
    signal: LogSignal,
}

impl<A> AggregateStore<A>
where
    A: Aggregate + 'static,
    A::Services: Clone,
{
    /// A store for aggregates of type `A` in `database`, with the services its `handle` receives.
    pub fn new(database: &Database, services: A::Services) -> Self {
        let frameworks = match database.backend() {
            Backend::Postgres(pool) => Frameworks::Postgres {
                framework: CqrsFramework::new(
                    PersistedEventStore::new_event_store(PostgresEventRepository::new(
                        pool.clone(),
                    )),
                    vec![],
                    services,
                ),
                store: PersistedEventStore::new_event_store(PostgresEventRepository::new(
                    pool.clone(),
                )),
            },
            Backend::Sqlite(pool) => Frameworks::Sqlite {
                framework: CqrsFramework::new(
                    PersistedEventStore::new_event_store(SqliteEventRepository::new(pool.clone())),
                    vec![],
                    services,
                ),
                store: PersistedEventStore::new_event_store(SqliteEventRepository::new(
                    pool.clone(),
                )),
            },
        };
        Self {
            frameworks,
            signal: database.signal().clone(),
        }
    }

    /// Loads the aggregate, lets it decide, and appends what it decided, with `metadata` on every event.
    ///
    /// # Errors
    /// `Rejected` when a rule refuses the command, `Conflict` when another command on the same aggregate
    /// committed first, `Store` when the database failed.
    pub async fn execute(
        &self,
        aggregate_id: &str,
        command: A::Command,
        metadata: &EventMetadata,
    ) -> Result<(), CommandError<A::Error>> {
        let metadata = metadata.to_map();
        let outcome = match &self.frameworks {
            Frameworks::Postgres { framework, .. } => {
                framework
                    .execute_with_metadata(aggregate_id, command, metadata)
                    .await
            }
            Frameworks::Sqlite { framework, .. } => {
                framework
                    .execute_with_metadata(aggregate_id, command, metadata)
                    .await
            }
        };
        match outcome {
            Ok(()) => {
                self.signal.appended();
                metrics::counter!("whist_commands_total", "aggregate" => A::TYPE, "outcome" => "recorded")
                    .increment(1);
                Ok(())
            }
            Err(error) => {
                let error = CommandError::from(error);
                let outcome = match &error {
                    CommandError::Rejected(_) => "rejected",
                    CommandError::Conflict => "conflict",
                    CommandError::Store(_) => "failed",
                };
                metrics::counter!("whist_commands_total", "aggregate" => A::TYPE, "outcome" => outcome)
                    .increment(1);
                Err(error)
            }
        }
    }

    /// The aggregate's current state and version (0 when it has no events).
    ///
    /// # Errors
    /// The database failed or an event could not be read.
    pub async fn load(&self, aggregate_id: &str) -> Result<(A, usize), CommandError<A::Error>> {
        match &self.frameworks {
            Frameworks::Postgres { store, .. } => {
                let context = store.load_aggregate(aggregate_id).await?;
                let version = context.current_sequence;
                Ok((context.aggregate, version))
            }
            Frameworks::Sqlite { store, .. } => {
                let context = store.load_aggregate(aggregate_id).await?;
                let version = context.current_sequence;
                Ok((context.aggregate, version))
            }
        }
    }
}
