//! Failing closed: production-shaped settings that are incomplete stop start-up, development tokens work only in
//! `local`, forged host and protocol tokens cost no read, clients behind a proxy are counted by their own address,
//! hostile input is refused before it reaches the log, and token keys rotate without cutting hosts off. (Hostile
//! hosts, the metrics scan and slowloris are in `resilience::hostile_peers`, with their figures.)

use std::time::Duration;

use whist_tests::{launch_spec, spawn_app, spawn_app_with, user_token, ChildProcess, TestDatabase};

use crate::whist_binary;

/// One token key of `WHIST_TOKEN_KEYS` (32 bytes of `byte`).
fn token_key(id: &str, byte: u8) -> whist_adapters::config::TokenKey {
    whist_adapters::config::TokenKey {
        id: id.to_string(),
        bytes: vec![byte; 32],
    }
}

/// Runs `whist serve` with `environment` and waits for it to exit; its exit status and log.
async fn start_up_fails(environment: &[(&str, String)]) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().expect("a folder");
    let mut environment = environment.to_vec();
    environment.push(("PORT", whist_tests::free_port().to_string()));
    let mut process = ChildProcess::start(
        &whist_binary(),
        &["serve"],
        dir.path(),
        &environment,
        "serve.log",
    );
    let status = process
        .exited(Duration::from_secs(30))
        .await
        .expect("whist serve exits by itself");
    (status, process.log_text())
}

#[tokio::test]
async fn production_shaped_settings_without_environment_stop_start_up_naming_it() {
    let database = TestDatabase::postgres().await;
    let url = database.url.clone().expect("postgres");
    for shaped in [
        ("DATABASE_URL", url.clone()),
        ("AUTH0_JWKS_URL", "http://127.0.0.1:9/jwks.json".to_string()),
        ("AUTH0_DOMAIN", "whist.us.auth0.com".to_string()),
    ] {
        let (status, log) = start_up_fails(&[("ENVIRONMENT", String::new()), shaped.clone()]).await;
        assert!(!status.success(), "{shaped:?} started as local: {log}");
        assert!(log.contains("ENVIRONMENT"), "{shaped:?}: {log}");
    }
    let (status, log) = start_up_fails(&[
        ("ENVIRONMENT", "prod".to_string()),
        ("DATABASE_URL", url.clone()),
    ])
    .await;
    assert!(!status.success());
    assert!(log.contains("WHIST_TOKEN_KEYS"), "{log}");
    let (status, log) = start_up_fails(&[
        ("ENVIRONMENT", "local".to_string()),
        ("WHIST_CLOUD", "aws".to_string()),
        ("WHIST_DEPLOYMENT", String::new()),
    ])
    .await;
    assert!(!status.success());
    assert!(log.contains("WHIST_DEPLOYMENT"), "{log}");
    let (status, log) = start_up_fails(&[
        ("ENVIRONMENT", "prod".to_string()),
        ("WHIST_TOKEN_KEYS", "k1:dG9vLXNob3J0".to_string()),
    ])
    .await;
    assert!(!status.success());
    assert!(
        log.contains("WHIST_TOKEN_KEYS") && !log.contains("dG9vLXNob3J0"),
        "a malformed key is named, its value never shown: {log}"
    );
}

#[tokio::test]
async fn a_development_token_is_refused_outside_local() {
    let database = TestDatabase::postgres().await;
    let dir = tempfile::tempdir().expect("a folder");
    let port = whist_tests::free_port();
    let mut process = ChildProcess::start(
        &whist_binary(),
        &["serve"],
        dir.path(),
        &[
            ("ENVIRONMENT", "dev".to_string()),
            ("DATABASE_URL", database.url.clone().expect("postgres")),
            (
                "WHIST_TOKEN_KEYS",
                "k1:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_string(),
            ),
            ("PORT", port.to_string()),
        ],
        "serve.log",
    );
    process.wait_healthy(Duration::from_secs(60)).await;
    let client = whist_tests::http_client();
    let admin = whist_tests::admin_token("attacker");
    let status = client
        .get(format!("http://127.0.0.1:{port}/admin/instances"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("answers")
        .status();
    assert_eq!(status.as_u16(), 401, "an admin token anyone can mint");
    let status = client
        .get(format!(
            "http://127.0.0.1:{port}/mandelbox/{}",
            uuid::Uuid::new_v4()
        ))
        .bearer_auth(user_token("someone"))
        .send()
        .await
        .expect("answers")
        .status();
    assert_eq!(status.as_u16(), 401);
}

#[tokio::test]
async fn a_forged_host_or_protocol_token_is_refused_before_the_mandelbox_is_looked_up() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let unknown = uuid::Uuid::new_v4();
    let status = |path: String, token: &'static str| {
        let request = app
            .client
            .post(app.url(&path))
            .bearer_auth(token)
            .json(&serde_json::json!({"status": "RUNNING"}));
        async move { request.send().await.expect("answers").status().as_u16() }
    };
    // An unknown mandelbox would be 404: the forged token is refused first.
    assert_eq!(
        status(
            format!("/host/mandelbox/{unknown}/status"),
            "k.forged.token"
        )
        .await,
        401
    );
    assert_eq!(
        status(format!("/mandelbox/{unknown}/disconnect"), "k.forged.token").await,
        401
    );
    // A genuine host token and an id that cannot be a mandelbox: 404, without a read.
    let host_token = app.state.services.tokens.derive(
        whist_adapters::tokens::Purpose::HostAuth,
        &uuid::Uuid::new_v4().to_string(),
    );
    let response = app
        .client
        .post(app.url("/host/mandelbox/not-a-uuid/status"))
        .bearer_auth(&host_token)
        .json(&serde_json::json!({"status": "RUNNING"}))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status().as_u16(), 404);
    let response = app
        .client
        .get(app.url("/mandelbox/not-a-uuid"))
        .bearer_auth(user_token("u"))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status().as_u16(), 404);
    app.stop().await;
}

async fn assign_status(
    app: &whist_tests::TestApp,
    user: &str,
    forwarded_for: Option<&str>,
) -> (u16, Option<String>) {
    let mut request = app
        .client
        .post(app.url("/mandelbox/assign"))
        .bearer_auth(user_token(user))
        .json(&whist_tests::assign_body(&["us-east-1"], "local_dev", 1));
    if let Some(forwarded_for) = forwarded_for {
        request = request.header("X-Forwarded-For", forwarded_for);
    }
    let response = request.send().await.expect("answers");
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    (response.status().as_u16(), retry_after)
}

#[tokio::test]
async fn behind_a_trusted_proxy_each_client_is_limited_by_its_own_address() {
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.trusted_proxies = vec!["127.0.0.1/32".parse().expect("a CIDR")];
    settings.assign_rate_limit_per_minute = 0;
    settings.assign_rate_limit_per_ip_per_minute = 3;
    let app = spawn_app_with(&database, settings).await;
    // Users are not subscribers: an assign that passes the limits answers 402.
    for number in 0..3 {
        let (status, _) = assign_status(&app, &format!("u{number}"), Some("198.51.100.7")).await;
        assert_eq!(status, 402, "within the address's budget");
    }
    let (status, retry_after) = assign_status(&app, "u3", Some("198.51.100.7")).await;
    assert_eq!(status, 429);
    let seconds: u64 = retry_after
        .expect("a Retry-After header")
        .parse()
        .expect("whole seconds");
    assert!((1..=20).contains(&seconds), "{seconds}");
    let (status, _) = assign_status(&app, "u4", Some("203.0.113.1, 198.51.100.7")).await;
    assert_eq!(status, 429, "a prepended address does not escape the limit");
    let (status, _) = assign_status(&app, "u5", Some("198.51.100.8")).await;
    assert_eq!(status, 402, "another client behind the same balancer");
    app.stop().await;
}

#[tokio::test]
async fn from_an_untrusted_peer_x_forwarded_for_is_ignored() {
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.assign_rate_limit_per_minute = 0;
    settings.assign_rate_limit_per_ip_per_minute = 2;
    let app = spawn_app_with(&database, settings).await;
    let (first, _) = assign_status(&app, "a", Some("198.51.100.1")).await;
    let (second, _) = assign_status(&app, "b", Some("198.51.100.2")).await;
    let (third, retry_after) = assign_status(&app, "c", Some("198.51.100.3")).await;
    assert_eq!((first, second, third), (402, 402, 429));
    assert!(retry_after.is_some());
    app.stop().await;
}

#[tokio::test]
async fn a_user_over_their_own_limit_spends_nothing_of_their_addresss_budget() {
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.assign_rate_limit_per_minute = 1;
    settings.assign_rate_limit_per_ip_per_minute = 3;
    let app = spawn_app_with(&database, settings).await;
    let statuses: Vec<u16> =
        futures::future::join_all((0..3).map(|_| assign_status(&app, "greedy", None)))
            .await
            .into_iter()
            .map(|(status, _)| status)
            .collect();
    assert_eq!(statuses.iter().filter(|status| **status == 429).count(), 2);
    assert_eq!(assign_status(&app, "neighbour-1", None).await.0, 402);
    assert_eq!(assign_status(&app, "neighbour-2", None).await.0, 402);
    assert_eq!(
        assign_status(&app, "neighbour-3", None).await.0,
        429,
        "the address's budget of 3 is spent by the 3 assigns that passed their user's limit"
    );
    app.stop().await;
}

/// Events in the whole log, through the admin API.
async fn log_length(app: &whist_tests::TestApp) -> usize {
    let admin = whist_tests::admin_token("auditor");
    let page: Vec<serde_json::Value> = app
        .client
        .get(app.url("/admin/events?after=0&limit=10000"))
        .bearer_auth(admin)
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("events");
    page.len()
}

#[tokio::test]
async fn an_assign_body_over_the_contracts_bounds_is_400_and_records_nothing() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    app.subscribe("bounded").await;
    let before = log_length(&app).await;
    let many_regions: Vec<String> = (0..1000).map(|number| format!("region-{number}")).collect();
    let bodies = [
        serde_json::json!({"regions": many_regions, "client_commit_hash": "local_dev", "session_id": 1,
            "user_email": "u@example.com"}),
        serde_json::json!({"regions": ["r".repeat(33)], "client_commit_hash": "local_dev", "session_id": 1,
            "user_email": "u@example.com"}),
        serde_json::json!({"regions": ["us-east-1"], "client_commit_hash": "c".repeat(5_000), "session_id": 1,
            "user_email": "u@example.com"}),
        serde_json::json!({"regions": ["us-east-1"], "client_commit_hash": "local_dev", "session_id": 1,
            "user_email": format!("{}@example.com", "u".repeat(320))}),
    ];
    for body in bodies {
        let response = app
            .client
            .post(app.url("/mandelbox/assign"))
            .bearer_auth(user_token("bounded"))
            .json(&body)
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status().as_u16(), 400);
    }
    assert_eq!(log_length(&app).await, before, "nothing was recorded");
    app.stop().await;
}

#[tokio::test]
async fn a_signed_stripe_event_of_a_type_we_do_not_handle_is_acknowledged_and_records_nothing() {
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let before = log_length(&app).await;
    let now = chrono::Utc::now().timestamp();
    let payload = whist_tests::stripe_event(
        "evt_unhandled_1",
        "invoice.payment_succeeded",
        now,
        serde_json::json!({"id": "in_1", "object": "invoice", "status": {"odd": "shape"}, "customer": 42}),
    );
    let status = app
        .deliver_webhook(
            &payload,
            &whist_tests::stripe_signature(&payload, whist_tests::STRIPE_WEBHOOK_SECRET, now),
        )
        .await;
    assert_eq!(status, 200, "Stripe retries anything else for three days");
    assert_eq!(log_length(&app).await, before);
    app.stop().await;
}

#[tokio::test]
async fn a_rotated_token_key_keeps_live_hosts_until_the_old_key_is_retired() {
    let database = TestDatabase::postgres().await;
    let with_keys = |keys: Vec<whist_adapters::config::TokenKey>| {
        let mut settings = database.settings();
        settings.token_keys = keys;
        settings
    };
    let app = spawn_app_with(&database, with_keys(vec![token_key("k1", 1)])).await;
    let host = app
        .active_host(launch_spec("us-east-1", "ami-a", "hash-a"), 2)
        .await;
    assert!(host.auth_token.starts_with("k1."));
    app.stop().await;
    let heartbeat = |app: &whist_tests::TestApp, token: String| {
        let request = app
            .client
            .post(app.url("/host/heartbeat"))
            .bearer_auth(token)
            .json(&serde_json::json!({
                "instance_id": host.instance_id, "timestamp": chrono::Utc::now().to_rfc3339(),
                "heartbeat_number": 1, "total_ram_kb": 1, "free_ram_kb": 1, "avail_ram_kb": 1,
                "is_dying": false,
            }));
        async move { request.send().await.expect("answers").status().as_u16() }
    };
    // A new key is rolled in before the old one: live hosts keep their tokens, new tokens come from the new key.
    let app = spawn_app_with(
        &database,
        with_keys(vec![token_key("k2", 2), token_key("k1", 1)]),
    )
    .await;
    assert_eq!(heartbeat(&app, host.auth_token.clone()).await, 200);
    let (_, bootstrap) = app
        .launch(launch_spec("us-east-1", "ami-a", "hash-a"))
        .await;
    assert!(bootstrap.starts_with("k2."), "{bootstrap}");
    app.stop().await;
    // The old key is retired: whatever it signed stops working.
    let app = spawn_app_with(&database, with_keys(vec![token_key("k2", 2)])).await;
    assert_eq!(heartbeat(&app, host.auth_token.clone()).await, 401);
    app.stop().await;
}
