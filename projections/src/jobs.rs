//! The `jobs` projection plans side effects: one job per decision that needs the outside world, keyed by the
//! decision so that seeing an event twice plans nothing twice.
//!
//! Unlike a read model it is not rebuilt: a rebuild would plan every past side effect again. The reconciler
//! that runs the jobs is level-triggered anyway (it checks the aggregate before acting), so a stale job is skipped.
//!
//! A spin-up whose mandelbox ends before the reconciler has claimed it is finished here, as the reconciler would
//! finish it (`done`, nothing to do): planned finished when the end is in the same batch as the allocation, and a
//! pending one marked so when the end comes later. It then costs the reconciler no claim and no read of the
//! mandelbox (in a process that does not remember it, a whole load). One it has claimed is left to it.
//!
//! The reconciler's reads and writes of the `jobs` table live here too: [`claim`], [`renew_claim`],
//! [`write_outcomes`] and [`waiting_jobs`].

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;
use whist_adapters::store::{
    list_placeholders, values_placeholders, Backend, Database, LoggedEvent, JOBS_CHANNEL,
};
use whist_domain::instance::InstanceEvent;
use whist_domain::mandelbox::MandelboxEvent;

use crate::projection::{Projection, ProjectionError, Tables};

/// Planned jobs per INSERT statement.
const ROWS_PER_STATEMENT: usize = 500;

/// What a job does. Stored by its name (`kind` column), which must never change: jobs already planned carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// Ask a host service to start a mandelbox (key: the mandelbox).
    SpinUp,
    /// Start a host in the cloud, or a simulated one (key: the instance).
    Launch,
    /// Ask a host service to drain and shut down (key: the instance).
    Drain,
    /// End a host in the cloud (key: the instance).
    Terminate,
    /// End a cloud instance that is no live host's (key: the cloud instance; the payload names it and its region).
    TerminateStray,
}

impl JobKind {
    /// Every kind, in the order the reconciler asks for them.
    pub const ALL: [JobKind; 5] = [
        Self::SpinUp,
        Self::Launch,
        Self::Drain,
        Self::Terminate,
        Self::TerminateStray,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SpinUp => "spin_up_mandelbox",
            Self::Launch => "launch_instance",
            Self::Drain => "drain_host",
            Self::Terminate => "terminate_instance",
            Self::TerminateStray => "terminate_stray",
        }
    }

    /// The kind a stored name names, if any.
    pub fn from_stored(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }
}

/// What a job carries besides its aggregate id, as stored in the `payload` column: the position of the event that
/// planned it and, for a stray, which cloud instance to end where.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPayload {
    /// The position of the event that planned the job.
    #[serde(default)]
    pub position: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_instance_id: Option<String>,
}

/// The job an event asks for: kind, key (unique per kind), payload.
fn plan(event: &LoggedEvent) -> Result<Option<(JobKind, String, JobPayload)>, ProjectionError> {
    let unreadable = |error: serde_json::Error| ProjectionError::unreadable(event, error);
    let id = event.aggregate_id.clone();
    let planned_by = JobPayload {
        position: event.position,
        ..JobPayload::default()
    };
    Ok(match event.aggregate_type.as_str() {
        "mandelbox" if event.event_type == "MandelboxAllocated" => {
            let _: MandelboxEvent = event.payload_as().map_err(unreadable)?;
            Some((JobKind::SpinUp, id, planned_by))
        }
        "instance" => match event.payload_as::<InstanceEvent>().map_err(unreadable)? {
            InstanceEvent::LaunchRequested { .. } => Some((JobKind::Launch, id, planned_by)),
            InstanceEvent::DrainStarted { .. } => Some((JobKind::Drain, id, planned_by)),
            InstanceEvent::TerminationStarted { .. } => Some((JobKind::Terminate, id, planned_by)),
            InstanceEvent::StrayTerminated {
                region,
                cloud_instance_id,
                ..
            } => Some((
                JobKind::TerminateStray,
                cloud_instance_id.clone(),
                JobPayload {
                    position: event.position,
                    region: Some(region),
                    cloud_instance_id: Some(cloud_instance_id),
                },
            )),
            _ => None,
        },
        _ => None,
    })
}

/// The `jobs` projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobPlanner;

#[async_trait]
impl Projection for JobPlanner {
    fn name(&self) -> &'static str {
        "jobs"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["jobs"]
    }

    fn rebuildable(&self) -> bool {
        false
    }

    async fn apply(
        &self,
        connection: &mut AnyConnection,
        tables: &Tables,
        events: &[LoggedEvent],
    ) -> Result<(), ProjectionError> {
        let table = tables.get("jobs")?;
        // The mandelboxes this batch ends: their spin-ups are not needed any more.
        let ended: std::collections::HashSet<&str> = events
            .iter()
            .filter(|event| {
                event.aggregate_type == "mandelbox" && event.event_type == "MandelboxEnded"
            })
            .map(|event| event.aggregate_id.as_str())
            .collect();
        let mut planned = Vec::new();
        for event in events {
            if let Some((kind, key, payload)) = plan(event)? {
                let payload = serde_json::to_string(&payload)
                    .map_err(|error| ProjectionError::unreadable(event, error))?;
                // The chain the planning decision belongs to, continued by the job's outcome, and the trace of the
                // span that took it, continued by the job's span.
                let metadata = serde_json::from_str::<serde_json::Value>(&event.metadata).ok();
                let field = |name: &str| {
                    metadata
                        .as_ref()
                        .and_then(|metadata| metadata[name].as_str().map(str::to_string))
                };
                // A spin-up whose mandelbox this batch ends is planned finished: nothing is left to claim.
                let not_needed =
                    kind == JobKind::SpinUp && ended.contains(event.aggregate_id.as_str());
                planned.push((
                    (kind, key, payload),
                    (event.aggregate_id.as_str(), not_needed),
                    (
                        field("correlation_id"),
                        event.position,
                        field("traceparent"),
                    ),
                ));
            }
        }
        // One statement per chunk of planned jobs; a job already planned (its key taken) is left as it is.
        let now = Utc::now().timestamp_millis();
        let to_claim = planned.iter().any(|(_, (_, not_needed), _)| !not_needed);
        let planned_ends: std::collections::HashSet<&str> = planned
            .iter()
            .filter(|(_, (_, not_needed), _)| *not_needed)
            .map(|(_, (aggregate_id, _), _)| *aggregate_id)
            .collect();
        for chunk in planned.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO {table} (kind, job_key, aggregate_id, payload, status, attempts, run_after_ms, \
                 claimed_until_ms, created_ms, correlation_id, planned_by, traceparent, finished_ms) VALUES {} \
                 ON CONFLICT (job_key) DO NOTHING",
                values_placeholders(chunk.len(), 13)
            );
            let mut query = sqlx::query(&sql);
            for (
                (kind, key, payload),
                (aggregate_id, not_needed),
                (correlation_id, planned_by, traceparent),
            ) in chunk
            {
                let not_needed = *not_needed;
                query = query
                    .bind(kind.as_str())
                    .bind(format!("{}:{key}", kind.as_str()))
                    .bind(*aggregate_id)
                    .bind(payload.as_str())
                    .bind(if not_needed { "done" } else { "pending" })
                    .bind(0i64)
                    .bind(now)
                    .bind(0i64)
                    .bind(now)
                    .bind(correlation_id.as_deref())
                    .bind(*planned_by)
                    .bind(traceparent.as_deref())
                    .bind(not_needed.then_some(now));
            }
            query.execute(&mut *connection).await?;
        }
        // Spin-ups planned in earlier batches whose mandelbox this batch ends, still unclaimed.
        let earlier: Vec<String> = ended
            .iter()
            .filter(|id| !planned_ends.contains(*id))
            .map(|id| format!("{}:{id}", JobKind::SpinUp.as_str()))
            .collect();
        for chunk in earlier.chunks(ROWS_PER_STATEMENT) {
            let keys = list_placeholders(2, chunk.len());
            let sql = format!(
                "UPDATE {table} SET status = 'done', finished_ms = $1 \
                 WHERE status = 'pending' AND job_key IN ({keys})"
            );
            let mut query = sqlx::query(&sql).bind(now);
            for key in chunk {
                query = query.bind(key.as_str());
            }
            query.execute(&mut *connection).await?;
        }
        // Every process's reconciler wakes when this commits (this process's is also woken by `committed`, which
        // is what wakes it on SQLite).
        if to_claim && connection.backend_name() == "PostgreSQL" {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(JOBS_CHANNEL)
                .execute(&mut *connection)
                .await?;
        }
        Ok(())
    }

    fn committed(&self, database: &Database) {
        database.jobs_signal().planned();
    }
}

/// A claimed job.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    /// `None` for a kind this build does not know (a newer release planned it): the reconciler gives it up.
    pub kind: Option<JobKind>,
    /// The stored name of the kind, for logs and metrics.
    pub kind_name: String,
    pub aggregate_id: String,
    /// The stored payload; the default one if it cannot be read.
    pub payload: JobPayload,
    /// The attempt this claim is; also the claim's fencing token.
    pub attempts: i64,
    /// The chain of the decision that planned the job, and that event's position (both `None` for a job planned
    /// before jobs remembered them).
    pub correlation_id: Option<String>,
    pub planned_by: Option<i64>,
    /// The W3C `traceparent` of the span that took the planning decision: the job's span continues that trace.
    pub traceparent: Option<String>,
}

/// Claims up to `limit` runnable jobs of `kinds`, lowest id first, until `claimed_until_ms`: those pending whose
/// `run_after_ms` has come, and those running whose claim expired before `now_ms`. Each claim is one more attempt.
/// On Postgres the rows are taken `FOR UPDATE SKIP LOCKED`, so that processes claiming at once take different jobs,
/// by `whist_claim_jobs` (migration 0017), whose plan walks the open jobs' index and so passes the old versions of
/// finished jobs once instead of on every claim.
///
/// # Errors
/// The database failed (nothing was claimed), or a claimed row could not be read.
pub async fn claim(
    database: &Database,
    kinds: &[JobKind],
    now_ms: i64,
    claimed_until_ms: i64,
    limit: i64,
) -> Result<Vec<Job>, sqlx::Error> {
    match database.backend() {
        Backend::Postgres(pool) => {
            let kinds: Vec<&str> = kinds.iter().map(|kind| kind.as_str()).collect();
            let rows: Vec<ClaimedRow> = sqlx::query_as(
                "SELECT id, kind, aggregate_id, payload, attempts, correlation_id, planned_by, traceparent \
                 FROM whist_claim_jobs($1, $2, $3, $4)",
            )
            .bind(now_ms)
            .bind(claimed_until_ms)
            .bind(limit)
            .bind(&kinds)
            .fetch_all(pool)
            .await?;
            Ok(rows.into_iter().map(claimed).collect())
        }
        Backend::Sqlite(_) => {
            let placeholders = list_placeholders(4, kinds.len());
            let sql = format!(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, claimed_until_ms = $2 \
                 WHERE id IN (SELECT id FROM jobs WHERE status IN ('pending', 'running') \
                   AND ((status = 'pending' AND run_after_ms <= $1) \
                     OR (status = 'running' AND claimed_until_ms < $1)) \
                   AND kind IN ({placeholders}) ORDER BY id LIMIT $3) \
                 RETURNING id, kind, aggregate_id, payload, attempts, correlation_id, planned_by, traceparent"
            );
            let mut query = sqlx::query_as::<_, ClaimedRow>(&sql)
                .bind(now_ms)
                .bind(claimed_until_ms)
                .bind(limit);
            for kind in kinds {
                query = query.bind(kind.as_str());
            }
            let rows = query.fetch_all(database.any()).await?;
            Ok(rows.into_iter().map(claimed).collect())
        }
    }
}

/// A claimed row: id, kind, aggregate id, payload, attempts, correlation id, planning position, traceparent.
type ClaimedRow = (
    i64,
    String,
    String,
    String,
    i64,
    Option<String>,
    Option<i64>,
    Option<String>,
);

fn claimed(
    (id, kind_name, aggregate_id, payload, attempts, correlation_id, planned_by, traceparent): ClaimedRow,
) -> Job {
    Job {
        id,
        kind: JobKind::from_stored(&kind_name),
        kind_name,
        aggregate_id,
        payload: serde_json::from_str(&payload).unwrap_or_default(),
        attempts,
        correlation_id,
        planned_by,
        traceparent,
    }
}

/// Extends the claim `attempts` of the running job `id` until `claimed_until_ms`; whether the claim was still held
/// (`false` once another process took the job over, or its outcome is written).
///
/// # Errors
/// The database failed.
pub async fn renew_claim(
    database: &Database,
    id: i64,
    attempts: i64,
    claimed_until_ms: i64,
) -> Result<bool, sqlx::Error> {
    let renewed = sqlx::query(
        "UPDATE jobs SET claimed_until_ms = $2 WHERE id = $1 AND attempts = $3 AND status = 'running'",
    )
    .bind(id)
    .bind(claimed_until_ms)
    .bind(attempts)
    .execute(database.any())
    .await?;
    Ok(renewed.rows_affected() > 0)
}

/// The outcome of one claimed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOutcome {
    pub id: i64,
    /// The claim's attempt number: an outcome is written only over the same claim.
    pub attempts: i64,
    /// `done`, `failed` or `pending` (to be retried from `run_after_ms`).
    pub status: &'static str,
    pub run_after_ms: i64,
    pub error: Option<String>,
}

/// Writes `outcomes` in one statement, each over its job's row if that row is still running under the outcome's
/// claim; the ids of the jobs written (an outcome whose claim was taken over is not).
///
/// # Errors
/// The database failed; none was written.
pub async fn write_outcomes(
    database: &Database,
    outcomes: &[JobOutcome],
) -> Result<Vec<i64>, sqlx::Error> {
    if outcomes.is_empty() {
        return Ok(Vec::new());
    }
    // `VALUES` columns are column1… on both backends.
    let sql = format!(
        "UPDATE jobs SET status = v.column3, run_after_ms = v.column4, last_error = v.column5, \
         finished_ms = CASE WHEN v.column3 = 'done' OR v.column3 = 'failed' THEN v.column4 ELSE NULL END \
         FROM (VALUES {}) AS v \
         WHERE jobs.id = v.column1 AND jobs.attempts = v.column2 AND jobs.status = 'running' \
         RETURNING jobs.id",
        values_placeholders(outcomes.len(), 5)
    );
    let mut query = sqlx::query_scalar::<_, i64>(&sql);
    for outcome in outcomes {
        query = query
            .bind(outcome.id)
            .bind(outcome.attempts)
            .bind(outcome.status)
            .bind(outcome.run_after_ms)
            .bind(outcome.error.clone());
    }
    query.fetch_all(database.any()).await
}

/// Jobs waiting to run: pending, or running (claimed).
///
/// # Errors
/// The database failed.
pub async fn waiting_jobs(database: &Database) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status IN ('pending', 'running')")
        .fetch_one(database.any())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_kind_names_never_change() {
        let names: Vec<&str> = JobKind::ALL.iter().map(|kind| kind.as_str()).collect();
        assert_eq!(
            names,
            [
                "spin_up_mandelbox",
                "launch_instance",
                "drain_host",
                "terminate_instance",
                "terminate_stray"
            ]
        );
        for kind in JobKind::ALL {
            assert_eq!(JobKind::from_stored(kind.as_str()), Some(kind));
        }
        assert_eq!(JobKind::from_stored("mine_bitcoin"), None);
    }

    #[test]
    fn payloads_keep_their_stored_shape() {
        let planned = JobPayload {
            position: 7,
            ..JobPayload::default()
        };
        assert_eq!(
            serde_json::to_value(&planned).expect("JSON"),
            serde_json::json!({"position": 7})
        );
        let stray: JobPayload = serde_json::from_value(serde_json::json!({
            "position": 9, "region": "us-east-1", "cloud_instance_id": "i-1"
        }))
        .expect("a stored stray payload reads");
        assert_eq!(stray.region.as_deref(), Some("us-east-1"));
        assert_eq!(stray.cloud_instance_id.as_deref(), Some("i-1"));
    }
}
