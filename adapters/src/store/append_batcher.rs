//! Group commit of whole commands on Postgres.
//!
//! A unit is what one decision appends: one command's events, or the events of several commands on several
//! aggregates that must be recorded together (an assign reserves the user's limit, the host's slot, the mandelbox
//! and the session at once). Under load, many decisions append at the same moment; writing each in its own
//! transaction costs one commit (a WAL flush) each. The batcher writes whatever units are waiting with one call of
//! `whist_append_units_checked` (migration 0012, its body since 0016): one statement, one commit. The function
//! gives the events their global positions under a transaction-scoped advisory lock, held until commit, so appends
//! are serialised across every process and positions follow commit order; it refuses a unit that would leave a
//! hole in a sequence. A unit any of whose events collided with an existing sequence number keeps none of its
//! events and gets a conflict, exactly what a transaction of its own would have told it. Nothing waits for a timer:
//! a flusher takes everything queued while the previous statement ran, so a lone writer pays no extra latency.
//! The events appended join the process's stretch of the log as numbered ([`super::log::HeadReading`]), so that
//! its projections do not read back what it has just written.

use std::collections::HashSet;

use cqrs_es::persist::{PersistenceError, SerializedEvent};
use sqlx::{PgConnection, Postgres};
use tokio::sync::{mpsc, oneshot, watch};

use super::held::HeldConnections;
use super::log::{LogWatermark, LoggedEvent};
use crate::supervision::BackgroundLoops;

/// How many events one statement carries at most (a unit is never split).
const MAX_BATCH_EVENTS: usize = 1_024;
/// Statements in flight at once, per process. One: every append statement of every process serialises on the
/// log's one append lock through its commit, so a second statement in flight only waits for that lock, and splits
/// the batch the first would have carried (one commit each instead of one for all). Measured with `whist bench
/// store` (2026-12-05, appends as a share of pgbench): 4 flushers 42% / 20% / 56% at 1 / 4 / 64 writers and 29% /
/// 20% / 17% from 1 / 2 / 4 processes; 2 flushers 37 / 29 / 77% and 40 / 33 / 27%; 1 flusher 40 / 34 / 89% and
/// 52 / 45 / 38%.
const FLUSHERS: usize = 1;
/// The flushers' name among the supervised background loops.
pub const LOOP_NAME: &str = "append_batcher";

type Reply = oneshot::Sender<Result<(), PersistenceError>>;

struct Unit {
    events: Vec<SerializedEvent>,
    reply: Reply,
}

/// Hands units to the flusher tasks. Clones share the flushers.
#[derive(Clone, Debug)]
pub struct AppendBatcher {
    /// Dropped with the last handle, before `queue` (fields drop in order), so that the flushers' supervisors know,
    /// when the closed queue ends the flushers, that they were meant to end.
    _stop: std::sync::Arc<watch::Sender<bool>>,
    queue: mpsc::Sender<Unit>,
}

impl AppendBatcher {
    /// Starts the flushers on the current tokio runtime, each supervised as the loop `append_batcher` of `loops`
    /// (restarted should it panic); they stop when every handle is dropped. A unit in the batch of a flusher that
    /// panics is answered with an error (its reply is dropped), never left waiting; units still queued wait for
    /// the flusher's restart, or are taken by the other flushers meanwhile.
    /// Every append's answer carries the head after it, which `watermark` is given (see [`LogWatermark`]). The
    /// flusher appends on a connection of `connections`, kept between statements.
    pub(crate) fn start(
        connections: HeldConnections<Postgres>,
        watermark: LogWatermark,
        loops: &BackgroundLoops,
    ) -> Self {
        let (queue, receiver) = mpsc::channel::<Unit>(4 * MAX_BATCH_EVENTS);
        let receiver = std::sync::Arc::new(tokio::sync::Mutex::new(receiver));
        let (stop, stopped) = watch::channel(false);
        for _ in 0..FLUSHERS {
            let connections = connections.clone();
            let receiver = receiver.clone();
            let watermark = watermark.clone();
            loops.supervise(LOOP_NAME, stopped.clone(), move |_| {
                flush_until_closed(connections.clone(), watermark.clone(), receiver.clone())
            });
        }
        Self {
            _stop: std::sync::Arc::new(stop),
            queue,
        }
    }

    /// Appends `events` all together or not at all; `OptimisticLockError` when any of their sequence numbers is
    /// taken (then none is stored).
    ///
    /// # Errors
    /// A conflict, or the database failed (then nothing was written).
    pub async fn append(&self, events: Vec<SerializedEvent>) -> Result<(), PersistenceError> {
        if events.is_empty() {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Unit { events, reply })
            .await
            .map_err(|_| PersistenceError::UnknownError("the append batcher has stopped".into()))?;
        answer.await.map_err(|_| {
            PersistenceError::UnknownError("the append batcher dropped an append".into())
        })?
    }
}

/// Takes whatever units are queued, up to `MAX_BATCH_EVENTS` events, and writes them, until the queue is closed.
///
/// The flusher keeps the connection it appends on while its statements succeed ([`HeldConnections`]): giving it
/// back to the pool after every statement would cost a test round trip between one append and the next.
async fn flush_until_closed(
    connections: HeldConnections<Postgres>,
    watermark: LogWatermark,
    receiver: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Unit>>>,
) {
    loop {
        let batch = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            // The writers the last statement answered were only woken: one turn of the scheduler lets those with
            // another unit ready queue it, so that it rides this statement instead of the next one (a lone writer
            // loses nothing: nobody else is runnable).
            tokio::task::yield_now().await;
            let mut events = first.events.len();
            let mut batch = vec![first];
            while events < MAX_BATCH_EVENTS {
                match receiver.try_recv() {
                    Ok(unit) => {
                        events += unit.events.len();
                        batch.push(unit);
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        let mut connection = match connections.take().await {
            Ok(connection) => connection,
            Err(error) => {
                answer_failed(batch, &BatchFailed(std::sync::Arc::new(error)));
                continue;
            }
        };
        if flush(&mut connection, &watermark, batch).await.is_ok() {
            connection.keep();
        }
    }
}

/// An event's payload or metadata as the JSON text the store keeps (the `json` column keeps the text as given, so
/// the log's readers get it back byte for byte).
///
/// Written into a buffer sized for a typical event, not through `Display` (which checks every piece it writes and
/// grows its string from nothing): the flusher writes every event of the process.
fn json_text(value: &serde_json::Value) -> Result<String, sqlx::Error> {
    let mut text = Vec::with_capacity(256);
    serde_json::to_writer(&mut text, value)
        .map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
    String::from_utf8(text).map_err(|error| sqlx::Error::Encode(Box::new(error)))
}

/// The unit index the append function is given for the unit at `index` of a batch.
fn unit_number(index: usize) -> i64 {
    i64::try_from(index).unwrap_or(i64::MAX)
}

/// The events of the units not lost, as the log now holds them: the append numbered them in the order of the call,
/// consecutively up to `head`. `payloads` and `metadatas` run over every unit's events in that order. The events
/// are moved, not copied: after the append only the units' replies are still needed.
fn numbered(
    units: Vec<Vec<SerializedEvent>>,
    lost: &HashSet<i64>,
    payloads: Vec<String>,
    metadatas: Vec<String>,
    head: i64,
) -> Vec<LoggedEvent> {
    let is_kept = |index: usize| !lost.contains(&unit_number(index));
    let kept: usize = units
        .iter()
        .enumerate()
        .filter(|(index, _)| is_kept(*index))
        .map(|(_, events)| events.len())
        .sum();
    let first = head + 1 - i64::try_from(kept).unwrap_or(i64::MAX);
    units
        .into_iter()
        .enumerate()
        .flat_map(|(index, events)| events.into_iter().map(move |event| (index, event)))
        .zip(payloads.into_iter().zip(metadatas))
        .filter(|((index, _), _)| is_kept(*index))
        .zip(first..)
        .map(
            |(((_, event), (payload, metadata)), position)| LoggedEvent {
                position,
                aggregate_type: event.aggregate_type,
                aggregate_id: event.aggregate_id,
                sequence: i64::try_from(event.sequence).unwrap_or(i64::MAX),
                event_type: event.event_type,
                event_version: event.event_version,
                payload,
                metadata,
            },
        )
        .collect()
}

/// Answers every unit of a batch that could not be written with the failure, with its cause.
fn answer_failed(batch: Vec<Unit>, shared: &BatchFailed) {
    for unit in batch {
        let _ = unit.reply.send(Err(failure(&shared.0, shared.clone())));
    }
}

type Key = (String, String, usize);

fn key(event: &SerializedEvent) -> Key {
    (
        event.aggregate_type.clone(),
        event.aggregate_id.clone(),
        event.sequence,
    )
}

async fn flush(
    connection: &mut PgConnection,
    watermark: &LogWatermark,
    batch: Vec<Unit>,
) -> Result<(), BatchFailed> {
    // Two events of the same aggregate and sequence cannot share a statement (it could not tell which one won).
    // Once the statement has run, a row with that key exists (this batch's or an earlier one's), so every later
    // unit wanting the same key has lost: it is answered with a conflict without another round trip (should the
    // earlier unit have lost too, the conflict only costs the later one a retry on fresh state).
    let mut keys = HashSet::new();
    let (now, later): (Vec<Unit>, Vec<Unit>) = batch.into_iter().partition(|unit| {
        let unit_keys: Vec<Key> = unit.events.iter().map(key).collect();
        let unit_keys_distinct: HashSet<&Key> = unit_keys.iter().collect();
        if unit_keys_distinct.len() != unit_keys.len()
            || unit_keys.iter().any(|key| keys.contains(key))
        {
            return false;
        }
        keys.extend(unit_keys);
        true
    });
    let written = write(connection, watermark, now).await;
    for unit in later {
        let outcome = match &written {
            Ok(()) => Err(PersistenceError::OptimisticLockError),
            Err(shared) => Err(PersistenceError::UnknownError(Box::new(shared.clone()))),
        };
        let _ = unit.reply.send(outcome);
    }
    written
}

/// A batched statement's failure, shared by every unit it carried (each unit's caller gets it with its cause).
#[derive(Debug, Clone, thiserror::Error)]
#[error("the batched append failed")]
pub(crate) struct BatchFailed(#[source] pub(crate) std::sync::Arc<sqlx::Error>);

/// A failed statement as the store reports it: connection trouble (worth waiting out) apart from the rest.
pub(crate) fn failure(
    error: &sqlx::Error,
    cause: impl std::error::Error + Send + Sync + 'static,
) -> PersistenceError {
    let failure: Box<dyn std::error::Error + Send + Sync> = Box::new(cause);
    if matches!(
        error,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
    ) {
        PersistenceError::ConnectionError(failure)
    } else {
        PersistenceError::UnknownError(failure)
    }
}

/// Writes one statement and answers every unit in it; `Err` carries the failure the units were given.
async fn write(
    connection: &mut PgConnection,
    watermark: &LogWatermark,
    batch: Vec<Unit>,
) -> Result<(), BatchFailed> {
    if batch.is_empty() {
        return Ok(());
    }
    let events: usize = batch.iter().map(|unit| unit.events.len()).sum();
    let mut units = Vec::with_capacity(events);
    let mut aggregate_types = Vec::with_capacity(events);
    let mut aggregate_ids = Vec::with_capacity(events);
    let mut sequences = Vec::with_capacity(events);
    let mut event_types = Vec::with_capacity(events);
    let mut event_versions = Vec::with_capacity(events);
    for (index, unit) in batch.iter().enumerate() {
        for event in &unit.events {
            units.push(unit_number(index));
            aggregate_types.push(event.aggregate_type.as_str());
            aggregate_ids.push(event.aggregate_id.as_str());
            sequences.push(i64::try_from(event.sequence).unwrap_or(i64::MAX));
            event_types.push(event.event_type.as_str());
            event_versions.push(event.event_version.as_str());
        }
    }
    let texts = batch
        .iter()
        .flat_map(|unit| &unit.events)
        .map(|event| Ok((json_text(&event.payload)?, json_text(&event.metadata)?)))
        .collect::<Result<Vec<(String, String)>, sqlx::Error>>();
    let (payloads, metadatas): (Vec<String>, Vec<String>) = match texts {
        Ok(texts) => texts.into_iter().unzip(),
        Err(error) => {
            let shared = BatchFailed(std::sync::Arc::new(error));
            answer_failed(batch, &shared);
            return Err(shared);
        }
    };
    let reading = watermark.reading_head();
    let outcome = sqlx::query_as::<_, (Vec<i64>, i64)>(
        "SELECT lost, head FROM whist_append_units_checked($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&units)
    .bind(&aggregate_types)
    .bind(&aggregate_ids)
    .bind(&sequences)
    .bind(&event_types)
    .bind(&event_versions)
    .bind(&payloads)
    .bind(&metadatas)
    .fetch_one(connection)
    .await;
    match outcome {
        Ok((lost, head)) => {
            let lost: HashSet<i64> = lost.into_iter().collect();
            metrics::histogram!("whist_append_batch_units").record(batch.len() as f64);
            let (replies, events): (Vec<Reply>, Vec<Vec<SerializedEvent>>) = batch
                .into_iter()
                .map(|unit| (unit.reply, unit.events))
                .unzip();
            reading.observe_appended(head, numbered(events, &lost, payloads, metadatas, head));
            for (index, reply) in replies.into_iter().enumerate() {
                let outcome = if lost.contains(&unit_number(index)) {
                    Err(PersistenceError::OptimisticLockError)
                } else {
                    Ok(())
                };
                let _ = reply.send(outcome);
            }
            Ok(())
        }
        Err(error) => {
            let shared = BatchFailed(std::sync::Arc::new(error));
            answer_failed(batch, &shared);
            Err(shared)
        }
    }
}
