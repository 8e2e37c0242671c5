//! Metadata recorded with every event: when, who, and why.

use std::collections::HashMap;
use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Who caused an event. Stored as a plain string so that auditors can read it without this crate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Actor {
    /// A desktop-app user or developer, by Auth0 subject.
    User(String),
    /// A host service, by instance id.
    Host(String),
    /// Stripe, through a signed webhook.
    Stripe,
    /// The webserver itself: the autoscaler, reconciler, sweeps.
    System,
    /// The release workflow (`whist images …`, run by CI after a host image is built).
    ReleaseWorkflow,
}

impl fmt::Display for Actor {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(user_id) => write!(formatter, "user:{user_id}"),
            Self::Host(instance_id) => write!(formatter, "host:{instance_id}"),
            Self::Stripe => formatter.write_str("stripe"),
            Self::System => formatter.write_str("system"),
            Self::ReleaseWorkflow => formatter.write_str("release-workflow"),
        }
    }
}

impl From<Actor> for String {
    fn from(actor: Actor) -> Self {
        actor.to_string()
    }
}

/// The text of an actor was none of `user:…`, `host:…`, `stripe`, `system`, `release-workflow`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown actor {0:?}: expected user:ID, host:ID, stripe, system or release-workflow")]
pub struct UnknownActor(pub String);

impl TryFrom<String> for Actor {
    type Error = UnknownActor;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        if let Some(user_id) = text.strip_prefix("user:") {
            return Ok(Self::User(user_id.to_string()));
        }
        if let Some(instance_id) = text.strip_prefix("host:") {
            return Ok(Self::Host(instance_id.to_string()));
        }
        match text.as_str() {
            "stripe" => Ok(Self::Stripe),
            "system" => Ok(Self::System),
            "release-workflow" => Ok(Self::ReleaseWorkflow),
            _ => Err(UnknownActor(text)),
        }
    }
}

/// Metadata stored beside each event's payload.
///
/// `correlation_id` ties together every event that one outside request (an HTTP call, a webhook, a CLI run) or one
/// background pass caused, however many commands it took: the request's id (`X-Request-Id`) for a decision taken on
/// an HTTP request, else a fresh UUID. `causation_id` names the direct cause: the position (a decimal string) of the
/// event that made the decision necessary, or, for a decision the root of the chain took itself, the chain's own id
/// (the request, or the pass). Read it with [`EventMetadata::cause`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    pub recorded_at: DateTime<Utc>,
    pub actor: Actor,
    pub correlation_id: String,
    pub causation_id: Option<String>,
    /// The W3C trace context (`traceparent`) of the span that took the decision, when there was one: what the
    /// work the decision plans (a job of the reconciler) continues, so that one trace shows a request and the side
    /// effects it caused. Recorded, never decided on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl EventMetadata {
    /// Metadata for a command that starts a new chain of causes (a fresh correlation id), taken by the chain's root
    /// itself (a background pass, a CLI command): its cause is the chain's own id.
    pub fn new(actor: Actor, recorded_at: DateTime<Utc>) -> Self {
        // Time-ordered, as the request ids the webserver makes (see `api`'s request context).
        let correlation_id = Uuid::now_v7().to_string();
        Self {
            recorded_at,
            actor,
            causation_id: Some(correlation_id.clone()),
            correlation_id,
            traceparent: None,
        }
    }

    /// What directly caused the event, as [`Cause`] reads its `causation_id`.
    pub fn cause(&self) -> Cause {
        match &self.causation_id {
            None => Cause::Unrecorded,
            Some(cause) if *cause == self.correlation_id => Cause::Root,
            Some(cause) => match cause.parse::<i64>() {
                Ok(position) if position > 0 => Cause::Event(position),
                _ => Cause::Request(cause.clone()),
            },
        }
    }

    /// Metadata for a decision taken on the HTTP request `request_id`: the request is both the chain the decision
    /// belongs to and its direct cause.
    pub fn for_request(actor: Actor, request_id: &str, recorded_at: DateTime<Utc>) -> Self {
        Self {
            recorded_at,
            actor,
            correlation_id: request_id.to_string(),
            causation_id: Some(request_id.to_string()),
            traceparent: None,
        }
    }

    /// The same metadata, recording the trace context `traceparent` of the span taking the decision.
    #[must_use]
    pub fn in_trace(self, traceparent: Option<String>) -> Self {
        Self {
            traceparent,
            ..self
        }
    }

    /// The same actor, chain and cause, recorded at `recorded_at` (a use case recording several commands for one
    /// origin).
    pub fn at(&self, recorded_at: DateTime<Utc>) -> Self {
        Self {
            recorded_at,
            ..self.clone()
        }
    }

    /// The same correlation, caused by `causation_id` (an event position or request id).
    pub fn caused_by(&self, causation_id: impl Into<String>, recorded_at: DateTime<Utc>) -> Self {
        Self {
            recorded_at,
            actor: self.actor.clone(),
            correlation_id: self.correlation_id.clone(),
            causation_id: Some(causation_id.into()),
            traceparent: self.traceparent.clone(),
        }
    }

    /// The string map cqrs-es stores as the event's metadata column.
    pub fn to_map(&self) -> HashMap<String, String> {
        let mut map = HashMap::with_capacity(5);
        map.insert(
            "recorded_at".to_string(),
            self.recorded_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
        );
        map.insert("actor".to_string(), self.actor.to_string());
        map.insert("correlation_id".to_string(), self.correlation_id.clone());
        if let Some(causation_id) = &self.causation_id {
            map.insert("causation_id".to_string(), causation_id.clone());
        }
        if let Some(traceparent) = &self.traceparent {
            map.insert("traceparent".to_string(), traceparent.clone());
        }
        map
    }

    /// Reads metadata back from the stored string map.
    ///
    /// # Errors
    /// Names the first field that is missing or malformed.
    pub fn from_map(map: &HashMap<String, String>) -> Result<Self, MetadataError> {
        let field = |name: &'static str| map.get(name).ok_or(MetadataError::Missing(name));
        let recorded_at = DateTime::parse_from_rfc3339(field("recorded_at")?)
            .map_err(|_| MetadataError::Malformed("recorded_at"))?
            .with_timezone(&Utc);
        let actor = Actor::try_from(field("actor")?.clone())
            .map_err(|_| MetadataError::Malformed("actor"))?;
        let correlation_id = field("correlation_id")?.clone();
        if correlation_id.is_empty() {
            return Err(MetadataError::Malformed("correlation_id"));
        }
        Ok(Self {
            recorded_at,
            actor,
            correlation_id,
            causation_id: map.get("causation_id").cloned(),
            traceparent: map.get("traceparent").cloned(),
        })
    }
}

/// What directly caused an event, read from its `causation_id`: the one defined reading of every stored event,
/// including those recorded before causes were kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cause {
    /// The root of the chain decided it itself: the request whose id is the `correlation_id`, or the background
    /// pass or command that gave itself that id.
    Root,
    /// The event at this position of the log made the decision necessary.
    Event(i64),
    /// A request other than the chain's root (its id).
    Request(String),
    /// Recorded before causes were kept (no `causation_id`): the chain is known, the step inside it is not.
    Unrecorded,
}

/// Stored metadata could not be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetadataError {
    #[error("event metadata lacks {0}")]
    Missing(&'static str),
    #[error("event metadata has a malformed {0}")]
    Malformed(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_survives_a_round_trip_through_the_stored_map() {
        let metadata = EventMetadata::new(Actor::User("auth0|abc".into()), Utc::now())
            .caused_by("request-1", Utc::now());
        let back = EventMetadata::from_map(&metadata.to_map()).expect("readable");
        assert_eq!(back.actor, metadata.actor);
        assert_eq!(back.correlation_id, metadata.correlation_id);
        assert_eq!(back.causation_id.as_deref(), Some("request-1"));
        assert_eq!(
            back.recorded_at.timestamp_micros(),
            metadata.recorded_at.timestamp_micros()
        );
    }

    #[test]
    fn a_cause_reads_as_the_root_an_event_a_request_or_unrecorded() {
        let root = EventMetadata::new(Actor::System, Utc::now());
        assert_eq!(root.cause(), Cause::Root);
        assert_eq!(root.caused_by("42", Utc::now()).cause(), Cause::Event(42));
        let request = EventMetadata::for_request(Actor::Stripe, "req-7", Utc::now());
        assert_eq!(request.cause(), Cause::Root);
        assert_eq!(
            request.caused_by("req-8", Utc::now()).cause(),
            Cause::Request("req-8".to_string())
        );
        // A request id of digits that is the chain's own id is the root, not a position.
        let digits = EventMetadata::for_request(Actor::Stripe, "1234", Utc::now());
        assert_eq!(digits.cause(), Cause::Root);
    }

    #[test]
    fn an_event_recorded_before_causes_were_kept_reads_as_unrecorded() {
        let mut map = EventMetadata::new(Actor::System, Utc::now()).to_map();
        map.remove("causation_id");
        let old = EventMetadata::from_map(&map).expect("readable");
        assert_eq!(old.causation_id, None);
        assert_eq!(old.cause(), Cause::Unrecorded);
    }

    #[test]
    fn every_kind_of_actor_reads_back_as_itself() {
        for actor in [
            Actor::User("u1".into()),
            Actor::Host("i-1".into()),
            Actor::Stripe,
            Actor::System,
            Actor::ReleaseWorkflow,
        ] {
            assert_eq!(Actor::try_from(actor.to_string()), Ok(actor));
        }
    }

    #[test]
    fn an_unknown_actor_is_refused() {
        assert!(Actor::try_from("robot".to_string()).is_err());
    }

    #[test]
    fn metadata_without_an_actor_names_the_missing_field() {
        let mut map = EventMetadata::new(Actor::System, Utc::now()).to_map();
        map.remove("actor");
        assert_eq!(
            EventMetadata::from_map(&map),
            Err(MetadataError::Missing("actor"))
        );
    }
}
