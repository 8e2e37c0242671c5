//! What the typed reads of the read models share.

use sqlx::any::AnyRow;
use whist_adapters::store::Database;

/// The rows of `sql`, whose `$1` is an optional status filter (`WHERE $1 IS NULL OR status = $1`), each decoded by
/// `decode`.
///
/// # Errors
/// The read model could not be read, or a row could not be decoded.
pub(crate) async fn filtered_by_status<T>(
    database: &Database,
    sql: &str,
    status: Option<&str>,
    decode: fn(&AnyRow) -> Result<T, sqlx::Error>,
) -> Result<Vec<T>, sqlx::Error> {
    let rows = sqlx::query(sql)
        .bind(status)
        .fetch_all(database.any())
        .await?;
    rows.iter().map(decode).collect()
}
