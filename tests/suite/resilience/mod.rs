//! The resilience suite: faults and hostile input against real processes, each scenario proving that nothing is
//! lost. Every scenario records one row of figures (load held, faults injected, bad inputs tried, what was lost)
//! for the summary table `scripts/resilience` prints. The short form (the default, and what CI runs) keeps each
//! scenario under a couple of minutes; `WHIST_RESILIENCE=long` (`scripts/resilience --long`) runs the long form.

mod crash;
mod failover;
mod faults;
mod hostile;
mod hostile_peers;
mod outage;
mod rehearsal;
mod supervision;

use std::path::PathBuf;
use std::time::Duration;

use whist_adapters::store::Database;
use whist_projections::ProjectionRunner;

/// One row of the summary table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Row {
    /// The scenario, as the table names it.
    pub scenario: &'static str,
    /// The load the system held meanwhile (requests, processes, hosts).
    pub load: String,
    /// The faults injected (kills, outages, failing dependencies).
    pub faults: String,
    /// Hostile or malformed inputs tried (0 where the scenario sends none).
    pub bad_inputs: u64,
    /// What was lost or doubled; must say nothing was.
    pub lost: String,
    /// How long the scenario ran.
    pub seconds: f64,
}

/// Whether the long form was asked for (`WHIST_RESILIENCE=long`).
pub fn long_form() -> bool {
    std::env::var("WHIST_RESILIENCE").is_ok_and(|value| value == "long")
}

/// Picks the short or the long figure.
pub fn scaled<T>(short: T, long: T) -> T {
    if long_form() {
        long
    } else {
        short
    }
}

/// Picks the short or the long duration.
pub fn duration(short_s: u64, long_s: u64) -> Duration {
    Duration::from_secs(scaled(short_s, long_s))
}

/// Where rows are written: `WHIST_RESILIENCE_SUMMARY`, else `resilience/` in cargo's temporary folder for tests.
pub fn summary_dir() -> PathBuf {
    std::env::var_os("WHIST_RESILIENCE_SUMMARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("resilience"))
}

/// Records the scenario's row (one JSON file per scenario) and prints it.
pub fn record(row: &Row) {
    let dir = summary_dir();
    std::fs::create_dir_all(&dir).expect("the summary folder");
    let text = serde_json::to_string(row).expect("a row is JSON");
    println!("resilience row: {text}");
    std::fs::write(
        dir.join(format!("{}.json", row.scenario.replace(' ', "_"))),
        text,
    )
    .expect("the summary row is written");
}

/// One number from the database (`-1` when the query fails, e.g. while it is down).
pub async fn scalar(database: &Database, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(database.any())
        .await
        .unwrap_or(-1)
}

/// Whether every projection has caught up with the log.
pub async fn log_settled(runner: &ProjectionRunner) -> bool {
    runner
        .status()
        .await
        .map(|statuses| statuses.iter().all(|status| status.lag == 0))
        .unwrap_or(false)
}
