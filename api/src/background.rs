//! The in-process background work of `serve` and `worker`: the log listener and the projections.

use tokio::sync::watch;
use tokio::task::JoinHandle;
use whist_adapters::store::{Backend, Database, LogListener};
use whist_projections::ProjectionRunner;

/// Handles of the running background tasks.
pub struct Background {
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Background {
    /// Starts the log listener (Postgres) and the projection runner.
    pub fn start(database: &Database, projections: ProjectionRunner) -> Self {
        let (shutdown, receiver) = watch::channel(false);
        let mut tasks = Vec::new();
        if let Backend::Postgres(pool) = database.backend() {
            let listener = LogListener::new(
                pool.clone(),
                database.signal().clone(),
                database.reachability().clone(),
            );
            tasks.push(tokio::spawn(listener.run(receiver.clone())));
        }
        tasks.push(tokio::spawn(projections.run(receiver)));
        Self { shutdown, tasks }
    }

    /// Starts the reconciler and, with simulated hosts, the autoscaler.
    pub fn start_control(state: &crate::state::AppState) -> Self {
        let (shutdown, receiver) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(crate::reconciler::Reconciler::new(state.clone()).run(receiver.clone())),
            tokio::spawn(crate::sweeper::Sweeper::new(state.clone()).run(receiver.clone())),
            tokio::spawn(crate::autoscaler::Autoscaler::new(state.clone()).run(receiver)),
        ];
        Self { shutdown, tasks }
    }

    /// Runs the heartbeat flusher until stopped.
    pub fn spawn_with_shutdown(heartbeats: crate::heartbeats::HeartbeatBook) -> Self {
        let (shutdown, receiver) = watch::channel(false);
        let tasks = vec![tokio::spawn(heartbeats.run(receiver))];
        Self { shutdown, tasks }
    }

    /// Takes over another set of tasks, to be stopped with these.
    pub fn adopt(&mut self, other: Background) {
        let other_shutdown = other.shutdown;
        let mut receiver = self.shutdown.subscribe();
        self.tasks.push(tokio::spawn(async move {
            let _ = receiver.changed().await;
            let _ = other_shutdown.send(true);
        }));
        self.tasks.extend(other.tasks);
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
