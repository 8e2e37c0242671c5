//! The server's operational surface, in-process.

use whist_tests::{spawn_app, BackendKind, TestDatabase};

async fn health_readiness_docs_and_metrics_answer(kind: BackendKind) {
    let database = TestDatabase::new(kind).await;
    let app = spawn_app(&database).await;
    let health = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("answers");
    assert_eq!(health.status(), 200);
    assert!(health.headers().contains_key("x-request-id"));
    let ready = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("answers");
    assert_eq!(ready.status(), 200);
    let spec: serde_json::Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("the spec is JSON");
    assert!(spec["openapi"]
        .as_str()
        .expect("a version")
        .starts_with("3."));
    // Every operation of the contract (a path served by two API groups once lost one of its methods).
    for (method, path) in [
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/metrics"),
        ("post", "/mandelbox/assign"),
        ("get", "/mandelbox/{mandelbox_id}"),
        ("post", "/mandelbox/{mandelbox_id}/disconnect"),
        ("get", "/regions"),
        ("get", "/payment_portal_url"),
        ("post", "/host/register"),
        ("post", "/host/heartbeat"),
        ("post", "/host/mandelbox/{mandelbox_id}/status"),
        ("get", "/hirefire/test"),
        ("get", "/hirefire/{token}/info"),
        ("get", "/admin/events"),
        ("get", "/admin/projections"),
        ("post", "/admin/projections/{name}/rebuild"),
        ("get", "/admin/instances"),
        ("post", "/admin/instances"),
        ("post", "/admin/instances/{instance_id}/drain"),
        ("delete", "/admin/instances/{instance_id}"),
        ("get", "/admin/mandelboxes"),
        ("get", "/admin/maintenance"),
        ("put", "/admin/maintenance"),
    ] {
        assert!(
            spec["paths"][path].get(method).is_some(),
            "{method} {path} is documented"
        );
    }
    let docs = app
        .client
        .get(app.url("/docs"))
        .send()
        .await
        .expect("answers");
    assert_eq!(docs.status(), 200);
    assert!(docs
        .text()
        .await
        .expect("html")
        .to_lowercase()
        .contains("swagger"));
    let metrics = app.metrics().await;
    assert!(metrics.contains("whist_http_requests_total"), "{metrics}");
    assert!(
        metrics.contains("whist_http_request_duration_seconds"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn health_readiness_docs_and_metrics_answer_on_postgres() {
    health_readiness_docs_and_metrics_answer(BackendKind::Postgres).await;
}

#[tokio::test]
async fn health_readiness_docs_and_metrics_answer_on_sqlite() {
    health_readiness_docs_and_metrics_answer(BackendKind::Sqlite).await;
}

#[tokio::test]
async fn a_body_over_one_mebibyte_is_refused_with_413() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let body = vec![b'x'; 1024 * 1024 + 1];
    let response = app
        .client
        .post(app.url("/healthz"))
        .body(body)
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 413);
    // The same body streamed without a declared length.
    let chunks =
        futures::stream::iter((0..17).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 64 * 1024])));
    let response = app
        .client
        .post(app.url("/healthz"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 413);
    app.stop().await;
}

#[tokio::test]
async fn readiness_fails_when_the_store_is_gone() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    let url = database.url.clone().expect("url");
    let name = url.rsplit('/').next().expect("a name").to_string();
    let admin = sqlx::PgPool::connect(&whist_tests::postgres_server_url())
        .await
        .expect("admin");
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .expect("dropped");
    let ready = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("answers");
    assert_eq!(ready.status(), 503);
    let health = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("answers");
    assert_eq!(
        health.status(),
        200,
        "liveness does not depend on the store"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_draining_server_refuses_new_requests_with_503() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    app.state.start_draining();
    let response = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"], "SHUTTING_DOWN");
    app.stop().await;
}

#[tokio::test]
async fn hirefire_reads_the_number_of_waiting_jobs_behind_its_token() {
    let database = whist_tests::TestDatabase::postgres().await;
    let mut settings = database.settings();
    settings.hirefire_token = Some(whist_adapters::config::Secret::new(
        "hf-secret-token".to_string(),
    ));
    let app = whist_tests::spawn_app_with(&database, settings).await;
    let get = |path: &str| app.client.get(app.url(path)).send();
    assert_eq!(get("/hirefire/test").await.expect("answers").status(), 200);
    assert_eq!(
        get("/hirefire/not-the-token/info")
            .await
            .expect("answers")
            .status(),
        404
    );
    // Three launch decisions whose EC2 never answers (a dead loopback endpoint): three jobs wait.
    for _ in 0..3 {
        app.launch(whist_tests::launch_spec("us-east-1", "ami-a", "hash-a"))
            .await;
    }
    let counted = whist_tests::eventually(std::time::Duration::from_secs(20), || async {
        let body: serde_json::Value = get("/hirefire/hf-secret-token/info")
            .await
            .expect("answers")
            .json()
            .await
            .expect("json");
        body == serde_json::json!([{"name": "worker", "quantity": 3}])
    })
    .await;
    assert!(counted, "HireFire sees the three waiting launches");
    app.stop().await;

    // Without a configured token the endpoint does not exist.
    let unconfigured = whist_tests::spawn_app(&database).await;
    let status = unconfigured
        .client
        .get(unconfigured.url("/hirefire/anything/info"))
        .send()
        .await
        .expect("answers")
        .status();
    assert_eq!(status, 404);
    unconfigured.stop().await;
}
