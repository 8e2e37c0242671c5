//! Jobs as the reconciler takes them: claimed runnable ones first by id, and the outcomes written in batches, each
//! only over the claim that ran the job.

use whist_adapters::store::{Backend, Database};
use whist_api::workers::job_outcomes::{JobOutcome, OutcomeWriter};
use whist_projections::jobs::{claim, JobKind};
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

/// Inserts a job of `kind` as the planner would, then sets its status and times; returns its id.
async fn job(
    database: &Database,
    key: &str,
    kind: &str,
    (status, run_after_ms, claimed_until_ms): (&str, i64, i64),
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO jobs (kind, job_key, aggregate_id, payload, status, attempts, run_after_ms, \
         claimed_until_ms, created_ms) VALUES ($1, $2, $2, '{}', $3, 0, $4, $5, 0) RETURNING id",
    )
    .bind(kind)
    .bind(key)
    .bind(status)
    .bind(run_after_ms)
    .bind(claimed_until_ms)
    .fetch_one(database.any())
    .await
    .expect("a job")
}

async fn a_claim_takes_runnable_jobs_of_its_kinds_lowest_id_first(kind: BackendKind) {
    let test_database = TestDatabase::new(kind).await;
    let database = test_database.open().await;
    let spin_up = JobKind::SpinUp.as_str();
    let now = 10_000;
    let expired = job(&database, "expired", spin_up, ("running", 0, now - 1)).await;
    let due = job(&database, "due", spin_up, ("pending", now, 0)).await;
    job(&database, "later", spin_up, ("pending", now + 1, 0)).await;
    job(&database, "held", spin_up, ("running", 0, now)).await;
    job(&database, "finished", spin_up, ("done", 0, 0)).await;
    job(
        &database,
        "other",
        JobKind::Launch.as_str(),
        ("pending", 0, 0),
    )
    .await;
    let third = job(&database, "third", spin_up, ("pending", 0, 0)).await;

    let first = claim(&database, &[JobKind::SpinUp], now, now + 500, 2)
        .await
        .expect("a claim");
    let taken: Vec<(i64, &str, i64)> = first
        .iter()
        .map(|job| (job.id, job.aggregate_id.as_str(), job.attempts))
        .collect();
    assert_eq!(taken, vec![(expired, "expired", 1), (due, "due", 1)]);
    let second = claim(&database, &[JobKind::SpinUp], now, now + 500, 10)
        .await
        .expect("a claim");
    assert_eq!(
        second.iter().map(|job| job.id).collect::<Vec<_>>(),
        vec![third],
        "not yet due, held by a live claim, finished, of another kind, or claimed just now: none is taken"
    );
    assert_eq!(second[0].kind, Some(JobKind::SpinUp));
    let (status, claimed_until): (String, i64) =
        sqlx::query_as("SELECT status, claimed_until_ms FROM jobs WHERE id = $1")
            .bind(third)
            .fetch_one(database.any())
            .await
            .expect("the job");
    assert_eq!((status.as_str(), claimed_until), ("running", now + 500));
    assert!(claim(&database, &[JobKind::SpinUp], now, now + 500, 10)
        .await
        .expect("a claim")
        .is_empty());
}

#[tokio::test]
async fn a_claim_takes_runnable_jobs_of_its_kinds_lowest_id_first_on_postgres() {
    a_claim_takes_runnable_jobs_of_its_kinds_lowest_id_first(BackendKind::Postgres).await;
}

#[tokio::test]
async fn a_claim_takes_runnable_jobs_of_its_kinds_lowest_id_first_on_sqlite() {
    a_claim_takes_runnable_jobs_of_its_kinds_lowest_id_first(BackendKind::Sqlite).await;
}

/// Every finished job leaves old versions in the table's indexes until vacuum: a claim must pass them once, not
/// on every call (a bitmap scan visited each one's heap page again on every claim: 941 pages, 1.6 ms, after 22,000
/// jobs). Heap pages read are counted by Postgres for the current transaction.
#[tokio::test]
async fn a_claim_passes_the_old_versions_of_finished_jobs_once() {
    let test_database = TestDatabase::postgres().await;
    let database = test_database.open().await;
    // Nothing of this process reads the log meanwhile (its snapshots would keep old versions visible a little
    // longer).
    database.following().stop();
    let Backend::Postgres(pool) = database.backend() else {
        panic!("a Postgres database");
    };
    // As the reconciler takes them: planned pending, claimed running, written done; vacuum never runs here.
    sqlx::query("ALTER TABLE jobs SET (autovacuum_enabled = false)")
        .execute(pool)
        .await
        .expect("autovacuum off for the table");
    for batch in 0..20 {
        for index in 0..100 {
            job(
                &database,
                &format!("job-{batch}-{index}"),
                JobKind::SpinUp.as_str(),
                ("pending", 0, 0),
            )
            .await;
        }
        let claimed = claim(&database, &[JobKind::SpinUp], 1, 2, 1_000)
            .await
            .expect("a claim");
        assert_eq!(claimed.len(), 100);
        sqlx::query("UPDATE jobs SET status = 'done' WHERE status = 'running'")
            .execute(pool)
            .await
            .expect("outcomes");
    }
    // A claim marks an old version dead once no transaction can see it any more (at once here, unless another
    // transaction still holds an older snapshot, as one may on a busy machine): from then on an empty claim reads no
    // heap page for it. A bitmap scan never marks one, and every claim reads them all again.
    let mut pages = Vec::new();
    for _ in 0..100 {
        let mut transaction = pool.begin().await.expect("a transaction");
        let claimed: Vec<(i64,)> =
            sqlx::query_as("SELECT id FROM whist_claim_jobs(1, 2, 64, ARRAY['spin_up_mandelbox'])")
                .fetch_all(&mut *transaction)
                .await
                .expect("a claim");
        assert!(claimed.is_empty());
        let heap_pages: i64 =
            sqlx::query_scalar("SELECT pg_stat_get_xact_blocks_hit('jobs'::regclass)")
                .fetch_one(&mut *transaction)
                .await
                .expect("the transaction's reads of the jobs table");
        transaction.rollback().await.expect("rolled back");
        pages.push(heap_pages);
        if heap_pages <= 2 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("empty claims kept reading the heap pages of old versions: {pages:?}");
}
