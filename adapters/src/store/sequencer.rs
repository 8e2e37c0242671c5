//! The Postgres sequencer: gives committed events their global position.
//!
//! Why a sequencer and not a sequence default: a sequence value is taken at insert, and transactions do not
//! commit in the order they insert. If transaction A takes 5 and B takes 6, B commits, a reader passes 6, then
//! A commits 5, the reader has skipped A for ever. Here an event has no position until it is committed and visible
//! to the sequencer; positions are handed out in batches, one batch at a time (the row lock on `event_log_head`),
//! and each batch commits before the next begins. A late transaction therefore always gets a later position, and a
//! reader that follows positions sees every event exactly once, in an order that respects every causal link
//! (an event that was written after reading another is always committed, and so sequenced, after it).

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::Instrument;

use super::log::LogSignal;
use super::reachability::Reachability;

/// The channel on which a sequencer announces that the head moved.
pub const LOG_CHANNEL: &str = "whist_event_log";

/// How long the sequencer waits after a local append before its pass, so that one pass serves many appends.
const GATHER_WINDOW: Duration = Duration::from_millis(20);

/// What one pass of the sequencer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequencerPass {
    /// Positions were handed out to `count` events.
    Assigned { count: u64 },
    /// Nothing was waiting.
    Idle,
    /// Another process's sequencer holds the lock right now.
    Busy,
}

/// Hands out global positions (Postgres only; SQLite positions are given at insert by a trigger).
#[derive(Clone, Debug)]
pub struct Sequencer {
    pool: PgPool,
    signal: LogSignal,
    batch_size: i64,
    /// Told when a pass fails, so that an outage is noticed within one pass.
    reachability: Option<Reachability>,
}

impl Sequencer {
    pub fn new(pool: PgPool, signal: LogSignal) -> Self {
        Self {
            pool,
            signal,
            batch_size: 5_000,
            reachability: None,
        }
    }

    /// Reports failed passes to `reachability`.
    pub fn watching(mut self, reachability: Reachability) -> Self {
        self.reachability = Some(reachability);
        self
    }

    /// Gives positions to up to one batch of committed events (see `whist_sequence_events` in `migrations/`).
    ///
    /// # Errors
    /// The database failed; nothing was assigned.
    pub async fn pass(&self) -> Result<SequencerPass, sqlx::Error> {
        let assigned: i64 = sqlx::query_scalar("SELECT whist_sequence_events($1)")
            .bind(i32::try_from(self.batch_size).unwrap_or(i32::MAX))
            .fetch_one(&self.pool)
            .await?;
        match assigned {
            -1 => Ok(SequencerPass::Busy),
            0 => Ok(SequencerPass::Idle),
            count => {
                self.signal.advanced();
                Ok(SequencerPass::Assigned {
                    count: u64::try_from(count).unwrap_or_default(),
                })
            }
        }
    }

    /// Runs passes until `shutdown` turns true: at once when this process appends, 5 ms after this process appends, and every 20 ms for
    /// events other processes appended (their own sequencers usually get there first).
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let span = tracing::info_span!("sequencer");
        self.run_passes(shutdown).instrument(span).await;
    }

    async fn run_passes(self, mut shutdown: watch::Receiver<bool>) {
        let mut appended = self.signal.on_append();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let pass = self.pass().await;
            let pause = match pass {
                Ok(SequencerPass::Assigned { count, .. }) if count as i64 >= self.batch_size => {
                    Duration::ZERO
                }
                Ok(SequencerPass::Assigned { .. }) | Ok(SequencerPass::Idle) => {
                    Duration::from_millis(20)
                }
                Ok(SequencerPass::Busy) => Duration::from_millis(2),
                Err(error) => {
                    tracing::warn!(error = %error, "sequencer pass failed; retrying");
                    if let Some(reachability) = &self.reachability {
                        reachability.suspect();
                    }
                    Duration::from_millis(500)
                }
            };
            if pause.is_zero() {
                continue;
            }
            tokio::select! {
                _ = appended.changed() => {
                    // Gather the appends of the next few milliseconds into the same pass: each pass costs a
                    // commit, and one per append would double the store's commits under load.
                    tokio::time::sleep(GATHER_WINDOW).await;
                }
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Listens for other processes' sequencers and raises the local signal when the head moves.
    /// Reconnects by itself after a database outage.
    pub async fn listen(pool: PgPool, signal: LogSignal, mut shutdown: watch::Receiver<bool>) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::warn!(error = %error, "could not listen for the log head; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            };
            if let Err(error) = listener.listen(LOG_CHANNEL).await {
                tracing::warn!(error = %error, "could not listen for the log head; retrying");
                continue;
            }
            // A notification may have been missed while not listening.
            signal.advanced();
            loop {
                tokio::select! {
                    received = listener.try_recv() => match received {
                        Ok(Some(_)) => signal.advanced(),
                        Ok(None) => { signal.advanced(); }
                        Err(error) => {
                            tracing::warn!(error = %error, "log listener failed; reconnecting");
                            break;
                        }
                    },
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}
