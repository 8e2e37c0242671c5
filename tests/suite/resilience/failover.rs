//! Failover to a standby that lagged: a `whist serve` (simulated hosts kept by its autoscaler) on a private primary
//! with an asynchronous standby made by `pg_basebackup`, reached through a loopback TCP proxy that stands for the
//! database's address. Assigns are made; the standby is stopped, so that it lags; more assigns are made on the
//! primary alone (the lost tail); the primary is killed, the standby promoted, and the proxy moved to it, as a
//! managed database moves its address. The server is not restarted. It proves that the server notices the log moved
//! back and carries on from the store: the rewind is logged, new assigns succeed (the lost tail's users too, whose
//! remembered copies held the lost mandelboxes), every aggregate's sequences are contiguous, no host holds more than
//! its capacity by log replay, every projection verifies with no difference, `whist events verify` passes, and the
//! lost tail's mandelboxes are absent everywhere, not half-present.

use std::time::{Duration, Instant};

use whist_adapters::store::{AggregateStore, Database, PoolSettings};
use whist_domain::instance::Instance;
use whist_projections::ProjectionRunner;
use whist_tests::private_postgres::{PrivatePostgres, StopMode};
use whist_tests::tcp_proxy::SwitchableProxy;
use whist_tests::{admin_token, assign_body, eventually, free_port, ChildProcess};

use super::{log_settled, record, scalar, Row};

const REGION: &str = "us-east-1";
const HASH: &str = whist_api::startup::SIMULATED_COMMIT_HASH;
const CAPACITY: u32 = 4;
/// Users assigned while the standby follows, and while it lags (their mandelboxes are the lost tail).
const BEFORE: usize = 12;
const LOST_TAIL: usize = 8;
const AFTER: usize = 8;
/// What the server logs when it finds the log moved back (`whist_adapters::store::LogWatermark`).
const REWIND_LOG: &str = "the event log moved back";

/// Assigns a mandelbox to `user`, retrying while no host has room yet or the store is unavailable; the mandelbox id,
/// or the last answer's status and error code after `within`.
async fn assign(port: u16, user: &str, session: i64, within: Duration) -> Result<String, String> {
    let http = whist_tests::http_client();
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        let answer = http
            .post(format!("http://127.0.0.1:{port}/mandelbox/assign"))
            .bearer_auth(admin_token(user))
            .json(&assign_body(&[REGION], HASH, session))
            .timeout(Duration::from_secs(15))
            .send()
            .await;
        match answer {
            Ok(response) => {
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.unwrap_or_default();
                if status == 200 {
                    if let Some(id) = body["mandelbox_id"].as_str() {
                        return Ok(id.to_string());
                    }
                }
                last = format!("{status} {}", body["error"]);
                // A refusal other than "no room yet" or "unavailable" is final.
                if ![503, 429].contains(&status) && body["error"] != "NO_INSTANCE_AVAILABLE" {
                    return Err(last);
                }
            }
            Err(error) => last = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(last)
}

async fn count(database: &Database, sql: &str) -> i64 {
    let value = scalar(database, sql).await;
    assert!(value >= 0, "{sql} answers");
    value
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_to_a_standby_that_lagged_is_noticed_and_the_server_carries_on_from_the_store() {
    let started = Instant::now();
    let primary = PrivatePostgres::start().await;
    let proxy = SwitchableProxy::start(primary.port).await;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port);
    let working_dir = tempfile::tempdir().expect("a working folder");
    let port = free_port();
    let environment = vec![
        ("DATABASE_URL", url.clone()),
        ("PORT", port.to_string()),
        ("PUBLIC_URL", format!("http://127.0.0.1:{port}")),
        ("WHIST_CLOUD", "local".to_string()),
        ("ENABLED_REGIONS", serde_json::json!([REGION]).to_string()),
        ("WHIST_AUTOSCALE", "true".to_string()),
        ("DESIRED_FREE_MANDELBOXES", CAPACITY.to_string()),
        ("WHIST_HOST_CAPACITY", CAPACITY.to_string()),
        (
            "HOST_SERVICE_PORT",
            whist_tests::host_service_port().to_string(),
        ),
        ("ASSIGN_RATE_LIMIT_PER_MINUTE", "0".to_string()),
        ("ASSIGN_RATE_LIMIT_PER_IP_PER_MINUTE", "0".to_string()),
        ("WHIST_JOB_CLAIM_S", "5".to_string()),
        ("HEARTBEAT_TIMEOUT_S", "120".to_string()),
        ("RUST_LOG", "warn".to_string()),
    ];
    let mut serve = ChildProcess::start(
        &crate::whist_binary(),
        &["serve"],
        working_dir.path(),
        &environment,
        "serve.log",
    );
    serve.wait_healthy(Duration::from_secs(90)).await;
    // The standby is made once the schema exists, and follows the primary from then on.
    let standby = primary.start_standby().await;
    let on_primary = Database::connect(
        Some(&primary.url("postgres")),
        working_dir.path(),
        PoolSettings::sized(2),
    )
    .await
    .expect("the primary answers");

    let mut before = Vec::new();
    for user in 0..BEFORE {
        let id = assign(port, &format!("before-{user}"), 1, Duration::from_secs(60))
            .await
            .unwrap_or_else(|why| {
                panic!("assign before the failover: {why}\n{}", serve.log_text())
            });
        before.push(id);
    }
    // The standby has everything so far, then stops: whatever comes next exists on the primary alone.
    let primary_lsn: String = sqlx::query_scalar("SELECT CAST(pg_current_wal_lsn() AS TEXT)")
        .fetch_one(on_primary.any())
        .await
        .expect("the primary's position");
    let on_standby_url = standby.url("postgres");
    assert!(
        eventually(Duration::from_secs(30), || {
            let url = on_standby_url.clone();
            let lsn = primary_lsn.clone();
            async move {
                let Ok(pool) = sqlx::PgPool::connect(&url).await else {
                    return false;
                };
                let replayed: Option<bool> =
                    sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= CAST($1 AS pg_lsn)")
                        .bind(lsn)
                        .fetch_one(&pool)
                        .await
                        .unwrap_or(None);
                pool.close().await;
                replayed == Some(true)
            }
        })
        .await,
        "the standby replays what the primary had"
    );
    standby.stop_server(StopMode::Fast).await;

    let mut lost_tail = Vec::new();
    for user in 0..LOST_TAIL {
        let id = assign(port, &format!("lost-{user}"), 1, Duration::from_secs(60))
            .await
            .unwrap_or_else(|why| {
                panic!("assign while the standby lags: {why}\n{}", serve.log_text())
            });
        lost_tail.push(id);
    }
    let events_on_primary = count(&on_primary, "SELECT count(*) FROM events").await;
    on_primary.close().await;

    // The failover: the primary dies, the standby that lagged is promoted, the address moves to it.
    primary.stop_server(StopMode::Immediate).await;
    let failed_over_at = Instant::now();
    standby.start_server().await;
    standby.promote().await;
    proxy.switch_to(standby.port);
    let store = Database::connect(
        Some(&standby.url("postgres")),
        working_dir.path(),
        PoolSettings::sized(4),
    )
    .await
    .expect("the promoted standby answers");
    let events_after_promotion = count(&store, "SELECT count(*) FROM events").await;
    assert!(
        events_after_promotion < events_on_primary,
        "the standby lagged: {events_after_promotion} events against {events_on_primary}"
    );

    assert!(
        eventually(Duration::from_secs(30), || {
            let text = serve.log_text();
            async move { text.contains(REWIND_LOG) }
        })
        .await,
        "the server noticed the log moved back:\n{}",
        serve.log_text()
    );
    let noticed_after = failed_over_at.elapsed();

    // New users are served, and so are the lost tail's, whose remembered copies held mandelboxes the store lost.
    let first_assign_at = Instant::now();
    let mut after = Vec::new();
    for user in 0..AFTER {
        let id = assign(port, &format!("after-{user}"), 1, Duration::from_secs(60))
            .await
            .unwrap_or_else(|why| panic!("assign after the failover: {why}\n{}", serve.log_text()));
        after.push(id);
    }
    let first_assigns_took = first_assign_at.elapsed();
    let mut served_again = Vec::new();
    for user in 0..LOST_TAIL {
        let id = assign(port, &format!("lost-{user}"), 2, Duration::from_secs(60))
            .await
            .unwrap_or_else(|why| {
                panic!(
                    "a lost assign's user is served again (not USER_ALREADY_ACTIVE): {why}\n{}",
                    serve.log_text()
                )
            });
        served_again.push(id);
    }

    // Every projection catches up on the new primary, then the checks, on the store as it now is.
    let runner = ProjectionRunner::new(store.clone(), whist_projections::all());
    assert!(
        eventually(Duration::from_secs(60), || {
            let runner = runner.clone();
            async move { log_settled(&runner).await }
        })
        .await,
        "the projections catch up on the promoted standby"
    );
    let holes = count(
        &store,
        "SELECT count(*) FROM (SELECT aggregate_type, aggregate_id FROM events \
         GROUP BY aggregate_type, aggregate_id HAVING max(sequence) <> count(*)) AS holed",
    )
    .await;
    assert_eq!(holes, 0, "every aggregate's sequences are contiguous");
    let instances: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT aggregate_id FROM events WHERE aggregate_type = 'instance'",
    )
    .fetch_all(store.any())
    .await
    .expect("the hosts");
    let replayed = AggregateStore::<Instance>::new(&store, ());
    let mut over_capacity = Vec::new();
    for instance in &instances {
        let (host, _) = replayed
            .load_from_history(instance)
            .await
            .expect("a host replays");
        if host.mandelboxes.len() > host.capacity as usize {
            over_capacity.push(instance.clone());
        }
    }
    assert!(
        over_capacity.is_empty(),
        "hosts over capacity by replay: {over_capacity:?}"
    );
    let mut present = Vec::new();
    for mandelbox in &lost_tail {
        for (what, sql) in [
            (
                "events",
                "SELECT count(*) FROM events WHERE aggregate_id = $1",
            ),
            (
                "mandelboxes",
                "SELECT count(*) FROM mandelboxes WHERE mandelbox_id = $1",
            ),
            ("jobs", "SELECT count(*) FROM jobs WHERE aggregate_id = $1"),
        ] {
            let found: i64 = sqlx::query_scalar(sql)
                .bind(mandelbox)
                .fetch_one(store.any())
                .await
                .expect("reads");
            if found > 0 {
                present.push(format!("{mandelbox} in {what}"));
            }
        }
    }
    assert!(present.is_empty(), "the lost tail is absent: {present:?}");
    for mandelbox in before.iter().chain(&after).chain(&served_again) {
        let found: i64 =
            sqlx::query_scalar("SELECT count(*) FROM mandelboxes WHERE mandelbox_id = $1")
                .bind(mandelbox)
                .fetch_one(store.any())
                .await
                .expect("reads");
        assert_eq!(
            found, 1,
            "{mandelbox}, acknowledged on the store that survived, is in the read model"
        );
    }

    let cli_environment = [("DATABASE_URL", url.clone())];
    let mut verified = Vec::new();
    for projection in runner.projections() {
        if !projection.rebuildable() {
            continue;
        }
        let mut verify = ChildProcess::start(
            &crate::whist_binary(),
            &["projections", "verify", projection.name()],
            working_dir.path(),
            &cli_environment,
            &format!("verify-{}.log", projection.name()),
        );
        let status = verify
            .exited(Duration::from_secs(120))
            .await
            .expect("the verification ends");
        assert!(
            status.success(),
            "projection {} verifies with no difference:\n{}",
            projection.name(),
            verify.log_text()
        );
        verified.push(projection.name());
    }
    let mut chain = ChildProcess::start(
        &crate::whist_binary(),
        &["events", "verify"],
        working_dir.path(),
        &cli_environment,
        "events-verify.log",
    );
    let status = chain
        .exited(Duration::from_secs(120))
        .await
        .expect("the chain's verification ends");
    assert!(
        status.success(),
        "whist events verify passes:\n{}",
        chain.log_text()
    );

    record(&Row {
        scenario: "Failover",
        load: format!(
            "1 serve with simulated hosts: {BEFORE} assigns on the primary with its standby following, {LOST_TAIL} \
             while the standby lagged, then {AFTER} new users and the {LOST_TAIL} lost users again after the \
             failover; {} hosts in the log",
            instances.len()
        ),
        faults: format!(
            "asynchronous standby stopped, primary killed (immediate) with {events_on_primary} events, standby \
             promoted with {events_after_promotion}, the address moved; the server, not restarted, logged the \
             rewind {:.1} s after the failover and served {AFTER} new assigns in {:.1} s",
            noticed_after.as_secs_f64(),
            first_assigns_took.as_secs_f64()
        ),
        bad_inputs: 0,
        lost: format!(
            "only the unreplicated tail ({} events, its {LOST_TAIL} mandelboxes absent everywhere); sequences \
             contiguous, 0 hosts over capacity by replay, {} projections verified with 0 differences, chain \
             verified",
            events_on_primary - events_after_promotion,
            verified.len()
        ),
        seconds: started.elapsed().as_secs_f64(),
    });
    serve.kill();
}
