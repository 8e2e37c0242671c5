//! Hostile peers, each with the figures the resilience table shows: hosts that lie at registration, a scanner of
//! unknown paths against `/metrics`, and slowloris connections.

use std::collections::BTreeSet;
use std::time::Duration;

use whist_tests::{launch_spec, spawn_app, spawn_app_with, TestDatabase};

use super::{record, Row};

fn register_body(
    instance_id: &str,
    spec: &whist_domain::instance::LaunchSpec,
    ip: &str,
    capacity: u64,
) -> serde_json::Value {
    serde_json::json!({
        "instance_id": instance_id,
        "region": spec.region,
        "image_id": spec.image_id,
        "instance_type": spec.instance_type,
        "client_commit_hash": spec.client_commit_hash,
        "ip": ip,
        "mandelbox_capacity": capacity,
        // Nothing calls these hosts: any well-formed fingerprint.
        "tls_cert_sha256": "ab".repeat(32),
    })
}

/// The hostile registrations the table counts: (what the host claims, ip, capacity).
const HOSTILE_REGISTRATIONS: [(&str, &str, u64); 9] = [
    ("the metadata service", "169.254.169.254", 4),
    ("the metadata service as IPv6", "::ffff:169.254.169.254", 4),
    ("an ip with a port", "127.0.0.1:8080", 4),
    ("an ip with a path", "127.0.0.1/latest/meta-data", 4),
    ("a URL", "http://127.0.0.1", 4),
    ("an ip outside the host networks", "10.1.2.3", 4),
    ("the unspecified address", "0.0.0.0", 4),
    ("no room", "127.0.0.1", 0),
    ("a million slots", "127.0.0.1", 1_000_000),
];

#[tokio::test]
async fn hostile_registrations_are_refused_and_leave_the_bootstrap_token_usable() {
    let started = std::time::Instant::now();
    let database = TestDatabase::sqlite();
    let app = spawn_app(&database).await;
    let spec = launch_spec("us-east-1", "ami-a", "hash-a");
    let (instance_id, bootstrap) = app.launch(spec.clone()).await;
    let register = |body: serde_json::Value| {
        let request = app
            .client
            .post(app.url("/host/register"))
            .bearer_auth(&bootstrap)
            .json(&body);
        async move {
            let response = request.send().await.expect("answers");
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            (status, body)
        }
    };
    for (claim, ip, capacity) in HOSTILE_REGISTRATIONS {
        let (status, body) = register(register_body(&instance_id, &spec, ip, capacity)).await;
        assert_eq!(status, 409, "{claim}: {body}");
        assert!(
            ["HOST_ADDRESS_REFUSED", "CAPACITY_OUT_OF_RANGE"]
                .contains(&body["error"].as_str().unwrap_or_default()),
            "{claim}: {body}"
        );
    }
    let (status, body) = register(register_body(&instance_id, &spec, "127.0.0.1", 64)).await;
    assert_eq!(status, 200, "the token is still unused: {body}");
    app.wait_for_instance(&instance_id, "ACTIVE").await;
    let ip: String = sqlx::query_scalar("SELECT ip FROM instances WHERE instance_id = $1")
        .bind(&instance_id)
        .fetch_one(app.state.database.any())
        .await
        .expect("the host is listed");
    assert_eq!(ip, "127.0.0.1");
    app.stop().await;
    record(&Row {
        scenario: "hostile hosts",
        load: "1 server, 1 launch awaiting registration".to_string(),
        faults: "registrations claiming the metadata service, ports, paths, URLs, foreign networks, 0 and 10^6 slots"
            .to_string(),
        bad_inputs: HOSTILE_REGISTRATIONS.len() as u64,
        lost: format!(
            "none: {} of {} refused with 409, nothing recorded, the genuine registration then accepted",
            HOSTILE_REGISTRATIONS.len(),
            HOSTILE_REGISTRATIONS.len()
        ),
        seconds: started.elapsed().as_secs_f64(),
    });
}

/// The series of a Prometheus text exposition: each sample's name and labels, with histogram and summary samples
/// (`_bucket`, `_sum`, `_count`, `le`, `quantile`) counted once per label set.
fn series(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .map(|line| {
            let sample = line.rsplit_once(' ').map_or(line, |(sample, _)| sample);
            let (name, labels) = sample.split_once('{').unwrap_or((sample, ""));
            let name = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            let labels: Vec<&str> = labels
                .trim_end_matches('}')
                .split(',')
                .filter(|label| !label.starts_with("le=") && !label.starts_with("quantile="))
                .collect();
            format!("{name}{{{}}}", labels.join(","))
        })
        .collect()
}

#[tokio::test]
async fn requests_to_unknown_paths_add_almost_no_series_and_no_secret_reaches_a_label() {
    let started = std::time::Instant::now();
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.hirefire_token = Some(whist_adapters::config::Secret::new(
        "hirefire-s3cret-token".to_string(),
    ));
    let app = spawn_app_with(&database, settings).await;
    let metrics = || app.metrics();
    // Only request series count: other series (projection lag, say) appear as the server settles.
    let request_series = |text: &str| -> BTreeSet<String> {
        series(text)
            .into_iter()
            .filter(|name| name.starts_with("whist_http_"))
            .collect()
    };
    metrics().await;
    let before = request_series(&metrics().await);
    // A scanner: 400 GETs to paths nobody serves, ids, traversal and guesses at HireFire's token.
    const REQUESTS: usize = 400;
    let scan = |round: usize| {
        let app = &app;
        async move {
            for number in 0..REQUESTS {
                let path = match number % 4 {
                    0 => format!("/wp-admin/{round}-{number}/setup.php"),
                    1 => format!("/{}", uuid::Uuid::new_v4()),
                    2 => format!("/admin/{number}/../../etc/passwd"),
                    _ => format!("/hirefire/guess-{round}-{number}/info"),
                };
                let _ = app
                    .client
                    .get(app.url(&path))
                    .send()
                    .await
                    .expect("answers");
            }
        }
    };
    scan(0).await;
    let _ = app
        .client
        .get(app.url("/hirefire/hirefire-s3cret-token/info"))
        .send()
        .await
        .expect("answers");
    let after_scan = request_series(&metrics().await);
    let added: Vec<&String> = after_scan.difference(&before).collect();
    assert!(
        added.len() <= 6,
        "{} new series from {REQUESTS} requests: {added:#?}",
        added.len()
    );
    // Odd methods share a label, and a second scan of other paths adds nothing at all.
    for method in ["POST", "PUT", "DELETE", "BREW", "PROPFIND", "M-SEARCH"] {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let _ = app
            .client
            .request(method, app.url("/no/such/path"))
            .send()
            .await
            .expect("answers");
    }
    let with_methods = request_series(&metrics().await);
    scan(1).await;
    let text = metrics().await;
    let after = request_series(&text);
    assert_eq!(
        after.difference(&with_methods).count(),
        0,
        "another {REQUESTS} unknown paths added series"
    );
    assert!(
        with_methods.len() - before.len() <= 16,
        "methods: {:#?}",
        with_methods.difference(&before).collect::<Vec<_>>()
    );
    assert!(!text.contains("s3cret"), "the HireFire token is in a label");
    assert!(!text.contains("guess-"), "a path reached a label");
    app.stop().await;
    record(&Row {
        scenario: "metrics scan",
        load: "1 server".to_string(),
        faults: format!(
            "2 x {REQUESTS} GETs to unknown paths (ids, traversal, HireFire token guesses), 6 other methods"
        ),
        bad_inputs: 2 * REQUESTS as u64 + 6,
        lost: format!(
            "none: the first scan added {} request series, the second 0; {} with every method; no path or secret in a label",
            added.len(),
            with_methods.len() - before.len()
        ),
        seconds: started.elapsed().as_secs_f64(),
    });
}

#[tokio::test]
async fn a_slowloris_connection_is_closed_while_other_clients_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = std::time::Instant::now();
    let database = TestDatabase::sqlite();
    let mut settings = database.settings();
    settings.http_header_timeout = Duration::from_secs(2);
    let app = spawn_app_with(&database, settings).await;
    let address = app.address.trim_start_matches("http://").to_string();
    const SLOW_CONNECTIONS: usize = 64;
    let mut slow = Vec::new();
    for _ in 0..SLOW_CONNECTIONS {
        let address = address.clone();
        slow.push(tokio::spawn(async move {
            let mut stream = tokio::net::TcpStream::connect(&address)
                .await
                .expect("connects");
            let opened = std::time::Instant::now();
            let _ = stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await;
            // One header byte every 300 ms, never finishing the head; stop once the server hangs up.
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if stream.write_all(b"X").await.is_err() {
                    break;
                }
                let mut buffer = [0u8; 256];
                match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut buffer)).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(_)) => {
                        // The server answered the unfinished head (408): it closes next.
                        continue;
                    }
                    Err(_) => {}
                }
            }
            opened.elapsed()
        }));
    }
    let mut served = 0;
    let mut slowest = Duration::ZERO;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < deadline {
        let asked = std::time::Instant::now();
        let status = app
            .client
            .get(app.url("/healthz"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .expect("another client is served meanwhile")
            .status();
        assert_eq!(status.as_u16(), 200);
        slowest = slowest.max(asked.elapsed());
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut longest_held = Duration::ZERO;
    for connection in slow {
        longest_held = longest_held.max(connection.await.expect("the slow client ends"));
    }
    assert!(
        longest_held < Duration::from_secs(6),
        "a slow connection was held {longest_held:?}"
    );
    app.stop().await;
    record(&Row {
        scenario: "slowloris",
        load: format!("1 server, a client polling /healthz: {served} requests served, slowest {} ms", slowest.as_millis()),
        faults: format!("{SLOW_CONNECTIONS} connections sending one header byte every 300 ms (header timeout 2 s)"),
        bad_inputs: SLOW_CONNECTIONS as u64,
        lost: format!("none: every slow connection closed, the longest after {} ms", longest_held.as_millis()),
        seconds: started.elapsed().as_secs_f64(),
    });
}
