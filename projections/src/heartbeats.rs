//! The `host_heartbeats` table, written by the heartbeat book (heartbeats are not events, so no projection writes
//! it), and the read of host statuses the book answers heartbeats from.

use sqlx::Row;
use whist_adapters::store::{values_placeholders, Database};
use whist_domain::instance::InstanceStatus;

/// Hosts written per statement.
const ROWS_PER_STATEMENT: usize = 500;

/// One heartbeat as the host sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heartbeat {
    pub instance_id: String,
    pub received_at_ms: i64,
    pub heartbeat_number: i64,
    pub total_ram_kb: i64,
    pub free_ram_kb: i64,
    pub avail_ram_kb: i64,
    pub is_dying: bool,
}

/// A host's status and live mandelboxes, as the `instances` read model shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFill {
    pub instance_id: String,
    pub status: InstanceStatus,
    pub live_mandelboxes: i64,
}

/// Every host of the `instances` read model with its status and live mandelboxes. A row that cannot be decoded, or
/// whose status this build does not know, is left out.
///
/// # Errors
/// The read model could not be read.
pub async fn host_fills(database: &Database) -> Result<Vec<HostFill>, sqlx::Error> {
    let rows = sqlx::query("SELECT instance_id, status, live_mandelboxes FROM instances")
        .fetch_all(database.any())
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let status: String = row.try_get("status").ok()?;
            Some(HostFill {
                instance_id: row.try_get("instance_id").ok()?,
                status: InstanceStatus::parse(&status)?,
                live_mandelboxes: row.try_get("live_mandelboxes").ok()?,
            })
        })
        .collect())
}

/// Writes `heartbeats` into `host_heartbeats`, one statement per 500 hosts: each host's row takes its heartbeat
/// unless the row already holds a later one.
///
/// # Errors
/// The database failed; the statements before the failing one stay written, the later ones are not tried.
pub async fn write(database: &Database, heartbeats: &[Heartbeat]) -> Result<(), sqlx::Error> {
    for chunk in heartbeats.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from(
            "INSERT INTO host_heartbeats (instance_id, last_seen_ms, heartbeat_number, total_ram_kb, \
             free_ram_kb, avail_ram_kb, is_dying) VALUES ",
        );
        sql.push_str(&values_placeholders(chunk.len(), 7));
        sql.push_str(
            " ON CONFLICT (instance_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms, \
             heartbeat_number = excluded.heartbeat_number, total_ram_kb = excluded.total_ram_kb, \
             free_ram_kb = excluded.free_ram_kb, avail_ram_kb = excluded.avail_ram_kb, \
             is_dying = excluded.is_dying WHERE host_heartbeats.last_seen_ms <= excluded.last_seen_ms",
        );
        let mut query = sqlx::query(&sql);
        for heartbeat in chunk {
            query = query
                .bind(heartbeat.instance_id.as_str())
                .bind(heartbeat.received_at_ms)
                .bind(heartbeat.heartbeat_number)
                .bind(heartbeat.total_ram_kb)
                .bind(heartbeat.free_ram_kb)
                .bind(heartbeat.avail_ram_kb)
                .bind(i64::from(heartbeat.is_dying));
        }
        query.execute(database.any()).await?;
    }
    Ok(())
}
