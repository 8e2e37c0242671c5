//! Job outcomes, written in batches.
//!
//! Every job the reconciler runs ends with its outcome written to its row (done, failed, or pending again with a
//! backoff), fenced by the claim's attempt number. Under load, jobs finish many at a time; one statement each cost
//! a round trip and a commit per job. The writer takes whatever outcomes are waiting when the previous statement
//! returns and writes them in one `UPDATE … FROM (VALUES …)`: a lone outcome waits for nothing.

use tokio::sync::{mpsc, oneshot};
use whist_adapters::store::{values_placeholders, Database};

/// Outcomes written by one statement at most.
const MAX_BATCH: usize = 256;

/// The outcome of one claimed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    pub id: i64,
    /// The claim's attempt number: an outcome is written only over the same claim.
    pub attempts: i64,
    /// `done`, `failed` or `pending` (to be retried from `run_after_ms`).
    pub status: &'static str,
    pub run_after_ms: i64,
    pub error: Option<String>,
}

/// The database failed; the outcome was not written (the job's claim expires and it runs again).
#[derive(Debug, thiserror::Error)]
#[error("the job outcome could not be written: {0}")]
pub struct OutcomeError(String);

type Reply = oneshot::Sender<Result<bool, OutcomeError>>;

/// Hands outcomes to the writer task, which stops when every handle is dropped.
#[derive(Clone, Debug)]
pub struct OutcomeWriter {
    queue: mpsc::Sender<(JobOutcome, Reply)>,
}

impl OutcomeWriter {
    /// Starts the writer on the current tokio runtime.
    pub fn start(database: Database) -> Self {
        let (queue, mut receiver) = mpsc::channel::<(JobOutcome, Reply)>(4 * MAX_BATCH);
        tokio::spawn(async move {
            while let Some(first) = receiver.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match receiver.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                write(&database, batch).await;
            }
        });
        Self { queue }
    }

    /// Whether the writer task still takes outcomes (it stops only by panicking while handles remain).
    pub fn is_running(&self) -> bool {
        !self.queue.is_closed()
    }

    /// Writes `outcome`; `false` when the job is no longer held by that claim (another process took it over after
    /// the claim expired, and its outcome is that process's to write).
    ///
    /// # Errors
    /// The database failed.
    pub async fn record(&self, outcome: JobOutcome) -> Result<bool, OutcomeError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((outcome, reply))
            .await
            .map_err(|_| OutcomeError("the outcome writer has stopped".to_string()))?;
        answer
            .await
            .map_err(|_| OutcomeError("the outcome writer dropped an outcome".to_string()))?
    }
}

async fn write(database: &Database, batch: Vec<(JobOutcome, Reply)>) {
    // `VALUES` columns are column1… on both backends.
    let sql = format!(
        "UPDATE jobs SET status = v.column3, run_after_ms = v.column4, last_error = v.column5, \
         finished_ms = CASE WHEN v.column3 = 'done' OR v.column3 = 'failed' THEN v.column4 ELSE NULL END \
         FROM (VALUES {}) AS v \
         WHERE jobs.id = v.column1 AND jobs.attempts = v.column2 AND jobs.status = 'running' \
         RETURNING jobs.id",
        values_placeholders(batch.len(), 5)
    );
    let mut query = sqlx::query_scalar::<_, i64>(&sql);
    for (outcome, _) in &batch {
        query = query
            .bind(outcome.id)
            .bind(outcome.attempts)
            .bind(outcome.status)
            .bind(outcome.run_after_ms)
            .bind(outcome.error.clone());
    }
    match query.fetch_all(database.any()).await {
        Ok(written) => {
            metrics::histogram!("whist_job_outcome_batch").record(batch.len() as f64);
            let written: std::collections::HashSet<i64> = written.into_iter().collect();
            for (outcome, reply) in batch {
                let _ = reply.send(Ok(written.contains(&outcome.id)));
            }
        }
        Err(error) => {
            let message = error.to_string();
            for (_, reply) in batch {
                let _ = reply.send(Err(OutcomeError(message.clone())));
            }
        }
    }
}
