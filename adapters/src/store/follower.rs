//! Following the log: every process reads the key of each event appended after it started (type, id, sequence),
//! then the payloads of only those events a copy of its own needs, and keeps its remembered copy of that aggregate
//! current: a copy one event behind has the event applied,
//! an aggregate another process created (its first event) is remembered from it, and a copy the event cannot bring
//! up to date (one marked behind already, or further behind) is marked behind. A copy that is not marked is then as
//! current as the process's position in the log. So a follow-up that lands on another process than the one that
//! decided before it (a spin-up's outcome, a host's report, a disconnect through a balancer) finds a current copy
//! there instead of reading the aggregate's history, and a copy another process changed costs no catch-up read.
//!
//! Reads that used to bring a copy up to date on every use (the subscription on every assign, the maintenance
//! switch, the mandelbox before its spin-up: one statement each) use the remembered copy instead while the
//! follower is current ([`LogFollowing::is_current`]: its last read that reached the head began at most
//! [`FOLLOW_LAG_BOUND`] ago), and read it caught up as before while it is not (a database outage, a process so
//! loaded that the follower lags). What such a read may miss is what other processes recorded in the last
//! [`FOLLOW_LAG_BOUND`]. Decisions are unaffected: every unit is still checked by optimistic concurrency.
//!
//! Each of its reads that reaches the head is a read of the head (`LogWatermark`): the process's head watch.
//!
//! The follower starts from the head as it finds it, after forgetting every remembered copy (one remembered
//! before could miss an event between its load and that head), and checks on every read that the event it last
//! followed is still stored as it was: should the log have moved back (a failover to a standby that lagged, a
//! restore), it forgets every copy again and starts over from the new head.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::{AnyPool, Row};
use tokio::sync::watch;

use super::log::{LogSignal, LogWatermark, GATHER_WINDOW};
use crate::supervision::BackgroundLoops;

/// The supervised loop that follows the log.
pub const FOLLOW_LOOP: &str = "log_follow";

/// How far behind the log a copy read "as of the log" may be: the follower must have begun a read that reached the
/// head at most this long ago, or the copy is read caught up.
pub const FOLLOW_LAG_BOUND: Duration = Duration::from_millis(250);

/// How often the follower reads when nothing wakes it (other processes' appends wake it through `LISTEN` on
/// Postgres; this keeps it current without them, and on SQLite, where other processes' appends raise nothing).
const IDLE_READ: Duration = Duration::from_millis(100);

/// Keys read per statement.
const BATCH: i64 = 4096;

const SELECT_LAST: &str =
    "SELECT position, aggregate_type, aggregate_id, sequence FROM events ORDER BY position DESC LIMIT 1";

const SELECT_FROM: &str = "SELECT position, aggregate_type, aggregate_id, sequence FROM events \
     WHERE position >= $1 ORDER BY position LIMIT $2";

/// Keeps the remembered copies of one aggregate type current with the events the follower reads (see the module
/// documentation): a store's side of the follower.
pub(crate) trait CopyKeeper: Send + Sync {
    /// Whether the copy of this aggregate needs the event at `sequence` applied (its payload read): one
    /// remembered one event behind it, or none when it is the aggregate's first event.
    fn wants(&self, aggregate_id: &str, sequence: i64) -> bool;

    /// Keeps the copy current with the event: applies it when it carries its payload and the copy still wants it,
    /// else marks the copy behind when the event is newer.
    fn keep(&self, event: &FollowedEvent);
}

type Keeper = Box<dyn CopyKeeper>;

/// How the follower reads the payloads it wants, by position, in one statement: the SQL and the list of positions
/// as its one parameter, for each backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    Postgres,
    Sqlite,
}

impl Dialect {
    fn select_payloads(self) -> &'static str {
        match self {
            Self::Postgres => {
                "SELECT position, event_type, event_version, CAST(payload AS TEXT) AS payload FROM events \
                 WHERE position = ANY(CAST($1 AS BIGINT[]))"
            }
            Self::Sqlite => {
                "SELECT position, event_type, event_version, CAST(payload AS TEXT) AS payload FROM events \
                 WHERE position IN (SELECT value FROM json_each($1))"
            }
        }
    }

    /// `{1,5,9}` (a Postgres array) or `[1,5,9]` (JSON, for SQLite's `json_each`).
    fn positions(self, positions: &[i64]) -> String {
        let list = positions
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        match self {
            Self::Postgres => format!("{{{list}}}"),
            Self::Sqlite => format!("[{list}]"),
        }
    }
}

/// The key of one event in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EventKey {
    position: i64,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
}

/// One event as the follower reads it: its key, and its payload when a copy wanted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FollowedEvent {
    key: EventKey,
    pub(crate) payload: Option<FollowedPayload>,
}

/// What a store needs to apply an event to a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FollowedPayload {
    pub(crate) event_type: String,
    pub(crate) event_version: String,
    /// As stored (JSON text).
    pub(crate) payload: String,
}

impl FollowedEvent {
    pub(crate) fn aggregate_id(&self) -> &str {
        &self.key.aggregate_id
    }

    pub(crate) fn sequence(&self) -> i64 {
        self.key.sequence
    }
}

/// Where the follower stands: the last event it followed (`None` in an empty log) and when its last read that
/// reached the head began.
#[derive(Debug, Clone)]
struct Followed {
    last: Option<EventKey>,
    complete: Instant,
}

/// The follower's standing and the keepers of every store of the process. Clones share them.
#[derive(Clone, Default)]
pub struct LogFollowing {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Held while copies are kept or forgotten, so that nothing is changed or forgotten once `stop` returns.
    standing: Mutex<Standing>,
    /// When the last read that reached the head began, once the copies were kept with what it read (`None` while
    /// not following): what `is_current` reads, under a lock of its own so that it never waits for the keepers.
    current_as_of: Mutex<Option<Instant>>,
    keepers: Mutex<HashMap<String, Vec<Keeper>>>,
}

#[derive(Default)]
struct Standing {
    followed: Option<Followed>,
    stopped: bool,
}

impl std::fmt::Debug for LogFollowing {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LogFollowing")
            .field("current", &self.is_current())
            .finish_non_exhaustive()
    }
}

impl LogFollowing {
    /// Whether a copy not marked behind is current as of the log, at most [`FOLLOW_LAG_BOUND`] ago.
    pub fn is_current(&self) -> bool {
        self.inner
            .current_as_of
            .lock()
            .ok()
            .and_then(|current_as_of| {
                current_as_of.map(|complete| complete.elapsed() <= FOLLOW_LAG_BOUND)
            })
            .unwrap_or(false)
    }

    /// Says what `standing` says of when the follower was last current (called with its lock held, after the
    /// copies were kept).
    fn publish(&self, standing: &Standing) {
        if let Ok(mut current_as_of) = self.inner.current_as_of.lock() {
            *current_as_of = standing.followed.as_ref().map(|followed| followed.complete);
        }
    }

    /// Stops following for good: from now on no copy is changed or forgotten by the follower, and every read as of
    /// the log is read caught up (for tools and tests that need copies to stay as they were left).
    pub fn stop(&self) {
        if let Ok(mut standing) = self.inner.standing.lock() {
            standing.stopped = true;
            standing.followed = None;
            self.publish(&standing);
        }
    }

    /// Registers the keeper of a store of aggregates of `aggregate_type`.
    pub(crate) fn on_event_of(&self, aggregate_type: &str, keeper: impl CopyKeeper + 'static) {
        if let Ok(mut keepers) = self.inner.keepers.lock() {
            keepers
                .entry(aggregate_type.to_string())
                .or_default()
                .push(Box::new(keeper));
        }
    }

    /// Keeps the copies `events` concern current and moves on past them; `complete` when the read that found them
    /// began and reached the head.
    fn follow(&self, events: &[FollowedEvent], complete: Option<Instant>) {
        let Ok(mut standing) = self.inner.standing.lock() else {
            return;
        };
        if standing.stopped {
            return;
        }
        let Some(followed) = standing.followed.as_mut() else {
            return;
        };
        if let Some(last) = events.last() {
            followed.last = Some(last.key.clone());
        }
        if let Some(complete) = complete {
            followed.complete = complete;
        }
        self.keep(events);
        self.publish(&standing);
    }

    fn keep(&self, events: &[FollowedEvent]) {
        let Ok(keepers) = self.inner.keepers.lock() else {
            return;
        };
        for event in events {
            if let Some(keepers) = keepers.get(&event.key.aggregate_type) {
                for keeper in keepers {
                    keeper.keep(event);
                }
            }
        }
    }

    /// The positions among `keys` whose payloads a copy of this process wants: those a keeper wants as its copies
    /// stand, and each event that follows a wanted one of the same aggregate in `keys` (its copy will stand just
    /// before it once the earlier one is applied).
    fn wanted(&self, keys: &[EventKey]) -> Vec<i64> {
        let Ok(keepers) = self.inner.keepers.lock() else {
            return Vec::new();
        };
        let mut last_wanted: HashMap<(&str, &str), i64> = HashMap::new();
        let mut wanted = Vec::new();
        for key in keys {
            let aggregate = (key.aggregate_type.as_str(), key.aggregate_id.as_str());
            let follows_a_wanted_one = last_wanted
                .get(&aggregate)
                .is_some_and(|&sequence| sequence + 1 == key.sequence);
            let wants = follows_a_wanted_one
                || keepers.get(&key.aggregate_type).is_some_and(|keepers| {
                    keepers
                        .iter()
                        .any(|keeper| keeper.wants(&key.aggregate_id, key.sequence))
                });
            if wants {
                last_wanted.insert(aggregate, key.sequence);
                wanted.push(key.position);
            }
        }
        wanted
    }

    fn last(&self) -> Option<Option<EventKey>> {
        self.inner.standing.lock().ok().and_then(|standing| {
            standing
                .followed
                .as_ref()
                .map(|followed| followed.last.clone())
        })
    }

    fn is_stopped(&self) -> bool {
        self.inner
            .standing
            .lock()
            .map_or(true, |standing| standing.stopped)
    }

    /// Follows from the head as it is now, unless already following, after forgetting every remembered copy:
    /// one remembered before this read may have missed events up to the head it finds; those remembered after it
    /// hold every event before it. (`Database::migrate` starts it before the process remembers anything.)
    ///
    /// # Errors
    /// The database failed (the log may not exist yet).
    pub(crate) async fn start_from_head(
        &self,
        pool: &AnyPool,
        watermark: &LogWatermark,
    ) -> Result<(), sqlx::Error> {
        if self.last().is_some() {
            return Ok(());
        }
        let began = Instant::now();
        let reading = watermark.reading_head();
        let last = sqlx::query(SELECT_LAST)
            .fetch_optional(pool)
            .await?
            .map(|row| key(&row))
            .transpose()?;
        reading.observe(last.as_ref().map_or(0, |last| last.position));
        if let Ok(mut standing) = self.inner.standing.lock() {
            if !standing.stopped && standing.followed.is_none() {
                watermark.forget_remembered();
                standing.followed = Some(Followed {
                    last,
                    complete: began,
                });
                self.publish(&standing);
            }
        }
        Ok(())
    }

    /// Stands at `followed` (`None`: starts over from the head on the next read) after `forget` has forgotten
    /// every copy: both unless stopped.
    fn set(&self, followed: Option<Followed>, forget: impl FnOnce()) {
        if let Ok(mut standing) = self.inner.standing.lock() {
            if !standing.stopped {
                forget();
                standing.followed = followed;
                self.publish(&standing);
            }
        }
    }

    /// Starts the follower in `loops`; it stops once the returned sender is dropped.
    pub(crate) fn start(
        &self,
        pool: &AnyPool,
        dialect: Dialect,
        signal: &LogSignal,
        watermark: &LogWatermark,
        loops: &BackgroundLoops,
    ) -> Arc<watch::Sender<bool>> {
        let (stop, stopped) = watch::channel(false);
        let follower = Follower {
            pool: pool.clone(),
            dialect,
            signal: signal.clone(),
            watermark: watermark.clone(),
            following: self.clone(),
        };
        loops.supervise(FOLLOW_LOOP, stopped, move |shutdown| {
            follower.clone().run(shutdown)
        });
        Arc::new(stop)
    }
}

#[derive(Clone)]
struct Follower {
    pool: AnyPool,
    dialect: Dialect,
    signal: LogSignal,
    watermark: LogWatermark,
    following: LogFollowing,
}

/// What one read found.
enum Step {
    /// The log as far as the read reached, and whether it reached the head.
    Followed { reached_head: bool },
    /// The event last followed is not stored as it was: the log moved back.
    Rewound,
}

impl Follower {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        // A restart (after a panic) carries on from the last event followed: each read's changes to copies and its
        // move past them are one step under the standing's lock.
        let mut advanced = self.signal.on_advance();
        loop {
            if *shutdown.borrow() {
                return;
            }
            if self.following.is_stopped() {
                // Stopped for good, not ended: a loop that ended would be restarted by its supervisor (with an
                // error logged each time). It waits for the process's shutdown instead.
                let _ = shutdown.wait_for(|stop| *stop).await;
                return;
            }
            let step = match self.following.last() {
                None => self
                    .following
                    .start_from_head(&self.pool, &self.watermark)
                    .await
                    .map(|()| Step::Followed { reached_head: true }),
                Some(last) => self.read_after(last).await,
            };
            match step {
                Ok(Step::Followed { reached_head: true }) => {}
                // More to read at once.
                Ok(Step::Followed {
                    reached_head: false,
                }) => continue,
                Ok(Step::Rewound) => {
                    tracing::warn!(
                        "the log follower found the event it last followed gone; starting over"
                    );
                    self.following.set(None, || {});
                    continue;
                }
                // An outage: the follower falls behind the bound, and copies are read caught up until it recovers.
                Err(error) => {
                    tracing::debug!(error = %error, "the log follower could not read the log")
                }
            }
            tokio::select! {
                changed = advanced.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Gather the appends of a burst into one read, as the log's other readers do.
                    tokio::time::sleep(GATHER_WINDOW).await;
                }
                _ = tokio::time::sleep(IDLE_READ) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Reads the keys after the last event followed (and that event itself, which must still be stored as it was),
    /// then the payloads of the events a copy wants, and keeps the copies they concern current.
    async fn read_after(&self, last: Option<EventKey>) -> Result<Step, sqlx::Error> {
        let began = Instant::now();
        let reading = self.watermark.reading_head();
        let from = last.as_ref().map_or(0, |last| last.position);
        let rows = sqlx::query(SELECT_FROM)
            .bind(from)
            .bind(BATCH + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut keys = rows.iter().map(key).collect::<Result<Vec<_>, _>>()?;
        if let Some(last) = &last {
            if keys.first() != Some(last) {
                return Ok(Step::Rewound);
            }
            keys.remove(0);
        }
        let reached_head = keys.len() < BATCH as usize;
        if reached_head {
            // A read of the head, as every other: one below what the process had seen is a log that moved back.
            reading.observe(keys.last().map_or(from, |newest| newest.position));
        }
        let mut payloads = self.payloads(&self.following.wanted(&keys)).await?;
        let events = keys
            .into_iter()
            .map(|key| FollowedEvent {
                payload: payloads.remove(&key.position),
                key,
            })
            .collect::<Vec<_>>();
        self.following
            .follow(&events, reached_head.then_some(began));
        Ok(Step::Followed { reached_head })
    }
}

impl Follower {
    /// The payloads at `positions` (none read when none is wanted: a process alone, whose copies are its own).
    async fn payloads(
        &self,
        positions: &[i64],
    ) -> Result<HashMap<i64, FollowedPayload>, sqlx::Error> {
        let mut payloads = HashMap::with_capacity(positions.len());
        if positions.is_empty() {
            return Ok(payloads);
        }
        let rows = sqlx::query(self.dialect.select_payloads())
            .bind(self.dialect.positions(positions))
            .fetch_all(&self.pool)
            .await?;
        for row in &rows {
            payloads.insert(
                row.try_get("position")?,
                FollowedPayload {
                    event_type: row.try_get("event_type")?,
                    event_version: row.try_get("event_version")?,
                    payload: row.try_get("payload")?,
                },
            );
        }
        Ok(payloads)
    }
}

fn key(row: &sqlx::any::AnyRow) -> Result<EventKey, sqlx::Error> {
    Ok(EventKey {
        position: row.try_get("position")?,
        aggregate_type: row.try_get("aggregate_type")?,
        aggregate_id: row.try_get("aggregate_id")?,
        sequence: row.try_get("sequence")?,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::{
        CopyKeeper, Dialect, EventKey, Followed, FollowedEvent, LogFollowing, FOLLOW_LAG_BOUND,
    };

    /// A keeper that wants no payload and adds up the sequences of the events it is given.
    struct Summing(Arc<AtomicI64>);

    impl CopyKeeper for Summing {
        fn wants(&self, _: &str, _: i64) -> bool {
            false
        }

        fn keep(&self, event: &FollowedEvent) {
            assert_eq!(event.aggregate_id(), "i-1");
            self.0.fetch_add(event.sequence(), Ordering::SeqCst);
        }
    }

    fn event(
        position: i64,
        aggregate_type: &str,
        aggregate_id: &str,
        sequence: i64,
    ) -> FollowedEvent {
        FollowedEvent {
            key: EventKey {
                position,
                aggregate_type: aggregate_type.to_string(),
                aggregate_id: aggregate_id.to_string(),
                sequence,
            },
            payload: None,
        }
    }

    #[test]
    fn a_follower_is_current_only_within_the_bound_of_its_last_read_to_the_head() {
        let following = LogFollowing::default();
        assert!(!following.is_current(), "not yet started");
        following.set(
            Some(Followed {
                last: None,
                complete: Instant::now(),
            }),
            || {},
        );
        assert!(following.is_current());
        let Some(long_ago) =
            Instant::now().checked_sub(FOLLOW_LAG_BOUND + Duration::from_millis(1))
        else {
            return;
        };
        following.set(
            Some(Followed {
                last: None,
                complete: long_ago,
            }),
            || {},
        );
        assert!(!following.is_current(), "its last read is too old");
    }

    #[test]
    fn a_stopped_follower_is_never_current_and_changes_nothing() {
        let following = LogFollowing::default();
        following.set(
            Some(Followed {
                last: None,
                complete: Instant::now(),
            }),
            || {},
        );
        let kept = Arc::new(AtomicI64::new(0));
        following.on_event_of("instance", Summing(kept.clone()));
        following.follow(&[event(1, "instance", "i-1", 1)], Some(Instant::now()));
        assert_eq!(kept.load(Ordering::SeqCst), 1);
        following.stop();
        assert!(!following.is_current());
        following.follow(&[event(2, "instance", "i-1", 2)], Some(Instant::now()));
        let mut forgot = false;
        following.set(
            Some(Followed {
                last: None,
                complete: Instant::now(),
            }),
            || forgot = true,
        );
        assert_eq!(
            kept.load(Ordering::SeqCst),
            1,
            "no copy changed once stopped"
        );
        assert!(
            !forgot && !following.is_current(),
            "nothing forgotten once stopped"
        );
    }

    #[test]
    fn each_event_reaches_the_keepers_of_its_aggregate_type_only() {
        let following = LogFollowing::default();
        let instances = Arc::new(AtomicI64::new(0));
        following.on_event_of("instance", Summing(instances.clone()));
        following.keep(&[
            event(1, "instance", "i-1", 3),
            event(2, "user", "u-1", 100),
            event(3, "instance", "i-1", 4),
        ]);
        assert_eq!(instances.load(Ordering::SeqCst), 7);
    }

    #[test]
    fn the_wanted_positions_are_one_parameter_in_each_backends_list_syntax() {
        assert_eq!(Dialect::Postgres.positions(&[1, 5, 9]), "{1,5,9}");
        assert_eq!(Dialect::Sqlite.positions(&[1, 5, 9]), "[1,5,9]");
        assert_eq!(Dialect::Postgres.positions(&[7]), "{7}");
    }

    /// Wants the first event of any aggregate only, as a store that remembers nothing does.
    struct FirstEvents;

    impl CopyKeeper for FirstEvents {
        fn wants(&self, _: &str, sequence: i64) -> bool {
            sequence == 1
        }

        fn keep(&self, _: &FollowedEvent) {}
    }

    #[test]
    fn an_event_that_follows_a_wanted_one_of_its_aggregate_in_the_same_read_is_wanted_too() {
        let following = LogFollowing::default();
        following.on_event_of("session", FirstEvents);
        let keys = [
            event(10, "session", "s-1", 1),
            event(11, "session", "s-2", 4),
            event(12, "session", "s-1", 2),
            event(13, "user", "u-1", 1),
            event(14, "session", "s-1", 3),
            event(15, "session", "s-2", 5),
        ]
        .map(|event| event.key);
        assert_eq!(
            following.wanted(&keys),
            vec![10, 12, 14],
            "s-1 from its first event on; s-2 (remembered nowhere) and a type without a keeper not at all"
        );
    }
}
