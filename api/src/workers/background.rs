//! The in-process background work of `serve` and `worker`: the log listener, the projections, the reconciler, the
//! sweeper, the autoscaler (with its repair), the heartbeat flusher and the membership of processes serving assigns. Every loop runs under a supervisor
//! ([`BackgroundLoops::supervise`]) that restarts it with backoff should it panic or end before it is asked to
//! stop, and whose standing `GET /readyz` reports; `whist worker`, which has no HTTP, has only the supervisors' logs.

use tokio::sync::watch;
use tokio::task::JoinHandle;
use whist_adapters::store::{Database, LogListener};
use whist_adapters::supervision::BackgroundLoops;
use whist_projections::ProjectionRunner;

/// The names of the supervised loops, as `/readyz`, the logs, the metrics and `WHIST_FAULT_PANIC_LOOP` spell them.
pub mod loop_names {
    pub const LOG_LISTENER: &str = "log_listener";
    pub const PROJECTIONS: &str = "projections";
    pub const RECONCILER: &str = "reconciler";
    pub const SWEEPER: &str = "sweeper";
    pub const AUTOSCALER: &str = "autoscaler";
    pub const HEARTBEAT_FLUSHER: &str = "heartbeat_flusher";
    pub const MEMBERSHIP: &str = "membership";
    /// Supervised by the store itself, which starts it when it connects.
    pub const APPEND_BATCHER: &str = whist_adapters::store::APPEND_BATCHER_LOOP;
}

/// Handles of the running background tasks (their supervisors).
pub struct Background {
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Background {
    /// Starts the log listener (Postgres) and the projection runner, supervised.
    pub fn start(database: &Database, projections: ProjectionRunner) -> Self {
        let (shutdown, receiver) = watch::channel(false);
        let loops = database.background_loops();
        let mut tasks = Vec::new();
        if let Some(session) = database.session_pool() {
            // LISTEN needs a session of its own: the direct connection when the main pool goes through a pooler.
            let listener = LogListener::new(
                session.clone(),
                database.signal().clone(),
                database.jobs_signal().clone(),
                database.reachability().clone(),
            );
            tasks.push(loops.supervise(
                loop_names::LOG_LISTENER,
                receiver.clone(),
                move |shutdown| listener.clone().run(shutdown),
            ));
        }
        tasks.push(
            loops.supervise(loop_names::PROJECTIONS, receiver, move |shutdown| {
                projections.clone().run(shutdown)
            }),
        );
        Self { shutdown, tasks }
    }

    /// Starts the reconciler, the sweeper and the autoscaler (which runs the repair), supervised.
    pub fn start_control(state: &crate::state::Context) -> Self {
        let (shutdown, receiver) = watch::channel(false);
        let loops = &state.background_loops;
        // One reconciler across its restarts: it holds the simulated hosts it launched (`WHIST_CLOUD=local`), which
        // a new one would not know and whose host services would stop with the old one.
        let reconciler = crate::workers::reconciler::Reconciler::new(state.clone());
        let sweeper_state = state.clone();
        let autoscaler_state = state.clone();
        let tasks = vec![
            loops.supervise(loop_names::RECONCILER, receiver.clone(), move |shutdown| {
                reconciler.clone().run(shutdown)
            }),
            loops.supervise(loop_names::SWEEPER, receiver.clone(), move |shutdown| {
                crate::workers::sweeper::Sweeper::new(sweeper_state.clone()).run(shutdown)
            }),
            loops.supervise(loop_names::AUTOSCALER, receiver, move |shutdown| {
                crate::workers::autoscaler::Autoscaler::new(autoscaler_state.clone()).run(shutdown)
            }),
        ];
        Self { shutdown, tasks }
    }

    /// Runs the heartbeat flusher, supervised, until stopped.
    pub fn spawn_with_shutdown(heartbeats: crate::workers::heartbeats::HeartbeatBook) -> Self {
        let (shutdown, receiver) = watch::channel(false);
        let loops: BackgroundLoops = heartbeats.background_loops().clone();
        let tasks =
            vec![
                loops.supervise(loop_names::HEARTBEAT_FLUSHER, receiver, move |shutdown| {
                    heartbeats.clone().run(shutdown)
                }),
            ];
        Self { shutdown, tasks }
    }

    /// Renews this process's membership among those serving assigns, supervised, until stopped (then leaves).
    pub fn start_membership(
        members: whist_adapters::store::members::Members,
        loops: &BackgroundLoops,
    ) -> Self {
        let (shutdown, receiver) = watch::channel(false);
        let tasks = vec![
            loops.supervise(loop_names::MEMBERSHIP, receiver, move |shutdown| {
                members.clone().run(shutdown)
            }),
        ];
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
        self.stop_by(None).await;
    }

    /// Asks every task to stop and waits for them until `deadline`; a task still running then is aborted. Its step
    /// is left unfinished, which is safe: every loop's work is idempotent and taken up again by the next process.
    pub async fn stop_by(self, deadline: Option<tokio::time::Instant>) {
        let _ = self.shutdown.send(true);
        for mut task in self.tasks {
            let ended = match deadline {
                Some(deadline) => match tokio::time::timeout_at(deadline, &mut task).await {
                    Ok(ended) => ended,
                    Err(_) => {
                        tracing::warn!(
                            "a background task did not stop within the shutdown grace; aborted"
                        );
                        task.abort();
                        continue;
                    }
                },
                None => task.await,
            };
            if let Err(error) = ended {
                tracing::error!(error = %error, "background task ended abnormally");
            }
        }
    }
}
