//! The autoscaler keeps a warm buffer of free mandelbox slots per enabled region (`DESIRED_FREE_MANDELBOXES_<REGION>`,
//! else `DESIRED_FREE_MANDELBOXES`) on hosts of the region's active image, and scales down empty hosts with
//! hysteresis, and retires the hosts of images a release replaced; the policy itself is pure (`whist_domain::scaling`).
//! It records decisions (launch, drain, retire) as instance commands; the reconciler carries them out.
//!
//! One process decides at a time: the leader holds a Postgres advisory lock on a dedicated connection (the embedded
//! store has one process), checks before every pass that the connection (and so the lock) is still alive, and
//! decides only on a read model that has caught up with the log as of the start of the pass, so that its own last
//! decisions are counted. The leader also runs the repair against the cloud (`repair`).

use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::PgConnection;
use tokio::sync::watch;
use uuid::Uuid;
use whist_adapters::config::CloudKind;
use whist_adapters::store::{Backend, CommandError};
use whist_adapters::tokens::{fingerprint, Purpose};
use whist_domain::images::{RegionImage, CATALOG_ID};
use whist_domain::instance::{DrainReason, InstanceCommand, InstanceError, LaunchSpec};
use whist_domain::scaling::{plan_region, HostView, RegionPlan, Targets};
use whist_domain::{Actor, EventMetadata};

use crate::control::UseCaseError;
use crate::state::Context;

/// The key of the autoscaler's advisory lock.
const LOCK_KEY: i64 = 0x5768_6973_7441_5331;
/// How long a pass waits for the read model to catch up before skipping.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// What one pass decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decisions {
    pub launched: usize,
    pub drained: usize,
    /// Hosts of retired images drained or terminated.
    pub retired: usize,
    /// Per region, the plan it followed.
    pub plans: Vec<(String, RegionPlan)>,
}

/// One region's plan and the image it launches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDecision {
    pub region: String,
    pub image: RegionImage,
    pub plan: RegionPlan,
}

/// Decides launches and drains.
pub struct Autoscaler {
    state: Context,
}

/// Reads a region's hosts from the `instances` read model (every host not yet ended).
///
/// # Errors
/// The read model could not be read.
pub async fn read_region(
    database: &whist_adapters::store::Database,
    region: &str,
) -> Result<Vec<HostView>, sqlx::Error> {
    whist_projections::fleet_queries::region_hosts(database, region).await
}

impl Autoscaler {
    pub fn new(state: Context) -> Self {
        Self { state }
    }

    /// Reads the fleet and plans every enabled region that has an active image (nothing is recorded).
    ///
    /// # Errors
    /// The store failed.
    pub async fn plan(&self) -> Result<Vec<RegionDecision>, UseCaseError> {
        let settings = &self.state.settings;
        let (catalog, _) = self
            .state
            .services
            .catalog
            .load_caught_up(CATALOG_ID)
            .await?;
        let protected = catalog.protected_images();
        let mut plans = Vec::new();
        for region in &settings.enabled_regions {
            let Some(image) = catalog.active_in(region) else {
                continue;
            };
            let hosts = read_region(&self.state.database, region).await?;
            let plan = plan_region(
                &hosts,
                Targets {
                    active_image: &image.image_id,
                    protected_images: &protected,
                    desired_free: settings.desired_free_mandelboxes_in(region),
                    expected_capacity: settings.fleet.host_capacity,
                },
            );
            plans.push(RegionDecision {
                region: region.clone(),
                image: image.clone(),
                plan,
            });
        }
        Ok(plans)
    }

    /// One decision for every enabled region.
    ///
    /// # Errors
    /// The store failed.
    #[tracing::instrument(skip_all)]
    pub async fn decide_once(&self) -> Result<Decisions, UseCaseError> {
        let services = &self.state.services;
        let settings = &self.state.settings;
        if !crate::control::release::instances_caught_up(&self.state, CATCH_UP_WAIT).await? {
            tracing::warn!("autoscaler skipped a pass: the instances read model is behind the log");
            return Ok(Decisions::default());
        }
        // In maintenance mode nothing is launched; drains and retirements go on.
        let maintenance = crate::control::assign::in_maintenance(&self.state).await?;
        let mut decisions = Decisions::default();
        for RegionDecision {
            region,
            image,
            plan,
        } in self.plan().await?
        {
            metrics::gauge!("whist_free_mandelboxes", "region" => region.clone())
                .set(f64::from(plan.free));
            let launches = if maintenance { 0 } else { plan.launch };
            for _ in 0..launches {
                let instance_id = Uuid::new_v4().to_string();
                let bootstrap = services.tokens.derive(Purpose::Bootstrap, &instance_id);
                let command = InstanceCommand::RequestLaunch {
                    spec: LaunchSpec {
                        region: region.clone(),
                        image_id: image.image_id.clone(),
                        client_commit_hash: image.client_commit_hash.clone(),
                        instance_type: settings.instance_type.clone(),
                    },
                    bootstrap_token_hash: fingerprint(&bootstrap),
                    reason: whist_domain::instance::LaunchReason::WarmBuffer,
                    at: Utc::now(),
                };
                let metadata = EventMetadata::new(Actor::System, Utc::now());
                services
                    .instances
                    .execute(&instance_id, command, &metadata)
                    .await?;
                tracing::info!(
                    region,
                    instance_id,
                    free = plan.free,
                    desired = plan.desired,
                    "launching a host for the warm buffer"
                );
                decisions.launched += 1;
            }
            for instance_id in &plan.drain {
                let metadata = EventMetadata::new(Actor::System, Utc::now());
                let command = InstanceCommand::Drain {
                    reason: DrainReason::ScaleDown,
                    at: Utc::now(),
                };
                match services
                    .instances
                    .execute_retrying(instance_id, command, &metadata)
                    .await
                {
                    Ok(()) => {
                        tracing::info!(
                            region,
                            instance_id,
                            free = plan.free,
                            desired = plan.desired,
                            "draining an empty host to scale down"
                        );
                        decisions.drained += 1;
                    }
                    // A mandelbox landed on it since the read: it stays.
                    Err(CommandError::Rejected(InstanceError::NotEmpty)) => {}
                    Err(error) => return Err(error.into()),
                }
            }
            if !plan.retire.is_empty() {
                let retired = crate::control::release::record_retirements(
                    &self.state,
                    &Actor::System,
                    &plan.retire,
                )
                .await?;
                decisions.retired += retired.drained + retired.terminated;
            }
            decisions.plans.push((region.clone(), plan));
        }
        Ok(decisions)
    }

    /// Whether this process leads: it holds the advisory lock on a live connection (always, on the embedded store).
    async fn lead(&self, held: &mut Option<PgConnection>) -> bool {
        let Backend::Postgres(pool) = self.state.database.backend() else {
            return true;
        };
        if let Some(connection) = held.as_mut() {
            // The lock lives as long as the session: a dead connection means another process may lead now.
            if sqlx::query("SELECT 1")
                .execute(&mut *connection)
                .await
                .is_ok()
            {
                return true;
            }
            tracing::warn!("autoscaler lost its lock's connection; standing down");
            *held = None;
        }
        let Ok(mut connection) = pool.acquire().await else {
            return false;
        };
        let got: Result<bool, _> = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(LOCK_KEY)
            .fetch_one(&mut *connection)
            .await;
        if matches!(got, Ok(true)) {
            tracing::info!("this process now leads the autoscaler and the cloud repair");
            // The connection must not go back to the pool holding the lock.
            *held = Some(connection.detach());
            true
        } else {
            false
        }
    }

    /// Decides every 2 s (and repairs every `WHIST_REPAIR_INTERVAL_S`) while this process leads, until `shutdown`.
    /// The repair runs beside the decisions, not between them: an EC2 listing that hangs until its timeout must not
    /// hold back the warm buffer. A repair that panics panics the autoscaler with it, so that the autoscaler's
    /// supervisor restarts both (and says so) instead of the repair failing unseen at every interval; the repair in
    /// flight is aborted whenever the autoscaler stops.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut held = None;
        let repair = std::sync::Arc::new(crate::workers::repair::Repair::new(self.state.clone()));
        // At most one repair; dropping the set (the autoscaler ends or unwinds) aborts it.
        let mut repairing = tokio::task::JoinSet::new();
        let mut last_repair: Option<Instant> = None;
        loop {
            if whist_adapters::supervision::stopping(&shutdown) {
                return;
            }
            while let Some(ended) = repairing.try_join_next() {
                if let Err(error) = ended {
                    if error.is_panic() {
                        tracing::error!("the cloud repair panicked; the autoscaler stops with it");
                        std::panic::resume_unwind(error.into_panic());
                    }
                }
            }
            if self.lead(&mut held).await {
                if self.state.settings.fleet.autoscale {
                    if let Err(error) = self.decide_once().await {
                        tracing::warn!(error = %crate::telemetry::Chain(&error), "autoscaler decision failed");
                    }
                }
                let due = last_repair
                    .is_none_or(|at| at.elapsed() >= self.state.settings.fleet.repair_interval);
                let idle = repairing.is_empty();
                if self.state.settings.cloud == CloudKind::Aws && due && idle {
                    last_repair = Some(Instant::now());
                    let repair = repair.clone();
                    repairing.spawn(async move {
                        match repair.run_once().await {
                            Ok(report) if !report.is_quiet() => {
                                tracing::info!(?report, "cloud repair acted");
                            }
                            Ok(_) => {}
                            Err(error) => tracing::warn!(error = %crate::telemetry::Chain(&error), "cloud repair failed"),
                        }
                    });
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}
