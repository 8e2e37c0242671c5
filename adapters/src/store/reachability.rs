//! Whether the database is known to be down, so that requests answer `503` at once instead of each waiting out the
//! pool's acquire timeout for a connection that cannot come.
//!
//! A failure (the log listener's connection lost, a request answered 5xx) makes the process *suspect* an outage: one probe task then
//! opens connections of its own (not the pool's, whose acquire would wait) every `PROBE_INTERVAL`. While they are
//! refused (the server is down, shutting down or starting up) the database is marked unreachable; the first probe
//! that connects and runs `SELECT 1` clears the mark and ends the probing. Any other failure (too many clients, a
//! bad password) is not an outage: the mark is cleared and the pool's own timeout decides.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::Connection;

/// Pause between two probes while the server is down.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Shared by every clone of a `Database` (and its log listener). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Reachability {
    inner: Arc<State>,
    /// Where to probe (Postgres only: the embedded store has no server to lose).
    options: Option<PgConnectOptions>,
}

#[derive(Debug, Default)]
struct State {
    down: AtomicBool,
    probing: AtomicBool,
}

/// What one probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Reached,
    Down,
    /// Connected to something that refused us for another reason: not an outage.
    Refused,
}

/// Whether `error` means the server cannot be reached at all: no connection (refused, reset, timed out), or a
/// server shutting down or starting up (SQLSTATE class 57P).
fn is_outage(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_) => true,
        sqlx::Error::Database(database) => {
            database.code().is_some_and(|code| code.starts_with("57P"))
        }
        _ => false,
    }
}

impl Reachability {
    /// Probes `options` when an outage is suspected.
    pub fn probing(options: PgConnectOptions) -> Self {
        Self {
            inner: Arc::default(),
            options: Some(options),
        }
    }

    /// Never marks anything down (the embedded store).
    pub fn embedded() -> Self {
        Self::default()
    }

    /// Whether the last probe found the server down.
    pub fn is_down(&self) -> bool {
        self.inner.down.load(Ordering::Acquire)
    }

    /// A store operation failed: start probing, unless a probe is already running.
    pub fn suspect(&self) {
        let Some(options) = self.options.clone() else {
            return;
        };
        if self.inner.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let state = self.inner.clone();
        tokio::spawn(async move {
            loop {
                match probe(&options).await {
                    Probe::Down => {
                        if !state.down.swap(true, Ordering::AcqRel) {
                            tracing::warn!(
                                "the database cannot be reached; answering 503 until it is back"
                            );
                        }
                        tokio::time::sleep(PROBE_INTERVAL).await;
                    }
                    outcome => {
                        if state.down.swap(false, Ordering::AcqRel) {
                            tracing::info!(?outcome, "the database can be reached again");
                        }
                        break;
                    }
                }
            }
            state.probing.store(false, Ordering::Release);
        });
    }
}

async fn probe(options: &PgConnectOptions) -> Probe {
    let attempt = async {
        let mut connection = PgConnection::connect_with(options).await?;
        sqlx::query("SELECT 1").execute(&mut connection).await?;
        connection.close().await
    };
    match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
        Ok(Ok(())) => Probe::Reached,
        Ok(Err(error)) if is_outage(&error) => Probe::Down,
        Ok(Err(_)) => Probe::Refused,
        Err(_) => Probe::Down,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_server_counts_as_an_outage() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(is_outage(&sqlx::Error::Io(refused)));
        assert!(!is_outage(&sqlx::Error::RowNotFound));
        assert!(!is_outage(&sqlx::Error::Protocol("bad message".into())));
    }

    #[tokio::test]
    async fn a_port_nobody_listens_on_is_down_and_the_embedded_store_never_is() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .expect("a free port");
        let options = PgConnectOptions::new().host("127.0.0.1").port(port);
        assert_eq!(probe(&options).await, Probe::Down);
        let reachability = Reachability::probing(options);
        reachability.suspect();
        let mut marked = false;
        for _ in 0..100 {
            if reachability.is_down() {
                marked = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(marked, "a refused probe marks the database down");
        let embedded = Reachability::embedded();
        embedded.suspect();
        assert!(!embedded.is_down());
    }
}
