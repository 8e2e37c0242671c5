//! What a projection is.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::AnyConnection;
use whist_adapters::store::LoggedEvent;

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

    /// The shadow tables a rebuild writes into (`{table}__rebuild`).
    pub fn shadow(tables: &[&'static str]) -> Self {
        Self {
            names: tables
                .iter()
                .map(|table| (*table, shadow_name(table)))
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

/// The shadow table's name for `table`.
pub fn shadow_name(table: &str) -> String {
    format!("{table}__rebuild")
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
}
