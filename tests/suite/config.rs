//! Settings layered from the environment, the config database and defaults.

use whist_adapters::config::{Settings, Sources};
use whist_tests::TestDatabase;

async fn config_database_with(rows: &[(&str, &str)], table: &str) -> TestDatabase {
    let database = TestDatabase::postgres().await;
    let pool = sqlx::PgPool::connect(database.url.as_deref().expect("url"))
        .await
        .expect("connects");
    sqlx::query(&format!(
        "CREATE TABLE {table} (key text PRIMARY KEY, value text NOT NULL)"
    ))
    .execute(&pool)
    .await
    .expect("the stage table is created");
    for (key, value) in rows {
        sqlx::query(&format!("INSERT INTO {table} (key, value) VALUES ($1, $2)"))
            .bind(key)
            .bind(value)
            .execute(&pool)
            .await
            .expect("a row is inserted");
    }
    pool.close().await;
    database
}

/// One token key (32 bytes), as production-shaped settings require.
const TOKEN_KEYS: &str = "k1:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

fn environment(pairs: &[(&str, &str)]) -> Sources {
    Sources::new(
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect(),
        Default::default(),
    )
}

#[tokio::test]
async fn the_config_database_table_of_the_stage_fills_what_the_environment_leaves_out() {
    let config = config_database_with(
        &[
            ("MANDELBOX_LIMIT_PER_USER", "5"),
            ("PORT", "9000"),
            ("ENABLED_REGIONS", r#"["us-east-1","eu-west-1"]"#),
        ],
        "staging",
    )
    .await;
    let sources = environment(&[
        ("CONFIG_DB_URL", config.url.as_deref().expect("url")),
        ("ENVIRONMENT", "staging"),
        ("WHIST_TOKEN_KEYS", TOKEN_KEYS),
        ("PORT", "8000"),
    ])
    .with_config_database()
    .await
    .expect("the config database is read");
    let settings = Settings::from_sources(&sources).expect("valid");
    assert_eq!(settings.port, 8000, "the environment wins");
    assert_eq!(
        settings.mandelbox_limit_per_user, 5,
        "the config database fills in"
    );
    assert_eq!(settings.enabled_regions, vec!["us-east-1", "eu-west-1"]);
    assert_eq!(
        settings.heartbeat_timeout.as_secs(),
        120,
        "the default fills in the rest"
    );
}

#[tokio::test]
async fn a_malformed_value_in_the_config_database_names_its_key() {
    let config = config_database_with(&[("HOST_SERVICE_SCHEME", "gopher")], "prod").await;
    let sources = environment(&[
        ("CONFIG_DB_URL", config.url.as_deref().expect("url")),
        ("ENVIRONMENT", "prod"),
        ("WHIST_TOKEN_KEYS", TOKEN_KEYS),
    ])
    .with_config_database()
    .await
    .expect("the config database is read");
    let error = Settings::from_sources(&sources).expect_err("refused");
    assert!(error.to_string().contains("HOST_SERVICE_SCHEME"), "{error}");
}

#[tokio::test]
async fn an_unreachable_config_database_stops_start_up() {
    let sources = environment(&[(
        "CONFIG_DB_URL",
        "postgres://postgres@127.0.0.1:5432/whist_no_such_database",
    )]);
    assert!(sources.with_config_database().await.is_err());
}

/// Runs `whist config` with `environment`; its exit status and what it printed.
fn whist_config(environment: &[(&str, &str)]) -> (std::process::ExitStatus, String, String) {
    let folder = tempfile::tempdir().expect("a folder");
    let mut command = std::process::Command::new(crate::whist_binary());
    command
        .arg("config")
        .current_dir(folder.path())
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (key, value) in environment {
        command.env(key, value);
    }
    let output = command.output().expect("runs");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn config_prints_each_effective_setting_with_its_origin_and_no_secret() {
    let (status, printed, errors) = whist_config(&[
        ("ENVIRONMENT", "prod"),
        ("WHIST_TOKEN_KEYS", TOKEN_KEYS),
        (
            "DATABASE_URL",
            "postgres://whist:hunter2@127.0.0.1:5432/whist",
        ),
        ("STRIPE_SECRET", "sk_test_not_for_your_eyes"),
        ("PORT", "8123"),
    ]);
    assert!(status.success(), "{errors}");
    let line = |key: &str| {
        printed
            .lines()
            .find(|line| line.split_whitespace().next() == Some(key))
            .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|| panic!("{key} is listed: {printed}"))
    };
    assert_eq!(line("PORT"), "PORT environment 8123");
    assert_eq!(
        line("STRIPE_SECRET"),
        "STRIPE_SECRET environment [redacted]"
    );
    assert_eq!(
        line("WHIST_TOKEN_KEYS"),
        "WHIST_TOKEN_KEYS environment [redacted]"
    );
    assert!(line("DATABASE_URL").starts_with("DATABASE_URL environment postgres://"));
    assert_eq!(
        line("HEARTBEAT_TIMEOUT_S").split(' ').nth(1),
        Some("default")
    );
    for secret in ["hunter2", "sk_test_not_for_your_eyes", "MDEyMzQ1Njc4"] {
        assert!(!printed.contains(secret), "{secret} leaked: {printed}");
    }
}

#[test]
fn config_refuses_a_setting_that_would_stop_start_up_naming_it() {
    let (status, printed, errors) = whist_config(&[("HEARTBEAT_TIMEOUT_S", "soon")]);
    assert!(!status.success(), "{printed}");
    assert!(errors.contains("HEARTBEAT_TIMEOUT_S"), "{errors}");
}
