//! Following the log: every process reads the key of each event appended after it started (type, id, sequence,
//! never the payload) and marks its remembered copy of that aggregate as behind when the event is newer than the
//! copy. A copy that is not marked is then as current as the process's position in the log.
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

/// Marks a remembered copy of one aggregate type as behind when the event (its id and sequence) is newer.
type Marker = Box<dyn Fn(&str, i64) + Send + Sync>;

/// The key of one event in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EventKey {
    position: i64,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
}

/// Where the follower stands: the last event it followed (`None` in an empty log) and when its last read that
/// reached the head began.
#[derive(Debug, Clone)]
struct Followed {
    last: Option<EventKey>,
    complete: Instant,
}

/// The follower's standing and the markers of every store of the process. Clones share them.
#[derive(Clone, Default)]
pub struct LogFollowing {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Held while copies are marked or forgotten, so that nothing is marked or forgotten once `stop` returns.
    standing: Mutex<Standing>,
    markers: Mutex<HashMap<String, Vec<Marker>>>,
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
            .standing
            .lock()
            .ok()
            .and_then(|standing| {
                standing
                    .followed
                    .as_ref()
                    .map(|followed| followed.complete.elapsed() <= FOLLOW_LAG_BOUND)
            })
            .unwrap_or(false)
    }

    /// Stops following for good: from now on no copy is marked or forgotten by the follower, and every read as of
    /// the log is read caught up (for tools and tests that need copies to stay as they were left).
    pub fn stop(&self) {
        if let Ok(mut standing) = self.inner.standing.lock() {
            standing.stopped = true;
            standing.followed = None;
        }
    }

    /// Registers the marker of a store of aggregates of `aggregate_type`.
    pub(crate) fn on_event_of(
        &self,
        aggregate_type: &str,
        marker: impl Fn(&str, i64) + Send + Sync + 'static,
    ) {
        if let Ok(mut markers) = self.inner.markers.lock() {
            markers
                .entry(aggregate_type.to_string())
                .or_default()
                .push(Box::new(marker));
        }
    }

    /// Marks the copies `keys` make stale and moves on past them; `complete` when the read that found them began
    /// and reached the head.
    fn follow(&self, keys: &[EventKey], complete: Option<Instant>) {
        let Ok(mut standing) = self.inner.standing.lock() else {
            return;
        };
        if standing.stopped {
            return;
        }
        let Some(followed) = standing.followed.as_mut() else {
            return;
        };
        if let Some(last) = keys.last() {
            followed.last = Some(last.clone());
        }
        if let Some(complete) = complete {
            followed.complete = complete;
        }
        self.mark(keys);
    }

    fn mark(&self, keys: &[EventKey]) {
        let Ok(markers) = self.inner.markers.lock() else {
            return;
        };
        for key in keys {
            if let Some(markers) = markers.get(&key.aggregate_type) {
                for mark in markers {
                    mark(&key.aggregate_id, key.sequence);
                }
            }
        }
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
            }
        }
    }

    /// Starts the follower in `loops`; it stops once the returned sender is dropped.
    pub(crate) fn start(
        &self,
        pool: &AnyPool,
        signal: &LogSignal,
        watermark: &LogWatermark,
        loops: &BackgroundLoops,
    ) -> Arc<watch::Sender<bool>> {
        let (stop, stopped) = watch::channel(false);
        let follower = Follower {
            pool: pool.clone(),
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
        // A restart (after a panic) carries on from the last event followed: each read's marks and its move past
        // them are one step under the standing's lock.
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
    /// and marks the copies they make stale.
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
        self.following.follow(&keys, reached_head.then_some(began));
        Ok(Step::Followed { reached_head })
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

    use super::{EventKey, Followed, LogFollowing, FOLLOW_LAG_BOUND};

    fn key(position: i64, aggregate_type: &str, aggregate_id: &str, sequence: i64) -> EventKey {
        EventKey {
            position,
            aggregate_type: aggregate_type.to_string(),
            aggregate_id: aggregate_id.to_string(),
            sequence,
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
    fn a_stopped_follower_is_never_current_and_marks_nothing() {
        let following = LogFollowing::default();
        following.set(
            Some(Followed {
                last: None,
                complete: Instant::now(),
            }),
            || {},
        );
        let marked = Arc::new(AtomicI64::new(0));
        let seen = marked.clone();
        following.on_event_of("instance", move |_, _| {
            seen.fetch_add(1, Ordering::SeqCst);
        });
        following.follow(&[key(1, "instance", "i-1", 1)], Some(Instant::now()));
        assert_eq!(marked.load(Ordering::SeqCst), 1);
        following.stop();
        assert!(!following.is_current());
        following.follow(&[key(2, "instance", "i-1", 2)], Some(Instant::now()));
        let mut forgot = false;
        following.set(
            Some(Followed {
                last: None,
                complete: Instant::now(),
            }),
            || forgot = true,
        );
        assert_eq!(
            marked.load(Ordering::SeqCst),
            1,
            "nothing marked once stopped"
        );
        assert!(
            !forgot && !following.is_current(),
            "nothing forgotten once stopped"
        );
    }

    #[test]
    fn each_key_reaches_the_markers_of_its_aggregate_type_only() {
        let following = LogFollowing::default();
        let instances = Arc::new(AtomicI64::new(0));
        let seen = instances.clone();
        following.on_event_of("instance", move |id, sequence| {
            assert_eq!(id, "i-1");
            seen.fetch_add(sequence, Ordering::SeqCst);
        });
        following.mark(&[
            key(1, "instance", "i-1", 3),
            key(2, "user", "u-1", 100),
            key(3, "instance", "i-1", 4),
        ]);
        assert_eq!(instances.load(Ordering::SeqCst), 7);
    }
}
