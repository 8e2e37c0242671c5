//! The reconciler: runs the side-effect jobs the `jobs` projection planned, at least once each, and records what
//! happened as commands. Level-triggered: before acting it checks the aggregate, so a job whose decision is already
//! carried out (or overtaken) is simply marked done. Any number of processes may run it: a job is claimed
//! (`FOR UPDATE SKIP LOCKED` on Postgres) for a minute at a time, and a claim that expires is taken again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::Row;
use tokio::sync::{watch, Mutex};
use whist_adapters::config::CloudKind;
use whist_adapters::ec2::{Ec2Error, LaunchRequest};
use whist_adapters::host_client::{HostClient, SpinUp};
use whist_adapters::simulated_host::{self, SimulatedHost, SimulatedHostSpec};
use whist_adapters::store::CommandError;
use whist_adapters::tokens::Purpose;
use whist_domain::instance::{InstanceCommand, InstanceStatus, LaunchSpec};
use whist_domain::mandelbox::{EndReason, MandelboxCommand, MandelboxStatus};
use whist_domain::{Actor, EventMetadata};
use whist_projections::jobs::{LAUNCH, SPIN_UP};

use crate::state::AppState;

/// Mandelbox slots of a simulated host.
pub const SIMULATED_CAPACITY: u32 = 4;
/// Attempts before a job is given up.
const MAX_ATTEMPTS: i64 = 6;
/// How long a claim lasts.
const CLAIM_MS: i64 = 60_000;

/// A claimed job.
#[derive(Debug, Clone)]
struct Job {
    id: i64,
    kind: String,
    aggregate_id: String,
    attempts: i64,
}

/// What running a job came to.
enum Outcome {
    Done,
    Retry(String),
    GiveUp(String),
}

/// Runs jobs until shut down.
#[derive(Clone)]
pub struct Reconciler {
    state: AppState,
    hosts: HostClient,
    simulated: Arc<Mutex<HashMap<String, SimulatedHost>>>,
}

impl Reconciler {
    pub fn new(state: AppState) -> Self {
        let hosts = HostClient::new(
            &state.settings.host_service_scheme,
            state.settings.host_service_port,
            state.settings.cloud == CloudKind::Local,
        );
        Self {
            state,
            hosts,
            simulated: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Kinds this process runs: launching goes to simulated hosts (`local`) or EC2 (`aws`).
    fn kinds(&self) -> Vec<&'static str> {
        vec![SPIN_UP, LAUNCH]
    }

    /// Claims up to `limit` runnable jobs.
    async fn claim(&self, limit: i64) -> Result<Vec<Job>, sqlx::Error> {
        let now = Utc::now().timestamp_millis();
        let kinds = self.kinds();
        let placeholders: Vec<String> = (0..kinds.len())
            .map(|index| format!("${}", index + 4))
            .collect();
        let lock = if self.state.database.is_postgres() {
            " FOR UPDATE SKIP LOCKED"
        } else {
            ""
        };
        let sql = format!(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, claimed_until_ms = $2 \
             WHERE id IN (SELECT id FROM jobs WHERE ((status = 'pending' AND run_after_ms <= $1) \
               OR (status = 'running' AND claimed_until_ms < $1)) AND kind IN ({}) ORDER BY id LIMIT $3{lock}) \
             RETURNING id, kind, aggregate_id, attempts",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql).bind(now).bind(now + CLAIM_MS).bind(limit);
        for kind in kinds {
            query = query.bind(kind);
        }
        let rows = query.fetch_all(self.state.database.any()).await?;
        rows.iter()
            .map(|row| {
                Ok(Job {
                    id: row.try_get("id")?,
                    kind: row.try_get("kind")?,
                    aggregate_id: row.try_get("aggregate_id")?,
                    attempts: row.try_get("attempts")?,
                })
            })
            .collect()
    }

    async fn finish(&self, job: &Job, outcome: Outcome) -> Result<(), sqlx::Error> {
        let now = Utc::now().timestamp_millis();
        let (status, run_after, error) = match outcome {
            Outcome::Done => ("done", now, None),
            Outcome::Retry(error) if job.attempts < MAX_ATTEMPTS => {
                let backoff = 250i64 << job.attempts.clamp(0, 8);
                ("pending", now + backoff, Some(error))
            }
            Outcome::Retry(error) | Outcome::GiveUp(error) => ("failed", now, Some(error)),
        };
        if let Some(error) = &error {
            tracing::warn!(
                job = job.id,
                kind = job.kind,
                aggregate_id = job.aggregate_id,
                error,
                status,
                "job did not complete"
            );
        }
        sqlx::query(
            "UPDATE jobs SET status = $2, run_after_ms = $3, last_error = $4, \
             finished_ms = CASE WHEN $2 = 'done' OR $2 = 'failed' THEN $3 ELSE NULL END WHERE id = $1",
        )
        .bind(job.id)
        .bind(status)
        .bind(run_after)
        .bind(error)
        .execute(self.state.database.any())
        .await?;
        if status == "failed" && job.kind == SPIN_UP {
            self.abandon_mandelbox(&job.aggregate_id).await;
        }
        metrics::counter!("whist_jobs_total", "kind" => job.kind.clone(), "status" => status)
            .increment(1);
        Ok(())
    }

    async fn run_job(&self, job: &Job) -> Outcome {
        match job.kind.as_str() {
            SPIN_UP => self.spin_up(&job.aggregate_id).await,
            LAUNCH => match self.state.settings.cloud {
                CloudKind::Local => self.launch_simulated(&job.aggregate_id).await,
                CloudKind::Aws => self.launch_ec2(&job.aggregate_id).await,
            },
            other => Outcome::GiveUp(format!("unknown job kind {other}")),
        }
    }

    async fn spin_up(&self, mandelbox_id: &str) -> Outcome {
        let services = &self.state.services;
        let mandelbox = match services.mandelboxes.load(mandelbox_id).await {
            Ok((mandelbox, _)) => mandelbox,
            Err(error) => return Outcome::Retry(error.to_string()),
        };
        let (Some(MandelboxStatus::Allocated), Some(placement)) =
            (mandelbox.status, mandelbox.placement)
        else {
            // Already started, or ended: nothing to do.
            return Outcome::Done;
        };
        let body = SpinUp {
            mandelbox_id: mandelbox_id.to_string(),
            session_id: placement.session_id,
            user_id: placement.user_id.clone(),
            app_name: placement.app_name.clone(),
            protocol_secret: services.tokens.derive(Purpose::Protocol, mandelbox_id),
        };
        let token = services
            .tokens
            .derive(Purpose::HostAuth, &placement.instance_id);
        match self.hosts.spin_up(&placement.ip, &token, &body).await {
            Ok(()) => Outcome::Done,
            Err(error) => Outcome::Retry(error.to_string()),
        }
    }

    /// Ends a mandelbox whose host never took it.
    async fn abandon_mandelbox(&self, mandelbox_id: &str) {
        let services = &self.state.services;
        let Ok((mandelbox, _)) = services.mandelboxes.load(mandelbox_id).await else {
            return;
        };
        let Some(placement) = mandelbox.placement else {
            return;
        };
        let metadata = EventMetadata::new(Actor::System, Utc::now());
        if let Err(error) = services
            .mandelboxes
            .execute(
                mandelbox_id,
                MandelboxCommand::End {
                    reason: EndReason::SpinUpFailed,
                    at: Utc::now(),
                },
                &metadata,
            )
            .await
        {
            tracing::warn!(mandelbox_id, error = %error, "could not end an abandoned mandelbox");
            return;
        }
        if let Err(error) =
            crate::host::end_mandelbox(&self.state, mandelbox_id, &placement, &metadata).await
        {
            tracing::warn!(
                mandelbox_id,
                error,
                "could not free an abandoned mandelbox's slot"
            );
        }
    }

    /// The launch spec of a decision still waiting for its cloud instance; `None` when there is nothing to launch.
    async fn awaiting_launch(&self, instance_id: &str) -> Result<Option<LaunchSpec>, Outcome> {
        let (instance, _) = self
            .state
            .services
            .instances
            .load(instance_id)
            .await
            .map_err(|error| Outcome::Retry(error.to_string()))?;
        Ok(
            match (instance.status, instance.spec, instance.cloud_instance_id) {
                (Some(InstanceStatus::PreConnection), Some(spec), None) => Some(spec),
                _ => None,
            },
        )
    }

    /// Launches the host of one launch decision on EC2, at least once and never twice: a retry (after a crash
    /// between the call and its record, say) adopts the instance tagged with this launch instead of starting another.
    async fn launch_ec2(&self, instance_id: &str) -> Outcome {
        let services = &self.state.services;
        let Some(ec2) = &services.ec2 else {
            return Outcome::GiveUp("EC2 is not configured in this process".to_string());
        };
        let spec = match self.awaiting_launch(instance_id).await {
            Ok(Some(spec)) => spec,
            Ok(None) => return Outcome::Done,
            Err(outcome) => return outcome,
        };
        let user_data = format!(
            "WHIST_BOOTSTRAP_TOKEN={}\nWHIST_INSTANCE_ID={instance_id}\nWHIST_WEBSERVER_URL={}\n",
            services.tokens.derive(Purpose::Bootstrap, instance_id),
            self.state.settings.public_url,
        );
        let request = LaunchRequest {
            launch_id: instance_id.to_string(),
            region: spec.region.clone(),
            image_id: spec.image_id.clone(),
            instance_type: spec.instance_type.clone(),
            user_data,
        };
        let metadata = EventMetadata::new(Actor::System, Utc::now());
        let command = match ec2.launch(&request).await {
            Ok(launched) => InstanceCommand::RecordLaunch {
                cloud_instance_id: launched.cloud_instance_id,
                at: Utc::now(),
            },
            Err(Ec2Error::Retryable(error)) => return Outcome::Retry(error),
            Err(Ec2Error::Refused(reason)) => InstanceCommand::RecordLaunchFailure {
                reason,
                at: Utc::now(),
            },
        };
        match services
            .instances
            .execute(instance_id, command, &metadata)
            .await
        {
            Ok(()) | Err(CommandError::Rejected(_)) => Outcome::Done,
            Err(error) => Outcome::Retry(error.to_string()),
        }
    }

    async fn launch_simulated(&self, instance_id: &str) -> Outcome {
        let services = &self.state.services;
        let spec = match self.awaiting_launch(instance_id).await {
            Ok(Some(spec)) => spec,
            Ok(None) => return Outcome::Done,
            Err(outcome) => return outcome,
        };
        let host = match simulated_host::start(SimulatedHostSpec {
            instance_id: instance_id.to_string(),
            bootstrap_token: services.tokens.derive(Purpose::Bootstrap, instance_id),
            webserver_url: self.state.settings.public_url.clone(),
            region: spec.region,
            image_id: spec.image_id,
            instance_type: spec.instance_type,
            client_commit_hash: spec.client_commit_hash,
            mandelbox_capacity: SIMULATED_CAPACITY,
            port: self.state.settings.host_service_port,
        })
        .await
        {
            Ok(host) => host,
            Err(error) => return Outcome::Retry(error.to_string()),
        };
        let cloud_instance_id = format!("sim-{}", host.ip);
        self.simulated
            .lock()
            .await
            .insert(instance_id.to_string(), host);
        let metadata = EventMetadata::new(Actor::System, Utc::now());
        match services
            .instances
            .execute(
                instance_id,
                InstanceCommand::RecordLaunch {
                    cloud_instance_id,
                    at: Utc::now(),
                },
                &metadata,
            )
            .await
        {
            Ok(()) => Outcome::Done,
            Err(error) => Outcome::Retry(error.to_string()),
        }
    }

    /// Runs jobs until `shutdown`, waking when the log moves and at least every 500 ms.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut advanced = self.state.database.signal().on_advance();
        loop {
            if *shutdown.borrow() {
                let hosts = self.simulated.lock().await;
                for host in hosts.values() {
                    host.stop();
                }
                return;
            }
            advanced.borrow_and_update();
            match self.claim(16).await {
                Ok(jobs) if !jobs.is_empty() => {
                    let mut running = Vec::new();
                    for job in jobs {
                        let reconciler = self.clone();
                        running.push(tokio::spawn(async move {
                            let outcome = reconciler.run_job(&job).await;
                            if let Err(error) = reconciler.finish(&job, outcome).await {
                                tracing::warn!(job = job.id, error = %error, "could not record a job's outcome");
                            }
                        }));
                    }
                    for task in running {
                        let _ = task.await;
                    }
                    continue;
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(error = %error, "could not claim jobs"),
            }
            tokio::select! {
                _ = advanced.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}

/// Jobs waiting to run (HireFire's queue depth).
///
/// # Errors
/// The database failed.
pub async fn waiting_jobs(state: &AppState) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE status IN ('pending', 'running')")
        .fetch_one(state.database.any())
        .await
}
