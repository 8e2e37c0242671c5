//! The event store and its global log, on both backends.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use whist_adapters::store::{
    AggregateStore, Backend, CommandError, Database, LoggedEvent, Unit, UnitError,
};
use whist_domain::probe::{Probe, ProbeCommand, ProbeError};
use whist_domain::{Actor, EventMetadata};
use whist_tests::{BackendKind, TestDatabase};

fn metadata() -> EventMetadata {
    EventMetadata::new(Actor::User("auth0|tester".to_string()), chrono::Utc::now())
}

/// Reads the whole log from position 0.
async fn whole_log(database: &whist_adapters::store::Database) -> Vec<LoggedEvent> {
    let log = database.log();
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let batch = log.read_after(after, 1_000).await.expect("the log reads");
        let Some(last) = batch.last() else { break };
        after = last.position;
        events.extend(batch);
    }
    events
}

async fn every_command_is_applied_exactly_once(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let store = AggregateStore::<Probe>::new(&database, ());
    for by in 1..=7 {
        store
            .execute("counter", ProbeCommand::Increment { by }, &metadata())
            .await
            .expect("the increment is recorded");
    }
    let (probe, version) = store
        .load_from_history("counter")
        .await
        .expect("the probe loads");
    assert_eq!(version, 7);
    assert_eq!(probe.increments, 7);
    assert_eq!(probe.total, 28, "an event applied twice would show here");
}

#[tokio::test]
async fn every_command_is_applied_exactly_once_on_postgres() {
    every_command_is_applied_exactly_once(BackendKind::Postgres).await;
}

#[tokio::test]
async fn every_command_is_applied_exactly_once_on_sqlite() {
    every_command_is_applied_exactly_once(BackendKind::Sqlite).await;
}

async fn a_rejected_command_records_nothing(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let store = AggregateStore::<Probe>::new(&database, ());
    let outcome = store
        .execute("counter", ProbeCommand::Increment { by: 0 }, &metadata())
        .await;
    assert!(matches!(
        outcome,
        Err(CommandError::Rejected(ProbeError::ZeroIncrement))
    ));
    assert!(whole_log(&database).await.is_empty());
    assert_eq!(database.log().head().await.expect("head"), 0);
}

#[tokio::test]
async fn a_rejected_command_records_nothing_on_postgres() {
    a_rejected_command_records_nothing(BackendKind::Postgres).await;
}

#[tokio::test]
async fn a_rejected_command_records_nothing_on_sqlite() {
    a_rejected_command_records_nothing(BackendKind::Sqlite).await;
}

async fn every_event_carries_its_metadata(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let store = AggregateStore::<Probe>::new(&database, ());
    let sent = metadata().caused_by("request-42", chrono::Utc::now());
    store
        .execute("counter", ProbeCommand::Increment { by: 2 }, &sent)
        .await
        .expect("recorded");
    let events = whole_log(&database).await;
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert_eq!(event.position, 1);
    assert_eq!(event.aggregate_type, "probe");
    assert_eq!(event.aggregate_id, "counter");
    assert_eq!(event.sequence, 1);
    assert_eq!(event.event_type, "ProbeIncremented");
    assert_eq!(event.event_version, "1.0");
    assert_eq!(
        event.payload_json().expect("json"),
        serde_json::json!({"Incremented": {"by": 2, "total": 2}})
    );
    let stored = event.metadata().expect("metadata reads back");
    assert_eq!(stored.actor, Actor::User("auth0|tester".to_string()));
    assert_eq!(stored.correlation_id, sent.correlation_id);
    assert_eq!(stored.causation_id.as_deref(), Some("request-42"));
    assert_eq!(
        stored.recorded_at.timestamp_micros(),
        sent.recorded_at.timestamp_micros()
    );
}

#[tokio::test]
async fn every_event_carries_its_metadata_on_postgres() {
    every_event_carries_its_metadata(BackendKind::Postgres).await;
}

#[tokio::test]
async fn every_event_carries_its_metadata_on_sqlite() {
    every_event_carries_its_metadata(BackendKind::Sqlite).await;
}

async fn concurrent_commands_on_one_aggregate_conflict_instead_of_overwriting(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let store = Arc::new(AggregateStore::<Probe>::new(&database, ()));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .execute("contended", ProbeCommand::Increment { by: 1 }, &metadata())
                .await
        }));
    }
    let mut recorded = 0u64;
    for task in tasks {
        match task.await.expect("the task ran") {
            Ok(()) => recorded += 1,
            Err(CommandError::Conflict) => {}
            Err(other) => panic!("unexpected outcome {other:?}"),
        }
    }
    assert!(recorded >= 1);
    let (probe, version) = store.load_from_history("contended").await.expect("loads");
    assert_eq!(probe.total, recorded, "only recorded commands count");
    assert_eq!(version as u64, recorded);
}

#[tokio::test]
async fn concurrent_commands_on_one_aggregate_conflict_instead_of_overwriting_on_postgres() {
    concurrent_commands_on_one_aggregate_conflict_instead_of_overwriting(BackendKind::Postgres)
        .await;
}

#[tokio::test]
async fn concurrent_commands_on_one_aggregate_conflict_instead_of_overwriting_on_sqlite() {
    concurrent_commands_on_one_aggregate_conflict_instead_of_overwriting(BackendKind::Sqlite).await;
}

async fn the_log_holds_every_aggregate_in_sequence_order(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let store = Arc::new(AggregateStore::<Probe>::new(&database, ()));
    let mut tasks = Vec::new();
    for writer in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..25 {
                store
                    .execute(
                        &format!("writer-{writer}"),
                        ProbeCommand::Increment { by: 1 },
                        &metadata(),
                    )
                    .await
                    .expect("recorded");
            }
        }));
    }
    for task in tasks {
        task.await.expect("the writer ran");
    }
    let events = whole_log(&database).await;
    assert_eq!(events.len(), 200);
    let positions: Vec<i64> = events.iter().map(|event| event.position).collect();
    assert_eq!(
        positions,
        (1..=200).collect::<Vec<_>>(),
        "positions are dense and ordered"
    );
    for writer in 0..8 {
        let sequences: Vec<i64> = events
            .iter()
            .filter(|event| event.aggregate_id == format!("writer-{writer}"))
            .map(|event| event.sequence)
            .collect();
        assert_eq!(sequences, (1..=25).collect::<Vec<_>>());
    }
    assert_eq!(database.log().head().await.expect("head"), 200);
}

#[tokio::test]
async fn the_log_holds_every_aggregate_in_sequence_order_on_postgres() {
    the_log_holds_every_aggregate_in_sequence_order(BackendKind::Postgres).await;
}

#[tokio::test]
async fn the_log_holds_every_aggregate_in_sequence_order_on_sqlite() {
    the_log_holds_every_aggregate_in_sequence_order(BackendKind::Sqlite).await;
}

/// Two stores on one database stand for two processes: each remembers aggregates between commands.
async fn a_stale_remembered_copy_costs_a_retry_never_a_wrong_decision(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    // Without the log follower, which would mark `first`'s copy stale before it is used (most of the time).
    database.following().stop();
    let first = AggregateStore::<Probe>::new(&database, ());
    let second = AggregateStore::<Probe>::new(&database, ());
    first
        .execute("shared", ProbeCommand::Increment { by: 1 }, &metadata())
        .await
        .expect("recorded");
    second
        .execute("shared", ProbeCommand::Increment { by: 5 }, &metadata())
        .await
        .expect("recorded");
    // `first` remembers a total of 1; the truth is 6. Its append collides with `second`'s sequence number.
    let outcome = first
        .execute("shared", ProbeCommand::Increment { by: 1 }, &metadata())
        .await;
    assert!(
        matches!(outcome, Err(CommandError::Conflict)),
        "{outcome:?}"
    );
    first
        .execute("shared", ProbeCommand::Increment { by: 1 }, &metadata())
        .await
        .expect("the retry loads fresh state");
    assert_eq!(
        first
            .load_from_history("shared")
            .await
            .expect("loads")
            .0
            .total,
        7
    );
    // `second` remembers 6; the truth is 7. A rule that would refuse on the stale copy must not refuse.
    first
        .execute("shared", ProbeCommand::Decrement { by: 7 }, &metadata())
        .await
        .expect("recorded");
    second
        .execute("shared", ProbeCommand::Increment { by: 2 }, &metadata())
        .await
        .expect_err("stale: conflicts");
    first
        .execute("shared", ProbeCommand::Increment { by: 3 }, &metadata())
        .await
        .expect("recorded");
    // Now `first` remembers 3, the truth is 3; `second` forgot its copy after the conflict and loads 3.
    second
        .execute("shared", ProbeCommand::Decrement { by: 3 }, &metadata())
        .await
        .expect("decided on fresh state");
    // `first` remembers 3, the truth is 0: on the stale copy a decrement of 2 looks allowed, and the append
    // collides; on fresh state it is refused.
    let outcome = first
        .execute("shared", ProbeCommand::Decrement { by: 2 }, &metadata())
        .await;
    assert!(
        matches!(outcome, Err(CommandError::Conflict)),
        "{outcome:?}"
    );
    let refused = first
        .execute("shared", ProbeCommand::Decrement { by: 2 }, &metadata())
        .await;
    assert!(matches!(
        refused,
        Err(CommandError::Rejected(ProbeError::InsufficientTotal))
    ));
    second
        .execute("shared", ProbeCommand::Increment { by: 4 }, &metadata())
        .await
        .expect("recorded");
    // `first` remembers 0 (fresh after the refusal), the truth is 4: stale refusal must become a decision.
    first
        .execute("shared", ProbeCommand::Decrement { by: 4 }, &metadata())
        .await
        .expect("a refusal on a stale copy is retried on fresh state");
    assert_eq!(
        second
            .load_from_history("shared")
            .await
            .expect("loads")
            .0
            .total,
        0
    );
}

#[tokio::test]
async fn a_stale_remembered_copy_costs_a_retry_never_a_wrong_decision_on_postgres() {
    a_stale_remembered_copy_costs_a_retry_never_a_wrong_decision(BackendKind::Postgres).await;
}

#[tokio::test]
async fn a_stale_remembered_copy_costs_a_retry_never_a_wrong_decision_on_sqlite() {
    a_stale_remembered_copy_costs_a_retry_never_a_wrong_decision(BackendKind::Sqlite).await;
}

const INSERT_EVENT: &str =
    "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, \
     payload, metadata) VALUES ('probe', $1, 1, 'ProbeIncremented', '1.0', '{}', $2::json)";

/// Appends one probe event to aggregate `id` the way every process appends (`whist_append_units`), inside an open
/// transaction, so that a test decides when it commits.
async fn append_in(connection: &mut sqlx::PgConnection, id: &str, metadata_json: &str) {
    let lost: Vec<i64> = sqlx::query_scalar(
        "SELECT whist_append_units(ARRAY[0]::bigint[], ARRAY['probe'], ARRAY[$1], ARRAY[1]::bigint[], \
         ARRAY['ProbeIncremented'], ARRAY['1.0'], ARRAY['{}'], ARRAY[$2])",
    )
    .bind(id)
    .bind(metadata_json)
    .fetch_all(connection)
    .await
    .expect("appends");
    assert!(lost.is_empty(), "a fresh aggregate cannot collide");
}

/// The case that loses events when a position is taken at insert: A inserts first, B second, B commits, a reader
/// passes B, then A commits. Here an append holds the head until it commits, so B cannot begin before A is
/// committed: the log shows nothing while A is open, then A before B.
#[tokio::test]
async fn an_append_waits_for_the_one_before_it_to_commit_so_positions_follow_commit_order() {
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open().await;
    let Backend::Postgres(pool) = database.backend().clone() else {
        unreachable!("a Postgres test database")
    };
    let metadata_json = serde_json::to_string(&metadata().to_map()).expect("json");

    let mut transaction_a = pool.begin().await.expect("A begins");
    append_in(&mut transaction_a, "a", &metadata_json).await;
    let b = {
        let pool = pool.clone();
        let metadata_json = metadata_json.clone();
        tokio::spawn(async move {
            let mut transaction_b = pool.begin().await.expect("B begins");
            append_in(&mut transaction_b, "b", &metadata_json).await;
            transaction_b.commit().await.expect("B commits");
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!b.is_finished(), "B's append waits while A is open");
    let log = database.log();
    assert!(
        log.read_after(0, 100).await.expect("reads").is_empty(),
        "nothing uncommitted is in the log"
    );

    transaction_a.commit().await.expect("A commits");
    b.await.expect("B ran");
    let events = log.read_after(0, 100).await.expect("reads");
    assert_eq!(
        events
            .iter()
            .map(|event| (event.aggregate_id.as_str(), event.position))
            .collect::<Vec<_>>(),
        vec![("a", 1), ("b", 2)],
        "positions in commit order, with no gap"
    );
    assert_eq!(log.head().await.expect("head"), 2);
}

/// An event inserted around the append, without a position, would never be read: the table refuses it.
#[tokio::test]
async fn an_event_inserted_without_a_position_is_refused() {
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open().await;
    let Backend::Postgres(pool) = database.backend().clone() else {
        unreachable!("a Postgres test database")
    };
    let metadata_json = serde_json::to_string(&metadata().to_map()).expect("json");
    let refused = sqlx::query(INSERT_EVENT)
        .bind("around")
        .bind(&metadata_json)
        .execute(&pool)
        .await
        .expect_err("an insert without a position is refused");
    let code = refused
        .as_database_error()
        .and_then(|error| error.code().map(|code| code.to_string()));
    assert_eq!(
        code.as_deref(),
        Some("23514"),
        "a check violation: {refused}"
    );
}

/// Units share one call of the append: a unit that collides with a stored event keeps none of its events, the
/// others are recorded, and the positions they take have no gap.
#[tokio::test]
async fn a_unit_that_collides_in_a_shared_append_keeps_nothing_and_leaves_no_gap() {
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open().await;
    let Backend::Postgres(pool) = database.backend().clone() else {
        unreachable!("a Postgres test database")
    };
    let metadata_json = serde_json::to_string(&metadata().to_map()).expect("json");
    let mut connection = pool.acquire().await.expect("a connection");
    append_in(&mut connection, "taken", &metadata_json).await;
    // Unit 0: "first" 1. Unit 1: "second" 1 and "taken" 1 (collides). Unit 2: "third" 1 and 2.
    let lost: Vec<i64> = sqlx::query_scalar(
        "SELECT whist_append_units(ARRAY[0, 1, 1, 2, 2]::bigint[], ARRAY['probe', 'probe', 'probe', 'probe', \
         'probe'], ARRAY['first', 'second', 'taken', 'third', 'third'], ARRAY[1, 1, 1, 1, 2]::bigint[], \
         array_fill('ProbeIncremented'::text, ARRAY[5]), array_fill('1.0'::text, ARRAY[5]), \
         array_fill('{}'::text, ARRAY[5]), array_fill($1::text, ARRAY[5]))",
    )
    .bind(&metadata_json)
    .fetch_all(&mut *connection)
    .await
    .expect("appends");
    assert_eq!(lost, vec![1], "only the colliding unit is lost");
    let logged: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT aggregate_id, sequence, position FROM events ORDER BY position")
            .fetch_all(&mut *connection)
            .await
            .expect("reads");
    assert_eq!(
        logged,
        vec![
            ("taken".to_string(), 1, 1),
            ("first".to_string(), 1, 2),
            ("third".to_string(), 1, 3),
            ("third".to_string(), 2, 4),
        ],
        "the lost unit left nothing, not even a gap"
    );
    assert_eq!(database.log().head().await.expect("head"), 4);
}

/// Calls the append function with one event per entry `(unit, aggregate id, sequence)` of probe events; returns the
/// units reported lost and the head after the call.
async fn append_checked(
    connection: &mut sqlx::PgConnection,
    events: &[(i64, &str, i64)],
    metadata_json: &str,
) -> (Vec<i64>, i64) {
    let units: Vec<i64> = events.iter().map(|event| event.0).collect();
    let ids: Vec<&str> = events.iter().map(|event| event.1).collect();
    let sequences: Vec<i64> = events.iter().map(|event| event.2).collect();
    sqlx::query_as(
        "SELECT lost, head FROM whist_append_units_checked($1, array_fill('probe'::text, ARRAY[$4]), $2, $3, \
         array_fill('ProbeIncremented'::text, ARRAY[$4]), array_fill('1.0'::text, ARRAY[$4]), \
         array_fill('{}'::text, ARRAY[$4]), array_fill($5::text, ARRAY[$4]))",
    )
    .bind(&units)
    .bind(&ids)
    .bind(&sequences)
    .bind(i32::try_from(events.len()).expect("few events"))
    .bind(metadata_json)
    .fetch_one(connection)
    .await
    .expect("appends")
}

/// A fresh Postgres database and a connection to it, for calling the append function directly; the database is
/// dropped with the first value.
async fn an_append_connection() -> (
    TestDatabase,
    sqlx::pool::PoolConnection<sqlx::Postgres>,
    String,
) {
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open().await;
    let Backend::Postgres(pool) = database.backend().clone() else {
        unreachable!("a Postgres test database")
    };
    let connection = pool.acquire().await.expect("a connection");
    let metadata_json = serde_json::to_string(&metadata().to_map()).expect("json");
    (test_database, connection, metadata_json)
}

async fn logged_keys(connection: &mut sqlx::PgConnection) -> Vec<(String, i64, i64)> {
    sqlx::query_as("SELECT aggregate_id, sequence, position FROM events ORDER BY position")
        .fetch_all(connection)
        .await
        .expect("reads")
}

/// Two units of one call that want the same key: one row can be inserted, so exactly one unit is recorded and the
/// other is reported lost, and the head moves by the one row (a head moved by two would leave a gap that stops the
/// chain's seal for good).
#[tokio::test]
async fn two_units_wanting_one_key_in_one_call_record_one_and_report_the_other_lost() {
    let (_test_database, mut connection, metadata_json) = an_append_connection().await;
    let (lost, head) = append_checked(
        &mut connection,
        &[(0, "twice", 1), (1, "twice", 1), (2, "other", 1)],
        &metadata_json,
    )
    .await;
    assert_eq!(lost, vec![1], "the second unit wanting the key is lost");
    assert_eq!(head, 2);
    assert_eq!(
        logged_keys(&mut connection).await,
        vec![("twice".to_string(), 1, 1), ("other".to_string(), 1, 2)],
        "one row per key, and no gap"
    );
}

/// A collision takes back the rows its own call inserted, and only those: an event stored above the positions the
/// call numbered from is left alone.
#[tokio::test]
async fn a_collision_takes_back_only_the_rows_its_own_call_inserted() {
    let (_test_database, mut connection, metadata_json) = an_append_connection().await;
    append_checked(&mut connection, &[(0, "taken", 1)], &metadata_json).await;
    // An event written straight into the table, far above the head (a restore, a hand repair).
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, \
         metadata, position) VALUES ('probe', 'by-hand', 1, 'ProbeIncremented', '1.0', '{}', $1::json, 100)",
    )
    .bind(&metadata_json)
    .execute(&mut *connection)
    .await
    .expect("inserted by hand");
    let (lost, head) = append_checked(
        &mut connection,
        &[(0, "fresh", 1), (1, "taken", 1)],
        &metadata_json,
    )
    .await;
    assert_eq!(lost, vec![1]);
    assert_eq!(head, 101);
    assert_eq!(
        logged_keys(&mut connection).await,
        vec![
            ("taken".to_string(), 1, 1),
            ("by-hand".to_string(), 1, 100),
            ("fresh".to_string(), 1, 101),
        ],
        "the event stored by hand survives the collision"
    );
}

/// An append whose first event of an aggregate is not sequence 1 needs the event before it stored: otherwise the
/// unit is reported lost, and nothing of it is written.
#[tokio::test]
async fn an_append_that_would_leave_a_hole_in_a_sequence_is_refused_whole() {
    let (_test_database, mut connection, metadata_json) = an_append_connection().await;
    append_checked(&mut connection, &[(0, "short", 1)], &metadata_json).await;
    let (lost, head) = append_checked(
        &mut connection,
        &[
            (0, "short", 5),
            (0, "new", 1),
            (1, "short", 2),
            (1, "short", 3),
        ],
        &metadata_json,
    )
    .await;
    assert_eq!(lost, vec![0], "sequence 5 after 1 would leave a hole");
    assert_eq!(head, 3);
    assert_eq!(
        logged_keys(&mut connection).await,
        vec![
            ("short".to_string(), 1, 1),
            ("short".to_string(), 2, 2),
            ("short".to_string(), 3, 3),
        ],
        "the refused unit left nothing, not even its event that had no hole"
    );
}

/// An event may follow one of its own unit in the same call, never one of another unit: that unit could still be
/// lost, and the follower would be left after a hole. So the follower's unit is reported lost (and retried on fresh
/// state), and the units before it are recorded.
#[tokio::test]
async fn an_event_that_follows_another_units_event_of_the_same_call_loses_its_unit() {
    let (_test_database, mut connection, metadata_json) = an_append_connection().await;
    let (lost, head) = append_checked(
        &mut connection,
        &[
            (0, "shared", 1),
            (0, "shared", 2),
            (1, "shared", 3),
            (2, "own", 1),
        ],
        &metadata_json,
    )
    .await;
    assert_eq!(lost, vec![1], "sequence 3 follows unit 0's event");
    assert_eq!(head, 3);
    assert_eq!(
        logged_keys(&mut connection).await,
        vec![
            ("shared".to_string(), 1, 1),
            ("shared".to_string(), 2, 2),
            ("own".to_string(), 1, 3),
        ],
        "the events of the other units, numbered without a gap"
    );
}

/// The append's plan is made at a session's first call, perhaps while the log is still empty, and kept. Once the
/// log has grown, that plan must still find an event's predecessor by one probe of the key, not read the log (an
/// `EXISTS` there was planned as one hash of the whole log per call: 11 ms a call at 20,000 events). Counted in
/// blocks the call touches, in a transaction of its own.
#[tokio::test]
async fn an_append_planned_while_the_log_was_empty_reads_by_key_once_the_log_has_grown() {
    let (_test_database, mut connection, metadata_json) = an_append_connection().await;
    append_checked(&mut connection, &[(0, "early", 1)], &metadata_json).await;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, \
         metadata, position) \
         SELECT 'probe', 'filler-' || (g / 40), g % 40 + 1, 'ProbeIncremented', '1.0', '{}', $1::json, g + 1 \
           FROM generate_series(1, 20000) AS g",
    )
    .bind(&metadata_json)
    .execute(&mut *connection)
    .await
    .expect("the log grows");
    // The counters also hold what earlier statements of this session fetched and not yet reported: the call's own
    // share is the difference.
    let blocks_fetched = "SELECT pg_stat_get_xact_blocks_fetched('events'::regclass)::bigint, \
                          (SELECT sum(pg_stat_get_xact_blocks_fetched(indexrelid))::bigint \
                             FROM pg_stat_user_indexes WHERE relname = 'events')";
    let mut transaction = sqlx::Connection::begin(&mut *connection)
        .await
        .expect("begins");
    let (heap_before, indexes_before): (i64, i64) = sqlx::query_as(blocks_fetched)
        .fetch_one(&mut *transaction)
        .await
        .expect("counts");
    let (lost, head) = append_checked(
        &mut transaction,
        &[(0, "early", 2), (0, "early", 3), (1, "late", 1)],
        &metadata_json,
    )
    .await;
    assert_eq!((lost, head), (vec![], 20_004));
    let (heap_after, indexes_after): (i64, i64) = sqlx::query_as(blocks_fetched)
        .fetch_one(&mut *transaction)
        .await
        .expect("counts");
    transaction.commit().await.expect("commits");
    let (heap, blocks) = (heap_after - heap_before, indexes_after - indexes_before);
    assert!(
        blocks + heap < 100,
        "the call touched {blocks} index and {heap} table blocks of a log of 20,000 events"
    );
}

async fn a_copy_remembered_past_a_log_that_moved_back_never_appends_a_hole(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let store = AggregateStore::<Probe>::new(&database, ());
    for _ in 0..5 {
        store
            .execute("rewound", ProbeCommand::Increment { by: 1 }, &metadata())
            .await
            .expect("recorded");
    }
    // Behind the process's back, the store loses the last four events (a failover to a standby that lagged).
    sqlx::query("DELETE FROM events WHERE aggregate_id = 'rewound' AND sequence > 1")
        .execute(database.any())
        .await
        .expect("the tail is lost");
    let outcome = store
        .execute("rewound", ProbeCommand::Increment { by: 10 }, &metadata())
        .await;
    assert!(
        matches!(outcome, Err(CommandError::Conflict)),
        "sequence 6 after 1 is refused: {outcome:?}"
    );
    store
        .execute("rewound", ProbeCommand::Increment { by: 10 }, &metadata())
        .await
        .expect("decided again on the aggregate as stored");
    let sequences: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM events WHERE aggregate_id = 'rewound' ORDER BY sequence",
    )
    .fetch_all(database.any())
    .await
    .expect("reads");
    assert_eq!(sequences, vec![1, 2], "contiguous");
    let (probe, version) = store.load_from_history("rewound").await.expect("loads");
    assert_eq!((probe.total, version), (11, 2));
}

#[tokio::test]
async fn a_copy_remembered_past_a_log_that_moved_back_never_appends_a_hole_on_postgres() {
    a_copy_remembered_past_a_log_that_moved_back_never_appends_a_hole(BackendKind::Postgres).await;
}

#[tokio::test]
async fn a_copy_remembered_past_a_log_that_moved_back_never_appends_a_hole_on_sqlite() {
    a_copy_remembered_past_a_log_that_moved_back_never_appends_a_hole(BackendKind::Sqlite).await;
}

/// A tool that stops following the log (the load test's own process) stops it for good: its loop waits for the
/// process's shutdown instead of ending, which its supervisor would take for a failure and restart (logging an
/// error each time) while the log moves.
#[tokio::test]
async fn a_follower_stopped_for_good_is_not_restarted_as_the_log_moves() {
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open().await;
    let store = AggregateStore::<Probe>::new(&database, ());
    store
        .execute("before", ProbeCommand::Increment { by: 1 }, &metadata())
        .await
        .expect("recorded");
    database.following().stop();
    for turn in 0..5 {
        store
            .execute(
                &format!("after-{turn}"),
                ProbeCommand::Increment { by: 1 },
                &metadata(),
            )
            .await
            .expect("recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let loops = database.background_loops();
    assert_eq!(loops.restarts(whist_adapters::store::FOLLOW_LOOP), 0);
    assert!(
        !loops.down().contains(&whist_adapters::store::FOLLOW_LOOP),
        "down: {:?}",
        loops.down()
    );
}

/// The events a process appends reach its own readers (the projections) from memory, numbered as the store
/// numbered them and byte for byte as the store keeps them: the chain's seals hash what the readers get.
#[tokio::test]
async fn what_a_process_appends_its_readers_get_from_memory_as_the_store_keeps_it() {
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open().await;
    let store = Arc::new(AggregateStore::<Probe>::new(&database, ()));
    let mut recording = tokio::task::JoinSet::new();
    for writer in 0..8 {
        let store = store.clone();
        recording.spawn(async move {
            for by in 1..=5 {
                store
                    .execute(
                        &format!("stretch-{writer}"),
                        ProbeCommand::Increment { by },
                        &metadata(),
                    )
                    .await
                    .expect("recorded");
            }
        });
    }
    while let Some(done) = recording.join_next().await {
        done.expect("the writer finished");
    }
    let stored = whole_log(&database).await;
    assert_eq!(stored.len(), 40);
    // A pool that is closed answers no statement: what the read returns came from memory.
    let closed = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(test_database.url.as_deref().expect("a Postgres URL"))
        .await
        .expect("connects");
    closed.close().await;
    let served = database
        .log()
        .read_after_in(&closed, 0, 1_000, 40)
        .await
        .expect("served from the process's stretch of the log");
    assert_eq!(served, stored);
}

/// A process that only reads (an API process between requests) notices within seconds that the log moved back,
/// and forgets the copies it remembered past the new head.
#[tokio::test]
async fn a_process_that_finds_the_log_moved_back_forgets_what_it_remembered_past_the_head() {
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open().await;
    let store = AggregateStore::<Probe>::new(&database, ());
    for _ in 0..3 {
        store
            .execute("remembered", ProbeCommand::Increment { by: 1 }, &metadata())
            .await
            .expect("recorded");
    }
    assert_eq!(database.watermark().highest(), 3);
    sqlx::query("DELETE FROM events WHERE position > 1")
        .execute(database.any())
        .await
        .expect("the tail is lost");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (probe, version) = store
            .load_possibly_stale("remembered")
            .await
            .expect("loads");
        if version == 1 {
            assert_eq!(probe.total, 1);
            break;
        }
        assert_eq!(
            version, 3,
            "the remembered copy, until the rewind is noticed"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the log follower did not notice the log moved back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        database.watermark().highest(),
        1,
        "carries on from the store"
    );
}

/// Two processes on one store: what one records makes the other's remembered copy stale through its log follower,
/// without the other reading that aggregate, and a read as of the log then serves the new state. A copy nothing
/// changed stays current, so reading it costs no statement.
async fn a_process_follows_the_log_and_marks_the_copies_another_process_changed(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let (one, other) = (test_database.open().await, test_database.open().await);
    let (writer, follower) = (
        AggregateStore::<Probe>::new(&one, ()),
        AggregateStore::<Probe>::new(&other, ()),
    );
    // The follower starts by forgetting every copy (one remembered before it found the head could miss events).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !other.following().is_current() {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in ["changed", "untouched"] {
        follower
            .execute(id, ProbeCommand::Increment { by: 1 }, &metadata())
            .await
            .expect("recorded");
    }
    assert!(follower.remembers_current("changed"));
    writer
        .execute("changed", ProbeCommand::Increment { by: 5 }, &metadata())
        .await
        .expect("recorded by the other process");
    while follower.remembers_current("changed") {
        assert!(
            std::time::Instant::now() < deadline,
            "the follower never marked the copy the other process changed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        follower.remembers_current("untouched"),
        "a copy nothing changed stays current"
    );
    let (probe, version) = follower.load_as_of_log("changed").await.expect("loads");
    assert_eq!((probe.total, version), (6, 2));
    assert!(follower.remembers_current("changed"), "caught up again");
}

#[tokio::test]
async fn a_process_follows_the_log_and_marks_the_copies_another_process_changed_on_postgres() {
    a_process_follows_the_log_and_marks_the_copies_another_process_changed(BackendKind::Postgres)
        .await;
}

#[tokio::test]
async fn a_process_follows_the_log_and_marks_the_copies_another_process_changed_on_sqlite() {
    a_process_follows_the_log_and_marks_the_copies_another_process_changed(BackendKind::Sqlite)
        .await;
}

/// A command that decides nothing on a remembered copy is decided again on the store: another process turned
/// maintenance on, and turning it off here, where the copy still says off, records the change.
#[tokio::test]
async fn a_command_that_decides_nothing_on_a_stale_copy_is_decided_again_on_the_store() {
    use whist_domain::service::{Service, ServiceCommand, SERVICE_ID};
    let test_database = TestDatabase::postgres().await;
    let here = test_database.open().await;
    let elsewhere = test_database.open().await;
    let store_here = AggregateStore::<Service>::new(&here, ());
    let store_elsewhere = AggregateStore::<Service>::new(&elsewhere, ());
    let set = |enabled| ServiceCommand::SetMaintenance {
        enabled,
        at: chrono::Utc::now(),
    };
    for enabled in [true, false] {
        store_here
            .execute(SERVICE_ID, set(enabled), &metadata())
            .await
            .expect("recorded");
    }
    store_elsewhere
        .execute(SERVICE_ID, set(true), &metadata())
        .await
        .expect("recorded elsewhere");
    store_here
        .execute(SERVICE_ID, set(false), &metadata())
        .await
        .expect("recorded");
    let (service, version) = store_elsewhere
        .load_from_history(SERVICE_ID)
        .await
        .expect("loads");
    assert_eq!(
        (service.maintenance, version),
        (false, 4),
        "maintenance is off, by a fourth event"
    );
}

/// A settled copy (a dead mandelbox) decides for good without a read of the store: a report of it decides
/// nothing and a second allocation elsewhere is refused, though the copy missed an event another process recorded
/// (the spin-up), which no such decision depends on.
#[tokio::test]
async fn a_settled_copy_refuses_and_decides_nothing_without_reading_what_it_missed() {
    use whist_domain::mandelbox::{
        Mandelbox, MandelboxCommand, MandelboxError, MandelboxStatus, Placement, ReportedStatus,
    };
    let test_database = TestDatabase::postgres().await;
    let here = test_database.open().await;
    let elsewhere = test_database.open().await;
    // Copies here stay as they are unless a decision here reads the store.
    here.following().stop();
    let (store_here, store_elsewhere) = (
        AggregateStore::<Mandelbox>::new(&here, ()),
        AggregateStore::<Mandelbox>::new(&elsewhere, ()),
    );
    let placement = |instance_id: &str| Placement {
        instance_id: instance_id.to_string(),
        region: "us-east-1".to_string(),
        ip: "10.0.0.1".to_string(),
        user_id: "u".to_string(),
        session_id: 1,
        app_name: "browsers/chrome".to_string(),
    };
    let at = chrono::Utc::now();
    let allocate = |instance_id: &str| MandelboxCommand::Allocate {
        placement: placement(instance_id),
        protocol_secret_hash: "h".to_string(),
        at,
    };
    store_here
        .execute("m", allocate("i"), &metadata())
        .await
        .expect("allocated");
    store_here
        .execute("m", MandelboxCommand::Disconnect { at }, &metadata())
        .await
        .expect("ended");
    store_elsewhere
        .execute("m", MandelboxCommand::RecordSpunUp { at }, &metadata())
        .await
        .expect("the spin-up, recorded by the other process");

    store_here
        .execute(
            "m",
            MandelboxCommand::ReportStatus {
                status: ReportedStatus::Running,
                at,
            },
            &metadata(),
        )
        .await
        .expect("a report of a dead mandelbox decides nothing");
    let refused = store_here.execute("m", allocate("j"), &metadata()).await;
    assert!(
        matches!(
            refused,
            Err(CommandError::Rejected(MandelboxError::AlreadyExists))
        ),
        "{refused:?}"
    );

    let copy = store_here
        .load_to_decide(&Unit::new(&metadata()), "m")
        .await
        .expect("the remembered copy");
    assert!(copy.decides_finally());
    assert_eq!(
        (copy.state().status, copy.state().spun_up_at),
        (Some(MandelboxStatus::Dead), None),
        "neither decision read the store: the copy still misses the spin-up"
    );
    let (stored, version) = store_here
        .load_from_history("m")
        .await
        .expect("the history");
    assert_eq!((stored.spun_up_at.is_some(), version), (true, 3));
}

/// Many writers whose transactions stay open for random times while a reader follows the log: the reader ends
/// with every committed event exactly once, in increasing positions, and the positions have no gap.
#[tokio::test]
async fn a_polling_reader_sees_every_event_exactly_once_whatever_the_commit_timing() {
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open_with(40).await;
    let Backend::Postgres(pool) = database.backend().clone() else {
        unreachable!("a Postgres test database")
    };
    let metadata_json = serde_json::to_string(&metadata().to_map()).expect("json");

    let log = database.log();
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut cursor = 0;
        let mut quiet_rounds = 0;
        while quiet_rounds < 100 {
            let batch = log.read_after(cursor, 50).await.expect("reads");
            if batch.is_empty() {
                quiet_rounds += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
            quiet_rounds = 0;
            for event in batch {
                assert!(event.position > cursor, "positions only grow");
                cursor = event.position;
                seen.push(event.aggregate_id);
            }
        }
        seen
    });

    let mut writers = Vec::new();
    for writer in 0..16 {
        let pool = pool.clone();
        let metadata_json = metadata_json.clone();
        writers.push(tokio::spawn(async move {
            for event in 0..40 {
                let mut transaction = pool.begin().await.expect("begins");
                append_in(
                    &mut transaction,
                    &format!("w{writer}-e{event}"),
                    &metadata_json,
                )
                .await;
                let hold = rand::rng().random_range(0..3);
                tokio::time::sleep(Duration::from_millis(hold)).await;
                transaction.commit().await.expect("commits");
            }
        }));
    }
    for writer in writers {
        writer.await.expect("the writer ran");
    }
    let seen = reader.await.expect("the reader ran");

    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no event was read twice");
    assert_eq!(seen.len(), 16 * 40, "no event was skipped");
    let (count, first, last): (i64, i64, i64) =
        sqlx::query_as("SELECT count(*), min(position), max(position) FROM events")
            .fetch_one(&pool)
            .await
            .expect("counts");
    assert_eq!(
        (count, first, last),
        (16 * 40, 1, 16 * 40),
        "no gap in positions"
    );
}

/// A unit that loses on one of its aggregates records nothing on any of them, and succeeds on fresh state.
async fn a_unit_is_recorded_whole_or_not_at_all(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    // The copy below must stay stale until the unit is staged on it: the log follower would mark it (and the stage
    // read it fresh) when it reads `first`'s event first, which a loaded machine lets it do.
    database.following().stop();
    // Two stores with their own memories, like two processes.
    let first = AggregateStore::<Probe>::new(&database, ());
    let second = AggregateStore::<Probe>::new(&database, ());
    let increment = |by| ProbeCommand::Increment { by };
    first
        .execute("x", increment(1), &metadata())
        .await
        .expect("x");
    first
        .execute("y", increment(1), &metadata())
        .await
        .expect("y");
    // `second` remembers x at version 1, then `first` moves x on.
    let mut warm = Unit::new(&metadata());
    second
        .stage(&mut warm, "x", vec![increment(1)])
        .await
        .expect("stages");
    drop(warm);
    first
        .execute("x", increment(1), &metadata())
        .await
        .expect("x");

    let mut unit = Unit::new(&metadata());
    second
        .stage(&mut unit, "y", vec![increment(10), increment(10)])
        .await
        .expect("stages y");
    second
        .stage(&mut unit, "x", vec![increment(100)])
        .await
        .expect("stages x on a stale copy");
    assert_eq!(unit.len(), 3);
    assert!(matches!(
        unit.commit(&database).await,
        Err(UnitError::Conflict)
    ));
    let (y, y_version) = first.load_from_history("y").await.expect("y loads");
    assert_eq!(
        (y.total, y_version),
        (1, 1),
        "y's events went with x's conflict"
    );

    let mut retry = Unit::new(&metadata());
    second
        .stage(&mut retry, "y", vec![increment(10)])
        .await
        .expect("stages y");
    second
        .stage(&mut retry, "x", vec![increment(100)])
        .await
        .expect("stages x after catching up");
    retry
        .commit(&database)
        .await
        .expect("commits on fresh state");
    let (x, x_version) = first.load_from_history("x").await.expect("x loads");
    let (y, _) = first.load_from_history("y").await.expect("y loads");
    assert_eq!((x.total, x_version, y.total), (102, 3, 11));
    let logged = whole_log(&database).await;
    assert_eq!(logged.len(), 5, "only recorded events reach the log");
}

#[tokio::test]
async fn a_unit_is_recorded_whole_or_not_at_all_on_postgres() {
    a_unit_is_recorded_whole_or_not_at_all(BackendKind::Postgres).await;
}

#[tokio::test]
async fn a_unit_is_recorded_whole_or_not_at_all_on_sqlite() {
    a_unit_is_recorded_whole_or_not_at_all(BackendKind::Sqlite).await;
}

/// An aggregate staged as new without being read: recorded when it is new; when another process had already
/// appended to it, the unit conflicts and records nothing, and the next decision is taken on its real state (here
/// a second decision that must not presume again, and a decrement that only the real total allows).
async fn an_aggregate_presumed_new_is_checked_by_the_append(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let first = AggregateStore::<Probe>::new(&database, ());
    let second = AggregateStore::<Probe>::new(&database, ());

    let mut unit = Unit::new(&metadata());
    first
        .stage_new(&mut unit, "fresh", vec![ProbeCommand::Increment { by: 2 }])
        .await
        .expect("stages");
    unit.commit(&database)
        .await
        .expect("a new aggregate records");
    let (fresh, version) = first.load_from_history("fresh").await.expect("loads");
    assert_eq!((fresh.total, version), (2, 1));

    // `second` never read "fresh": presumed new, its increment collides with the stored event.
    let mut unit = Unit::new(&metadata());
    second
        .stage_new(&mut unit, "other", vec![ProbeCommand::Increment { by: 1 }])
        .await
        .expect("stages other");
    second
        .stage_new(&mut unit, "fresh", vec![ProbeCommand::Increment { by: 5 }])
        .await
        .expect("stages fresh as new");
    assert!(matches!(
        unit.commit(&database).await,
        Err(UnitError::Conflict)
    ));
    let (other, other_version) = first.load_from_history("other").await.expect("loads");
    assert_eq!(
        (other.total, other_version),
        (0, 0),
        "nothing of the unit recorded"
    );

    // After the conflict the store knows better than to presume again: the next decision is on the real state.
    let mut unit = Unit::new(&metadata());
    second
        .stage_new(&mut unit, "fresh", vec![ProbeCommand::Increment { by: 1 }])
        .await
        .expect("stages");
    unit.commit(&database)
        .await
        .expect("decided on the real state after the conflict");
    let (fresh, version) = first.load_from_history("fresh").await.expect("loads");
    assert_eq!((fresh.total, version), (3, 2));

    // A refusal on the presumed empty state is not final either: a third store, which never read "fresh", decides
    // a decrement that only the real total allows.
    let third = AggregateStore::<Probe>::new(&database, ());
    let mut unit = Unit::new(&metadata());
    third
        .stage_new(&mut unit, "fresh", vec![ProbeCommand::Decrement { by: 3 }])
        .await
        .expect("the real total allows it");
    unit.commit(&database).await.expect("records");
    let (fresh, version) = first.load_from_history("fresh").await.expect("loads");
    assert_eq!((fresh.total, version), (0, 3));
}

#[tokio::test]
async fn an_aggregate_presumed_new_is_checked_by_the_append_on_postgres() {
    an_aggregate_presumed_new_is_checked_by_the_append(BackendKind::Postgres).await;
}

#[tokio::test]
async fn an_aggregate_presumed_new_is_checked_by_the_append_on_sqlite() {
    an_aggregate_presumed_new_is_checked_by_the_append(BackendKind::Sqlite).await;
}

/// Concurrent transfers between two aggregates, from two stores sharing batches: every unit either moves its
/// amount out of one and into the other, or moves nothing; the sum never changes.
async fn concurrent_units_conserve_what_they_move(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let stores = [
        Arc::new(AggregateStore::<Probe>::new(&database, ())),
        Arc::new(AggregateStore::<Probe>::new(&database, ())),
    ];
    stores[0]
        .execute("source", ProbeCommand::Increment { by: 1_000 }, &metadata())
        .await
        .expect("source");
    let mut tasks = Vec::new();
    for task in 0..32 {
        let store = stores[task % 2].clone();
        let database = database.clone();
        tasks.push(tokio::spawn(async move {
            let mut moved = 0u64;
            for _ in 0..10 {
                let mut unit = Unit::new(&metadata());
                store
                    .stage(&mut unit, "source", vec![ProbeCommand::Decrement { by: 1 }])
                    .await
                    .expect("stages the withdrawal");
                store
                    .stage(&mut unit, "sink", vec![ProbeCommand::Increment { by: 1 }])
                    .await
                    .expect("stages the deposit");
                match unit.commit(&database).await {
                    Ok(()) => moved += 1,
                    Err(UnitError::Conflict) => {}
                    Err(other) => panic!("unexpected outcome {other:?}"),
                }
            }
            moved
        }));
    }
    let mut moved = 0;
    for task in tasks {
        moved += task.await.expect("the task ran");
    }
    assert!(moved >= 1);
    let (source, source_version) = stores[0]
        .load_from_history("source")
        .await
        .expect("source loads");
    let (sink, sink_version) = stores[0]
        .load_from_history("sink")
        .await
        .expect("sink loads");
    assert_eq!(source.total + sink.total, 1_000, "nothing created or lost");
    assert_eq!(sink.total, moved, "every recorded unit moved one");
    assert_eq!(source_version as u64, 1 + moved);
    assert_eq!(sink_version as u64, moved);
}

#[tokio::test]
async fn concurrent_units_conserve_what_they_move_on_postgres() {
    concurrent_units_conserve_what_they_move(BackendKind::Postgres).await;
}

#[tokio::test]
async fn concurrent_units_conserve_what_they_move_on_sqlite() {
    concurrent_units_conserve_what_they_move(BackendKind::Sqlite).await;
}

/// Every session of both of the store's pools carries the limits, so that one stalled holder cannot freeze the
/// others: a statement, a lock wait, or a transaction left open by a process that stopped.
#[tokio::test]
async fn every_store_session_carries_its_timeouts() {
    let test_database = TestDatabase::postgres().await;
    let database = Database::connect(
        test_database.url.as_deref(),
        test_database.data_dir.path(),
        whist_adapters::store::PoolSettings {
            max_connections: 2,
            limits: whist_adapters::store::SessionLimits {
                statement_timeout: Duration::from_secs(61),
                lock_timeout: Duration::from_millis(2_500),
                idle_in_transaction_timeout: Duration::from_secs(31),
            },
        },
    )
    .await
    .expect("connects");
    let Backend::Postgres(pool) = database.backend().clone() else {
        unreachable!("a Postgres test database")
    };
    let limits = "SELECT current_setting('statement_timeout') || ' ' || current_setting('lock_timeout') || ' ' \
                  || current_setting('idle_in_transaction_session_timeout')";
    let expected = "61s 2500ms 31s".to_string();
    let on_backend_pool: String = sqlx::query_scalar(limits)
        .fetch_one(&pool)
        .await
        .expect("reads");
    let on_any_pool: String = sqlx::query_scalar(limits)
        .fetch_one(database.any())
        .await
        .expect("reads");
    assert_eq!((on_backend_pool, on_any_pool), (expected.clone(), expected));
}

/// Up to `attempts` tries of `operation`, each failure counted; the first success and the failures before it.
async fn first_success<T, E: std::fmt::Debug, F: std::future::Future<Output = Result<T, E>>>(
    attempts: usize,
    mut operation: impl FnMut() -> F,
) -> (T, usize) {
    let mut failures = Vec::new();
    for _ in 0..attempts {
        match operation().await {
            Ok(value) => return (value, failures.len()),
            Err(error) => failures.push(error),
        }
    }
    panic!("no success in {attempts} attempts: {failures:?}");
}

/// The append flusher, the catch-up reads and the hot reads keep their connections between statements instead of
/// giving them back to the pool: a kept connection the server has closed must be given up after the statement it
/// failed, not kept and failed forever. Every session of the database is ended under a live store; appends,
/// catch-up reads and hot reads each carry on after at most one failure per connection the process had open, and
/// nothing is lost.
#[tokio::test]
async fn connections_kept_between_statements_are_given_up_once_the_server_closes_them() {
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open().await;
    let writer = AggregateStore::<Probe>::new(&database, ());
    let reader = AggregateStore::<Probe>::new(&database, ());
    for by in 1..=3 {
        writer
            .execute("kept", ProbeCommand::Increment { by }, &metadata())
            .await
            .expect("recorded");
    }
    reader.load_caught_up("kept").await.expect("a cold load");
    writer
        .execute("kept", ProbeCommand::Increment { by: 4 }, &metadata())
        .await
        .expect("recorded");
    let (caught_up, _) = reader
        .load_caught_up("kept")
        .await
        .expect("a catch-up read");
    assert_eq!(caught_up.total, 10);
    // A read model's read on every request (the assign's candidates) keeps its connection the same way.
    let hot_read = || async {
        let mut connection = database.hot_read().await?;
        let one: i64 = sqlx::query_scalar("SELECT CAST(1 AS BIGINT)")
            .fetch_one(&mut *connection)
            .await?;
        connection.keep();
        Ok::<i64, sqlx::Error>(one)
    };
    assert_eq!(hot_read().await.expect("a hot read"), 1);

    let url = test_database.url.clone().expect("a Postgres test database");
    let database_name = url.rsplit('/').next().expect("a database name").to_string();
    let admin = sqlx::PgPool::connect(&whist_tests::postgres_server_url())
        .await
        .expect("the server answers");
    let ended: Vec<bool> = sqlx::query_scalar(
        // Waiting (up to 5 s each) until each session has ended: a session still ending could answer one more
        // statement after this, and fail the one after that.
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&database_name)
    .fetch_all(&admin)
    .await
    .expect("sessions ended");
    assert!(!ended.is_empty(), "the store had sessions open");

    // Each connection the process had open fails one statement at most (the pool's idle ones too, since it does not
    // test them before handing them out); a kept one that failed is not kept again.
    let attempts = usize::try_from(whist_tests::TEST_POOL_SIZE).expect("small") * 2 + 2;
    let recorded_as = metadata();
    let ((), append_failures) = first_success(attempts, || {
        writer.execute("kept", ProbeCommand::Increment { by: 5 }, &recorded_as)
    })
    .await;
    writer
        .execute("kept", ProbeCommand::Increment { by: 6 }, &metadata())
        .await
        .expect("the next append goes through at once");
    let ((state, _), read_failures) =
        first_success(attempts, || reader.load_caught_up("kept")).await;
    assert_eq!(
        state.total, 21,
        "appends {append_failures} failed, reads {read_failures}"
    );
    let (again, _) = reader
        .load_caught_up("kept")
        .await
        .expect("the next catch-up read goes through at once");
    assert_eq!(again.total, 21);
    let (one, _) = first_success(attempts, hot_read).await;
    assert_eq!(one, 1);
    assert_eq!(
        hot_read()
            .await
            .expect("the next hot read goes through at once"),
        1
    );
    let fresh = sqlx::PgPool::connect(&url)
        .await
        .expect("the test database answers");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&fresh)
        .await
        .expect("counted");
    assert_eq!(stored, 6, "every recorded increment stored once");
}

/// The tables that grow with every assign keep coarse planner statistics (migration 0018): ANALYZE's sample is 300
/// rows per unit of a table's largest column target, and at the default target (100) autovacuum's analyse of the
/// event log took 0.19 s of CPU in one burst. A column added to one of these tables without the target would bring
/// the 30,000-row sample back.
#[tokio::test]
async fn every_column_of_the_growing_tables_keeps_coarse_statistics() {
    const GROWING: [&str; 6] = [
        "events",
        "event_chain",
        "aggregate_index",
        "aggregate_snapshots",
        "mandelboxes",
        "jobs",
    ];
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open().await;
    let Backend::Postgres(pool) = database.backend() else {
        panic!("a Postgres database");
    };
    // Every column of those tables, and every expression an index of theirs keeps statistics for, with its target
    // (-1: the server's default).
    let targets: Vec<(String, String, i32)> = sqlx::query_as(
        "SELECT c.relname::text, a.attname::text, coalesce(a.attstattarget::int, -1) \
           FROM pg_attribute a \
           JOIN pg_class c ON c.oid = a.attrelid \
           LEFT JOIN pg_index i ON i.indexrelid = c.oid \
          WHERE a.attnum > 0 AND NOT a.attisdropped \
            AND (c.relname = ANY($1) \
                 OR (i.indrelid::regclass::text = ANY($1) AND i.indkey[a.attnum - 1] = 0)) \
          ORDER BY 1, 2",
    )
    .bind(&GROWING[..])
    .fetch_all(pool)
    .await
    .expect("the catalogue answers");
    assert!(
        targets
            .iter()
            .any(|(relation, _, _)| relation == "events_by_correlation"),
        "the correlation index's expression is among them: {targets:?}"
    );
    for table in GROWING {
        assert!(
            targets.iter().any(|(relation, _, _)| relation == table),
            "{table} has columns: {targets:?}"
        );
    }
    let fine: Vec<_> = targets
        .iter()
        .filter(|(_, _, target)| !(0..=10).contains(target))
        .collect();
    assert!(
        fine.is_empty(),
        "columns without a coarse statistics target (add `ALTER COLUMN .. SET STATISTICS 10` in a migration): \
         {fine:?}"
    );

    // What it does: ANALYZE keeps at most 11 histogram bounds for a column of 2,000 distinct values (101 at the
    // default target).
    sqlx::query(
        "INSERT INTO event_chain (position, hash) \
         SELECT n, md5(n::text) FROM generate_series(1, 2000) AS n",
    )
    .execute(pool)
    .await
    .expect("2,000 links");
    sqlx::query("ANALYZE event_chain")
        .execute(pool)
        .await
        .expect("analysed");
    let bounds: Option<i32> = sqlx::query_scalar(
        "SELECT array_length(histogram_bounds, 1) FROM pg_stats \
          WHERE tablename = 'event_chain' AND attname = 'hash'",
    )
    .fetch_one(pool)
    .await
    .expect("the hash column has statistics");
    assert_eq!(bounds, Some(11));
}
