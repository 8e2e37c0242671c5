//! Dependency faults: EC2 answering 500s, hanging and losing answers; a host service that stops answering in the
//! middle of a spin-up; the JWKS endpoint down; Stripe timing out. Each scenario proves that the webserver answers
//! within a bound instead of hanging or crashing, that nothing is doubled or half-created while the dependency
//! misbehaves, and that it converges once the dependency is back.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use poem::listener::{Listener, TcpListener};
use poem::web::Data;
use poem::{handler, EndpointExt, Route};
use tokio::sync::watch;
use whist_adapters::store::Database;
use whist_adapters::tls::ServerIdentity;
use whist_tests::fault_proxy::{FaultProxy, Mode};
use whist_tests::moto_hosts::HostImages;
use whist_tests::stripe_fake::StripeFake;
use whist_tests::{
    admin_token, assign_body, eventually, free_port, launch_spec, spawn_app_with, user_token,
    ChildProcess, Moto, MotoHosts, TestApp, TestDatabase,
};

use super::{duration, record, scaled, Row};

const REGION: &str = "us-east-1";
const IMAGE: &str = "ami-12c6146b";

async fn count(database: &Database, sql: &str, bind: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .bind(bind.to_string())
        .fetch_one(database.any())
        .await
        .expect("the store answers")
}

async fn wait(what: &str, timeout: Duration, condition: impl AsyncFn() -> bool) {
    assert!(
        eventually(timeout, || condition()).await,
        "waited {} s for: {what}",
        timeout.as_secs()
    );
}

// ---------------------------------------------------------------------------------------------------------------
// 1. EC2 answering 500s, hanging, and losing answers.
// ---------------------------------------------------------------------------------------------------------------

const FLEET_HASH: &str = "hash-faults";
const FLEET_CAPACITY: u32 = 2;
const BUFFER: i64 = 4;

/// Free slots on active hosts.
async fn free_slots(database: &Database) -> i64 {
    count(
        database,
        "SELECT CAST(COALESCE(SUM(mandelbox_capacity - live_mandelboxes), 0) AS BIGINT) FROM instances \
         WHERE region = $1 AND status = 'ACTIVE'",
        REGION,
    )
    .await
}

/// Compares moto with the records: every live record has exactly one live instance, tagged with its launch and
/// the one recorded; every live instance is a live record's. The number of live records, or what is wrong.
async fn cloud_against_records(database: &Database, moto: &Moto) -> Result<usize, String> {
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT instance_id, status, cloud_instance_id FROM instances WHERE region = $1",
    )
    .bind(REGION)
    .fetch_all(database.any())
    .await
    .map_err(|error| error.to_string())?;
    let live_records: HashMap<String, Option<String>> = rows
        .into_iter()
        .filter(|(_, status, _)| status != "TERMINATED")
        .map(|(instance_id, _, cloud_instance_id)| (instance_id, cloud_instance_id))
        .collect();
    let live: Vec<_> = moto
        .ec2("whist-test")
        .list(REGION)
        .await
        .map_err(|error| error.to_string())?
        .into_iter()
        .filter(|instance| instance.is_live())
        .collect();
    let mut per_launch: HashMap<String, Vec<String>> = HashMap::new();
    for instance in &live {
        let launch_id = instance.launch_id.clone().unwrap_or_default();
        if !live_records.contains_key(&launch_id) {
            return Err(format!("an instance without a live record: {instance:?}"));
        }
        per_launch
            .entry(launch_id)
            .or_default()
            .push(instance.cloud_instance_id.clone());
    }
    for (instance_id, recorded) in &live_records {
        let found = per_launch.get(instance_id).cloned().unwrap_or_default();
        match (found.as_slice(), recorded) {
            ([only], Some(recorded)) if only == recorded => {}
            _ => {
                return Err(format!(
                    "live record {instance_id} (cloud instance {recorded:?}) has live instances {found:?}"
                ))
            }
        }
    }
    Ok(live_records.len())
}

fn fleet_process(
    database: &TestDatabase,
    arguments: &[&str],
    proxy: &FaultProxy,
    http_port: u16,
    host_port: u16,
    extra: &[(&str, String)],
    log: &str,
) -> ChildProcess {
    let mut environment = vec![
        ("DATABASE_URL", database.url.clone().expect("postgres")),
        ("WHIST_CLOUD", "aws".to_string()),
        ("AWS_ENDPOINT_URL", proxy.url.clone()),
        ("WHIST_DEPLOYMENT", "whist-test".to_string()),
        ("ENABLED_REGIONS", serde_json::json!([REGION]).to_string()),
        ("HOST_SERVICE_PORT", host_port.to_string()),
        ("PUBLIC_URL", format!("http://127.0.0.1:{http_port}")),
        ("WHIST_HOST_CAPACITY", FLEET_CAPACITY.to_string()),
        ("DESIRED_FREE_MANDELBOXES", BUFFER.to_string()),
        ("WHIST_REPAIR_INTERVAL_S", "2".to_string()),
    ];
    environment.extend(extra.iter().cloned());
    ChildProcess::start(
        &crate::whist_binary(),
        arguments,
        database.data_dir.path(),
        &environment,
        log,
    )
}

/// One assign by a new developer (served without a subscription); its status and error code.
async fn assign_once(
    client: &reqwest::Client,
    http_port: u16,
    user: &str,
) -> (u16, String, Option<String>) {
    let response = client
        .post(format!("http://127.0.0.1:{http_port}/mandelbox/assign"))
        .bearer_auth(admin_token(user))
        .json(&assign_body(&[REGION], FLEET_HASH, 1))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("the assign is answered within 10 s");
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (
        status,
        body["error"].as_str().unwrap_or_default().to_string(),
        body["mandelbox_id"]
            .as_str()
            .filter(|id| !id.is_empty())
            .map(str::to_string),
    )
}

fn alive(process: &mut ChildProcess) -> bool {
    matches!(process.child.try_wait(), Ok(None))
}

#[tokio::test]
async fn ec2_failing_hanging_and_losing_answers_doubles_no_instance_and_the_fleet_converges_afterwards(
) {
    let started = Instant::now();
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.endpoint).await;
    let database = TestDatabase::postgres().await;
    let store = database.open_with(2).await;
    whist_tests::activate_release(&store, &[REGION], IMAGE, FLEET_HASH).await;
    let http_port = free_port();
    let host_port = free_port();
    let mut serve = fleet_process(
        &database,
        &["serve", "--api-only"],
        &proxy,
        http_port,
        host_port,
        &[
            ("PORT", http_port.to_string()),
            ("WHIST_AUTOSCALE", "false".to_string()),
        ],
        "serve.log",
    );
    let mut worker = fleet_process(
        &database,
        &["worker"],
        &proxy,
        http_port,
        host_port,
        &[("WHIST_AUTOSCALE", "true".to_string())],
        "worker.log",
    );
    serve.wait_healthy(Duration::from_secs(60)).await;
    let _hosts = MotoHosts::start(
        &moto.endpoint,
        "whist-test",
        &[REGION],
        HostImages {
            commit_hashes: HashMap::from([(IMAGE.to_string(), FLEET_HASH.to_string())]),
            capacity: FLEET_CAPACITY,
            port: host_port,
        },
    );
    wait(
        "the warm buffer is up before the faults",
        Duration::from_secs(120),
        async || free_slots(&store).await >= BUFFER,
    )
    .await;

    // The outage: EC2 answers 500s, then takes requests and never answers, then carries out `RunInstances` but
    // loses its answer. Meanwhile developers keep taking mandelboxes, so the autoscaler keeps deciding launches.
    let client = whist_tests::http_client();
    let phase = duration(6, 20);
    let mut assigned = Vec::new();
    let mut refused = 0u64;
    let mut user = 0;
    for (mode, only) in [
        (Mode::Fail500, None),
        (Mode::Hang, None),
        (Mode::LoseAnswer, Some("Action=RunInstances")),
    ] {
        proxy.set_mode_for(mode, only);
        let phase_started = Instant::now();
        loop {
            let enough = phase_started.elapsed() >= phase
                && (mode != Mode::LoseAnswer || proxy.counts().lost_answers > 0);
            // A launch must meet the lost answer; the last phase lasts until one has (bounded).
            if enough || phase_started.elapsed() >= phase + Duration::from_secs(60) {
                break;
            }
            user += 1;
            let (status, error, mandelbox_id) =
                assign_once(&client, http_port, &format!("ec2-fault-user-{user}")).await;
            match (status, error.as_str(), mandelbox_id) {
                (200, _, Some(mandelbox_id)) => assigned.push(mandelbox_id),
                (503, "NO_INSTANCE_AVAILABLE", _) => refused += 1,
                other => panic!("an assign during the EC2 outage answered {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(800)).await;
        }
    }
    let outage = proxy.counts();
    proxy.set_mode(Mode::Pass);
    let recovery_started = Instant::now();

    // Afterwards: the buffer is back, every decision is launched exactly once, and cloud and records agree.
    let last = Mutex::new(Err(String::new()));
    let converged = eventually(Duration::from_secs(150), || {
        let store = &store;
        let moto = &moto;
        let last = &last;
        async move {
            let booting = count(
                store,
                "SELECT count(*) FROM instances WHERE region = $1 AND status = 'PRE_CONNECTION'",
                REGION,
            )
            .await;
            let checked = cloud_against_records(store, moto).await;
            let agree = checked.is_ok();
            if let Ok(mut last) = last.lock() {
                *last = checked;
            }
            booting == 0 && free_slots(store).await >= BUFFER && agree
        }
    })
    .await;
    let recovered_in = recovery_started.elapsed();
    let last = last.into_inner().expect("not poisoned");
    assert!(
        converged,
        "the fleet converged after the outage: {last:?}, {} free slots\n{}",
        free_slots(&store).await,
        worker.log_text()
    );
    let live_records = last.expect("checked");
    let decisions = count(
        &store,
        "SELECT count(*) FROM events WHERE event_type = $1",
        "InstanceLaunchRequested",
    )
    .await;
    let refused_launches = count(
        &store,
        "SELECT count(*) FROM events WHERE event_type = $1",
        "InstanceLaunchFailed",
    )
    .await;
    assert_eq!(
        refused_launches, 0,
        "a 500, a timeout or a lost answer is never taken as EC2 refusing a launch"
    );
    // Every mandelbox assigned during the outage got running on its host.
    for mandelbox_id in &assigned {
        let store = &store;
        wait(
            "a mandelbox assigned during the outage runs",
            Duration::from_secs(30),
            async || {
                count(
                store,
                "SELECT count(*) FROM mandelboxes WHERE mandelbox_id = $1 AND status = 'RUNNING'",
                mandelbox_id,
            )
            .await
                == 1
            },
        )
        .await;
    }
    let logs = format!("{}\n{}", worker.log_text(), serve.log_text());
    assert!(
        alive(&mut worker) && alive(&mut serve),
        "no process died:\n{logs}"
    );
    assert!(!logs.contains("panicked"), "no task panicked:\n{logs}");
    assert!(
        outage.failed_500 > 0 && outage.hung > 0 && outage.lost_answers > 0,
        "every kind of fault met a request: {outage:?}"
    );
    assert!(
        logs.contains("adopting the instance an earlier attempt launched")
            || logs.contains("adopted a launched instance whose launch was never recorded"),
        "the launch whose answer was lost was adopted, not launched again"
    );
    record(&Row {
        scenario: "EC2 faults",
        load: format!(
            "serve + worker, {} assigns during the outage ({} served, {refused} NO_INSTANCE_AVAILABLE), \
             {decisions} launch decisions",
            assigned.len() as u64 + refused,
            assigned.len()
        ),
        faults: format!(
            "EC2 for {} s: {} answered 500, {} hung, {} RunInstances carried out with the answer lost",
            phase.as_secs() * 3,
            outage.failed_500,
            outage.hung,
            outage.lost_answers
        ),
        bad_inputs: 0,
        lost: format!(
            "nothing: converged {} s after EC2 came back, {live_records} live hosts each with exactly one \
             instance, no stray, no launch recorded as failed",
            recovered_in.as_secs()
        ),
        seconds: started.elapsed().as_secs_f64(),
    });
    drop(worker);
    drop(serve);
    store.close().await;
}

// ---------------------------------------------------------------------------------------------------------------
// 2. A host service that stops answering in the middle of a spin-up.
// ---------------------------------------------------------------------------------------------------------------

const HOST_HASH: &str = "hash-hang";

/// What the hanging host saw.
#[derive(Default)]
struct HangState {
    /// `PUT /spin_up_mandelbox` calls taken.
    spin_ups: AtomicU64,
    /// Calls held unanswered right now.
    held: AtomicI64,
    /// When the first spin-up arrived (and the host stopped heartbeating).
    hung_at: Mutex<Option<Instant>>,
    /// When the last heartbeat was sent (wall clock, to compare with the time events are recorded at).
    last_heartbeat: Mutex<Option<chrono::DateTime<chrono::Utc>>>,
}

/// A host service that registers and heartbeats like any other until the first `PUT /spin_up_mandelbox`, then
/// stops answering anything (a hung machine: the port still takes connections, nothing replies).
struct HangingHost {
    instance_id: String,
    state: Arc<HangState>,
    _stop: watch::Sender<bool>,
}

struct Held<'a>(&'a AtomicI64);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[handler]
async fn hang_forever(
    Data((state, stopped)): Data<&(Arc<HangState>, watch::Receiver<bool>)>,
    request: &poem::Request,
) -> &'static str {
    if request.uri().path() == "/spin_up_mandelbox" {
        state.spin_ups.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut hung_at) = state.hung_at.lock() {
            hung_at.get_or_insert_with(Instant::now);
        }
    }
    state.held.fetch_add(1, Ordering::SeqCst);
    let _held = Held(&state.held);
    let mut stopped = stopped.clone();
    let _ = stopped.wait_for(|stopped| *stopped).await;
    ""
}

impl HangingHost {
    async fn start(app: &TestApp, capacity: u32) -> Self {
        let spec = launch_spec(REGION, IMAGE, HOST_HASH);
        let (instance_id, bootstrap) = app.launch(spec.clone()).await;
        let port = app.state.settings.host_service_port;
        let mut bound = None;
        for _ in 0..50 {
            let ip = Ipv4Addr::new(127, 201, rand::random::<u8>(), rand::random::<u8>().max(2));
            // HTTPS, as every host: the handshake completes, then nothing answers.
            let identity = ServerIdentity::self_signed(ip.into()).expect("a certificate");
            if let Ok(acceptor) = TcpListener::bind(format!("{ip}:{port}"))
                .rustls(identity.listener_config())
                .into_acceptor()
                .await
            {
                bound = Some((ip, acceptor, identity.sha256));
                break;
            }
        }
        let (ip, acceptor, fingerprint) = bound.expect("a loopback address for the hanging host");
        let state = Arc::new(HangState::default());
        let (stop, stopped) = watch::channel(false);
        let endpoint = Route::new()
            .at("/spin_up_mandelbox", poem::put(hang_forever))
            .at("/drain_and_shutdown", poem::post(hang_forever))
            .data((state.clone(), stopped.clone()));
        let mut server_stopped = stopped.clone();
        tokio::spawn(async move {
            let _ = poem::Server::new_with_acceptor(acceptor)
                .run_with_graceful_shutdown(
                    endpoint,
                    async move {
                        let _ = server_stopped.wait_for(|stopped| *stopped).await;
                    },
                    Some(Duration::from_millis(100)),
                )
                .await;
        });
        let registered: serde_json::Value = app
            .client
            .post(app.url("/host/register"))
            .bearer_auth(bootstrap)
            .json(&serde_json::json!({
                "instance_id": instance_id,
                "region": spec.region,
                "image_id": spec.image_id,
                "instance_type": spec.instance_type,
                "client_commit_hash": spec.client_commit_hash,
                "ip": ip.to_string(),
                "mandelbox_capacity": capacity,
                "tls_cert_sha256": fingerprint,
            }))
            .send()
            .await
            .expect("registration is answered")
            .json()
            .await
            .expect("a registration body");
        let token = registered["auth_token"]
            .as_str()
            .expect("a host token")
            .to_string();
        let interval =
            Duration::from_secs(registered["heartbeat_interval_s"].as_u64().unwrap_or(1));
        let heartbeats = state.clone();
        let client = app.client.clone();
        let url = app.url("/host/heartbeat");
        let id = instance_id.clone();
        let mut heartbeat_stopped = stopped;
        tokio::spawn(async move {
            for number in 1.. {
                let hung = heartbeats
                    .hung_at
                    .lock()
                    .map(|hung_at| hung_at.is_some())
                    .unwrap_or(true);
                if hung || *heartbeat_stopped.borrow() {
                    return;
                }
                if let Ok(mut last) = heartbeats.last_heartbeat.lock() {
                    *last = Some(chrono::Utc::now());
                }
                let _ = client
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&whist_adapters::simulated_host::heartbeat_body(&id, number))
                    .send()
                    .await;
                tokio::select! {
                    _ = tokio::time::sleep(interval.min(Duration::from_millis(500))) => {}
                    _ = heartbeat_stopped.changed() => return,
                }
            }
        });
        app.wait_for_instance(&instance_id, "ACTIVE").await;
        Self {
            instance_id,
            state,
            _stop: stop,
        }
    }

    fn hung_at(&self) -> Option<Instant> {
        self.state.hung_at.lock().ok().and_then(|hung_at| *hung_at)
    }

    fn last_heartbeat(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        self.state.last_heartbeat.lock().ok().and_then(|last| *last)
    }
}

/// When the host's `InstanceBecameUnresponsive` was recorded, once the log has it.
async fn unresponsive_recorded_at(
    database: &Database,
    instance_id: &str,
) -> Option<chrono::DateTime<chrono::Utc>> {
    let events = database.log().read_after(0, 100_000).await.ok()?;
    let event = events.iter().find(|event| {
        event.aggregate_id == instance_id && event.event_type == "InstanceBecameUnresponsive"
    })?;
    let metadata: serde_json::Value = serde_json::from_str(&event.metadata).ok()?;
    chrono::DateTime::parse_from_rfc3339(metadata["recorded_at"].as_str()?)
        .ok()
        .map(|at| at.with_timezone(&chrono::Utc))
}

/// `POST /mandelbox/assign` for an already subscribed user; (status, mandelbox id, how long it took).
async fn timed_assign(app: &TestApp, user: &str) -> (u16, Option<String>, Duration) {
    let asked = Instant::now();
    let response = app
        .client
        .post(app.url("/mandelbox/assign"))
        .bearer_auth(user_token(user))
        .json(&assign_body(&[REGION], HOST_HASH, 1))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("the assign is answered");
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    (
        status,
        body["mandelbox_id"].as_str().map(str::to_string),
        asked.elapsed(),
    )
}

async fn mandelbox_status(app: &TestApp, user: &str, mandelbox_id: &str) -> String {
    app.mandelbox_view(&user_token(user), mandelbox_id).await["status"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_host_that_hangs_mid_spin_up_blocks_nothing_and_its_mandelboxes_end_and_free_their_slots()
{
    let started = Instant::now();
    let heartbeat_timeout = Duration::from_secs(3);
    let stale_timeout = Duration::from_secs(6);
    // The sweeper runs every 5 s (not configurable); a host call times out after 10 s (`host_client`).
    let sweep = Duration::from_secs(5);
    let database = TestDatabase::postgres().await;
    let mut settings = database.settings();
    settings.heartbeat_timeout = heartbeat_timeout;
    settings.stale_allocation_timeout = stale_timeout;
    let app = spawn_app_with(&database, settings).await;
    let on_hung: Vec<String> = (0..3).map(|index| format!("auth0|hung-{index}")).collect();
    let on_healthy: Vec<String> = (0..scaled(6, 12))
        .map(|index| format!("auth0|healthy-{index}"))
        .collect();
    for user in on_hung.iter().chain(&on_healthy) {
        app.subscribe(user).await;
    }

    // The only host takes three mandelboxes; it hangs at the first spin-up the reconciler sends it.
    let hung = HangingHost::start(&app, on_hung.len() as u32).await;
    let mut hung_mandelboxes = Vec::new();
    for user in &on_hung {
        let (status, mandelbox_id, took) = timed_assign(&app, user).await;
        assert_eq!(status, 200, "an assign to the host that is about to hang");
        assert!(
            took < Duration::from_secs(2),
            "the assign never waits on the host: {took:?}"
        );
        hung_mandelboxes.push(mandelbox_id.expect("a mandelbox id"));
    }
    wait(
        "the reconciler's spin-up reaches the host",
        Duration::from_secs(10),
        async || hung.hung_at().is_some(),
    )
    .await;
    let hung_at = hung.hung_at().expect("hung");

    // Another host's spin-ups proceed while the hung host holds the reconciler's calls.
    let healthy = app
        .active_host(launch_spec(REGION, IMAGE, HOST_HASH), 16)
        .await;
    let mut healthy_mandelboxes = Vec::new();
    for user in &on_healthy {
        let (status, mandelbox_id, took) = timed_assign(&app, user).await;
        assert_eq!(status, 200, "an assign to the healthy host");
        assert!(took < Duration::from_secs(2), "{took:?}");
        healthy_mandelboxes.push((user.clone(), mandelbox_id.expect("a mandelbox id")));
    }
    for (user, mandelbox_id) in &healthy_mandelboxes {
        let app = &app;
        wait(
            "a mandelbox on the healthy host runs",
            Duration::from_secs(10),
            async || mandelbox_status(app, user, mandelbox_id).await == "RUNNING",
        )
        .await;
    }
    let healthy_running_after = hung_at.elapsed();
    let held_meanwhile = hung.state.held.load(Ordering::SeqCst);
    assert!(
        held_meanwhile >= 1,
        "the healthy host's mandelboxes ran while the hung host still held the reconciler's calls \
         ({healthy_running_after:?} after it hung)"
    );

    // The hung host becomes unresponsive once silent for HEARTBEAT_TIMEOUT_S (not before), within a sweep.
    let store = &app.state.database;
    let unresponsive_at = Mutex::new(None);
    wait(
        "the hung host becomes unresponsive",
        heartbeat_timeout + sweep * 3,
        async || {
            let found = unresponsive_recorded_at(store, &hung.instance_id).await;
            let seen = found.is_some();
            if let Ok(mut at) = unresponsive_at.lock() {
                *at = found;
            }
            seen
        },
    )
    .await;
    let unresponsive_at = unresponsive_at
        .into_inner()
        .expect("not poisoned")
        .expect("seen");
    let silent_for = (unresponsive_at
        - hung.last_heartbeat().expect("it heartbeat before hanging"))
    .to_std()
    .unwrap_or_default();
    assert!(
        silent_for >= heartbeat_timeout
            && silent_for <= heartbeat_timeout + sweep + Duration::from_secs(2),
        "judged unresponsive after HEARTBEAT_TIMEOUT_S of silence, within a sweep: {silent_for:?}"
    );
    // Its mandelboxes end and their slots (the host's and the users') free, within the sweep bounds.
    let bound = heartbeat_timeout.min(stale_timeout) + sweep * 2 + Duration::from_secs(5);
    for (user, mandelbox_id) in on_hung.iter().zip(&hung_mandelboxes) {
        let app = &app;
        wait(
            "a mandelbox on the hung host ends",
            bound.saturating_sub(hung_at.elapsed()),
            async || mandelbox_status(app, user, mandelbox_id).await == "DEAD",
        )
        .await;
    }
    let dead_after = hung_at.elapsed();
    app.wait_for_live(&hung.instance_id, 0).await;
    let (mandelbox, _) = app
        .state
        .services
        .mandelboxes
        .load_from_history(&hung_mandelboxes[0])
        .await
        .expect("loads");
    let end_reason = format!("{:?}", mandelbox.end_reason);
    // The sweep that marked it may not see its own mark in the read model yet: the next one decides the end.
    wait("the hung host is being terminated", sweep * 2 + Duration::from_secs(2), async || {
        count(
            store,
            "SELECT count(*) FROM instances WHERE instance_id = $1 AND status IN ('TERMINATING', 'TERMINATED')",
            &hung.instance_id,
        )
        .await
            == 1
    })
    .await;
    for user in &on_hung {
        let (status, _, _) = timed_assign(&app, user).await;
        assert_eq!(
            status, 200,
            "the user's slot was freed: a new assign is served"
        );
    }
    for (user, mandelbox_id) in &healthy_mandelboxes {
        assert_eq!(
            mandelbox_status(&app, user, mandelbox_id).await,
            "RUNNING",
            "the healthy host's mandelboxes are untouched"
        );
    }
    app.wait_for_instance(&healthy.instance_id, "ACTIVE").await;
    record(&Row {
        scenario: "host stops mid-spin-up",
        load: format!(
            "{} assigns on 2 hosts, then {} again for the hung host's users",
            on_hung.len() + on_healthy.len(),
            on_hung.len()
        ),
        faults: format!(
            "1 host hung at its first spin-up: {} spin-up calls never answered, heartbeats stopped",
            hung.state.spin_ups.load(Ordering::SeqCst)
        ),
        bad_inputs: 0,
        lost: format!(
            "nothing: the other host's {} mandelboxes ran {:.1} s after the hang; the hung host unresponsive \
             after {:.1} s of silence; its {} mandelboxes DEAD ({end_reason}) {:.1} s after the hang, slots freed",
            healthy_mandelboxes.len(),
            healthy_running_after.as_secs_f64(),
            silent_for.as_secs_f64(),
            hung_mandelboxes.len(),
            dead_after.as_secs_f64()
        ),
        seconds: started.elapsed().as_secs_f64(),
    });
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// 3. The JWKS endpoint goes down.
// ---------------------------------------------------------------------------------------------------------------

/// `regions_status` for `token`, and how long it took.
async fn timed_status(app: &TestApp, token: &str) -> (u16, Duration) {
    let asked = Instant::now();
    let status = crate::auth::regions_status(app, token).await;
    (status, asked.elapsed())
}

#[tokio::test]
async fn with_the_jwks_endpoint_down_cached_keys_work_unknown_kids_answer_401_promptly_and_a_rotated_key_works_after(
) {
    use crate::auth::{claims, keys, serve_jwks, sign, AUDIENCE, ISSUER};
    let started = Instant::now();
    let (tenant, rotated, _) = keys();
    let (jwks_url, published, _server) = serve_jwks(vec![tenant.jwk.clone()]).await;
    let base = jwks_url
        .strip_suffix("/.well-known/jwks.json")
        .expect("the JWKS path");
    let proxy = FaultProxy::start(base).await;
    let (_database, app) =
        crate::auth::app_with_auth0(&format!("{}/.well-known/jwks.json", proxy.url), "prod").await;
    let good = sign(
        tenant,
        &claims("auth0|dora", "openid", ISSUER, AUDIENCE, 600),
    );
    let new_key = sign(
        rotated,
        &claims("auth0|dora", "openid", ISSUER, AUDIENCE, 600),
    );
    assert_eq!(
        timed_status(&app, &good).await.0,
        404,
        "the keys are fetched"
    );
    // The tenant rotates while its JWKS endpoint is unreachable.
    *published.lock().expect("lock") = serde_json::json!({ "keys": [tenant.jwk, rotated.jwk] });

    let per_phase = scaled(40usize, 400);
    let mut served = 0usize;
    let mut unknown_kid_slowest = Duration::ZERO;
    // The JWKS client's own timeout is 5 s: an unknown kid waits at most that for a fetch that cannot succeed.
    let unknown_kid_bound = Duration::from_secs(7);
    for mode in [Mode::Hang, Mode::Fail500] {
        proxy.set_mode(mode);
        let faulted_before = proxy.counts().faulted();
        // An unknown kid makes the server try the JWKS (in vain; after a failed fetch, again 2 s later at the
        // soonest), while tokens with cached keys keep being served.
        let unknown = {
            let app = &app;
            let new_key = &new_key;
            let proxy = &proxy;
            async move {
                let mut slowest = Duration::ZERO;
                let tried = Instant::now();
                loop {
                    let (status, took) = timed_status(app, new_key).await;
                    assert_eq!(
                        status, 401,
                        "an unknown kid while the JWKS is down ({mode:?})"
                    );
                    slowest = slowest.max(took);
                    if proxy.counts().faulted() > faulted_before
                        || tried.elapsed() > Duration::from_secs(10)
                    {
                        return (status, slowest);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        let cached = async {
            let mut slowest = Duration::ZERO;
            for _ in 0..per_phase {
                let (status, took) = timed_status(&app, &good).await;
                assert_eq!(
                    status, 404,
                    "a token with a cached key while the JWKS is down ({mode:?})"
                );
                slowest = slowest.max(took);
            }
            slowest
        };
        let ((status, took), slowest_cached) = tokio::join!(unknown, cached);
        assert_eq!(
            status, 401,
            "an unknown kid while the JWKS is down ({mode:?})"
        );
        assert!(took < unknown_kid_bound, "answered in {took:?} ({mode:?})");
        assert!(
            proxy.counts().faulted() > faulted_before,
            "a JWKS fetch met the fault ({mode:?})"
        );
        assert!(
            slowest_cached < Duration::from_secs(1),
            "cached keys never wait on the JWKS: {slowest_cached:?} ({mode:?})"
        );
        unknown_kid_slowest = unknown_kid_slowest.max(took);
        served += per_phase;
        // Asked again at once: still a prompt 401, not a second wait.
        let (status, took) = timed_status(&app, &new_key).await;
        assert_eq!(status, 401);
        assert!(took < unknown_kid_bound, "{took:?}");
    }
    let faults = proxy.counts();

    // The endpoint is back: the rotated key works, within a few seconds.
    proxy.set_mode(Mode::Pass);
    let back = Instant::now();
    wait(
        "the rotated key works once the JWKS is back",
        Duration::from_secs(10),
        async || timed_status(&app, &new_key).await.0 == 404,
    )
    .await;
    let rotated_in = back.elapsed();
    assert_eq!(
        timed_status(&app, &good).await.0,
        404,
        "the old key still works"
    );
    record(&Row {
        scenario: "JWKS down",
        load: format!("{served} requests with cached keys, unknown-kid tokens meanwhile"),
        faults: format!(
            "JWKS endpoint hanging ({} fetches hung), then answering 500 ({} fetches)",
            faults.hung, faults.failed_500
        ),
        bad_inputs: 0,
        lost: format!(
            "nothing: every cached-key request 404 as it should (none 401/500), unknown kid 401 in at most \
             {:.1} s, rotated key accepted {:.1} s after the JWKS came back",
            unknown_kid_slowest.as_secs_f64(),
            rotated_in.as_secs_f64()
        ),
        seconds: started.elapsed().as_secs_f64(),
    });
    app.stop().await;
}

// ---------------------------------------------------------------------------------------------------------------
// 4. Stripe timing out on `GET /payment_portal_url`.
// ---------------------------------------------------------------------------------------------------------------

/// `GET /payment_portal_url` for `user`; (status, body, how long it took).
async fn portal_url(app: &TestApp, user: &str) -> (u16, serde_json::Value, Duration) {
    let asked = Instant::now();
    let response = app
        .client
        .get(app.url("/payment_portal_url"))
        .bearer_auth(user_token(user))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .expect("the portal URL request is answered");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or_default();
    (status, body, asked.elapsed())
}

#[tokio::test]
async fn a_stripe_that_times_out_answers_502_within_the_bound_records_nothing_and_creates_one_customer_per_user(
) {
    let started = Instant::now();
    let database = TestDatabase::postgres().await;
    let fake = StripeFake::start("sk_test_whist").await;
    let mut settings = database.settings();
    settings.stripe.secret = Some(whist_adapters::config::Secret::new(
        "sk_test_whist".to_string(),
    ));
    settings.stripe.price_id = Some("price_whist_monthly".to_string());
    settings.stripe.api_base = fake.base_url.clone();
    let app = spawn_app_with(&database, settings).await;
    let users: Vec<String> = (0..scaled(4, 16))
        .map(|index| {
            format!(
                "auth0|stripe-slow-{index}-{}",
                uuid::Uuid::new_v4().simple()
            )
        })
        .collect();

    // Stripe does the work but answers after 15 s, longer than the client waits (10 s, `API_TIMEOUT`).
    fake.set_delay(Some(Duration::from_secs(15)));
    let bound = Duration::from_secs(13);
    let answers = futures::future::join_all(users.iter().map(|user| portal_url(&app, user))).await;
    let mut slowest = Duration::ZERO;
    for (status, body, took) in &answers {
        assert!(
            *status == 502 || *status == 503,
            "a clear 502/503 while Stripe hangs: {status} {body}"
        );
        assert_eq!(body["error"], "STRIPE_UNAVAILABLE", "a JSON error code");
        assert!(*took < bound, "answered within the bound: {took:?}");
        slowest = slowest.max(*took);
    }
    let store = &app.state.database;
    let recorded = count(
        store,
        "SELECT count(*) FROM events WHERE aggregate_type IN ('subscription', $1)",
        "stripe_customer",
    )
    .await;
    assert_eq!(
        recorded, 0,
        "no customer or link is recorded by a failed call"
    );
    let created_while_slow = fake.customers().len();

    // Stripe recovers: every user gets a URL, and the customer Stripe made during the outage is the one used.
    fake.set_delay(None);
    for user in &users {
        let (status, body, _) = portal_url(&app, user).await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body["url"]
                .as_str()
                .is_some_and(|url| url.starts_with("https://checkout.stripe.test/")),
            "{body}"
        );
    }
    let customers = fake.customers();
    assert_eq!(
        customers.len(),
        users.len(),
        "exactly one Stripe customer per user (the idempotency key replayed the first): {customers:?}"
    );
    let mut linked = std::collections::HashSet::new();
    for user in &users {
        let (subscription, _) = app
            .state
            .services
            .subscriptions
            .load_from_history(user)
            .await
            .expect("loads");
        let customer = subscription.customer_id.expect("the customer is linked");
        assert!(
            customers.contains(&customer),
            "{customer} is the customer made for {user}"
        );
        linked.insert(customer);
    }
    assert_eq!(linked.len(), users.len(), "no two users share a customer");
    record(&Row {
        scenario: "Stripe timeout",
        load: format!("{} users asking for the payment portal at once", users.len()),
        faults: format!(
            "Stripe answering after 15 s (client timeout 10 s): {} calls timed out",
            answers.len()
        ),
        bad_inputs: 0,
        lost: format!(
            "nothing: 502 STRIPE_UNAVAILABLE in at most {:.1} s, no customer or link recorded by a failed call; \
             after recovery {} customers for {} users ({created_while_slow} made during the outage, reused)",
            slowest.as_secs_f64(),
            customers.len(),
            users.len()
        ),
        seconds: started.elapsed().as_secs_f64(),
    });
    app.stop().await;
}
