//! The autoscaler keeps a warm buffer of free mandelbox slots per enabled region, on hosts of the region's active
//! image, counting hosts still booting. One process decides at a time (a Postgres advisory lock held on a
//! dedicated connection; the embedded store has one process).
//!
//! This is the launch half for simulated hosts (`WHIST_CLOUD=local`); scale-down and EC2 come with the reconciler
//! issue.

use std::time::Duration;

use chrono::Utc;
use sqlx::Row;
use tokio::sync::watch;
use uuid::Uuid;
use whist_adapters::store::Backend;
use whist_adapters::tokens::{fingerprint, Purpose};
use whist_domain::images::CATALOG_ID;
use whist_domain::instance::{InstanceCommand, LaunchSpec};
use whist_domain::{Actor, EventMetadata};

use crate::reconciler::SIMULATED_CAPACITY;
use crate::state::AppState;

/// The key of the autoscaler's advisory lock.
const LOCK_KEY: i64 = 0x5768_6973_7441_5331;

/// Decides launches for the warm buffer.
pub struct Autoscaler {
    state: AppState,
}

impl Autoscaler {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    /// One decision for every enabled region; how many hosts it decided to launch.
    ///
    /// # Errors
    /// The store failed.
    pub async fn decide_once(&self) -> Result<usize, String> {
        let services = &self.state.services;
        let settings = &self.state.settings;
        let (catalog, _) = services
            .catalog
            .load(CATALOG_ID)
            .await
            .map_err(|error| error.to_string())?;
        let mut launched = 0;
        for region in &settings.enabled_regions {
            let Some(image) = catalog.active_in(region) else {
                continue;
            };
            let rows = sqlx::query(
                "SELECT status, mandelbox_capacity, live_mandelboxes FROM instances \
                 WHERE region = $1 AND image_id = $2 AND status IN ('ACTIVE', 'PRE_CONNECTION')",
            )
            .bind(region.as_str())
            .bind(image.image_id.as_str())
            .fetch_all(self.state.database.any())
            .await
            .map_err(|error| error.to_string())?;
            let mut free = 0i64;
            for row in &rows {
                let status: String = row.try_get("status").map_err(|error| error.to_string())?;
                let capacity: i64 = row
                    .try_get("mandelbox_capacity")
                    .map_err(|error| error.to_string())?;
                let live: i64 = row
                    .try_get("live_mandelboxes")
                    .map_err(|error| error.to_string())?;
                free += if status == "PRE_CONNECTION" {
                    i64::from(SIMULATED_CAPACITY)
                } else {
                    (capacity - live).max(0)
                };
            }
            let desired = i64::from(settings.desired_free_mandelboxes_in(region));
            let missing = desired - free;
            if missing <= 0 {
                continue;
            }
            let hosts =
                (missing + i64::from(SIMULATED_CAPACITY) - 1) / i64::from(SIMULATED_CAPACITY);
            for _ in 0..hosts {
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
                    at: Utc::now(),
                };
                let metadata = EventMetadata::new(Actor::System, Utc::now());
                services
                    .instances
                    .execute(&instance_id, command, &metadata)
                    .await
                    .map_err(|error| error.to_string())?;
                tracing::info!(
                    region,
                    instance_id,
                    free,
                    desired,
                    "launching a host for the warm buffer"
                );
                launched += 1;
            }
        }
        Ok(launched)
    }

    /// Decides every 2 s while this process holds the autoscaler lock, until `shutdown`.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut held = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let leading = match self.state.database.backend() {
                Backend::Sqlite(_) => true,
                Backend::Postgres(pool) => {
                    if held.is_none() {
                        if let Ok(mut connection) = pool.acquire().await {
                            let got: Result<bool, _> =
                                sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                                    .bind(LOCK_KEY)
                                    .fetch_one(&mut *connection)
                                    .await;
                            if matches!(got, Ok(true)) {
                                held = Some(connection);
                            }
                        }
                    }
                    held.is_some()
                }
            };
            if leading {
                if let Err(error) = self.decide_once().await {
                    tracing::warn!(error, "autoscaler decision failed");
                    held = None;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = shutdown.changed() => {}
            }
        }
    }
}
