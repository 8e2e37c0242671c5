//! Heartbeats are not events. Each one updates this process's book in memory; the book is written to the plain
//! `host_heartbeats` table in batches, once a second. Only changes of liveness become events (elsewhere).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use sqlx::Row;
use tokio::sync::watch;
use whist_adapters::store::Database;
use whist_domain::instance::InstanceStatus;

/// One heartbeat as the host sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub instance_id: String,
    pub received_at_ms: i64,
    pub heartbeat_number: i64,
    pub total_ram_kb: i64,
    pub free_ram_kb: i64,
    pub avail_ram_kb: i64,
    pub is_dying: bool,
}

/// The latest heartbeat of every host heard by this process, not yet written, and a copy of every host's status
/// from the `instances` read model, refreshed at most once a second, so that a heartbeat costs no query.
#[derive(Clone)]
pub struct HeartbeatBook {
    pending: Arc<Mutex<HashMap<String, Heartbeat>>>,
    statuses: Arc<tokio::sync::Mutex<StatusCopy>>,
    database: Database,
    timeout: Duration,
}

#[derive(Default)]
struct StatusCopy {
    read_at: Option<std::time::Instant>,
    statuses: HashMap<String, (InstanceStatus, i64)>,
}

impl HeartbeatBook {
    pub fn new(database: Database, timeout: Duration) -> Self {
        Self {
            pending: Arc::new(Mutex::new(HashMap::new())),
            statuses: Arc::new(tokio::sync::Mutex::new(StatusCopy::default())),
            database,
            timeout,
        }
    }

    /// The host's status and live mandelboxes as of at most a second ago (`None` when the read model does not
    /// know it yet, or cannot be read).
    pub async fn status_of(&self, instance_id: &str) -> Option<(InstanceStatus, i64)> {
        let mut copy = self.statuses.lock().await;
        let stale = copy
            .read_at
            .is_none_or(|read_at| read_at.elapsed() >= Duration::from_secs(1));
        if stale {
            match sqlx::query("SELECT instance_id, status, live_mandelboxes FROM instances")
                .fetch_all(self.database.any())
                .await
            {
                Ok(rows) => {
                    copy.statuses = rows
                        .iter()
                        .filter_map(|row| {
                            let id: String = row.try_get("instance_id").ok()?;
                            let status: String = row.try_get("status").ok()?;
                            let live: i64 = row.try_get("live_mandelboxes").ok()?;
                            Some((id, (InstanceStatus::parse(&status)?, live)))
                        })
                        .collect();
                    copy.read_at = Some(std::time::Instant::now());
                }
                Err(error) => {
                    tracing::warn!(error = %error, "could not read host statuses");
                }
            }
        }
        copy.statuses.get(instance_id).copied()
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
        for chunk in batch.chunks(500) {
            let mut sql = String::from(
                "INSERT INTO host_heartbeats (instance_id, last_seen_ms, heartbeat_number, total_ram_kb, \
                 free_ram_kb, avail_ram_kb, is_dying) VALUES ",
            );
            sql.push_str(&whist_adapters::store::values_placeholders(chunk.len(), 7));
            sql.push_str(
                " ON CONFLICT (instance_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms, \
                 heartbeat_number = excluded.heartbeat_number, total_ram_kb = excluded.total_ram_kb, \
                 free_ram_kb = excluded.free_ram_kb, avail_ram_kb = excluded.avail_ram_kb, \
                 is_dying = excluded.is_dying WHERE host_heartbeats.last_seen_ms <= excluded.last_seen_ms",
            );
            let mut query = sqlx::query(&sql);
            for heartbeat in chunk {
                query = query
                    .bind(heartbeat.instance_id.as_str())
                    .bind(heartbeat.received_at_ms)
                    .bind(heartbeat.heartbeat_number)
                    .bind(heartbeat.total_ram_kb)
                    .bind(heartbeat.free_ram_kb)
                    .bind(heartbeat.avail_ram_kb)
                    .bind(i64::from(heartbeat.is_dying));
            }
            if let Err(error) = query.execute(self.database.any()).await {
                if let Ok(mut pending) = self.pending.lock() {
                    for heartbeat in batch {
                        pending
                            .entry(heartbeat.instance_id.clone())
                            .or_insert(heartbeat);
                    }
                }
                return Err(error);
            }
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
