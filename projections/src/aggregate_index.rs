//! The aggregate index: every aggregate with its version, event count and place in the log.
//!
//! Auditors use it to find aggregates; tests use it to prove that the log is delivered exactly once
//! (`event_count` equals `version` for every aggregate only if no event was lost or applied twice).

use std::collections::HashMap;

use async_trait::async_trait;
use sqlx::AnyConnection;
use whist_adapters::store::LoggedEvent;

use crate::projection::{Projection, ProjectionError, Tables};

/// The `aggregate_index` projection.
#[derive(Debug, Clone, Copy, Default)]
pub struct AggregateIndex;

const TABLE: &str = "aggregate_index";
const ROWS_PER_STATEMENT: usize = 500;

#[derive(Debug)]
struct Entry<'a> {
    aggregate_type: &'a str,
    aggregate_id: &'a str,
    version: i64,
    event_count: i64,
    first_position: i64,
    last: &'a LoggedEvent,
}

#[async_trait]
impl Projection for AggregateIndex {
    fn name(&self) -> &'static str {
        "aggregate_index"
    }

    fn tables(&self) -> &'static [&'static str] {
        &[TABLE]
    }

    async fn apply(
        &self,
        connection: &mut AnyConnection,
        tables: &Tables,
        events: &[LoggedEvent],
    ) -> Result<(), ProjectionError> {
        let table = tables.get(TABLE)?;
        // Fold the batch per aggregate first: one upsert per aggregate instead of one per event.
        let mut order: Vec<(&str, &str)> = Vec::new();
        let mut entries: HashMap<(&str, &str), Entry<'_>> = HashMap::new();
        for event in events {
            let key = (event.aggregate_type.as_str(), event.aggregate_id.as_str());
            let entry = entries.entry(key).or_insert_with(|| {
                order.push(key);
                Entry {
                    aggregate_type: &event.aggregate_type,
                    aggregate_id: &event.aggregate_id,
                    version: event.sequence,
                    event_count: 0,
                    first_position: event.position,
                    last: event,
                }
            });
            entry.version = entry.version.max(event.sequence);
            entry.event_count += 1;
            entry.last = event;
        }
        for chunk in order.chunks(ROWS_PER_STATEMENT) {
            let mut sql = format!(
                "INSERT INTO {table} (aggregate_type, aggregate_id, version, event_count, first_position, \
                 last_position, last_event_type, last_recorded_at) VALUES "
            );
            sql.push_str(&whist_adapters::store::values_placeholders(chunk.len(), 8));
            sql.push_str(&format!(
                " ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET \
                 version = excluded.version, \
                 event_count = {table}.event_count + excluded.event_count, \
                 last_position = excluded.last_position, \
                 last_event_type = excluded.last_event_type, \
                 last_recorded_at = excluded.last_recorded_at"
            ));
            let mut query = sqlx::query(&sql);
            for key in chunk {
                let entry = &entries[key];
                let recorded_at = entry
                    .last
                    .metadata()
                    .map_err(|error| ProjectionError::unreadable(entry.last, error))?
                    .recorded_at
                    .to_rfc3339();
                query = query
                    .bind(entry.aggregate_type)
                    .bind(entry.aggregate_id)
                    .bind(entry.version)
                    .bind(entry.event_count)
                    .bind(entry.first_position)
                    .bind(entry.last.position)
                    .bind(entry.last.event_type.as_str())
                    .bind(recorded_at);
            }
            query.execute(&mut *connection).await?;
        }
        Ok(())
    }
}
