//! The black-box suite. One test binary (link time is the dominant cost of this stack), one module per capability.

mod allocation;
mod audit;
mod auth;
mod causes;
mod cli;
mod concurrency;
mod config;
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
    let mut child = whist_tests::ChildProcess::start(
        &whist_binary(),
        arguments,
        database.data_dir.path(),
        &[(
            "DATABASE_URL",
            database.url.clone().expect("a Postgres database"),
        )],
        log,
    );
    let Some(status) = child.exited(std::time::Duration::from_secs(120)).await else {
        panic!(
            "whist {arguments:?} did not exit within 120 s; its log:\n{}",
            child.log_text()
        );
    };
    (status.success(), child.log_text())
}
