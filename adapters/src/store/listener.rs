//! How a process learns that other processes appended: Postgres `LISTEN/NOTIFY`.
//!
//! Every append gives its events their global positions (`whist_append_units_checked`, migration 0012: appends are
//! serialised by an advisory lock held until they commit, so positions follow commit order) and sends
//! `NOTIFY whist_event_log`, delivered at commit. Each process listens and raises its local [`LogSignal`], so that
//! its readers (projections, the follower) wake at once instead of at their next poll. This process's own appends
//! raise the signal directly.
//!
//! Likewise the `jobs` projection sends `NOTIFY whist_jobs_planned` in the transaction that plans jobs to claim, and
//! each process raises its [`JobsSignal`], which wakes its reconciler.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;

use super::log::{JobsSignal, LogSignal};
use super::reachability::Reachability;

/// The channel on which every append announces that the head moved.
pub const LOG_CHANNEL: &str = "whist_event_log";

/// The channel on which the `jobs` projection announces jobs to claim (`projections/src/jobs.rs`).
pub const JOBS_CHANNEL: &str = "whist_jobs_planned";

/// Listens for appends on `LOG_CHANNEL` and planned jobs on `JOBS_CHANNEL`, and raises the local signals.
/// Reconnects by itself after a database outage; a lost connection makes `reachability` suspect one, so that an
/// outage is noticed without waiting for a request.
#[derive(Clone, Debug)]
pub struct LogListener {
    pool: PgPool,
    signal: LogSignal,
    jobs: JobsSignal,
    reachability: Reachability,
}

impl LogListener {
    pub fn new(
        pool: PgPool,
        signal: LogSignal,
        jobs: JobsSignal,
        reachability: Reachability,
    ) -> Self {
        Self {
            pool,
            signal,
            jobs,
            reachability,
        }
    }

    /// Raises both signals: notifications may have been missed.
    fn raise_all(&self) {
        self.signal.advanced();
        self.jobs.planned();
    }

    /// Listens until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let mut listener = match PgListener::connect_with(&self.pool).await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(error = %error, "could not listen for the log head; retrying");
                    self.reachability.suspect();
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            };
            if let Err(error) = listener.listen_all([LOG_CHANNEL, JOBS_CHANNEL]).await {
                tracing::warn!(error = %error, "could not listen for the log head; retrying");
                self.reachability.suspect();
                continue;
            }
            // A notification may have been missed while not listening.
            self.raise_all();
            loop {
                tokio::select! {
                    received = listener.try_recv() => match received {
                        Ok(Some(notification)) if notification.channel() == JOBS_CHANNEL => {
                            self.jobs.planned();
                        }
                        Ok(Some(_)) => self.signal.advanced(),
                        // The connection was lost and re-established: notifications may have been missed.
                        Ok(None) => {
                            self.reachability.suspect();
                            self.raise_all();
                        }
                        Err(error) => {
                            tracing::warn!(error = %error, "log listener failed; reconnecting");
                            self.reachability.suspect();
                            break;
                        }
                    },
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}
