//! The fleet read models: `instances` (every host and its fill, which assigns choose candidates from) and
//! `mandelboxes`.

use async_trait::async_trait;
use sqlx::AnyConnection;
use whist_adapters::store::LoggedEvent;
use whist_domain::instance::{InstanceEvent, InstanceStatus};
use whist_domain::mandelbox::{MandelboxEvent, MandelboxStatus};

use crate::projection::{Projection, ProjectionError, Tables};

/// The `instances` projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Instances;

#[async_trait]
impl Projection for Instances {
    fn name(&self) -> &'static str {
        "instances"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["instances"]
    }

    async fn apply(
        &self,
        connection: &mut AnyConnection,
        tables: &Tables,
        events: &[LoggedEvent],
    ) -> Result<(), ProjectionError> {
        let table = tables.get("instances")?;
        for event in events
            .iter()
            .filter(|event| event.aggregate_type == "instance")
        {
            let payload: InstanceEvent = event
                .payload_as()
                .map_err(|error| ProjectionError::unreadable(event, error))?;
            let id = event.aggregate_id.as_str();
            match payload {
                InstanceEvent::LaunchRequested { spec, at, .. } => {
                    sqlx::query(&format!(
                        "INSERT INTO {table} (instance_id, cloud_instance_id, region, image_id, client_commit_hash, \
                         instance_type, ip, status, mandelbox_capacity, live_mandelboxes, launched_at, updated_at) \
                         VALUES ($1, NULL, $2, $3, $4, $5, NULL, $6, 0, 0, $7, $7) \
                         ON CONFLICT (instance_id) DO NOTHING"
                    ))
                    .bind(id)
                    .bind(spec.region)
                    .bind(spec.image_id)
                    .bind(spec.client_commit_hash)
                    .bind(spec.instance_type)
                    .bind(InstanceStatus::PreConnection.as_str())
                    .bind(at.to_rfc3339())
                    .execute(&mut *connection)
                    .await?;
                }
                InstanceEvent::Launched {
                    cloud_instance_id,
                    at,
                } => {
                    sqlx::query(&format!(
                        "UPDATE {table} SET cloud_instance_id = $2, updated_at = $3 WHERE instance_id = $1"
                    ))
                    .bind(id)
                    .bind(cloud_instance_id)
                    .bind(at.to_rfc3339())
                    .execute(&mut *connection)
                    .await?;
                }
                InstanceEvent::Registered {
                    ip,
                    mandelbox_capacity,
                    at,
                    ..
                } => {
                    sqlx::query(&format!(
                        "UPDATE {table} SET ip = $2, mandelbox_capacity = $3, status = $4, updated_at = $5 \
                         WHERE instance_id = $1"
                    ))
                    .bind(id)
                    .bind(ip)
                    .bind(i64::from(mandelbox_capacity))
                    .bind(InstanceStatus::Active.as_str())
                    .bind(at.to_rfc3339())
                    .execute(&mut *connection)
                    .await?;
                }
                InstanceEvent::MandelboxAllocated { live_after, at, .. }
                | InstanceEvent::MandelboxFreed { live_after, at, .. } => {
                    sqlx::query(&format!(
                        "UPDATE {table} SET live_mandelboxes = $2, updated_at = $3 WHERE instance_id = $1"
                    ))
                    .bind(id)
                    .bind(i64::from(live_after))
                    .bind(at.to_rfc3339())
                    .execute(&mut *connection)
                    .await?;
                }
                InstanceEvent::LaunchFailed { at, .. } | InstanceEvent::Terminated { at } => {
                    set_status(connection, table, id, InstanceStatus::Terminated, at).await?;
                }
                InstanceEvent::DrainStarted { at, .. } => {
                    set_status(connection, table, id, InstanceStatus::Draining, at).await?;
                }
                InstanceEvent::BecameUnresponsive { at } => {
                    set_status(connection, table, id, InstanceStatus::Unresponsive, at).await?;
                }
                InstanceEvent::BecameResponsive { returned_to, at } => {
                    set_status(connection, table, id, returned_to, at).await?;
                }
                InstanceEvent::TerminationStarted { at, .. } => {
                    set_status(connection, table, id, InstanceStatus::Terminating, at).await?;
                }
                // A cloud instance that was not the host: the host's own row is unchanged.
                InstanceEvent::StrayTerminated { .. } => {}
            }
        }
        Ok(())
    }
}

async fn set_status(
    connection: &mut AnyConnection,
    table: &str,
    instance_id: &str,
    status: InstanceStatus,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "UPDATE {table} SET status = $2, updated_at = $3 WHERE instance_id = $1"
    ))
    .bind(instance_id)
    .bind(status.as_str())
    .bind(at.to_rfc3339())
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// The `mandelboxes` projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mandelboxes;

#[async_trait]
impl Projection for Mandelboxes {
    fn name(&self) -> &'static str {
        "mandelboxes"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["mandelboxes"]
    }

    async fn apply(
        &self,
        connection: &mut AnyConnection,
        tables: &Tables,
        events: &[LoggedEvent],
    ) -> Result<(), ProjectionError> {
        let table = tables.get("mandelboxes")?;
        for event in events
            .iter()
            .filter(|event| event.aggregate_type == "mandelbox")
        {
            let payload: MandelboxEvent = event
                .payload_as()
                .map_err(|error| ProjectionError::unreadable(event, error))?;
            let id = event.aggregate_id.as_str();
            let (status, at) = match payload {
                MandelboxEvent::Allocated { placement, at, .. } => {
                    sqlx::query(&format!(
                        "INSERT INTO {table} (mandelbox_id, instance_id, user_id, session_id, region, ip, status, \
                         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
                         ON CONFLICT (mandelbox_id) DO NOTHING"
                    ))
                    .bind(id)
                    .bind(placement.instance_id)
                    .bind(placement.user_id)
                    .bind(placement.session_id)
                    .bind(placement.region)
                    .bind(placement.ip)
                    .bind(MandelboxStatus::Allocated.as_str())
                    .bind(at.to_rfc3339())
                    .execute(&mut *connection)
                    .await?;
                    continue;
                }
                MandelboxEvent::StatusChanged { to, at, .. } => (to, at),
                MandelboxEvent::Ended { at, .. } => (MandelboxStatus::Dead, at),
                // The host took it; its status moves when the host reports.
                MandelboxEvent::SpunUp { .. } => continue,
            };
            sqlx::query(&format!(
                "UPDATE {table} SET status = $2, updated_at = $3 WHERE mandelbox_id = $1"
            ))
            .bind(id)
            .bind(status.as_str())
            .bind(at.to_rfc3339())
            .execute(&mut *connection)
            .await?;
        }
        Ok(())
    }
}
