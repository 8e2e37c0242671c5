//! The autoscaler keeps a warm buffer of free mandelbox slots per enabled region (`DESIRED_FREE_MANDELBOXES_<REGION>`,
//! else `DESIRED_FREE_MANDELBOXES`) on hosts of the region's active image, and scales down empty hosts with
//! hysteresis, and retires the hosts of images a release replaced; the policy itself is pure (`whist_domain::scaling`).
//! It records decisions (launch, drain, retire) as instance commands; the reconciler carries them out.
//!
//! One process decides at a time: the leader holds the fleet's lease (a row renewed every pass, which works through a
//! transaction-mode pooler; see `control::leadership`), records each taking in the log, and records every launch and
//! drain in one unit with the fence of its epoch, so that a leader paused past its lease can never record a decision
//! after its successor took over. It decides only on a read model that has caught up with the log as of the start
//! of the pass, so that its own last decisions (and a predecessor's) are counted. The leader also runs the repair
//! against the cloud (`repair`).

use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::watch;
use uuid::Uuid;
use whist_adapters::config::CloudKind;
use whist_adapters::tokens::{fingerprint, Purpose};
use whist_domain::images::{RegionImage, CATALOG_ID};
use whist_domain::instance::{DrainReason, InstanceCommand, InstanceError, LaunchSpec};
use whist_domain::scaling::{plan_region, HostView, RegionPlan, Targets};
use whist_domain::{Actor, EventMetadata};

use crate::control::leadership::{self, Fenced};
use crate::control::UseCaseError;
use crate::state::Context;
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
    /// A newer leader took over during the pass: its remaining decisions were refused.
    pub superseded: bool,
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
    /// This process's name as a holder of the fleet's lease.
    holder: String,
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
        Self {
            state,
            holder: leadership::holder_name(),
        }
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

    /// One decision for every enabled region, by the leader of `epoch`: each launch and drain is recorded under
    /// its fence, and the pass stops at the first one refused because a newer leader took over.
    ///
    /// # Errors
    /// The store failed.
    #[tracing::instrument(skip_all, fields(epoch = epoch))]
    pub async fn decide_once(&self, epoch: i64) -> Result<Decisions, UseCaseError> {
        let services = &self.state.services;
        let settings = &self.state.settings;
        if !crate::control::release::instances_caught_up(&self.state, CATCH_UP_WAIT).await? {
            tracing::warn!("autoscaler skipped a pass: the instances read model is behind the log");
            return Ok(Decisions::default());
        }
        let planned = self.plan().await?;
        // One chain for the whole pass: every decision it records carries the pass's correlation id.
        let pass = &EventMetadata::new(Actor::System, Utc::now());
        let pause = settings.fleet.fault_pause_before_deciding;
        if !pause.is_zero() && planned.iter().any(|decision| decision.plan.launch > 0) {
            tracing::warn!(
                epoch,
                pause_ms = pause.as_millis() as u64,
                "autoscaler pass planned; pausing before recording (fault injection)"
            );
            tokio::time::sleep(pause).await;
        }
        // In maintenance mode nothing is launched; drains and retirements go on.
        let maintenance = crate::control::assign::in_maintenance(&self.state).await?;
        let mut decisions = Decisions::default();
        for RegionDecision {
            region,
            image,
            plan,
        } in planned
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
                match leadership::record_fenced(
                    &self.state,
                    pass,
                    epoch,
                    "launch",
                    &instance_id,
                    command,
                    true,
                )
                .await?
                {
                    Fenced::Recorded => {}
                    Fenced::Refused(refusal) => {
                        return Err(UseCaseError::Refused(Box::new(refusal)));
                    }
                    Fenced::Superseded(refusal) => {
                        tracing::warn!(epoch, error = %refusal, "a newer leader took over; this pass records nothing more");
                        decisions.superseded = true;
                        return Ok(decisions);
                    }
                }
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
                let command = InstanceCommand::Drain {
                    reason: DrainReason::ScaleDown,
                    at: Utc::now(),
                };
                match leadership::record_fenced(
                    &self.state,
                    pass,
                    epoch,
                    "drain",
                    instance_id,
                    command,
                    false,
                )
                .await?
                {
                    Fenced::Recorded => {
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
                    Fenced::Refused(InstanceError::NotEmpty) => {}
                    Fenced::Refused(refusal) => {
                        tracing::info!(instance_id, error = %refusal, "host not drained: it changed meanwhile");
                    }
                    Fenced::Superseded(refusal) => {
                        tracing::warn!(epoch, error = %refusal, "a newer leader took over; this pass records nothing more");
                        decisions.superseded = true;
                        return Ok(decisions);
                    }
                }
            }
            if !plan.retire.is_empty() {
                let retired = crate::control::release::record_retirements(
                    &self.state,
                    pass,
                    &region,
                    &plan.retire,
                )
                .await?;
                decisions.retired += retired.drained + retired.terminated;
            }
            decisions.plans.push((region.clone(), plan));
        }
        Ok(decisions)
    }

    /// The epoch this process leads at, if it leads: it holds the fleet's lease (renewed here, every pass) and its
    /// taking is recorded. A store failure counts as not leading.
    pub async fn lead(&self, epoch: Option<i64>) -> Option<i64> {
        match leadership::lead(&self.state, &self.holder, epoch).await {
            Ok(Some(now)) => Some(now),
            Ok(None) => {
                if let Some(epoch) = epoch {
                    tracing::warn!(epoch, "this process lost the fleet's lease; standing down");
                }
                None
            }
            Err(error) => {
                tracing::warn!(error = %crate::telemetry::Chain(&error), "could not renew the fleet's lease; standing down");
                None
            }
        }
    }

    /// Decides every 2 s (and repairs every `WHIST_REPAIR_INTERVAL_S`) while this process leads, until `shutdown`.
    /// The repair runs beside the decisions, not between them: an EC2 listing that hangs until its timeout must not
    /// hold back the warm buffer. A repair that panics panics the autoscaler with it, so that the autoscaler's
    /// supervisor restarts both (and says so) instead of the repair failing unseen at every interval; the repair in
    /// flight is aborted whenever the autoscaler stops.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut epoch = None;
        let repair = std::sync::Arc::new(crate::workers::repair::Repair::new(self.state.clone()));
        // At most one repair; dropping the set (the autoscaler ends or unwinds) aborts it.
        let mut repairing = tokio::task::JoinSet::new();
        let mut last_repair: Option<Instant> = None;
        loop {
            if whist_adapters::supervision::stopping(&shutdown) {
                if epoch.is_some() {
                    leadership::step_down(&self.state, &self.holder).await;
                }
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
            epoch = self.lead(epoch).await;
            if let Some(leading) = epoch {
                if self.state.settings.fleet.autoscale {
                    match self.decide_once(leading).await {
                        Ok(decisions) if decisions.superseded => epoch = None,
                        Ok(_) => {}
                        Err(error) => {
                            tracing::warn!(error = %crate::telemetry::Chain(&error), "autoscaler decision failed");
                        }
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
