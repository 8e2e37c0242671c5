//! The suite's own admission to the shared Postgres server (`whist_tests::connection_budget`).

use std::time::Duration;

use whist_tests::connection_budget::admit;
use whist_tests::private_postgres::PrivatePostgres;

#[tokio::test]
async fn a_share_beyond_the_budget_waits_until_a_test_gives_its_own_back() {
    // A server of its own (max_connections 100: 18 tokens of 5), so that the suite's tests do not take part.
    let server = PrivatePostgres::start().await;
    let url = server.url("postgres");
    // Two shares of half the budget each are admitted at once.
    let first = tokio::time::timeout(Duration::from_secs(10), admit(&url, 45))
        .await
        .expect("half the budget is admitted at once");
    let second = tokio::time::timeout(Duration::from_secs(10), admit(&url, 45))
        .await
        .expect("the other half too");
    // The whole budget is held: the next share waits for some of it.
    let mut waiting = tokio::spawn({
        let url = url.clone();
        async move { admit(&url, 5).await }
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(700), &mut waiting)
            .await
            .is_err(),
        "a share beyond the budget waits"
    );
    drop(first);
    let admitted = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the share is admitted once a test gives its share back")
        .expect("the admission finishes");
    drop(second);
    drop(admitted);
}
