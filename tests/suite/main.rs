//! The black-box suite. One test binary (link time is the dominant cost of this stack), one module per capability.

mod allocation;
mod audit;
mod auth;
mod causes;
mod cli;
mod concurrency;
mod config;
mod connection_budget;
mod console;
mod deploy;
mod ec2;
mod fail_closed;
mod fleet;
mod fleet_crash;
mod host;
mod host_tls;
mod http;
mod idempotency;
mod jobs;
mod leadership;
mod metrics;
mod openapi;
mod process;
mod projections;
mod release;
mod resilience;
mod simulated;
mod snapshots;
mod store;
mod stripe;
mod traces;

/// The `whist` binary cargo built for this suite.
pub fn whist_binary() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_whist"))
}

/// Runs `whist arguments` against the test's Postgres database until it exits (at most 120 s); (exited 0, its log).
pub async fn whist(
    database: &whist_tests::TestDatabase,
    arguments: &[&str],
    log: &str,
) -> (bool, String) {
    let (code, log) = cli::whist_exit_code(database, arguments, log).await;
    (code == Some(0), log)
}
