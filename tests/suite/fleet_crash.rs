//! Crash tests of the reconciler: real `whist worker` processes killed with SIGKILL right after EC2 accepted a
//! launch and before the outcome was recorded (held there by `WHIST_FAULT_PAUSE_AFTER_LAUNCH_MS`), again and again,
//! alone and racing each other on the same backlog. Afterwards there must be exactly one EC2 instance per launch
//! decision, and no instance in moto without a live record.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use whist_adapters::store::AggregateStore;
use whist_adapters::tokens::Tokens;
use whist_domain::instance::Instance;
use whist_tests::{launch_spec, ChildProcess, Moto, TestDatabase};

const REGIONS: [&str; 2] = ["us-east-1", "us-west-1"];
/// Launch decisions recorded before each crash.
const DECISIONS_PER_ROUND: usize = 4;
const ROUNDS: usize = 3;
const LINE: &str = "launch call returned";

fn worker(database: &TestDatabase, moto: &Moto, pause_ms: u64, name: &str) -> ChildProcess {
    ChildProcess::start(
        &crate::whist_binary(),
        &["worker"],
        database.data_dir.path(),
        &[
            ("DATABASE_URL", database.url.clone().expect("postgres")),
            ("WHIST_CLOUD", "aws".to_string()),
            ("AWS_ENDPOINT_URL", moto.endpoint.clone()),
            ("WHIST_DEPLOYMENT", "whist-test".to_string()),
            ("ENABLED_REGIONS", serde_json::json!(REGIONS).to_string()),
            // The decisions are this test's; the worker only carries them out (and repairs).
            ("WHIST_AUTOSCALE", "false".to_string()),
            ("WHIST_JOB_CLAIM_S", "2".to_string()),
            ("WHIST_FAULT_PAUSE_AFTER_LAUNCH_MS", pause_ms.to_string()),
            // Repair would adopt the unrecorded launches too; leave that to the retried launch jobs while crashing
            // (it runs once at start, before any launch, then not again within the test).
            ("WHIST_REPAIR_INTERVAL_S", "600".to_string()),
            (
                "HOST_SERVICE_PORT",
                whist_tests::host_service_port().to_string(),
            ),
            ("RUST_LOG", "info".to_string()),
        ],
        &format!("{name}.log"),
    )
}

fn launches_paused(process: &ChildProcess) -> usize {
    process.log_text().matches(LINE).count()
}

async fn wait_for_pause(processes: &[&ChildProcess]) {
    let started = Instant::now();
    while processes
        .iter()
        .all(|process| launches_paused(process) == 0)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no worker reached a launch: {}",
            processes
                .iter()
                .map(|process| process.log_text())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Records launch decisions, half in each region; their ids.
async fn decide(database: &TestDatabase) -> Vec<String> {
    let store = database.open().await;
    let tokens = Tokens::load(&store).await.expect("the server key");
    let instances = AggregateStore::<Instance>::new(&store, ());
    let mut ids = Vec::new();
    for index in 0..DECISIONS_PER_ROUND {
        let region = REGIONS[index % 2];
        let (id, _) = whist_tests::record_launch(
            &instances,
            &tokens,
            launch_spec(region, "ami-12c6146b", "hash-crash"),
        )
        .await;
        ids.push(id);
    }
    store.close().await;
    ids
}

/// Waits until every decision has its instance recorded; decision → cloud instance id.
async fn recorded(database: &TestDatabase, ids: &[String]) -> HashMap<String, String> {
    let store = database.open().await;
    let instances = AggregateStore::<Instance>::new(&store, ());
    let started = Instant::now();
    let mut found = HashMap::new();
    while found.len() < ids.len() {
        for id in ids {
            if found.contains_key(id) {
                continue;
            }
            let (instance, _) = instances.load_from_history(id).await.expect("loads");
            if let Some(cloud_instance_id) = instance.cloud_instance_id {
                found.insert(id.clone(), cloud_instance_id);
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "only {} of {} launches were recorded",
            found.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    store.close().await;
    found
}

/// Exactly one live instance per decision, the one recorded, and no live instance without a decision.
async fn assert_one_instance_per_decision(moto: &Moto, recorded: &HashMap<String, String>) {
    let ec2 = moto.ec2("whist-test");
    let mut per_launch: HashMap<String, Vec<String>> = HashMap::new();
    let mut total = 0;
    for region in REGIONS {
        for instance in ec2.list(region).await.expect("moto lists") {
            if !instance.is_live() {
                continue;
            }
            total += 1;
            let launch_id = instance.launch_id.clone().unwrap_or_default();
            assert!(
                recorded.contains_key(&launch_id),
                "an instance without a decision: {instance:?}"
            );
            per_launch
                .entry(launch_id)
                .or_default()
                .push(instance.cloud_instance_id);
        }
    }
    assert_eq!(
        total,
        recorded.len(),
        "one live instance per decision: {per_launch:?}"
    );
    for (launch_id, cloud_instance_id) in recorded {
        assert_eq!(
            per_launch.get(launch_id),
            Some(&vec![cloud_instance_id.clone()]),
            "decision {launch_id}"
        );
    }
}

/// Whether the logs show a launch whose outcome a crash lost being adopted (by the retried job or the repair).
fn adopted(logs: &str) -> bool {
    logs.contains("adopting the instance an earlier attempt launched")
        || logs.contains("adopted a launched instance whose launch was never recorded")
}

#[tokio::test]
async fn a_worker_killed_between_launch_and_record_never_doubles_an_instance() {
    let moto = Moto::start().await;
    let database = TestDatabase::postgres_for(35).await;
    let mut ids = Vec::new();
    let mut logs = String::new();
    let mut current = worker(&database, &moto, 3_000, "worker-0");
    for round in 1..=ROUNDS {
        ids.extend(decide(&database).await);
        wait_for_pause(&[&current]).await;
        logs.push_str(&current.log_text());
        current.kill();
        // A new process takes the jobs over once the dead one's claims expire.
        current = worker(&database, &moto, 3_000, &format!("worker-{round}"));
    }
    current.kill();
    let healthy = worker(&database, &moto, 0, "worker-final");
    let recorded = recorded(&database, &ids).await;
    assert_one_instance_per_decision(&moto, &recorded).await;
    logs.push_str(&healthy.log_text());
    healthy.kill();
    assert!(
        adopted(&logs),
        "launches a crash left unrecorded were adopted"
    );
}

#[tokio::test]
async fn two_workers_racing_on_one_backlog_and_killed_in_turn_never_double_an_instance() {
    let moto = Moto::start().await;
    let database = TestDatabase::postgres_for(35).await;
    let mut ids = Vec::new();
    let mut logs = String::new();
    let mut a = worker(&database, &moto, 3_000, "a-0");
    let mut b = worker(&database, &moto, 3_000, "b-0");
    for round in 1..=ROUNDS {
        ids.extend(decide(&database).await);
        // Whichever reaches a launch first is killed there; the other dies at whatever it was doing.
        wait_for_pause(&[&a, &b]).await;
        logs.push_str(&a.log_text());
        logs.push_str(&b.log_text());
        a.kill();
        b.kill();
        a = worker(&database, &moto, 3_000, &format!("a-{round}"));
        b = worker(&database, &moto, 3_000, &format!("b-{round}"));
    }
    a.kill();
    b.kill();
    let healthy_a = worker(&database, &moto, 0, "a-final");
    let healthy_b = worker(&database, &moto, 0, "b-final");
    let recorded = recorded(&database, &ids).await;
    assert_one_instance_per_decision(&moto, &recorded).await;
    logs.push_str(&healthy_a.log_text());
    logs.push_str(&healthy_b.log_text());
    healthy_a.kill();
    healthy_b.kill();
    assert!(
        adopted(&logs),
        "launches a crash left unrecorded were adopted"
    );
}
