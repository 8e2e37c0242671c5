//! Sweeps that turn the passing of time into decisions: a mandelbox that stays `ALLOCATED` (its host never reported
//! it connecting) dies and frees its slot; a host silent for `HEARTBEAT_TIMEOUT_S` becomes `UNRESPONSIVE`, its
//! mandelboxes die and it is terminated through the cloud; a host that has not registered
//! `WHIST_REGISTRATION_TIMEOUT_S` after its launch decision is terminated; a draining host empty for
//! `WHIST_DRAINED_HOST_TIMEOUT_S` is terminated. Every process may sweep: the commands are idempotent and guarded by
//! the aggregates, which refuse a decision the state no longer justifies.

use std::time::Duration;

use chrono::Utc;
use sqlx::Row;
use tokio::sync::watch;
use whist_adapters::store::CommandError;
use whist_domain::instance::{InstanceCommand, InstanceError, TerminationReason};
use whist_domain::mandelbox::{EndReason, MandelboxCommand, MandelboxError};
use whist_domain::{Actor, EventMetadata};

use crate::state::AppState;

/// Runs the sweeps.
pub struct Sweeper {
    state: AppState,
}

impl Sweeper {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    /// Ends mandelboxes allocated longer ago than the stale timeout that never connected; how many it ended.
    ///
    /// # Errors
    /// The read model could not be read.
    pub async fn expire_stale_allocations(&self) -> Result<usize, sqlx::Error> {
        let timeout = self.state.settings.stale_allocation_timeout;
        let cutoff = Utc::now() - chrono::Duration::from_std(timeout).unwrap_or_default();
        let rows = sqlx::query(
            "SELECT mandelbox_id, created_at FROM mandelboxes WHERE status = 'ALLOCATED' LIMIT 500",
        )
        .fetch_all(self.state.database.any())
        .await?;
        let mut ended = 0;
        for row in rows {
            let mandelbox_id: String = row.try_get("mandelbox_id")?;
            let created_at: String = row.try_get("created_at")?;
            let old = chrono::DateTime::parse_from_rfc3339(&created_at)
                .map(|created_at| created_at < cutoff)
                .unwrap_or(false);
            if !old {
                continue;
            }
            let services = &self.state.services;
            let metadata = EventMetadata::new(Actor::System, Utc::now());
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
            let Ok((mandelbox, _)) = services.mandelboxes.load(&mandelbox_id).await else {
                continue;
            };
            if let Some(placement) = mandelbox.placement {
                if let Err(error) =
                    crate::host::end_mandelbox(&self.state, &mandelbox_id, &placement, &metadata)
                        .await
                {
                    tracing::warn!(
                        mandelbox_id,
                        error,
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

    /// Marks hosts silent for longer than the heartbeat timeout as unresponsive; how many it marked.
    ///
    /// # Errors
    /// The read model could not be read.
    pub async fn mark_silent_hosts(&self) -> Result<usize, sqlx::Error> {
        let timeout_ms =
            i64::try_from(self.state.settings.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX);
        let now_ms = Utc::now().timestamp_millis();
        // A host that never sent a heartbeat counts from its last change of state (its registration).
        let rows = sqlx::query(
            "SELECT i.instance_id, i.updated_at, h.last_seen_ms FROM instances i \
             LEFT JOIN host_heartbeats h ON h.instance_id = i.instance_id \
             WHERE i.status IN ('ACTIVE', 'DRAINING')",
        )
        .fetch_all(self.state.database.any())
        .await?;
        let mut marked = 0;
        for row in rows {
            let instance_id: String = row.try_get("instance_id")?;
            let last_seen_ms: Option<i64> = row.try_get("last_seen_ms")?;
            let updated_at: String = row.try_get("updated_at")?;
            let since_ms = last_seen_ms.unwrap_or_else(|| {
                chrono::DateTime::parse_from_rfc3339(&updated_at)
                    .map(|at| at.timestamp_millis())
                    .unwrap_or(now_ms)
            });
            if now_ms - since_ms <= timeout_ms {
                continue;
            }
            let metadata = EventMetadata::new(Actor::System, Utc::now());
            match self
                .state
                .services
                .instances
                .execute_retrying(
                    &instance_id,
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
        Ok(marked)
    }

    /// Ends the mandelboxes of unresponsive hosts and terminates the hosts; how many hosts it terminated.
    ///
    /// # Errors
    /// The read model could not be read.
    pub async fn end_unresponsive_hosts(&self) -> Result<usize, sqlx::Error> {
        let rows = sqlx::query("SELECT instance_id FROM instances WHERE status = 'UNRESPONSIVE'")
            .fetch_all(self.state.database.any())
            .await?;
        let mut ended = 0;
        for row in rows {
            let instance_id: String = row.try_get("instance_id")?;
            let metadata = EventMetadata::new(Actor::System, Utc::now());
            if let Err(error) = crate::host::end_mandelboxes_on(
                &self.state,
                &instance_id,
                EndReason::HostLost,
                &metadata,
            )
            .await
            {
                tracing::warn!(
                    instance_id,
                    error,
                    "could not end an unresponsive host's mandelboxes"
                );
                continue;
            }
            if self
                .terminate(&instance_id, TerminationReason::Unresponsive)
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
        let rows = sqlx::query(
            "SELECT instance_id, status, launched_at, updated_at FROM instances \
             WHERE status = 'PRE_CONNECTION' OR (status = 'DRAINING' AND live_mandelboxes = 0)",
        )
        .fetch_all(self.state.database.any())
        .await?;
        let mut ended = 0;
        for row in rows {
            let instance_id: String = row.try_get("instance_id")?;
            let status: String = row.try_get("status")?;
            let (column, cutoff, reason) = if status == "PRE_CONNECTION" {
                (
                    "launched_at",
                    registration_cutoff,
                    TerminationReason::NeverRegistered,
                )
            } else {
                // A draining host's last change is its drain or the end of its last mandelbox.
                ("updated_at", drained_cutoff, TerminationReason::Drained)
            };
            let since: String = row.try_get(column)?;
            let old = chrono::DateTime::parse_from_rfc3339(&since)
                .map(|since| since < cutoff)
                .unwrap_or(false);
            if old && self.terminate(&instance_id, reason).await {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// Decides to terminate a host (a no-op if it is already ending); whether the decision stands.
    async fn terminate(&self, instance_id: &str, reason: TerminationReason) -> bool {
        let metadata = EventMetadata::new(Actor::System, Utc::now());
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
            if let Err(error) = self.mark_silent_hosts().await {
                tracing::warn!(error = %error, "silent-host sweep failed");
            }
            if let Err(error) = self.end_unresponsive_hosts().await {
                tracing::warn!(error = %error, "unresponsive-host sweep failed");
            }
            if let Err(error) = self.end_idle_hosts().await {
                tracing::warn!(error = %error, "idle-host sweep failed");
            }
        }
    }
}
