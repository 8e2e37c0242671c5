//! Connections a hot path keeps for itself instead of giving them back to the pool after every statement.
//!
//! sqlx 0.8 tests a connection with a round trip (a `Sync` and its answer) every time it goes back to the pool, and
//! that cannot be turned off. A path that runs one short statement per acquire pays two round trips for one: on a
//! 2-core machine the tests were 12% of the server's CPU under `whist loadtest`, and on the append path, which
//! serialises every process's appends, they sat between one statement and the next. Such a path takes a connection
//! here, runs its statement, and [`Held::keep`]s the connection when the statement succeeded; a connection whose
//! statement failed (or whose future was dropped halfway) goes back to the pool, which tests it and closes it if
//! it is broken. A connection is kept at most [`HOLD_FOR`] before it goes back through the pool, so that the
//! pool's own lifetime rules still apply to it. Closing the store gives every kept connection back first (a pool's
//! close waits for all of its connections).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::Pool;

/// How long a connection is kept out of the pool before it goes back (and is tested) once.
pub(crate) const HOLD_FOR: Duration = Duration::from_secs(60);

/// Up to `keep` connections of `pool`, kept between statements. Clones share them.
pub(crate) struct HeldConnections<DB: sqlx::Database> {
    pool: Pool<DB>,
    keep: usize,
    /// The kept connections, each with when it was taken from the pool.
    idle: Arc<Mutex<Vec<Kept<DB>>>>,
}

type Kept<DB> = (PoolConnection<DB>, Instant);

impl<DB: sqlx::Database> Clone for HeldConnections<DB> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            keep: self.keep,
            idle: self.idle.clone(),
        }
    }
}

impl<DB: sqlx::Database> std::fmt::Debug for HeldConnections<DB> {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("HeldConnections")
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

/// A connection taken from [`HeldConnections`]: [`Held::keep`] it after a statement that succeeded; dropped, it
/// goes back to the pool (which tests it).
pub struct Held<DB: sqlx::Database> {
    connection: PoolConnection<DB>,
    since: Instant,
    home: HeldConnections<DB>,
}

impl<DB: sqlx::Database> std::ops::Deref for Held<DB> {
    type Target = DB::Connection;

    fn deref(&self) -> &Self::Target {
        &self.connection
    }
}

impl<DB: sqlx::Database> std::ops::DerefMut for Held<DB> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.connection
    }
}

impl<DB: sqlx::Database> Held<DB> {
    /// Keeps the connection for the next statement (call it after one that succeeded); beyond what its home keeps,
    /// or once the pool is closing, it goes back to the pool.
    pub fn keep(self) {
        let Self {
            connection,
            since,
            home,
        } = self;
        if home.pool.is_closed() {
            return;
        }
        let refused = match home.idle.lock() {
            Ok(mut idle) if idle.len() < home.keep => {
                idle.push((connection, since));
                None
            }
            _ => Some(connection),
        };
        // Back to the pool (after the lock is released).
        drop(refused);
    }
}

impl<DB: sqlx::Database> HeldConnections<DB> {
    /// Keeps up to `keep` connections of `pool` (0 keeps none: every statement acquires from the pool).
    pub(crate) fn new(pool: Pool<DB>, keep: usize) -> Self {
        Self {
            pool,
            keep,
            idle: Arc::new(Mutex::new(Vec::with_capacity(keep))),
        }
    }

    /// A kept connection when one is free and not due back to the pool, else one acquired from the pool.
    ///
    /// # Errors
    /// The pool could not give a connection.
    pub(crate) async fn take(&self) -> Result<Held<DB>, sqlx::Error> {
        loop {
            let kept = self.idle.lock().map(|mut idle| idle.pop()).unwrap_or(None);
            match kept {
                // Dropped: it goes back through the pool, which tests it once.
                Some((_, since)) if since.elapsed() >= HOLD_FOR => continue,
                Some((connection, since)) => {
                    return Ok(Held {
                        connection,
                        since,
                        home: self.clone(),
                    })
                }
                None => break,
            }
        }
        let connection = self.pool.acquire().await?;
        Ok(Held {
            connection,
            since: Instant::now(),
            home: self.clone(),
        })
    }

    /// Gives every kept connection back to the pool: closing a pool waits for all of its connections.
    pub(crate) fn give_back(&self) {
        let kept = self
            .idle
            .lock()
            .map(|mut idle| std::mem::take(&mut *idle))
            .unwrap_or_default();
        drop(kept);
    }
}
