//! Typed reads of the fleet's read models (`instances`, `mandelboxes`, and `host_heartbeats` for the silence of
//! hosts): the queries the use cases, workers and admin endpoints ask, kept beside the tables they read so that a
//! change of the table's shape and of its readers are one change.

use sqlx::any::AnyRow;
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
    let query = sqlx::query(
        "SELECT instance_id, ip FROM instances \
         WHERE region = $1 AND client_commit_hash = $2 AND status = 'ACTIVE' \
           AND live_mandelboxes < mandelbox_capacity AND ip IS NOT NULL \
         ORDER BY live_mandelboxes DESC, instance_id LIMIT $3",
    )
    .bind(region)
    .bind(client_commit_hash)
    .bind(limit);
    // Read on every assign: on a connection kept between such reads.
    let mut connection = database.hot_read().await?;
    let rows = query.fetch_all(&mut *connection).await?;
    connection.keep();
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

/// A host and its region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInRegion {
    pub instance_id: String,
    pub region: String,
}

/// A registered host (`ACTIVE`, `DRAINING` or `UNRESPONSIVE`) and when it was last heard from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeardHost {
    pub instance_id: String,
    pub region: String,
    pub status: String,
    /// The host's last change of state (RFC 3339, as stored).
    pub updated_at: String,
    /// Its last heartbeat written to `host_heartbeats` (milliseconds since the epoch); `None` if it never sent one.
    pub last_seen_ms: Option<i64>,
}

/// A host that may have idled too long: still booting, or draining with no mandelbox left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleHost {
    pub instance_id: String,
    /// `PRE_CONNECTION` (it never registered); otherwise it is `DRAINING` and empty.
    pub pre_connection: bool,
    /// Since when it idles (RFC 3339, as stored): its launch decision (`launched_at`) while it has not registered,
    /// its last change (`updated_at`: the drain, or the end of its last mandelbox) once drained.
    pub since: String,
}

/// A recorded host that should have a live cloud instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedHost {
    pub instance_id: String,
    pub cloud_instance_id: String,
    /// Its last change of state (RFC 3339, as stored).
    pub updated_at: String,
}

/// A host and its status, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostStatus {
    pub instance_id: String,
    pub status: String,
}

/// A mandelbox still `ALLOCATED` and when it was allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocatedMandelbox {
    pub mandelbox_id: String,
    /// RFC 3339, as stored.
    pub created_at: String,
}

/// How many rows have a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusCount {
    pub status: String,
    pub count: i64,
}

/// A row of `instances`, whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceRow {
    pub instance_id: String,
    /// `None` before the launch is recorded.
    pub cloud_instance_id: Option<String>,
    pub region: String,
    pub image_id: String,
    pub client_commit_hash: String,
    pub instance_type: String,
    pub ip: Option<String>,
    pub status: String,
    pub mandelbox_capacity: i64,
    pub live_mandelboxes: i64,
    pub launched_at: String,
    pub updated_at: String,
}

/// A row of `mandelboxes`, whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MandelboxRow {
    pub mandelbox_id: String,
    pub instance_id: String,
    pub user_id: String,
    pub session_id: i64,
    pub region: String,
    pub ip: String,
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
}

/// Up to 500 mandelboxes still `ALLOCATED` (their host never reported them connecting), in no particular order.
///
/// # Errors
/// The read model could not be read.
pub async fn allocated_mandelboxes(
    database: &Database,
) -> Result<Vec<AllocatedMandelbox>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT mandelbox_id, created_at FROM mandelboxes WHERE status = 'ALLOCATED' LIMIT 500",
    )
    .fetch_all(database.any())
    .await?;
    rows.iter()
        .map(|row| {
            Ok(AllocatedMandelbox {
                mandelbox_id: row.try_get("mandelbox_id")?,
                created_at: row.try_get("created_at")?,
            })
        })
        .collect()
}

/// Every registered host (`ACTIVE`, `DRAINING` or `UNRESPONSIVE`) with its last heartbeat, if any.
///
/// # Errors
/// The read model could not be read.
pub async fn registered_hosts(database: &Database) -> Result<Vec<HeardHost>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT i.instance_id, i.region, i.status, i.updated_at, h.last_seen_ms FROM instances i \
         LEFT JOIN host_heartbeats h ON h.instance_id = i.instance_id \
         WHERE i.status IN ('ACTIVE', 'DRAINING', 'UNRESPONSIVE')",
    )
    .fetch_all(database.any())
    .await?;
    rows.iter()
        .map(|row| {
            Ok(HeardHost {
                instance_id: row.try_get("instance_id")?,
                region: row.try_get("region")?,
                status: row.try_get("status")?,
                updated_at: row.try_get("updated_at")?,
                last_seen_ms: row.try_get("last_seen_ms")?,
            })
        })
        .collect()
}

/// Every `UNRESPONSIVE` host and its region.
///
/// # Errors
/// The read model could not be read.
pub async fn unresponsive_hosts(database: &Database) -> Result<Vec<HostInRegion>, sqlx::Error> {
    let rows =
        sqlx::query("SELECT instance_id, region FROM instances WHERE status = 'UNRESPONSIVE'")
            .fetch_all(database.any())
            .await?;
    rows.iter()
        .map(|row| {
            Ok(HostInRegion {
                instance_id: row.try_get("instance_id")?,
                region: row.try_get("region")?,
            })
        })
        .collect()
}

/// Every host still `PRE_CONNECTION`, and every `DRAINING` host with no live mandelbox, with since when it idles.
///
/// # Errors
/// The read model could not be read.
pub async fn idle_hosts(database: &Database) -> Result<Vec<IdleHost>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT instance_id, status, launched_at, updated_at FROM instances \
         WHERE status = 'PRE_CONNECTION' OR (status = 'DRAINING' AND live_mandelboxes = 0)",
    )
    .fetch_all(database.any())
    .await?;
    rows.iter()
        .map(|row| {
            let instance_id: String = row.try_get("instance_id")?;
            let status: String = row.try_get("status")?;
            let pre_connection = status == "PRE_CONNECTION";
            // Only the column that counts is read.
            let column = if pre_connection {
                "launched_at"
            } else {
                "updated_at"
            };
            Ok(IdleHost {
                instance_id,
                pre_connection,
                since: row.try_get(column)?,
            })
        })
        .collect()
}

/// The regions with a recorded host not yet `TERMINATED`, in no particular order.
///
/// # Errors
/// The read model could not be read.
pub async fn regions_with_hosts(database: &Database) -> Result<Vec<String>, sqlx::Error> {
    let rows = sqlx::query("SELECT DISTINCT region FROM instances WHERE status <> 'TERMINATED'")
        .fetch_all(database.any())
        .await?;
    rows.iter().map(|row| row.try_get("region")).collect()
}

/// The hosts of `region` not yet `TERMINATED` whose cloud instance is recorded.
///
/// # Errors
/// The read model could not be read.
pub async fn recorded_hosts(
    database: &Database,
    region: &str,
) -> Result<Vec<RecordedHost>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT instance_id, cloud_instance_id, updated_at FROM instances \
         WHERE region = $1 AND status <> 'TERMINATED' AND cloud_instance_id IS NOT NULL",
    )
    .bind(region)
    .fetch_all(database.any())
    .await?;
    rows.iter()
        .map(|row| {
            Ok(RecordedHost {
                instance_id: row.try_get("instance_id")?,
                cloud_instance_id: row.try_get("cloud_instance_id")?,
                updated_at: row.try_get("updated_at")?,
            })
        })
        .collect()
}

/// The status of every host of `region` on `image_id`, whatever it is (ended hosts included).
///
/// # Errors
/// The read model could not be read.
pub async fn image_host_statuses(
    database: &Database,
    region: &str,
    image_id: &str,
) -> Result<Vec<HostStatus>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT instance_id, status FROM instances WHERE region = $1 AND image_id = $2",
    )
    .bind(region)
    .bind(image_id)
    .fetch_all(database.any())
    .await?;
    rows.iter()
        .map(|row| {
            Ok(HostStatus {
                instance_id: row.try_get("instance_id")?,
                status: row.try_get("status")?,
            })
        })
        .collect()
}

/// How many hosts of `region` on `image_id` are `ACTIVE`.
///
/// # Errors
/// The read model could not be read.
pub async fn active_hosts_of_image(
    database: &Database,
    region: &str,
    image_id: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM instances WHERE region = $1 AND image_id = $2 AND status = 'ACTIVE'",
    )
    .bind(region)
    .bind(image_id)
    .fetch_one(database.any())
    .await
}

/// The free slots (capacity less live mandelboxes) of the `ACTIVE` hosts of `region` on `image_id`; 0 if none.
///
/// # Errors
/// The read model could not be read.
pub async fn free_slots(
    database: &Database,
    region: &str,
    image_id: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT CAST(COALESCE(SUM(mandelbox_capacity - live_mandelboxes), 0) AS BIGINT) FROM instances \
         WHERE region = $1 AND status = 'ACTIVE' AND image_id = $2",
    )
    .bind(region)
    .bind(image_id)
    .fetch_one(database.any())
    .await
}

fn status_counts(rows: &[AnyRow]) -> Result<Vec<StatusCount>, sqlx::Error> {
    rows.iter()
        .map(|row| {
            Ok(StatusCount {
                status: row.try_get("status")?,
                count: row.try_get("n")?,
            })
        })
        .collect()
}

/// How many hosts of `region` have each status, for the statuses that have any, in no particular order.
///
/// # Errors
/// The read model could not be read.
pub async fn instances_by_status(
    database: &Database,
    region: &str,
) -> Result<Vec<StatusCount>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT status, count(*) AS n FROM instances WHERE region = $1 GROUP BY status",
    )
    .bind(region)
    .fetch_all(database.any())
    .await?;
    status_counts(&rows)
}

/// How many mandelboxes have each status, for the statuses that have any, in no particular order.
///
/// # Errors
/// The read model could not be read.
pub async fn mandelboxes_by_status(database: &Database) -> Result<Vec<StatusCount>, sqlx::Error> {
    let rows = sqlx::query("SELECT status, count(*) AS n FROM mandelboxes GROUP BY status")
        .fetch_all(database.any())
        .await?;
    status_counts(&rows)
}

/// When each mandelbox allocated at or after `since` (RFC 3339, compared as stored) was allocated, as stored.
///
/// # Errors
/// The read model could not be read.
pub async fn mandelboxes_created_since(
    database: &Database,
    since: &str,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT created_at FROM mandelboxes WHERE created_at >= $1")
        .bind(since)
        .fetch_all(database.any())
        .await
}

fn instance_row(row: &AnyRow) -> Result<InstanceRow, sqlx::Error> {
    Ok(InstanceRow {
        instance_id: row.try_get("instance_id")?,
        cloud_instance_id: row.try_get("cloud_instance_id")?,
        region: row.try_get("region")?,
        image_id: row.try_get("image_id")?,
        client_commit_hash: row.try_get("client_commit_hash")?,
        instance_type: row.try_get("instance_type")?,
        ip: row.try_get("ip")?,
        status: row.try_get("status")?,
        mandelbox_capacity: row.try_get("mandelbox_capacity")?,
        live_mandelboxes: row.try_get("live_mandelboxes")?,
        launched_at: row.try_get("launched_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn mandelbox_row(row: &AnyRow) -> Result<MandelboxRow, sqlx::Error> {
    Ok(MandelboxRow {
        mandelbox_id: row.try_get("mandelbox_id")?,
        instance_id: row.try_get("instance_id")?,
        user_id: row.try_get("user_id")?,
        session_id: row.try_get("session_id")?,
        region: row.try_get("region")?,
        ip: row.try_get("ip")?,
        status: row.try_get("status")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Every host, or only those with `status`, in the order they were launched.
///
/// # Errors
/// The read model could not be read.
pub async fn list_instances(
    database: &Database,
    status: Option<&str>,
) -> Result<Vec<InstanceRow>, sqlx::Error> {
    crate::read::filtered_by_status(
        database,
        "SELECT instance_id, cloud_instance_id, region, image_id, client_commit_hash, instance_type, ip, status, \
         mandelbox_capacity, live_mandelboxes, launched_at, updated_at FROM instances \
         WHERE $1 IS NULL OR status = $1 ORDER BY launched_at, instance_id",
        status,
        instance_row,
    )
    .await
}

/// Every mandelbox, or only those with `status`, in the order they were allocated.
///
/// # Errors
/// The read model could not be read.
pub async fn list_mandelboxes(
    database: &Database,
    status: Option<&str>,
) -> Result<Vec<MandelboxRow>, sqlx::Error> {
    crate::read::filtered_by_status(
        database,
        "SELECT mandelbox_id, instance_id, user_id, session_id, region, ip, status, created_at, updated_at \
         FROM mandelboxes WHERE $1 IS NULL OR status = $1 ORDER BY created_at, mandelbox_id",
        status,
        mandelbox_row,
    )
    .await
}
