//! The zero-configuration path: simulated hosts keep a warm buffer, a mandelbox is assigned, started on its host
//! by the reconciler, reported running by the host, and ended by its protocol server.

use std::time::Duration;

use whist_tests::{assign_body, eventually, spawn_app_with, user_token, TestDatabase};

async fn active_simulated_hosts(app: &whist_tests::TestApp) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM instances WHERE status = 'ACTIVE' AND image_id = 'sim-image-local'",
    )
    .fetch_one(app.state.database.any())
    .await
    .unwrap_or(0)
}

#[tokio::test]
async fn simulated_hosts_keep_the_buffer_and_run_a_mandelbox_from_assign_to_disconnect() {
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.desired_free_mandelboxes = 2;
    settings.fleet.autoscale = true;
    settings.cloud = whist_adapters::config::CloudKind::Local;
    let app = spawn_app_with(&database, settings).await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            active_simulated_hosts(&app).await >= 1
        })
        .await,
        "the autoscaler launched a simulated host and it registered"
    );
    let user = "auth0|simulated-user";
    let (status, body) = app
        .assign(
            &user_token(user),
            assign_body(&["us-east-1"], "local_dev", 1),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mandelbox_id = body["mandelbox_id"].as_str().expect("id").to_string();

    // The reconciler asks the host to start it; the host reports CONNECTING then RUNNING.
    let running = eventually(Duration::from_secs(60), || {
        let request = app
            .client
            .get(app.url(&format!("/mandelbox/{mandelbox_id}")))
            .bearer_auth(user_token(user));
        async move {
            let Ok(response) = request.send().await else {
                return false;
            };
            let view: serde_json::Value = response.json().await.unwrap_or_default();
            view["status"] == "RUNNING"
        }
    })
    .await;
    assert!(running, "the mandelbox reached RUNNING");

    // Three more take the buffer below two free slots: another host is launched.
    for session in 2..5 {
        let (status, body) = app
            .assign(
                &user_token(&format!("auth0|u{session}")),
                assign_body(&["us-east-1"], "local_dev", session),
            )
            .await;
        assert!(status == 200 || status == 503, "{body}");
    }
    assert!(
        eventually(Duration::from_secs(60), || async {
            active_simulated_hosts(&app).await >= 2
        })
        .await,
        "the buffer was refilled"
    );

    let ended = app
        .disconnect_request(&mandelbox_id)
        .send()
        .await
        .expect("answers");
    assert_eq!(ended.status(), 200);
    app.stop().await;
}
