//! Job claims and outcomes: a job is claimed first by the reconciler its decision names; outcomes are written in
//! batches, each only over the claim that ran the job.

use whist_api::workers::job_outcomes::{JobOutcome, OutcomeWriter};
use whist_projections::jobs::{Claimant, JobKind};
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

/// Inserts a pending job planned at `created_ms` that names `reconciler`; returns its id.
async fn pending_job(
    database: &whist_adapters::store::Database,
    key: &str,
    created_ms: i64,
    reconciler: Option<&str>,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO jobs (kind, job_key, aggregate_id, payload, status, attempts, run_after_ms, \
         claimed_until_ms, created_ms, reconciler) VALUES ('spin_up_mandelbox', $1, $1, '{}', 'pending', 0, $2, 0, \
         $2, $3) RETURNING id",
    )
    .bind(key)
    .bind(created_ms)
    .bind(reconciler)
    .fetch_one(database.any())
    .await
    .expect("a job")
}

/// The ids `reconciler` claims at `now_ms`, sorted.
async fn claimed_by(
    database: &whist_adapters::store::Database,
    reconciler: &str,
    now_ms: i64,
) -> Vec<i64> {
    let claimant = Claimant {
        reconciler,
        others_after_ms: 100,
    };
    let mut ids: Vec<i64> = whist_projections::jobs::claim(
        database,
        claimant,
        &JobKind::ALL,
        now_ms,
        now_ms + 60_000,
        64,
    )
    .await
    .expect("the database answers")
    .iter()
    .map(|job| job.id)
    .collect();
    ids.sort_unstable();
    ids
}

/// A job that names a reconciler (the process that decided it) is that reconciler's at once, and anyone's once it
/// has waited `others_after_ms`; a job that names none is anyone's at once.
async fn a_job_waits_for_the_reconciler_it_names_before_others_claim_it(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let theirs = pending_job(&database, "theirs", 1_000, Some("one")).await;
    let anyones = pending_job(&database, "anyones", 1_000, None).await;
    let mine = pending_job(&database, "mine", 1_000, Some("two")).await;
    assert_eq!(
        claimed_by(&database, "two", 1_050).await,
        vec![anyones, mine],
        "its own job and one that names none, not one that names another reconciler"
    );
    assert_eq!(
        claimed_by(&database, "three", 1_099).await,
        Vec::<i64>::new()
    );
    assert_eq!(
        claimed_by(&database, "three", 1_100).await,
        vec![theirs],
        "another's job, once it has waited"
    );
}

#[tokio::test]
async fn a_job_waits_for_the_reconciler_it_names_before_others_claim_it_on_postgres() {
    a_job_waits_for_the_reconciler_it_names_before_others_claim_it(BackendKind::Postgres).await;
}

#[tokio::test]
async fn a_job_waits_for_the_reconciler_it_names_before_others_claim_it_on_sqlite() {
    a_job_waits_for_the_reconciler_it_names_before_others_claim_it(BackendKind::Sqlite).await;
}
