//! Supervised background loops: a loop that panics is restarted, `/readyz` names it while it is down, and the work
//! it does goes on after the restart. The panic is injected into the real binary (`WHIST_FAULT_PANIC_LOOP`): the
//! named loop panics once, two seconds after it starts, and its restart runs normally.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use whist_adapters::store::Database;
use whist_tests::{
    admin_token, assign_body, eventually, free_port, log_troubles, ChildProcess, TestDatabase,
};

use super::{record, scalar, Row};

const REGION: &str = "us-east-1";

/// One answer of `/readyz`: when (since the test started), its status and its `status` text.
#[derive(Debug, Clone)]
struct Probe {
    at: Duration,
    status: u16,
    text: String,
}

/// Asks `/readyz` every 5 ms until `stop` turns true, keeping every answer (refused connections are not kept: the
/// process is not listening yet).
async fn watch_readiness(
    port: u16,
    started: Instant,
    probes: Arc<Mutex<Vec<Probe>>>,
    mut stop: watch::Receiver<bool>,
) {
    let client = reqwest::Client::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let answer = client
            .get(format!("http://127.0.0.1:{port}/readyz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if let Ok(response) = answer {
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            let probe = Probe {
                at: started.elapsed(),
                status,
                text: body["status"].as_str().unwrap_or_default().to_string(),
            };
            if let Ok(mut probes) = probes.lock() {
                probes.push(probe);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            _ = stop.changed() => {}
        }
    }
}

async fn metrics_text(port: u16) -> String {
    match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The mandelbox's status as its user sees it.
async fn mandelbox_status(port: u16, token: &str, mandelbox_id: &str) -> String {
    let answer = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/mandelbox/{mandelbox_id}"))
        .bearer_auth(token)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    let Ok(response) = answer else {
        return String::new();
    };
    let view: serde_json::Value = response.json().await.unwrap_or_default();
    view["status"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn a_reconciler_that_panics_is_restarted_readyz_names_it_while_it_is_down_and_it_works_afterwards(
) {
    let started = Instant::now();
    let database = TestDatabase::postgres().await;
    let port = free_port();
    let environment = vec![
        ("DATABASE_URL", database.url.clone().expect("postgres")),
        ("PORT", port.to_string()),
        ("PUBLIC_URL", format!("http://127.0.0.1:{port}")),
        ("WHIST_CLOUD", "local".to_string()),
        ("ENABLED_REGIONS", serde_json::json!([REGION]).to_string()),
        ("WHIST_AUTOSCALE", "true".to_string()),
        ("DESIRED_FREE_MANDELBOXES", "2".to_string()),
        ("WHIST_HOST_CAPACITY", "2".to_string()),
        (
            "HOST_SERVICE_PORT",
            whist_tests::host_service_port().to_string(),
        ),
        ("WHIST_FAULT_PANIC_LOOP", "reconciler".to_string()),
    ];
    let mut server = ChildProcess::start(
        &crate::whist_binary(),
        &["serve"],
        database.data_dir.path(),
        &environment,
        "serve.log",
    );
    // Readiness is watched from the start: the reconciler panics two seconds after it starts, and is down for the
    // first restart delay (100 ms).
    let probes = Arc::new(Mutex::new(Vec::new()));
    let (stop_watching, watching) = watch::channel(false);
    let watcher = tokio::spawn(watch_readiness(port, started, probes.clone(), watching));
    server.wait_healthy(Duration::from_secs(60)).await;

    let restarted = eventually(Duration::from_secs(30), || async {
        whist_tests::metric_sample(
            &metrics_text(port).await,
            "whist_background_loop_restarts_total{loop=\"reconciler\"}",
        ) == Some(1.0)
    })
    .await;
    assert!(
        restarted,
        "the reconciler is restarted once: {}",
        log_troubles([server.log.as_path()])
    );
    // A few more answers after the restart.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_watching.send(true);
    watcher.await.expect("the watcher ends");
    let probes = probes.lock().expect("not poisoned").clone();
    let down: Vec<&Probe> = probes.iter().filter(|probe| probe.status == 503).collect();
    assert!(
        !down.is_empty(),
        "/readyz answered 503 while the reconciler was down ({} answers, none 503)",
        probes.len()
    );
    assert!(
        down.iter()
            .all(|probe| probe.text == "background loop reconciler is down (restarting)"),
        "{down:?}"
    );
    let first_down = down[0].at;
    let last_down = down[down.len() - 1].at;
    let back = probes
        .iter()
        .find(|probe| probe.at > last_down && probe.status == 200)
        .expect("/readyz answers 200 again after the restart");
    assert_eq!(back.text, "ok");
    assert!(
        probes
            .iter()
            .filter(|probe| probe.at < first_down)
            .all(|probe| probe.status == 200),
        "ready before the fault"
    );
    // Every 503 lies in one stretch: the loop went down once.
    assert!(probes
        .iter()
        .filter(|probe| probe.at > first_down && probe.at < last_down)
        .all(|probe| probe.status == 503));
    let unready_for = back.at - first_down;
    assert!(
        unready_for < Duration::from_secs(2),
        "back within the first restart delay and a probe: {unready_for:?}"
    );
    let log = server.log_text();
    assert!(
        log.contains("injected fault: background loop reconciler panics once"),
        "the panic is the injected one"
    );
    assert!(
        log.contains("a background loop stopped while the process was not shutting down"),
        "the supervisor says so"
    );

    // The restarted reconciler does its work: the warm buffer's simulated hosts are launched (launches are the
    // reconciler's jobs), and an assign is started on its host and reaches RUNNING (the spin-up is too).
    let store = database.open_with(2).await;
    let hosts_up = eventually(Duration::from_secs(60), || async {
        scalar(
            &store,
            "SELECT count(*) FROM instances WHERE status = 'ACTIVE'",
        )
        .await
            >= 1
    })
    .await;
    assert!(
        hosts_up,
        "a simulated host is up: {}",
        log_troubles([server.log.as_path()])
    );
    let token = admin_token("auth0|supervised");
    let assigned_at = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/mandelbox/assign"))
        .bearer_auth(&token)
        .json(&assign_body(&[REGION], "local_dev", 1))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("the assign is answered");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.expect("JSON");
    let mandelbox_id = body["mandelbox_id"].as_str().expect("an id").to_string();
    let running = eventually(Duration::from_secs(30), || async {
        mandelbox_status(port, &token, &mandelbox_id).await == "RUNNING"
    })
    .await;
    assert!(
        running,
        "the mandelbox reaches RUNNING: {}",
        log_troubles([server.log.as_path()])
    );
    let running_after = assigned_at.elapsed();
    let metrics = metrics_text(port).await;
    let other_restarts: Vec<&str> = metrics
        .lines()
        .filter(|line| {
            line.starts_with("whist_background_loop_restarts_total")
                && !line.contains("loop=\"reconciler\"")
        })
        .collect();
    assert!(
        other_restarts.is_empty(),
        "no other loop restarted: {other_restarts:?}"
    );
    assert_eq!(
        whist_tests::metric_sample(&metrics, "whist_background_loop_up{loop=\"reconciler\"}"),
        Some(1.0)
    );

    server.signal(nix::sys::signal::Signal::SIGTERM);
    let status = server.exited(Duration::from_secs(30)).await.expect("exits");
    assert!(status.success(), "exit 0 on SIGTERM: {}", server.log_text());
    record(&Row {
        scenario: "Background loop panics",
        load: format!(
            "1 serve (Postgres, simulated hosts); /readyz asked every 5 ms ({} answers); 1 assign afterwards, \
             RUNNING {:.2} s after it",
            probes.len(),
            running_after.as_secs_f64()
        ),
        faults: format!(
            "the reconciler panicked once (WHIST_FAULT_PANIC_LOOP): 1 restart; /readyz 503 naming it for {} \
             answers over {:.0} ms, 200 again {:.0} ms after the first 503",
            down.len(),
            (last_down - first_down).as_secs_f64() * 1000.0,
            unready_for.as_secs_f64() * 1000.0
        ),
        bad_inputs: 0,
        lost: "nothing: the assign after the restart ran; no other loop restarted".to_string(),
        seconds: started.elapsed().as_secs_f64(),
    });
}

#[tokio::test]
async fn a_worker_whose_projections_panic_restarts_them_and_they_catch_up() {
    let database = TestDatabase::postgres().await;
    let url = database.url.clone().expect("postgres");
    let mut worker = ChildProcess::start(
        &crate::whist_binary(),
        &["worker"],
        database.data_dir.path(),
        &[
            ("DATABASE_URL", url),
            // Nothing but the projections matters here: no simulated fleet of the worker's own.
            ("WHIST_AUTOSCALE", "false".to_string()),
            (
                "HOST_SERVICE_PORT",
                whist_tests::host_service_port().to_string(),
            ),
            ("WHIST_FAULT_PANIC_LOOP", "projections".to_string()),
        ],
        "worker.log",
    );
    let restarted = eventually(Duration::from_secs(60), || async {
        worker.log_text().contains("background loop restarted")
    })
    .await;
    assert!(
        restarted,
        "the worker logs the restart: {}",
        worker.log_text()
    );
    assert!(worker
        .log_text()
        .contains("injected fault: background loop projections panics once"));

    // Events appended after the restart reach every projection of the worker.
    let store: Database = database.open_with(2).await;
    let catalog = whist_adapters::store::AggregateStore::<whist_domain::images::ImageCatalog>::new(
        &store,
        (),
    );
    catalog
        .execute(
            whist_domain::images::CATALOG_ID,
            whist_domain::images::ImageCatalogCommand::Activate {
                client_commit_hash: "hash-supervised".to_string(),
                images: [(REGION.to_string(), "ami-supervised".to_string())].into(),
                at: chrono::Utc::now(),
            },
            &whist_domain::EventMetadata::new(whist_domain::Actor::System, chrono::Utc::now()),
        )
        .await
        .expect("the release is activated");
    let caught_up = eventually(Duration::from_secs(30), || async {
        let head = scalar(&store, "SELECT COALESCE(MAX(position), 0) FROM events").await;
        let behind = scalar(
            &store,
            "SELECT count(*) FROM projection_checkpoints WHERE position < (SELECT COALESCE(MAX(position), 0) \
             FROM events)",
        )
        .await;
        head > 0 && behind == 0
    })
    .await;
    assert!(caught_up, "the projections catch up: {}", worker.log_text());
    worker.signal(nix::sys::signal::Signal::SIGTERM);
    let status = worker.exited(Duration::from_secs(30)).await.expect("exits");
    assert!(status.success(), "{}", worker.log_text());
}
