//! Database outage: a `whist serve` and a `whist worker` on a PostgreSQL cluster of the test's own
//! (`whist_tests::private_postgres`; the machine's shared server keeps running for the other tests), with the
//! webserver's simulated hosts (`WHIST_CLOUD=local`) kept by the autoscaler, under a steady load of assigns and
//! disconnects, while the database server is stopped (`pg_ctl stop -m immediate`, as on a crash) and started again.
//! It proves that during the outage every request answers promptly with a 503 and a JSON error (never a hang,
//! never a 500); that both processes recover by themselves (assigns succeed again within a bound, the log and the
//! projections catch up, the warm buffer is kept again); and that no acknowledged assign is lost (every 200's
//! mandelbox is allocated exactly once in the log).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use whist_adapters::store::Database;
use whist_adapters::tokens::{Purpose, Tokens};
use whist_projections::ProjectionRunner;
use whist_tests::private_postgres::{PrivatePostgres, StopMode};
use whist_tests::{admin_token, assign_body, eventually, free_port, ChildProcess};

use super::{duration, log_settled, record, scalar, scaled, Row};

const REGION: &str = "us-east-1";
/// The commit hash of the simulated hosts' image (`whist_api::startup::SIMULATED_COMMIT_HASH`).
const HASH: &str = whist_api::startup::SIMULATED_COMMIT_HASH;
const CAPACITY: u32 = 4;
const DESIRED_FREE: u32 = 4;
/// A request still unanswered after this long hangs, which is a failure.
const HANG: Duration = Duration::from_secs(15);
/// Assigns must succeed again within this long after the database is back.
const RECOVERY_BOUND: Duration = Duration::from_secs(30);
/// Free slots on active hosts, from the `instances` read model.
const FREE_SLOTS: &str =
    "SELECT CAST(COALESCE(SUM(mandelbox_capacity - live_mandelboxes), 0) AS BIGINT) \
     FROM instances WHERE status = 'ACTIVE'";

/// One request the load made, and how it went.
#[derive(Debug, Clone)]
struct Answer {
    what: &'static str,
    started: Instant,
    latency: Duration,
    /// `None`: no answer (a hang until the timeout, or a refused connection).
    status: Option<u16>,
    /// The JSON `error` code of a non-200 answer, if it had one.
    code: Option<String>,
    mandelbox_id: Option<String>,
}

async fn request(
    what: &'static str,
    builder: reqwest::RequestBuilder,
    answers: &Mutex<Vec<Answer>>,
) -> Answer {
    let started = Instant::now();
    let outcome = builder.timeout(HANG).send().await;
    let (status, body) = match outcome {
        Ok(response) => {
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            (Some(status), body)
        }
        Err(_) => (None, serde_json::Value::Null),
    };
    let answer = Answer {
        what,
        started,
        latency: started.elapsed(),
        status,
        code: body["error"]
            .as_str()
            .filter(|code| !code.is_empty())
            .map(str::to_string),
        mandelbox_id: body["mandelbox_id"].as_str().map(str::to_string),
    };
    if let Ok(mut answers) = answers.lock() {
        answers.push(answer.clone());
    }
    answer
}

/// One client: a fresh user per assign; each acknowledged mandelbox is disconnected (retried until recorded).
async fn client_loop(
    client_index: usize,
    port: u16,
    tokens: Arc<Tokens>,
    stop: Arc<AtomicBool>,
    answers: Arc<Mutex<Vec<Answer>>>,
) {
    let http = whist_tests::http_client();
    let base = format!("http://127.0.0.1:{port}");
    let mut iteration = 0usize;
    while !stop.load(Ordering::Relaxed) {
        iteration += 1;
        let user = format!("outage-user-{client_index}-{iteration}");
        let assign = http
            .post(format!("{base}/mandelbox/assign"))
            .bearer_auth(admin_token(&user))
            .json(&assign_body(&[REGION], HASH, iteration as i64));
        let answer = request("assign", assign, &answers).await;
        let Some(mandelbox_id) = answer.mandelbox_id.filter(|_| answer.status == Some(200)) else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let secret = tokens.derive(Purpose::Protocol, &mandelbox_id);
        loop {
            let disconnect = http
                .post(format!("{base}/mandelbox/{mandelbox_id}/disconnect"))
                .bearer_auth(&secret);
            let answer = request("disconnect", disconnect, &answers).await;
            if answer.status != Some(503) && answer.status.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn log_troubles(processes: &[&ChildProcess]) -> String {
    whist_tests::log_troubles(processes.iter().map(|process| process.log.as_path()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_answers_503_promptly_and_loses_no_acknowledged_assign() {
    let started = Instant::now();
    let postgres = PrivatePostgres::start().await;
    let url = postgres.url("postgres");
    let working_dir = tempfile::tempdir().expect("a working folder");
    let port = free_port();
    let environment = vec![
        ("DATABASE_URL", url.clone()),
        ("PUBLIC_URL", format!("http://127.0.0.1:{port}")),
        ("WHIST_CLOUD", "local".to_string()),
        ("ENABLED_REGIONS", serde_json::json!([REGION]).to_string()),
        ("WHIST_AUTOSCALE", "true".to_string()),
        ("DESIRED_FREE_MANDELBOXES", DESIRED_FREE.to_string()),
        ("WHIST_HOST_CAPACITY", CAPACITY.to_string()),
        (
            "HOST_SERVICE_PORT",
            whist_tests::host_service_port().to_string(),
        ),
        ("ASSIGN_RATE_LIMIT_PER_MINUTE", "0".to_string()),
        ("ASSIGN_RATE_LIMIT_PER_IP_PER_MINUTE", "0".to_string()),
        ("WHIST_JOB_CLAIM_S", "5".to_string()),
        ("WHIST_DRAINED_HOST_TIMEOUT_S", "2".to_string()),
        // Hosts are not judged silent because the webserver could not write their heartbeats for a while.
        ("HEARTBEAT_TIMEOUT_S", "120".to_string()),
        ("RUST_LOG", "warn".to_string()),
    ];
    let mut serve_environment = environment.clone();
    serve_environment.push(("PORT", port.to_string()));
    let mut serve = ChildProcess::start(
        &crate::whist_binary(),
        &["serve"],
        working_dir.path(),
        &serve_environment,
        "serve.log",
    );
    serve.wait_healthy(Duration::from_secs(90)).await;
    let mut worker = ChildProcess::start(
        &crate::whist_binary(),
        &["worker"],
        working_dir.path(),
        &environment,
        "worker.log",
    );
    let store = Database::connect(
        Some(&url),
        working_dir.path(),
        whist_adapters::store::PoolSettings::sized(2),
    )
    .await
    .expect("the private cluster answers");
    let tokens = Arc::new(Tokens::load(&store).await.expect("the server key"));
    assert!(
        eventually(Duration::from_secs(60), || async {
            scalar(&store, FREE_SLOTS).await >= i64::from(DESIRED_FREE)
        })
        .await,
        "the warm buffer fills: {}",
        log_troubles(&[&serve, &worker])
    );

    // A host of the warm buffer, whose heartbeats the test also sends during the outage.
    let host: String =
        sqlx::query_scalar("SELECT instance_id FROM instances WHERE status = 'ACTIVE' LIMIT 1")
            .fetch_one(store.any())
            .await
            .expect("an active host");
    let host_token = tokens.derive(Purpose::HostAuth, &host);

    // The load, then the outage in its midst.
    let clients = scaled(4, 8);
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let load: Vec<_> = (0..clients)
        .map(|index| {
            tokio::spawn(client_loop(
                index,
                port,
                tokens.clone(),
                stop.clone(),
                answers.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(duration(3, 10)).await;
    postgres.stop_server(StopMode::Immediate).await;
    let down_at = Instant::now();
    // Requests caught at the very start wait for a connection (at most the store's acquire timeout, 10 s); once
    // a failure has made the process probe the server and find it down, requests are answered 503 at once.
    let outage = duration(8, 60);
    // Heartbeats are not events: a host's heartbeats are answered from memory while the database is down (the
    // copy of host statuses they are checked against is refreshed by one request at a time, and its failure holds
    // no heartbeat up).
    let mut heartbeats = Vec::new();
    for number in 1..=4 {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let sent = Instant::now();
        let answer = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/host/heartbeat"))
            .bearer_auth(&host_token)
            .json(&serde_json::json!({
                "instance_id": host,
                "timestamp": chrono::Utc::now().to_rfc3339(),
                "heartbeat_number": 1_000_000 + number,
                "total_ram_kb": 32_000_000,
                "free_ram_kb": 16_000_000,
                "avail_ram_kb": 20_000_000,
                "is_dying": false,
            }))
            .timeout(HANG)
            .send()
            .await
            .map(|response| response.status().as_u16());
        heartbeats.push((answer.ok(), sent.elapsed()));
    }
    assert!(
        heartbeats
            .iter()
            .all(|(status, latency)| *status == Some(200) && *latency < Duration::from_secs(1)),
        "heartbeats during the outage are answered 200 within a second: {heartbeats:?}\n{}",
        log_troubles(&[&serve, &worker])
    );
    tokio::time::sleep(outage.saturating_sub(down_at.elapsed())).await;
    let restart_at = Instant::now();
    postgres.start_server().await;
    let up_at = Instant::now();

    // Recovery: an assign that started after the database was back succeeds.
    let recovered = eventually(RECOVERY_BOUND, || {
        let answers = answers.clone();
        async move {
            answers.lock().is_ok_and(|answers| {
                answers.iter().any(|answer| {
                    answer.what == "assign" && answer.started >= up_at && answer.status == Some(200)
                })
            })
        }
    })
    .await;
    assert!(
        recovered,
        "no assign succeeded within {RECOVERY_BOUND:?} of the database's return:\n{}",
        log_troubles(&[&serve, &worker])
    );
    // A stretch of load after the recovery.
    tokio::time::sleep(duration(3, 10)).await;
    stop.store(true, Ordering::Relaxed);
    for client in load {
        client.await.expect("the client ran");
    }
    let answers = std::mem::take(&mut *answers.lock().expect("the answers"));

    // Never a hang, never a 500: every answer is a 200 or a 503 with a JSON error code.
    let wrong: Vec<&Answer> = answers
        .iter()
        .filter(|answer| match answer.status {
            Some(200) => false,
            Some(503) => answer.code.is_none(),
            _ => true,
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "{} answers were neither 200 nor a 503 with a JSON error (None: no answer within {HANG:?}): {:?}\n{}",
        wrong.len(),
        wrong.iter().take(10).collect::<Vec<_>>(),
        log_troubles(&[&serve, &worker])
    );
    // During the outage: a request either answers 503 (with its JSON error code, checked above) or, having waited
    // for a connection while the server came back, succeeds after the restart; none is answered before the database
    // is back otherwise.
    let during: Vec<&Answer> = answers
        .iter()
        .filter(|answer| answer.started >= down_at && answer.started < restart_at)
        .collect();
    let refused = during
        .iter()
        .filter(|answer| answer.status == Some(503))
        .count();
    let ridden_out: Vec<&&Answer> = during
        .iter()
        .filter(|answer| answer.status == Some(200))
        .collect();
    assert!(
        refused > 0,
        "requests during the outage were refused with 503: {during:?}"
    );
    assert!(
        ridden_out
            .iter()
            .all(|answer| answer.started + answer.latency >= restart_at),
        "a request succeeded while the database was down: {ridden_out:?}"
    );
    let mut outage_latencies: Vec<Duration> = during
        .iter()
        .filter(|answer| answer.status == Some(503))
        .map(|answer| answer.latency)
        .collect();
    outage_latencies.sort();
    let p50 = percentile(&outage_latencies, 0.5);
    // Once the outage is known (a second in), refusals come at once, not after the pool's acquire timeout.
    let mut later: Vec<Duration> = during
        .iter()
        .filter(|answer| {
            answer.status == Some(503) && answer.started >= down_at + Duration::from_secs(1)
        })
        .map(|answer| answer.latency)
        .collect();
    later.sort();
    assert!(
        !later.is_empty() && percentile(&later, 0.5) < Duration::from_secs(1),
        "refusals once the outage is known are quick: {later:?}"
    );
    let max = percentile(&outage_latencies, 1.0);
    let first_success = answers
        .iter()
        .filter(|answer| {
            answer.what == "assign" && answer.started >= up_at && answer.status == Some(200)
        })
        .map(|answer| answer.started + answer.latency)
        .min()
        .expect("an assign succeeded after the outage");
    let recovery = first_success.duration_since(up_at);

    // Both processes are still the ones started: nothing exited or was restarted by hand.
    for (name, process) in [("serve", &mut serve), ("worker", &mut worker)] {
        assert!(
            matches!(process.child.try_wait(), Ok(None)),
            "{name} exited: {}",
            process.log_text()
        );
    }
    // The background work recovered too: every projection caught up, the buffer kept.
    let runner = ProjectionRunner::new(store.clone(), whist_projections::all());
    assert!(
        eventually(Duration::from_secs(60), || async {
            log_settled(&runner).await
                && scalar(&store, FREE_SLOTS).await >= i64::from(DESIRED_FREE)
        })
        .await,
        "the projections and the autoscaler recovered: {}",
        log_troubles(&[&serve, &worker])
    );

    // No acknowledged assign lost or doubled.
    let acknowledged: Vec<&str> = answers
        .iter()
        .filter(|answer| answer.what == "assign" && answer.status == Some(200))
        .filter_map(|answer| answer.mandelbox_id.as_deref())
        .collect();
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(payload AS TEXT) FROM events \
         WHERE aggregate_type = 'instance' AND event_type = 'InstanceMandelboxAllocated'",
    )
    .fetch_all(store.any())
    .await
    .expect("the log reads");
    let mut allocations: HashMap<String, usize> = HashMap::new();
    for payload in rows {
        let payload: serde_json::Value = serde_json::from_str(&payload).expect("JSON");
        let mandelbox_id = payload["MandelboxAllocated"]["mandelbox_id"]
            .as_str()
            .expect("an id")
            .to_string();
        *allocations.entry(mandelbox_id).or_default() += 1;
    }
    let lost: Vec<&&str> = acknowledged
        .iter()
        .filter(|mandelbox_id| allocations.get(**mandelbox_id).copied() != Some(1))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged mandelboxes not allocated exactly once: {lost:?}"
    );
    assert!(
        allocations.values().all(|count| *count == 1),
        "a mandelbox was allocated twice"
    );
    let mut disconnects_ok = 0;
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    for answer in &answers {
        let key = format!(
            "{} {}",
            answer.what,
            answer
                .code
                .clone()
                .unwrap_or_else(|| answer.status.unwrap_or(0).to_string())
        );
        *statuses.entry(key).or_default() += 1;
        if answer.what == "disconnect" && answer.status == Some(200) {
            disconnects_ok += 1;
        }
    }
    let events = scalar(&store, "SELECT count(*) FROM events").await;
    store.close().await;
    serve.kill();
    worker.kill();

    record(&Row {
        scenario: "Database outage",
        load: format!(
            "1 serve + 1 worker, {clients} clients: {} assigns acknowledged, {disconnects_ok} disconnects, \
             {} requests in all ({statuses:?})",
            acknowledged.len(),
            answers.len()
        ),
        faults: format!(
            "Postgres stopped (immediate) for {:.1} s: {} requests during it, {refused} answered 503 JSON (latency \
             p50 {:.0} ms, max {:.0} ms), {} waited and succeeded after the restart; first assign 200 {:.2} s \
             after restart",
            restart_at.duration_since(down_at).as_secs_f64(),
            during.len(),
            p50.as_secs_f64() * 1000.0,
            max.as_secs_f64() * 1000.0,
            ridden_out.len(),
            recovery.as_secs_f64()
        ),
        bad_inputs: 0,
        lost: format!(
            "nothing: 0 acknowledged assigns lost or doubled ({} acknowledged, {events} events), 0 hangs, 0 500s, \
             0 process restarts",
            acknowledged.len()
        ),
        seconds: started.elapsed().as_secs_f64(),
    });
}
