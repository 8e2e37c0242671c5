//! The operator console: administrative actions (HTTP and `whist admin`), maintenance mode, and the dashboard page
//! driven in headless Chromium against a live server with simulated hosts.

use std::time::Duration;

use serde_json::{json, Value};
use whist_tests::{
    admin_token, assign_body, eventually, free_port, http_client, launch_spec, spawn_app,
    spawn_app_with, user_token, ChildProcess, TestApp, TestDatabase,
};

const HASH: &str = "hash-console";
const IMAGE: &str = "ami-console";

async fn send(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = http_client().request(method, app.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn status_of(app: &TestApp, instance_id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM instances WHERE instance_id = $1")
        .bind(instance_id)
        .fetch_optional(app.state.database.any())
        .await
        .expect("reads")
        .unwrap_or_default()
}

async fn actors_of(app: &TestApp, instance_id: &str) -> Vec<(String, String)> {
    let (_, history) = send(
        app,
        reqwest::Method::GET,
        &format!("/admin/aggregates/instance/{instance_id}/events"),
        Some(&admin_token("auditor")),
        None,
    )
    .await;
    history
        .as_array()
        .expect("a list")
        .iter()
        .map(|event| {
            (
                event["event_type"].as_str().unwrap_or_default().to_string(),
                event["metadata"]["actor"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

#[tokio::test]
async fn admin_actions_want_an_admin_token() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    let user = user_token("not-a-developer");
    let actions = [
        (
            reqwest::Method::POST,
            "/admin/instances",
            Some(json!({"region": "us-east-1", "count": 1})),
        ),
        (
            reqwest::Method::POST,
            "/admin/instances/some-host/drain",
            None,
        ),
        (reqwest::Method::DELETE, "/admin/instances/some-host", None),
        (
            reqwest::Method::PUT,
            "/admin/maintenance",
            Some(json!({"enabled": true})),
        ),
        (reqwest::Method::GET, "/admin/maintenance", None),
        (reqwest::Method::GET, "/admin/overview", None),
    ];
    for (method, path, body) in actions {
        let (status, _) = send(&app, method.clone(), path, None, body.clone()).await;
        assert_eq!(status, 401, "{method} {path}");
        let (status, _) = send(&app, method.clone(), path, Some(&user), body).await;
        assert_eq!(status, 403, "{method} {path}");
    }
    // Nothing was decided by the refused requests.
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_type IN ('instance', 'service')",
    )
    .fetch_one(app.state.database.any())
    .await
    .expect("counts");
    assert_eq!(events, 0);
    app.stop().await;
}

#[tokio::test]
async fn developers_launch_drain_and_terminate_hosts_as_recorded_actors() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    app.activate_image(&["us-east-1"], IMAGE, HASH).await;
    let admin = admin_token("dev-ada");

    // Launch: validated, recorded with the developer as actor, idempotent under a key.
    let launch = |count: i64, key: Option<&'static str>| {
        let app = &app;
        let admin = admin.clone();
        async move {
            let mut request = http_client()
                .post(app.url("/admin/instances"))
                .bearer_auth(admin)
                .json(&json!({"region": "us-east-1", "count": count}));
            if let Some(key) = key {
                request = request.header("Idempotency-Key", key);
            }
            let response = request.send().await.expect("answers");
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, first) = launch(2, Some("launch-once")).await;
    assert_eq!(status, 202, "{first}");
    let (status, again) = launch(2, Some("launch-once")).await;
    assert_eq!(
        (status, &again),
        (202, &first),
        "a retry answers the same hosts"
    );
    assert_eq!(first["instance_ids"].as_array().map(Vec::len), Some(2));
    let (status, body) = launch(0, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("INVALID_REQUEST")),
        "the count is bounded in the document and refused by the parser"
    );
    let (status, body) = send(
        &app,
        reqwest::Method::POST,
        "/admin/instances",
        Some(&admin),
        Some(json!({"region": "mars-1", "count": 1})),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("REGION_NOT_ENABLED"))
    );
    let launched = first["instance_ids"][0]
        .as_str()
        .expect("an id")
        .to_string();
    let launches: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'InstanceLaunchRequested'",
    )
    .fetch_one(app.state.database.any())
    .await
    .expect("counts");
    assert_eq!(launches, 2, "the retried launch decided nothing new");

    // Drain a host that serves: it turns DRAINING, the developer is the actor, a second drain changes nothing.
    let host = app
        .active_host(launch_spec("us-east-1", IMAGE, HASH), 2)
        .await;
    let path = format!("/admin/instances/{}/drain", host.instance_id);
    let (status, body) = send(&app, reqwest::Method::POST, &path, Some(&admin), None).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("DRAINING")),
        "{body}"
    );
    let (status, _) = send(&app, reqwest::Method::POST, &path, Some(&admin), None).await;
    assert_eq!(status, 200, "draining again is harmless");
    app.wait_for_instance(&host.instance_id, "DRAINING").await;
    assert!(actors_of(&app, &host.instance_id).await.contains(&(
        "InstanceDrainStarted".to_string(),
        "user:dev-ada".to_string()
    )));
    let (status, _) = send(
        &app,
        reqwest::Method::POST,
        "/admin/instances/no-such-host/drain",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 404);

    // Terminate a registered host: through its host service (it stops), recorded with the developer as actor.
    let host = app
        .active_host(launch_spec("us-east-1", IMAGE, HASH), 2)
        .await;
    let (status, body) = app
        .assign(
            &user_token("console-user"),
            assign_body(&["us-east-1"], HASH, 1),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mut stopped = host.host.stopped();
    let (status, body) = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/admin/instances/{}", host.instance_id),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("TERMINATING")),
        "{body}"
    );
    assert!(
        tokio::time::timeout(
            Duration::from_secs(20),
            stopped.wait_for(|stopped| *stopped)
        )
        .await
        .is_ok(),
        "the host service was asked to shut down and did"
    );
    assert!(actors_of(&app, &host.instance_id).await.contains(&(
        "InstanceTerminationStarted".to_string(),
        "user:dev-ada".to_string()
    )));
    // A host that never registered is terminated too (through the cloud only).
    let (status, body) = send(
        &app,
        reqwest::Method::DELETE,
        &format!("/admin/instances/{launched}"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("TERMINATING")),
        "{body}"
    );
    assert_eq!(
        send(
            &app,
            reqwest::Method::DELETE,
            &format!("/admin/instances/{launched}"),
            Some(&admin),
            None
        )
        .await
        .0,
        200,
        "terminating again is harmless"
    );
    // Ended hosts cannot be drained.
    let (status, body) = send(
        &app,
        reqwest::Method::POST,
        &format!("/admin/instances/{launched}/drain"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (409, Some("HOST_ENDED")));
    app.stop().await;
}

#[tokio::test]
async fn maintenance_mode_refuses_assigns_and_launches_but_nothing_else() {
    let database = TestDatabase::postgres().await;
    let mut settings = database.settings();
    settings.fleet.autoscale = true;
    // The host below is the buffer: the autoscaler keeps it (a target of 0 would scale it down).
    settings.desired_free_mandelboxes = 4;
    let app = spawn_app_with(&database, settings).await;
    app.activate_image(&["us-east-1"], IMAGE, HASH).await;
    let host = app
        .active_host(launch_spec("us-east-1", IMAGE, HASH), 4)
        .await;
    let user = user_token("maintenance-user");
    let (status, before) = app
        .assign(&user, assign_body(&["us-east-1"], HASH, 1))
        .await;
    assert_eq!(status, 200, "{before}");

    let admin = admin_token("dev-grace");
    let (status, body) = send(
        &app,
        reqwest::Method::PUT,
        "/admin/maintenance",
        Some(&admin),
        Some(json!({"enabled": true})),
    )
    .await;
    assert_eq!((status, body["enabled"].as_bool()), (200, Some(true)));
    let (status, body) = app
        .assign(
            &user_token("other-user"),
            assign_body(&["us-east-1"], HASH, 2),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (503, Some("MAINTENANCE")));
    // Everything else keeps working: the regions, a mandelbox's status, a disconnect, heartbeats.
    let (status, regions) = send(&app, reqwest::Method::GET, "/regions", None, None).await;
    assert_eq!((status, regions), (200, json!(["us-east-1"])));
    let mandelbox_id = before["mandelbox_id"].as_str().expect("an id");
    assert_eq!(
        app.mandelbox_view(&user, mandelbox_id).await["mandelbox_id"],
        mandelbox_id
    );
    assert_eq!(app.disconnect(mandelbox_id).await, 200);
    assert_eq!(status_of(&app, &host.instance_id).await, "ACTIVE");
    // The autoscaler launches nothing while it is on, even with a buffer to fill.
    let mut settings = (*app.state.settings).clone();
    settings.desired_free_mandelboxes = 40;
    let scaler = whist_api::workers::autoscaler::Autoscaler::new(whist_api::Context::new(
        std::sync::Arc::new(settings),
        app.state.database.clone(),
        app.state.projections.clone(),
        app.state.services.clone(),
    ));
    // It decides as the fleet's leader (the lease the test server's own autoscaler took).
    let epoch = app.wait_for_leadership().await;
    let decided = scaler.decide_once(epoch).await.expect("decides");
    assert_eq!(decided.launched, 0, "{decided:?}");
    assert!(
        decided.plans[0].1.launch > 0,
        "the plan wanted hosts: {decided:?}"
    );
    let (_, switch) = send(
        &app,
        reqwest::Method::GET,
        "/admin/maintenance",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(switch["enabled"], true);

    // Off again: assigns and launches resume.
    let (status, body) = send(
        &app,
        reqwest::Method::PUT,
        "/admin/maintenance",
        Some(&admin),
        Some(json!({"enabled": false})),
    )
    .await;
    assert_eq!((status, body["enabled"].as_bool()), (200, Some(false)));
    let (status, body) = app
        .assign(
            &user_token("other-user"),
            assign_body(&["us-east-1"], HASH, 3),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(scaler.decide_once(epoch).await.expect("decides").launched > 0);
    let switches: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_type, CAST(metadata AS TEXT) FROM events WHERE aggregate_type = 'service' ORDER BY sequence",
    )
    .fetch_all(app.state.database.any())
    .await
    .expect("reads");
    assert_eq!(
        switches
            .iter()
            .map(|(kind, _)| kind.as_str())
            .collect::<Vec<_>>(),
        ["ServiceMaintenanceStarted", "ServiceMaintenanceEnded"]
    );
    assert!(switches
        .iter()
        .all(|(_, metadata)| metadata.contains("user:dev-grace")));
    // Auditors replay the switch like any aggregate: on after its first event, off after both.
    for (version, on) in [(1, true), (2, false)] {
        let (status, replayed) = send(
            &app,
            reqwest::Method::GET,
            &format!("/admin/aggregates/service/service?at_version={version}"),
            Some(&admin),
            None,
        )
        .await;
        assert_eq!(
            (status, replayed["state"]["maintenance"].as_bool()),
            (200, Some(on)),
            "{replayed}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn the_command_line_twins_act_as_the_named_developer() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    app.activate_image(&["us-east-1"], IMAGE, HASH).await;
    let url = database.url.clone().expect("a Postgres database");
    let run = async |arguments: &[&str], log: &str| {
        let mut child = ChildProcess::start(
            &crate::whist_binary(),
            arguments,
            database.data_dir.path(),
            &[("DATABASE_URL", url.clone())],
            log,
        );
        let status = child.exited(Duration::from_secs(60)).await.expect("exits");
        (status.success(), child.log_text())
    };
    let (ok, log) = run(
        &[
            "admin",
            "--as",
            "dev-linus",
            "launch",
            "--region",
            "us-east-1",
            "--count",
            "1",
        ],
        "launch.log",
    )
    .await;
    assert!(ok, "{log}");
    let instance_id = log
        .lines()
        .find(|line| line.len() == 36 && line.chars().filter(|c| *c == '-').count() == 4)
        .expect("the launched host's id")
        .to_string();
    let (ok, log) = run(
        &["admin", "--as", "dev-linus", "terminate", &instance_id],
        "terminate.log",
    )
    .await;
    assert!(ok && log.contains("TERMINATING"), "{log}");
    let (ok, log) = run(
        &["admin", "--as", "dev-linus", "maintenance", "on"],
        "on.log",
    )
    .await;
    assert!(ok && log.contains("maintenance on"), "{log}");
    let (status, body) = app
        .assign(
            &user_token("cli-user"),
            assign_body(&["us-east-1"], HASH, 1),
        )
        .await;
    assert_eq!((status, body["error"].as_str()), (503, Some("MAINTENANCE")));
    let (ok, log) = run(
        &["admin", "--as", "dev-linus", "maintenance", "off"],
        "off.log",
    )
    .await;
    assert!(ok && log.contains("maintenance off"), "{log}");
    assert!(
        eventually(Duration::from_secs(10), || async {
            actors_of(&app, &instance_id).await.len() >= 2
        })
        .await
    );
    let actors = actors_of(&app, &instance_id).await;
    assert_eq!(
        actors[..2],
        [
            (
                "InstanceLaunchRequested".to_string(),
                "user:dev-linus".to_string()
            ),
            (
                "InstanceTerminationStarted".to_string(),
                "user:dev-linus".to_string()
            )
        ]
    );
    let (ok, log) = run(
        &["admin", "--as", "dev-linus", "drain", "no-such-host"],
        "drain.log",
    )
    .await;
    assert!(!ok && log.contains("no host no-such-host"), "{log}");
    app.stop().await;
}

#[tokio::test]
async fn the_dashboard_drives_a_drain_in_headless_chromium() {
    // A live server as a newcomer runs it: embedded store, simulated hosts, its own warm buffer.
    let folder = tempfile::tempdir().expect("a folder");
    let port = free_port();
    let mut server = ChildProcess::start(
        &crate::whist_binary(),
        &["serve"],
        folder.path(),
        &[
            ("PORT", port.to_string()),
            (
                "HOST_SERVICE_PORT",
                whist_tests::host_service_port().to_string(),
            ),
            ("DESIRED_FREE_MANDELBOXES", "8".to_string()),
        ],
        "serve.log",
    );
    server.wait_healthy(Duration::from_secs(30)).await;
    let base = format!("http://127.0.0.1:{port}");
    let token = admin_token("dev-dashboard");
    // The page is served by the binary itself, and forbids other origins.
    let page = http_client()
        .get(format!("{base}/dashboard"))
        .send()
        .await
        .expect("answers");
    assert_eq!(page.status(), 200);
    assert!(page
        .headers()
        .get("content-security-policy")
        .is_some_and(|policy| policy
            .to_str()
            .unwrap_or_default()
            .contains("default-src 'self'")));
    let html = page.text().await.expect("a page");
    assert!(html.contains("<label for=\"token\">Admin token</label>"));
    // Nothing loaded from elsewhere (the SVG namespace is a name, not an address).
    let without_namespace = html.replace("http://www.w3.org/2000/svg", "");
    assert!(
        !without_namespace.contains("http://") && !without_namespace.contains("https://"),
        "no outside address in the page"
    );
    assert!(!html.contains("<script src") && !html.contains("rel=\"stylesheet\""));
    // Wait until the server's own buffer has hosts ACTIVE.
    let client = http_client();
    assert!(
        eventually(Duration::from_secs(60), || async {
            let hosts: Value = match client
                .get(format!("{base}/admin/instances?status=ACTIVE"))
                .bearer_auth(&token)
                .send()
                .await
            {
                Ok(response) => response.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            hosts.as_array().is_some_and(|hosts| hosts.len() >= 2)
        })
        .await,
        "the warm buffer comes up: {}",
        server.log_text()
    );

    // A few sessions, so that the plots have something to show (developers are served without a subscription).
    for (index, developer) in ["dev-a", "dev-b", "dev-c"].iter().enumerate() {
        let response = client
            .post(format!("{base}/mandelbox/assign"))
            .bearer_auth(admin_token(developer))
            .json(&assign_body(&["us-east-1"], "local_dev", index as i64 + 1))
            .send()
            .await
            .expect("answers");
        assert_eq!(response.status(), 200, "{developer}");
    }
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    let e2e = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let output = tokio::process::Command::new("node")
        .arg(e2e.join("dashboard.mjs"))
        .arg(&base)
        .arg(&token)
        .arg(&screenshot)
        .current_dir(&e2e)
        .output()
        .await
        .expect("node runs (installed by .ci/run, with `npm ci --prefix tests/e2e`)");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{printed}\nserver log:\n{}",
        server.log_text()
    );
    assert!(printed.contains("is now DRAINING"), "{printed}");
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("dashboard screenshot: {}", screenshot.display());
    server.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = server.exited(Duration::from_secs(30)).await;
}
