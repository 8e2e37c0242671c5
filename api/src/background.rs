//! The in-process background work of `serve` and `worker`: the sequencer, the log listener and the projections.

use tokio::sync::watch;
use tokio::task::JoinHandle;
use whist_adapters::store::{Backend, Database, Sequencer};
use whist_projections::ProjectionRunner;

/// Handles of the running background tasks.
pub struct Background {
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Background {
    /// Starts the sequencer and the log listener (Postgres), and the projection runner.
    pub fn start(database: &Database, projections: ProjectionRunner) -> Self {
        let (shutdown, receiver) = watch::channel(false);
        let mut tasks = Vec::new();
        match database.backend() {
            Backend::Postgres(pool) => {
                let sequencer = Sequencer::new(pool.clone(), database.signal().clone());
                tasks.push(tokio::spawn(sequencer.run(receiver.clone())));
                tasks.push(tokio::spawn(Sequencer::listen(
                    pool.clone(),
                    database.signal().clone(),
                    receiver.clone(),
                )));
            }
            Backend::Sqlite(_) => database.signal().set_positions_on_insert(),
        }
        tasks.push(tokio::spawn(projections.run(receiver)));
        Self { shutdown, tasks }
    }

    /// Asks every task to stop and waits for them.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            if let Err(error) = task.await {
                tracing::error!(error = %error, "background task ended abnormally");
            }
        }
    }
}
