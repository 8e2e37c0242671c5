//! Tamper evidence: every event is chained to the one before it in global order by a hash over its content and
//! metadata. The `event_chain` projection seals events as they reach the log (`event_chain` table: position, hash);
//! `verify` recomputes the chain from the stored events and names the first event that does not match its seal.
//!
//! The hash of the event at position `p` is `sha256` (hex) over the previous event's hash and the event's position,
//! aggregate type, aggregate id, sequence, event type, event version, payload text and metadata text, exactly as
//! stored, each preceded by its length in bytes (8 bytes, little-endian) so that no two field lists hash alike. The first event's previous hash is [`GENESIS`]. Any edit of a stored field, a
//! deleted event or a reordering changes the recomputed hash from that event on.

use sha2::{Digest, Sha256};
use sqlx::Row;

use super::{Database, LoggedEvent};

/// The previous hash of the first event.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The chain hash of `event`, following the event whose hash is `previous`.
pub fn chain_hash(previous: &str, event: &LoggedEvent) -> String {
    let mut hasher = Sha256::new();
    for part in [
        previous,
        &event.position.to_string(),
        &event.aggregate_type,
        &event.aggregate_id,
        &event.sequence.to_string(),
        &event.event_type,
        &event.event_version,
        &event.payload,
        &event.metadata,
    ] {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// What `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// Events whose recomputed hash matched their seal.
    pub verified: u64,
    /// The last position handed out.
    pub head: i64,
    /// The last sealed position (events after it are not sealed yet: the projection is behind).
    pub sealed: i64,
    /// The first event that does not match, if any.
    pub broken: Option<ChainBreak>,
}

/// The first place the chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub position: i64,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub sequence: Option<i64>,
    pub event_type: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for ChainBreak {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "event at position {}", self.position)?;
        if let (Some(aggregate_type), Some(aggregate_id), Some(sequence), Some(event_type)) = (
            &self.aggregate_type,
            &self.aggregate_id,
            self.sequence,
            &self.event_type,
        ) {
            write!(
                formatter,
                " ({aggregate_type}/{aggregate_id} #{sequence}, {event_type})"
            )?;
        }
        write!(formatter, ": {}", self.reason)
    }
}

/// Progress of a long verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyProgress {
    pub position: i64,
    pub sealed: i64,
}

const PAGE: i64 = 10_000;

const SELECT_EVENTS: &str = "
SELECT position, aggregate_type, aggregate_id, sequence, event_type, event_version,
       CAST(payload AS TEXT) AS payload, CAST(metadata AS TEXT) AS metadata
  FROM events
 WHERE position > $1 AND position <= $2
 ORDER BY position";

const SELECT_SEALS: &str = "SELECT position, hash FROM event_chain WHERE position > $1 AND position <= $2 ORDER BY position";

/// The events and the seals with positions in `(after, until]`, each in position order: two range scans on their
/// position indexes (no join), for the verification and the export.
///
/// # Errors
/// The database failed.
pub async fn read_range(
    database: &Database,
    after: i64,
    until: i64,
) -> Result<(Vec<LoggedEvent>, Vec<(i64, String)>), sqlx::Error> {
    let pool = database.any();
    let events = sqlx::query(SELECT_EVENTS)
        .bind(after)
        .bind(until)
        .fetch_all(pool);
    let seals = sqlx::query(SELECT_SEALS)
        .bind(after)
        .bind(until)
        .fetch_all(pool);
    let (events, seals) = tokio::try_join!(events, seals)?;
    let events = events
        .iter()
        .map(LoggedEvent::from_row)
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let seals = seals
        .iter()
        .map(|row| Ok((row.try_get("position")?, row.try_get("hash")?)))
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok((events, seals))
}

fn describe(event: Option<&LoggedEvent>, position: i64, reason: String) -> ChainBreak {
    ChainBreak {
        position,
        aggregate_type: event.map(|event| event.aggregate_type.clone()),
        aggregate_id: event.map(|event| event.aggregate_id.clone()),
        sequence: event.map(|event| event.sequence),
        event_type: event.map(|event| event.event_type.clone()),
        reason,
    }
}

/// Recomputes the chain over every sealed event, in position order, and stops at the first that does not match.
///
/// # Errors
/// The database failed.
pub async fn verify(
    database: &Database,
    progress: &(dyn Fn(VerifyProgress) + Send + Sync),
) -> Result<ChainReport, sqlx::Error> {
    let pool = database.any();
    let head = database.log().head().await?;
    let sealed: Option<i64> = sqlx::query_scalar("SELECT MAX(position) FROM event_chain")
        .fetch_one(pool)
        .await?;
    let sealed = sealed.unwrap_or(0);
    let mut report = ChainReport {
        verified: 0,
        head,
        sealed,
        broken: None,
    };
    let mut previous = GENESIS.to_string();
    let mut after = 0i64;
    while after < sealed {
        let until = (after + PAGE).min(sealed);
        let (events, seals) = read_range(database, after, until).await?;
        let mut events = events.iter().peekable();
        // Every position of the range must have its seal and its event, in order.
        let mut seals = seals.iter();
        for position in after + 1..=until {
            let seal = match seals.next() {
                Some((sealed_at, seal)) if *sealed_at == position => seal,
                Some((sealed_at, _)) => {
                    report.broken = Some(describe(
                        None,
                        position,
                        format!("it has no seal (the next seal is at {sealed_at})"),
                    ));
                    return Ok(report);
                }
                None => {
                    report.broken = Some(describe(None, position, "it has no seal".to_string()));
                    return Ok(report);
                }
            };
            let event = match events.peek() {
                Some(event) if event.position == position => events.next(),
                _ => None,
            };
            let Some(event) = event else {
                report.broken = Some(describe(
                    None,
                    position,
                    "the event is missing from the store (its seal remains)".to_string(),
                ));
                return Ok(report);
            };
            let hash = chain_hash(&previous, event);
            if hash != *seal {
                report.broken = Some(describe(
                    Some(event),
                    position,
                    "its content or metadata, or an event before it, changed after it was sealed"
                        .to_string(),
                ));
                return Ok(report);
            }
            previous = hash;
            report.verified += 1;
        }
        after = until;
        progress(VerifyProgress {
            position: after,
            sealed,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(payload: &str) -> LoggedEvent {
        LoggedEvent {
            position: 1,
            aggregate_type: "instance".to_string(),
            aggregate_id: "i-1".to_string(),
            sequence: 1,
            event_type: "InstanceLaunchRequested".to_string(),
            event_version: "1.0".to_string(),
            payload: payload.to_string(),
            metadata: "{}".to_string(),
        }
    }

    #[test]
    fn the_hash_covers_the_previous_hash_and_every_field() {
        let base = chain_hash(GENESIS, &event("{\"a\":1}"));
        assert_eq!(base.len(), 64);
        assert_eq!(base, chain_hash(GENESIS, &event("{\"a\":1}")));
        assert_ne!(base, chain_hash(GENESIS, &event("{\"a\":2}")));
        assert_ne!(base, chain_hash(&base, &event("{\"a\":1}")));
        let mut other = event("{\"a\":1}");
        other.sequence = 2;
        assert_ne!(base, chain_hash(GENESIS, &other));
        // Fields are delimited: moving a character from one field to the next changes the hash.
        let mut shifted = event("{\"a\":1}");
        shifted.aggregate_type = "instanc".to_string();
        shifted.aggregate_id = "ei-1".to_string();
        assert_ne!(base, chain_hash(GENESIS, &shifted));
    }
}
