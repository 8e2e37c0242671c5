//! Asking why: `whist events trace ID` lays one chain out by cause, `whist events why TYPE ID` walks from one event
//! back to its root, on the real paths: an assign through its spin-up and its host's status reports, and a host
//! that went silent through its termination. (A release through its swap-over and the drains it caused is walked in
//! `release.rs`, on its full release.)

use std::time::Duration;

use crate::whist;
use whist_api::control::audit::{self, CausalTree, CausedEvent, WalkRoot};
use whist_tests::{
    assign_body, eventually, launch_spec, spawn_app_with, user_token, TestApp, TestDatabase,
};

const REGION: &str = "us-east-1";
const IMAGE: &str = "ami-causes";
const HASH: &str = "hash-causes";

/// The event types of a walk's steps, the event asked about first.
fn step_types(walk: &audit::CauseWalk) -> Vec<String> {
    walk.steps
        .iter()
        .map(|step| step.event_type.clone())
        .collect()
}

/// Every event of the tree, depth first, with its depth.
fn flatten(tree: &CausalTree) -> Vec<(usize, &CausedEvent)> {
    fn walk<'a>(node: &'a CausedEvent, depth: usize, into: &mut Vec<(usize, &'a CausedEvent)>) {
        into.push((depth, node));
        for child in &node.caused {
            walk(child, depth + 1, into);
        }
    }
    let mut all = Vec::new();
    for root in &tree.roots {
        walk(root, 0, &mut all);
    }
    all
}

/// Every cause in the chain resolves: the chain's own id (its root) or the position of an event of the chain.
fn assert_whole(tree: &CausalTree) {
    let positions: std::collections::HashSet<i64> = flatten(tree)
        .iter()
        .filter_map(|(_, node)| node.event.position)
        .collect();
    for (_, node) in flatten(tree) {
        let cause = node
            .event
            .metadata
            .causation_id
            .clone()
            .expect("every event names its cause");
        let resolves = cause == tree.correlation_id
            || cause
                .parse::<i64>()
                .is_ok_and(|position| positions.contains(&position));
        assert!(resolves, "{cause} resolves in the chain: {:?}", node.event);
    }
}

async fn app_with_hosts(database: &TestDatabase) -> TestApp {
    let mut settings = database.settings();
    // Hosts heartbeat every second; one silent for 4 s is unresponsive, live ones never count as falling silent.
    settings.heartbeat_timeout = Duration::from_secs(4);
    let app = spawn_app_with(database, settings).await;
    app.activate_image(&[REGION], IMAGE, HASH).await;
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assign_is_traced_through_its_spin_up_and_status_reports_back_to_its_request() {
    let database = TestDatabase::postgres().await;
    let app = app_with_hosts(&database).await;
    let _host = app.active_host(launch_spec(REGION, IMAGE, HASH), 4).await;
    let user = "auth0|why-assign";
    app.subscribe(user).await;
    let response = app
        .client
        .post(app.url("/mandelbox/assign"))
        .bearer_auth(user_token(user))
        .header("X-Request-Id", "why-assign-1")
        .json(&assign_body(&[REGION], HASH, 1))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.expect("a body");
    let mandelbox_id = body["mandelbox_id"].as_str().expect("an id").to_string();

    // The host reports CONNECTING, then RUNNING: both continue the assign's chain.
    let store = &app.state.database;
    let running = eventually(Duration::from_secs(20), || async {
        audit::history(store, "mandelbox", &mandelbox_id)
            .await
            .map(|events| events.len() >= 4)
            .unwrap_or(false)
    })
    .await;
    assert!(running, "the mandelbox spun up and its host reported twice");
    let walk = audit::why(store, "mandelbox", &mandelbox_id, None)
        .await
        .expect("the walk reads")
        .expect("the mandelbox has events");
    assert_eq!(
        step_types(&walk),
        [
            "MandelboxStatusChanged",
            "MandelboxStatusChanged",
            "MandelboxSpunUp",
            "MandelboxAllocated"
        ],
        "RUNNING, caused by CONNECTING, caused by the spin-up, caused by the allocation"
    );
    assert_eq!(
        walk.root,
        WalkRoot::Origin {
            correlation_id: "why-assign-1".to_string(),
            actor: format!("user:{user}"),
        }
    );
    assert!(walk.steps[0].metadata.actor.starts_with("host:"));

    // The tree: the assign's unit at the top (allocation, reservation, slot, session), the spin-up under the
    // allocation, the reports under the spin-up, one under the other.
    let tree = audit::trace(store, "why-assign-1")
        .await
        .expect("the chain reads")
        .expect("the chain has events");
    assert_whole(&tree);
    let depth_of = |event_type: &str| {
        flatten(&tree)
            .iter()
            .filter(|(_, node)| node.event.event_type == event_type)
            .map(|(depth, _)| *depth)
            .collect::<Vec<_>>()
    };
    assert_eq!(depth_of("MandelboxAllocated"), [0]);
    assert_eq!(depth_of("UserMandelboxReserved"), [0]);
    assert_eq!(depth_of("MandelboxSpunUp"), [1]);
    assert_eq!(depth_of("MandelboxStatusChanged"), [2, 3]);

    // The same through the binary.
    let (ok, out) = whist(
        &database,
        &["events", "why", "mandelbox", &mandelbox_id],
        "why.log",
    )
    .await;
    assert!(ok, "{out}");
    let lines: Vec<&str> = out
        .lines()
        .filter(|line| {
            line.starts_with('#') || line.starts_with("caused by") || line.starts_with("root:")
        })
        .collect();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(
        lines[0].contains("MandelboxStatusChanged by host:"),
        "{out}"
    );
    assert!(
        lines[2].starts_with("caused by #") && lines[2].contains("MandelboxSpunUp by system"),
        "{out}"
    );
    assert!(lines[3].contains("MandelboxAllocated by user:"), "{out}");
    assert_eq!(
        lines[4],
        format!("root: request why-assign-1 by user:{user}"),
        "{out}"
    );
    let (ok, out) = whist(&database, &["events", "trace", "why-assign-1"], "trace.log").await;
    assert!(ok, "{out}");
    assert!(out.contains("chain why-assign-1"), "{out}");
    let spun_up = out
        .lines()
        .find(|line| line.contains("MandelboxSpunUp"))
        .expect("the spin-up is in the tree");
    assert!(
        spun_up.starts_with("│  └─ ") || spun_up.starts_with("   └─ "),
        "{out}"
    );
    let (ok, out) = whist(
        &database,
        &["events", "trace", "no-such-chain"],
        "trace-none.log",
    )
    .await;
    assert!(
        !ok && out.contains("no event belongs to the chain"),
        "{out}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_went_silent_is_walked_from_its_end_back_to_the_sweep_that_marked_it() {
    let database = TestDatabase::postgres().await;
    let app = app_with_hosts(&database).await;
    // Two hosts keep heartbeating (a region where one host in three falls silent is not braked)...
    let spec = launch_spec(REGION, IMAGE, HASH);
    let _first = app.active_host(spec.clone(), 4).await;
    let _second = app.active_host(spec.clone(), 4).await;
    // ...and one registers by hand and never heartbeats.
    let (instance_id, bootstrap) = app.launch(spec.clone()).await;
    let response = app
        .client
        .post(app.url("/host/register"))
        .bearer_auth(bootstrap)
        .json(&crate::host::register_body(&instance_id, &spec))
        .send()
        .await
        .expect("answers");
    assert_eq!(response.status(), 200);
    app.wait_for_instance(&instance_id, "ACTIVE").await;

    // The sweeps mark it silent and decide its end (a hand-registered host has no cloud instance for the
    // reconciler to terminate: the walk starts at the decision).
    let sweeper = whist_api::workers::sweeper::Sweeper::new(app.state.context.clone());
    let store = &app.state.database;
    let terminated = eventually(Duration::from_secs(45), || async {
        let _ = sweeper.mark_silent_hosts().await;
        let _ = sweeper.end_unresponsive_hosts().await;
        audit::history(store, "instance", &instance_id)
            .await
            .map(|events| {
                events
                    .iter()
                    .any(|event| event.event_type == "InstanceTerminationStarted")
            })
            .unwrap_or(false)
    })
    .await;
    let history: Vec<String> = audit::history(store, "instance", &instance_id)
        .await
        .expect("the history reads")
        .into_iter()
        .map(|event| event.event_type)
        .collect();
    assert!(terminated, "the silent host's end was decided: {history:?}");
    let walk = audit::why(store, "instance", &instance_id, None)
        .await
        .expect("the walk reads")
        .expect("the host has events");
    assert_eq!(
        step_types(&walk),
        ["InstanceTerminationStarted", "InstanceBecameUnresponsive"],
        "the end, caused by the mark"
    );
    let WalkRoot::Origin { actor, .. } = &walk.root else {
        panic!("the walk ends at a sweep: {:?}", walk.root);
    };
    assert_eq!(actor, "system");
    let (ok, out) = whist(
        &database,
        &["events", "why", "instance", &instance_id],
        "why.log",
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("root: background pass "), "{out}");
    // Its registration was a request of the host service's, a chain of its own.
    let registered = audit::history(store, "instance", &instance_id)
        .await
        .expect("the history reads")
        .into_iter()
        .find(|event| event.event_type == "InstanceRegistered")
        .expect("the host registered")
        .sequence
        .to_string();
    let (ok, out) = whist(
        &database,
        &[
            "events",
            "why",
            "instance",
            &instance_id,
            "--sequence",
            &registered,
        ],
        "why-registered.log",
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("InstanceRegistered by host:"), "{out}");
    assert!(out.contains("root: request "), "{out}");
    app.stop().await;
}
