//! The `jobs` projection plans side effects: one job per decision that needs the outside world, keyed by the
//! decision so that seeing an event twice plans nothing twice.
//!
//! Unlike a read model it is not rebuilt: a rebuild would plan every past side effect again. The reconciler
//! that runs the jobs is level-triggered anyway (it checks the aggregate before acting), so a stale job is skipped.

use async_trait::async_trait;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use sqlx::AnyConnection;
use whist_adapters::store::{values_placeholders, LoggedEvent};
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
        let mut planned = Vec::new();
        for event in events {
            if let Some((kind, key, payload)) = plan(event)? {
                let payload = serde_json::to_string(&payload)
                    .map_err(|error| ProjectionError::unreadable(event, error))?;
                planned.push(((kind, key, payload), event.aggregate_id.as_str()));
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
                    .bind(kind.as_str())
                    .bind(format!("{}:{key}", kind.as_str()))
                    .bind(*aggregate_id)
                    .bind(payload.as_str())
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
