//! The event store: cqrs-es aggregates persisted by postgres-es (or sqlite-es for the embedded default), plus the
//! global log in commit order that projections and the reconciler read.

mod aggregate_store;
mod append_batcher;
mod cached_store;
pub mod chain;
mod database;
mod follower;
mod held;
pub mod lease;
mod listener;
mod log;
pub mod members;
mod postgres_repository;
mod reachability;
pub mod snapshots;

pub use aggregate_store::{AggregateStore, CommandError, Loaded, Unit, UnitError};
pub use append_batcher::LOOP_NAME as APPEND_BATCHER_LOOP;
pub use cached_store::Stale;
pub use chain::{chain_hash, ChainBreak, ChainReport, VerifyProgress, GENESIS};
pub use database::{redact_url, Backend, Database, DatabaseError, PoolSettings, SessionLimits};
pub use follower::{LogFollowing, FOLLOW_LAG_BOUND, FOLLOW_LOOP};
pub use held::Held;
pub use listener::{LogListener, JOBS_CHANNEL, LOG_CHANNEL};
pub use log::{
    EventLog, HeadReading, JobsSignal, LogSignal, LogWatermark, LoggedEvent, GATHER_WINDOW,
};
pub use reachability::Reachability;

/// `($1, $2), ($3, $4)` for `rows` rows of `columns` parameters: the VALUES list of a multi-row INSERT, written the
/// same way for both backends.
pub fn values_placeholders(rows: usize, columns: usize) -> String {
    let mut sql = String::with_capacity(rows * columns * 5);
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            sql.push('$');
            sql.push_str(&(row * columns + column + 1).to_string());
        }
        sql.push(')');
    }
    sql
}

/// `$3, $4, $5` for `count` parameters numbered from `first`: the list of an `IN (…)`, for both backends.
pub fn list_placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|number| format!("${number}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_list_numbers_its_parameters_from_the_first() {
        assert_eq!(super::list_placeholders(3, 3), "$3, $4, $5");
        assert_eq!(super::list_placeholders(1, 0), "");
    }

    #[test]
    fn placeholders_number_every_parameter_once_row_by_row() {
        assert_eq!(
            super::values_placeholders(2, 3),
            "($1, $2, $3), ($4, $5, $6)"
        );
        assert_eq!(super::values_placeholders(0, 3), "");
    }
}
