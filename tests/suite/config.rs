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
    Sources {
        environment: pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect(),
        config_database: Default::default(),
    }
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
