//! What a projection is.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::AnyConnection;
use whist_adapters::store::{Database, LoggedEvent};

/// The physical names of a projection's tables: the live ones, or the shadow copies a rebuild fills.
#[derive(Debug, Clone)]
pub struct Tables {
    names: HashMap<&'static str, String>,
}

impl Tables {
    /// The live tables.
    pub fn live(tables: &[&'static str]) -> Self {
        Self {
            names: tables
                .iter()
                .map(|table| (*table, (*table).to_string()))
                .collect(),
        }
    }

    /// The physical name of the logical table `table`.
    ///
    /// # Errors
    /// The projection asked for a table it did not declare in [`Projection::tables`].
    pub fn get(&self, table: &str) -> Result<&str, ProjectionError> {
        self.names
            .get(table)
            .map(String::as_str)
            .ok_or_else(|| ProjectionError::UndeclaredTable(table.to_string()))
    }
}

/// The shadow tables of one rebuild or verification: named for that run alone (`{table}__rebuild_{run}`), so that
/// two runs over the same projection (a rebuild and a verify, two operators) never fill, compare or drop each
/// other's tables.
#[derive(Debug, Clone)]
pub struct ShadowRun {
    suffix: String,
}

impl Default for ShadowRun {
    fn default() -> Self {
        Self::new()
    }
}

impl ShadowRun {
    /// A run with a name of its own.
    pub fn new() -> Self {
        let run = uuid::Uuid::new_v4().simple().to_string();
        Self {
            suffix: format!("__rebuild_{}", &run[..8]),
        }
    }

    /// The shadow name of `table` (or of one of its indexes) in this run.
    pub fn name(&self, table: &str) -> String {
        format!("{table}{}", self.suffix)
    }

    /// The shadow tables this run writes into.
    pub fn tables(&self, tables: &[&'static str]) -> Tables {
        Tables {
            names: tables
                .iter()
                .map(|table| (*table, self.name(table)))
                .collect(),
        }
    }
}

/// Why a projection could not apply events.
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("the read model's database failed")]
    Database(#[from] sqlx::Error),
    #[error("event at position {position} ({event_type}) could not be read: {reason}")]
    UnreadableEvent {
        position: i64,
        event_type: String,
        reason: String,
    },
    #[error("projection used table {0}, which it did not declare")]
    UndeclaredTable(String),
}

impl ProjectionError {
    /// `event` could not be read (its payload or metadata), for `reason`.
    pub fn unreadable(event: &LoggedEvent, reason: impl std::fmt::Display) -> Self {
        Self::UnreadableEvent {
            position: event.position,
            event_type: event.event_type.clone(),
            reason: reason.to_string(),
        }
    }
}

/// A read model fed from the global log.
///
/// `apply` receives events in log order, inside the transaction that will also store the checkpoint; it must be
/// deterministic (the same events give the same rows) and touch only the tables it declares.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// A stable name: the checkpoint's key and the name operators use.
    fn name(&self) -> &'static str;

    /// The tables this projection owns (created by `migrations/`; rebuilt from scratch on a rebuild).
    fn tables(&self) -> &'static [&'static str];

    /// Whether a rebuild from position 0 is allowed (false for projections that plan side effects).
    fn rebuildable(&self) -> bool {
        true
    }

    /// Applies a batch of events, in order, to the tables named by `tables`.
    ///
    /// # Errors
    /// The database failed or an event could not be read; the runner then applies the batch one event at a time
    /// to find the event that fails and stops there.
    async fn apply(
        &self,
        connection: &mut AnyConnection,
        tables: &Tables,
        events: &[LoggedEvent],
    ) -> Result<(), ProjectionError>;

    /// Called once a batch this projection applied is committed with its checkpoint, for what must see the batch's
    /// rows committed (the jobs planner wakes this process's reconciler). Nothing by default.
    fn committed(&self, _database: &Database) {}
}
