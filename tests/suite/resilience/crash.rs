//! Crash: two `whist serve` processes (one with the background work, one `--api-only`) and one `whist worker` on
//! one Postgres database, with moto's EC2 and host services booting on its instances, under a load of assigns,
//! disconnects and heartbeats, while each of the three processes is killed with SIGKILL at a random moment and
//! started again, several rounds. Afterwards, with everything running and quiet, it proves that nothing was lost or
//! doubled: every acknowledged assign is allocated exactly once in the log, every event has one position, the hash
//! chain holds, every rebuildable projection equals its rebuild; no slot was ever held twice and no host went over
//! capacity (replaying the log); and the cloud matches the records (no instance without a live record, no live
//! record without its instance).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use whist_adapters::store::Database;
use whist_adapters::tokens::{Purpose, Tokens};
use whist_projections::ProjectionRunner;
use whist_tests::moto_hosts::HostImages;
use whist_tests::{
    admin_token, assign_body, eventually, free_port, ChildProcess, Moto, MotoHosts, TestDatabase,
};

use super::{duration, log_settled, record, scalar, scaled, Row};

const REGION: &str = "us-east-1";
const IMAGE: &str = "ami-12c6146b";
const HASH: &str = "hash-crash";
const CAPACITY: u32 = 4;
const DESIRED_FREE: u32 = 6;
const DEPLOYMENT: &str = "whist-test";
/// A request that has not answered after this long counts as unanswered (the process was killed under it).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// A disconnect that has been retried this long without being recorded is a failure, not a retry (a restart takes
/// seconds): the scenario reports it instead of waiting for it forever.
const DISCONNECT_PATIENCE: Duration = Duration::from_secs(60);
/// Free slots on active hosts, from the `instances` read model.
const FREE_SLOTS: &str =
    "SELECT CAST(COALESCE(SUM(mandelbox_capacity - live_mandelboxes), 0) AS BIGINT) \
     FROM instances WHERE status = 'ACTIVE'";

/// A round-robin TCP balancer on loopback in front of the two servers: what hosts reach the webserver through (its
/// `PUBLIC_URL`), so that a host keeps registering and heartbeating while one server is down, as behind a real
/// load balancer. A connection goes to the first server, in turn, that accepts it.
struct Balancer {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Balancer {
    async fn start(backends: Vec<u16>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the balancer binds");
        let port = listener.local_addr().expect("an address").port();
        let task = tokio::spawn(async move {
            let mut turn = 0usize;
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                turn += 1;
                let first = turn;
                let backends = backends.clone();
                tokio::spawn(async move {
                    for offset in 0..backends.len() {
                        let backend = backends[(first + offset) % backends.len()];
                        if let Ok(mut outbound) =
                            tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                        {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                });
            }
        });
        Self { port, task }
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One of the three processes under test, and how to start it again.
struct Role {
    name: &'static str,
    arguments: &'static [&'static str],
    /// `Some` for a server (its HTTP port).
    port: Option<u16>,
    starts: usize,
    process: Option<ChildProcess>,
}

struct Cluster {
    database: TestDatabase,
    environment: Vec<(&'static str, String)>,
    roles: Vec<Role>,
    /// Every log of every process, kept for a failure's message.
    logs: Vec<std::path::PathBuf>,
}

impl Cluster {
    async fn start_role(&mut self, index: usize) {
        let role = &mut self.roles[index];
        let mut environment = self.environment.clone();
        if let Some(port) = role.port {
            environment.push(("PORT", port.to_string()));
        }
        let mut process = ChildProcess::start(
            &crate::whist_binary(),
            role.arguments,
            self.database.data_dir.path(),
            &environment,
            &format!("{}-{}.log", role.name, role.starts),
        );
        role.starts += 1;
        self.logs.push(process.log.clone());
        if role.port.is_some() {
            process.wait_healthy(Duration::from_secs(90)).await;
        }
        role.process = Some(process);
    }

    fn kill_role(&mut self, index: usize) {
        if let Some(process) = self.roles[index].process.take() {
            process.kill();
        }
    }

    /// Warnings and errors of every process so far (for a failure's message).
    fn troubles(&self) -> String {
        whist_tests::log_troubles(self.logs.iter().map(std::path::PathBuf::as_path))
    }
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    /// Mandelboxes whose assign answered 200.
    acknowledged: Vec<String>,
    /// Assigns that got no answer (connection refused or reset, or timed out): a killed process.
    unanswered_assigns: u64,
    /// 503 answers to assigns, by error code.
    refused: BTreeMap<String, u64>,
    /// Mandelboxes whose disconnect answered 200.
    disconnected: Vec<String>,
    /// Disconnect attempts that got no answer or a 503 (retried).
    disconnect_retries: u64,
    /// Anything else: a 500, a 4xx, a body that is not JSON. Must stay empty.
    unexpected: Vec<String>,
}

/// One client: fresh users, each assign followed by the protocol server's disconnect, until `stop`.
async fn client_loop(
    client_index: usize,
    ports: Vec<u16>,
    tokens: Arc<Tokens>,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) {
    let http = whist_tests::http_client();
    let mut iteration = 0usize;
    while !stop.load(Ordering::Relaxed) {
        iteration += 1;
        let port = ports[(client_index + iteration) % ports.len()];
        let user = format!("crash-user-{client_index}-{iteration}");
        let answer = http
            .post(format!("http://127.0.0.1:{port}/mandelbox/assign"))
            // Developers are served without a subscription: this scenario is about crashes, not billing.
            .bearer_auth(admin_token(&user))
            .json(&assign_body(&[REGION], HASH, iteration as i64))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        let response = match answer {
            Ok(response) => response,
            Err(_) => {
                if let Ok(mut tally) = tally.lock() {
                    tally.unanswered_assigns += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let status = response.status().as_u16();
        let body: serde_json::Value = match response.json().await {
            Ok(body) => body,
            Err(_) if status == 200 => {
                // The answer was cut off while the body came: the outcome is unknown, as for no answer.
                if let Ok(mut tally) = tally.lock() {
                    tally.unanswered_assigns += 1;
                }
                continue;
            }
            Err(_) => serde_json::Value::Null,
        };
        let mandelbox_id = match (status, body["mandelbox_id"].as_str()) {
            (200, Some(mandelbox_id)) => mandelbox_id.to_string(),
            (503, _) if body["error"].is_string() => {
                let code = body["error"].as_str().unwrap_or_default().to_string();
                if let Ok(mut tally) = tally.lock() {
                    *tally.refused.entry(code).or_default() += 1;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            _ => {
                if let Ok(mut tally) = tally.lock() {
                    tally
                        .unexpected
                        .push(format!("assign on :{port}: {status} {body}"));
                }
                continue;
            }
        };
        if let Ok(mut tally) = tally.lock() {
            tally.acknowledged.push(mandelbox_id.clone());
        }
        // The user leaves: the protocol server reports the disconnect, retrying (on either server) until it is
        // recorded, as it would while the webserver restarts.
        let secret = tokens.derive(Purpose::Protocol, &mandelbox_id);
        let mut attempt = 0usize;
        let disconnecting = Instant::now();
        let mut last_refusal = String::new();
        loop {
            attempt += 1;
            if disconnecting.elapsed() > DISCONNECT_PATIENCE {
                if let Ok(mut tally) = tally.lock() {
                    tally.unexpected.push(format!(
                        "disconnect of {mandelbox_id} not recorded after {attempt} attempts in {} s; last: {last_refusal}",
                        DISCONNECT_PATIENCE.as_secs()
                    ));
                }
                break;
            }
            let port = ports[(client_index + iteration + attempt) % ports.len()];
            let answer = http
                .post(format!(
                    "http://127.0.0.1:{port}/mandelbox/{mandelbox_id}/disconnect"
                ))
                .bearer_auth(&secret)
                .timeout(REQUEST_TIMEOUT)
                .send()
                .await;
            let answer = match answer {
                Ok(response) => {
                    let status = response.status().as_u16();
                    if status != 200 {
                        last_refusal =
                            format!("{status} {}", response.text().await.unwrap_or_default());
                    }
                    Ok(status)
                }
                Err(error) => {
                    last_refusal = error.to_string();
                    Err(error)
                }
            };
            match answer {
                Ok(200) => {
                    if let Ok(mut tally) = tally.lock() {
                        tally.disconnected.push(mandelbox_id.clone());
                    }
                    break;
                }
                Ok(503) | Err(_) => {
                    if let Ok(mut tally) = tally.lock() {
                        tally.disconnect_retries += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(other) => {
                    if let Ok(mut tally) = tally.lock() {
                        tally
                            .unexpected
                            .push(format!("disconnect of {mandelbox_id} on :{port}: {other}"));
                    }
                    break;
                }
            }
        }
    }
}

/// Live instances of the deployment in moto: launch id → cloud instance id (and instances without a launch id).
async fn live_in_moto(moto: &Moto) -> Vec<(Option<String>, String)> {
    moto.ec2(DEPLOYMENT)
        .list(REGION)
        .await
        .map(|instances| {
            instances
                .into_iter()
                .filter(|instance| instance.is_live())
                .map(|instance| (instance.launch_id, instance.cloud_instance_id))
                .collect()
        })
        .unwrap_or_default()
}

/// Live records (not TERMINATED): instance id → its cloud instance id, if launched.
async fn live_records(database: &Database) -> BTreeMap<String, Option<String>> {
    sqlx::query_as::<_, (String, Option<String>)>(
        "SELECT instance_id, cloud_instance_id FROM instances WHERE status <> 'TERMINATED'",
    )
    .fetch_all(database.any())
    .await
    .map(|rows| rows.into_iter().collect())
    .unwrap_or_default()
}

/// Whether the cloud and the records agree exactly: one live instance per live record, its own, and none other.
async fn cloud_matches_records(moto: &Moto, database: &Database) -> (bool, usize, usize) {
    let cloud = live_in_moto(moto).await;
    let records = live_records(database).await;
    let orphans = cloud
        .iter()
        .filter(|(launch_id, cloud_instance_id)| {
            launch_id
                .as_ref()
                .and_then(|launch_id| records.get(launch_id))
                .is_none_or(|recorded| recorded.as_deref() != Some(cloud_instance_id.as_str()))
        })
        .count();
    let launched: BTreeSet<&str> = cloud
        .iter()
        .filter_map(|(launch_id, _)| launch_id.as_deref())
        .collect();
    let missing = records
        .keys()
        .filter(|instance_id| !launched.contains(instance_id.as_str()))
        .count();
    (orphans == 0 && missing == 0, orphans, missing)
}

/// What replaying the instances' slot events in log order shows.
struct Slots {
    /// Allocations of a mandelbox its host already held.
    twice: usize,
    /// Allocations that took a host over its capacity.
    over: usize,
    /// Allocations per mandelbox.
    allocations: HashMap<String, usize>,
    /// Mandelboxes still holding a slot at the end.
    held: BTreeSet<String>,
}

/// Replays the instances' slot events in log order.
async fn replay_slots(database: &Database) -> Slots {
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT aggregate_id, event_type, CAST(payload AS TEXT) FROM events \
         WHERE aggregate_type = 'instance' \
           AND event_type IN ('InstanceMandelboxAllocated', 'InstanceMandelboxFreed', 'InstanceRegistered') \
         ORDER BY position",
    )
    .fetch_all(database.any())
    .await
    .expect("the log reads");
    let mut capacity: HashMap<String, usize> = HashMap::new();
    let mut live: HashMap<String, BTreeSet<String>> = HashMap::new();
    let mut allocations: HashMap<String, usize> = HashMap::new();
    let (mut twice, mut over) = (0, 0);
    for (instance_id, event_type, payload) in rows {
        let payload: serde_json::Value = serde_json::from_str(&payload).expect("JSON");
        match event_type.as_str() {
            "InstanceRegistered" => {
                let slots = payload["Registered"]["mandelbox_capacity"]
                    .as_u64()
                    .expect("a capacity");
                capacity.insert(instance_id, slots as usize);
            }
            "InstanceMandelboxAllocated" => {
                let mandelbox_id = payload["MandelboxAllocated"]["mandelbox_id"]
                    .as_str()
                    .expect("an id")
                    .to_string();
                *allocations.entry(mandelbox_id.clone()).or_default() += 1;
                let held = live.entry(instance_id.clone()).or_default();
                if !held.insert(mandelbox_id) {
                    twice += 1;
                }
                let slots = capacity.get(&instance_id).copied().unwrap_or(0);
                if held.len() > slots {
                    over += 1;
                }
            }
            _ => {
                let mandelbox_id = payload["MandelboxFreed"]["mandelbox_id"]
                    .as_str()
                    .expect("an id");
                if let Some(held) = live.get_mut(&instance_id) {
                    held.remove(mandelbox_id);
                }
            }
        }
    }
    Slots {
        twice,
        over,
        allocations,
        held: live.into_values().flatten().collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_killed_at_random_under_load_lose_and_double_nothing() {
    let started = Instant::now();
    let moto = Moto::start().await;
    let database = TestDatabase::postgres_for(60).await;
    let store = database.open_with(4).await;
    whist_tests::activate_release(&store, &[REGION], IMAGE, HASH).await;
    let tokens = Arc::new(Tokens::load(&store).await.expect("the server key"));
    let host_service_port = whist_tests::host_service_port();
    let server_ports = vec![free_port(), free_port()];
    let balancer = Balancer::start(server_ports.clone()).await;
    let _hosts = MotoHosts::start(
        &moto.endpoint,
        DEPLOYMENT,
        &[REGION],
        HostImages {
            commit_hashes: HashMap::from([(IMAGE.to_string(), HASH.to_string())]),
            capacity: CAPACITY,
            port: host_service_port,
        },
    );
    let environment = vec![
        ("DATABASE_URL", database.url.clone().expect("Postgres")),
        ("PUBLIC_URL", format!("http://127.0.0.1:{}", balancer.port)),
        ("WHIST_CLOUD", "aws".to_string()),
        ("AWS_ENDPOINT_URL", moto.endpoint.clone()),
        ("WHIST_DEPLOYMENT", DEPLOYMENT.to_string()),
        ("ENABLED_REGIONS", serde_json::json!([REGION]).to_string()),
        ("WHIST_AUTOSCALE", "true".to_string()),
        ("DESIRED_FREE_MANDELBOXES", DESIRED_FREE.to_string()),
        ("WHIST_HOST_CAPACITY", CAPACITY.to_string()),
        ("HOST_SERVICE_PORT", host_service_port.to_string()),
        ("ASSIGN_RATE_LIMIT_PER_MINUTE", "0".to_string()),
        ("ASSIGN_RATE_LIMIT_PER_IP_PER_MINUTE", "0".to_string()),
        // A killed process's claims on side-effect jobs are taken over within seconds.
        ("WHIST_JOB_CLAIM_S", "3".to_string()),
        ("WHIST_REPAIR_INTERVAL_S", "2".to_string()),
        ("WHIST_DRAINED_HOST_TIMEOUT_S", "2".to_string()),
        ("HEARTBEAT_TIMEOUT_S", "30".to_string()),
        ("RUST_LOG", "warn".to_string()),
    ];
    let mut cluster = Cluster {
        database,
        environment,
        roles: vec![
            Role {
                name: "serve",
                arguments: &["serve"],
                port: Some(server_ports[0]),
                starts: 0,
                process: None,
            },
            Role {
                name: "serve-api-only",
                arguments: &["serve", "--api-only"],
                port: Some(server_ports[1]),
                starts: 0,
                process: None,
            },
            Role {
                name: "worker",
                arguments: &["worker"],
                port: None,
                starts: 0,
                process: None,
            },
        ],
        logs: Vec::new(),
    };
    for index in 0..cluster.roles.len() {
        cluster.start_role(index).await;
    }
    assert!(
        eventually(Duration::from_secs(90), || async {
            scalar(&store, FREE_SLOTS).await >= i64::from(DESIRED_FREE)
        })
        .await,
        "the warm buffer fills: {}",
        cluster.troubles()
    );

    // The load.
    let clients = scaled(6, 10);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let load: Vec<_> = (0..clients)
        .map(|index| {
            tokio::spawn(client_loop(
                index,
                server_ports.clone(),
                tokens.clone(),
                stop.clone(),
                tally.clone(),
            ))
        })
        .collect();

    // The faults: every round kills each process once, in a random order, at a random moment, and starts it again
    // after a random pause.
    let rounds = scaled(2, 6);
    let mut kills = 0;
    for _ in 0..rounds {
        let mut order: Vec<usize> = (0..cluster.roles.len()).collect();
        for position in (1..order.len()).rev() {
            let other = rand::rng().random_range(0..=position);
            order.swap(position, other);
        }
        for victim in order {
            let (before, down) = {
                let mut rng = rand::rng();
                (
                    Duration::from_millis(rng.random_range(1_000..4_000)),
                    Duration::from_millis(rng.random_range(200..2_000)),
                )
            };
            tokio::time::sleep(before).await;
            cluster.kill_role(victim);
            kills += 1;
            tokio::time::sleep(down).await;
            cluster.start_role(victim).await;
        }
    }
    // A stretch of calm load after the last restart, then the load stops.
    tokio::time::sleep(duration(3, 10)).await;
    stop.store(true, Ordering::Relaxed);
    for client in load {
        client.await.expect("the client ran");
    }
    let tally = std::mem::take(&mut *tally.lock().expect("the tally"));
    assert!(
        tally.unexpected.is_empty(),
        "unexpected answers: {:?}\n{}",
        tally.unexpected,
        cluster.troubles()
    );
    assert!(
        tally.acknowledged.len() >= clients,
        "the load got through: {} assigns acknowledged, {:?} refused, {} unanswered\n{}",
        tally.acknowledged.len(),
        tally.refused,
        tally.unanswered_assigns,
        cluster.troubles()
    );

    // Quiet: every projection caught up.
    let runner = ProjectionRunner::new(store.clone(), whist_projections::all());
    assert!(
        eventually(Duration::from_secs(60), || async {
            log_settled(&runner).await
        })
        .await,
        "the log and the projections settle: {}",
        cluster.troubles()
    );

    // (a) Nothing lost or doubled.
    let Slots {
        twice,
        over,
        allocations,
        held,
    } = replay_slots(&store).await;
    let acknowledged: BTreeSet<&String> = tally.acknowledged.iter().collect();
    assert_eq!(
        acknowledged.len(),
        tally.acknowledged.len(),
        "two assigns were answered with the same mandelbox"
    );
    let lost: Vec<&&String> = acknowledged
        .iter()
        .filter(|mandelbox_id| allocations.get(**mandelbox_id).copied() != Some(1))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged mandelboxes not allocated exactly once: {lost:?}"
    );
    let doubled = allocations.values().filter(|count| **count != 1).count();
    assert_eq!(doubled, 0, "mandelboxes allocated more than once");
    // An allocation nobody heard of can only be an assign whose answer a kill cut off.
    let unheard = allocations.len() - acknowledged.len();
    assert!(
        unheard as u64 <= tally.unanswered_assigns,
        "{unheard} allocations without an acknowledged assign, but only {} assigns went unanswered",
        tally.unanswered_assigns
    );
    let events = scalar(&store, "SELECT count(*) FROM events").await;
    let positions = scalar(&store, "SELECT count(DISTINCT position) FROM events").await;
    assert_eq!(events, positions, "every event has a position of its own");
    // Every chain is whole after the kills: each event names its cause, and a cause other than the chain's root
    // (the request or pass whose id is the correlation id) is the position of an event of the same chain.
    let uncaused = scalar(
        &store,
        "SELECT count(*) FROM events WHERE metadata->>'causation_id' IS NULL",
    )
    .await;
    assert_eq!(uncaused, 0, "events without a cause");
    let dangling = scalar(
        &store,
        "SELECT count(*) FROM events e \
         WHERE e.metadata->>'causation_id' <> e.metadata->>'correlation_id' \
           AND NOT EXISTS (SELECT 1 FROM events c \
                            WHERE e.metadata->>'causation_id' ~ '^[0-9]+$' \
                              AND c.position = CAST(e.metadata->>'causation_id' AS BIGINT) \
                              AND c.metadata->>'correlation_id' = e.metadata->>'correlation_id')",
    )
    .await;
    assert_eq!(
        dangling, 0,
        "causes that name no event of their chain (or a query error: -1)"
    );
    let chains = scalar(
        &store,
        "SELECT count(DISTINCT metadata->>'correlation_id') FROM events",
    )
    .await;
    let mut verified = Vec::new();
    for projection in whist_projections::all() {
        if !projection.rebuildable() {
            continue;
        }
        let name = projection.name();
        let report = runner
            .verify(name, &|_| {})
            .await
            .unwrap_or_else(|error| panic!("{name} verifies: {error}"));
        assert_eq!(report.differences(), 0, "{name}: {report:?}");
        verified.push(name);
    }
    let mut chain = ChildProcess::start(
        &crate::whist_binary(),
        &["events", "verify"],
        cluster.database.data_dir.path(),
        &[(
            "DATABASE_URL",
            cluster.database.url.clone().expect("Postgres"),
        )],
        "events-verify.log",
    );
    let chain_status = chain.exited(Duration::from_secs(120)).await;
    assert!(
        chain_status.is_some_and(|status| status.success()),
        "the hash chain holds after the crashes: {}",
        chain.log_text()
    );

    // (b) No slot held twice, no host over capacity.
    assert_eq!(twice, 0, "a mandelbox held a slot twice");
    assert_eq!(over, 0, "a host went over its capacity");
    // A disconnect frees the slot whichever process records it, including one whose remembered copy of the host
    // had not seen the allocation (made through the other server).
    let leaked: Vec<&String> = tally
        .disconnected
        .iter()
        .filter(|mandelbox_id| held.contains(*mandelbox_id))
        .collect();
    assert!(
        leaked.is_empty(),
        "disconnected mandelboxes still hold their slot: {leaked:?}"
    );

    // (c) The cloud matches the records once the fleet has converged.
    let converged = eventually(Duration::from_secs(90), || async {
        cloud_matches_records(&moto, &store).await.0
    })
    .await;
    let (_, orphans, missing) = cloud_matches_records(&moto, &store).await;
    assert!(
        converged,
        "{orphans} instances in moto without a live record, {missing} live records without an instance:\n\
         cloud {:?}\nrecords {:?}\n{}",
        live_in_moto(&moto).await,
        live_records(&store).await,
        cluster.troubles()
    );
    let hosts = live_records(&store).await.len();

    for index in 0..cluster.roles.len() {
        cluster.kill_role(index);
    }
    let refused: u64 = tally.refused.values().sum();
    let row = Row {
        scenario: "Crash",
        load: format!(
            "2 serve + 1 worker, {clients} clients: {} assigns acknowledged ({} disconnected), {refused} refused \
             with 503 {:?}, {} unanswered while a process was down, {} disconnect retries; {hosts} hosts at the end",
            tally.acknowledged.len(),
            tally.disconnected.len(),
            tally.refused,
            tally.unanswered_assigns,
            tally.disconnect_retries,
        ),
        faults: format!("{kills} SIGKILLs ({rounds} rounds x serve, serve --api-only, worker), each restarted"),
        bad_inputs: 0,
        lost: format!(
            "nothing: 0 events lost/doubled ({events} events, {} verified), every chain whole ({chains} chains, \
             0 causes naming no event of their chain), 0 slots twice, 0 over capacity, \
             0 slots leaked by a disconnect, \
             0 orphan instances, 0 records without an instance; {unheard} allocations unacknowledged (cut off by \
             a kill)",
            verified.join("/")
        ),
        seconds: started.elapsed().as_secs_f64(),
    };
    record(&row);
}
