//! Job outcomes, written in batches.
//!
//! Every job the reconciler runs ends with its outcome written to its row (done, failed, or pending again with a
//! backoff), fenced by the claim's attempt number. Under load, jobs finish many at a time; one statement each cost
//! a round trip and a commit per job. The writer takes whatever outcomes are waiting when the previous statement
//! returns and writes them in one `UPDATE … FROM (VALUES …)` (`whist_projections::jobs::write_outcomes`): a lone
//! outcome waits for nothing.

use tokio::sync::{mpsc, oneshot};
use whist_adapters::store::Database;

pub use whist_projections::jobs::JobOutcome;

/// Outcomes written by one statement at most.
const MAX_BATCH: usize = 256;

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
    let (outcomes, replies): (Vec<JobOutcome>, Vec<Reply>) = batch.into_iter().unzip();
    match whist_projections::jobs::write_outcomes(database, &outcomes).await {
        Ok(written) => {
            metrics::histogram!("whist_job_outcome_batch_jobs").record(outcomes.len() as f64);
            let written: std::collections::HashSet<i64> = written.into_iter().collect();
            for (outcome, reply) in outcomes.iter().zip(replies) {
                let _ = reply.send(Ok(written.contains(&outcome.id)));
            }
        }
        Err(error) => {
            let message = error.to_string();
            for reply in replies {
                let _ = reply.send(Err(OutcomeError(message.clone())));
            }
        }
    }
}
