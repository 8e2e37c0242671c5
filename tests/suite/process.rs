//! The real binary: zero-configuration start, malformed configuration, graceful SIGTERM.

use std::time::Duration;

use whist_tests::{free_port, ChildProcess, TestDatabase};

#[tokio::test]
async fn serve_with_no_configuration_runs_on_the_embedded_store_and_stops_cleanly_on_sigterm() {
    let folder = tempfile::tempdir().expect("a folder");
    let port = free_port();
    // PORT is the only variable set, because tests run in parallel; everything else is default.
    let mut server = ChildProcess::start(
        &crate::whist_binary(),
        &["serve"],
        folder.path(),
        &[("PORT", port.to_string())],
        "serve.log",
    );
    server.wait_healthy(Duration::from_secs(30)).await;
    assert!(folder.path().join("whist-data").join("whist.db").exists());
    let spec = reqwest::get(format!("http://127.0.0.1:{port}/openapi.json"))
        .await
        .expect("answers");
    assert_eq!(spec.status(), 200);
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let status = server.exited(Duration::from_secs(30)).await.expect("exits");
    assert!(status.success(), "exit 0 on SIGTERM: {}", server.log_text());
    assert!(
        server.log_text().contains("\"level\":\"INFO\""),
        "logs are JSON lines"
    );
}

#[tokio::test]
async fn a_malformed_key_stops_start_up_with_a_message_naming_it() {
    let folder = tempfile::tempdir().expect("a folder");
    let mut server = ChildProcess::start(
        &crate::whist_binary(),
        &["serve"],
        folder.path(),
        &[("HEARTBEAT_TIMEOUT_S", "soon".to_string())],
        "serve.log",
    );
    let status = server.exited(Duration::from_secs(30)).await.expect("exits");
    assert!(!status.success());
    assert!(
        server.log_text().contains("HEARTBEAT_TIMEOUT_S"),
        "{}",
        server.log_text()
    );
}

#[tokio::test]
async fn migrate_applies_the_migrations_to_postgres_and_can_run_twice() {
    let database = TestDatabase::postgres().await;
    let url = database.url.clone().expect("url");
    for attempt in 0..2 {
        let mut migrate = ChildProcess::start(
            &crate::whist_binary(),
            &["migrate"],
            database.data_dir.path(),
            &[("DATABASE_URL", url.clone())],
            &format!("migrate-{attempt}.log"),
        );
        let status = migrate
            .exited(Duration::from_secs(30))
            .await
            .expect("exits");
        assert!(status.success(), "{}", migrate.log_text());
    }
    let pool = sqlx::PgPool::connect(&url).await.expect("connects");
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('events', 'event_log_head', \
         'projection_checkpoints', 'aggregate_index')",
    )
    .fetch_one(&pool)
    .await
    .expect("counts");
    assert_eq!(tables, 4);
}

#[tokio::test]
async fn version_names_the_git_commit_the_binary_was_built_from() {
    let output = std::process::Command::new(crate::whist_binary())
        .arg("--version")
        .output()
        .expect("runs");
    assert!(output.status.success());
    let printed = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("git runs");
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert_eq!(head.len(), 40, "the suite runs in a git checkout");
    assert_eq!(
        printed,
        format!("whist {} ({head})", env!("CARGO_PKG_VERSION"))
    );
}
