//! The `event_chain` projection: seals every event, in position order, with its chain hash
//! (`whist_adapters::store::chain`). It is never rebuilt: a rebuild would seal tampered events as if they were the
//! originals, and the seals are the evidence `whist events verify` checks the events against.

use async_trait::async_trait;
use sqlx::AnyConnection;
use whist_adapters::store::{chain_hash, values_placeholders, LoggedEvent, GENESIS};

use crate::projection::{Projection, ProjectionError, Tables};

/// The `event_chain` projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventChain;

/// Rows per INSERT statement.
const ROWS_PER_STATEMENT: usize = 500;

#[async_trait]
impl Projection for EventChain {
    fn name(&self) -> &'static str {
        "event_chain"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["event_chain"]
    }

    fn rebuildable(&self) -> bool {
        false
    }

    async fn apply(
        &self,
        connection: &mut AnyConnection,
        tables: &Tables,
        events: &[LoggedEvent],
    ) -> Result<(), ProjectionError> {
        let table = tables.get("event_chain")?;
        let Some(first) = events.first() else {
            return Ok(());
        };
        let previous: Option<String> =
            sqlx::query_scalar(&format!("SELECT hash FROM {table} WHERE position = $1"))
                .bind(first.position - 1)
                .fetch_optional(&mut *connection)
                .await?;
        let mut previous = match previous {
            Some(hash) => hash,
            None if first.position == 1 => GENESIS.to_string(),
            None => {
                return Err(ProjectionError::unreadable(
                    first,
                    format!(
                        "the event before it (position {}) has no seal",
                        first.position - 1
                    ),
                ))
            }
        };
        let mut sealed = Vec::with_capacity(events.len());
        for event in events {
            let hash = chain_hash(&previous, event);
            sealed.push((event.position, hash.clone()));
            previous = hash;
        }
        for rows in sealed.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO {table} (position, hash) VALUES {}",
                values_placeholders(rows.len(), 2)
            );
            let mut query = sqlx::query(&sql);
            for (position, hash) in rows {
                query = query.bind(*position).bind(hash.as_str());
            }
            query.execute(&mut *connection).await?;
        }
        Ok(())
    }
}
