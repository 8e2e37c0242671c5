//! Sweeps that turn the passing of time into decisions: a mandelbox that stays `ALLOCATED` (its host never reported
//! it connecting) dies and frees its slot; a host silent for `HEARTBEAT_TIMEOUT_S` becomes `UNRESPONSIVE`, its
//! mandelboxes die and it is terminated through the cloud; a host that has not registered
//! `WHIST_REGISTRATION_TIMEOUT_S` after its launch decision is terminated; a draining host empty for
//! `WHIST_DRAINED_HOST_TIMEOUT_S` is terminated. Every process may sweep: the commands are idempotent and guarded by
//! the aggregates, which refuse a decision the state no longer justifies.
//!
//! A brake holds the silence sweeps back: when more than `SWEEP_MAX_SILENT_FRACTION` of a region's registered hosts
//! (those that registered and are not ending: `ACTIVE`, `DRAINING`, `UNRESPONSIVE`) are silent at once, counting
//! those already unresponsive, and at least [`BRAKE_MIN_SILENT_HOSTS`] of them, no host of that region is marked
//! unresponsive or terminated for its silence. So many hosts do not fall silent together; our own heartbeat path
//! (the load balancer, the heartbeat endpoint, the flusher, the `host_heartbeats` table) breaking does, and acting
//! on it would end a healthy fleet and every mandelbox on it. The sweeper logs an error and sets the gauge
//! `whist_sweep_braked{region}` to 1 for as long as the brake holds (0 otherwise). Hosts that never registered,
//! and drained hosts left empty, are not judged by their heartbeats and are ended as usual.
//!
//! Hosts that fall silent together do not cross the timeout together: their last heartbeats are spread over one
//! heartbeat interval. So the brake counts a host as silent well before the timeout (half of it, see
//! [`falling_silent_after`]); otherwise the sweeps, every 5 s, would take the first hosts one by one, each below the
//! fraction, and the brake would hold only once half the region was gone.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::Utc;
use cqrs_es::Aggregate;
use tokio::sync::watch;
use whist_adapters::store::CommandError;
use whist_domain::instance::{Instance, InstanceCommand, InstanceError, TerminationReason};
use whist_domain::mandelbox::{EndReason, MandelboxCommand, MandelboxError};
use whist_domain::{Actor, EventMetadata};
use whist_projections::fleet_queries;

use crate::state::Context;

/// The fewest silent hosts that can hold the brake: one host falling silent is not a mass termination, whatever the
/// size of its region (a region of one host would otherwise never replace a host that died).
pub const BRAKE_MIN_SILENT_HOSTS: usize = 2;

/// Whether the brake holds for a region with `registered` hosts of which `silent` are silent: more than
/// `max_silent_fraction` of them, and at least [`BRAKE_MIN_SILENT_HOSTS`].
pub fn brake_holds(silent: usize, registered: usize, max_silent_fraction: f64) -> bool {
    silent >= BRAKE_MIN_SILENT_HOSTS && silent as f64 > max_silent_fraction * registered as f64
}

/// How long a host may go unheard before the brake counts it as silent: half the heartbeat timeout. Hosts are told
/// to heartbeat every quarter of it (`host::heartbeat_interval_s`), so the last heartbeats of hosts silenced
/// together lie within a quarter of each other (plus the delay of a heartbeat in flight): when the first crosses
/// the timeout, the others have been unheard for about three quarters of it, past half. A healthy host reaches half
/// only by missing a heartbeat.
pub fn falling_silent_after(heartbeat_timeout: Duration) -> Duration {
    heartbeat_timeout / 2
}

/// A host that registered and is not ending, as the silence sweeps see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredHost {
    pub instance_id: String,
    pub region: String,
    /// `ACTIVE`, `DRAINING` or `UNRESPONSIVE`.
    pub status: String,
    /// Unresponsive already, or not heard from for longer than the heartbeat timeout: to be judged.
    pub silent: bool,
    /// Silent, or not heard from for longer than [`falling_silent_after`]: counted by the brake.
    pub falling_silent: bool,
}

/// Every registered host with its silence, and the regions where the brake holds.
#[derive(Debug, Clone, Default)]
pub struct SilenceCensus {
    pub hosts: Vec<RegisteredHost>,
    pub braked_regions: BTreeSet<String>,
}

impl SilenceCensus {
    /// Counts each region's registered and silent hosts and decides where the brake holds.
    pub fn of(hosts: Vec<RegisteredHost>, max_silent_fraction: f64) -> Self {
        let mut counts: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for host in &hosts {
            let (registered, silent) = counts.entry(host.region.as_str()).or_default();
            *registered += 1;
            if host.falling_silent {
                *silent += 1;
            }
        }
        let braked_regions = counts
            .into_iter()
            .filter(|(_, (registered, silent))| {
                brake_holds(*silent, *registered, max_silent_fraction)
            })
            .map(|(region, _)| region.to_string())
            .collect();
        Self {
            hosts,
            braked_regions,
        }
    }

    /// How many registered hosts `region` has, and how many of them the brake counts as silent.
    pub fn counts(&self, region: &str) -> (usize, usize) {
        self.hosts.iter().filter(|host| host.region == region).fold(
            (0, 0),
            |(registered, silent), host| {
                (registered + 1, silent + usize::from(host.falling_silent))
            },
        )
    }

    fn is_braked(&self, region: &str) -> bool {
        self.braked_regions.contains(region)
    }
}

/// Runs the sweeps.
pub struct Sweeper {
    state: Context,
}

impl Sweeper {
    pub fn new(state: Context) -> Self {
        Self { state }
    }

    /// Ends mandelboxes allocated longer ago than the stale timeout that never connected; how many it ended.
    ///
    /// # Errors
    /// The read model could not be read.
    pub async fn expire_stale_allocations(&self) -> Result<usize, sqlx::Error> {
        let timeout = self.state.settings.stale_allocation_timeout;
        let cutoff = Utc::now() - chrono::Duration::from_std(timeout).unwrap_or_default();
        let allocated = fleet_queries::allocated_mandelboxes(&self.state.database).await?;
        // One chain for the sweep.
        let pass = EventMetadata::new(Actor::System, Utc::now());
        let mut ended = 0;
        for fleet_queries::AllocatedMandelbox {
            mandelbox_id,
            created_at,
        } in allocated
        {
            let old = chrono::DateTime::parse_from_rfc3339(&created_at)
                .map(|created_at| created_at < cutoff)
                .unwrap_or(false);
            if !old {
                continue;
            }
            let services = &self.state.services;
            let metadata = pass.at(Utc::now());
            let expire = MandelboxCommand::ExpireIfNeverConnected {
                timeout: chrono::Duration::from_std(timeout).unwrap_or_default(),
                at: Utc::now(),
            };
            match services
                .mandelboxes
                .execute(&mandelbox_id, expire, &metadata)
                .await
            {
                Ok(()) => {}
                Err(CommandError::Rejected(MandelboxError::NotStale)) => continue,
                Err(error) => {
                    tracing::warn!(mandelbox_id, error = %error, "could not expire a stale mandelbox");
                    continue;
                }
            }
            let Ok((mandelbox, _)) = services.mandelboxes.load_from_history(&mandelbox_id).await
            else {
                continue;
            };
            if let Some(placement) = mandelbox.placement {
                if let Err(error) = crate::control::mandelboxes::end_mandelbox(
                    &self.state,
                    &mandelbox_id,
                    &placement,
                    &metadata,
                )
                .await
                {
                    tracing::warn!(
                        mandelbox_id,
                        error = %crate::telemetry::Chain(&error),
                        "could not free a stale mandelbox's slot"
                    );
                    continue;
                }
            }
            tracing::info!(mandelbox_id, "a mandelbox that never connected was ended");
            ended += 1;
        }
        Ok(ended)
    }

    /// Reads every registered host and its silence, decides where the brake holds, and reports it: an error in the
    /// logs for each braked region, and the gauge `whist_sweep_braked{region}` for every enabled or populated region.
    ///
    /// # Errors
    /// The read model could not be read.
    pub async fn silence_census(&self) -> Result<SilenceCensus, sqlx::Error> {
        let settings = &self.state.settings;
        let timeout_ms = i64::try_from(settings.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX);
        let falling_silent_ms =
            i64::try_from(falling_silent_after(settings.heartbeat_timeout).as_millis())
                .unwrap_or(i64::MAX);
        let now_ms = Utc::now().timestamp_millis();
        // A host that never sent a heartbeat counts from its last change of state (its registration).
        let heard = fleet_queries::registered_hosts(&self.state.database).await?;
        let mut hosts = Vec::with_capacity(heard.len());
        for host in heard {
            let since_ms = host.last_seen_ms.unwrap_or_else(|| {
                chrono::DateTime::parse_from_rfc3339(&host.updated_at)
                    .map(|at| at.timestamp_millis())
                    .unwrap_or(now_ms)
            });
            // An unresponsive host is silent by definition: a heartbeat would have brought it back.
            let silent = host.status == "UNRESPONSIVE" || now_ms - since_ms > timeout_ms;
            hosts.push(RegisteredHost {
                instance_id: host.instance_id,
                region: host.region,
                status: host.status,
                silent,
                falling_silent: silent || now_ms - since_ms > falling_silent_ms,
            });
        }
        let census = SilenceCensus::of(hosts, settings.sweep_max_silent_fraction);
        let regions: BTreeSet<&str> = settings
            .enabled_regions
            .iter()
            .map(String::as_str)
            .chain(census.hosts.iter().map(|host| host.region.as_str()))
            .collect();
        for region in regions {
            let braked = census.is_braked(region);
            metrics::gauge!("whist_sweep_braked", "region" => region.to_string()).set(if braked {
                1.0
            } else {
                0.0
            });
            if braked {
                let (registered, silent) = census.counts(region);
                tracing::error!(
                    region,
                    silent,
                    registered,
                    max_silent_fraction = settings.sweep_max_silent_fraction,
                    "more of this region's registered hosts are silent at once than SWEEP_MAX_SILENT_FRACTION \
                     allows: the heartbeat path is more likely broken than the fleet, so none of them is marked \
                     unresponsive or terminated"
                );
            }
        }
        Ok(census)
    }

    /// Marks hosts silent for longer than the heartbeat timeout as unresponsive, except in regions where the brake
    /// holds; how many it marked.
    ///
    /// # Errors
    /// The read model could not be read.
    pub async fn mark_silent_hosts(&self) -> Result<usize, sqlx::Error> {
        let census = self.silence_census().await?;
        Ok(self.mark_silent_hosts_of(&census).await)
    }

    async fn mark_silent_hosts_of(&self, census: &SilenceCensus) -> usize {
        // One chain for the sweep: the end of a host it marks continues it (`end_unresponsive_hosts_of`).
        let pass = EventMetadata::new(Actor::System, Utc::now());
        let mut marked = 0;
        let silent_hosts = census.hosts.iter().filter(|host| {
            host.silent && host.status != "UNRESPONSIVE" && !census.is_braked(&host.region)
        });
        for host in silent_hosts {
            let instance_id = host.instance_id.as_str();
            let metadata = pass.at(Utc::now());
            match self
                .state
                .services
                .instances
                .execute_retrying(
                    instance_id,
                    InstanceCommand::MarkUnresponsive { at: Utc::now() },
                    &metadata,
                )
                .await
            {
                Ok(()) => {
                    tracing::warn!(instance_id, "a host went silent and is now unresponsive");
                    marked += 1;
                }
                Err(error) => {
                    tracing::warn!(instance_id, error = %error, "could not mark a silent host")
                }
            }
        }
        marked
    }

    /// Ends the mandelboxes of unresponsive hosts and terminates the hosts, except in regions where the brake
    /// holds; how many hosts it terminated.
    ///
    /// # Errors
    /// The read model could not be read.
    pub async fn end_unresponsive_hosts(&self) -> Result<usize, sqlx::Error> {
        let census = self.silence_census().await?;
        self.end_unresponsive_hosts_of(&census).await
    }

    /// Reads the unresponsive hosts again rather than taking them from `census`, so that a host marked by this
    /// sweep is ended by it when the read model already shows the mark.
    async fn end_unresponsive_hosts_of(
        &self,
        census: &SilenceCensus,
    ) -> Result<usize, sqlx::Error> {
        let unresponsive = fleet_queries::unresponsive_hosts(&self.state.database).await?;
        let mut ended = 0;
        for fleet_queries::HostInRegion {
            instance_id,
            region,
        } in unresponsive
        {
            if census.is_braked(&region) {
                continue;
            }
            // The host's end continues the chain that marked it silent, caused by its last event (the mark).
            let metadata = match crate::control::continuing(
                &self.state,
                Instance::TYPE,
                &instance_id,
                &EventMetadata::new(Actor::System, Utc::now()),
            )
            .await
            {
                Ok(metadata) => metadata,
                Err(error) => {
                    tracing::warn!(
                        instance_id,
                        error = %crate::telemetry::Chain(&error),
                        "could not read an unresponsive host's last event"
                    );
                    continue;
                }
            };
            if let Err(error) = crate::control::mandelboxes::end_mandelboxes_on(
                &self.state,
                &instance_id,
                EndReason::HostLost,
                &metadata,
            )
            .await
            {
                tracing::warn!(
                    instance_id,
                    error = %crate::telemetry::Chain(&error),
                    "could not end an unresponsive host's mandelboxes"
                );
                continue;
            }
            if self
                .terminate(&instance_id, TerminationReason::Unresponsive, &metadata)
                .await
            {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Terminates hosts that never registered in time and draining hosts that stayed empty; how many.
    ///
    /// # Errors
    /// The read model could not be read.
    pub async fn end_idle_hosts(&self) -> Result<usize, sqlx::Error> {
        let fleet = &self.state.settings.fleet;
        let now = Utc::now();
        let registration_cutoff =
            now - chrono::Duration::from_std(fleet.registration_timeout).unwrap_or_default();
        let drained_cutoff =
            now - chrono::Duration::from_std(fleet.drained_host_timeout).unwrap_or_default();
        let idle = fleet_queries::idle_hosts(&self.state.database).await?;
        // One chain for the sweep.
        let pass = EventMetadata::new(Actor::System, Utc::now());
        let mut ended = 0;
        for host in idle {
            // Booting since its launch decision; drained since its drain or the end of its last mandelbox.
            let (cutoff, reason) = if host.pre_connection {
                (registration_cutoff, TerminationReason::NeverRegistered)
            } else {
                (drained_cutoff, TerminationReason::Drained)
            };
            let old = chrono::DateTime::parse_from_rfc3339(&host.since)
                .map(|since| since < cutoff)
                .unwrap_or(false);
            if old && self.terminate(&host.instance_id, reason, &pass).await {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Decides to terminate a host (a no-op if it is already ending); whether the decision stands.
    async fn terminate(
        &self,
        instance_id: &str,
        reason: TerminationReason,
        origin: &EventMetadata,
    ) -> bool {
        let metadata = origin.at(Utc::now());
        let command = InstanceCommand::Terminate {
            reason,
            at: Utc::now(),
        };
        match self
            .state
            .services
            .instances
            .execute_retrying(instance_id, command, &metadata)
            .await
        {
            Ok(()) => {
                tracing::info!(instance_id, ?reason, "host termination decided");
                true
            }
            // The host changed meanwhile (it registered, or was heard from again): nothing to do.
            Err(CommandError::Rejected(InstanceError::InvalidTransition)) => false,
            Err(error) => {
                tracing::warn!(instance_id, error = %error, "could not record a host's termination");
                false
            }
        }
    }

    /// Sweeps every 5 s until `shutdown`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = shutdown.changed() => return,
            }
            // Heartbeats held in memory are written first, so that a host is never judged on stale liveness.
            let _ = self.state.services.heartbeats.flush().await;
            if let Err(error) = self.expire_stale_allocations().await {
                tracing::warn!(error = %error, "stale-allocation sweep failed");
            }
            // One census per sweep: both silence sweeps obey the same brake, and it is reported once.
            match self.silence_census().await {
                Ok(census) => {
                    self.mark_silent_hosts_of(&census).await;
                    if let Err(error) = self.end_unresponsive_hosts_of(&census).await {
                        tracing::warn!(error = %error, "unresponsive-host sweep failed");
                    }
                }
                Err(error) => tracing::warn!(error = %error, "silent-host sweep failed"),
            }
            if let Err(error) = self.end_idle_hosts().await {
                tracing::warn!(error = %error, "idle-host sweep failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{brake_holds, falling_silent_after, RegisteredHost, SilenceCensus};

    fn host(region: &str, silent: bool) -> RegisteredHost {
        RegisteredHost {
            instance_id: uuid::Uuid::new_v4().to_string(),
            region: region.to_string(),
            status: "ACTIVE".to_string(),
            silent,
            falling_silent: silent,
        }
    }

    #[test]
    fn a_host_counts_for_the_brake_once_unheard_for_half_the_timeout() {
        assert_eq!(
            falling_silent_after(Duration::from_secs(120)),
            Duration::from_secs(60)
        );
        assert_eq!(
            falling_silent_after(Duration::from_secs(3)),
            Duration::from_millis(1_500)
        );
    }

    #[test]
    fn hosts_falling_silent_count_for_the_brake_before_they_are_judged() {
        let mut hosts = vec![host("us-east-1", true), host("us-east-1", false)];
        hosts.push(RegisteredHost {
            falling_silent: true,
            ..host("us-east-1", false)
        });
        hosts.push(host("us-east-1", false));
        let census = SilenceCensus::of(hosts, 0.5);
        assert!(
            census.braked_regions.is_empty(),
            "2 of 4 is not more than half"
        );
        let mut hosts = vec![host("us-east-1", true), host("us-east-1", false)];
        for _ in 0..2 {
            hosts.push(RegisteredHost {
                falling_silent: true,
                ..host("us-east-1", false)
            });
        }
        let census = SilenceCensus::of(hosts, 0.5);
        assert_eq!(census.counts("us-east-1"), (4, 3));
        assert!(census.braked_regions.contains("us-east-1"));
    }

    #[test]
    fn the_brake_holds_when_more_than_the_fraction_of_a_region_is_silent() {
        assert!(brake_holds(3, 4, 0.5));
        assert!(brake_holds(2, 2, 0.5));
        assert!(brake_holds(2, 3, 0.5));
    }

    #[test]
    fn the_brake_does_not_hold_at_exactly_the_fraction_or_below() {
        assert!(!brake_holds(2, 4, 0.5));
        assert!(!brake_holds(1, 4, 0.5));
        assert!(!brake_holds(0, 4, 0.5));
    }

    #[test]
    fn one_silent_host_never_holds_the_brake_even_alone_in_its_region() {
        assert!(!brake_holds(1, 1, 0.5));
        assert!(!brake_holds(1, 1, 0.0));
    }

    #[test]
    fn a_fraction_of_one_never_brakes_and_of_zero_brakes_on_two_silent_hosts() {
        assert!(!brake_holds(10, 10, 1.0));
        assert!(brake_holds(2, 100, 0.0));
    }

    #[test]
    fn the_census_brakes_each_region_on_its_own_hosts() {
        let hosts = vec![
            host("us-east-1", true),
            host("us-east-1", true),
            host("us-east-1", true),
            host("us-east-1", false),
            host("us-west-1", true),
            host("us-west-1", true),
            host("us-west-1", false),
            host("us-west-1", false),
        ];
        let census = SilenceCensus::of(hosts, 0.5);
        assert_eq!(
            census.braked_regions.into_iter().collect::<Vec<_>>(),
            ["us-east-1"]
        );
    }
}
