//! Reading history for auditors and developers: the global log, one aggregate's events, an aggregate's state replayed
//! at a version or a moment, and the JSON Lines export. Shared by the admin endpoints and the `whist events` commands.
//!
//! Events are shown as stored (their stored version and payload: the record is what was written); a replayed state
//! reads old versions through the upcasters, as the running system does.

use std::io::Write;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use cqrs_es::Aggregate;
use serde::Serialize;
use serde_json::Value;
use sqlx::any::AnyRow;
use sqlx::Row;
use whist_adapters::store::{Database, LoggedEvent};
use whist_domain::assign_key::AssignKey;
use whist_domain::images::ImageCatalog;
use whist_domain::instance::Instance;
use whist_domain::leadership::Leadership;
use whist_domain::mandelbox::Mandelbox;
use whist_domain::service::Service;
use whist_domain::session::Session;
use whist_domain::subscription::{StripeCustomer, Subscription};
use whist_domain::user::User;
use whist_domain::{Cause, EventMetadata};

/// Why history could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("the store failed")]
    Store(#[from] sqlx::Error),
    #[error("no aggregate type {0:?} (known: {known})", known = AGGREGATE_TYPES.join(", "))]
    UnknownAggregateType(String),
    #[error("stored event {aggregate_type}/{aggregate_id} #{sequence} cannot be read: {reason}")]
    Unreadable {
        aggregate_type: String,
        aggregate_id: String,
        sequence: i64,
        reason: String,
    },
    #[error("could not write the export")]
    Write(#[from] std::io::Error),
}

/// The aggregate types a state can be replayed for.
pub const AGGREGATE_TYPES: [&str; 10] = [
    Instance::TYPE,
    Mandelbox::TYPE,
    Session::TYPE,
    User::TYPE,
    ImageCatalog::TYPE,
    Subscription::TYPE,
    StripeCustomer::TYPE,
    Service::TYPE,
    Leadership::TYPE,
    AssignKey::TYPE,
];

/// One stored event, as auditors read it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    /// The position in the global log (null for an event committed but not yet sequenced).
    pub position: Option<i64>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub metadata: MetadataRecord,
    /// The event's chain hash (`whist events verify`), once sealed.
    pub hash: Option<String>,
}

/// An event's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetadataRecord {
    pub recorded_at: String,
    pub actor: String,
    pub correlation_id: String,
    pub causation_id: Option<String>,
}

/// An aggregate's state replayed from its events.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayedState {
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// The sequence of the last event applied.
    pub version: i64,
    /// When the last event applied was recorded.
    pub recorded_at: Option<String>,
    pub state: Value,
}

/// How far to replay: the events that meet both bounds (none given: every event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReplayUntil {
    /// Up to and including this sequence number.
    pub version: Option<i64>,
    /// Every event recorded at or before this moment.
    pub as_of: Option<DateTime<Utc>>,
}

/// The audit read of the events that meet `condition` (on `e`, the events), in the order and limit `rest` gives,
/// each with its seal.
fn select_events(condition: &str, rest: &str) -> String {
    format!(
        "SELECT {COLUMNS} FROM events e LEFT JOIN event_chain c ON c.position = e.position \
         WHERE {condition} {rest}"
    )
}

const COLUMNS: &str =
    "e.position, e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version, \
    CAST(e.payload AS TEXT) AS payload, CAST(e.metadata AS TEXT) AS metadata, c.hash";

fn logged(row: &AnyRow) -> Result<(LoggedEvent, Option<i64>, Option<String>), sqlx::Error> {
    let position: Option<i64> = row.try_get("position")?;
    Ok((
        LoggedEvent {
            position: position.unwrap_or(0),
            aggregate_type: row.try_get("aggregate_type")?,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            event_type: row.try_get("event_type")?,
            event_version: row.try_get("event_version")?,
            payload: row.try_get("payload")?,
            metadata: row.try_get("metadata")?,
        },
        position,
        row.try_get("hash")?,
    ))
}

fn unreadable(event: &LoggedEvent, reason: impl std::fmt::Display) -> AuditError {
    AuditError::Unreadable {
        aggregate_type: event.aggregate_type.clone(),
        aggregate_id: event.aggregate_id.clone(),
        sequence: event.sequence,
        reason: reason.to_string(),
    }
}

fn record(
    event: LoggedEvent,
    position: Option<i64>,
    hash: Option<String>,
) -> Result<EventRecord, AuditError> {
    let payload = event
        .payload_json()
        .map_err(|error| unreadable(&event, error))?;
    let metadata = event
        .metadata()
        .map_err(|error| unreadable(&event, error))?;
    Ok(EventRecord {
        position,
        aggregate_type: event.aggregate_type,
        aggregate_id: event.aggregate_id,
        sequence: event.sequence,
        event_type: event.event_type,
        event_version: event.event_version,
        payload,
        metadata: MetadataRecord {
            recorded_at: metadata
                .recorded_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
            actor: metadata.actor.to_string(),
            correlation_id: metadata.correlation_id.to_string(),
            causation_id: metadata.causation_id,
        },
        hash,
    })
}

/// The audit records of rows read with `COLUMNS`.
fn records(rows: &[sqlx::any::AnyRow]) -> Result<Vec<EventRecord>, AuditError> {
    rows.iter()
        .map(|row| {
            let (event, position, hash) = logged(row)?;
            record(event, position, hash)
        })
        .collect()
}

/// Up to `limit` events of the global log after `after`, in order.
///
/// # Errors
/// The store failed or a stored event is unreadable.
pub async fn events_after(
    database: &Database,
    after: i64,
    limit: i64,
) -> Result<Vec<EventRecord>, AuditError> {
    let rows = sqlx::query(&select_events(
        "e.position > $1",
        "ORDER BY e.position LIMIT $2",
    ))
    .bind(after)
    .bind(limit)
    .fetch_all(database.any())
    .await?;
    records(&rows)
}

/// Up to `limit` events of one chain (`correlation_id`) after `after`, in log order.
///
/// # Errors
/// The store failed or a stored event is unreadable.
pub async fn chain_after(
    database: &Database,
    correlation_id: &str,
    after: i64,
    limit: i64,
) -> Result<Vec<EventRecord>, AuditError> {
    let correlation = if database.is_postgres() {
        "e.metadata->>'correlation_id'"
    } else {
        "json_extract(e.metadata, '$.correlation_id')"
    };
    let rows = sqlx::query(&select_events(
        &format!("{correlation} = $1 AND e.position > $2"),
        "ORDER BY e.position LIMIT $3",
    ))
    .bind(correlation_id)
    .bind(after)
    .bind(limit)
    .fetch_all(database.any())
    .await?;
    records(&rows)
}

/// One event of the log at `position`, `None` when there is none.
///
/// # Errors
/// The store failed or the event is unreadable.
pub async fn event_at_position(
    database: &Database,
    position: i64,
) -> Result<Option<EventRecord>, AuditError> {
    let rows = sqlx::query(&select_events("e.position = $1", ""))
        .bind(position)
        .fetch_all(database.any())
        .await?;
    Ok(records(&rows)?.into_iter().next())
}

/// Every event of one chain (`correlation_id`), in log order.
///
/// # Errors
/// The store failed or a stored event is unreadable.
pub async fn chain(
    database: &Database,
    correlation_id: &str,
) -> Result<Vec<EventRecord>, AuditError> {
    const PAGE: i64 = 1_000;
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let page = chain_after(database, correlation_id, after, PAGE).await?;
        let full = page.len() as i64 == PAGE;
        after = page
            .last()
            .and_then(|event| event.position)
            .unwrap_or(after);
        events.extend(page);
        if !full {
            return Ok(events);
        }
    }
}

/// A chain laid out by cause: each event under the event that caused it; at the top, the events its root (the
/// request or the background pass) decided itself, and any whose cause is not in the chain.
#[derive(Debug, Clone, PartialEq)]
pub struct CausalTree {
    pub correlation_id: String,
    /// Top-level events, each with the events it caused, recursively, in log order.
    pub roots: Vec<CausedEvent>,
}

/// One event of a [`CausalTree`] with the events it caused.
#[derive(Debug, Clone, PartialEq)]
pub struct CausedEvent {
    pub event: EventRecord,
    pub caused: Vec<CausedEvent>,
}

/// The chain `correlation_id` as a tree by cause; `None` for a chain with no events.
///
/// # Errors
/// The store failed or a stored event is unreadable.
pub async fn trace(
    database: &Database,
    correlation_id: &str,
) -> Result<Option<CausalTree>, AuditError> {
    let events = chain(database, correlation_id).await?;
    if events.is_empty() {
        return Ok(None);
    }
    let positions: std::collections::HashSet<i64> =
        events.iter().filter_map(|event| event.position).collect();
    let mut children: std::collections::HashMap<i64, Vec<EventRecord>> = Default::default();
    let mut top = Vec::new();
    for event in events {
        match cause_of(&event) {
            Cause::Event(position) if positions.contains(&position) => {
                children.entry(position).or_default().push(event);
            }
            _ => top.push(event),
        }
    }
    fn grow(
        event: EventRecord,
        children: &mut std::collections::HashMap<i64, Vec<EventRecord>>,
    ) -> CausedEvent {
        let caused = event
            .position
            .and_then(|position| children.remove(&position))
            .unwrap_or_default()
            .into_iter()
            .map(|child| grow(child, children))
            .collect();
        CausedEvent { event, caused }
    }
    let roots = top
        .into_iter()
        .map(|event| grow(event, &mut children))
        .collect();
    Ok(Some(CausalTree {
        correlation_id: correlation_id.to_string(),
        roots,
    }))
}

/// How an event's cause reads, from its metadata record.
pub fn cause_of(event: &EventRecord) -> Cause {
    EventMetadata {
        recorded_at: Utc::now(),
        actor: whist_domain::Actor::System,
        correlation_id: event.metadata.correlation_id.clone(),
        causation_id: event.metadata.causation_id.clone(),
        traceparent: None,
    }
    .cause()
}

/// The walk from one event back to its chain's root: the event first, then each cause in turn.
#[derive(Debug, Clone, PartialEq)]
pub struct CauseWalk {
    /// The event asked about, then the event that caused it, and so on.
    pub steps: Vec<EventRecord>,
    /// Where the walk ended: the last step's cause.
    pub root: WalkRoot,
}

/// Where a walk back through causes ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalkRoot {
    /// The request (or background pass, or command) that started the chain, with the actor of the first step it
    /// decided.
    Origin {
        correlation_id: String,
        actor: String,
    },
    /// Another request, by id.
    Request(String),
    /// The event was recorded before causes were kept.
    Unrecorded,
    /// A cause names a position with no event: the chain is broken there.
    Missing(i64),
}

/// From the event of `aggregate_type`/`aggregate_id` at `sequence` (its last when `None`) back to its root; `None`
/// when there is no such event.
///
/// # Errors
/// The store failed or a stored event is unreadable.
pub async fn why(
    database: &Database,
    aggregate_type: &str,
    aggregate_id: &str,
    sequence: Option<i64>,
) -> Result<Option<CauseWalk>, AuditError> {
    let events = history(database, aggregate_type, aggregate_id).await?;
    let start = match sequence {
        Some(sequence) => events.into_iter().find(|event| event.sequence == sequence),
        None => events.into_iter().last(),
    };
    let Some(mut event) = start else {
        return Ok(None);
    };
    let mut steps = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let root = loop {
        let cause = cause_of(&event);
        let correlation_id = event.metadata.correlation_id.clone();
        let actor = event.metadata.actor.clone();
        if let Some(position) = event.position {
            seen.insert(position);
        }
        steps.push(event);
        match cause {
            Cause::Root => {
                break WalkRoot::Origin {
                    correlation_id,
                    actor,
                }
            }
            Cause::Request(request) => break WalkRoot::Request(request),
            Cause::Unrecorded => break WalkRoot::Unrecorded,
            // A cause points back in the log: a loop would be a corrupt log, reported as a break.
            Cause::Event(position) if seen.contains(&position) => {
                break WalkRoot::Missing(position)
            }
            Cause::Event(position) => match event_at_position(database, position).await? {
                Some(cause) => event = cause,
                None => break WalkRoot::Missing(position),
            },
        }
    };
    Ok(Some(CauseWalk { steps, root }))
}

/// The last `limit` events of the global log, newest first.
///
/// # Errors
/// The store failed or a stored event is unreadable.
pub async fn latest_events(
    database: &Database,
    limit: i64,
) -> Result<Vec<EventRecord>, AuditError> {
    let rows = sqlx::query(&select_events(
        "e.position IS NOT NULL",
        "ORDER BY e.position DESC LIMIT $1",
    ))
    .bind(limit)
    .fetch_all(database.any())
    .await?;
    records(&rows)
}

/// One aggregate's events in sequence order, each with its position (`None` while unsequenced) and seal.
pub(crate) async fn aggregate_events(
    database: &Database,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<(LoggedEvent, Option<i64>, Option<String>)>, AuditError> {
    let rows = sqlx::query(&select_events(
        "e.aggregate_type = $1 AND e.aggregate_id = $2",
        "ORDER BY e.sequence",
    ))
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_all(database.any())
    .await?;
    Ok(rows.iter().map(logged).collect::<Result<_, _>>()?)
}

/// Every event of one aggregate, in sequence order.
///
/// # Errors
/// The store failed or a stored event is unreadable.
pub async fn history(
    database: &Database,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<EventRecord>, AuditError> {
    aggregate_events(database, aggregate_type, aggregate_id)
        .await?
        .into_iter()
        .map(|(event, position, hash)| record(event, position, hash))
        .collect()
}

fn replay_as<A: Aggregate + Default + Serialize>(
    events: &[LoggedEvent],
) -> Result<Value, AuditError> {
    let mut state = A::default();
    for event in events {
        let payload: A::Event = event
            .payload_as()
            .map_err(|error| unreadable(event, error))?;
        state.apply(payload);
    }
    serde_json::to_value(&state).map_err(|error| AuditError::Unreadable {
        aggregate_type: A::TYPE.to_string(),
        aggregate_id: String::new(),
        sequence: 0,
        reason: error.to_string(),
    })
}

/// The aggregate's state replayed from its events up to `until`; `None` when it has no event that early (or none).
///
/// # Errors
/// The aggregate type is unknown, the store failed, or an event is unreadable.
pub async fn replay(
    database: &Database,
    aggregate_type: &str,
    aggregate_id: &str,
    until: ReplayUntil,
) -> Result<Option<ReplayedState>, AuditError> {
    if !AGGREGATE_TYPES.contains(&aggregate_type) {
        return Err(AuditError::UnknownAggregateType(aggregate_type.to_string()));
    }
    let mut events = Vec::new();
    let mut recorded_at = None;
    for (event, _, _) in aggregate_events(database, aggregate_type, aggregate_id).await? {
        let metadata = event
            .metadata()
            .map_err(|error| unreadable(&event, error))?;
        let included = until
            .version
            .is_none_or(|version| event.sequence <= version)
            && until
                .as_of
                .is_none_or(|moment| metadata.recorded_at <= moment);
        if !included {
            break;
        }
        recorded_at = Some(
            metadata
                .recorded_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
        );
        events.push(event);
    }
    let Some(last) = events.last() else {
        return Ok(None);
    };
    let version = last.sequence;
    let state = match aggregate_type {
        Instance::TYPE => replay_as::<Instance>(&events)?,
        Mandelbox::TYPE => replay_as::<Mandelbox>(&events)?,
        Session::TYPE => replay_as::<Session>(&events)?,
        User::TYPE => replay_as::<User>(&events)?,
        ImageCatalog::TYPE => replay_as::<ImageCatalog>(&events)?,
        Subscription::TYPE => replay_as::<Subscription>(&events)?,
        StripeCustomer::TYPE => replay_as::<StripeCustomer>(&events)?,
        Service::TYPE => replay_as::<Service>(&events)?,
        Leadership::TYPE => replay_as::<Leadership>(&events)?,
        AssignKey::TYPE => replay_as::<AssignKey>(&events)?,
        other => return Err(AuditError::UnknownAggregateType(other.to_string())),
    };
    Ok(Some(ReplayedState {
        aggregate_type: aggregate_type.to_string(),
        aggregate_id: aggregate_id.to_string(),
        version,
        recorded_at,
        state,
    }))
}

/// What an export wrote.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExportReport {
    pub events: u64,
    /// The last position written (resume with `--after` this).
    pub last_position: i64,
    pub elapsed: Duration,
}

impl ExportReport {
    pub fn events_per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

const EXPORT_PAGE: i64 = 10_000;

/// Writes every event after `after` (up to the head at the start) as JSON Lines, one event per line with the same
/// fields as `GET /admin/events`, streaming page by page; `progress` gets (position, head) after each page.
///
/// # Errors
/// The store failed or the writer failed.
pub async fn export(
    database: &Database,
    after: i64,
    out: &mut (dyn Write + Send),
    progress: &(dyn Fn(i64, i64) + Send + Sync),
) -> Result<ExportReport, AuditError> {
    let started = Instant::now();
    let head = database.log().head().await?;
    let mut position = after;
    let mut events_written = 0u64;
    let mut line = String::with_capacity(1024);
    while position < head {
        let until = (position + EXPORT_PAGE).min(head);
        let (events, seals) =
            whist_adapters::store::chain::read_range(database, position, until).await?;
        let mut seals = seals.into_iter().peekable();
        for event in &events {
            // Seals come in the same order; an event not sealed yet has none.
            while seals
                .peek()
                .is_some_and(|(sealed, _)| *sealed < event.position)
            {
                seals.next();
            }
            let hash = match seals.peek() {
                Some((sealed, _)) if *sealed == event.position => {
                    seals.next().map(|(_, hash)| hash)
                }
                _ => None,
            };
            let metadata = event.metadata().map_err(|error| unreadable(event, error))?;
            line.clear();
            // The payload is written as stored (it is JSON); the other fields are escaped by serde_json.
            line.push_str("{\"position\":");
            line.push_str(&event.position.to_string());
            push_field(&mut line, "aggregate_type", &event.aggregate_type);
            push_field(&mut line, "aggregate_id", &event.aggregate_id);
            line.push_str(",\"sequence\":");
            line.push_str(&event.sequence.to_string());
            push_field(&mut line, "event_type", &event.event_type);
            push_field(&mut line, "event_version", &event.event_version);
            line.push_str(",\"payload\":");
            line.push_str(event.payload.trim());
            line.push_str(",\"metadata\":");
            let metadata = MetadataRecord {
                recorded_at: metadata
                    .recorded_at
                    .to_rfc3339_opts(SecondsFormat::Micros, true),
                actor: metadata.actor.to_string(),
                correlation_id: metadata.correlation_id.to_string(),
                causation_id: metadata.causation_id,
            };
            line.push_str(
                &serde_json::to_string(&metadata).map_err(|error| unreadable(event, error))?,
            );
            line.push_str(",\"hash\":");
            match &hash {
                Some(hash) => push_string(&mut line, hash),
                None => line.push_str("null"),
            }
            line.push_str("}\n");
            out.write_all(line.as_bytes())?;
            events_written += 1;
        }
        position = until;
        progress(position, head);
    }
    out.flush()?;
    Ok(ExportReport {
        events: events_written,
        last_position: position,
        elapsed: started.elapsed(),
    })
}

fn push_field(line: &mut String, key: &str, value: &str) {
    line.push_str(",\"");
    line.push_str(key);
    line.push_str("\":");
    push_string(line, value);
}

fn push_string(line: &mut String, value: &str) {
    match serde_json::to_string(value) {
        Ok(quoted) => line.push_str(&quoted),
        Err(_) => line.push_str("null"),
    }
}
