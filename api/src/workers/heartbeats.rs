//! Heartbeats are not events. Each one updates this process's book in memory; the book is written to the plain
//! `host_heartbeats` table in batches, once a second. Only changes of liveness become events (elsewhere).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::watch;
use whist_adapters::store::Database;
use whist_domain::instance::InstanceStatus;

pub use whist_projections::heartbeats::Heartbeat;

/// How long a heartbeat waits for the read of host statuses in flight before answering from the copy it has.
const REFRESH_WAIT: Duration = Duration::from_millis(500);

/// The latest heartbeat of every host heard by this process, not yet written, and a copy of every host's status
/// from the `instances` read model, refreshed once a second, so that a heartbeat costs no query.
#[derive(Clone)]
pub struct HeartbeatBook {
    pending: Arc<Mutex<HashMap<String, Heartbeat>>>,
    statuses: Arc<Mutex<StatusCopy>>,
    /// Held by the one request refreshing `statuses`.
    refreshing: Arc<tokio::sync::Mutex<()>>,
    database: Database,
    timeout: Duration,
}

#[derive(Default)]
struct StatusCopy {
    /// When the copy was last read successfully.
    read_at: Option<std::time::Instant>,
    /// When a read was last tried, successful or not.
    tried_at: Option<std::time::Instant>,
    statuses: HashMap<String, (InstanceStatus, i64)>,
}

impl HeartbeatBook {
    pub fn new(database: Database, timeout: Duration) -> Self {
        Self {
            pending: Arc::new(Mutex::new(HashMap::new())),
            statuses: Arc::new(Mutex::new(StatusCopy::default())),
            refreshing: Arc::new(tokio::sync::Mutex::new(())),
            database,
            timeout,
        }
    }

    /// The host's status and live mandelboxes as of the last read of the read model, read again when a second old
    /// (`None` when the read model does not know the host yet, or has never been read).
    ///
    /// One read at a time, in a task of its own; heartbeats wait for it at most `REFRESH_WAIT` once a copy exists
    /// and then answer from the copy they have, so a slow or unreachable database never holds heartbeats up. A
    /// failed read is tried again a second later, not by every heartbeat in between.
    pub async fn status_of(&self, instance_id: &str) -> Option<(InstanceStatus, i64)> {
        if self.copy_is_stale() {
            if let Ok(guard) = self.refreshing.clone().try_lock_owned() {
                let book = self.clone();
                tokio::spawn(async move {
                    if book.copy_is_stale() {
                        book.refresh().await;
                    }
                    drop(guard);
                });
            }
            // The lock is free again once the read in flight has ended.
            let read = self.refreshing.lock();
            if self.copy_exists() {
                let _ = tokio::time::timeout(REFRESH_WAIT, read).await;
            } else {
                let _ = read.await;
            }
        }
        self.statuses
            .lock()
            .ok()
            .and_then(|copy| copy.statuses.get(instance_id).copied())
    }

    fn copy_exists(&self) -> bool {
        self.statuses
            .lock()
            .is_ok_and(|copy| copy.read_at.is_some())
    }

    fn copy_is_stale(&self) -> bool {
        self.statuses.lock().map_or(true, |copy| {
            copy.tried_at
                .is_none_or(|tried_at| tried_at.elapsed() >= Duration::from_secs(1))
        })
    }

    /// Reads every host's status into the copy (the caller holds `refreshing`); on failure keeps the old copy.
    /// While the database is known to be down it is not asked.
    async fn refresh(&self) {
        if self.database.reachability().is_down() {
            if let Ok(mut copy) = self.statuses.lock() {
                copy.tried_at = Some(std::time::Instant::now());
            }
            return;
        }
        let read = whist_projections::heartbeats::host_fills(&self.database).await;
        let now = std::time::Instant::now();
        let Ok(mut copy) = self.statuses.lock() else {
            return;
        };
        copy.tried_at = Some(now);
        match read {
            Ok(hosts) => {
                copy.statuses = hosts
                    .into_iter()
                    .map(|host| (host.instance_id, (host.status, host.live_mandelboxes)))
                    .collect();
                copy.read_at = Some(now);
            }
            Err(error) => {
                tracing::warn!(error = %error, "could not read host statuses; answering from the last copy");
            }
        }
    }

    /// The supervised background loops of the process (the store's), among which the flusher runs.
    pub fn background_loops(&self) -> &whist_adapters::supervision::BackgroundLoops {
        self.database.background_loops()
    }

    /// The silence after which a host counts as unresponsive.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Records a heartbeat (the latest per host wins).
    pub fn record(&self, heartbeat: Heartbeat) {
        if let Ok(mut pending) = self.pending.lock() {
            let newer = pending
                .get(&heartbeat.instance_id)
                .is_none_or(|known| known.received_at_ms <= heartbeat.received_at_ms);
            if newer {
                pending.insert(heartbeat.instance_id.clone(), heartbeat);
            }
        }
        metrics::counter!("whist_heartbeats_total").increment(1);
    }

    /// Writes what is pending in one statement per 500 hosts.
    ///
    /// # Errors
    /// The database failed; the heartbeats are put back (unless newer ones arrived) and written next time.
    pub async fn flush(&self) -> Result<usize, sqlx::Error> {
        let batch: Vec<Heartbeat> = match self.pending.lock() {
            Ok(mut pending) => pending.drain().map(|(_, heartbeat)| heartbeat).collect(),
            Err(_) => return Ok(0),
        };
        let count = batch.len();
        if let Err(error) = whist_projections::heartbeats::write(&self.database, &batch).await {
            if let Ok(mut pending) = self.pending.lock() {
                for heartbeat in batch {
                    pending
                        .entry(heartbeat.instance_id.clone())
                        .or_insert(heartbeat);
                }
            }
            return Err(error);
        }
        Ok(count)
    }

    /// Flushes once a second until `shutdown`, and once more at the end.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {
                    let _ = self.flush().await;
                    return;
                }
            }
            if let Err(error) = self.flush().await {
                tracing::warn!(error = %error, "could not write heartbeats; keeping them for the next flush");
            }
        }
    }
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}
