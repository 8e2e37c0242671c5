//! The host service protocol: registration, heartbeats.

use whist_tests::{launch_spec, spawn_app, TestDatabase};

pub(crate) fn register_body(
    instance_id: &str,
    spec: &whist_domain::instance::LaunchSpec,
) -> serde_json::Value {
    serde_json::json!({
        "instance_id": instance_id,
        "region": spec.region,
        "image_id": spec.image_id,
        "instance_type": spec.instance_type,
        "client_commit_hash": spec.client_commit_hash,
        "ip": "127.9.9.9",
        "mandelbox_capacity": 4,
        // Nothing calls this host: any well-formed fingerprint.
        "tls_cert_sha256": "ab".repeat(32),
    })
}

#[tokio::test]
async fn registration_needs_the_launchs_own_token_and_works_once() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let spec = launch_spec("us-east-1", "ami-a", "hash-a");
    let (instance_id, bootstrap) = app.launch(spec.clone()).await;
    let (other_id, other_bootstrap) = app.launch(spec.clone()).await;
    let register = |token: String, body: serde_json::Value| {
        let request = app
            .client
            .post(app.url("/host/register"))
            .bearer_auth(token)
            .json(&body);
        async move { request.send().await.expect("answers").status().as_u16() }
    };
    assert_eq!(
        register("forged".to_string(), register_body(&instance_id, &spec)).await,
        401
    );
    assert_eq!(
        register(other_bootstrap.clone(), register_body(&instance_id, &spec)).await,
        401,
        "another launch's token"
    );
    let mut mismatched = register_body(&instance_id, &spec);
    mismatched["image_id"] = serde_json::json!("ami-other");
    assert_eq!(register(bootstrap.clone(), mismatched).await, 409);
    // Over HTTPS without a host-service CA, the certificate fingerprint is what later calls pin: required.
    for fingerprint in [serde_json::Value::Null, serde_json::json!("not-a-sha256")] {
        let mut unpinned = register_body(&instance_id, &spec);
        unpinned["tls_cert_sha256"] = fingerprint;
        assert_eq!(register(bootstrap.clone(), unpinned).await, 409);
    }
    assert_eq!(
        register(bootstrap.clone(), register_body(&instance_id, &spec)).await,
        200
    );
    assert_eq!(
        register(bootstrap.clone(), register_body(&instance_id, &spec)).await,
        401,
        "a replayed bootstrap token"
    );
    assert_eq!(
        register(other_bootstrap, register_body(&other_id, &spec)).await,
        200
    );
    app.stop().await;
}

fn heartbeat(instance_id: &str, number: i64, is_dying: bool) -> serde_json::Value {
    serde_json::json!({
        "instance_id": instance_id,
        "timestamp": chrono::Utc::now().to_rfc3339(),
        "heartbeat_number": number,
        "total_ram_kb": 32_000_000,
        "free_ram_kb": 16_000_000,
        "avail_ram_kb": 20_000_000,
        "is_dying": is_dying,
    })
}

#[tokio::test]
async fn heartbeats_need_the_hosts_token_and_are_written_in_batches() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let host = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 2)
        .await;
    let wrong = app
        .client
        .post(app.url("/host/heartbeat"))
        .bearer_auth("wrong")
        .json(&heartbeat(&host.instance_id, 1, false))
        .send()
        .await
        .expect("answers");
    assert_eq!(wrong.status(), 401);
    for number in 1..=3 {
        let response = app
            .client
            .post(app.url("/host/heartbeat"))
            .bearer_auth(&host.auth_token)
            .json(&heartbeat(&host.instance_id, number, false))
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), 200);
    }
    app.state
        .services
        .heartbeats
        .flush()
        .await
        .expect("flushes");
    let number: i64 =
        sqlx::query_scalar("SELECT heartbeat_number FROM host_heartbeats WHERE instance_id = $1")
            .bind(&host.instance_id)
            .fetch_one(app.state.database.any())
            .await
            .expect("the heartbeat is written");
    assert_eq!(number, 3);
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = $1 AND event_type NOT IN \
         ('InstanceLaunchRequested', 'InstanceRegistered')",
    )
    .bind(&host.instance_id)
    .fetch_one(app.state.database.any())
    .await
    .expect("counts");
    assert_eq!(events, 0, "heartbeats are not events");
    app.stop().await;
}

#[tokio::test]
async fn a_heartbeat_after_termination_answers_410() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let host = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 2)
        .await;
    app.state
        .services
        .instances
        .execute(
            &host.instance_id,
            whist_domain::instance::InstanceCommand::Terminate {
                reason: whist_domain::instance::TerminationReason::Operator,
                at: chrono::Utc::now(),
            },
            &whist_domain::EventMetadata::new(whist_domain::Actor::System, chrono::Utc::now()),
        )
        .await
        .expect("terminating");
    app.wait_for_instance(&host.instance_id, "TERMINATING")
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let response = app
        .client
        .post(app.url("/host/heartbeat"))
        .bearer_auth(&host.auth_token)
        .json(&heartbeat(&host.instance_id, 9, false))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 410);
    app.stop().await;
}

#[tokio::test]
async fn a_dying_host_is_drained() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let host = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 2)
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let response = app
        .client
        .post(app.url("/host/heartbeat"))
        .bearer_auth(&host.auth_token)
        .json(&heartbeat(&host.instance_id, 1, true))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    app.wait_for_instance(&host.instance_id, "DRAINING").await;
    app.stop().await;
}

/// Registers a host by hand (no host service behind it: nothing answers at its loopback address).
async fn register_by_hand(app: &whist_tests::TestApp, capacity: u32) -> (String, String) {
    let spec = launch_spec("us-east-1", "ami-a", "hash-a");
    let (instance_id, bootstrap) = app.launch(spec.clone()).await;
    let mut body = register_body(&instance_id, &spec);
    body["mandelbox_capacity"] = serde_json::json!(capacity);
    let response = app
        .client
        .post(app.url("/host/register"))
        .bearer_auth(bootstrap)
        .json(&body)
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.expect("json");
    app.wait_for_instance(&instance_id, "ACTIVE").await;
    (
        instance_id,
        answer["auth_token"].as_str().expect("token").to_string(),
    )
}

#[tokio::test]
async fn a_mandelbox_whose_host_never_reports_it_connecting_dies_and_frees_its_slot() {
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.stale_allocation_timeout = std::time::Duration::from_secs(1);
    let app = whist_tests::spawn_app_with(&database, settings).await;
    let (instance_id, _) = register_by_hand(&app, 1).await;
    let (status, body) = app
        .assign(
            &whist_tests::user_token("auth0|stale"),
            whist_tests::assign_body(&["us-east-1"], "hash-a", 1),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mandelbox_id = body["mandelbox_id"].as_str().expect("id").to_string();
    app.wait_for_live(&instance_id, 1).await;
    let sweeper = whist_api::workers::sweeper::Sweeper::new(app.state.context.clone());
    // Not yet stale.
    assert_eq!(sweeper.expire_stale_allocations().await.expect("sweeps"), 0);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert!(
        whist_tests::eventually(std::time::Duration::from_secs(10), || async {
            sweeper.expire_stale_allocations().await.unwrap_or(0) > 0
                || app
                    .state
                    .services
                    .mandelboxes
                    .load_from_history(&mandelbox_id)
                    .await
                    .is_ok_and(|(mandelbox, _)| {
                        mandelbox.status == Some(whist_domain::mandelbox::MandelboxStatus::Dead)
                    })
        })
        .await
    );
    let (mandelbox, _) = app
        .state
        .services
        .mandelboxes
        .load_from_history(&mandelbox_id)
        .await
        .expect("loads");
    assert_eq!(
        mandelbox.status,
        Some(whist_domain::mandelbox::MandelboxStatus::Dead)
    );
    assert_eq!(
        mandelbox.end_reason,
        Some(whist_domain::mandelbox::EndReason::NeverConnected)
    );
    app.wait_for_live(&instance_id, 0).await;
    app.stop().await;
}

#[tokio::test]
async fn a_silent_host_becomes_unresponsive_and_a_heartbeat_brings_it_back() {
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.heartbeat_timeout = std::time::Duration::from_secs(1);
    let app = whist_tests::spawn_app_with(&database, settings).await;
    let (instance_id, auth_token) = register_by_hand(&app, 2).await;
    let sweeper = whist_api::workers::sweeper::Sweeper::new(app.state.context.clone());
    assert_eq!(sweeper.mark_silent_hosts().await.expect("sweeps"), 0);
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(sweeper.mark_silent_hosts().await.expect("sweeps"), 1);
    app.wait_for_instance(&instance_id, "UNRESPONSIVE").await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let response = app
        .client
        .post(app.url("/host/heartbeat"))
        .bearer_auth(&auth_token)
        .json(&heartbeat(&instance_id, 1, false))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    app.wait_for_instance(&instance_id, "ACTIVE").await;
    app.stop().await;
}
