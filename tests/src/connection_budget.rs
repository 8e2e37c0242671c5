//! Admission to the shared Postgres server by connections. nextest runs as many tests at once as the machine has
//! cores, each in a process of its own, and every test that uses Postgres makes its own database on the one server
//! (`max_connections` 100 on CI). A test of one server holds up to about 30 connections; a multi-process scenario
//! up to about 60. Two of those at once, or eight ordinary tests on an 8-core laptop, would ask for more than the
//! server has, and some test would fail with `sorry, too many clients already`.
//!
//! So a test's database first takes its share of the server: tokens of [`CONNECTIONS_PER_TOKEN`] connections, out of
//! what `max_connections` leaves after [`RESERVED`], held as session advisory locks by one connection of the test's
//! own until the database is dropped (or the test's process dies, which ends the session). A turnstile lock makes
//! admission first come, first served, so that a large share is not starved by small ones. A test that waits
//! longer than [`PATIENCE`] goes ahead anyway and says so: the budget never turns into a deadlock.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use sqlx::{Connection, PgConnection};

/// Connections per token.
const CONNECTIONS_PER_TOKEN: u32 = 5;
/// Connections of the server left out of the budget: the superuser's reserve, the tests' short admin connections
/// (creating and dropping databases), and one admission connection per running test.
const RESERVED: u32 = 10;
/// The advisory lock class of the budget's locks (`pg_advisory_lock(class, key)`).
const LOCK_CLASS: i32 = 0x5748_4953;
/// The key of the turnstile; tokens are keys 0, 1, 2, ….
const TURNSTILE: i32 = -1;
/// How long a test waits for its share before it goes ahead without the rest of it.
const PATIENCE: Duration = Duration::from_secs(120);

/// A test's share of the server's connections, held until dropped.
pub struct Admission {
    _session: PgConnection,
}

/// Waits until `connections` of the server at `server_url` are this test's (at most the whole budget).
pub async fn admit(server_url: &str, connections: u32) -> Admission {
    let mut session = PgConnection::connect(server_url)
        .await
        .expect("the test Postgres server at 127.0.0.1:5432 answers");
    let max_connections: String = sqlx::query_scalar("SHOW max_connections")
        .fetch_one(&mut session)
        .await
        .expect("the server says its max_connections");
    let max_connections: u32 = max_connections.parse().unwrap_or(100);
    let tokens = (max_connections.saturating_sub(RESERVED) / CONNECTIONS_PER_TOKEN).max(1);
    let wanted = connections.div_ceil(CONNECTIONS_PER_TOKEN).clamp(1, tokens) as usize;

    sqlx::query("SELECT pg_advisory_lock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(TURNSTILE)
        .execute(&mut session)
        .await
        .expect("the turnstile is taken");
    let started = Instant::now();
    // Advisory locks are re-entrant within a session: a token already held is not tried again.
    let mut held = BTreeSet::new();
    loop {
        for token in 0..tokens {
            if held.len() == wanted {
                break;
            }
            if held.contains(&token) {
                continue;
            }
            let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(LOCK_CLASS)
                .bind(i32::try_from(token).unwrap_or(i32::MAX))
                .fetch_one(&mut session)
                .await
                .expect("a token is tried");
            if taken {
                held.insert(token);
            }
        }
        if held.len() == wanted {
            break;
        }
        if started.elapsed() > PATIENCE {
            eprintln!(
                "connection budget: waited {} s for {connections} connections ({wanted} of {tokens} tokens, {} held); \
                 going ahead",
                PATIENCE.as_secs(),
                held.len()
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sqlx::query("SELECT pg_advisory_unlock($1, $2)")
        .bind(LOCK_CLASS)
        .bind(TURNSTILE)
        .execute(&mut session)
        .await
        .expect("the turnstile is given back");
    Admission { _session: session }
}
