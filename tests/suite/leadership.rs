//! Leadership through a pooler: three `whist worker` processes on one database, each with `DATABASE_URL` through a
//! PgBouncer of the test's own and `DATABASE_DIRECT_URL` straight to Postgres (for `LISTEN` and migrations). The
//! leader is SIGKILLed; the next leader is SIGSTOPped after it planned a launch and before it recorded it, and woken
//! once the third has taken over. Exactly one leader at a time (in the log, no decision of an epoch after a newer
//! taking), the warm buffer exactly its target (no double launch), and every live worker listens on a direct
//! session, so readers are woken by notifications, not by their polls.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use whist_adapters::store::{AggregateStore, Database};
use whist_domain::service::{ServiceCommand, SERVICE_ID};
use whist_domain::{Actor, EventMetadata};
use whist_tests::pgbouncer::{PgBouncer, PoolMode};
use whist_tests::{ChildProcess, TestDatabase};

const REGION: &str = "us-east-1";
/// One host of four slots fills the buffer of four.
const CAPACITY: u32 = 4;
const DESIRED_FREE: u32 = 4;
const UPSTREAM_PORT: u16 = 5432;
const PLANNED: &str = "autoscaler pass planned; pausing before recording";
const DIRECT_APPLICATION: &str = "whist-direct";

async fn count(store: &Database, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(store.any())
        .await
        .expect("the count reads")
}

/// Launch decisions for `image`.
async fn launches_of(store: &Database, image: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'InstanceLaunchRequested' \
         AND CAST(payload AS TEXT) LIKE '%' || $1 || '%'",
    )
    .bind(image)
    .fetch_one(store.any())
    .await
    .expect("the count reads")
}

/// The leadership log in order: (event type, epoch, holder).
async fn leadership_log(store: &Database) -> Vec<(String, i64, String)> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT event_type, CAST(payload AS TEXT) FROM events WHERE aggregate_type = 'leadership' \
         ORDER BY sequence",
    )
    .fetch_all(store.any())
    .await
    .expect("the log reads");
    rows.into_iter()
        .map(|(event_type, payload)| {
            let payload: serde_json::Value = serde_json::from_str(&payload).expect("JSON");
            let body = payload
                .as_object()
                .and_then(|object| object.values().next())
                .cloned()
                .unwrap_or_default();
            (
                event_type,
                body["epoch"].as_i64().unwrap_or(-1),
                body["holder"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The latest taking: (epoch, the holder's process id).
async fn leader(store: &Database) -> Option<(i64, u32)> {
    leadership_log(store)
        .await
        .into_iter()
        .rev()
        .find(|(event_type, _, _)| event_type == "LeadershipTaken")
        .and_then(|(_, epoch, holder)| {
            let pid = holder.split(':').nth(1)?.parse().ok()?;
            Some((epoch, pid))
        })
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F, logs: &[&ChildProcess])
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "{what}:\n{}",
            logs.iter()
                .map(|process| process.log_text())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_pooler_one_leader_at_a_time_survives_a_kill_and_a_pause_without_a_double_launch()
{
    let database = TestDatabase::postgres().await;
    let url = database.url.clone().expect("Postgres");
    let bouncer = PgBouncer::start(UPSTREAM_PORT, PoolMode::Session, 40).await;
    let pooled = bouncer.url_for(&url, UPSTREAM_PORT);
    let direct = format!("{url}?application_name={DIRECT_APPLICATION}");
    let store = database.open_with(4).await;
    whist_tests::activate_release(&store, &[REGION], "ami-first", "hash-first").await;
    let environment = vec![
        ("DATABASE_URL", pooled),
        ("DATABASE_DIRECT_URL", direct),
        ("WHIST_CLOUD", "aws".to_string()),
        ("ENABLED_REGIONS", serde_json::json!([REGION]).to_string()),
        ("WHIST_AUTOSCALE", "true".to_string()),
        ("DESIRED_FREE_MANDELBOXES", DESIRED_FREE.to_string()),
        ("WHIST_HOST_CAPACITY", CAPACITY.to_string()),
        // A leader renews every pass (a pass, its 2 s pause and 2 s of rest): a stopped one is replaced within 6 s.
        ("WHIST_LEADER_LEASE_S", "6".to_string()),
        ("WHIST_FAULT_PAUSE_BEFORE_DECIDING_MS", "2000".to_string()),
        ("WHIST_REPAIR_INTERVAL_S", "600".to_string()),
    ];
    let folder = database.data_dir.path();
    let mut workers: Vec<Option<ChildProcess>> = (0..3)
        .map(|index| {
            Some(ChildProcess::start(
                &crate::whist_binary(),
                &["worker"],
                folder,
                &environment,
                &format!("worker-{index}.log"),
            ))
        })
        .collect();
    let live = |workers: &[Option<ChildProcess>]| -> Vec<u32> {
        workers.iter().flatten().map(ChildProcess::id).collect()
    };
    let logs_of = |workers: &[Option<ChildProcess>]| -> String {
        workers
            .iter()
            .flatten()
            .map(|process| process.log_text())
            .collect::<Vec<_>>()
            .join("\n---\n")
    };

    // The first leader fills the buffer: one host of the first image (it launches nothing of EC2's: the endpoint
    // is a loopback port nothing listens on, so the host stays booting, counted at its expected capacity).
    let deadline = Instant::now() + Duration::from_secs(60);
    while launches_of(&store, "ami-first").await < 1 {
        assert!(
            Instant::now() < deadline,
            "the first leader launched: {}",
            logs_of(&workers)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (first_epoch, first_pid) = leader(&store).await.expect("a recorded leader");
    let first = workers
        .iter()
        .position(|worker| {
            worker
                .as_ref()
                .is_some_and(|worker| worker.id() == first_pid)
        })
        .expect("the leader is one of the workers");
    workers[first].take().expect("running").kill();

    // A release: the next leader plans a host of the new image, and is stopped before it records the launch.
    let planned = |worker: &Option<ChildProcess>| {
        worker.as_ref().map_or(0, |worker| {
            worker
                .log_text()
                .lines()
                .filter(|line| line.contains(PLANNED))
                .count()
        })
    };
    let planned_before: Vec<usize> = workers.iter().map(planned).collect();
    whist_tests::activate_release(&store, &[REGION], "ami-second", "hash-second").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let paused = loop {
        if let Some(index) =
            (0..workers.len()).find(|index| planned(&workers[*index]) > planned_before[*index])
        {
            break index;
        }
        assert!(
            Instant::now() < deadline,
            "a second leader planned a launch: {}",
            logs_of(&workers)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let paused_process = workers[paused].as_ref().expect("running");
    paused_process.signal(Signal::SIGSTOP);
    let (second_epoch, second_pid) = leader(&store).await.expect("a recorded leader");
    assert!(second_epoch > first_epoch);
    assert_eq!(second_pid, paused_process.id(), "the paused process led");

    // The third takes over once the lease runs out, and records the launch itself.
    let deadline = Instant::now() + Duration::from_secs(60);
    while launches_of(&store, "ami-second").await < 1 {
        assert!(
            Instant::now() < deadline,
            "the third leader launched: {}",
            logs_of(&workers)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (third_epoch, third_pid) = leader(&store).await.expect("a recorded leader");
    assert!(third_epoch > second_epoch);
    assert_ne!(third_pid, second_pid);

    // The paused leader wakes and its pass goes on to record the launch it planned.
    paused_process.signal(Signal::SIGCONT);
    let woken_log = || {
        workers[paused]
            .as_ref()
            .map(ChildProcess::log_text)
            .unwrap_or_default()
    };
    wait_for(
        "the woken leader finished its pass",
        Duration::from_secs(30),
        || async {
            let log = woken_log();
            log.contains("a newer leader took over")
                || log.contains("launching a host for the warm buffer")
        },
        &[],
    )
    .await;
    // A few more passes of the live leader: the buffer stays exactly at its target.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        launches_of(&store, "ami-second").await,
        1,
        "exactly one host of the new image: {}",
        logs_of(&workers)
    );
    assert_eq!(launches_of(&store, "ami-first").await, 1);
    assert!(
        woken_log().contains("a newer leader took over"),
        "the fence refused the woken leader: {}",
        woken_log()
    );

    // One leader at a time, in the log: takings only move forward, and every decision is of the latest taking.
    let log = leadership_log(&store).await;
    let mut current = 0;
    for (event_type, epoch, _) in &log {
        match event_type.as_str() {
            "LeadershipTaken" => {
                assert!(*epoch > current, "takings move forward: {log:?}");
                current = *epoch;
            }
            _ => assert_eq!(*epoch, current, "a decision of a superseded epoch: {log:?}"),
        }
    }
    assert!(
        log.iter()
            .filter(|(event_type, _, _)| event_type == "LeadershipDecided")
            .count()
            >= 2,
        "{log:?}"
    );

    // Every live worker listens on a direct session (not through the pooler), and an append wakes the readers at
    // once: the projections reach the new head in well under their one-second poll.
    let listening = count(
        &store,
        &format!(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = '{DIRECT_APPLICATION}' \
             AND query LIKE 'LISTEN%'"
        ),
    )
    .await;
    assert_eq!(
        listening,
        live(&workers).len() as i64,
        "{}",
        logs_of(&workers)
    );
    let service = AggregateStore::<whist_domain::service::Service>::new(&store, ());
    let mut delays = Vec::new();
    for round in 0..6 {
        service
            .execute(
                SERVICE_ID,
                ServiceCommand::SetMaintenance {
                    enabled: round % 2 == 0,
                    at: chrono::Utc::now(),
                },
                &EventMetadata::new(Actor::System, chrono::Utc::now()),
            )
            .await
            .expect("recorded");
        let appended = Instant::now();
        let head = count(&store, "SELECT position FROM event_log_head").await;
        wait_for(
            "the projections reach the head",
            Duration::from_secs(10),
            || async {
                count(
                    &store,
                    "SELECT COALESCE(MIN(position), 0) FROM projection_checkpoints \
                     WHERE name IN ('aggregate_index', 'instances')",
                )
                .await
                    >= head
            },
            &[],
        )
        .await;
        delays.push(appended.elapsed());
    }
    delays.sort();
    let median = delays[delays.len() / 2];
    println!(
        "leadership through PgBouncer (session mode): epochs {first_epoch} -> {second_epoch} -> {third_epoch}, \
         wake delays {delays:?}"
    );
    assert!(
        median < Duration::from_millis(500),
        "readers woken by notifications, not polls: {delays:?}"
    );
    drop(bouncer);
}
