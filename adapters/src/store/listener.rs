//! How a process learns that other processes appended: Postgres `LISTEN/NOTIFY`.
//!
//! Every append gives its events their global positions (`whist_append_units_checked`, migration 0012: appends are
//! serialised by an advisory lock held until they commit, so positions follow commit order) and sends
//! `NOTIFY whist_event_log`, delivered at commit. Each process listens and raises its local [`LogSignal`], so that
//! its readers (projections, the reconciler) wake at once instead of at their next poll. This process's own appends
//! raise the signal directly.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;

use super::log::LogSignal;
use super::reachability::Reachability;

/// The channel on which every append announces that the head moved.
pub const LOG_CHANNEL: &str = "whist_event_log";

/// Listens for appends on `LOG_CHANNEL` and raises the local signal. Reconnects by itself after a database outage;
/// a lost connection makes `reachability` suspect one, so that an outage is noticed without waiting for a request.
#[derive(Clone, Debug)]
pub struct LogListener {
    pool: PgPool,
    signal: LogSignal,
    reachability: Reachability,
}

impl LogListener {
    pub fn new(pool: PgPool, signal: LogSignal, reachability: Reachability) -> Self {
        Self {
            pool,
            signal,
            reachability,
        }
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
            if let Err(error) = listener.listen(LOG_CHANNEL).await {
                tracing::warn!(error = %error, "could not listen for the log head; retrying");
                self.reachability.suspect();
                continue;
            }
            // A notification may have been missed while not listening.
            self.signal.advanced();
            loop {
                tokio::select! {
                    received = listener.try_recv() => match received {
                        Ok(Some(_)) => self.signal.advanced(),
                        // The connection was lost and re-established: notifications may have been missed.
                        Ok(None) => {
                            self.reachability.suspect();
                            self.signal.advanced();
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
