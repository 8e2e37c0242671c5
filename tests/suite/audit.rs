//! Audit and inspection: the global log, one aggregate's history and its state at a version or a moment, projections
//! status, rebuild and verify, the JSON Lines export, the hash chain and its tamper evidence, and reading a history
//! that mixes event versions.

use std::time::Duration;

use crate::whist;
use serde_json::Value;
use whist_domain::{Actor, EventMetadata};
use whist_tests::{
    admin_token, assign_body, http_client, launch_spec, spawn_app, user_token, TestApp,
    TestDatabase,
};

const HASH: &str = "hash-audit";

async fn get(app: &TestApp, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut request = http_client().get(app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A small workload: a host, assigns and disconnects, a webhook-made subscriber; returns the host's instance id.
async fn workload(app: &TestApp) -> String {
    app.activate_image(&["us-east-1"], "ami-audit", HASH).await;
    let host = app
        .active_host(launch_spec("us-east-1", "ami-audit", HASH), 4)
        .await;
    for user in ["audit-a", "audit-b", "audit-c"] {
        let (status, body) = app
            .assign(&user_token(user), assign_body(&["us-east-1"], HASH, 1))
            .await;
        assert_eq!(status, 200, "{body}");
        if user != "audit-c" {
            let mandelbox_id = body["mandelbox_id"].as_str().expect("an id");
            assert_eq!(app.disconnect(mandelbox_id).await, 200);
        }
    }
    host.instance_id
}

#[tokio::test]
async fn audit_endpoints_want_an_admin_token() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    let user = user_token("curious-user");
    for path in [
        "/admin/events",
        "/admin/aggregates/instance/some-id/events",
        "/admin/aggregates/instance/some-id",
        "/admin/projections",
    ] {
        assert_eq!(get(&app, path, None).await.0, 401, "{path}");
        assert_eq!(get(&app, path, Some(&user)).await.0, 403, "{path}");
    }
    let client = http_client();
    let rebuild = app.url("/admin/projections/instances/rebuild");
    let anonymous = client.post(&rebuild).send().await.expect("answers");
    assert_eq!(anonymous.status(), 401);
    let forbidden = client
        .post(&rebuild)
        .bearer_auth(&user)
        .send()
        .await
        .expect("answers");
    assert_eq!(forbidden.status(), 403);
    app.stop().await;
}

#[tokio::test]
async fn the_log_an_aggregates_history_and_its_state_at_a_version_or_a_moment() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    let instance_id = workload(&app).await;
    app.settled().await;
    let admin = admin_token("auditor");

    let (status, events) = get(&app, "/admin/events?after=0&limit=1000", Some(&admin)).await;
    assert_eq!(status, 200);
    let events = events.as_array().expect("a list").clone();
    assert!(events.len() > 10, "{}", events.len());
    for (index, event) in events.iter().enumerate() {
        assert_eq!(
            event["position"],
            Value::from(index as i64 + 1),
            "commit order"
        );
        for field in ["recorded_at", "actor", "correlation_id"] {
            assert!(event["metadata"][field].is_string(), "{event}");
        }
        assert!(event["metadata"].get("causation_id").is_some(), "{event}");
        assert!(event["payload"].is_object() && event["event_version"].is_string());
    }
    let (_, page) = get(&app, "/admin/events?after=5&limit=3", Some(&admin)).await;
    let positions: Vec<i64> = page
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|event| event["position"].as_i64())
        .collect();
    assert_eq!(positions, vec![6, 7, 8]);
    assert_eq!(
        get(&app, "/admin/events?limit=0", Some(&admin)).await.0,
        400
    );

    let (status, history) = get(
        &app,
        &format!("/admin/aggregates/instance/{instance_id}/events"),
        Some(&admin),
    )
    .await;
    assert_eq!(status, 200);
    let history = history.as_array().expect("a list").clone();
    let types: Vec<&str> = history
        .iter()
        .filter_map(|event| event["event_type"].as_str())
        .collect();
    assert_eq!(
        types[..2],
        ["InstanceLaunchRequested", "InstanceRegistered"]
    );
    assert_eq!(history[0]["event_version"], "2.0");
    assert_eq!(
        history[0]["payload"]["LaunchRequested"]["reason"],
        "operator"
    );
    for (index, event) in history.iter().enumerate() {
        assert_eq!(event["sequence"], Value::from(index as i64 + 1));
    }

    let state = |query: String| {
        let app = &app;
        let admin = admin.clone();
        let instance_id = instance_id.clone();
        async move {
            get(
                app,
                &format!("/admin/aggregates/instance/{instance_id}{query}"),
                Some(&admin),
            )
            .await
        }
    };
    let (status, first) = state("?at_version=1".to_string()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["version"], 1);
    assert_eq!(first["state"]["status"], "PRE_CONNECTION");
    let (_, latest) = state(String::new()).await;
    assert_eq!(latest["version"], Value::from(history.len() as i64));
    assert_eq!(latest["state"]["status"], "ACTIVE");
    assert_eq!(
        latest["state"]["mandelboxes"].as_array().map(Vec::len),
        Some(1),
        "one mandelbox still live: {latest}"
    );
    // As of the moment the registration was recorded: two events.
    let registered_at = history[1]["metadata"]["recorded_at"]
        .as_str()
        .expect("a time")
        .to_string();
    let (status, then) = state(format!("?as_of={}", registered_at.replace('+', "%2B"))).await;
    assert_eq!(status, 200, "{then}");
    assert_eq!(then["version"], 2);
    assert_eq!(then["state"]["status"], "ACTIVE");
    assert_eq!(
        state("?as_of=2000-01-01T00:00:00Z".to_string()).await.0,
        404
    );
    // Both bounds together: the events that meet both (here none, so nothing to replay).
    assert_eq!(
        state("?at_version=1&as_of=2000-01-01T00:00:00Z".to_string())
            .await
            .0,
        404
    );
    let (status, both) = state(format!(
        "?at_version=1&as_of={}",
        registered_at.replace('+', "%2B")
    ))
    .await;
    assert_eq!(
        (status, &both["version"]),
        (200, &serde_json::json!(1)),
        "{both}"
    );
    assert_eq!(state("?as_of=yesterday".to_string()).await.0, 400);
    assert_eq!(
        get(&app, "/admin/aggregates/spaceship/x", Some(&admin))
            .await
            .0,
        404
    );
    assert_eq!(
        get(&app, "/admin/aggregates/spaceship/x/events", Some(&admin))
            .await
            .0,
        404
    );
    app.stop().await;
}

#[tokio::test]
async fn projections_status_rebuild_and_verify_after_a_mixed_workload() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    workload(&app).await;
    // Scale-ups: two more hosts decided and registered.
    for _ in 0..2 {
        app.active_host(launch_spec("us-east-1", "ami-audit", HASH), 2)
            .await;
    }
    app.settled().await;
    let admin = admin_token("developer");
    let (status, projections) = get(&app, "/admin/projections", Some(&admin)).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = projections
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|projection| projection["name"].as_str())
        .collect();
    for name in [
        "aggregate_index",
        "instances",
        "mandelboxes",
        "images",
        "jobs",
        "event_chain",
    ] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    for projection in projections.as_array().expect("a list") {
        for field in ["position", "head", "lag"] {
            assert!(projection[field].is_i64(), "{projection}");
        }
        assert_eq!(projection["status"], "running", "{projection}");
    }

    for name in ["aggregate_index", "instances", "mandelboxes", "images"] {
        let report = app
            .state
            .projections
            .verify(name, &|_| {})
            .await
            .expect("verifies");
        assert_eq!(report.differences(), 0, "{name}: {report:?}");
        assert!(
            report.tables.iter().all(|table| table.rows > 0),
            "{name}: {report:?}"
        );
    }
    // The command-line twin, as a separate process beside the running server.
    let (ok, log) = whist(
        &database,
        &["projections", "verify", "instances"],
        "verify.log",
    )
    .await;
    assert!(ok && log.contains("diff: 0"), "{log}");

    // A read model edited behind the projection's back is caught.
    sqlx::query("UPDATE instances SET live_mandelboxes = live_mandelboxes + 1")
        .execute(app.state.database.any())
        .await
        .expect("edits");
    let report = app
        .state
        .projections
        .verify("instances", &|_| {})
        .await
        .expect("verifies");
    assert_eq!(report.tables[0].only_live, 3, "{report:?}");
    assert_eq!(report.tables[0].only_rebuilt, 3, "{report:?}");
    // Found a difference: exit 3, not a failure.
    let (code, log) = crate::cli::whist_exit_code(
        &database,
        &["projections", "verify", "instances"],
        "verify-2.log",
    )
    .await;
    assert!(code == Some(3) && log.contains("diff: 6"), "{log}");

    // Rebuilding puts it right, and is refused for projections that plan side effects or seal the log.
    let client = http_client();
    let rebuilt = client
        .post(app.url("/admin/projections/instances/rebuild"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("answers");
    assert_eq!(rebuilt.status(), 200);
    let report = app
        .state
        .projections
        .verify("instances", &|_| {})
        .await
        .expect("verifies");
    assert_eq!(report.differences(), 0, "{report:?}");
    for (name, expected) in [("jobs", 409), ("event_chain", 409), ("nonsense", 404)] {
        let response = client
            .post(app.url(&format!("/admin/projections/{name}/rebuild")))
            .bearer_auth(&admin)
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), expected, "{name}");
    }
    app.stop().await;
}

#[tokio::test]
async fn export_is_resumable_and_verify_names_the_first_tampered_event() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    workload(&app).await;
    app.settled().await;
    let head = app.state.database.log().head().await.expect("a head");

    let (ok, log) = whist(&database, &["events", "verify"], "verify-clean.log").await;
    assert!(ok, "{log}");
    assert!(
        log.contains(&format!("verified {head} events")),
        "every event is sealed and verified: {log}"
    );

    let folder = database.data_dir.path();
    let all = folder.join("all.jsonl");
    let (ok, log) = whist(
        &database,
        &[
            "events",
            "export",
            "--output",
            all.to_str().expect("a path"),
        ],
        "export.log",
    )
    .await;
    assert!(ok, "{log}");
    let lines: Vec<Value> = std::fs::read_to_string(&all)
        .expect("the export")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len() as i64, head);
    for (index, line) in lines.iter().enumerate() {
        assert_eq!(line["position"], Value::from(index as i64 + 1));
        assert!(
            line["hash"].as_str().is_some_and(|hash| hash.len() == 64),
            "{line}"
        );
        assert!(line["metadata"]["actor"].is_string() && line["payload"].is_object());
    }
    // Resuming after a position gives exactly the rest.
    let rest = folder.join("rest.jsonl");
    let (ok, log) = whist(
        &database,
        &[
            "events",
            "export",
            "--after",
            "10",
            "--output",
            rest.to_str().expect("a path"),
        ],
        "export-rest.log",
    )
    .await;
    assert!(ok, "{log}");
    let rest: Vec<Value> = std::fs::read_to_string(&rest)
        .expect("the export")
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(rest[..], lines[10..]);

    // Someone edits one stored payload directly in SQL.
    let tampered = 7i64;
    sqlx::query(
        "UPDATE events SET payload = CAST(jsonb_set(CAST(payload AS jsonb), '{tampered}', 'true') AS json) \
         WHERE position = $1",
    )
    .bind(tampered)
    .execute(app.state.database.any())
    .await
    .expect("tampers");
    // Found a difference: exit 3, not a failure.
    let (code, log) =
        crate::cli::whist_exit_code(&database, &["events", "verify"], "verify-tampered.log").await;
    assert_eq!(code, Some(3), "{log}");
    assert!(
        log.contains(&format!(
            "the chain is broken at the event at position {tampered} ("
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("verified {} events", tampered - 1)),
        "{log}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_history_mixing_event_versions_replays_through_the_upcaster() {
    let database = TestDatabase::postgres().await;
    // A launch decided by an older server: InstanceLaunchRequested 1.0, without a reason. It and the current code's
    // next command are recorded before the server starts, so that the server's reconciler, which would carry out
    // the launch itself, finds it already carried out.
    let store = database.open().await;
    let old = "launched-by-an-older-server";
    let metadata =
        serde_json::to_string(&EventMetadata::new(Actor::System, chrono::Utc::now()).to_map())
            .expect("metadata");
    // Stored the way every append stores events (migration 0008), in the shape an older server wrote.
    sqlx::query(
        "SELECT whist_append_units(ARRAY[0]::bigint[], ARRAY['instance'], ARRAY[$1], ARRAY[1]::bigint[], \
         ARRAY['InstanceLaunchRequested'], ARRAY['1.0'], ARRAY[$2], ARRAY[$3])",
    )
    .bind(old)
    .bind(
        serde_json::json!({"LaunchRequested": {
            "spec": {"region": "us-east-1", "image_id": "ami-audit", "instance_type": "g4dn.2xlarge",
                     "client_commit_hash": HASH},
            "bootstrap_token_hash": "0000",
            "at": chrono::Utc::now().to_rfc3339()
        }})
        .to_string(),
    )
    .bind(metadata)
    .execute(store.any())
    .await
    .expect("an old event is stored");
    // The current code goes on with that host (version 1.0 first, then current events), and the server launches
    // another (version 2.0).
    let metadata = EventMetadata::new(Actor::System, chrono::Utc::now());
    whist_adapters::store::AggregateStore::<whist_domain::instance::Instance>::new(&store, ())
        .execute(
            old,
            whist_domain::instance::InstanceCommand::RecordLaunch {
                cloud_instance_id: "i-0123456789".to_string(),
                at: chrono::Utc::now(),
            },
            &metadata,
        )
        .await
        .expect("the old launch loads through the upcaster and takes a command");
    store.close().await;
    let app = spawn_app(&database).await;
    let (current, _) = app
        .launch(launch_spec("us-east-1", "ami-audit", HASH))
        .await;
    app.settled().await;

    let (instance, version) = app
        .state
        .services
        .instances
        .load_from_history(old)
        .await
        .expect("loads");
    let (_, events) = get(
        &app,
        &format!("/admin/aggregates/instance/{old}/events"),
        Some(&admin_token("auditor")),
    )
    .await;
    assert_eq!(version, 2, "{events}");
    assert_eq!(instance.cloud_instance_id.as_deref(), Some("i-0123456789"));
    // The read model (a projection reading the log) has both hosts.
    let hosts: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT instance_id, cloud_instance_id FROM instances ORDER BY instance_id")
            .fetch_all(app.state.database.any())
            .await
            .expect("reads");
    assert!(
        hosts.contains(&(old.to_string(), Some("i-0123456789".to_string()))),
        "{hosts:?}"
    );
    assert!(hosts.iter().any(|(id, _)| *id == current), "{hosts:?}");
    // The record shows each event as stored; the replayed state reads the old one as the current shape.
    let admin = admin_token("auditor");
    let (_, history) = get(
        &app,
        &format!("/admin/aggregates/instance/{old}/events"),
        Some(&admin),
    )
    .await;
    assert_eq!(history[0]["event_version"], "1.0");
    assert!(history[0]["payload"]["LaunchRequested"]
        .get("reason")
        .is_none());
    let (_, history) = get(
        &app,
        &format!("/admin/aggregates/instance/{current}/events"),
        Some(&admin),
    )
    .await;
    assert_eq!(history[0]["event_version"], "2.0");
    let (status, replayed) = get(
        &app,
        &format!("/admin/aggregates/instance/{old}"),
        Some(&admin),
    )
    .await;
    assert_eq!(status, 200, "{replayed}");
    assert_eq!(replayed["version"], 2);
    assert_eq!(replayed["state"]["cloud_instance_id"], "i-0123456789");
    // A rebuild from position 0 reads the old version too.
    let report = app
        .state
        .projections
        .verify("instances", &|_| {})
        .await
        .expect("verifies");
    assert_eq!(report.differences(), 0, "{report:?}");
    app.stop().await;
}

#[tokio::test]
async fn the_events_commands_list_history_and_replay() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    let instance_id = workload(&app).await;
    app.settled().await;
    let json_lines = |log: &str| -> Vec<Value> {
        log.lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|value| value.get("event_type").is_some())
            .collect()
    };
    let (ok, log) = whist(
        &database,
        &["events", "list", "--after", "2", "--limit", "5"],
        "list.log",
    )
    .await;
    assert!(ok, "{log}");
    let positions: Vec<i64> = json_lines(&log)
        .iter()
        .filter_map(|event| event["position"].as_i64())
        .collect();
    assert_eq!(positions, vec![3, 4, 5, 6, 7]);
    let (ok, log) = whist(
        &database,
        &["events", "history", "instance", &instance_id],
        "history.log",
    )
    .await;
    assert!(ok, "{log}");
    let history = json_lines(&log);
    assert_eq!(history[0]["event_type"], "InstanceLaunchRequested");
    assert!(history
        .iter()
        .all(|event| event["aggregate_id"] == instance_id.as_str()));
    let (ok, log) = whist(
        &database,
        &[
            "events",
            "state",
            "instance",
            &instance_id,
            "--at-version",
            "1",
        ],
        "state.log",
    )
    .await;
    assert!(ok, "{log}");
    assert!(log.contains("\"status\": \"PRE_CONNECTION\""), "{log}");
    let (ok, log) = whist(
        &database,
        &["events", "history", "spaceship", "x"],
        "unknown.log",
    )
    .await;
    assert!(!ok && log.contains("no aggregate type"), "{log}");
    app.stop().await;
}

#[tokio::test]
async fn the_projections_commands_show_status_and_rebuild() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    workload(&app).await;
    app.settled().await;
    let (ok, log) = whist(&database, &["projections", "status"], "status.log").await;
    assert!(ok, "{log}");
    let start = log.find('[').expect("a JSON list");
    let end = log.rfind(']').expect("a JSON list");
    let statuses: Vec<Value> = serde_json::from_str(&log[start..=end]).expect("JSON");
    let names: Vec<&str> = statuses
        .iter()
        .filter_map(|status| status["name"].as_str())
        .collect();
    assert!(
        names.contains(&"mandelboxes") && names.contains(&"event_chain"),
        "{names:?}"
    );
    assert!(statuses.iter().all(|status| status["lag"].is_i64()));
    let (ok, log) = whist(
        &database,
        &["projections", "rebuild", "mandelboxes"],
        "rebuild.log",
    )
    .await;
    assert!(ok && log.contains("rebuilt mandelboxes"), "{log}");
    let report = app
        .state
        .projections
        .verify("mandelboxes", &|_| {})
        .await
        .expect("verifies");
    assert_eq!(report.differences(), 0, "{report:?}");
    let (ok, log) = whist(
        &database,
        &["projections", "rebuild", "event_chain"],
        "refused.log",
    )
    .await;
    assert!(!ok && log.contains("never rebuilt"), "{log}");
    app.stop().await;
}

/// The events an assign recorded for `mandelbox_id` (its unit: the user's reservation, the host's slot, the
/// mandelbox, the session), with their metadata, from `/admin/events`.
async fn events_of_assign(app: &TestApp, mandelbox_id: &str) -> Vec<Value> {
    let admin = admin_token("auditor");
    let (_, events) = get(app, "/admin/events?after=0&limit=10000", Some(&admin)).await;
    let events = events.as_array().cloned().unwrap_or_default();
    let allocated = events
        .iter()
        .find(|event| {
            event["event_type"] == "MandelboxAllocated" && event["aggregate_id"] == mandelbox_id
        })
        .cloned()
        .expect("the allocation is in the log");
    let correlation = allocated["metadata"]["correlation_id"].clone();
    events
        .into_iter()
        .filter(|event| event["metadata"]["correlation_id"] == correlation)
        .collect()
}

#[tokio::test]
async fn a_request_id_is_answered_and_is_the_correlation_and_cause_of_what_the_request_recorded_on_sqlite(
) {
    request_ids_are_correlations(whist_tests::BackendKind::Sqlite).await;
}

#[tokio::test]
async fn a_request_id_is_answered_and_is_the_correlation_and_cause_of_what_the_request_recorded_on_postgres(
) {
    request_ids_are_correlations(whist_tests::BackendKind::Postgres).await;
}

async fn request_ids_are_correlations(kind: whist_tests::BackendKind) {
    let database = TestDatabase::new(kind).await;
    let app = spawn_app(&database).await;
    app.activate_image(&["us-east-1"], "ami-audit", HASH).await;
    let _host = app
        .active_host(launch_spec("us-east-1", "ami-audit", HASH), 4)
        .await;
    let user = "request-id-user";
    app.subscribe(user).await;
    let assign = |request_id: &'static str, session: i64| {
        let request = app
            .client
            .post(app.url("/mandelbox/assign"))
            .bearer_auth(user_token(user))
            .header("X-Request-Id", request_id)
            .json(&assign_body(&["us-east-1"], HASH, session));
        async move {
            let response = request.send().await.expect("answers");
            let answered = response
                .headers()
                .get("x-request-id")
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let body: Value = response.json().await.expect("a JSON body");
            (
                answered,
                body["mandelbox_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
    };

    // The client's own id, well-formed: answered back, and every event of the assign's unit carries it as both
    // its correlation and its cause.
    let (answered, mandelbox_id) = assign("desktop-7f3a:retry.1_x", 1).await;
    assert_eq!(answered, "desktop-7f3a:retry.1_x");
    let recorded = events_of_assign(&app, &mandelbox_id).await;
    let types: Vec<&str> = recorded
        .iter()
        .filter_map(|event| event["event_type"].as_str())
        .collect();
    for expected in [
        "MandelboxAllocated",
        "InstanceMandelboxAllocated",
        "UserMandelboxReserved",
    ] {
        assert!(types.contains(&expected), "{expected} in {types:?}");
    }
    for event in &recorded {
        assert_eq!(
            event["metadata"]["correlation_id"], "desktop-7f3a:retry.1_x",
            "{event}"
        );
        assert_eq!(
            event["metadata"]["causation_id"], "desktop-7f3a:retry.1_x",
            "{event}"
        );
    }
    // `?correlation_id=` keeps exactly that chain, in log order.
    let admin = admin_token("auditor");
    let (status, chain) = get(
        &app,
        "/admin/events?correlation_id=desktop-7f3a:retry.1_x&limit=1000",
        Some(&admin),
    )
    .await;
    assert_eq!(status, 200);
    let positions = |events: &[Value]| -> Vec<i64> {
        events
            .iter()
            .filter_map(|event| event["position"].as_i64())
            .collect()
    };
    assert_eq!(
        positions(chain.as_array().expect("a list")),
        positions(&recorded)
    );
    let (status, none) = get(
        &app,
        "/admin/events?correlation_id=no-such-chain",
        Some(&admin),
    )
    .await;
    assert_eq!((status, none), (200, Value::Array(vec![])));
    // The spin-up the assign planned is a job; its outcome continues the chain, caused by the allocation.
    let allocation = recorded
        .iter()
        .find(|event| event["event_type"] == "MandelboxAllocated")
        .and_then(|event| event["position"].as_i64())
        .expect("the allocation's position");
    let mut spun_up = None;
    for _ in 0..200 {
        let (_, chain) = get(
            &app,
            "/admin/events?correlation_id=desktop-7f3a:retry.1_x&limit=1000",
            Some(&admin),
        )
        .await;
        spun_up = chain.as_array().and_then(|events| {
            events
                .iter()
                .find(|event| event["event_type"] == "MandelboxSpunUp")
                .cloned()
        });
        if spun_up.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spun_up = spun_up.expect("the spin-up's outcome is in the assign's chain");
    assert_eq!(spun_up["aggregate_id"], mandelbox_id.as_str());
    assert_eq!(
        spun_up["metadata"]["causation_id"],
        allocation.to_string().as_str(),
        "caused by the event that planned the job"
    );

    // An id outside the contract's alphabet (or too long) is replaced by a new one, which the events carry.
    let (answered, mandelbox_id) = assign("no spaces <allowed>", 2).await;
    assert_ne!(answered, "no spaces <allowed>");
    assert!(
        whist_api::http::middleware::is_request_id(&answered),
        "{answered}"
    );
    let recorded = events_of_assign(&app, &mandelbox_id).await;
    assert!(!recorded.is_empty());
    for event in &recorded {
        assert_eq!(
            event["metadata"]["correlation_id"],
            answered.as_str(),
            "{event}"
        );
    }

    // The protocol server's disconnect is a request of its own: its events carry its id.
    let response = app
        .disconnect_request(&mandelbox_id)
        .header("X-Request-Id", "protocol-disconnect-1")
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    let admin = admin_token("auditor");
    let (_, events) = get(&app, "/admin/events?after=0&limit=10000", Some(&admin)).await;
    let ended: Vec<&Value> = events
        .as_array()
        .expect("a list")
        .iter()
        .filter(|event| event["metadata"]["correlation_id"] == "protocol-disconnect-1")
        .collect();
    assert!(
        ended
            .iter()
            .any(|event| event["event_type"] == "MandelboxEnded"
                && event["aggregate_id"] == mandelbox_id.as_str()),
        "{ended:?}"
    );
    app.stop().await;
}
