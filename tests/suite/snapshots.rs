//! Snapshots: a cold load from a snapshot and the events after it reads exactly as the whole history does, for every
//! aggregate type and every point a snapshot could be taken at, old event versions included; and a history longer
//! than the snapshot interval is loaded from its snapshot.

use cqrs_es::Aggregate;
use serde::Serialize;
use whist_adapters::store::snapshots::{SNAPSHOT_EVERY, STATE_VERSION};
use whist_adapters::store::{AggregateStore, Database, LoggedEvent};
use whist_domain::probe::{Probe, ProbeCommand};
use whist_domain::{Actor, EventMetadata};
use whist_tests::{assign_body, launch_spec, spawn_app, user_token, TestDatabase};

const HASH: &str = "hash-snapshots";

fn metadata() -> EventMetadata {
    EventMetadata::new(Actor::System, chrono::Utc::now())
}

/// Every event of one aggregate, in sequence order.
async fn history(database: &Database, aggregate_type: &str, id: &str) -> Vec<LoggedEvent> {
    let log = database.log();
    let mut events = Vec::new();
    let mut sequence = 1;
    while let Some(event) = log
        .event_at(aggregate_type, id, sequence)
        .await
        .expect("reads")
    {
        events.push(event);
        sequence += 1;
    }
    events
}

/// The state after `events`, each read as the current shape (upcast) and applied.
fn replay<A: Aggregate>(events: &[LoggedEvent]) -> A {
    let mut state = A::default();
    for event in events {
        state.apply(event.payload_as::<A::Event>().expect("an event reads"));
    }
    state
}

fn as_json(state: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(state).expect("a state serialises")
}

/// For every aggregate of type `A` in the log and every sequence a snapshot could be taken at: a snapshot stored
/// there, then a cold load, gives the state and version the whole history gives. The number of loads checked.
async fn snapshot_and_tail_equal_the_whole_history<A>(database: &Database) -> usize
where
    A: Aggregate<Services = ()> + whist_domain::decide::Lifecycle + Clone + 'static,
{
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT aggregate_id FROM events WHERE aggregate_type = $1")
            .bind(A::TYPE)
            .fetch_all(database.any())
            .await
            .expect("reads");
    assert!(!ids.is_empty(), "the log holds {} aggregates", A::TYPE);
    let mut checked = 0;
    for id in ids {
        let events = history(database, A::TYPE, &id).await;
        let whole: A = replay(&events);
        for taken_at in 1..=events.len() {
            let snapshot: A = replay(&events[..taken_at]);
            sqlx::query(
                "INSERT INTO aggregate_snapshots (aggregate_type, aggregate_id, sequence, state_version, state) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
                 SET sequence = excluded.sequence, state = excluded.state",
            )
            .bind(A::TYPE)
            .bind(&id)
            .bind(i64::try_from(taken_at).expect("a sequence"))
            .bind(STATE_VERSION)
            .bind(serde_json::to_string(&snapshot).expect("a state serialises"))
            .execute(database.any())
            .await
            .expect("a snapshot is stored");
            // A store of its own remembers nothing: the load is cold.
            let (loaded, version) = AggregateStore::<A>::new(database, ())
                .load_from_history(&id)
                .await
                .expect("loads");
            assert_eq!(
                (as_json(&loaded), version),
                (as_json(&whole), events.len()),
                "{} {id} from a snapshot at {taken_at}",
                A::TYPE
            );
            checked += 1;
        }
    }
    checked
}

/// A log with every aggregate type: hosts, assigns with an `Idempotency-Key`, disconnects, subscriptions, an
/// image release, maintenance, the fleet's leadership, probes, and a launch written as an older binary wrote it
/// (`InstanceLaunchRequested` 1.0, read through its upcaster).
#[tokio::test]
async fn a_snapshot_and_the_events_after_it_read_as_the_whole_history_for_every_aggregate_type() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    let store = &app.state.database;
    app.activate_image(&["us-east-1"], "ami-snapshots", HASH)
        .await;
    app.active_host(launch_spec("us-east-1", "ami-snapshots", HASH), 4)
        .await;
    let mut assigned = Vec::new();
    for session in 1..=3 {
        let user = format!("snapshot-user-{session}");
        let response = app
            .client
            .post(app.url("/mandelbox/assign"))
            .bearer_auth(user_token(&user))
            .header("Idempotency-Key", format!("key-{session}"))
            .json(&assign_body(&["us-east-1"], HASH, session));
        app.subscribe(&user).await;
        let response = response.send().await.expect("answers");
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.expect("json");
        assigned.push(body["mandelbox_id"].as_str().expect("an id").to_string());
    }
    assert_eq!(app.disconnect(&assigned[0]).await, 200);
    for enabled in [true, false] {
        let answer = app
            .client
            .put(app.url("/admin/maintenance"))
            .bearer_auth(whist_tests::admin_token("snapshot-admin"))
            .json(&serde_json::json!({ "enabled": enabled }))
            .send()
            .await
            .expect("answers");
        assert!(answer.status().is_success(), "{}", answer.status());
    }
    let probes = AggregateStore::<Probe>::new(store, ());
    for by in 1..=5 {
        probes
            .execute(
                "snapshot-probe",
                ProbeCommand::Increment { by },
                &metadata(),
            )
            .await
            .expect("recorded");
    }
    let old_launch = serde_json::json!({"LaunchRequested": {
        "spec": {"region": "us-east-1", "image_id": "ami-old", "instance_type": "g4dn.2xlarge",
                 "client_commit_hash": HASH},
        "bootstrap_token_hash": "0000",
        "at": chrono::Utc::now().to_rfc3339()
    }});
    sqlx::query(
        "SELECT whist_append_units(ARRAY[0]::bigint[], ARRAY['instance'], ARRAY['launched-by-an-older-server'], \
         ARRAY[1]::bigint[], ARRAY['InstanceLaunchRequested'], ARRAY['1.0'], ARRAY[$1], ARRAY[$2])",
    )
    .bind(old_launch.to_string())
    .bind(serde_json::to_string(&metadata().to_map()).expect("json"))
    .execute(store.any())
    .await
    .expect("an old event is stored");
    app.settled().await;

    use whist_domain::{
        assign_key::AssignKey,
        images::ImageCatalog,
        instance::Instance,
        leadership::Leadership,
        mandelbox::Mandelbox,
        service::Service,
        session::Session,
        subscription::{StripeCustomer, Subscription},
        user::User,
    };
    let mut checked = Vec::new();
    checked.push(snapshot_and_tail_equal_the_whole_history::<AssignKey>(store).await);
    checked.push(snapshot_and_tail_equal_the_whole_history::<ImageCatalog>(store).await);
    checked.push(snapshot_and_tail_equal_the_whole_history::<Instance>(store).await);
    checked.push(snapshot_and_tail_equal_the_whole_history::<Leadership>(store).await);
    checked.push(snapshot_and_tail_equal_the_whole_history::<Mandelbox>(store).await);
    checked.push(snapshot_and_tail_equal_the_whole_history::<Probe>(store).await);
    checked.push(snapshot_and_tail_equal_the_whole_history::<Service>(store).await);
    checked.push(snapshot_and_tail_equal_the_whole_history::<Session>(store).await);
    checked.push(snapshot_and_tail_equal_the_whole_history::<Subscription>(store).await);
    checked.push(snapshot_and_tail_equal_the_whole_history::<StripeCustomer>(store).await);
    checked.push(snapshot_and_tail_equal_the_whole_history::<User>(store).await);
    assert!(
        checked.iter().all(|loads| *loads > 0),
        "every aggregate type was checked: {checked:?}"
    );
    app.stop().await;
}

/// A history longer than the interval gets snapshots as it is written; a cold load then reads from the latest one
/// on, and never the events before it (here they are gone, and the load is still whole).
#[tokio::test]
async fn a_long_history_is_loaded_from_its_latest_snapshot() {
    let database = TestDatabase::postgres().await;
    let store = database.open().await;
    let probes = AggregateStore::<Probe>::new(&store, ());
    let events = 2 * SNAPSHOT_EVERY + 7;
    for _ in 0..events {
        probes
            .execute("long", ProbeCommand::Increment { by: 1 }, &metadata())
            .await
            .expect("recorded");
    }
    let latest = i64::try_from(2 * SNAPSHOT_EVERY).expect("a sequence");
    assert!(
        whist_tests::eventually(std::time::Duration::from_secs(10), || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT sequence FROM aggregate_snapshots WHERE aggregate_type = 'probe' AND aggregate_id = 'long'",
            )
            .fetch_optional(store.any())
            .await
            .ok()
            .flatten()
                == Some(latest)
        })
        .await,
        "a snapshot at {latest} is written"
    );
    sqlx::query("DELETE FROM events WHERE aggregate_id = 'long' AND sequence < $1")
        .bind(latest)
        .execute(store.any())
        .await
        .expect("the history before the snapshot is gone");
    let (probe, version) = AggregateStore::<Probe>::new(&store, ())
        .load_from_history("long")
        .await
        .expect("loads from the snapshot");
    assert_eq!((version, probe.total), (events, events as u64));
}
