//! Job claims and outcomes: spin-ups left first to the process that assigned them; outcomes written in batches,
//! each only over the claim that ran the job.

use whist_api::workers::job_outcomes::{JobOutcome, OutcomeWriter};
use whist_tests::{BackendKind, TestDatabase};

/// Inserts a running job claimed at `attempts`; returns its id.
async fn running_job(database: &whist_adapters::store::Database, key: &str, attempts: i64) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO jobs (kind, job_key, aggregate_id, payload, status, attempts, run_after_ms, \
         claimed_until_ms, created_ms) VALUES ('spin_up_mandelbox', $1, $1, '{}', 'running', $2, 0, 0, 0) \
         RETURNING id",
    )
    .bind(key)
    .bind(attempts)
    .fetch_one(database.any())
    .await
    .expect("a job")
}

async fn job_row(
    database: &whist_adapters::store::Database,
    id: i64,
) -> (String, Option<String>, Option<i64>) {
    let row: (String, Option<String>, Option<i64>) =
        sqlx::query_as("SELECT status, last_error, finished_ms FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_one(database.any())
            .await
            .expect("the job");
    row
}

async fn an_outcome_is_written_only_over_the_claim_that_ran_the_job(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let writer = OutcomeWriter::start(database.clone());
    // Many at once, as jobs finish under load: they share statements, and each gets its own answer.
    let mut ids = Vec::new();
    for index in 0..40 {
        ids.push(running_job(&database, &format!("job-{index}"), 2).await);
    }
    let mut answers = Vec::new();
    for (index, id) in ids.iter().enumerate() {
        let writer = writer.clone();
        let outcome = JobOutcome {
            id: *id,
            // Every fourth job was taken over by another process: its claim is at attempt 3 now.
            attempts: if index % 4 == 0 { 1 } else { 2 },
            status: if index % 2 == 0 { "done" } else { "pending" },
            run_after_ms: 1_000,
            error: (index % 2 == 1).then(|| "the host did not answer".to_string()),
        };
        answers.push(tokio::spawn(async move { writer.record(outcome).await }));
    }
    for (index, answer) in answers.into_iter().enumerate() {
        let written = answer.await.expect("ran").expect("the database answers");
        assert_eq!(written, index % 4 != 0, "job {index}");
        let (status, error, finished) = job_row(&database, ids[index]).await;
        match (index % 4 == 0, index % 2 == 0) {
            (true, _) => assert_eq!(
                (status.as_str(), error, finished),
                ("running", None, None),
                "a stale claim's outcome changes nothing"
            ),
            (false, true) => assert_eq!(
                (status.as_str(), error, finished),
                ("done", None, Some(1_000))
            ),
            (false, false) => assert_eq!(
                (status.as_str(), error.as_deref(), finished),
                ("pending", Some("the host did not answer"), None)
            ),
        }
    }
}

#[tokio::test]
async fn an_outcome_is_written_only_over_the_claim_that_ran_the_job_on_postgres() {
    an_outcome_is_written_only_over_the_claim_that_ran_the_job(BackendKind::Postgres).await;
}

#[tokio::test]
async fn an_outcome_is_written_only_over_the_claim_that_ran_the_job_on_sqlite() {
    an_outcome_is_written_only_over_the_claim_that_ran_the_job(BackendKind::Sqlite).await;
}

/// Inserts a pending job of `kind` on `aggregate_id`, runnable from `run_after_ms`.
async fn pending_job(
    database: &whist_adapters::store::Database,
    kind: &str,
    aggregate_id: &str,
    run_after_ms: i64,
) {
    sqlx::query(
        "INSERT INTO jobs (kind, job_key, aggregate_id, payload, status, attempts, run_after_ms, \
         claimed_until_ms, created_ms) VALUES ($1, $2, $3, '{}', 'pending', 0, $4, 0, 0)",
    )
    .bind(kind)
    .bind(format!("{kind}:{aggregate_id}"))
    .bind(aggregate_id)
    .bind(run_after_ms)
    .execute(database.any())
    .await
    .expect("a job");
}

/// A claim takes at once the spin-ups of the mandelboxes its process assigned (ids that need quoting included) and
/// any other kind of job, and another process's spin-up only once it has waited for that process's reconciler.
async fn a_claim_leaves_another_processs_spin_up_to_it_until_it_has_waited(kind: BackendKind) {
    use whist_projections::jobs::{claim, JobKind, SpinUpsFirst};
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let now = 1_000_000;
    pending_job(&database, "spin_up_mandelbox", "mine", now - 10).await;
    pending_job(&database, "spin_up_mandelbox", "odd \"id\", {x}", now - 10).await;
    pending_job(&database, "spin_up_mandelbox", "theirs", now - 10).await;
    pending_job(&database, "spin_up_mandelbox", "theirs-waited", now - 500).await;
    pending_job(&database, JobKind::Drain.as_str(), "i-1", now - 10).await;
    let own = ["mine".to_string(), "odd \"id\", {x}".to_string()];
    let claimed = claim(
        &database,
        &JobKind::ALL,
        now,
        now + 60_000,
        100,
        SpinUpsFirst {
            own: &own,
            others_before_ms: now - 100,
        },
    )
    .await
    .expect("claims");
    let mut ids = claimed
        .iter()
        .map(|job| job.aggregate_id.as_str())
        .collect::<Vec<_>>();
    ids.sort_unstable();
    assert_eq!(
        ids,
        ["i-1", "mine", "odd \"id\", {x}", "theirs-waited"],
        "the other process's fresh spin-up is left to it"
    );
    let later = claim(
        &database,
        &JobKind::ALL,
        now + 200,
        now + 60_000,
        100,
        SpinUpsFirst {
            own: &[],
            others_before_ms: now + 100,
        },
    )
    .await
    .expect("claims");
    assert_eq!(
        later
            .iter()
            .map(|job| job.aggregate_id.as_str())
            .collect::<Vec<_>>(),
        ["theirs"],
        "taken once it has waited"
    );
}

#[tokio::test]
async fn a_claim_leaves_another_processs_spin_up_to_it_until_it_has_waited_on_postgres() {
    a_claim_leaves_another_processs_spin_up_to_it_until_it_has_waited(BackendKind::Postgres).await;
}

#[tokio::test]
async fn a_claim_leaves_another_processs_spin_up_to_it_until_it_has_waited_on_sqlite() {
    a_claim_leaves_another_processs_spin_up_to_it_until_it_has_waited(BackendKind::Sqlite).await;
}
