//! The `images` read model: per region, every image a release ever named and what it is now (`PREPARED`, `ACTIVE`,
//! `RETIRED` or `ROLLED_BACK`). A swap-over is one event, applied in one transaction, so a reader sees every region
//! switched or none. [`list_region_images`] reads it.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use whist_adapters::store::{Database, LoggedEvent};
use whist_domain::images::ImageCatalogEvent;

use crate::projection::{Projection, ProjectionError, Tables};

/// The `images` projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Images;

async fn set(
    connection: &mut AnyConnection,
    table: &str,
    row: (&str, &str, &str),
    status: &str,
    generation: Option<i64>,
    event: &LoggedEvent,
    at: &str,
) -> Result<(), ProjectionError> {
    let (region, client_commit_hash, image_id) = row;
    sqlx::query(&format!(
        "INSERT INTO {table} (region, client_commit_hash, image_id, status, generation, position, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (region, client_commit_hash) DO UPDATE SET image_id = excluded.image_id, \
         status = excluded.status, generation = COALESCE(excluded.generation, {table}.generation), \
         position = excluded.position, updated_at = excluded.updated_at"
    ))
    .bind(region)
    .bind(client_commit_hash)
    .bind(image_id)
    .bind(status)
    .bind(generation)
    .bind(event.position)
    .bind(at)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

/// Marks the images active in `region` other than `client_commit_hash`'s as retired.
async fn retire_others(
    connection: &mut AnyConnection,
    table: &str,
    region: &str,
    client_commit_hash: &str,
    event: &LoggedEvent,
    at: &str,
) -> Result<(), ProjectionError> {
    sqlx::query(&format!(
        "UPDATE {table} SET status = 'RETIRED', position = $1, updated_at = $2 \
         WHERE region = $3 AND status = 'ACTIVE' AND client_commit_hash <> $4"
    ))
    .bind(event.position)
    .bind(at)
    .bind(region)
    .bind(client_commit_hash)
    .execute(&mut *connection)
    .await?;
    Ok(())
}

#[async_trait]
impl Projection for Images {
    fn name(&self) -> &'static str {
        "images"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["region_images"]
    }

    async fn apply(
        &self,
        connection: &mut AnyConnection,
        tables: &Tables,
        events: &[LoggedEvent],
    ) -> Result<(), ProjectionError> {
        let table = tables.get("region_images")?;
        for event in events
            .iter()
            .filter(|event| event.aggregate_type == "image_catalog")
        {
            let payload: ImageCatalogEvent = event
                .payload_as()
                .map_err(|error| ProjectionError::unreadable(event, error))?;
            match payload {
                ImageCatalogEvent::ReleaseActivated {
                    client_commit_hash,
                    images,
                    at,
                }
                | ImageCatalogEvent::ReleaseSwappedOver {
                    client_commit_hash,
                    images,
                    at,
                    ..
                } => {
                    let at = at.to_rfc3339();
                    for (region, image_id) in &images {
                        retire_others(connection, table, region, &client_commit_hash, event, &at)
                            .await?;
                        let row = (
                            region.as_str(),
                            client_commit_hash.as_str(),
                            image_id.as_str(),
                        );
                        set(connection, table, row, "ACTIVE", None, event, &at).await?;
                    }
                }
                ImageCatalogEvent::ReleasePrepared {
                    client_commit_hash,
                    images,
                    generation,
                    at,
                } => {
                    let at = at.to_rfc3339();
                    let generation = i64::try_from(generation).unwrap_or(i64::MAX);
                    for (region, image_id) in &images {
                        let row = (
                            region.as_str(),
                            client_commit_hash.as_str(),
                            image_id.as_str(),
                        );
                        set(
                            connection,
                            table,
                            row,
                            "PREPARED",
                            Some(generation),
                            event,
                            &at,
                        )
                        .await?;
                    }
                }
                ImageCatalogEvent::ReleaseRolledBack {
                    client_commit_hash,
                    images,
                    at,
                } => {
                    let at = at.to_rfc3339();
                    for (region, image_id) in &images {
                        let row = (
                            region.as_str(),
                            client_commit_hash.as_str(),
                            image_id.as_str(),
                        );
                        set(connection, table, row, "ROLLED_BACK", None, event, &at).await?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// A row of `region_images`: one region's image of one release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionImageRow {
    pub region: String,
    pub client_commit_hash: String,
    pub image_id: String,
    /// `PREPARED`, `ACTIVE`, `RETIRED` or `ROLLED_BACK`.
    pub status: String,
    /// The preparation that recorded a candidate (`None` for an image activated without one).
    pub generation: Option<i64>,
    /// The log position of the event that last changed the row.
    pub position: i64,
    pub updated_at: String,
}

fn region_image_row(row: &AnyRow) -> Result<RegionImageRow, sqlx::Error> {
    Ok(RegionImageRow {
        region: row.try_get("region")?,
        client_commit_hash: row.try_get("client_commit_hash")?,
        image_id: row.try_get("image_id")?,
        status: row.try_get("status")?,
        generation: row.try_get("generation")?,
        position: row.try_get("position")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Every region's images, or only those with `status`, by region and then in the order they last changed.
///
/// # Errors
/// The read model could not be read.
pub async fn list_region_images(
    database: &Database,
    status: Option<&str>,
) -> Result<Vec<RegionImageRow>, sqlx::Error> {
    crate::read::filtered_by_status(
        database,
        "SELECT region, client_commit_hash, image_id, status, generation, position, updated_at \
         FROM region_images WHERE $1 IS NULL OR status = $1 ORDER BY region, position, client_commit_hash",
        status,
        region_image_row,
    )
    .await
}
