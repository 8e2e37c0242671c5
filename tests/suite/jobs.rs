//! Job outcomes: written in batches, each only over the claim that ran the job.

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
