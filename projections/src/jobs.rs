//! The `jobs` projection plans side effects: one job per decision that needs the outside world, keyed by the
//! decision so that seeing an event twice plans nothing twice.
//!
//! Unlike a read model it is not rebuilt: a rebuild would plan every past side effect again. The reconciler
//! that runs the jobs is level-triggered anyway (it checks the aggregate before acting), so a stale job is skipped.

use async_trait::async_trait;
use chrono::Utc;
use sqlx::AnyConnection;
use whist_adapters::store::{values_placeholders, LoggedEvent};
use whist_domain::instance::InstanceEvent;
use whist_domain::mandelbox::MandelboxEvent;

use crate::projection::{Projection, ProjectionError, Tables};

/// Planned jobs per INSERT statement.
const ROWS_PER_STATEMENT: usize = 500;

/// Kinds of job.
pub const SPIN_UP: &str = "spin_up_mandelbox";
pub const LAUNCH: &str = "launch_instance";
/// Ask a host service to drain and shut down.
pub const DRAIN: &str = "drain_host";
/// End a host in the cloud.
pub const TERMINATE: &str = "terminate_instance";
/// End a cloud instance that is no live host's (payload: region, cloud instance id).
pub const TERMINATE_STRAY: &str = "terminate_stray";

/// The job an event asks for: kind, key (unique per kind), payload.
fn plan(
    event: &LoggedEvent,
) -> Result<Option<(&'static str, String, serde_json::Value)>, ProjectionError> {
    let unreadable = |error: serde_json::Error| ProjectionError::unreadable(event, error);
    let id = event.aggregate_id.clone();
    let position = serde_json::json!({ "position": event.position });
    Ok(match event.aggregate_type.as_str() {
        "mandelbox" if event.event_type == "MandelboxAllocated" => {
            let _: MandelboxEvent = event.payload_as().map_err(unreadable)?;
            Some((SPIN_UP, id, position))
        }
        "instance" => match event.payload_as::<InstanceEvent>().map_err(unreadable)? {
            InstanceEvent::LaunchRequested { .. } => Some((LAUNCH, id, position)),
            InstanceEvent::DrainStarted { .. } => Some((DRAIN, id, position)),
            InstanceEvent::TerminationStarted { .. } => Some((TERMINATE, id, position)),
            InstanceEvent::StrayTerminated {
                region,
                cloud_instance_id,
                ..
            } => Some((
                TERMINATE_STRAY,
                cloud_instance_id.clone(),
                serde_json::json!({
                    "position": event.position,
                    "region": region,
                    "cloud_instance_id": cloud_instance_id,
                }),
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
        let mut planned = Vec::new();
        for event in events {
            if let Some(job) = plan(event)? {
                planned.push((job, event.aggregate_id.as_str()));
            }
        }
        // One statement per chunk of planned jobs; a job already planned (its key taken) is left as it is.
        let now = Utc::now().timestamp_millis();
        for chunk in planned.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO {table} (kind, job_key, aggregate_id, payload, status, attempts, run_after_ms, \
                 claimed_until_ms, created_ms) VALUES {} ON CONFLICT (job_key) DO NOTHING",
                values_placeholders(chunk.len(), 9)
            );
            let mut query = sqlx::query(&sql);
            for ((kind, key, payload), aggregate_id) in chunk {
                query = query
                    .bind(*kind)
                    .bind(format!("{kind}:{key}"))
                    .bind(*aggregate_id)
                    .bind(payload.to_string())
                    .bind("pending")
                    .bind(0i64)
                    .bind(now)
                    .bind(0i64)
                    .bind(now);
            }
            query.execute(&mut *connection).await?;
        }
        Ok(())
    }
}
