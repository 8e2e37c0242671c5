//! Typed reads of the fleet's read models (`instances`): the queries the use cases and workers ask, kept beside
//! the tables they read so that a change of the table's shape and of its readers are one change.

use sqlx::Row;
use whist_adapters::store::Database;
use whist_domain::instance::InstanceStatus;
use whist_domain::scaling::HostView;

/// A host an assign may try: its id and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub instance_id: String,
    pub ip: String,
}

/// Up to `limit` hosts in `region` running `client_commit_hash` with a free slot, fullest first (bin packing).
///
/// # Errors
/// The read model could not be read.
pub async fn hosts_with_room(
    database: &Database,
    region: &str,
    client_commit_hash: &str,
    limit: i64,
) -> Result<Vec<Candidate>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT instance_id, ip FROM instances \
         WHERE region = $1 AND client_commit_hash = $2 AND status = 'ACTIVE' \
           AND live_mandelboxes < mandelbox_capacity AND ip IS NOT NULL \
         ORDER BY live_mandelboxes DESC, instance_id LIMIT $3",
    )
    .bind(region)
    .bind(client_commit_hash)
    .bind(limit)
    .fetch_all(database.any())
    .await?;
    rows.iter()
        .map(|row| {
            Ok(Candidate {
                instance_id: row.try_get("instance_id")?,
                ip: row.try_get("ip")?,
            })
        })
        .collect()
}

/// Whether any host in `region` that is up or coming up runs `client_commit_hash` (full or not).
///
/// # Errors
/// The read model could not be read.
pub async fn runs_image(
    database: &Database,
    region: &str,
    client_commit_hash: &str,
) -> Result<bool, sqlx::Error> {
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM instances WHERE region = $1 AND client_commit_hash = $2 \
         AND status IN ('ACTIVE', 'PRE_CONNECTION')",
    )
    .bind(region)
    .bind(client_commit_hash)
    .fetch_one(database.any())
    .await?;
    Ok(count > 0)
}

/// A region's hosts not yet ended, as the scaling policy sees them.
///
/// # Errors
/// The read model could not be read.
pub async fn region_hosts(database: &Database, region: &str) -> Result<Vec<HostView>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT instance_id, image_id, status, mandelbox_capacity, live_mandelboxes FROM instances \
         WHERE region = $1 AND status IN ('PRE_CONNECTION', 'ACTIVE', 'DRAINING', 'UNRESPONSIVE')",
    )
    .bind(region)
    .fetch_all(database.any())
    .await?;
    let mut hosts = Vec::with_capacity(rows.len());
    for row in rows {
        let status: String = row.try_get("status")?;
        let Some(status) = InstanceStatus::parse(&status) else {
            continue;
        };
        let capacity: i64 = row.try_get("mandelbox_capacity")?;
        let live: i64 = row.try_get("live_mandelboxes")?;
        hosts.push(HostView {
            instance_id: row.try_get("instance_id")?,
            image_id: row.try_get("image_id")?,
            status,
            capacity: u32::try_from(capacity).unwrap_or(0),
            live: u32::try_from(live).unwrap_or(0),
        });
    }
    Ok(hosts)
}
