//! Leases: the right of one process to act alone for the deployment for a while (the fleet's leader), one row per
//! lease in `leases`, outside the event log. A holder keeps its lease by renewing it before it expires; once it
//! has expired anyone may take it, and every taking gets a larger epoch than the one before. Time is the
//! database's own clock, so that the processes' clocks never have to agree.
//!
//! A lease is a single statement (no session state, no advisory lock), so it holds through a transaction-mode
//! pooler. A lease only says who *should* decide: what makes an old holder harmless is the fence in the log
//! (`whist_domain::leadership`), which refuses the decisions of an epoch once a newer one is recorded.

use std::time::Duration;

use super::Database;

/// Now, in milliseconds since the epoch, by the database's clock (SQL to put in a statement).
pub(crate) fn now_ms(database: &Database) -> &'static str {
    if database.is_postgres() {
        "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
    } else {
        "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
    }
}

/// Renews `name` for `holder`, or takes it when it has expired (or was never taken), for `ttl`: the epoch
/// `holder` now holds it at, or `None` when another holder's lease is still running. A holder that renews in time
/// keeps its epoch; one that takes the lease, even back from its own expired term, gets the next epoch.
///
/// # Errors
/// The database failed (the caller must then assume it does not hold the lease).
pub async fn hold(
    database: &Database,
    name: &str,
    holder: &str,
    ttl: Duration,
) -> Result<Option<i64>, sqlx::Error> {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
    // EXCLUDED.expires_at_ms - $3 is "now" as the statement saw it.
    let sql = format!(
        "INSERT INTO leases (name, holder, epoch, expires_at_ms) VALUES ($1, $2, 1, {now} + $3) \
         ON CONFLICT (name) DO UPDATE SET \
           epoch = CASE WHEN leases.holder = EXCLUDED.holder \
                         AND leases.expires_at_ms > EXCLUDED.expires_at_ms - $3 \
                        THEN leases.epoch ELSE leases.epoch + 1 END, \
           holder = EXCLUDED.holder, \
           expires_at_ms = EXCLUDED.expires_at_ms \
         WHERE leases.holder = EXCLUDED.holder OR leases.expires_at_ms <= EXCLUDED.expires_at_ms - $3 \
         RETURNING epoch",
        now = now_ms(database)
    );
    sqlx::query_scalar(&sql)
        .bind(name)
        .bind(holder)
        .bind(ttl_ms)
        .fetch_optional(database.any())
        .await
}

/// Gives `name` up if `holder` holds it (a clean shutdown): the next process to ask takes it at once instead of
/// waiting for it to expire.
///
/// # Errors
/// The database failed.
pub async fn release(database: &Database, name: &str, holder: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE leases SET expires_at_ms = 0 WHERE name = $1 AND holder = $2")
        .bind(name)
        .bind(holder)
        .execute(database.any())
        .await
        .map(|_| ())
}

/// Who holds `name` and at which epoch, while it runs: (holder, epoch, milliseconds left).
///
/// # Errors
/// The database failed.
pub async fn current(
    database: &Database,
    name: &str,
) -> Result<Option<(String, i64, i64)>, sqlx::Error> {
    let sql = format!(
        "SELECT holder, epoch, expires_at_ms - {now} FROM leases WHERE name = $1 AND expires_at_ms > {now}",
        now = now_ms(database)
    );
    sqlx::query_as(&sql)
        .bind(name)
        .fetch_optional(database.any())
        .await
}
