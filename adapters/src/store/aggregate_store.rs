//! Executing commands against aggregates, whichever backend stores them.

use cqrs_es::{Aggregate, AggregateError, CqrsFramework};
use sqlite_es::SqliteEventRepository;
use whist_domain::EventMetadata;

use super::database::{Backend, Database};
use super::log::LogSignal;

use super::cached_store::CachedEventStore;
use super::postgres_repository::PostgresRepository;

type PostgresStore<A> = CachedEventStore<PostgresRepository, A>;
type SqliteStore<A> = CachedEventStore<SqliteEventRepository, A>;

/// Aggregates each store remembers between commands (see `cached_store`).
const REMEMBERED_AGGREGATES: usize = 10_000;

enum Frameworks<A: Aggregate + Clone> {
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
/// Snapshots are deliberately not used: cqrs-es 0.5 applies every event twice in its snapshot modes. Instead the
/// store remembers aggregates between commands; a stale copy costs a conflict, never a wrong decision.
pub struct AggregateStore<A: Aggregate + Clone> {
    frameworks: Frameworks<A>,
    signal: LogSignal,
}

impl<A> AggregateStore<A>
where
    A: Aggregate + Clone + 'static,
    A::Services: Clone,
{
    /// A store for aggregates of type `A` in `database`, with the services its `handle` receives.
    pub fn new(database: &Database, services: A::Services) -> Self {
        let frameworks = match database.backend() {
            Backend::Postgres(pool) => {
                let store = CachedEventStore::new(
                    PostgresRepository::new(pool.clone()),
                    PostgresRepository::new(pool.clone()),
                    REMEMBERED_AGGREGATES,
                );
                Frameworks::Postgres {
                    framework: CqrsFramework::new(store.clone(), vec![], services),
                    store,
                }
            }
            Backend::Sqlite(pool) => {
                let store = CachedEventStore::new(
                    SqliteEventRepository::new(pool.clone()),
                    SqliteEventRepository::new(pool.clone()),
                    REMEMBERED_AGGREGATES,
                );
                Frameworks::Sqlite {
                    framework: CqrsFramework::new(store.clone(), vec![], services),
                    store,
                }
            }
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
    ) -> Result<(), CommandError<A::Error>>
    where
        A::Command: Clone,
    {
        let outcome = match self
            .execute_once(aggregate_id, command.clone(), metadata)
            .await
        {
            // A remembered copy may be stale (another process appended since), and a rule can refuse a command on
            // stale state without any append revealing it. So a refusal is only final on fresh state.
            Err(CommandError::Rejected(_)) => {
                self.mark_stale(aggregate_id);
                self.execute_once(aggregate_id, command, metadata).await
            }
            outcome => outcome,
        };
        let label = match &outcome {
            Ok(()) => "recorded",
            Err(CommandError::Rejected(_)) => "rejected",
            Err(CommandError::Conflict) => "conflict",
            Err(CommandError::Store(_)) => "failed",
        };
        metrics::counter!("whist_commands_total", "aggregate" => A::TYPE, "outcome" => label)
            .increment(1);
        if outcome.is_ok() {
            self.signal.appended();
        }
        outcome
    }

    async fn execute_once(
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
        outcome.map_err(CommandError::from)
    }

    /// Marks the remembered copy of one aggregate as behind, so that the next command first reads what it missed.
    pub fn mark_stale(&self, aggregate_id: &str) {
        match &self.frameworks {
            Frameworks::Postgres { store, .. } => store.mark_stale(aggregate_id),
            Frameworks::Sqlite { store, .. } => store.mark_stale(aggregate_id),
        }
    }

    /// Forgets the remembered copy of one aggregate, so that the next command loads it from the database.
    pub fn forget(&self, aggregate_id: &str) {
        match &self.frameworks {
            Frameworks::Postgres { store, .. } => store.forget(aggregate_id),
            Frameworks::Sqlite { store, .. } => store.forget(aggregate_id),
        }
    }

    /// The aggregate's current state and version (0 when it has no events), read from the database.
    ///
    /// # Errors
    /// The database failed or an event could not be read.
    pub async fn load(&self, aggregate_id: &str) -> Result<(A, usize), CommandError<A::Error>> {
        match &self.frameworks {
            Frameworks::Postgres { store, .. } => {
                let context = store.load_fresh(aggregate_id).await?;
                let version = context.current_sequence;
                Ok((context.aggregate, version))
            }
            Frameworks::Sqlite { store, .. } => {
                let context = store.load_fresh(aggregate_id).await?;
                let version = context.current_sequence;
                Ok((context.aggregate, version))
            }
        }
    }
}
