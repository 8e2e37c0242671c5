//! Reading the global log, and the signal that says it may have moved.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::{Any, AnyPool, Executor, Row};
use tokio::sync::watch;
use whist_domain::metadata::MetadataError;
use whist_domain::EventMetadata;

/// One event as stored in the global log. The payload and metadata stay raw JSON text until a reader asks for
/// them, because most readers (rebuilds, exports, indexes) need only some events' payloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: String,
    pub metadata: String,
}

impl LoggedEvent {
    /// The payload as JSON.
    ///
    /// # Errors
    /// The stored payload is not JSON (it always is unless the table was edited by hand).
    pub fn payload_json(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(&self.payload)
    }

    /// The payload as the aggregate's event type, in its current shape: an old version is upcast first
    /// (`whist_domain::versions`).
    ///
    /// # Errors
    /// The payload does not have the event's shape (or an old version's).
    pub fn payload_as<E: serde::de::DeserializeOwned>(&self) -> Result<E, serde_json::Error> {
        if !whist_domain::versions::needs_upcast(&self.event_type, &self.event_version) {
            return serde_json::from_str(&self.payload);
        }
        let stored: Value = serde_json::from_str(&self.payload)?;
        let (_, current) =
            whist_domain::versions::upcast(&self.event_type, &self.event_version, stored)
                .map_err(serde::de::Error::custom)?;
        serde_json::from_value(current)
    }

    /// The metadata recorded with the event.
    ///
    /// # Errors
    /// The stored metadata lacks a field or has a malformed one.
    pub fn metadata(&self) -> Result<EventMetadata, MetadataError> {
        let map = serde_json::from_str(&self.metadata)
            .map_err(|_| MetadataError::Malformed("metadata"))?;
        EventMetadata::from_map(&map)
    }

    /// One event from a row with the log's columns (`position` … `metadata`).
    pub(crate) fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            position: row.try_get("position")?,
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            payload: row.try_get("payload")?,
            metadata: row.try_get("metadata")?,
        })
    }
}

const SELECT_ONE: &str = "
SELECT position, aggregate_type, aggregate_id, sequence, event_type, event_version,
       CAST(payload AS TEXT) AS payload, CAST(metadata AS TEXT) AS metadata
  FROM events
 WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3";

const SELECT_LAST: &str = "
SELECT position, aggregate_type, aggregate_id, sequence, event_type, event_version,
       CAST(payload AS TEXT) AS payload, CAST(metadata AS TEXT) AS metadata
  FROM events
 WHERE aggregate_type = $1 AND aggregate_id = $2
 ORDER BY sequence DESC
 LIMIT 1";

const SELECT_AFTER: &str = "
SELECT position, aggregate_type, aggregate_id, sequence, event_type, event_version,
       CAST(payload AS TEXT) AS payload, CAST(metadata AS TEXT) AS metadata
  FROM events
 WHERE position > $1
 ORDER BY position
 LIMIT $2";

/// Reads the global log: every event with a position, in position order.
#[derive(Clone, Debug)]
pub struct EventLog {
    pool: AnyPool,
    watermark: LogWatermark,
}

impl EventLog {
    /// A reader of the log in `pool` that shares the process's watermark (and with it the stretch of the log the
    /// process read last) with its other readers.
    pub(crate) fn new(pool: AnyPool, watermark: LogWatermark) -> Self {
        Self { pool, watermark }
    }

    /// The process's watermark: the highest position it has seen, and what it forgets should the log move back.
    pub fn watermark(&self) -> &LogWatermark {
        &self.watermark
    }

    /// Up to `limit` events after `after`, in order: from the stretch of the log this process read or appended
    /// last when it holds the next event and reaches `limit` events or `head` (the head the reader found), else
    /// read through `executor` (and kept for the next reader). Every projection of a process reads the same new
    /// events; what the process appended, and what one projection read, the others take from memory. A read from
    /// memory never returns other events than the database holds: positions have no gaps and a stored event never
    /// changes. What is read from the store raises the watermark, so that the stretch never holds an event past what
    /// the process has seen: should the log move back below it, the next head read drops the stretch before anything
    /// in it is served again.
    ///
    /// # Errors
    /// The database failed, or a row does not have the log's shape.
    pub async fn read_after_in<'c, E>(
        &self,
        executor: E,
        after: i64,
        limit: i64,
        head: i64,
    ) -> Result<Vec<LoggedEvent>, sqlx::Error>
    where
        E: Executor<'c, Database = Any>,
    {
        let recent = &self.watermark.inner.recent;
        if let Some(events) = recent.after(after, limit, head) {
            return Ok(events);
        }
        let rewinds_before = recent.rewinds();
        let events = Self::read_after_with(executor, after, limit).await?;
        // What is read from the store has been seen: a head found below it later is a log that moved back. Unless
        // a rewind overtook the read: it may have answered from the primary the log moved back from.
        if recent.keep(rewinds_before, after, Cow::Borrowed(&events)) {
            if let Some(last) = events.last() {
                self.watermark
                    .inner
                    .highest
                    .fetch_max(last.position, std::sync::atomic::Ordering::SeqCst);
            }
        }
        Ok(events)
    }

    /// Up to `limit` events after `after`, in order, through the given connection or transaction.
    ///
    /// # Errors
    /// The database failed, or a row does not have the log's shape.
    pub async fn read_after_with<'c, E>(
        executor: E,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LoggedEvent>, sqlx::Error>
    where
        E: Executor<'c, Database = Any>,
    {
        let rows = sqlx::query(SELECT_AFTER)
            .bind(after)
            .bind(limit)
            .fetch_all(executor)
            .await?;
        rows.iter().map(LoggedEvent::from_row).collect()
    }

    /// Up to `limit` events after `after`, in order.
    ///
    /// # Errors
    /// The database failed.
    pub async fn read_after(
        &self,
        after: i64,
        limit: i64,
    ) -> Result<Vec<LoggedEvent>, sqlx::Error> {
        Self::read_after_with(&self.pool, after, limit).await
    }

    /// The last position handed out.
    ///
    /// # Errors
    /// The database failed.
    pub async fn head_with<'c, E>(executor: E) -> Result<i64, sqlx::Error>
    where
        E: Executor<'c, Database = Any>,
    {
        sqlx::query_scalar("SELECT position FROM event_log_head WHERE id = 1")
            .fetch_one(executor)
            .await
    }

    /// The last position handed out (and given to the watermark).
    ///
    /// # Errors
    /// The database failed.
    pub async fn head(&self) -> Result<i64, sqlx::Error> {
        let reading = self.watermark.reading_head();
        let head = Self::head_with(&self.pool).await?;
        reading.observe(head);
        Ok(head)
    }

    /// One aggregate's event at `sequence`, with its position and metadata: for a decision that event caused (its
    /// `causation_id` is the position, its chain the event's). `None` for an event not stored.
    ///
    /// # Errors
    /// The database failed, or the row does not have the log's shape.
    pub async fn event_at(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        sequence: i64,
    ) -> Result<Option<LoggedEvent>, sqlx::Error> {
        let row = sqlx::query(SELECT_ONE)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .bind(sequence)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(LoggedEvent::from_row).transpose()
    }

    /// One aggregate's last event (as [`EventLog::event_at`]); `None` for an aggregate with no events.
    ///
    /// # Errors
    /// The database failed, or the row does not have the log's shape.
    pub async fn last_event_of(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<LoggedEvent>, sqlx::Error> {
        let row = sqlx::query(SELECT_LAST)
            .bind(aggregate_type)
            .bind(aggregate_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(LoggedEvent::from_row).transpose()
    }
}

/// Events to keep in memory for the other readers of the process.
const RECENT_EVENTS: usize = 10_000;

/// The stretch of the log a process read or appended last: consecutive positions, extended as the readers move
/// forward and as this process's appends commit. A reader that lags (a projection catching up) reads from the
/// database and leaves the stretch alone.
///
/// An append commits under the log's one append lock, held through the commit, so when it returns every position up
/// to its last is committed: its events, numbered as the append numbered them, are the log's from there on, and this
/// process's projections need not read back from the database what it has just written.
#[derive(Clone, Debug, Default)]
pub(crate) struct RecentEvents {
    inner: Arc<std::sync::Mutex<Stretch>>,
}

#[derive(Debug, Default)]
struct Stretch {
    events: std::collections::VecDeque<LoggedEvent>,
    /// The rewinds the stretch was dropped for so far: what a read or an append began under is kept only if none
    /// came since.
    rewinds: u64,
}

impl Stretch {
    /// Extends the stretch with `events`, consecutive from `after + 1`: the part past its end when they reach
    /// it, all of them in a new stretch when they begin past its end; nothing when they lie within it.
    fn extend(&mut self, after: i64, events: impl IntoIterator<Item = LoggedEvent>) {
        let end = self.events.back().map(|event| event.position);
        let mut events = events.into_iter().peekable();
        match end {
            Some(end) if end >= after => {
                while events.next_if(|event| event.position <= end).is_some() {}
            }
            _ => self.events.clear(),
        }
        self.events.extend(events);
        while self.events.len() > RECENT_EVENTS {
            self.events.pop_front();
        }
    }
}

/// `events` hold consecutive positions from `after + 1`, and there is at least one.
fn consecutive_after(after: i64, events: &[LoggedEvent]) -> bool {
    !events.is_empty()
        && events
            .iter()
            .zip(after + 1..)
            .all(|(event, position)| event.position == position)
}

impl RecentEvents {
    /// Forgets the whole stretch: the log moved back.
    fn forget_for_rewind(&self) {
        if let Ok(mut recent) = self.inner.lock() {
            recent.events.clear();
            recent.rewinds += 1;
        }
    }

    /// The rewinds so far (see [`RecentEvents::keep`]).
    fn rewinds(&self) -> u64 {
        self.inner.lock().map(|recent| recent.rewinds).unwrap_or(0)
    }

    /// Up to `limit` events after `after` when the stretch holds the next one and reaches as far as a read of the
    /// store would: `limit` events, or the head, `head`, the reader found (a shorter batch would cost the reader
    /// another step).
    fn after(&self, after: i64, limit: i64, head: i64) -> Option<Vec<LoggedEvent>> {
        if limit <= 0 {
            return None;
        }
        let recent = self.inner.lock().ok()?;
        let first = recent.events.front()?.position;
        let last = recent.events.back()?.position;
        let skip = usize::try_from(after + 1 - first).ok()?;
        if skip >= recent.events.len() || last < after.saturating_add(limit).min(head) {
            return None;
        }
        let take = usize::try_from(limit).unwrap_or(0);
        Some(
            recent
                .events
                .iter()
                .skip(skip)
                .take(take)
                .cloned()
                .collect(),
        )
    }

    /// Keeps `events`, read or appended after `after` by a step begun when `rewinds_before` rewinds had been
    /// handled, where they continue the stretch (or start a new one ahead of it); `false`, keeping nothing, when a
    /// rewind came since: the step may have read from, or committed on, the primary the log has moved back from,
    /// so its events may be phantoms.
    fn keep(&self, rewinds_before: u64, after: i64, events: Cow<'_, [LoggedEvent]>) -> bool {
        let Ok(mut recent) = self.inner.lock() else {
            return false;
        };
        if recent.rewinds != rewinds_before {
            return false;
        }
        if consecutive_after(after, &events) {
            match events {
                Cow::Borrowed(events) => recent.extend(after, events.iter().cloned()),
                Cow::Owned(events) => recent.extend(after, events),
            }
        }
        true
    }
}

/// The highest position this process has seen, and what it must forget should the log ever be found below it.
///
/// On one durable primary the head only moves forward. It moves back after a failover to an asynchronous standby
/// that had not received the last commits, a point-in-time restore, or a crash with `synchronous_commit=off`: the
/// positions after the new head are handed out again, to other events. Everything a process remembers of the log
/// past that point is then a phantom: its stretch of recent events (which readers would be served instead of the
/// real new events) and its remembered aggregate copies (which would decide on lost events, and append after
/// them). Every read of the head goes through [`LogWatermark::reading_head`]; the first one that finds the head
/// below what this process had seen before that read began drops all of it, logs an error, counts
/// `whist_log_rewinds_total`, and the process carries on from the store.
#[derive(Clone, Default)]
pub struct LogWatermark {
    inner: Arc<WatermarkInner>,
}

#[derive(Default)]
struct WatermarkInner {
    highest: std::sync::atomic::AtomicI64,
    /// The stretch of the log this process read last, shared by its readers.
    recent: RecentEvents,
    /// What else to forget on a rewind (each store's remembered copies); held for the rewind itself too, so that
    /// two observers never both handle one.
    forgetters: std::sync::Mutex<Vec<Box<dyn Fn() + Send + Sync>>>,
}

impl std::fmt::Debug for LogWatermark {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LogWatermark")
            .field("highest", &self.highest())
            .finish_non_exhaustive()
    }
}

/// A read of the head under way: what the process had seen when it began (see [`LogWatermark::reading_head`]).
#[must_use = "a head read is given to the watermark with `observe`"]
pub struct HeadReading<'a> {
    watermark: &'a LogWatermark,
    seen_before: i64,
    rewinds_before: u64,
}

impl HeadReading<'_> {
    /// Gives the head the read found to the watermark; `true` when it was below what the process had seen before
    /// the read began: the log moved back, and everything remembered past it was dropped.
    pub fn observe(self, head: i64) -> bool {
        self.watermark.observe(head, self.seen_before)
    }

    /// Gives the head an append of this process found, with the events it appended (numbered, consecutive up to
    /// the head), as [`HeadReading::observe`] does; the events join the process's stretch of the log, so that its
    /// readers (the projections) are served them without reading them back.
    pub(crate) fn observe_appended(self, head: i64, events: Vec<LoggedEvent>) -> bool {
        let rewound = self.watermark.observe(head, self.seen_before);
        if !rewound {
            let after = head - i64::try_from(events.len()).unwrap_or(i64::MAX);
            self.watermark
                .inner
                .recent
                .keep(self.rewinds_before, after, Cow::Owned(events));
        }
        rewound
    }
}

impl LogWatermark {
    /// The highest position this process has seen.
    pub fn highest(&self) -> i64 {
        self.inner.highest.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Begins a read of the head. Only a read that began after the process saw a position can tell that the log
    /// moved back below it: a read that began earlier may simply have been overtaken (one task saw position 100
    /// while another's query, begun before that commit, still answers 95).
    pub fn reading_head(&self) -> HeadReading<'_> {
        HeadReading {
            watermark: self,
            seen_before: self.highest(),
            rewinds_before: self.inner.recent.rewinds(),
        }
    }

    /// Registers something to forget when the log moves back (a store's remembered copies).
    pub fn on_rewind(&self, forget: impl Fn() + Send + Sync + 'static) {
        if let Ok(mut forgetters) = self.inner.forgetters.lock() {
            forgetters.push(Box::new(forget));
        }
    }

    /// Forgets every remembered aggregate copy of the process (the log follower starting over), without the
    /// bookkeeping of a rewind.
    pub(crate) fn forget_remembered(&self) {
        if let Ok(forgetters) = self.inner.forgetters.lock() {
            for forget in forgetters.iter() {
                forget();
            }
        }
    }

    fn observe(&self, head: i64, seen_before: i64) -> bool {
        use std::sync::atomic::Ordering;
        if head >= seen_before {
            self.inner.highest.fetch_max(head, Ordering::SeqCst);
            return false;
        }
        let Ok(forgetters) = self.inner.forgetters.lock() else {
            return false;
        };
        let seen = self.highest();
        if head >= seen {
            // Another observer handled this rewind while this one waited.
            return false;
        }
        self.inner.recent.forget_for_rewind();
        for forget in forgetters.iter() {
            forget();
        }
        self.inner.highest.store(head, Ordering::SeqCst);
        metrics::counter!("whist_log_rewinds_total").increment(1);
        tracing::error!(
            seen,
            head,
            lost = seen - head,
            "the event log moved back (a failover to a standby that lagged, or a restore): positions after the head \
             will be handed out again; every remembered aggregate copy and the recent stretch of the log are dropped, \
             and this process carries on from the store"
        );
        true
    }
}

/// How long a reader that was caught up waits after the head moved before it reads, so that one read (and one
/// transaction of a projection, one claim of the reconciler) serves the appends of that window instead of one each.
/// Appends come in bursts under load; without the window every projection would commit once per append.
pub const GATHER_WINDOW: std::time::Duration = std::time::Duration::from_millis(20);

/// A counter that wakes whoever waits on it each time it is raised: the one mechanism under [`LogSignal`] and
/// [`JobsSignal`], which say what the wait is for.
#[derive(Clone, Debug)]
struct Wakeup {
    inner: Arc<watch::Sender<u64>>,
}

impl Default for Wakeup {
    fn default() -> Self {
        Self {
            inner: Arc::new(watch::channel(0).0),
        }
    }
}

impl Wakeup {
    fn raise(&self) {
        self.inner.send_modify(|count| *count += 1);
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.subscribe()
    }
}

/// Wakes the parts of this process that wait on the log (projections, the log follower) when the head moved: this
/// process appended (an append gives its events their positions), or another process did (Postgres
/// `LISTEN/NOTIFY`, see `LogListener`).
#[derive(Clone, Debug, Default)]
pub struct LogSignal(Wakeup);

impl LogSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// The log's head moved: this process appended (its events have their positions), or another did.
    pub fn advanced(&self) {
        self.0.raise();
    }

    /// A receiver that changes whenever the head moves.
    pub fn on_advance(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

/// Wakes the reconciler when jobs were planned: this process's `jobs` projection committed a batch, or another
/// process's planned jobs waiting to be claimed (Postgres `NOTIFY whist_jobs_planned`, see `LogListener`). Without
/// it a reconciler woken by an append claims before the planner has planned that append's jobs, and the spin-up
/// waits for the reconciler's next poll (half a second in a quiet system).
#[derive(Clone, Debug, Default)]
pub struct JobsSignal(Wakeup);

impl JobsSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Jobs were planned, here or in another process.
    pub fn planned(&self) {
        self.0.raise();
    }

    /// A receiver that changes whenever jobs were planned.
    pub fn on_planned(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::{LogWatermark, LoggedEvent, RecentEvents};

    fn events(positions: &[i64]) -> Vec<LoggedEvent> {
        positions
            .iter()
            .map(|&position| LoggedEvent {
                position,
                aggregate_type: "probe".to_string(),
                aggregate_id: format!("p-{position}"),
                sequence: 1,
                event_type: "ProbeIncremented".to_string(),
                event_version: "1.0".to_string(),
                payload: "{}".to_string(),
                metadata: "{}".to_string(),
            })
            .collect()
    }

    /// A read of `positions` after `after` with no rewind under way, given to the stretch.
    fn read(recent: &RecentEvents, after: i64, positions: &[i64]) {
        assert!(recent.keep(recent.rewinds(), after, Cow::Owned(events(positions))));
    }

    fn positions(read: Option<Vec<LoggedEvent>>) -> Option<Vec<i64>> {
        read.map(|events| events.iter().map(|event| event.position).collect())
    }

    #[test]
    fn readers_after_the_first_get_the_same_events_from_memory() {
        let recent = RecentEvents::default();
        assert_eq!(positions(recent.after(0, 10, 3)), None, "nothing read yet");
        read(&recent, 0, &[1, 2, 3]);
        assert_eq!(positions(recent.after(0, 10, 3)), Some(vec![1, 2, 3]));
        assert_eq!(
            positions(recent.after(1, 1, 3)),
            Some(vec![2]),
            "the limit holds"
        );
        assert_eq!(
            positions(recent.after(3, 10, 3)),
            None,
            "what follows is read from the database"
        );
        read(&recent, 3, &[4, 5]);
        assert_eq!(positions(recent.after(2, 10, 5)), Some(vec![3, 4, 5]));
    }

    #[test]
    fn a_lagging_reader_leaves_the_stretch_alone_and_a_jump_ahead_starts_a_new_one() {
        let recent = RecentEvents::default();
        read(&recent, 10, &[11, 12]);
        read(&recent, 4, &[5, 6]);
        assert_eq!(
            positions(recent.after(4, 10, 12)),
            None,
            "the lagging read is not kept"
        );
        assert_eq!(positions(recent.after(10, 10, 12)), Some(vec![11, 12]));
        read(&recent, 20, &[21]);
        assert_eq!(
            positions(recent.after(10, 10, 21)),
            None,
            "a gap starts afresh"
        );
        assert_eq!(positions(recent.after(20, 10, 21)), Some(vec![21]));
    }

    #[test]
    fn a_read_that_reaches_past_the_end_of_the_stretch_extends_it() {
        let recent = RecentEvents::default();
        read(&recent, 0, &[1, 2, 3]);
        read(&recent, 1, &[2, 3, 4, 5]);
        assert_eq!(
            positions(recent.after(0, 10, 5)),
            Some(vec![1, 2, 3, 4, 5]),
            "the events past 3 continue the stretch"
        );
    }

    #[test]
    fn a_stretch_that_stops_short_of_the_head_is_not_served() {
        let recent = RecentEvents::default();
        read(&recent, 0, &[1]);
        assert_eq!(
            positions(recent.after(0, 10, 2)),
            None,
            "the store holds 2 as well: one read of it serves both"
        );
        assert_eq!(positions(recent.after(0, 10, 1)), Some(vec![1]));
        assert_eq!(
            positions(recent.after(0, 1, 2)),
            Some(vec![1]),
            "the limit is reached"
        );
    }

    #[test]
    fn what_this_process_appended_is_served_without_a_read() {
        let watermark = LogWatermark::default();
        assert!(!watermark
            .reading_head()
            .observe_appended(3, events(&[1, 2, 3])));
        assert!(!watermark
            .reading_head()
            .observe_appended(5, events(&[4, 5])));
        assert_eq!(
            positions(watermark.inner.recent.after(0, 10, 5)),
            Some(vec![1, 2, 3, 4, 5])
        );
        assert_eq!(watermark.highest(), 5);
    }

    #[test]
    fn an_append_begun_before_a_rewind_adds_nothing_to_the_stretch() {
        let watermark = LogWatermark::default();
        assert!(!watermark.reading_head().observe(85));
        let append = watermark.reading_head();
        assert!(
            watermark.reading_head().observe(48),
            "another reader finds the log moved back"
        );
        assert!(!append.observe_appended(90, events(&[86, 87, 88, 89, 90])));
        assert_eq!(
            positions(watermark.inner.recent.after(85, 10, 90)),
            None,
            "the append may have committed on the primary the log moved back from"
        );
    }

    #[test]
    fn a_read_begun_before_a_rewind_adds_nothing_to_the_stretch() {
        let watermark = LogWatermark::default();
        let recent = &watermark.inner.recent;
        assert!(!watermark.reading_head().observe(85));
        read(recent, 80, &[81, 82, 83, 84, 85]);
        let slow_read_began_under = recent.rewinds();
        assert!(
            watermark.reading_head().observe(48),
            "another reader finds the log moved back"
        );
        assert!(
            !recent.keep(slow_read_began_under, 85, Cow::Owned(events(&[86, 87]))),
            "the read may have answered from the primary the log moved back from"
        );
        assert_eq!(positions(recent.after(85, 10, 87)), None);
        read(recent, 48, &[49, 50]);
        assert_eq!(
            positions(recent.after(48, 10, 50)),
            Some(vec![49, 50]),
            "a read begun after the rewind is kept"
        );
    }

    #[test]
    fn events_with_a_gap_are_not_kept() {
        let recent = RecentEvents::default();
        read(&recent, 0, &[1, 3]);
        assert_eq!(positions(recent.after(0, 10, 3)), None);
        read(&recent, 0, &[2]);
        assert_eq!(positions(recent.after(0, 10, 3)), None, "not after 0");
    }

    #[test]
    fn a_head_below_what_was_seen_before_the_read_began_drops_everything_remembered() {
        let watermark = LogWatermark::default();
        let forgotten = Arc::new(AtomicUsize::new(0));
        let counter = forgotten.clone();
        watermark.on_rewind(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        assert!(!watermark.reading_head().observe(85));
        read(&watermark.inner.recent, 80, &[81, 82, 83, 84, 85]);

        assert!(
            watermark.reading_head().observe(48),
            "the log moved back from 85 to 48"
        );
        assert_eq!(forgotten.load(Ordering::SeqCst), 1, "the stores forgot");
        assert_eq!(
            positions(watermark.inner.recent.after(80, 10, 85)),
            None,
            "the phantom stretch is gone"
        );
        assert_eq!(
            watermark.highest(),
            48,
            "the process carries on from the store"
        );
        assert!(!watermark.reading_head().observe(49), "new appends go on");
        assert_eq!(forgotten.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_read_overtaken_by_a_later_one_is_no_rewind() {
        let watermark = LogWatermark::default();
        assert!(!watermark.reading_head().observe(90));
        let slow = watermark.reading_head();
        assert!(
            !watermark.reading_head().observe(100),
            "another task saw 100"
        );
        assert!(
            !slow.observe(95),
            "a read begun when 90 was the highest seen may answer 95 after another saw 100"
        );
        assert_eq!(watermark.highest(), 100);
    }
}
