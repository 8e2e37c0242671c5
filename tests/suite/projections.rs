//! The projection runner: exact delivery, failure handling, rebuilds, and a worker killed mid-stream.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::{AnyConnection, Row};
use whist_adapters::store::{AggregateStore, Database, LoggedEvent};
use whist_domain::probe::{Probe, ProbeCommand};
use whist_domain::{Actor, EventMetadata};
use whist_projections::{
    Projection, ProjectionError, ProjectionRunner, StepOutcome, Tables, Together,
};
use whist_tests::{eventually, BackendKind, ChildProcess, TestDatabase};

fn metadata() -> EventMetadata {
    EventMetadata::new(Actor::System, chrono::Utc::now())
}

async fn append(database: &Database, aggregates: usize, increments: usize) {
    let store = AggregateStore::<Probe>::new(database, ());
    for round in 0..increments {
        for aggregate in 0..aggregates {
            store
                .execute(
                    &format!("probe-{aggregate}"),
                    ProbeCommand::Increment {
                        by: (round + 1) as u64,
                    },
                    &metadata(),
                )
                .await
                .expect("recorded");
        }
    }
}

/// Every row of the aggregate index, sorted, as text.
async fn index_rows(database: &Database) -> Vec<String> {
    let rows = sqlx::query(
        "SELECT aggregate_type, aggregate_id, version, event_count, first_position, last_position, \
         last_event_type, last_recorded_at FROM aggregate_index ORDER BY aggregate_type, aggregate_id",
    )
    .fetch_all(database.any())
    .await
    .expect("the index reads");
    rows.iter()
        .map(|row| {
            format!(
                "{}/{} v{} n{} {}..{} {} {}",
                row.get::<String, _>(0),
                row.get::<String, _>(1),
                row.get::<i64, _>(2),
                row.get::<i64, _>(3),
                row.get::<i64, _>(4),
                row.get::<i64, _>(5),
                row.get::<String, _>(6),
                row.get::<String, _>(7),
            )
        })
        .collect()
}

/// Whether the aggregate index counts `events` events, each aggregate's count its version, within 10 s.
async fn index_reaches(database: &Database, events: i64) -> bool {
    eventually(Duration::from_secs(10), || async {
        index_totals(database).await == (events, 0)
    })
    .await
}

/// (sum of event counts, aggregates whose count differs from their version).
async fn index_totals(database: &Database) -> (i64, i64) {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(event_count), 0) AS BIGINT) AS events, \
         CAST(COALESCE(SUM(CASE WHEN event_count <> version THEN 1 ELSE 0 END), 0) AS BIGINT) AS mismatched \
         FROM aggregate_index",
    )
    .fetch_one(database.any())
    .await
    .expect("totals read");
    (row.get::<i64, _>("events"), row.get::<i64, _>("mismatched"))
}

async fn wait_for_positions(database: &Database, count: i64) {
    let log = database.log();
    assert!(
        eventually(Duration::from_secs(20), || {
            let log = log.clone();
            async move { log.head().await.unwrap_or(0) >= count }
        })
        .await,
        "the log reached {count} positions"
    );
}

async fn a_projection_catches_up_and_counts_every_event_once(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let background = whist_api::workers::background::Background::start(
        &database,
        ProjectionRunner::new(database.clone(), vec![]),
    );
    append(&database, 10, 12).await;
    wait_for_positions(&database, 120).await;
    let runner =
        ProjectionRunner::new(database.clone(), whist_projections::all()).with_batch_size(7);
    runner.register().await.expect("registered");
    assert_eq!(
        runner
            .catch_up("aggregate_index")
            .await
            .expect("catches up"),
        StepOutcome::CaughtUp
    );
    assert_eq!(index_totals(&database).await, (120, 0));
    let statuses = runner.status().await.expect("status");
    let status = statuses
        .iter()
        .find(|status| status.name == "aggregate_index")
        .expect("the index is registered");
    assert_eq!(status.position, 120);
    assert_eq!(status.head, 120);
    assert_eq!(status.lag, 0);
    assert_eq!(status.status, "running");
    assert_eq!(status.last_error, None);
    // Stepping again changes nothing: the checkpoint makes redelivery impossible.
    assert_eq!(
        runner.step("aggregate_index").await.expect("steps"),
        StepOutcome::CaughtUp
    );
    assert_eq!(index_totals(&database).await, (120, 0));
    background.stop().await;
}

#[tokio::test]
async fn a_projection_catches_up_and_counts_every_event_once_on_postgres() {
    a_projection_catches_up_and_counts_every_event_once(BackendKind::Postgres).await;
}

#[tokio::test]
async fn a_projection_catches_up_and_counts_every_event_once_on_sqlite() {
    a_projection_catches_up_and_counts_every_event_once(BackendKind::Sqlite).await;
}

async fn a_running_projection_follows_new_events_promptly(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let runner = ProjectionRunner::new(database.clone(), whist_projections::all());
    let background = whist_api::workers::background::Background::start(&database, runner.clone());
    append(&database, 3, 2).await;
    let started = std::time::Instant::now();
    assert!(index_reaches(&database, 6).await);
    // Woken by the log signal, not by the one-second poll.
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "took {:?}",
        started.elapsed()
    );
    background.stop().await;
}

#[tokio::test]
async fn a_running_projection_follows_new_events_promptly_on_postgres() {
    a_running_projection_follows_new_events_promptly(BackendKind::Postgres).await;
}

#[tokio::test]
async fn a_running_projection_follows_new_events_promptly_on_sqlite() {
    a_running_projection_follows_new_events_promptly(BackendKind::Sqlite).await;
}

async fn a_rebuild_gives_the_same_read_model_as_live(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let runner = ProjectionRunner::new(database.clone(), whist_projections::all());
    let background = whist_api::workers::background::Background::start(&database, runner.clone());
    append(&database, 20, 5).await;
    assert!(index_reaches(&database, 100).await);
    let live = index_rows(&database).await;
    let progress_calls = std::sync::atomic::AtomicUsize::new(0);
    let report = runner
        .rebuild("aggregate_index", &|_| {
            progress_calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })
        .await
        .expect("rebuilds");
    assert_eq!(report.events, 100);
    assert_eq!(report.position, 100);
    assert!(progress_calls.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert_eq!(index_rows(&database).await, live);
    // The swapped-in table is a full read model: the live runner keeps updating it.
    append(&database, 1, 1).await;
    assert!(index_reaches(&database, 101).await);
    // And a second rebuild works on the swapped-in table.
    runner
        .rebuild("aggregate_index", &|_| {})
        .await
        .expect("rebuilds again");
    assert_eq!(index_totals(&database).await, (101, 0));
    background.stop().await;
}

#[tokio::test]
async fn a_rebuild_gives_the_same_read_model_as_live_on_postgres() {
    a_rebuild_gives_the_same_read_model_as_live(BackendKind::Postgres).await;
}

#[tokio::test]
async fn a_rebuild_gives_the_same_read_model_as_live_on_sqlite() {
    a_rebuild_gives_the_same_read_model_as_live(BackendKind::Sqlite).await;
}

/// Fails on every event whose aggregate is `poison`.
struct Picky;

#[async_trait]
impl Projection for Picky {
    fn name(&self) -> &'static str {
        "picky"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[]
    }

    async fn apply(
        &self,
        _connection: &mut AnyConnection,
        _tables: &Tables,
        events: &[LoggedEvent],
    ) -> Result<(), ProjectionError> {
        match events.iter().find(|event| event.aggregate_id == "poison") {
            Some(event) => Err(ProjectionError::UnreadableEvent {
                position: event.position,
                event_type: event.event_type.clone(),
                reason: "poison".to_string(),
            }),
            None => Ok(()),
        }
    }
}

async fn a_projection_that_fails_stops_on_that_event_keeping_its_position(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let background = whist_api::workers::background::Background::start(
        &database,
        ProjectionRunner::new(database.clone(), vec![]),
    );
    let store = AggregateStore::<Probe>::new(&database, ());
    for aggregate in ["a", "b", "poison", "c"] {
        store
            .execute(aggregate, ProbeCommand::Increment { by: 1 }, &metadata())
            .await
            .expect("recorded");
    }
    wait_for_positions(&database, 4).await;
    let runner = ProjectionRunner::new(database.clone(), vec![Arc::new(Picky)]);
    runner.register().await.expect("registered");
    assert_eq!(
        runner.step("picky").await.expect("steps"),
        StepOutcome::Stopped
    );
    let status = &runner.status().await.expect("status")[0];
    assert_eq!(status.status, "failed");
    assert_eq!(
        status.position, 2,
        "the events before the failing one are kept"
    );
    let error = status.last_error.as_deref().expect("the error is recorded");
    assert!(error.contains("position 3"), "{error}");
    // A stopped projection stays stopped.
    assert_eq!(
        runner.step("picky").await.expect("steps"),
        StepOutcome::Stopped
    );
    assert_eq!(runner.status().await.expect("status")[0].position, 2);
    background.stop().await;
}

#[tokio::test]
async fn a_projection_that_fails_stops_on_that_event_keeping_its_position_on_postgres() {
    a_projection_that_fails_stops_on_that_event_keeping_its_position(BackendKind::Postgres).await;
}

#[tokio::test]
async fn a_projection_that_fails_stops_on_that_event_keeping_its_position_on_sqlite() {
    a_projection_that_fails_stops_on_that_event_keeping_its_position(BackendKind::Sqlite).await;
}

/// Projections stepped together (one transaction per step for all of them): each applies only the events after
/// its own checkpoint, once, whichever is ahead; a batch one of them cannot apply keeps nothing for any of them and
/// says to step each alone; a stopped projection is left out.
async fn projections_stepped_together_each_apply_the_events_after_their_own_checkpoint(
    kind: BackendKind,
) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let background = whist_api::workers::background::Background::start(
        &database,
        ProjectionRunner::new(database.clone(), vec![]),
    );
    append(&database, 4, 3).await;
    wait_for_positions(&database, 12).await;
    let runner = ProjectionRunner::new(
        database.clone(),
        vec![
            Arc::new(whist_projections::aggregate_index::AggregateIndex),
            Arc::new(Picky),
        ],
    )
    .with_batch_size(5);
    runner.register().await.expect("registered");
    let both = ["aggregate_index", "picky"];
    let positions = |runner: ProjectionRunner| async move {
        runner
            .status()
            .await
            .expect("status")
            .into_iter()
            .map(|status| (status.name, status.position, status.status))
            .collect::<Vec<_>>()
    };
    // The index goes ahead alone; then both together, each from its own checkpoint.
    assert!(matches!(
        runner.step("aggregate_index").await.expect("steps"),
        StepOutcome::Applied { position: 5, .. }
    ));
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps < 10, "the projections never reached the head");
        match runner.step_together(&both).await.expect("steps") {
            Together::Stepped { behind: true, .. } => continue,
            Together::Stepped { behind: false, .. } => break,
            Together::Apart => panic!("no event is poisoned yet"),
        }
    }
    assert_eq!(index_totals(&database).await, (12, 0), "every event once");
    assert_eq!(
        positions(runner.clone()).await,
        [
            ("aggregate_index".to_string(), 12, "running".to_string()),
            ("picky".to_string(), 12, "running".to_string()),
        ]
    );

    AggregateStore::<Probe>::new(&database, ())
        .execute("poison", ProbeCommand::Increment { by: 1 }, &metadata())
        .await
        .expect("recorded");
    wait_for_positions(&database, 13).await;
    assert_eq!(
        runner.step_together(&both).await.expect("steps"),
        Together::Apart
    );
    assert_eq!(
        index_totals(&database).await,
        (12, 0),
        "nothing kept of the batch"
    );
    assert_eq!(
        positions(runner.clone())
            .await
            .iter()
            .map(|(_, position, _)| *position)
            .collect::<Vec<_>>(),
        [12, 12]
    );
    // Alone, the index applies the event and the picky projection stops on it; together, the stopped one is left
    // out.
    assert!(matches!(
        runner.step("aggregate_index").await.expect("steps"),
        StepOutcome::Applied { position: 13, .. }
    ));
    assert_eq!(
        runner.step("picky").await.expect("steps"),
        StepOutcome::Stopped
    );
    assert_eq!(
        runner.step_together(&both).await.expect("steps"),
        Together::Stepped {
            applied: vec![],
            behind: false
        }
    );
    assert_eq!(index_totals(&database).await, (13, 0));
    background.stop().await;
}

#[tokio::test]
async fn projections_stepped_together_each_apply_the_events_after_their_own_checkpoint_on_postgres()
{
    projections_stepped_together_each_apply_the_events_after_their_own_checkpoint(
        BackendKind::Postgres,
    )
    .await;
}

#[tokio::test]
async fn projections_stepped_together_each_apply_the_events_after_their_own_checkpoint_on_sqlite() {
    projections_stepped_together_each_apply_the_events_after_their_own_checkpoint(
        BackendKind::Sqlite,
    )
    .await;
}

/// Reads every probe event's payload as this binary's shape, and fails on one it cannot read.
struct ReadsProbes;

#[async_trait]
impl Projection for ReadsProbes {
    fn name(&self) -> &'static str {
        "reads_probes"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[]
    }

    async fn apply(
        &self,
        _connection: &mut AnyConnection,
        _tables: &Tables,
        events: &[LoggedEvent],
    ) -> Result<(), ProjectionError> {
        for event in events {
            event
                .payload_as::<whist_domain::probe::ProbeEvent>()
                .map_err(|error| ProjectionError::unreadable(event, error))?;
        }
        Ok(())
    }
}

/// During a rolling deploy a newer binary writes an event this one cannot read: this process's projection waits
/// before it (its status says so), and the projection is not failed for the processes that can read it.
#[tokio::test]
async fn an_event_of_a_newer_version_makes_this_process_wait_and_fails_it_for_nobody() {
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open().await;
    let store = AggregateStore::<Probe>::new(&database, ());
    store
        .execute("before", ProbeCommand::Increment { by: 1 }, &metadata())
        .await
        .expect("recorded");
    let metadata_json = serde_json::to_string(&metadata().to_map()).expect("json");
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, \
         position) SELECT 'probe', 'newer', 1, 'ProbeIncremented', '2.0', \
         '{\"Incremented\":{\"amount\":{\"by\":1}}}', $1::json, position + 1 FROM event_log_head",
    )
    .bind(&metadata_json)
    .execute(database.any())
    .await
    .expect("a newer binary's event");
    let runner = ProjectionRunner::new(database.clone(), vec![Arc::new(ReadsProbes)]);
    runner.register().await.expect("registered");
    assert_eq!(
        runner.step("reads_probes").await.expect("steps"),
        StepOutcome::Waiting
    );
    let status = &runner.status().await.expect("status")[0];
    assert_eq!(status.status, "waiting");
    assert_eq!(status.position, 1, "the event before it is applied");
    let why = status.last_error.as_deref().expect("says why");
    assert!(
        why.contains("ProbeIncremented 2.0") && why.contains("does not know"),
        "{why}"
    );
    let stored: (String, Option<String>) = sqlx::query_as(
        "SELECT status, last_error FROM projection_checkpoints WHERE name = 'reads_probes'",
    )
    .fetch_one(database.any())
    .await
    .expect("reads");
    assert_eq!(
        stored,
        ("running".to_string(), None),
        "every other process still runs it"
    );
    let elsewhere = ProjectionRunner::new(database.clone(), vec![Arc::new(ReadsProbes)]);
    assert_eq!(
        elsewhere.status().await.expect("status")[0].status,
        "running",
        "only the process that waits says so"
    );
    assert_eq!(
        runner.step("reads_probes").await.expect("steps"),
        StepOutcome::Waiting,
        "and it goes on waiting"
    );
}

/// A rebuild and a verification of the same projection, at once: each fills and drops shadow tables of its own.
#[tokio::test]
async fn a_rebuild_and_a_verification_of_one_projection_at_once_use_tables_of_their_own() {
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open().await;
    load_log(&database, 30_000).await;
    let runner = ProjectionRunner::new(
        database.clone(),
        vec![Arc::new(whist_projections::aggregate_index::AggregateIndex)],
    );
    runner.register().await.expect("registered");
    runner
        .catch_up("aggregate_index")
        .await
        .expect("catches up");
    let (rebuilt, verified) = tokio::join!(
        runner.rebuild("aggregate_index", &|_| {}),
        runner.verify("aggregate_index", &|_| {})
    );
    rebuilt.expect("the rebuild completes");
    let report = verified.expect("the verification completes");
    assert_eq!(report.differences(), 0, "{report:?}");
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_tables WHERE tablename LIKE 'aggregate_index__rebuild%'",
    )
    .fetch_one(database.any())
    .await
    .expect("reads");
    assert_eq!(
        leftovers, 0,
        "each run dropped or swapped in its own tables"
    );
}

/// Loads `count` probe events with positions straight into Postgres (10 per aggregate); the head, the largest
/// position stored, follows.
async fn load_log(database: &Database, count: i64) {
    let metadata = serde_json::to_string(&metadata().to_map()).expect("json");
    let whist_adapters::store::Backend::Postgres(pool) = database.backend() else {
        unreachable!("Postgres")
    };
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, \
         position) SELECT 'probe', 'p-' || ((g - 1) / 10), ((g - 1) % 10) + 1, 'ProbeIncremented', '1.0', \
         '{\"Incremented\":{\"by\":1,\"total\":1}}', $2::json, g FROM generate_series(1, $1) AS g",
    )
    .bind(count)
    .bind(metadata)
    .execute(pool)
    .await
    .expect("the log loads");
}

async fn checkpoint(database: &Database) -> i64 {
    sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = 'aggregate_index'")
        .fetch_optional(database.any())
        .await
        .expect("reads")
        .unwrap_or(0)
}

/// A real `whist worker` process is SIGKILLed three times while it projects; each time the read model matches
/// its checkpoint exactly, and in the end every event is counted once.
#[tokio::test]
async fn a_worker_killed_mid_stream_resumes_with_no_event_lost_or_applied_twice() {
    const EVENTS: i64 = 200_000;
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open().await;
    load_log(&database, EVENTS).await;
    let environment = [("DATABASE_URL", test_database.url.clone().expect("url"))];
    let mut kills = 0;
    let mut last_checkpoint = 0;
    for attempt in 0..3 {
        let worker = ChildProcess::start(
            &crate::whist_binary(),
            &["worker"],
            test_database.data_dir.path(),
            &environment,
            &format!("worker-{attempt}.log"),
        );
        // Kill it somewhere in the middle of the next stretch of the log.
        let target = last_checkpoint + (EVENTS - last_checkpoint) / 4;
        let reached = eventually(Duration::from_secs(60), || {
            let database = database.clone();
            async move { checkpoint(&database).await >= target }
        })
        .await;
        let log = worker.log_text();
        assert!(reached, "the worker made progress: {log}");
        worker.kill();
        kills += 1;
        let position = checkpoint(&database).await;
        assert!(position < EVENTS, "killed mid-stream (at {position})");
        let (counted, _) = index_totals(&database).await;
        assert_eq!(
            counted, position,
            "the read model holds exactly the checkpointed events"
        );
        last_checkpoint = position;
    }
    let mut worker = ChildProcess::start(
        &crate::whist_binary(),
        &["worker"],
        test_database.data_dir.path(),
        &environment,
        "worker-final.log",
    );
    // The head is past the loaded log by the workers' own events (each start that took the fleet's lease recorded
    // its taking).
    let head = || async { database.log().head().await.expect("the head reads") };
    assert!(
        eventually(Duration::from_secs(120), || async {
            checkpoint(&database).await == head().await
        })
        .await,
        "the restarted worker reached the head: {}",
        worker.log_text()
    );
    worker.signal(nix::sys::signal::Signal::SIGTERM);
    let status = worker
        .exited(Duration::from_secs(20))
        .await
        .expect("the worker exits");
    assert!(
        status.success(),
        "SIGTERM ends the worker cleanly: {status}"
    );
    assert_eq!(kills, 3);
    // The read model holds exactly the checkpointed events. An event the worker recorded itself after the
    // checkpoint reached the head (its fleet lease's taking) may be left for the next worker: a stop finishes the
    // step under way, not the log.
    let position = checkpoint(&database).await;
    assert!(
        position >= EVENTS,
        "the loaded log is projected (at {position})"
    );
    assert_eq!(index_totals(&database).await, (position, 0));
    let probes: (i64, i64) = sqlx::query_as(
        "SELECT count(*), CAST(COALESCE(SUM(event_count), 0) AS BIGINT) FROM aggregate_index \
         WHERE aggregate_type = 'probe'",
    )
    .fetch_one(database.any())
    .await
    .expect("counts");
    assert_eq!(probes, (EVENTS / 10, EVENTS));
}

/// Every row of a table, sorted, as text (every column cast to text).
async fn table_rows(database: &Database, table: &str, key: &str, columns: &[&str]) -> Vec<String> {
    let select: Vec<String> = columns
        .iter()
        .map(|column| format!("COALESCE(CAST({column} AS TEXT), '-')"))
        .collect();
    let sql = format!("SELECT {} FROM {table} ORDER BY {key}", select.join(", "));
    let rows = sqlx::query(&sql)
        .fetch_all(database.any())
        .await
        .expect("the table reads");
    rows.iter()
        .map(|row| {
            (0..columns.len())
                .map(|index| row.get::<String, _>(index))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// The fleet read models fold a batch (each host's last fill, each mandelbox's last status, planned jobs in one
/// statement); applied one event at a time or in one batch, they hold the same rows, with a host's fill written
/// before a status change that follows it.
async fn the_fleet_read_models_are_the_same_one_event_at_a_time_as_in_one_batch(kind: BackendKind) {
    use whist_domain::instance::{
        DrainReason, Instance, InstanceCommand, LaunchReason, LaunchSpec,
    };
    use whist_domain::mandelbox::{Mandelbox, MandelboxCommand, Placement, ReportedStatus};

    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let instances = AggregateStore::<Instance>::new(&database, ());
    let mandelboxes = AggregateStore::<Mandelbox>::new(&database, ());
    let at = chrono::Utc::now();
    let spec = LaunchSpec {
        region: "us-east-1".to_string(),
        image_id: "ami-fold".to_string(),
        client_commit_hash: "fold".to_string(),
        instance_type: "g4dn.2xlarge".to_string(),
    };
    let host = |number: usize| format!("host-{number}");
    let mut host_commands: Vec<(String, InstanceCommand)> = Vec::new();
    for number in 0..2 {
        host_commands.push((
            host(number),
            InstanceCommand::RequestLaunch {
                spec: spec.clone(),
                bootstrap_token_hash: "bootstrap".to_string(),
                reason: LaunchReason::Operator,
                at,
            },
        ));
        host_commands.push((
            host(number),
            InstanceCommand::Register {
                identity: spec.clone(),
                presented_token_hash: "bootstrap".to_string(),
                auth_token_hash: "auth".to_string(),
                ip: format!("10.0.0.{number}"),
                mandelbox_capacity: 4,
                tls_cert_sha256: None,
                rules: whist_domain::instance::RegistrationRules {
                    host_networks: vec!["10.0.0.0/8".parse().expect("a CIDR")],
                    max_capacity: 64,
                    require_tls_pin: false,
                },
                at,
            },
        ));
    }
    let allocate = |mandelbox: &str| InstanceCommand::AllocateMandelbox {
        mandelbox_id: mandelbox.to_string(),
        user_id: "fold-user".to_string(),
        at,
    };
    let free = |mandelbox: &str| InstanceCommand::FreeMandelbox {
        mandelbox_id: mandelbox.to_string(),
        at,
    };
    // host-0: fills, then a drain, then the last mandelbox leaves; host-1 keeps two.
    for (id, command) in [
        (host(0), allocate("m-1")),
        (host(0), allocate("m-2")),
        (host(1), allocate("m-3")),
        (host(0), free("m-1")),
        (host(1), allocate("m-4")),
        (
            host(0),
            InstanceCommand::Drain {
                reason: DrainReason::Operator,
                at,
            },
        ),
        (host(0), free("m-2")),
    ] {
        host_commands.push((id, command));
    }
    for (id, command) in host_commands {
        instances
            .execute(&id, command, &metadata())
            .await
            .expect("the host decides");
    }
    let placement = |instance: usize| Placement {
        instance_id: host(instance),
        user_id: "fold-user".to_string(),
        session_id: 1,
        region: "us-east-1".to_string(),
        ip: format!("10.0.0.{instance}"),
        app_name: "CHROME".to_string(),
    };
    for (mandelbox, instance, reports, disconnect) in [
        (
            "m-1",
            0,
            &[ReportedStatus::Connecting, ReportedStatus::Running][..],
            true,
        ),
        ("m-2", 0, &[ReportedStatus::Connecting][..], false),
        ("m-3", 1, &[][..], false),
    ] {
        mandelboxes
            .execute(
                mandelbox,
                MandelboxCommand::Allocate {
                    placement: placement(instance),
                    protocol_secret_hash: "secret".to_string(),
                    at,
                },
                &metadata(),
            )
            .await
            .expect("allocated");
        for status in reports {
            mandelboxes
                .execute(
                    mandelbox,
                    MandelboxCommand::ReportStatus {
                        status: *status,
                        at,
                    },
                    &metadata(),
                )
                .await
                .expect("reported");
        }
        if disconnect {
            mandelboxes
                .execute(mandelbox, MandelboxCommand::Disconnect { at }, &metadata())
                .await
                .expect("disconnected");
        }
    }

    // Live: one event per step.
    let one_at_a_time =
        ProjectionRunner::new(database.clone(), whist_projections::all()).with_batch_size(1);
    one_at_a_time.register().await.expect("registers");
    for name in ["instances", "mandelboxes", "jobs"] {
        assert_eq!(
            one_at_a_time.catch_up(name).await.expect("catches up"),
            StepOutcome::CaughtUp
        );
    }
    let hosts = table_rows(
        &database,
        "instances",
        "instance_id",
        &["instance_id", "status", "live_mandelboxes"],
    )
    .await;
    assert_eq!(hosts, ["host-0 DRAINING 0", "host-1 ACTIVE 2"]);
    let boxes = table_rows(
        &database,
        "mandelboxes",
        "mandelbox_id",
        &["mandelbox_id", "instance_id", "status"],
    )
    .await;
    assert_eq!(
        boxes,
        [
            "m-1 host-0 DEAD",
            "m-2 host-0 CONNECTING",
            "m-3 host-1 ALLOCATED"
        ]
    );
    let jobs_one_at_a_time =
        table_rows(&database, "jobs", "job_key", &["kind", "job_key", "status"]).await;

    // A rebuild applies everything in one batch: the same rows.
    for name in ["instances", "mandelboxes"] {
        let report = one_at_a_time.verify(name, &|_| {}).await.expect("verifies");
        assert_eq!(report.differences(), 0, "{name}: {report:?}");
    }
    // The job planner is never rebuilt: planning the same log in one batch into a fresh database gives the same jobs.
    sqlx::query("DELETE FROM jobs")
        .execute(database.any())
        .await
        .expect("jobs cleared");
    sqlx::query("UPDATE projection_checkpoints SET position = 0 WHERE name = 'jobs'")
        .execute(database.any())
        .await
        .expect("checkpoint reset");
    let one_batch = ProjectionRunner::new(database.clone(), whist_projections::all());
    assert!(matches!(
        one_batch.step("jobs").await.expect("steps"),
        StepOutcome::Applied { .. }
    ));
    assert_eq!(
        table_rows(&database, "jobs", "job_key", &["kind", "job_key", "status"]).await,
        jobs_one_at_a_time
    );
    let count = |kind: &str| {
        jobs_one_at_a_time
            .iter()
            .filter(|row| row.starts_with(&format!("{kind} ")))
            .count()
    };
    assert_eq!(
        (
            count("launch_instance"),
            count("spin_up_mandelbox"),
            count("drain_host")
        ),
        (2, 3, 1),
        "a launch per host, a spin-up per mandelbox, the drain: {jobs_one_at_a_time:?}"
    );
}

/// A spin-up whose mandelbox ends before the reconciler claims it is finished by the job planner (nothing to do):
/// planned finished when the end comes in the same batch as the allocation, marked so when it comes later; one the
/// reconciler has claimed is left to it, and one whose mandelbox lives stays pending.
async fn spin_ups_of_mandelboxes_that_ended_before_a_claim_are_finished_by_the_planner(
    kind: BackendKind,
) {
    use whist_domain::mandelbox::{Mandelbox, MandelboxCommand, Placement};
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let mandelboxes = AggregateStore::<Mandelbox>::new(&database, ());
    let runner = ProjectionRunner::new(database.clone(), whist_projections::all());
    runner.register().await.expect("registers");
    let at = chrono::Utc::now();
    let allocate = |id: &str| {
        let mandelboxes = &mandelboxes;
        let id = id.to_string();
        async move {
            mandelboxes
                .execute(
                    &id,
                    MandelboxCommand::Allocate {
                        placement: Placement {
                            instance_id: "host".to_string(),
                            user_id: format!("user-{id}"),
                            session_id: 1,
                            region: "us-east-1".to_string(),
                            ip: "10.0.0.1".to_string(),
                            app_name: "CHROME".to_string(),
                        },
                        protocol_secret_hash: "secret".to_string(),
                        at,
                    },
                    &metadata(),
                )
                .await
                .expect("allocated");
        }
    };
    let disconnect = |id: &str| {
        let mandelboxes = &mandelboxes;
        let id = id.to_string();
        async move {
            mandelboxes
                .execute(&id, MandelboxCommand::Disconnect { at }, &metadata())
                .await
                .expect("disconnected");
        }
    };
    for id in ["ends-later", "lives", "claimed"] {
        allocate(id).await;
    }
    runner.catch_up("jobs").await.expect("plans");
    sqlx::query("UPDATE jobs SET status = 'running', attempts = 1 WHERE job_key = $1")
        .bind("spin_up_mandelbox:claimed")
        .execute(database.any())
        .await
        .expect("claimed, as the reconciler claims");
    allocate("ends-at-once").await;
    for id in ["ends-at-once", "ends-later", "claimed"] {
        disconnect(id).await;
    }
    runner.catch_up("jobs").await.expect("plans");
    let rows = table_rows(
        &database,
        "jobs",
        "job_key",
        &["job_key", "status", "attempts"],
    )
    .await;
    assert_eq!(
        rows,
        [
            "spin_up_mandelbox:claimed running 1",
            "spin_up_mandelbox:ends-at-once done 0",
            "spin_up_mandelbox:ends-later done 0",
            "spin_up_mandelbox:lives pending 0",
        ]
    );
    let unfinished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE status = 'done' AND finished_ms IS NULL",
    )
    .fetch_one(database.any())
    .await
    .expect("counts");
    assert_eq!(unfinished, 0, "a finished job says when");
    assert_eq!(
        whist_projections::jobs::waiting_jobs(&database)
            .await
            .expect("counts"),
        2
    );
}

#[tokio::test]
async fn spin_ups_of_mandelboxes_that_ended_before_a_claim_are_finished_by_the_planner_on_postgres()
{
    spin_ups_of_mandelboxes_that_ended_before_a_claim_are_finished_by_the_planner(
        BackendKind::Postgres,
    )
    .await;
}

#[tokio::test]
async fn spin_ups_of_mandelboxes_that_ended_before_a_claim_are_finished_by_the_planner_on_sqlite() {
    spin_ups_of_mandelboxes_that_ended_before_a_claim_are_finished_by_the_planner(
        BackendKind::Sqlite,
    )
    .await;
}

/// Plans one spin-up in `planner`'s process (an allocation, then a step of the `jobs` projection) and waits until
/// `woken` says jobs were planned.
async fn a_planned_job_wakes(
    planner: &Database,
    who: &str,
    mut woken: tokio::sync::watch::Receiver<u64>,
) {
    use whist_domain::mandelbox::{Mandelbox, MandelboxCommand, Placement};
    let runner = ProjectionRunner::new(planner.clone(), whist_projections::all());
    runner.register().await.expect("registers");
    AggregateStore::<Mandelbox>::new(planner, ())
        .execute(
            "to-spin-up",
            MandelboxCommand::Allocate {
                placement: Placement {
                    instance_id: "host".to_string(),
                    user_id: "user".to_string(),
                    session_id: 1,
                    region: "us-east-1".to_string(),
                    ip: "10.0.0.1".to_string(),
                    app_name: "CHROME".to_string(),
                },
                protocol_secret_hash: "secret".to_string(),
                at: chrono::Utc::now(),
            },
            &metadata(),
        )
        .await
        .expect("allocated");
    woken.borrow_and_update();
    runner.catch_up("jobs").await.expect("plans");
    let raised = tokio::time::timeout(Duration::from_secs(10), woken.changed()).await;
    assert!(
        matches!(raised, Ok(Ok(()))),
        "{who} heard that a job was planned"
    );
}

/// A reconciler wakes when the planner has planned jobs, not when the log moved (then it claimed before the planner
/// had planned an append's jobs, and a spin-up waited for its next poll, half a second): in the planner's process
/// once the planner's batch is committed.
#[tokio::test]
async fn the_planner_s_own_process_hears_that_jobs_were_planned() {
    let test_database = TestDatabase::sqlite();
    let database = test_database.open().await;
    let woken = database.jobs_signal().on_planned();
    a_planned_job_wakes(&database, "the planner's process", woken).await;
}

/// ... and in every other process through `NOTIFY`, which its log listener hears.
#[tokio::test]
async fn other_processes_hear_that_jobs_were_planned() {
    let test_database = TestDatabase::postgres().await;
    let planner = test_database.open().await;
    let other = test_database.open().await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let listener = whist_adapters::store::LogListener::new(
        other.session_pool().expect("Postgres").clone(),
        other.signal().clone(),
        other.jobs_signal().clone(),
        other.reachability().clone(),
    );
    let mut woken = other.jobs_signal().on_planned();
    let listening = tokio::spawn(listener.run(stopped));
    // The listener raises the signal once it listens (a notification may have been missed before).
    tokio::time::timeout(Duration::from_secs(10), woken.changed())
        .await
        .expect("the listener listens")
        .expect("the signal lives");
    a_planned_job_wakes(&planner, "another process", woken).await;
    let _ = stop.send(true);
    listening.await.expect("the listener stops");
}

#[tokio::test]
async fn the_fleet_read_models_are_the_same_one_event_at_a_time_as_in_one_batch_on_postgres() {
    the_fleet_read_models_are_the_same_one_event_at_a_time_as_in_one_batch(BackendKind::Postgres)
        .await;
}

#[tokio::test]
async fn the_fleet_read_models_are_the_same_one_event_at_a_time_as_in_one_batch_on_sqlite() {
    the_fleet_read_models_are_the_same_one_event_at_a_time_as_in_one_batch(BackendKind::Sqlite)
        .await;
}

/// Two processes running projections, started together: one of them holds every projection's step lease (the one
/// that holds the projections' lease), so that neither reads the log for a part of the projections apart from the
/// other; when it stops, the other holds them all (at once: a clean stop gives the leases up) and the read models
/// keep following the log.
#[tokio::test]
async fn two_processes_starting_together_do_not_split_the_projections() {
    let test_database = TestDatabase::new(BackendKind::Postgres).await;
    let database = test_database.open().await;
    let first = ProjectionRunner::new(database.clone(), whist_projections::all());
    let second = ProjectionRunner::new(database.clone(), whist_projections::all());
    let (first_background, second_background) = tokio::join!(
        async { whist_api::workers::background::Background::start(&database, first.clone()) },
        async { whist_api::workers::background::Background::start(&database, second.clone()) },
    );
    append(&database, 3, 2).await;
    assert!(index_reaches(&database, 6).await);
    let one_holds_all = || async {
        let holders = lease_holders(&database).await;
        holders
            .iter()
            .all(|holder| holder.is_some() && *holder == holders[0])
    };
    assert!(
        eventually(Duration::from_secs(10), one_holds_all).await,
        "one process holds every lease: {:?}",
        lease_holders(&database).await
    );
    let Some(holder) = lease_holders(&database).await.remove(0) else {
        panic!("the projections' lease has a holder");
    };
    let (stopping, staying, other) = if holder == first.holder() {
        (
            first_background,
            second_background,
            second.holder().to_string(),
        )
    } else {
        (
            second_background,
            first_background,
            first.holder().to_string(),
        )
    };
    stopping.stop().await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            lease_holders(&database)
                .await
                .iter()
                .all(|holder| holder.as_deref() == Some(other.as_str()))
        })
        .await,
        "the other process holds them all: {:?}",
        lease_holders(&database).await
    );
    append(&database, 2, 2).await;
    assert!(
        index_reaches(&database, 10).await,
        "the other process follows the log"
    );
    staying.stop().await;
}

/// Who holds the projections' lease, then each projection's step lease.
async fn lease_holders(database: &Database) -> Vec<Option<String>> {
    let mut holders = Vec::new();
    let step_leases = whist_projections::all()
        .into_iter()
        .map(|projection| whist_projections::step_lease(projection.name()));
    for name in std::iter::once(whist_projections::PROJECTIONS_LEASE.to_string()).chain(step_leases)
    {
        let holder = whist_adapters::store::lease::current(database, &name)
            .await
            .expect("reads")
            .map(|(holder, _, _)| holder);
        holders.push(holder);
    }
    holders
}
