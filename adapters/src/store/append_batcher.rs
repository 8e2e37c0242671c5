//! Group commit for single-event appends on Postgres.
//!
//! Most commands append one event. Under load, many commands on different aggregates append at the same moment;
//! writing each in its own transaction costs one commit (a WAL flush) per command. The batcher writes whatever
//! appends are waiting as one `INSERT … ON CONFLICT DO NOTHING RETURNING`: one statement, one commit. A row the
//! statement did not insert collided with an existing sequence number, and only its command gets a conflict —
//! exactly what a separate insert would have told it. Nothing waits for a timer: a flusher takes everything queued
//! while the previous statement ran, so a lone writer pays no extra latency.

use std::collections::HashSet;

use cqrs_es::persist::{PersistenceError, SerializedEvent};
use sqlx::{PgPool, Row};
use tokio::sync::{mpsc, oneshot};

/// How many appends one statement carries at most.
const MAX_BATCH: usize = 256;
/// Statements in flight at once.
const FLUSHERS: usize = 4;

type Reply = oneshot::Sender<Result<(), PersistenceError>>;

struct Append {
    event: SerializedEvent,
    reply: Reply,
}

/// Hands single-event appends to the flusher tasks.
#[derive(Clone, Debug)]
pub struct AppendBatcher {
    queue: mpsc::Sender<Append>,
}

impl AppendBatcher {
    /// Starts the flushers on the current tokio runtime; they stop when every handle is dropped.
    pub fn start(pool: PgPool) -> Self {
        let (queue, receiver) = mpsc::channel::<Append>(4 * MAX_BATCH);
        let receiver = std::sync::Arc::new(tokio::sync::Mutex::new(receiver));
        for _ in 0..FLUSHERS {
            let pool = pool.clone();
            let receiver = receiver.clone();
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut receiver = receiver.lock().await;
                        let Some(first) = receiver.recv().await else {
                            return;
                        };
                        let mut batch = vec![first];
                        while batch.len() < MAX_BATCH {
                            match receiver.try_recv() {
                                Ok(append) => batch.push(append),
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    flush(&pool, batch).await;
                }
            });
        }
        Self { queue }
    }

    /// Appends one event; `OptimisticLockError` when its sequence number is taken.
    ///
    /// # Errors
    /// A conflict, or the database failed (then nothing was written).
    pub async fn append(&self, event: SerializedEvent) -> Result<(), PersistenceError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Append { event, reply })
            .await
            .map_err(|_| PersistenceError::UnknownError("the append batcher has stopped".into()))?;
        answer.await.map_err(|_| {
            PersistenceError::UnknownError("the append batcher dropped an append".into())
        })?
    }
}

async fn flush(pool: &PgPool, batch: Vec<Append>) {
    // Two appends of the same aggregate and sequence cannot share a statement (it could not tell which one won).
    // Once the statement has run, a row with that key exists (this batch's or an earlier one), so every later
    // append of the same key has lost: it is answered with a conflict without another round trip.
    let mut keys = HashSet::new();
    let (now, later): (Vec<Append>, Vec<Append>) = batch.into_iter().partition(|append| {
        keys.insert((
            append.event.aggregate_type.clone(),
            append.event.aggregate_id.clone(),
            append.event.sequence,
        ))
    });
    let written = write(pool, now).await;
    for append in later {
        let outcome = match &written {
            Ok(()) => Err(PersistenceError::OptimisticLockError),
            Err(message) => Err(PersistenceError::UnknownError(message.clone().into())),
        };
        let _ = append.reply.send(outcome);
    }
}

/// Writes one statement and answers every append in it; `Err` carries the failure the appends were given.
async fn write(pool: &PgPool, batch: Vec<Append>) -> Result<(), String> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut sql = String::from(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ",
    );
    sql.push_str(&super::values_placeholders(batch.len(), 7));
    sql.push_str(
        " ON CONFLICT (aggregate_type, aggregate_id, sequence) DO NOTHING \
         RETURNING aggregate_type, aggregate_id, sequence",
    );
    let mut query = sqlx::query(&sql);
    for append in &batch {
        let event = &append.event;
        query = query
            .bind(&event.aggregate_type)
            .bind(&event.aggregate_id)
            .bind(i64::try_from(event.sequence).unwrap_or(i64::MAX))
            .bind(&event.event_type)
            .bind(&event.event_version)
            .bind(&event.payload)
            .bind(&event.metadata);
    }
    match query.fetch_all(pool).await {
        Ok(rows) => {
            let inserted: HashSet<(String, String, i64)> = rows
                .iter()
                .filter_map(|row| {
                    Some((
                        row.try_get("aggregate_type").ok()?,
                        row.try_get("aggregate_id").ok()?,
                        row.try_get("sequence").ok()?,
                    ))
                })
                .collect();
            metrics::histogram!("whist_append_batch_size").record(batch.len() as f64);
            for append in batch {
                let key = (
                    append.event.aggregate_type,
                    append.event.aggregate_id,
                    i64::try_from(append.event.sequence).unwrap_or(i64::MAX),
                );
                let outcome = if inserted.contains(&key) {
                    Ok(())
                } else {
                    Err(PersistenceError::OptimisticLockError)
                };
                let _ = append.reply.send(outcome);
            }
            Ok(())
        }
        Err(error) => {
            let message = error.to_string();
            let connection = matches!(
                error,
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
            );
            for append in batch {
                let failure: Box<dyn std::error::Error + Send + Sync> = message.clone().into();
                let _ = append.reply.send(Err(if connection {
                    PersistenceError::ConnectionError(failure)
                } else {
                    PersistenceError::UnknownError(failure)
                }));
            }
            Err(message)
        }
    }
}
