//! Image releases through the real `whist images …` commands, on Postgres and moto's EC2 in two regions, with host
//! services booting on moto's instances (`whist_tests::MotoHosts`) and a server (in this process) running the
//! projections, reconciler, autoscaler and sweeps.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use whist_adapters::config::Settings;
use whist_tests::moto_hosts::HostImages;
use whist_tests::{
    admin_token, assign_body, eventually, fleet_history, fleet_rows, http_client, launch_spec,
    spawn_app, spawn_app_with, user_token, ChildProcess, Moto, MotoHosts, TestApp, TestDatabase,
};

const REGIONS: [&str; 2] = ["us-east-1", "us-west-2"];
const OLD_IMAGE: &str = "ami-12c6146b";
const OLD_HASH: &str = "hash-old";
const NEW_IMAGE: &str = "ami-03cf127a";
const NEW_HASH: &str = "hash-new";
/// An image no host knows the commit hash of: its hosts boot but can never register.
const BROKEN_IMAGE: &str = "ami-1e749f67";

struct Release {
    app: Arc<TestApp>,
    moto: Moto,
    _hosts: MotoHosts,
    database: TestDatabase,
    settings: Settings,
}

/// Two regions on the old release, with the autoscaler keeping `desired_free` slots on hosts of `capacity`.
async fn release_fleet(capacity: u32, desired_free: u32) -> Release {
    let moto = Moto::start().await;
    let database = TestDatabase::postgres().await;
    let mut settings = database.settings();
    settings.aws.endpoint_url = Some(moto.endpoint.clone());
    settings.enabled_regions = REGIONS.iter().map(|region| region.to_string()).collect();
    settings.fleet.autoscale = true;
    settings.fleet.host_capacity = capacity;
    settings.fleet.repair_interval = Duration::from_secs(2);
    settings.fleet.drained_host_timeout = Duration::from_secs(1);
    settings.heartbeat_timeout = Duration::from_secs(8);
    settings.desired_free_mandelboxes = desired_free;
    settings.assign_rate_limit_per_minute = 0;
    settings.assign_rate_limit_per_ip_per_minute = 0;
    let app = spawn_app_with(&database, settings.clone()).await;
    let hosts = MotoHosts::start(
        &moto.endpoint,
        "whist-test",
        &REGIONS,
        HostImages {
            commit_hashes: HashMap::from([
                (OLD_IMAGE.to_string(), OLD_HASH.to_string()),
                (NEW_IMAGE.to_string(), NEW_HASH.to_string()),
            ]),
            capacity,
            port: settings.host_service_port,
        },
    );
    app.activate_image(&REGIONS, OLD_IMAGE, OLD_HASH).await;
    let release = Release {
        app: Arc::new(app),
        moto,
        _hosts: hosts,
        database,
        settings,
    };
    for region in REGIONS {
        wait("the old release's buffer is up", 90, async || {
            free_slots(&release.app, region, OLD_IMAGE).await >= i64::from(desired_free)
        })
        .await;
    }
    release
}

impl Release {
    async fn stop(self) {
        let app = Arc::into_inner(self.app).expect("no task holds the server any more");
        app.stop().await;
    }
}

async fn wait(what: &str, seconds: u64, condition: impl AsyncFn() -> bool) {
    assert!(
        eventually(Duration::from_secs(seconds), || condition()).await,
        "waited {seconds} s for: {what}"
    );
}

async fn free_slots(app: &TestApp, region: &str, image: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(mandelbox_capacity - live_mandelboxes), 0) AS BIGINT) FROM instances \
         WHERE region = $1 AND image_id = $2 AND status = 'ACTIVE'",
    )
    .bind(region)
    .bind(image)
    .fetch_one(app.state.database.any())
    .await
    .expect("the read model answers")
}

async fn records_on(app: &TestApp, image: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM instances WHERE image_id = $1")
        .bind(image)
        .fetch_one(app.state.database.any())
        .await
        .expect("the read model answers")
}

/// Why `instance_id` drained: the walk back from its `InstanceDrainStarted`.
async fn why_drained(
    store: &whist_adapters::store::Database,
    instance_id: &str,
) -> whist_api::control::audit::CauseWalk {
    let sequence: i64 = sqlx::query_scalar(
        "SELECT sequence FROM events WHERE aggregate_id = $1 AND event_type = 'InstanceDrainStarted'",
    )
    .bind(instance_id)
    .fetch_one(store.any())
    .await
    .expect("the host drained");
    whist_api::control::audit::why(store, "instance", instance_id, Some(sequence))
        .await
        .expect("the walk reads")
        .expect("the drain is stored")
}

/// The event types of a walk's steps.
fn step_types(walk: &whist_api::control::audit::CauseWalk) -> Vec<&str> {
    walk.steps
        .iter()
        .map(|step| step.event_type.as_str())
        .collect()
}

/// Live EC2 instances (in moto) of hosts recorded on `image`, across both regions.
async fn live_in_moto_on(release: &Release, image: &str) -> usize {
    let records: BTreeSet<String> =
        sqlx::query_scalar("SELECT instance_id FROM instances WHERE image_id = $1")
            .bind(image)
            .fetch_all(release.app.state.database.any())
            .await
            .expect("the read model answers")
            .into_iter()
            .collect();
    let ec2 = release.moto.ec2("whist-test");
    let mut live = 0;
    for region in REGIONS {
        live += ec2
            .list(region)
            .await
            .expect("moto lists")
            .into_iter()
            .filter(|instance| instance.is_live())
            .filter(|instance| {
                instance
                    .launch_id
                    .as_ref()
                    .is_some_and(|launch| records.contains(launch))
            })
            .count();
    }
    live
}

/// Runs `whist images …` against the fleet's database, as the release workflow would; (success, output).
async fn images_command(release: &Release, arguments: &[&str]) -> (bool, String) {
    let settings = &release.settings;
    let environment = vec![
        (
            "DATABASE_URL",
            release.database.url.clone().expect("a Postgres database"),
        ),
        ("WHIST_CLOUD", "aws".to_string()),
        (
            "ENABLED_REGIONS",
            serde_json::to_string(&REGIONS).expect("JSON"),
        ),
        (
            "DESIRED_FREE_MANDELBOXES",
            settings.desired_free_mandelboxes.to_string(),
        ),
        (
            "WHIST_HOST_CAPACITY",
            settings.fleet.host_capacity.to_string(),
        ),
    ];
    let mut all = vec!["images"];
    all.extend_from_slice(arguments);
    let mut child = ChildProcess::start(
        &crate::whist_binary(),
        &all,
        release.database.data_dir.path(),
        &environment,
        &format!(
            "images-{}.log",
            arguments.first().copied().unwrap_or("none")
        ),
    );
    let status = child.exited(Duration::from_secs(180)).await;
    let log = child.log_text();
    let status = status.unwrap_or_else(|| panic!("whist images did not exit: {log}"));
    (status.success(), log)
}

fn amis(pairs: &[(&str, &str)]) -> String {
    serde_json::to_string(&pairs.iter().copied().collect::<HashMap<_, _>>()).expect("JSON")
}

/// What `GET /admin/images` says is active, per region.
async fn active_images(app: &TestApp, token: &str) -> Vec<(String, String)> {
    let rows: Vec<serde_json::Value> = http_client()
        .get(app.url("/admin/images?status=ACTIVE"))
        .bearer_auth(token)
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("a JSON list");
    rows.iter()
        .map(|row| {
            (
                row["region"].as_str().unwrap_or_default().to_string(),
                row["client_commit_hash"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect()
}

/// What a reader saw active: (region, commit hash) pairs.
type Observation = Vec<(String, String)>;

/// One assign of a client: the hash it asked for, whether it was sent after the swap-over started, the answer.
#[derive(Debug, Clone)]
struct Outcome {
    hash: &'static str,
    after_swap: bool,
    status: u16,
    error: String,
    /// When it was answered, in ms since the clients started.
    answered_ms: u128,
    /// For an answer the test does not expect: the region's hosts as the read model showed them just after.
    fleet: Option<Vec<String>>,
}

impl Outcome {
    /// Whether the release explains the answer: an old client refused once the swap-over began.
    fn expected(&self) -> bool {
        self.status == 200
            || (self.hash == OLD_HASH && self.after_swap && self.error == "COMMIT_HASH_MISMATCH")
    }

    /// The answer, when it came, and the region's hosts just after, if they were read.
    fn describe(&self) -> String {
        let fleet = self
            .fleet
            .as_ref()
            .map(|rows| format!("\n      {}", rows.join("\n      ")))
            .unwrap_or_default();
        format!(
            "at {} ms: {} {} {} (after the swap-over began: {}){fleet}",
            self.answered_ms, self.hash, self.status, self.error, self.after_swap
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_release_under_load_switches_every_region_at_once_and_retires_the_old_hosts() {
    let release = release_fleet(8, 20).await;
    let app = release.app.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let swapping = Arc::new(AtomicBool::new(false));
    let swapped = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let started = std::time::Instant::now();

    // 32 desktop apps, 16 per region, assigning and disconnecting; they move to the new hash once it is released.
    let mut clients = Vec::new();
    for client in 0..32 {
        let (app, stop, swapping, swapped, outcomes) = (
            app.clone(),
            stop.clone(),
            swapping.clone(),
            swapped.clone(),
            outcomes.clone(),
        );
        clients.push(tokio::spawn(async move {
            let region = REGIONS[client % 2];
            let token = user_token(&format!("release-client-{client}"));
            let mut session = 0;
            while !stop.load(Ordering::SeqCst) {
                session += 1;
                let hash = if swapped.load(Ordering::SeqCst) {
                    NEW_HASH
                } else {
                    OLD_HASH
                };
                let (status, body) = app
                    .assign(&token, assign_body(&[region], hash, session))
                    .await;
                // Read once answered: a request sent just before the swap-over began may be decided after it.
                let after_swap = swapping.load(Ordering::SeqCst);
                let error = body["error"].as_str().unwrap_or_default().to_string();
                let mut outcome = Outcome {
                    hash,
                    after_swap,
                    status,
                    error,
                    answered_ms: started.elapsed().as_millis(),
                    fleet: None,
                };
                if !outcome.expected() {
                    outcome.fleet = Some(fleet_rows(&app.state.database, region).await);
                }
                outcomes.lock().expect("outcomes").push(outcome);
                if status == 200 {
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    let mandelbox_id = body["mandelbox_id"].as_str().unwrap_or_default();
                    let disconnected = app.disconnect(mandelbox_id).await;
                    if disconnected != 200 {
                        let failure = Outcome {
                            hash,
                            after_swap,
                            status: disconnected,
                            error: format!("disconnect of {mandelbox_id}"),
                            answered_ms: started.elapsed().as_millis(),
                            fleet: Some(fleet_rows(&app.state.database, region).await),
                        };
                        outcomes.lock().expect("outcomes").push(failure);
                    }
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
    }

    // A reader that must never see the regions on different releases, in the read model or `GET /regions`.
    let observations = Arc::new(AtomicUsize::new(0));
    let seen: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let mixed: Arc<Mutex<Vec<Observation>>> = Arc::default();
    let reader = {
        let (app, stop, observations, seen, mixed) = (
            app.clone(),
            stop.clone(),
            observations.clone(),
            seen.clone(),
            mixed.clone(),
        );
        tokio::spawn(async move {
            let admin = admin_token("release-reader");
            let client = http_client();
            while !stop.load(Ordering::SeqCst) {
                let active = active_images(&app, &admin).await;
                let hashes: BTreeSet<&String> = active.iter().map(|(_, hash)| hash).collect();
                let regions: BTreeSet<&String> = active.iter().map(|(region, _)| region).collect();
                if hashes.len() != 1
                    || regions.len() != REGIONS.len()
                    || active.len() != REGIONS.len()
                {
                    mixed.lock().expect("mixed").push(active.clone());
                }
                seen.lock()
                    .expect("seen")
                    .extend(hashes.into_iter().cloned());
                let regions: Vec<String> = client
                    .get(app.url("/regions"))
                    .send()
                    .await
                    .expect("answers")
                    .json()
                    .await
                    .expect("a JSON list");
                if regions.len() != REGIONS.len() {
                    mixed
                        .lock()
                        .expect("mixed")
                        .push(vec![("GET /regions".to_string(), regions.join(","))]);
                }
                observations.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut phases = vec![("create-buffers", started.elapsed().as_millis())];
    let (ok, log) = images_command(
        &release,
        &[
            "create-buffers",
            "--commit-hash",
            NEW_HASH,
            "--amis",
            &amis(&[("us-east-1", NEW_IMAGE), ("us-west-2", NEW_IMAGE)]),
            "--timeout",
            "120s",
        ],
    )
    .await;
    assert!(ok, "create-buffers succeeds: {log}");
    assert!(
        log.contains("us-east-1 3/3 ACTIVE"),
        "progress per region: {log}"
    );
    // The candidates are protected and inactive: the old release still serves every region.
    assert_eq!(
        records_on(&release.app, NEW_IMAGE).await,
        6,
        "3 buffer hosts per region"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        records_on(&release.app, NEW_IMAGE).await,
        6,
        "the autoscaler neither drains nor adds candidate hosts"
    );

    swapping.store(true, Ordering::SeqCst);
    phases.push(("swap-over", started.elapsed().as_millis()));
    let (ok, log) = images_command(&release, &["swap-over", "--commit-hash", NEW_HASH]).await;
    assert!(ok, "swap-over succeeds: {log}");
    swapped.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.expect("a client finishes");
    }
    reader.await.expect("the reader finishes");
    drop(app);

    let outcomes = outcomes.lock().expect("outcomes").clone();
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|outcome| !outcome.expected())
        .collect();
    // A failure says when it happened and what the fleet had been through, so that a rare one explains itself.
    if !failed.is_empty() {
        let failed: Vec<String> = failed.iter().map(|outcome| outcome.describe()).collect();
        panic!(
            "failed assigns:\n  {}\nphases (ms since the clients started): {phases:?}\nthe fleet's history:\n  {}",
            failed.join("\n  "),
            fleet_history(&release.app.state.database).await.join("\n  ")
        );
    }
    let served = |hash: &str| {
        outcomes
            .iter()
            .filter(|outcome| outcome.hash == hash && outcome.status == 200)
            .count()
    };
    assert!(
        served(OLD_HASH) > 50,
        "the old release served: {}",
        served(OLD_HASH)
    );
    assert!(
        served(NEW_HASH) > 50,
        "the new release served: {}",
        served(NEW_HASH)
    );
    let mixed = mixed.lock().expect("mixed").clone();
    assert!(
        mixed.is_empty(),
        "a reader saw a half-switched catalog: {mixed:?}"
    );
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(
        seen,
        [NEW_HASH.to_string(), OLD_HASH.to_string()].into(),
        "the reader saw both releases ({} observations)",
        observations.load(Ordering::SeqCst)
    );
    eprintln!(
        "release under load: {} assigns ({} old, {} new), {} catalog observations",
        outcomes.len(),
        served(OLD_HASH),
        served(NEW_HASH),
        observations.load(Ordering::SeqCst)
    );

    // Old hosts: no new mandelbox, drained, and gone from EC2 once empty.
    wait("the old hosts are gone from moto", 90, async || {
        live_in_moto_on(&release, OLD_IMAGE).await == 0
    })
    .await;
    wait("the old hosts' records are terminated", 60, async || {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM instances WHERE image_id = $1 AND status <> 'TERMINATED'",
        )
        .bind(OLD_IMAGE)
        .fetch_one(release.app.state.database.any())
        .await
        .expect("the read model answers")
            == 0
    })
    .await;
    // Why did the old hosts drain? Each retirement is caused by the catalog event of the swap-over, whose root is
    // the release workflow, whoever recorded it: the swap-over command, or the autoscaler when its pass saw the
    // new catalog first.
    let store = &release.app.state.database;
    let swapped_over: Vec<whist_api::control::audit::EventRecord> =
        whist_api::control::audit::history(
            store,
            "image_catalog",
            whist_domain::images::CATALOG_ID,
        )
        .await
        .expect("the catalog's history")
        .into_iter()
        .filter(|event| event.event_type == "ImageReleaseSwappedOver")
        .collect();
    assert_eq!(swapped_over.len(), 1, "one swap-over");
    let swap = &swapped_over[0];
    let drains: Vec<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events WHERE event_type = 'InstanceDrainStarted' \
         AND payload->'DrainStarted'->>'reason' = 'image_retired'",
    )
    .fetch_all(store.any())
    .await
    .expect("the drains");
    assert!(!drains.is_empty(), "the old hosts drained as retired");
    for instance_id in &drains {
        let walk = why_drained(store, instance_id).await;
        assert_eq!(
            step_types(&walk),
            ["InstanceDrainStarted", "ImageReleaseSwappedOver"],
            "{instance_id}"
        );
        assert_eq!(walk.steps[1].position, swap.position);
        // In the release's chain, whoever recorded it.
        assert_eq!(
            walk.steps[0].metadata.correlation_id,
            swap.metadata.correlation_id
        );
        assert_eq!(
            walk.root,
            whist_api::control::audit::WalkRoot::Origin {
                correlation_id: swap.metadata.correlation_id.clone(),
                actor: "release-workflow".to_string(),
            }
        );
    }
    let (status, body) = release
        .app
        .assign(
            &user_token("release-late-old-client"),
            assign_body(&["us-east-1"], OLD_HASH, 1),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("COMMIT_HASH_MISMATCH"))
    );
    // A rerun of the swap-over is harmless.
    let (ok, log) = images_command(&release, &["swap-over", "--commit-hash", NEW_HASH]).await;
    assert!(ok && log.contains("already active"), "{log}");
    release.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_region_makes_create_buffers_exit_non_zero_and_leaves_no_candidate_running() {
    let release = release_fleet(2, 2).await;
    let (ok, log) = images_command(
        &release,
        &[
            "create-buffers",
            "--commit-hash",
            NEW_HASH,
            "--amis",
            &amis(&[("us-east-1", NEW_IMAGE), ("us-west-2", BROKEN_IMAGE)]),
            "--timeout",
            "20s",
        ],
    )
    .await;
    assert!(!ok, "create-buffers fails: {log}");
    // The broken region's host cannot register; its host service gives up and the machine powers off.
    assert!(
        log.contains("error: the buffer failed in us-west-2 ("),
        "the message names the region: {log}"
    );
    assert!(
        !log.contains("us-east-1 ("),
        "only the failed region is named: {log}"
    );
    let app = &release.app;
    wait("no candidate host is left running", 60, async || {
        live_in_moto_on(&release, NEW_IMAGE).await == 0
            && live_in_moto_on(&release, BROKEN_IMAGE).await == 0
    })
    .await;
    let (status, _) = app
        .assign(
            &user_token("after-failure"),
            assign_body(&["us-west-2"], OLD_HASH, 1),
        )
        .await;
    assert_eq!(status, 200, "the old release keeps serving");
    let rolled_back: Vec<serde_json::Value> = http_client()
        .get(app.url("/admin/images?status=ROLLED_BACK"))
        .bearer_auth(admin_token("auditor"))
        .send()
        .await
        .expect("answers")
        .json()
        .await
        .expect("JSON");
    assert_eq!(rolled_back.len(), 2, "{rolled_back:?}");
    let (catalog, _) = app
        .state
        .services
        .catalog
        .load_caught_up(whist_domain::images::CATALOG_ID)
        .await
        .expect("loads");
    assert!(catalog.protected_images().is_empty());
    release.stop().await;
}

/// The statuses of the second attempt's buffer hosts, one per region.
async fn candidate_statuses(app: &TestApp) -> Vec<Option<whist_domain::instance::InstanceStatus>> {
    let mut statuses = Vec::new();
    for region in REGIONS {
        let instance_id = whist_api::control::release::buffer_instance_id(NEW_HASH, 2, region, 0);
        let (instance, _) = app
            .state
            .services
            .instances
            .load_caught_up(&instance_id)
            .await
            .expect("loads");
        statuses.push(instance.status);
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_retires_the_candidates_and_leaves_the_old_release_serving() {
    let release = release_fleet(2, 2).await;
    let create = [
        "create-buffers",
        "--commit-hash",
        NEW_HASH,
        "--amis",
        &amis(&[("us-east-1", NEW_IMAGE), ("us-west-2", NEW_IMAGE)]),
        "--timeout",
        "90s",
    ];
    // No time to wait: the buffers are not ready, the attempt is rolled back and names both regions.
    let mut impatient = create;
    impatient[6] = "0s";
    let (ok, log) = images_command(&release, &impatient).await;
    assert!(!ok, "create-buffers times out: {log}");
    for region in REGIONS {
        assert!(
            log.contains(&format!("{region} (0/1 hosts ACTIVE after 0ns)")),
            "{log}"
        );
    }
    // A new attempt after the rollback is a new generation of hosts.
    let (ok, log) = images_command(&release, &create).await;
    assert!(ok, "create-buffers succeeds: {log}");
    // Rerunning phase 1 finds the buffer it made: nothing launched twice.
    let (ok, log) = images_command(&release, &create).await;
    assert!(ok, "a rerun succeeds: {log}");
    let app = &release.app;
    assert_eq!(
        records_on(app, NEW_IMAGE).await,
        4,
        "one buffer host per region and attempt"
    );
    let active = whist_domain::instance::InstanceStatus::Active;
    assert_eq!(candidate_statuses(app).await, [Some(active), Some(active)]);

    let (ok, log) = images_command(&release, &["rollback", "--commit-hash", NEW_HASH]).await;
    assert!(ok, "rollback succeeds: {log}");
    // Both candidates drain: retired by the rollback itself, or by an autoscaler pass that ran between the rollback's
    // catalog event and its retirements (it retires hosts of images no longer protected just the same).
    wait("both candidates drain", 30, async || {
        candidate_statuses(app)
            .await
            .iter()
            .all(|status| *status != Some(active))
    })
    .await;
    // Either way, each drain names the rollback as its cause, whose root is the release workflow.
    for region in REGIONS {
        let instance_id = whist_api::control::release::buffer_instance_id(NEW_HASH, 2, region, 0);
        let walk = why_drained(&app.state.database, &instance_id).await;
        assert_eq!(
            step_types(&walk),
            ["InstanceDrainStarted", "ImageReleaseRolledBack"],
            "{region}"
        );
        assert!(
            matches!(&walk.root, whist_api::control::audit::WalkRoot::Origin { actor, .. } if actor == "release-workflow"),
            "{:?}",
            walk.root
        );
    }
    wait("the candidates are gone from moto", 60, async || {
        live_in_moto_on(&release, NEW_IMAGE).await == 0
    })
    .await;
    let (status, _) = app
        .assign(
            &user_token("after-rollback"),
            assign_body(&["us-east-1"], OLD_HASH, 1),
        )
        .await;
    assert_eq!(status, 200, "the old release keeps serving");
    let (status, body) = app
        .assign(
            &user_token("too-early"),
            assign_body(&["us-east-1"], NEW_HASH, 1),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("COMMIT_HASH_MISMATCH"))
    );
    // A rolled-back release cannot be swapped over.
    let (ok, log) = images_command(&release, &["swap-over", "--commit-hash", NEW_HASH]).await;
    assert!(!ok && log.contains("no prepared release"), "{log}");
    release.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_autoscaler_pass_that_retires_the_old_hosts_first_names_the_swap_over_as_their_cause() {
    use whist_domain::images::{ImageCatalogCommand, CATALOG_ID};
    use whist_domain::metadata::Actor;
    use whist_domain::EventMetadata;

    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    app.activate_image(&["us-east-1"], OLD_IMAGE, OLD_HASH)
        .await;
    let old = app
        .active_host(launch_spec("us-east-1", OLD_IMAGE, OLD_HASH), 4)
        .await;
    // The release workflow switches the catalog and stops there, as if it crashed before retiring anything (or an
    // autoscaler pass saw the new catalog first).
    let workflow = EventMetadata::new(Actor::ReleaseWorkflow, chrono::Utc::now());
    let catalog = &app.state.services.catalog;
    let images: std::collections::BTreeMap<String, String> =
        [("us-east-1".to_string(), NEW_IMAGE.to_string())].into();
    for command in [
        ImageCatalogCommand::Prepare {
            client_commit_hash: NEW_HASH.to_string(),
            images,
            at: chrono::Utc::now(),
        },
        ImageCatalogCommand::SwapOver {
            client_commit_hash: NEW_HASH.to_string(),
            ready_regions: ["us-east-1".to_string()].into(),
            at: chrono::Utc::now(),
        },
    ] {
        catalog
            .execute_retrying(CATALOG_ID, command, &workflow.at(chrono::Utc::now()))
            .await
            .expect("the catalog takes the release");
    }
    let scaler = whist_api::workers::autoscaler::Autoscaler::new(app.state.context.clone());
    // Retirements are not fenced by the fleet's lease: any epoch will do.
    let decided = scaler.decide_once(1).await.expect("decides");
    assert_eq!(decided.retired, 1, "{decided:?}");

    let walk = why_drained(&app.state.database, &old.instance_id).await;
    let steps: Vec<(&str, &str, &str)> = walk
        .steps
        .iter()
        .map(|step| {
            (
                step.event_type.as_str(),
                step.metadata.actor.as_str(),
                step.metadata.correlation_id.as_str(),
            )
        })
        .collect();
    // The autoscaler's decision, in the release's chain.
    let chain = workflow.correlation_id.as_str();
    assert_eq!(
        steps,
        [
            ("InstanceDrainStarted", "system", chain),
            ("ImageReleaseSwappedOver", "release-workflow", chain)
        ]
    );
    assert_eq!(
        walk.root,
        whist_api::control::audit::WalkRoot::Origin {
            correlation_id: workflow.correlation_id.clone(),
            actor: "release-workflow".to_string(),
        }
    );
    app.stop().await;
}

#[tokio::test]
async fn admin_read_endpoints_want_an_admin_token() {
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    let client = http_client();
    for path in ["/admin/images", "/admin/instances", "/admin/mandelboxes"] {
        let anonymous = client.get(app.url(path)).send().await.expect("answers");
        assert_eq!(anonymous.status(), 401, "{path}");
        let user = client
            .get(app.url(path))
            .bearer_auth(user_token("not-a-developer"))
            .send()
            .await
            .expect("answers");
        assert_eq!(user.status(), 403, "{path}");
        let admin = client
            .get(app.url(path))
            .bearer_auth(admin_token("developer"))
            .send()
            .await
            .expect("answers");
        assert_eq!(admin.status(), 200, "{path}");
        let body: serde_json::Value = admin.json().await.expect("JSON");
        assert!(body.is_array(), "{path}: {body}");
    }
    app.stop().await;
}
