//! `Idempotency-Key` on assigns: a desktop app whose connection dropped after the server committed can retry with
//! the same key and gets the mandelbox it never heard of, not a second one; many requests with one key at once,
//! over two servers, give one mandelbox.

use std::time::Duration;

use serde_json::Value;
use whist_tests::fault_proxy::{FaultProxy, Mode};
use whist_tests::{
    assign_body, launch_spec, spawn_app, spawn_second_app, user_token, TestApp, TestDatabase,
};

const REGION: &str = "us-east-1";
const IMAGE: &str = "ami-keys";
const HASH: &str = "hash-keys";

/// One assign through `base` as `user` with `key`: (status, mandelbox id), or `None` when no answer came.
async fn assign_with_key(
    client: &reqwest::Client,
    base: &str,
    user: &str,
    key: Option<&str>,
    session: i64,
) -> Option<(u16, String)> {
    let mut request = client
        .post(format!("{base}/mandelbox/assign"))
        .bearer_auth(user_token(user))
        .json(&assign_body(&[REGION], HASH, session))
        .timeout(Duration::from_secs(5));
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await.ok()?;
    let status = response.status().as_u16();
    let body: Value = response.json().await.ok()?;
    Some((
        status,
        body["mandelbox_id"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    ))
}

/// The user's mandelboxes that are not dead, and every allocation of theirs in the log.
async fn holdings(app: &TestApp, user: &str) -> (i64, i64) {
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM mandelboxes WHERE user_id = $1 AND status <> 'DEAD'",
    )
    .bind(user)
    .fetch_one(app.state.database.any())
    .await
    .expect("the read model reads");
    let allocations: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'UserMandelboxReserved' AND aggregate_id = $1",
    )
    .bind(user)
    .fetch_one(app.state.database.any())
    .await
    .expect("the log reads");
    (live, allocations)
}

#[tokio::test]
async fn a_retry_with_the_same_key_after_a_lost_answer_gets_the_mandelbox_the_first_one_committed()
{
    let database = TestDatabase::postgres().await;
    let app = spawn_app(&database).await;
    app.activate_image(&[REGION], IMAGE, HASH).await;
    let _host = app.active_host(launch_spec(REGION, IMAGE, HASH), 8).await;
    let proxy = FaultProxy::start(&app.address).await;
    let client = whist_tests::http_client();
    let user = "auth0|keyed-user";
    app.subscribe(user).await;

    // The server commits the assign, and its answer is lost on the way back.
    proxy.set_mode(Mode::LoseAnswer);
    let lost = assign_with_key(&client, &proxy.url, user, Some("retry-key-1"), 1).await;
    assert!(lost.is_none(), "the answer was lost: {lost:?}");
    app.settled().await;
    assert_eq!(
        holdings(&app, user).await,
        (1, 1),
        "the first assign committed"
    );

    // The desktop app retries with the same key: the mandelbox it never heard of, and nothing new.
    proxy.set_mode(Mode::Pass);
    let (status, retried) = assign_with_key(&client, &proxy.url, user, Some("retry-key-1"), 1)
        .await
        .expect("answered");
    assert_eq!(status, 200);
    let (again_status, again) =
        assign_with_key(&client, &app.address, user, Some("retry-key-1"), 1)
            .await
            .expect("answered");
    assert_eq!((again_status, again.as_str()), (200, retried.as_str()));
    app.settled().await;
    assert_eq!(
        holdings(&app, user).await,
        (1, 1),
        "one live mandelbox, one allocation"
    );
    let original: String = sqlx::query_scalar(
        "SELECT mandelbox_id FROM mandelboxes WHERE user_id = $1 AND status <> 'DEAD'",
    )
    .bind(user)
    .fetch_one(app.state.database.any())
    .await
    .expect("reads");
    assert_eq!(retried, original, "the retry names the committed mandelbox");

    // Another key, or the same key of another user, is another assign.
    let (status, other) = assign_with_key(&client, &app.address, user, Some("retry-key-2"), 2)
        .await
        .expect("answered");
    assert_eq!(status, 200);
    assert_ne!(other, retried);
    let stranger = "auth0|keyed-stranger";
    app.subscribe(stranger).await;
    let (status, theirs) = assign_with_key(&client, &app.address, stranger, Some("retry-key-1"), 1)
        .await
        .expect("answered");
    assert_eq!(status, 200);
    assert_ne!(theirs, retried);

    // A key over the contract's 255 characters is refused before anything.
    let long = "k".repeat(256);
    let (status, _) = assign_with_key(&client, &app.address, user, Some(&long), 3)
        .await
        .expect("answered");
    assert_eq!(status, 400);
    app.settled().await;
    assert_eq!(holdings(&app, user).await, (2, 2));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_assigns_with_one_key_at_once_over_two_servers_give_one_mandelbox() {
    let database = TestDatabase::postgres().await;
    let first = spawn_app(&database).await;
    let second = spawn_second_app(&database, &first).await;
    first.activate_image(&[REGION], IMAGE, HASH).await;
    let _host = first
        .active_host(launch_spec(REGION, IMAGE, HASH), 32)
        .await;
    second.settled().await;
    let user = "auth0|keyed-at-once";
    first.subscribe(user).await;
    let client = whist_tests::http_client();
    let bases = [first.address.clone(), second.address.clone()];
    let answers = futures::future::join_all((0..16).map(|index| {
        let client = client.clone();
        let base = bases[index % 2].clone();
        async move { assign_with_key(&client, &base, user, Some("one-key-for-all"), 1).await }
    }))
    .await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|answer| {
            let (status, id) = answer.clone().expect("answered");
            assert_eq!(status, 200, "{answers:?}");
            id
        })
        .collect();
    assert_eq!(ids.len(), 1, "one mandelbox for every request: {ids:?}");
    first.settled().await;
    assert_eq!(holdings(&first, user).await, (1, 1));
    second.stop().await;
    first.stop().await;
}
