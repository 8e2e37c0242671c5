//! The use cases: what the webserver decides, each one loading the aggregates it needs, deciding, recording the
//! decision (one unit, whole or not at all) and retrying when a concurrent writer wins. They are called by HTTP
//! handlers, workers and the command line alike, and know nothing of HTTP: they take a [`Context`] and return
//! domain refusals or a [`UseCaseError`].
//!
//! Architecture invariant: nothing here imports `crate::http`.
//!
//! [`Context`]: crate::state::Context

pub mod assign;
pub mod audit;
pub mod billing;
pub mod entitlement;
pub mod mandelboxes;
pub mod operator;
pub mod release;

use std::future::Future;

use whist_adapters::store::{CommandError, Unit, UnitError};
use whist_domain::EventMetadata;

use crate::state::Context;

/// What one attempt of a use case came to.
pub enum Attempt<T> {
    /// Record this unit; once it is recorded the use case answers `T` (which may hold what must last until then,
    /// such as a host's lock).
    Record(Unit, T),
    /// Nothing to record: the use case answers `T` now.
    Settled(T),
    /// The state read was already stale: decide again on fresh state (counts as an attempt).
    Again,
}

/// The retry loop of every use case that records a unit: each attempt stages its decision on the state it reads
/// and hands the unit back; a unit that loses to a concurrent writer records nothing and the next attempt decides
/// again on fresh state, at most `attempts` times.
///
/// # Errors
/// An attempt failed, the store failed, or concurrent writers won every attempt.
pub async fn record_unit<T, F, Fut>(
    context: &Context,
    metadata: &EventMetadata,
    attempts: usize,
    mut attempt: F,
) -> Result<T, UseCaseError>
where
    F: FnMut(Unit) -> Fut,
    Fut: Future<Output = Result<Attempt<T>, UseCaseError>>,
{
    for _ in 0..attempts {
        match attempt(Unit::new(metadata)).await? {
            Attempt::Settled(answer) => return Ok(answer),
            Attempt::Again => {}
            Attempt::Record(unit, answer) => {
                if unit.record(&context.database).await? {
                    return Ok(answer);
                }
            }
        }
    }
    Err(UseCaseError::Contended { attempts })
}

/// Why a use case did not record its decision. Each variant keeps its cause, so that a log line shows the whole
/// chain (see [`crate::telemetry::log_failure`]).
#[derive(Debug, thiserror::Error)]
pub enum UseCaseError {
    /// An aggregate refused a step that the use case expected to pass.
    #[error("an aggregate refused a step of the decision")]
    Refused(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// The store failed; nothing was recorded.
    #[error("the event store failed")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync + 'static>),
    /// Concurrent writers won every attempt; nothing was recorded.
    #[error("{attempts} attempts in a row lost to concurrent writers")]
    Contended { attempts: usize },
}

impl<E: std::error::Error + Send + Sync + 'static> From<CommandError<E>> for UseCaseError {
    fn from(error: CommandError<E>) -> Self {
        match error {
            CommandError::Rejected(rejection) => Self::Refused(Box::new(rejection)),
            CommandError::Conflict => Self::Contended { attempts: 1 },
            CommandError::Store(source) => Self::Store(source),
        }
    }
}

impl From<sqlx::Error> for UseCaseError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(Box::new(error))
    }
}

impl From<UnitError> for UseCaseError {
    fn from(error: UnitError) -> Self {
        match error {
            UnitError::Conflict => Self::Contended { attempts: 1 },
            UnitError::Store(source) => Self::Store(source),
        }
    }
}
