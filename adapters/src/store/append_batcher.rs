//! Group commit of whole commands on Postgres.
//!
//! A unit is what one decision appends: one command's events, or the events of several commands on several
//! aggregates that must be recorded together (an assign reserves the user's limit, the host's slot, the mandelbox
//! and the session at once). Under load, many decisions append at the same moment; writing each in its own
//! transaction costs one commit (a WAL flush) each. The batcher writes whatever units are waiting with one call of
//! `whist_append_units_checked` (migration 0012): one statement, one commit. The function gives the events their
//! global positions under a transaction-scoped advisory lock, held until commit, so appends are serialised across
//! every process and positions follow commit order; it refuses a unit that would leave a hole in a sequence. A unit any of whose events collided with an existing sequence number
//! keeps none of its events and gets a conflict, exactly what a transaction of its own would have told it.
//!
//! A flusher takes everything queued while the previous statement ran. Under a moderate load that is one or two
//! units, and each statement's fixed cost (the call, the lock, the commit and its flush) is paid for them alone:
//! at 700 assigns/s an append statement carried 1.4-1.9 decisions against 24 in a saturated closed loop, and an
//! assign cost twice the machine CPU. So, as Postgres's `commit_delay` does for commits, a flusher holds a small
//! batch open for a moment when the previous statement showed that several writers append together ([`Linger`]).
//! A statement that carried one unit shows a lone writer: its next append is written at once, and never waits.

use std::collections::HashSet;

use cqrs_es::persist::{PersistenceError, SerializedEvent};
use sqlx::{PgConnection, Postgres};
use tokio::sync::{mpsc, oneshot, watch};

use super::held::HeldConnections;
use super::log::LogWatermark;
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
/// How long at most a flusher holds a batch open for the units of writers that append alongside it. tokio's timers
/// fire on whole milliseconds, so the hold lasts one to two. Measured at a fixed 700 assigns/s (`whist loadtest
/// --rate 700`, 2026-12-06): decisions per statement 1.4-2.7 → 4.7-5.0, machine CPU per assign 1.81-2.25 → 1.49-1.67 ms,
/// answer p50 1.7-6.4 → 4.2-4.8 ms.
const LINGER: std::time::Duration = std::time::Duration::from_millis(1);
/// The most units a batch is held open for: a batch that large already shares its statement's fixed cost, and in
/// a saturated loop, where batches carry twenty units or more, the flusher never waits.
const LINGER_UNITS: usize = 8;
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
    let mut linger = Linger::default();
    loop {
        let batch = {
            let mut receiver = receiver.lock().await;
            let Some(batch) = gather(&mut receiver, linger).await else {
                return;
            };
            linger = Linger::after_statement_of(batch.units.len());
            batch.units
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

/// The units the next statement will carry, `None` once the queue is closed: the first unit queued, then every unit
/// queued while the writers the last statement answered had a turn, then, as `linger` says, those that come within
/// [`LINGER`].
async fn gather(receiver: &mut mpsc::Receiver<Unit>, linger: Linger) -> Option<Batch> {
    let first = receiver.recv().await?;
    // The writers the last statement answered were only woken: one turn of the scheduler lets those with another
    // unit ready queue it, so that it rides this statement instead of the next one (a lone writer loses nothing:
    // nobody else is runnable).
    tokio::task::yield_now().await;
    let mut batch = Batch::of(first);
    batch.take_queued(receiver);
    if linger.holds(batch.units.len()) {
        let deadline = tokio::time::Instant::now() + LINGER;
        while linger.holds(batch.units.len()) && !batch.is_full() {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(unit)) => {
                    batch.add(unit);
                    batch.take_queued(receiver);
                }
                // Closed (the flusher's next turn ends it) or held long enough: write what came.
                Ok(None) | Err(_) => break,
            }
        }
    }
    Some(batch)
}

/// The units one statement will carry, and their events.
struct Batch {
    units: Vec<Unit>,
    events: usize,
}

impl Batch {
    fn of(first: Unit) -> Self {
        Self {
            events: first.events.len(),
            units: vec![first],
        }
    }

    fn add(&mut self, unit: Unit) {
        self.events += unit.events.len();
        self.units.push(unit);
    }

    fn is_full(&self) -> bool {
        self.events >= MAX_BATCH_EVENTS
    }

    /// Adds every unit already queued, up to `MAX_BATCH_EVENTS` events (a unit is never split, so the last one
    /// may go over).
    fn take_queued(&mut self, receiver: &mut mpsc::Receiver<Unit>) {
        while !self.is_full() {
            match receiver.try_recv() {
                Ok(unit) => self.add(unit),
                Err(_) => break,
            }
        }
    }
}

/// Whether a flusher holds its batch open before writing it, and for how many units.
///
/// The previous statement tells how many writers append together: the units that queued while it ran, and those
/// it waited for. After a statement of one unit (a lone writer, or a quiet moment) the next batch is written at
/// once. After a statement of `n` units, the next batch is held, for at most [`LINGER`], until it carries `n`
/// (at most [`LINGER_UNITS`]): writers that answer each other's turn (each appends again as soon as its last append
/// is answered) all ride one statement, and arrivals at a steady rate share one per millisecond or so. When fewer
/// come in the time, the next batch waits for fewer, and a load that fades stops the holding within a statement or
/// two.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Linger {
    units: usize,
}

impl Linger {
    /// What a statement of `units` units tells the next batch.
    fn after_statement_of(units: usize) -> Self {
        Self {
            units: if units > 1 {
                units.min(LINGER_UNITS)
            } else {
                0
            },
        }
    }

    /// Whether a batch of `units` units is held open for more.
    fn holds(self, units: usize) -> bool {
        units < self.units
    }
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
    let mut payloads = Vec::with_capacity(events);
    let mut metadatas = Vec::with_capacity(events);
    for (index, unit) in batch.iter().enumerate() {
        for event in &unit.events {
            units.push(i64::try_from(index).unwrap_or(i64::MAX));
            aggregate_types.push(event.aggregate_type.as_str());
            aggregate_ids.push(event.aggregate_id.as_str());
            sequences.push(i64::try_from(event.sequence).unwrap_or(i64::MAX));
            event_types.push(event.event_type.as_str());
            event_versions.push(event.event_version.as_str());
            payloads.push(event.payload.to_string());
            metadatas.push(event.metadata.to_string());
        }
    }
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
            reading.observe(head);
            metrics::histogram!("whist_append_batch_units").record(batch.len() as f64);
            let lost: HashSet<i64> = lost.into_iter().collect();
            for (index, unit) in batch.into_iter().enumerate() {
                let outcome = if lost.contains(&i64::try_from(index).unwrap_or(i64::MAX)) {
                    Err(PersistenceError::OptimisticLockError)
                } else {
                    Ok(())
                };
                let _ = unit.reply.send(outcome);
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::{mpsc, oneshot};
    use tokio::time::Instant;

    use super::{gather, Linger, Unit, LINGER, LINGER_UNITS};

    fn unit() -> Unit {
        Unit {
            events: Vec::new(),
            reply: oneshot::channel().0,
        }
    }

    /// Queues a unit on `queue` after `turns` turns of the scheduler: later than the flusher's own turn, but at the
    /// same instant of the test's paused clock.
    fn queue_after_turns(queue: &mpsc::Sender<Unit>, turns: usize) {
        let queue = queue.clone();
        tokio::spawn(async move {
            for _ in 0..turns {
                tokio::task::yield_now().await;
            }
            let _ = queue.send(unit()).await;
        });
    }

    /// Queues a unit on `queue` after `delay` of the test's paused clock.
    fn queue_after(queue: &mpsc::Sender<Unit>, delay: Duration) {
        let queue = queue.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = queue.send(unit()).await;
        });
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_statement_of_one_unit_a_batch_is_written_at_once_whatever_comes_next() {
        let (queue, mut receiver) = mpsc::channel(16);
        queue.send(unit()).await.expect("queued");
        queue_after_turns(&queue, 3);
        let began = Instant::now();
        let batch = gather(&mut receiver, Linger::after_statement_of(1))
            .await
            .expect("a batch");
        assert_eq!(batch.units.len(), 1);
        assert_eq!(began.elapsed(), Duration::ZERO);
        let batch = gather(&mut receiver, Linger::default())
            .await
            .expect("a batch");
        assert_eq!(batch.units.len(), 1, "the second rides the next statement");
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_statement_of_several_units_a_batch_waits_for_as_many_and_no_longer() {
        let (queue, mut receiver) = mpsc::channel(16);
        queue.send(unit()).await.expect("queued");
        queue_after_turns(&queue, 3);
        queue_after_turns(&queue, 6);
        queue_after(&queue, Duration::from_millis(5));
        let began = Instant::now();
        let batch = gather(&mut receiver, Linger::after_statement_of(3))
            .await
            .expect("a batch");
        assert_eq!(batch.units.len(), 3, "the units of the writers expected");
        assert_eq!(began.elapsed(), Duration::ZERO, "no longer than they took");
        let next = gather(&mut receiver, Linger::after_statement_of(1))
            .await
            .expect("a batch");
        assert_eq!(next.units.len(), 1, "the fourth rides the next statement");
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_held_for_the_linger_at_most() {
        let (queue, mut receiver) = mpsc::channel(16);
        queue.send(unit()).await.expect("queued");
        queue_after_turns(&queue, 3);
        queue_after(&queue, 5 * LINGER);
        let began = Instant::now();
        let batch = gather(&mut receiver, Linger::after_statement_of(4))
            .await
            .expect("a batch");
        assert_eq!(batch.units.len(), 2);
        let held = began.elapsed();
        // tokio's timers fire on whole milliseconds.
        assert!(held >= LINGER && held <= 2 * LINGER, "held {held:?}");
    }
    #[tokio::test(start_paused = true)]
    async fn a_closed_queue_ends_the_hold_and_then_the_flusher() {
        let (queue, mut receiver) = mpsc::channel(16);
        queue.send(unit()).await.expect("queued");
        drop(queue);
        let batch = gather(&mut receiver, Linger::after_statement_of(4))
            .await
            .expect("a batch");
        assert_eq!(batch.units.len(), 1);
        assert!(gather(&mut receiver, Linger::default()).await.is_none());
    }

    #[test]
    fn after_a_statement_of_one_unit_the_next_batch_is_written_at_once() {
        let linger = Linger::after_statement_of(1);
        assert!(!linger.holds(1));
        assert!(!Linger::default().holds(1), "the flusher's first batch");
    }

    #[test]
    fn after_a_statement_of_several_units_a_batch_is_held_until_it_carries_as_many() {
        let linger = Linger::after_statement_of(4);
        assert!(linger.holds(1));
        assert!(linger.holds(3));
        assert!(!linger.holds(4));
        assert!(!linger.holds(5));
    }

    #[test]
    fn a_batch_is_never_held_for_more_than_the_units_that_already_share_a_statement_well() {
        let linger = Linger::after_statement_of(64);
        assert!(linger.holds(LINGER_UNITS - 1));
        assert!(!linger.holds(LINGER_UNITS));
    }
}
