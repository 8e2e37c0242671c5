//! Hostile input against a live `whist serve` (embedded store, simulated hosts, Stripe on a loopback fake):
//!
//! - schemathesis (`tests/schemathesis`, from PyPI) generates requests for every operation of `/openapi.json`
//!   (examples, coverage of every schema constraint, fuzzing, stateful sequences) with every check it has: no
//!   answer may be a server error outside the contract (`whist_hooks.contract_server_error`), an undocumented
//!   status or content type, a body that violates its schema, a valid request refused, an invalid one accepted.
//! - A body over 1 MiB on every operation that takes a body (the Stripe webhook among them), declared and chunked:
//!   `413`.
//! - Stripe webhook forgeries: refused with `400`, and nothing recorded.
//!
//! - Every JWT attack (`auth::forgeries`) and no token at all, on every operation that takes an Auth0 token, against
//!   a server in production mode whose JWKS is served on loopback: `401` JSON, nothing recorded.

use std::time::{Duration, Instant};

use super::{record, scaled, Row};
use whist_tests::stripe_fake::StripeFake;
use whist_tests::{admin_token, free_port, stripe_event, stripe_signature, ChildProcess};

const WEBHOOK_SECRET: &str = "whsec_hostile";
const ONE_MIB: usize = 1024 * 1024;

/// A `whist serve` with nothing configured but Stripe (on the fake), HireFire and no rate limits (so that the
/// fuzzer reaches the handlers instead of 429s).
async fn serve(dir: &std::path::Path, stripe: &StripeFake) -> ChildProcess {
    let port = free_port();
    let mut server = ChildProcess::start(
        &crate::whist_binary(),
        &["serve"],
        dir,
        &[
            ("PORT", port.to_string()),
            ("STRIPE_SECRET", "sk_test_hostile".to_string()),
            ("STRIPE_PRICE_ID", "price_hostile".to_string()),
            ("STRIPE_API_BASE", stripe.base_url.clone()),
            ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.to_string()),
            (
                "PAYMENT_RETURN_URL",
                "https://whist.example/back".to_string(),
            ),
            ("HIREFIRE_TOKEN", "hirefire-hostile".to_string()),
            ("ASSIGN_RATE_LIMIT_PER_MINUTE", "0".to_string()),
            ("ASSIGN_RATE_LIMIT_PER_IP_PER_MINUTE", "0".to_string()),
            // async-stripe-webhook logs an ERROR for every signed event it cannot read in full against its own
            // Stripe API version, which the adapter tolerates by design (`adapters/src/stripe.rs`); the fuzzer's
            // signed events are such events, and the server's own errors are what this suite looks for.
            ("RUST_LOG", "warn,stripe_webhook=off".to_string()),
        ],
        "serve.log",
    );
    server.wait_healthy(Duration::from_secs(60)).await;
    // The warm buffer: assigns can succeed, so the fuzzer reaches past NO_INSTANCE_AVAILABLE.
    let client = whist_tests::http_client();
    let regions_url = format!("http://127.0.0.1:{port}/regions");
    assert!(
        whist_tests::eventually(Duration::from_secs(60), || {
            let client = client.clone();
            let url = regions_url.clone();
            async move {
                match client.get(&url).send().await {
                    Ok(response) => response
                        .json::<Vec<String>>()
                        .await
                        .is_ok_and(|regions| !regions.is_empty()),
                    Err(_) => false,
                }
            }
        })
        .await,
        "a region with an active image"
    );
    server
}

/// The number in schemathesis's "N generated" summary line.
fn generated_cases(output: &str) -> Option<u64> {
    output.lines().find_map(|line| {
        let (count, rest) = line.trim().split_once(' ')?;
        rest.starts_with("generated").then(|| count.parse().ok())?
    })
}

#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_spec() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("a folder");
    let stripe = StripeFake::start("sk_test_hostile").await;
    let server = serve(dir.path(), &stripe).await;
    let port = server.port.expect("a port");
    let examples = scaled(25, 150);
    let hooks = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/schemathesis");
    let config = dir.path().join("schemathesis.toml");
    std::fs::write(&config, known_ids(port).await).expect("the config is written");
    let run = tokio::process::Command::new("st")
        .args([
            "--config-file",
            config.to_str().expect("a UTF-8 path"),
            "run",
            &format!("http://127.0.0.1:{port}/openapi.json"),
            "--checks",
            "all",
            "--exclude-checks",
            "not_a_server_error",
            "--header",
            &format!("Authorization: Bearer {}", admin_token("fuzz-admin")),
            "--max-examples",
            &examples.to_string(),
            "--workers",
            "2",
            "--request-timeout",
            "20",
        ])
        .current_dir(dir.path())
        .env("PYTHONPATH", hooks)
        .env("SCHEMATHESIS_HOOKS", "whist_hooks")
        // The hooks sign the webhook deliveries they generate, as Stripe would.
        .env("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(scaled(420, 3600)), run)
        .await
        .expect("schemathesis finished in time")
        .expect(
            "schemathesis runs (`st` on PATH: pip install -r tests/schemathesis/requirements.txt)",
        );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let server_errors: Vec<String> = server
        .log_text()
        .lines()
        .filter(|line| line.contains("panicked") || line.contains("ERROR"))
        .map(str::to_string)
        .collect();
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{text}"
    );
    assert!(
        server_errors.is_empty(),
        "the server logged errors under fuzzing:\n{}",
        server_errors.join("\n")
    );
    let generated = generated_cases(&text).expect("schemathesis printed its count of test cases");
    assert!(generated > 0, "{text}");
    record(&Row {
        scenario: "hostile input: schemathesis",
        load: format!("every operation of /openapi.json, {examples} examples each, 2 workers"),
        faults: "generated, mutated and stateful requests".to_string(),
        bad_inputs: generated,
        lost: "nothing: 0 5xx outside the contract, 0 answers outside the spec, 0 errors logged"
            .to_string(),
        seconds: started.elapsed().as_secs_f64(),
    });
}

/// A schemathesis configuration that mixes ids that exist (a mandelbox of the fuzzing user, the hosts, the HireFire
/// token, the aggregate types) into half of the generated path parameters, so that the fuzzer reaches past `404`.
async fn known_ids(port: u16) -> String {
    let client = whist_tests::http_client();
    let token = admin_token("fuzz-admin");
    // The warm buffer's first host registers within seconds of start-up.
    let deadline = Instant::now() + Duration::from_secs(60);
    let assigned: serde_json::Value = loop {
        let response = client
            .post(format!("http://127.0.0.1:{port}/mandelbox/assign"))
            .bearer_auth(&token)
            .json(&whist_tests::assign_body(&["us-east-1"], "local_dev", 1))
            .send()
            .await
            .expect("answers");
        let status = response.status();
        let body: serde_json::Value = response.json().await.expect("json");
        if status == 200 {
            break body;
        }
        assert!(
            status == 503 && Instant::now() < deadline,
            "the fuzzing user gets a mandelbox: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let instances: Vec<serde_json::Value> = client
        .get(format!("http://127.0.0.1:{port}/admin/instances"))
        .bearer_auth(&token)
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    let instance_ids: Vec<&str> = instances
        .iter()
        .filter_map(|instance| instance["instance_id"].as_str())
        .collect();
    let list =
        |values: &[&str]| serde_json::to_string(values).expect("a TOML array is a JSON array");
    format!(
        "[dictionaries.instances]\nvalues = {instances}\n\
         [dictionaries.mandelboxes]\nvalues = {mandelboxes}\n\
         [dictionaries.aggregate_types]\nvalues = {types}\n\
         [dictionaries.hirefire]\nvalues = [\"hirefire-hostile\"]\n\
         [parameters]\n\
         \"path.instance_id\" = {{ dictionary = \"instances\", probability = 0.5 }}\n\
         \"path.aggregate_id\" = {{ dictionary = \"instances\", probability = 0.5 }}\n\
         \"path.aggregate_type\" = {{ dictionary = \"aggregate_types\", probability = 0.5 }}\n\
         \"path.mandelbox_id\" = {{ dictionary = \"mandelboxes\", probability = 0.5 }}\n\
         \"path.token\" = {{ dictionary = \"hirefire\", probability = 0.5 }}\n",
        instances = list(&instance_ids),
        mandelboxes = list(&[assigned["mandelbox_id"].as_str().expect("an id")]),
        types = list(&whist_api::control::audit::AGGREGATE_TYPES),
    )
}

/// Every operation of the document that takes a body, as (method, path with its parameters filled in).
fn operations_with_a_body(document: &serde_json::Value) -> Vec<(String, String)> {
    let mut operations = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            if operation.get("requestBody").is_some() {
                let path = fill_path(path);
                operations.push((method.to_uppercase(), path));
            }
        }
    }
    operations
}

#[tokio::test]
async fn oversized_bodies_and_forged_webhooks_are_refused_and_record_nothing() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("a folder");
    let stripe = StripeFake::start("sk_test_hostile").await;
    let server = serve(dir.path(), &stripe).await;
    let base = format!("http://127.0.0.1:{}", server.port.expect("a port"));
    let client = whist_tests::http_client();
    let admin = admin_token("hostile-admin");
    let mut tried = 0u64;

    // Bodies over 1 MiB, with a declared length and chunked, on every operation that takes one.
    let document: serde_json::Value = client
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("the document");
    let targets = operations_with_a_body(&document);
    assert!(
        targets.len() >= 6,
        "the document lists the operations with a body: {targets:?}"
    );
    assert!(
        targets.contains(&("POST".to_string(), "/stripe/webhook".to_string())),
        "the webhook is an operation with a body: {targets:?}"
    );
    let port = server.port.expect("a port");
    for (method, path) in &targets {
        for chunked in [false, true] {
            let status = oversized_request(port, method, path, &admin, chunked).await;
            assert_eq!(status, 413, "{method} {path}, chunked: {chunked}");
            tried += 1;
        }
    }

    // Stripe webhook forgeries.
    let events_before = log_length(&client, &base, &admin).await;
    let now = chrono::Utc::now().timestamp();
    let payload = stripe_event(
        "evt_hostile",
        "customer.subscription.created",
        now,
        serde_json::json!({"id": "sub_hostile", "customer": "cus_hostile", "status": "active"}),
    );
    let good = stripe_signature(&payload, WEBHOOK_SECRET, now);
    let forged = format!("t={now},v1={}", "ab".repeat(32));
    let stale = stripe_signature(&payload, WEBHOOK_SECRET, now - 301);
    let foreign = stripe_signature(&payload, "whsec_someone_else", now);
    let v0_only = good.replace("v1=", "v0=");
    let altered = payload.replace("active", "trialing");
    let truncated = payload[..payload.len() / 2].to_string();
    let not_json = "\u{0}\u{1}not json".to_string();
    let signed_not_json = stripe_signature(&not_json, WEBHOOK_SECRET, now);
    let forgeries: Vec<(&str, String, String)> = vec![
        ("a forged signature", payload.clone(), forged),
        ("a signature 301 s old", payload.clone(), stale),
        ("another endpoint's secret", payload.clone(), foreign),
        ("only a v0 signature", payload.clone(), v0_only),
        ("a body altered after signing", altered, good.clone()),
        ("a truncated body", truncated, good.clone()),
        ("a body that is not JSON", not_json.clone(), good.clone()),
        ("a signed body that is not JSON", not_json, signed_not_json),
        ("no signature", payload.clone(), String::new()),
        ("a malformed header", payload.clone(), "t=x,v1".to_string()),
        (
            "a signature without a timestamp",
            payload.clone(),
            good.split(',').nth(1).unwrap_or_default().to_string(),
        ),
    ];
    for (what, body, signature) in &forgeries {
        let mut request = client
            .post(format!("{base}/stripe/webhook"))
            .header("content-type", "application/json")
            .body(body.clone());
        if !signature.is_empty() {
            request = request.header("Stripe-Signature", signature);
        }
        let response = request.send().await.expect("answers");
        assert_eq!(response.status(), 400, "{what}");
        tried += 1;
    }
    assert_eq!(
        log_length(&client, &base, &admin).await,
        events_before,
        "a refused webhook records no billing event"
    );
    // The true delivery is taken: the forgeries were refused for what they are, not because webhooks fail.
    let response = client
        .post(format!("{base}/stripe/webhook"))
        .header("content-type", "application/json")
        .header("Stripe-Signature", &good)
        .body(payload.clone())
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    assert!(log_length(&client, &base, &admin).await > events_before);

    assert!(
        !server.log_text().contains("panicked"),
        "{}",
        server.log_text()
    );
    record(&Row {
        scenario: "hostile input: oversized bodies, webhook forgeries",
        load: format!(
            "{} operations with a body, {} webhook forgeries",
            targets.len(),
            forgeries.len()
        ),
        faults: "bodies of 1 MiB + 1 (declared and chunked), forged Stripe signatures".to_string(),
        bad_inputs: tried,
        lost: "nothing: every one refused (413/400), 0 events recorded by them".to_string(),
        seconds: started.elapsed().as_secs_f64(),
    });
}

/// Sends a body of 1 MiB + 1 byte (with its length declared, or chunked) over a raw connection and reads the
/// answer while still writing: a server that refuses early may close before the body is sent, which an HTTP client
/// reports as a broken pipe instead of the answer it was given.
async fn oversized_request(port: u16, method: &str, path: &str, token: &str, chunked: bool) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connects");
    let (reader, mut writer) = tokio::io::split(stream);
    let framing = if chunked {
        "Transfer-Encoding: chunked".to_string()
    } else {
        format!("Content-Length: {}", ONE_MIB + 1)
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nConnection: close\r\n{framing}\r\n\r\n"
    );
    let writing = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        let body = vec![b'{'; ONE_MIB + 1];
        for chunk in body.chunks(64 * 1024) {
            if chunked {
                writer
                    .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await?;
                writer.write_all(chunk).await?;
                writer.write_all(b"\r\n").await?;
            } else {
                writer.write_all(chunk).await?;
            }
        }
        if chunked {
            writer.write_all(b"0\r\n\r\n").await?;
        }
        writer.flush().await
    });
    let mut status_line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::BufReader::new(reader).read_line(&mut status_line),
    )
    .await
    .expect("an answer in time")
    .expect("an answer");
    writing.abort();
    status_line
        .split_whitespace()
        .nth(1)
        .and_then(|status| status.parse().ok())
        .unwrap_or_else(|| panic!("a status line, not {status_line:?}"))
}

/// The number of billing events (subscriptions, Stripe customers and deliveries) in the log, through the admin API.
async fn log_length(client: &reqwest::Client, base: &str, admin: &str) -> usize {
    let mut after = 0;
    let mut count = 0;
    loop {
        let page: Vec<serde_json::Value> = client
            .get(format!("{base}/admin/events?after={after}&limit=10000"))
            .bearer_auth(admin)
            .send()
            .await
            .expect("answers")
            .json()
            .await
            .expect("events");
        let Some(last) = page.last() else {
            return count;
        };
        count += page
            .iter()
            .filter(|event| {
                let kind = event["aggregate_type"].as_str().unwrap_or_default();
                kind.contains("subscription") || kind.contains("stripe")
            })
            .count();
        after = last["position"].as_i64().expect("a position");
    }
}

/// Every operation of the document that takes an Auth0 token (user or admin), as (method, path filled in).
fn operations_with_a_token(document: &serde_json::Value) -> Vec<(String, String)> {
    let mut operations = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("a path item") {
            let schemes: Vec<&str> = operation["security"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(serde_json::Value::as_object)
                .flat_map(|requirement| requirement.keys().map(String::as_str))
                .collect();
            if schemes
                .iter()
                .any(|scheme| *scheme == "UserAuth" || *scheme == "AdminAuth")
            {
                operations.push((method.to_uppercase(), fill_path(path)));
            }
        }
    }
    operations
}

fn fill_path(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                "00000000-0000-0000-0000-000000000000"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn every_forged_token_is_refused_on_every_operation_that_takes_one() {
    use crate::auth::{
        app_with_auth0, claims, forgeries, keys, serve_jwks, sign, AUDIENCE, ISSUER,
    };
    let started = Instant::now();
    let (tenant, _, attacker) = keys();
    let (jwks_url, _, _jwks) = serve_jwks(vec![tenant.jwk.clone()]).await;
    let (_database, app) = app_with_auth0(&jwks_url, "prod").await;
    let document: serde_json::Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("the document");
    let operations = operations_with_a_token(&document);
    assert!(
        operations.len() >= 15,
        "the document names the operations that take a token: {operations:?}"
    );
    let attacks = forgeries(tenant, attacker);
    let send = |method: &str, path: &str, token: Option<&str>| {
        let mut request = app
            .client
            .request(
                reqwest::Method::from_bytes(method.as_bytes()).expect("a method"),
                app.url(path),
            )
            .header("content-type", "application/json")
            .body("{}");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let mut tried = 0u64;
    for (method, path) in &operations {
        for (name, token) in &attacks {
            let response = send(method, path, Some(token)).await.expect("answers");
            assert_eq!(response.status(), 401, "{name} on {method} {path}");
            let body: serde_json::Value = response.json().await.expect("a JSON refusal");
            assert_eq!(body["error"], "UNAUTHORIZED", "{name} on {method} {path}");
            tried += 1;
        }
        let response = send(method, path, None).await.expect("answers");
        assert_eq!(response.status(), 401, "no token on {method} {path}");
        tried += 1;
    }
    // The tenant's own token passes the same door (a developer's: every operation is open to it).
    let developer = sign(
        tenant,
        &claims("auth0|dev", "openid admin", ISSUER, AUDIENCE, 600),
    );
    for (method, path) in &operations {
        let response = send(method, path, Some(&developer)).await.expect("answers");
        assert!(
            response.status() != 401 && response.status() != 403,
            "a valid developer token on {method} {path}: {}",
            response.status()
        );
    }
    let events: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE metadata LIKE '%alice%'")
            .fetch_one(app.state.database.any())
            .await
            .expect("reads");
    assert_eq!(
        events, 0,
        "nothing was recorded in the name of a forged token's subject"
    );
    app.stop().await;
    record(&Row {
        scenario: "hostile input: JWT attacks",
        load: format!(
            "{} operations that take an Auth0 token, server in production mode, JWKS on loopback",
            operations.len()
        ),
        faults: format!(
            "{} forged tokens per operation ({}), and none",
            attacks.len(),
            attacks
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        bad_inputs: tried,
        lost: "nothing: every one 401 JSON, 0 events recorded for the forged subject".to_string(),
        seconds: started.elapsed().as_secs_f64(),
    });
}
