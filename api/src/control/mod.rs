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
pub mod leadership;
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

/// The retry loop of every use case that records a unit: each attempt loads the states it needs, decides, stages
/// the decision and hands the unit back; a unit that loses to a concurrent writer records nothing and the next
/// attempt decides again on fresh state, at most `attempts` times.
///
/// # Errors
/// An attempt failed, the store failed, or concurrent writers won every attempt.
pub async fn record_unit<T, F, Fut>(
    context: &Context,
    metadata: &EventMetadata,
    attempts: usize,
    attempt: F,
) -> Result<T, UseCaseError>
where
    F: FnMut(Unit) -> Fut,
    Fut: Future<Output = Result<Attempt<T>, UseCaseError>>,
{
    record_unit_or_learn(context, metadata, attempts, attempt, |_| {}).await
}

/// As [`record_unit`], and `lost` is told what each attempt that lost to a concurrent writer would have answered
/// (for a use case that steers its next attempt away from where it lost).
///
/// # Errors
/// As `record_unit`.
pub async fn record_unit_or_learn<T, F, Fut>(
    context: &Context,
    metadata: &EventMetadata,
    attempts: usize,
    mut attempt: F,
    mut lost: impl FnMut(T),
) -> Result<T, UseCaseError>
where
    F: FnMut(Unit) -> Fut,
    Fut: Future<Output = Result<Attempt<T>, UseCaseError>>,
{
    // After an attempt that had to decide again, every later one decides on copies all read fresh.
    let mut fresh = false;
    let mut losses = 0u32;
    for _ in 0..attempts {
        let unit = if fresh {
            Unit::reading_fresh(metadata)
        } else {
            Unit::new(metadata)
        };
        match attempt(unit).await? {
            Attempt::Settled(answer) => return Ok(answer),
            Attempt::Again => fresh = true,
            Attempt::Record(unit, answer) => {
                if unit.record(&context.database).await? {
                    return Ok(answer);
                }
                lost(answer);
                losses += 1;
                pause_after_losses(losses).await;
            }
        }
    }
    Err(UseCaseError::Contended { attempts })
}

/// The pause before deciding again after `losses` lost records in a row. The first loss is decided again at once
/// (a fresh read usually settles it). After more, a random pause of up to `losses - 1` milliseconds: two processes
/// racing for the last slots of one host, the one whose copies lag would otherwise read, decide and lose again
/// while the other's next append is already on its way (two `serve` processes filling their hosts to the last slot
/// saw an assign lose 8 times in a row).
async fn pause_after_losses(losses: u32) {
    if losses < 2 {
        return;
    }
    let most = u128::from(losses - 1) * 1_000;
    let micros = uuid::Uuid::new_v4().as_u128() % most;
    tokio::time::sleep(std::time::Duration::from_micros(
        u64::try_from(micros).unwrap_or(0),
    ))
    .await;
}

/// `origin` (its actor and time) carried on in the chain of one aggregate's last event, caused by that event: for a
/// decision that continues what that event started (a host's status report continues its mandelbox's chain; the end
/// of a silent host continues the chain that marked it silent). `origin` itself for an aggregate with no events.
///
/// # Errors
/// The store failed, or the last event's metadata cannot be read.
pub async fn continuing(
    context: &Context,
    aggregate_type: &str,
    aggregate_id: &str,
    origin: &EventMetadata,
) -> Result<EventMetadata, UseCaseError> {
    let last = context
        .database
        .log()
        .last_event_of(aggregate_type, aggregate_id)
        .await?;
    match last {
        Some(last) => continuing_from(&last, origin),
        None => Ok(origin.clone()),
    }
}

/// `origin` (its actor and time) carried on in the chain of `event`, caused by it (see [`continuing`]).
///
/// # Errors
/// The event's metadata cannot be read.
pub fn continuing_from(
    event: &whist_adapters::store::LoggedEvent,
    origin: &EventMetadata,
) -> Result<EventMetadata, UseCaseError> {
    let chain = event
        .metadata()
        .map_err(|error| UseCaseError::Store(Box::new(error)))?;
    Ok(EventMetadata {
        recorded_at: origin.recorded_at,
        actor: origin.actor.clone(),
        correlation_id: chain.correlation_id,
        causation_id: Some(event.position.to_string()),
        traceparent: origin.traceparent.clone(),
    })
}

/// Whether a refusal decided on these copies is final: it is when every copy was read fresh or is settled (no
/// event it may have missed can change the refusal: `Decide::is_settled`). Otherwise each copy that may have
/// been behind is marked to be read fresh, and the use case decides again (`Attempt::Again`).
#[macro_export]
macro_rules! final_on {
    ($(($store:expr, $copy:expr)),+ $(,)?) => {{
        let fresh = true $(&& $copy.decides_finally())+;
        if !fresh {
            $($store.decide_again($copy);)+
        }
        fresh
    }};
}

/// Stages each aggregate's part of a decision in the unit: `Ok(true)` when all are staged, `Ok(false)` when a
/// part that decided nothing was decided on a copy that may have been behind (the copy is marked to be read fresh;
/// decide again).
#[macro_export]
macro_rules! stage_parts {
    ($unit:expr, $(($store:expr, $copy:expr, $events:expr)),+ $(,)?) => {{
        let mut staged = true;
        $(staged &= $store.stage_events($unit, $copy, $events)?;)+
        staged
    }};
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
