//! Level-triggered repair against the cloud: compares the recorded fleet with what EC2 holds (by this deployment's
//! tag) and fixes both directions, whatever crash or lost message caused the difference.
//!
//! - An instance tagged with a launch still waiting for its instance is adopted (`RecordLaunch`): the launch call
//!   happened but its outcome was never recorded. That includes a launch whose host registered first (the call's
//!   answer was lost and the machine booted meanwhile): its instance is its host's, not a stray.
//! - Any other live instance that is not its launch's live host is a stray: a second instance of a launch, one that
//!   outlived its record, or one whose launch id has no record at all. The decision is recorded
//!   (`TerminateStray`) and the reconciler terminates it.
//! - A record whose instance is gone from EC2 (absent, or terminated) is closed (`RecordTerminated`) and its
//!   mandelboxes end.
//!
//! The recorded side is read before EC2 is listed, so an instance launched and recorded during the pass is always
//! in the listing, and records changed within the last `WHIST_REPAIR_INTERVAL_S` (at most 30 s) are left for the
//! next pass, for EC2's eventual consistency. Only the autoscaler's leader runs it.

use std::collections::{BTreeSet, HashMap};

use chrono::Utc;
use whist_adapters::store::CommandError;
use whist_domain::instance::{InstanceCommand, InstanceError, InstanceStatus};
use whist_domain::mandelbox::EndReason;
use whist_domain::{Actor, EventMetadata};
use whist_projections::fleet_queries;

use crate::control::UseCaseError;
use crate::state::Context;

/// What one repair pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Cloud instances adopted by a launch that had not recorded them.
    pub adopted: usize,
    /// Cloud instances that belong to no live host, decided terminated.
    pub strays: usize,
    /// Records closed because their instance is gone.
    pub closed: usize,
}

impl RepairReport {
    pub fn is_quiet(&self) -> bool {
        *self == Self::default()
    }
}

/// A recorded host that should have a live cloud instance.
struct Recorded {
    instance_id: String,
    cloud_instance_id: String,
    updated_at: chrono::DateTime<Utc>,
}

/// Runs repair passes.
pub struct Repair {
    state: Context,
}

impl Repair {
    pub fn new(state: Context) -> Self {
        Self { state }
    }

    /// Regions to look at: the enabled ones and any with a recorded host not yet ended.
    async fn regions(&self) -> Result<BTreeSet<String>, sqlx::Error> {
        let mut regions: BTreeSet<String> = self
            .state
            .settings
            .enabled_regions
            .iter()
            .cloned()
            .collect();
        regions.extend(fleet_queries::regions_with_hosts(&self.state.database).await?);
        Ok(regions)
    }

    async fn recorded(&self, region: &str) -> Result<Vec<Recorded>, sqlx::Error> {
        let hosts = fleet_queries::recorded_hosts(&self.state.database, region).await?;
        Ok(hosts
            .into_iter()
            .map(|host| Recorded {
                instance_id: host.instance_id,
                cloud_instance_id: host.cloud_instance_id,
                // Unreadable: as if changed just now, so left for the next pass.
                updated_at: chrono::DateTime::parse_from_rfc3339(&host.updated_at)
                    .map(|at| at.with_timezone(&Utc))
                    .unwrap_or_else(|_| Utc::now()),
            })
            .collect())
    }

    /// One pass over every region.
    ///
    /// # Errors
    /// The store or EC2 failed; what was done before stays done.
    #[tracing::instrument(skip_all)]
    pub async fn run_once(&self) -> Result<RepairReport, RepairError> {
        let Some(ec2) = &self.state.services.ec2 else {
            return Ok(RepairReport::default());
        };
        let grace = chrono::Duration::from_std(
            self.state
                .settings
                .fleet
                .repair_interval
                .min(std::time::Duration::from_secs(30)),
        )
        .unwrap_or_default();
        let mut report = RepairReport::default();
        // One chain for the pass.
        let pass = EventMetadata::new(Actor::System, Utc::now());
        for region in self.regions().await? {
            // Recorded first, then EC2: see the module's note.
            let recorded = self.recorded(&region).await?;
            let listed = ec2
                .list(&region)
                .await
                .map_err(|source| RepairError::Cloud {
                    region: region.clone(),
                    source,
                })?;
            let live: HashMap<&str, _> = listed
                .iter()
                .filter(|instance| instance.is_live())
                .map(|instance| (instance.cloud_instance_id.as_str(), instance))
                .collect();
            for instance in live.values() {
                let Some(launch_id) = &instance.launch_id else {
                    tracing::warn!(
                        region,
                        cloud_instance_id = instance.cloud_instance_id,
                        "an instance tagged with this deployment but no launch id: left alone"
                    );
                    continue;
                };
                match self
                    .reconcile_instance(&region, launch_id, &instance.cloud_instance_id, &pass)
                    .await?
                {
                    Fix::None => {}
                    Fix::Adopted => report.adopted += 1,
                    Fix::Stray => report.strays += 1,
                }
            }
            let now = Utc::now();
            for record in recorded {
                if live.contains_key(record.cloud_instance_id.as_str())
                    || now - record.updated_at < grace
                {
                    continue;
                }
                if self.close(&record, &pass).await? {
                    report.closed += 1;
                }
            }
        }
        Ok(report)
    }

    /// Brings one live cloud instance in line with its launch's record.
    async fn reconcile_instance(
        &self,
        region: &str,
        launch_id: &str,
        cloud_instance_id: &str,
        pass: &EventMetadata,
    ) -> Result<Fix, RepairError> {
        let instances = &self.state.services.instances;
        let (instance, _) = instances
            .load_caught_up(launch_id)
            .await
            .map_err(UseCaseError::from)?;
        let metadata = pass.at(Utc::now());
        if instance.cloud_instance_id.as_deref() == Some(cloud_instance_id)
            && instance
                .status
                .is_some_and(|status| status != InstanceStatus::Terminated)
        {
            // Its host (a host being terminated is the reconciler's to end).
            return Ok(Fix::None);
        }
        let ended = matches!(
            instance.status,
            None | Some(InstanceStatus::Terminating | InstanceStatus::Terminated)
        );
        if instance.cloud_instance_id.is_none() && !ended {
            let command = InstanceCommand::RecordLaunch {
                cloud_instance_id: cloud_instance_id.to_string(),
                at: Utc::now(),
            };
            return match instances.execute(launch_id, command, &metadata).await {
                Ok(()) => {
                    tracing::warn!(
                        region,
                        instance_id = launch_id,
                        cloud_instance_id,
                        "adopted a launched instance whose launch was never recorded"
                    );
                    Ok(Fix::Adopted)
                }
                Err(CommandError::Rejected(error)) => {
                    tracing::info!(instance_id = launch_id, error = %error, "adoption refused; next pass");
                    Ok(Fix::None)
                }
                Err(error) => Err(UseCaseError::from(error).into()),
            };
        }
        if instance.strays_terminated.contains(cloud_instance_id) {
            // Decided already; the reconciler's job terminates it (or has, and EC2 is catching up).
            return Ok(Fix::None);
        }
        let command = InstanceCommand::TerminateStray {
            region: region.to_string(),
            cloud_instance_id: cloud_instance_id.to_string(),
            at: Utc::now(),
        };
        match instances.execute(launch_id, command, &metadata).await {
            Ok(()) => {
                tracing::warn!(
                    region,
                    instance_id = launch_id,
                    cloud_instance_id,
                    "terminating an instance that is no live host's"
                );
                Ok(Fix::Stray)
            }
            Err(CommandError::Rejected(InstanceError::NotAStray)) => Ok(Fix::None),
            Err(error) => Err(UseCaseError::from(error).into()),
        }
    }

    /// Closes a record whose instance is gone; whether it was closed now.
    async fn close(&self, record: &Recorded, pass: &EventMetadata) -> Result<bool, RepairError> {
        let metadata = pass.at(Utc::now());
        self.state
            .services
            .instances
            .execute(
                &record.instance_id,
                InstanceCommand::RecordTerminated { at: Utc::now() },
                &metadata,
            )
            .await
            .map_err(UseCaseError::from)?;
        crate::control::mandelboxes::end_mandelboxes_on(
            &self.state,
            &record.instance_id,
            EndReason::HostLost,
            &metadata,
        )
        .await?;
        tracing::warn!(
            instance_id = record.instance_id,
            cloud_instance_id = record.cloud_instance_id,
            "closed the record of a host whose instance is gone"
        );
        Ok(true)
    }
}

/// Why a repair pass stopped; what it did before stays done.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error("could not read the recorded hosts")]
    Records(#[from] sqlx::Error),
    #[error("could not list the EC2 instances of region {region}")]
    Cloud {
        region: String,
        #[source]
        source: whist_adapters::ec2::Ec2Error,
    },
    #[error("could not record a repair")]
    Record(#[from] UseCaseError),
}

enum Fix {
    None,
    Adopted,
    Stray,
}
