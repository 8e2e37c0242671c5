//! Two `serve` processes on one database, many concurrent assigns, fewer slots than requests: no slot is ever held
//! twice and no host goes over capacity.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use whist_adapters::store::AggregateStore;
use whist_adapters::tokens::Tokens;
use whist_domain::instance::Instance;
use whist_tests::{
    admin_token, assign_body, free_port, launch_spec, spawn_app, spawn_second_app, user_token,
    ChildProcess, TestDatabase,
};

const HOSTS: usize = 12;
const CAPACITY: u32 = 40;
const REQUESTS: usize = 2_000;
const CLIENTS: usize = 64;

#[tokio::test]
async fn two_servers_never_give_one_slot_twice_nor_overfill_a_host() {
    let test_database = TestDatabase::postgres_for(40).await;
    let database = test_database.open().await;
    let url = test_database.url.clone().expect("url");
    let host_service_port = whist_tests::host_service_port();
    let mut servers = Vec::new();
    for index in 0..2 {
        let port = free_port();
        let mut server = ChildProcess::start(
            &crate::whist_binary(),
            &["serve"],
            test_database.data_dir.path(),
            &[
                ("DATABASE_URL", url.clone()),
                ("PORT", port.to_string()),
                ("ASSIGN_RATE_LIMIT_PER_MINUTE", "0".to_string()),
                ("ASSIGN_RATE_LIMIT_PER_IP_PER_MINUTE", "0".to_string()),
                ("HOST_SERVICE_PORT", host_service_port.to_string()),
                // Hosts come from outside (this test), as they would from EC2.
                ("WHIST_CLOUD", "aws".to_string()),
                ("WHIST_AUTOSCALE", "false".to_string()),
                ("RUST_LOG", "warn".to_string()),
            ],
            &format!("serve-{index}.log"),
        );
        server.wait_healthy(Duration::from_secs(60)).await;
        servers.push((server, port));
    }
    let ports: Vec<u16> = servers.iter().map(|(_, port)| *port).collect();

    // The fleet: launches recorded here, registrations over HTTP like real hosts.
    let tokens = Tokens::load(&database).await.expect("the server key");
    let instances = AggregateStore::<Instance>::new(&database, ());
    let client = whist_tests::http_client();
    let spec = launch_spec("us-east-1", "ami-load", "hash-load");
    let mut hosts = Vec::new();
    for host in 0..HOSTS {
        let (instance_id, bootstrap) =
            whist_tests::record_launch(&instances, &tokens, spec.clone()).await;
        hosts.push(
            whist_tests::start_host(
                &instance_id,
                &bootstrap,
                &spec,
                CAPACITY,
                &format!("http://127.0.0.1:{}", ports[host % 2]),
                host_service_port,
            )
            .await,
        );
    }
    let any = database.any().clone();
    assert!(
        whist_tests::eventually(Duration::from_secs(30), || {
            let any = any.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM instances WHERE status = 'ACTIVE'",
                )
                .fetch_one(&any)
                .await
                .unwrap_or(0)
                    == HOSTS as i64
            }
        })
        .await,
        "every host is active in the read model"
    );

    // The load: REQUESTS assigns from CLIENTS concurrent clients, alternating between the two servers.
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let next = next.clone();
        let client = client.clone();
        let ports = ports.clone();
        clients.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let request = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if request >= REQUESTS {
                    return outcomes;
                }
                let response = client
                    .post(format!(
                        "http://127.0.0.1:{}/mandelbox/assign",
                        ports[request % 2]
                    ))
                    // Developers are served without a subscription: this test is about slots, not billing.
                    .bearer_auth(admin_token(&format!("load-user-{request}")))
                    .json(&assign_body(&["us-east-1"], "hash-load", request as i64))
                    .send()
                    .await
                    .expect("answers");
                let status = response.status().as_u16();
                let body: serde_json::Value = response.json().await.expect("json");
                outcomes.push((status, body));
            }
        }));
    }
    let mut assigned = Vec::new();
    let mut refused = 0;
    for client in clients {
        for (status, body) in client.await.expect("the client ran") {
            match status {
                200 => assigned.push(body["mandelbox_id"].as_str().expect("id").to_string()),
                503 if body["error"] == "NO_INSTANCE_AVAILABLE" => refused += 1,
                other => {
                    let logs: Vec<String> = servers
                        .iter()
                        .map(|(server, _)| {
                            server
                                .log_text()
                                .lines()
                                .filter(|line| line.contains("ERROR") || line.contains("WARN"))
                                .take(20)
                                .collect::<Vec<_>>()
                                .join("\n")
                        })
                        .collect();
                    panic!(
                        "unexpected answer {other}: {body}\n{}",
                        logs.join("\n---\n")
                    );
                }
            }
        }
    }
    assert_eq!(assigned.len() + refused, REQUESTS);

    // The truth is the log: every allocation event, per host.
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT aggregate_id, CAST(payload AS TEXT) FROM events \
         WHERE aggregate_type = 'instance' AND event_type = 'InstanceMandelboxAllocated'",
    )
    .fetch_all(database.any())
    .await
    .expect("reads");
    let mut per_host: HashMap<String, usize> = HashMap::new();
    let mut allocated = HashSet::new();
    for (instance_id, payload) in rows {
        *per_host.entry(instance_id).or_default() += 1;
        let payload: serde_json::Value = serde_json::from_str(&payload).expect("json");
        let mandelbox_id = payload["MandelboxAllocated"]["mandelbox_id"]
            .as_str()
            .expect("id")
            .to_string();
        assert!(
            allocated.insert(mandelbox_id),
            "a mandelbox was allocated twice"
        );
    }
    for (instance_id, count) in &per_host {
        assert!(
            *count <= CAPACITY as usize,
            "host {instance_id} holds {count} > {CAPACITY}"
        );
    }
    let answered: HashSet<String> = assigned.iter().cloned().collect();
    assert_eq!(
        answered.len(),
        assigned.len(),
        "two requests got the same mandelbox"
    );
    assert!(
        answered.is_subset(&allocated),
        "every answered mandelbox holds a slot"
    );
    assert_eq!(
        allocated.len(),
        answered.len(),
        "every slot taken belongs to an answered request"
    );
    let slots = HOSTS * CAPACITY as usize;
    assert!(assigned.len() <= slots);
    println!(
        "2 servers, {CLIENTS} clients, {REQUESTS} requests, {slots} slots: {} assigned, {refused} refused",
        assigned.len()
    );
    for (server, _) in servers {
        server.kill();
    }
}

/// The protocol server repeats a disconnect on the second server after the first recorded it (its answer was
/// lost). The second server's remembered copies of the host and of the mandelbox are behind the first's writes, and
/// the copies it reads fresh for the user and the session decide nothing: it must take the decision on copies that
/// are all fresh at once, and answer 200 recording nothing. (Marking only the copies that were behind let them take
/// turns being behind, attempt after attempt: ten attempts, then 503, on every retry.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_repeated_on_a_server_whose_copies_are_behind_answers_200_and_records_nothing()
{
    const REGION: &str = "us-east-1";
    const IMAGE: &str = "ami-behind";
    const HASH: &str = "hash-behind";
    let database = TestDatabase::postgres_for(40).await;
    let first = spawn_app(&database).await;
    let second = spawn_second_app(&database, &first).await;
    first.activate_image(&[REGION], IMAGE, HASH).await;
    let _host = first.active_host(launch_spec(REGION, IMAGE, HASH), 8).await;
    second.settled().await;

    // The second server remembers the host: it places a mandelbox of its own there.
    let (status, body) = second
        .assign(
            &user_token("auth0|behind-own"),
            assign_body(&[REGION], HASH, 1),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // The first server places a mandelbox and ends it: the host's copy on the second is now behind.
    let (status, body) = first
        .assign(
            &user_token("auth0|behind-left"),
            assign_body(&[REGION], HASH, 1),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let mandelbox_id = body["mandelbox_id"].as_str().expect("an id").to_string();
    assert_eq!(first.disconnect(&mandelbox_id).await, 200);
    first.settled().await;
    second.settled().await;
    // The events of what the disconnect decides on: the mandelbox, its user and session, its slot on the host (the
    // fleet's own decisions, such as the buffer's, may go on meanwhile).
    let events = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM events WHERE aggregate_id IN ($1, 'auth0|behind-left') \
             OR aggregate_id LIKE 'auth0|behind-left/%' \
             OR (event_type = 'InstanceMandelboxFreed' AND CAST(payload AS TEXT) LIKE '%' || $1 || '%')",
        )
        .bind(&mandelbox_id)
        .fetch_one(first.state.database.any())
        .await
        .expect("the log reads")
    };
    let before = events().await;

    for repeat in 0..3 {
        assert_eq!(
            second.disconnect(&mandelbox_id).await,
            200,
            "repeat {repeat} of the disconnect on the second server"
        );
    }
    assert_eq!(
        events().await,
        before,
        "a repeated disconnect records nothing"
    );
    second.stop().await;
    first.stop().await;
}

/// Two servers fill different hosts: while its own share (by rendezvous hashing over the live members) has room,
/// each server assigns there, so the two do not race for the same fullest host.
#[tokio::test]
async fn two_servers_fill_the_hosts_of_their_own_share_first() {
    use whist_adapters::store::members::owner;
    let database = TestDatabase::postgres_for(40).await;
    let first = spawn_app(&database).await;
    let second = spawn_second_app(&database, &first).await;
    assert!(
        whist_tests::eventually(Duration::from_secs(10), || async {
            first.state.services.members.live().len() == 2
                && second.state.services.members.live().len() == 2
        })
        .await,
        "each server sees both as members"
    );
    let spec = launch_spec("us-east-1", "ami-share", "hash-share");
    let mut hosts = Vec::new();
    for _ in 0..12 {
        hosts.push(first.active_host(spec.clone(), 10).await);
    }
    for host in &hosts {
        second.wait_for_instance(&host.instance_id, "ACTIVE").await;
    }
    let live = first.state.services.members.live();
    assert_eq!(live, second.state.services.members.live());
    let mut owned_somewhere = 0;
    for app in [&first, &second] {
        let me = app.state.services.members.id().to_string();
        let own: HashSet<&str> = hosts
            .iter()
            .map(|host| host.instance_id.as_str())
            .filter(|host| owner(&live, host) == Some(me.as_str()))
            .collect();
        if own.is_empty() {
            // One chance in 2,048: every host hashed to the other member; this one falls back to theirs.
            continue;
        }
        owned_somewhere += 1;
        for session in 0..4 {
            let user = format!("auth0|share-{}", uuid::Uuid::new_v4().simple());
            let (status, body) = app
                .assign(
                    &user_token(&user),
                    assign_body(&["us-east-1"], "hash-share", session),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            let mandelbox_id = body["mandelbox_id"].as_str().expect("an id");
            let (mandelbox, _) = app
                .state
                .services
                .mandelboxes
                .load_caught_up(mandelbox_id)
                .await
                .expect("the mandelbox");
            let host = mandelbox.placement.expect("placed").instance_id;
            assert!(
                own.contains(host.as_str()),
                "an assign of member {me} went to {host}, not one of its own {own:?}"
            );
        }
    }
    assert!(owned_somewhere >= 1);
    second.stop().await;
    first.stop().await;
}

/// One user's assigns at once in one process queue on the user's lock instead of colliding on the user's aggregate
/// (a collision costs a catch-up read and another attempt, and under a backlog collisions fed it): none loses an
/// attempt to another, and the user's limit still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_assigns_at_once_in_one_process_queue_instead_of_colliding() {
    const REGION: &str = "us-east-1";
    const IMAGE: &str = "ami-queued";
    const HASH: &str = "hash-queued";
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    app.activate_image(&[REGION], IMAGE, HASH).await;
    let _host = app.active_host(launch_spec(REGION, IMAGE, HASH), 16).await;
    let token = user_token("auth0|queued");
    // The first assign subscribes the user; it is ended before the burst.
    let (status, body) = app.assign(&token, assign_body(&[REGION], HASH, 1)).await;
    assert_eq!(status, 200, "{body}");
    let first = body["mandelbox_id"].as_str().expect("an id").to_string();
    assert_eq!(app.disconnect(&first).await, 200);

    let answers = futures::future::join_all(
        (2..10).map(|session| app.assign(&token, assign_body(&[REGION], HASH, session))),
    )
    .await;
    let assigned = answers.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(assigned, 3, "the user's limit: {answers:?}");

    let metrics = app.metrics().await;
    let conflicts: f64 = metrics
        .lines()
        .filter(|line| line.starts_with("whist_assign_conflicts_total"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        conflicts, 0.0,
        "an assign lost an attempt to another of the same user"
    );
    app.stop().await;
}
