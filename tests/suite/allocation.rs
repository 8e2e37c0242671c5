//! Assigning mandelboxes, their status, and ending them (desktop app, host service and protocol server).

use whist_api::startup::SIMULATED_COMMIT_HASH;
use whist_tests::{assign_body, launch_spec, spawn_app, spawn_app_with, user_token, TestDatabase};

fn new_user() -> String {
    format!("auth0|{}", uuid::Uuid::new_v4().simple())
}

async fn live_on(app: &whist_tests::TestApp, instance_id: &str) -> i64 {
    sqlx::query_scalar("SELECT live_mandelboxes FROM instances WHERE instance_id = $1")
        .bind(instance_id)
        .fetch_one(app.state.database.any())
        .await
        .expect("the host is in the read model")
}

#[tokio::test]
async fn an_assign_goes_to_the_fullest_host_with_room() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let first = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 3)
        .await;
    let second = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 3)
        .await;
    let (status, body) = app
        .assign(
            &user_token(&new_user()),
            assign_body(&["us-east-1"], "hash-a", 1),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        whist_tests::eventually(std::time::Duration::from_secs(10), || async {
            live_on(&app, &first.instance_id).await + live_on(&app, &second.instance_id).await == 1
        })
        .await
    );
    // Whichever host took the first is now the fuller one; the next two go to it too (bin packing).
    let (fuller, emptier) = if live_on(&app, &first.instance_id).await == 1 {
        (first, second)
    } else {
        (second, first)
    };
    for session in 2..4 {
        app.wait_for_live(&fuller.instance_id, session - 1).await;
        let (status, body) = app
            .assign(
                &user_token(&new_user()),
                assign_body(&["us-east-1"], "hash-a", session),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    app.wait_for_live(&fuller.instance_id, 3).await;
    assert_eq!(live_on(&app, &emptier.instance_id).await, 0);
    // The fuller host is full now: the emptier one takes the next.
    let (status, _) = app
        .assign(
            &user_token(&new_user()),
            assign_body(&["us-east-1"], "hash-a", 9),
        )
        .await;
    assert_eq!(status, 200);
    app.wait_for_live(&emptier.instance_id, 1).await;
    app.stop().await;
}

#[tokio::test]
async fn an_assign_answers_with_the_ip_and_a_new_mandelbox_the_owner_can_read() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    app.active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 2)
        .await;
    let user = new_user();
    let (status, body) = app
        .assign(&user_token(&user), assign_body(&["us-east-1"], "hash-a", 7))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["error"], "");
    assert!(body["ip"].as_str().expect("ip").starts_with("127."));
    let mandelbox_id = body["mandelbox_id"].as_str().expect("id").to_string();
    assert!(uuid::Uuid::parse_str(&mandelbox_id).is_ok());

    let owner = app
        .client
        .get(app.url(&format!("/mandelbox/{mandelbox_id}")))
        .bearer_auth(user_token(&user))
        .send()
        .await
        .expect("answers");
    assert_eq!(owner.status(), 200);
    let view: serde_json::Value = owner.json().await.expect("json");
    assert_eq!(view["mandelbox_id"], mandelbox_id);
    assert!(
        ["ALLOCATED", "CONNECTING", "RUNNING"].contains(&view["status"].as_str().expect("status")),
        "{view}"
    );
    assert_eq!(view["region"], "us-east-1");
    assert_eq!(view["ip"], body["ip"]);
    assert!(view["created_at"].as_str().is_some());

    let stranger = app
        .client
        .get(app.url(&format!("/mandelbox/{mandelbox_id}")))
        .bearer_auth(user_token(&new_user()))
        .send()
        .await
        .expect("answers");
    assert_eq!(stranger.status(), 404);
    app.stop().await;
}

#[tokio::test]
async fn every_host_full_answers_no_instance_available() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let host = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 1)
        .await;
    let (status, _) = app
        .assign(
            &user_token(&new_user()),
            assign_body(&["us-east-1"], "hash-a", 1),
        )
        .await;
    assert_eq!(status, 200);
    app.wait_for_live(&host.instance_id, 1).await;
    let (status, body) = app
        .assign(
            &user_token(&new_user()),
            assign_body(&["us-east-1"], "hash-a", 2),
        )
        .await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "NO_INSTANCE_AVAILABLE");
    assert_eq!(body["ip"], "");
    assert_eq!(body["mandelbox_id"], "");
    app.stop().await;
}

#[tokio::test]
async fn an_unknown_commit_hash_answers_commit_hash_mismatch() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    app.active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 2)
        .await;
    let (status, body) = app
        .assign(
            &user_token(&new_user()),
            assign_body(&["us-east-1"], "hash-old", 1),
        )
        .await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "COMMIT_HASH_MISMATCH");
    app.stop().await;
}

#[tokio::test]
async fn regions_that_are_not_enabled_answer_region_not_enabled() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let (status, body) = app
        .assign(
            &user_token(&new_user()),
            assign_body(&["ap-south-9"], "hash-a", 1),
        )
        .await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "REGION_NOT_ENABLED");
    app.stop().await;
}

#[tokio::test]
async fn regions_are_tried_in_the_order_asked() {
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.enabled_regions = vec!["us-east-1".to_string(), "eu-west-1".to_string()];
    let app = spawn_app_with(&database, settings).await;
    let east = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 4)
        .await;
    let west = app
        .active_host(launch_spec("eu-west-1", "ami-b", "hash-a"), 4)
        .await;
    let (status, body) = app
        .assign(
            &user_token(&new_user()),
            assign_body(&["eu-west-1", "us-east-1"], "hash-a", 1),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    app.wait_for_live(&west.instance_id, 1).await;
    app.wait_for_live(&east.instance_id, 0).await;
    app.stop().await;
}

#[tokio::test]
async fn local_dev_matches_the_regions_active_image_in_local() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    app.activate_image(&["us-east-1"], "sim-image-local", SIMULATED_COMMIT_HASH)
        .await;
    app.active_host(
        launch_spec("us-east-1", "sim-image-local", SIMULATED_COMMIT_HASH),
        2,
    )
    .await;
    let (status, body) = app
        .assign(
            &user_token(&new_user()),
            assign_body(&["us-east-1"], "local_dev", 1),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    app.stop().await;
}

#[tokio::test]
async fn a_user_holding_the_limit_gets_user_already_active_until_one_ends() {
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.mandelbox_limit_per_user = 2;
    let app = spawn_app_with(&database, settings).await;
    app.active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 5)
        .await;
    let user = new_user();
    let mut ids = Vec::new();
    for session in 0..2 {
        let (status, body) = app
            .assign(
                &user_token(&user),
                assign_body(&["us-east-1"], "hash-a", session),
            )
            .await;
        assert_eq!(status, 200);
        ids.push(body["mandelbox_id"].as_str().expect("id").to_string());
    }
    let (status, body) = app
        .assign(&user_token(&user), assign_body(&["us-east-1"], "hash-a", 3))
        .await;
    assert_eq!(status, 503);
    assert_eq!(body["error"], "USER_ALREADY_ACTIVE");

    let secret = app
        .state
        .services
        .tokens
        .derive(whist_adapters::tokens::Purpose::Protocol, &ids[0]);
    let ended = app
        .client
        .post(app.url(&format!("/mandelbox/{}/disconnect", ids[0])))
        .bearer_auth(secret)
        .send()
        .await
        .expect("answers");
    assert_eq!(ended.status(), 200);
    let (status, _) = app
        .assign(&user_token(&user), assign_body(&["us-east-1"], "hash-a", 4))
        .await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[tokio::test]
async fn a_disconnect_ends_the_mandelbox_frees_its_slot_and_can_be_repeated() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let host = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 1)
        .await;
    let user = new_user();
    let (_, body) = app
        .assign(&user_token(&user), assign_body(&["us-east-1"], "hash-a", 1))
        .await;
    let mandelbox_id = body["mandelbox_id"].as_str().expect("id").to_string();
    app.wait_for_live(&host.instance_id, 1).await;

    let wrong = app
        .client
        .post(app.url(&format!("/mandelbox/{mandelbox_id}/disconnect")))
        .bearer_auth("not-the-secret")
        .send()
        .await
        .expect("answers");
    assert_eq!(wrong.status(), 401);

    let secret = app
        .state
        .services
        .tokens
        .derive(whist_adapters::tokens::Purpose::Protocol, &mandelbox_id);
    for _ in 0..2 {
        let response = app
            .client
            .post(app.url(&format!("/mandelbox/{mandelbox_id}/disconnect")))
            .bearer_auth(&secret)
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), 200);
    }
    app.wait_for_live(&host.instance_id, 0).await;
    let view = app.mandelbox_view(&user_token(&user), &mandelbox_id).await;
    assert_eq!(view["status"], "DEAD");
    // The freed slot takes the next user.
    let (status, _) = app
        .assign(
            &user_token(&new_user()),
            assign_body(&["us-east-1"], "hash-a", 2),
        )
        .await;
    assert_eq!(status, 200);
    app.stop().await;
}

#[tokio::test]
async fn a_host_reports_mandelbox_statuses_with_its_own_token_only() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let host = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 2)
        .await;
    let other = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-b"), 2)
        .await;
    let user = new_user();
    let (_, body) = app
        .assign(&user_token(&user), assign_body(&["us-east-1"], "hash-a", 1))
        .await;
    let mandelbox_id = body["mandelbox_id"].as_str().expect("id").to_string();
    let report = |token: String, status: &'static str| {
        let request = app
            .client
            .post(app.url(&format!("/host/mandelbox/{mandelbox_id}/status")))
            .bearer_auth(token)
            .json(&serde_json::json!({ "status": status }));
        async move { request.send().await.expect("answers").status().as_u16() }
    };
    assert_eq!(report(other.auth_token.clone(), "RUNNING").await, 401);
    assert_eq!(report(host.auth_token.clone(), "CONNECTING").await, 200);
    assert_eq!(report(host.auth_token.clone(), "RUNNING").await, 200);
    assert_eq!(
        report(host.auth_token.clone(), "CONNECTING").await,
        200,
        "a late report is harmless"
    );
    let view = app.mandelbox_view(&user_token(&user), &mandelbox_id).await;
    assert_eq!(view["status"], "RUNNING");
    app.stop().await;
}

#[tokio::test]
async fn regions_lists_the_enabled_regions_that_have_an_active_image() {
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.enabled_regions = vec!["us-east-1".to_string(), "eu-west-1".to_string()];
    let app = spawn_app_with(&database, settings).await;
    app.activate_image(&["us-east-1", "ap-south-9"], "ami-1", "abc")
        .await;
    let regions: Vec<String> = app
        .client
        .get(app.url("/regions"))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    assert_eq!(regions, vec!["us-east-1".to_string()]);
    app.stop().await;
}

#[tokio::test]
async fn too_many_assigns_from_one_user_answer_429() {
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.assign_rate_limit_per_minute = 3;
    let app = spawn_app_with(&database, settings).await;
    let token = user_token(&new_user());
    let mut statuses = Vec::new();
    for session in 0..4 {
        statuses.push(
            app.assign(&token, assign_body(&["ap-south-9"], "h", session))
                .await
                .0,
        );
    }
    assert_eq!(statuses, vec![503, 503, 503, 429]);
    let (status, _) = app
        .assign(
            &user_token(&new_user()),
            assign_body(&["ap-south-9"], "h", 9),
        )
        .await;
    assert_eq!(status, 503, "another user is not limited");
    app.stop().await;
}

#[tokio::test]
async fn a_malformed_assign_body_answers_400_and_no_token_answers_401() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let malformed = app
        .client
        .post(app.url("/mandelbox/assign"))
        .bearer_auth(user_token(&new_user()))
        .header("content-type", "application/json")
        .body("{\"regions\": 5}")
        .send()
        .await
        .expect("answers");
    assert_eq!(malformed.status(), 400);
    let anonymous = app
        .client
        .post(app.url("/mandelbox/assign"))
        .json(&assign_body(&["us-east-1"], "h", 1))
        .send()
        .await
        .expect("answers");
    assert_eq!(anonymous.status(), 401);
    app.stop().await;
}

/// The value of one sample of the Prometheus text, 0 when it is not there yet (a counter not yet counted).
fn sample(metrics: &str, name_and_labels: &str) -> f64 {
    whist_tests::metric_sample(metrics, name_and_labels).unwrap_or(0.0)
}

/// Every host full while the read model shows each with room (as when it lags under load): the assign passes each
/// over on this process's copy and reads them all fresh in one statement before it answers, instead of one read per
/// host.
#[tokio::test]
async fn a_refusal_reads_the_hosts_it_passed_over_together_in_one_statement() {
    const HOSTS: usize = 6;
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    let mut hosts = Vec::new();
    for _ in 0..HOSTS {
        hosts.push(
            app.active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 1)
                .await,
        );
    }
    for session in 0..HOSTS {
        let (status, body) = app
            .assign(
                &user_token(&new_user()),
                assign_body(&["us-east-1"], "hash-a", session as i64),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    for host in &hosts {
        app.wait_for_live(&host.instance_id, 1).await;
    }
    // The read model behind: every host shown empty.
    sqlx::query("UPDATE instances SET live_mandelboxes = 0")
        .execute(app.state.database.any())
        .await
        .expect("the read model is written");
    let reads = "whist_catch_up_reads_total{aggregate=\"instance\"}";
    let before = sample(&app.metrics().await, reads);
    let (status, body) = app
        .assign(
            &user_token(&new_user()),
            assign_body(&["us-east-1"], "hash-a", 99),
        )
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "NO_INSTANCE_AVAILABLE");
    let metrics = app.metrics().await;
    assert_eq!(
        sample(&metrics, reads) - before,
        1.0,
        "one read brought all {HOSTS} hosts up to date"
    );
    assert!(
        sample(
            &metrics,
            "whist_assign_phase_seconds_count{phase=\"recheck\"}"
        ) >= 1.0
    );
    app.stop().await;
}

/// A host this process's copy shows full, freed by another process it has not followed yet: passed over on the
/// copy, then read fresh before the answer, and it takes the mandelbox.
#[tokio::test]
async fn a_host_passed_over_on_a_copy_behind_the_log_is_read_fresh_and_takes_the_assign() {
    let database = TestDatabase::postgres().await;
    let here = spawn_app(&database).await;
    let there = whist_tests::spawn_second_app(&database, &here).await;
    let host = here
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 1)
        .await;
    let (status, body) = here
        .assign(
            &user_token(&new_user()),
            assign_body(&["us-east-1"], "hash-a", 1),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mandelbox_id = body["mandelbox_id"].as_str().expect("id").to_string();
    here.wait_for_live(&host.instance_id, 1).await;
    // From now on this process's copies stay as they are: the other process's writes are not followed.
    here.state.database.following().stop();
    assert_eq!(there.disconnect(&mandelbox_id).await, 200);
    here.wait_for_live(&host.instance_id, 0).await;
    let (status, body) = here
        .assign(
            &user_token(&new_user()),
            assign_body(&["us-east-1"], "hash-a", 2),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        sample(
            &here.metrics().await,
            "whist_assign_phase_seconds_count{phase=\"recheck\"}"
        ) >= 1.0,
        "the host was passed over on its copy, then read fresh"
    );
    there.stop().await;
    here.stop().await;
}

/// An app on its own database that decides one assign at a time (`WHIST_ASSIGN_CONCURRENCY=1`), with `settings`
/// applied, and the lock in this process of its one host, held by the caller: the first assign waits for it, holding
/// the one place. The database lives as long as the caller keeps it.
async fn app_with_one_place_stalled(
    settings: impl FnOnce(&mut whist_adapters::config::Settings),
) -> (
    TestDatabase,
    whist_tests::TestApp,
    tokio::sync::OwnedMutexGuard<()>,
) {
    let database = TestDatabase::sqlite();
    let mut configured = database.settings();
    configured.assign_concurrency = 1;
    settings(&mut configured);
    let app = spawn_app_with(&database, configured).await;
    let host = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 4)
        .await;
    let lock = app
        .state
        .services
        .host_locks
        .of(&host.instance_id)
        .lock_owned()
        .await;
    (database, app, lock)
}

/// Waits until the one place is taken.
async fn the_one_place_is_taken(app: &whist_tests::TestApp) {
    assert!(
        whist_tests::eventually(std::time::Duration::from_secs(10), || async {
            app.state.services.assign_admission.free() == 0
        })
        .await,
        "the first assign is in flight"
    );
}

/// More assigns at once than `WHIST_ASSIGN_CONCURRENCY`, with no grace (`WHIST_ASSIGN_QUEUE_MS=0`): the one beyond
/// answers 429 with `Retry-After` at once, without spending its user's rate budget, and the one in flight is
/// answered as usual.
#[tokio::test]
async fn an_assign_beyond_the_concurrency_bound_answers_429_at_once() {
    let (_database, app, lock) = app_with_one_place_stalled(|settings| {
        settings.assign_queue = std::time::Duration::ZERO;
        settings.assign_rate_limit_per_minute = 1;
    })
    .await;
    let (first_token, second_token) = (user_token(&new_user()), user_token(&new_user()));
    let first = app.assign(&first_token, assign_body(&["us-east-1"], "hash-a", 1));
    let second = async {
        the_one_place_is_taken(&app).await;
        let response = app
            .client
            .post(app.url("/mandelbox/assign"))
            .bearer_auth(&second_token)
            .json(&assign_body(&["us-east-1"], "hash-a", 2))
            .send()
            .await
            .expect("answers");
        drop(lock);
        response
    };
    let ((first_status, first_body), second) = tokio::join!(first, second);
    assert_eq!(second.status(), 429);
    assert_eq!(
        second
            .headers()
            .get("retry-after")
            .and_then(|value| value.to_str().ok()),
        Some("1")
    );
    let body: serde_json::Value = second.json().await.expect("json");
    assert_eq!(body["error"], "RATE_LIMITED");
    assert_eq!(first_status, 200, "{first_body}");
    // The refused one spent nothing of its user's one assign a minute.
    let (status, body) = app
        .assign(&second_token, assign_body(&["us-east-1"], "hash-a", 3))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        sample(
            &app.metrics().await,
            "whist_assigns_total{outcome=\"overloaded\"}"
        ),
        1.0
    );
    app.stop().await;
}

/// An assign that finds `WHIST_ASSIGN_CONCURRENCY` assigns in flight for less than `WHIST_ASSIGN_QUEUE_MS` (a stall,
/// here a host lock the test holds) waits for a place instead of answering 429, and is answered when one frees.
#[tokio::test]
async fn an_assign_that_finds_the_bound_full_in_a_stall_waits_and_is_answered() {
    let (_database, app, lock) = app_with_one_place_stalled(|settings| {
        settings.assign_queue = std::time::Duration::from_secs(30);
    })
    .await;
    let (first_token, second_token) = (user_token(&new_user()), user_token(&new_user()));
    let first = app.assign(&first_token, assign_body(&["us-east-1"], "hash-a", 1));
    let second = async {
        the_one_place_is_taken(&app).await;
        let second = app.assign(&second_token, assign_body(&["us-east-1"], "hash-a", 2));
        let release = async {
            assert!(
                whist_tests::eventually(std::time::Duration::from_secs(10), || async {
                    app.state.services.assign_admission.waiting() == 1
                })
                .await,
                "the second assign waits for a place"
            );
            drop(lock);
        };
        tokio::join!(second, release).0
    };
    let ((first_status, first_body), (second_status, second_body)) = tokio::join!(first, second);
    assert_eq!(first_status, 200, "{first_body}");
    assert_eq!(second_status, 200, "{second_body}");
    let metrics = app.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "whist_assign_admission_waits_total{outcome=\"admitted\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&metrics, "whist_assigns_total{outcome=\"overloaded\"}"),
        0.0
    );
    assert_eq!(app.state.services.assign_admission.waiting(), 0);
    app.stop().await;
}

/// The events of one user's session, by type, in order.
async fn session_events(app: &whist_tests::TestApp, user_id: &str, session_id: i64) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT event_type FROM events WHERE aggregate_type = 'session' AND aggregate_id = $1 ORDER BY sequence",
    )
    .bind(whist_domain::session::session_aggregate_id(user_id, session_id))
    .fetch_all(app.state.database.any())
    .await
    .expect("the log answers")
}

/// A refused assign is recorded on its session, which the desktop app names anew for each assign: presumed new,
/// without reading it.
#[tokio::test]
async fn a_refusal_is_recorded_on_its_new_session_without_reading_it() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let user = new_user();
    let token = user_token(&user);
    let loads = "whist_aggregate_loads_total{aggregate=\"session\",from=\"history\"}";
    let before = sample(&app.metrics().await, loads);
    let (status, body) = app
        .assign(&token, assign_body(&["us-east-1"], "hash-nowhere", 7))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "COMMIT_HASH_MISMATCH");
    assert_eq!(
        session_events(&app, &user, 7).await,
        vec!["SessionRequested", "SessionRefused"]
    );
    assert_eq!(sample(&app.metrics().await, loads) - before, 0.0);
    app.stop().await;
}

/// A session id sent again, to another process, after it was refused: that process presumes the session new, loses
/// to the recorded one, reads it, and records nothing more on it.
#[tokio::test]
async fn a_refused_session_sent_again_to_another_process_is_read_and_left_as_it_is() {
    let database = TestDatabase::postgres().await;
    let here = spawn_app(&database).await;
    let there = whist_tests::spawn_second_app(&database, &here).await;
    let user = new_user();
    let token = user_token(&user);
    for app in [&here, &there] {
        let (status, body) = app
            .assign(&token, assign_body(&["us-east-1"], "hash-nowhere", 7))
            .await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"], "COMMIT_HASH_MISMATCH");
    }
    assert_eq!(
        session_events(&here, &user, 7).await,
        vec!["SessionRequested", "SessionRefused"]
    );
    there.stop().await;
    here.stop().await;
}
