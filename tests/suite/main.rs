//! The black-box suite. One test binary (link time is the dominant cost of this stack), one module per capability.

mod allocation;
mod audit;
mod auth;
mod causes;
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
mod process;
mod projections;
mod release;
mod resilience;
mod simulated;
mod store;
mod stripe;

/// The `whist` binary cargo built for this suite.
pub fn whist_binary() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_BIN_EXE_whist"))
}
