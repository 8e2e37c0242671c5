//! The fleet read models: `instances` (every host and its fill, which assigns choose candidates from) and
//! `mandelboxes`.

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::AnyConnection;
use whist_adapters::store::{values_placeholders, LoggedEvent};
use whist_domain::instance::{InstanceEvent, InstanceStatus};
use whist_domain::mandelbox::{MandelboxEvent, MandelboxStatus, Placement};

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
        // A host's fill changes with every allocation and end: folded per batch to each host's last fill, written
        // in one statement (per chunk) before any other change to the table, so the order of writes is kept.
        let mut fills = LastWrite::default();
        for event in events
            .iter()
            .filter(|event| event.aggregate_type == "instance")
        {
            let payload: InstanceEvent = event
                .payload_as()
                .map_err(|error| ProjectionError::unreadable(event, error))?;
            let id = event.aggregate_id.as_str();
            if !matches!(
                payload,
                InstanceEvent::MandelboxAllocated { .. } | InstanceEvent::MandelboxFreed { .. }
            ) {
                write_fills(connection, table, &mut fills).await?;
            }
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
                    fills.set(id, (i64::from(live_after), at.to_rfc3339()));
                    continue;
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
        write_fills(connection, table, &mut fills).await?;
        Ok(())
    }
}

/// Writes the hosts' folded fills (live mandelboxes, time of the change) and forgets them.
async fn write_fills(
    connection: &mut AnyConnection,
    table: &str,
    fills: &mut LastWrite<'_, (i64, String)>,
) -> Result<(), sqlx::Error> {
    set_column(connection, table, "instance_id", "live_mandelboxes", fills).await?;
    fills.clear();
    Ok(())
}

/// Sets `column` and `updated_at` of every row a batch changed, in one statement per chunk: `rows` holds each key's
/// last (value, time of the change).
async fn set_column<V>(
    connection: &mut AnyConnection,
    table: &str,
    key: &str,
    column: &str,
    rows: &LastWrite<'_, (V, String)>,
) -> Result<(), sqlx::Error>
where
    V: Clone + Send + Sync + sqlx::Type<sqlx::Any> + for<'q> sqlx::Encode<'q, sqlx::Any>,
{
    for chunk in rows.rows().chunks(ROWS_PER_STATEMENT) {
        let sql = format!(
            "UPDATE {table} SET {column} = v.column2, updated_at = v.column3 FROM (VALUES {}) AS v \
             WHERE {table}.{key} = v.column1",
            values_placeholders(chunk.len(), 3)
        );
        let mut query = sqlx::query(&sql);
        for (id, (value, at)) in chunk {
            query = query.bind(*id).bind(value.clone()).bind(at.as_str());
        }
        query.execute(&mut *connection).await?;
    }
    Ok(())
}

/// Rows per multi-row statement.
const ROWS_PER_STATEMENT: usize = 500;

/// Per key, the last value a batch wrote, in the order the keys first appeared (so statements are deterministic).
struct LastWrite<'a, V> {
    order: Vec<&'a str>,
    values: HashMap<&'a str, V>,
}

impl<V> Default for LastWrite<'_, V> {
    fn default() -> Self {
        Self {
            order: Vec::new(),
            values: HashMap::new(),
        }
    }
}

impl<'a, V> LastWrite<'a, V> {
    fn set(&mut self, key: &'a str, value: V) {
        if self.values.insert(key, value).is_none() {
            self.order.push(key);
        }
    }

    fn rows(&self) -> Vec<(&'a str, &V)> {
        self.order
            .iter()
            .filter_map(|key| self.values.get(key).map(|value| (*key, value)))
            .collect()
    }

    fn clear(&mut self) {
        self.order.clear();
        self.values.clear();
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
        // Folded per batch: the new rows (inserted first, as allocated), then each row's last status, so a batch
        // costs two statements (per chunk) however many events it holds.
        let mut inserts: Vec<(&str, Placement, String)> = Vec::new();
        let mut statuses = LastWrite::default();
        for event in events
            .iter()
            .filter(|event| event.aggregate_type == "mandelbox")
        {
            let payload: MandelboxEvent = event
                .payload_as()
                .map_err(|error| ProjectionError::unreadable(event, error))?;
            let id = event.aggregate_id.as_str();
            match payload {
                MandelboxEvent::Allocated { placement, at, .. } => {
                    inserts.push((id, placement, at.to_rfc3339()));
                }
                MandelboxEvent::StatusChanged { to, at, .. } => {
                    statuses.set(id, (to.as_str().to_string(), at.to_rfc3339()));
                }
                MandelboxEvent::Ended { at, .. } => {
                    statuses.set(
                        id,
                        (MandelboxStatus::Dead.as_str().to_string(), at.to_rfc3339()),
                    );
                }
                // The host took it; its status moves when the host reports.
                MandelboxEvent::SpunUp { .. } => {}
            }
        }
        for chunk in inserts.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO {table} (mandelbox_id, instance_id, user_id, session_id, region, ip, status, \
                 created_at, updated_at) VALUES {} ON CONFLICT (mandelbox_id) DO NOTHING",
                values_placeholders(chunk.len(), 9)
            );
            let mut query = sqlx::query(&sql);
            for (id, placement, at) in chunk {
                query = query
                    .bind(*id)
                    .bind(placement.instance_id.as_str())
                    .bind(placement.user_id.as_str())
                    .bind(placement.session_id)
                    .bind(placement.region.as_str())
                    .bind(placement.ip.as_str())
                    .bind(MandelboxStatus::Allocated.as_str())
                    .bind(at.as_str())
                    .bind(at.as_str());
            }
            query.execute(&mut *connection).await?;
        }
        set_column(connection, table, "mandelbox_id", "status", &statuses).await?;
        Ok(())
    }
}
