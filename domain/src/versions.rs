//! Event versions and the upcasters that read old versions as the current shape.
//!
//! A stored event is never edited. When an event's shape changes, its `event_version` goes up and an upcaster here
//! turns the old payload into the new shape as it is read, everywhere events are read: loading an aggregate (the
//! cqrs-es repository and the remembered-copy catch-up, in `adapters`), projections and replays (`LoggedEvent`).
//! Upcasting is pure: the same stored event always reads the same way.
//!
//! History of shapes:
//! - `instance` / `InstanceLaunchRequested` 1.0 → 2.0: the launch records why it was decided (`reason`). A 1.0
//!   event reads as `"reason": "unrecorded"`.

use serde_json::Value;

/// The current version of `InstanceLaunchRequested`.
pub const LAUNCH_REQUESTED_VERSION: &str = "2.0";

/// An old event that cannot be read as the current shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event_type} {version} cannot be upcast: {reason}")]
pub struct UpcastError {
    pub event_type: String,
    pub version: String,
    pub reason: String,
}

/// Every event name and version this binary writes, aggregate by aggregate.
pub fn current_events() -> impl Iterator<Item = (&'static str, &'static str)> {
    use crate::decide::StoredEvents;
    [
        crate::assign_key::AssignKeyEvent::STORED,
        crate::images::ImageCatalogEvent::STORED,
        crate::instance::InstanceEvent::STORED,
        crate::leadership::LeadershipEvent::STORED,
        crate::mandelbox::MandelboxEvent::STORED,
        crate::probe::ProbeEvent::STORED,
        crate::service::ServiceEvent::STORED,
        crate::session::SessionEvent::STORED,
        crate::subscription::SubscriptionEvent::STORED,
        crate::subscription::StripeCustomerEvent::STORED,
        crate::user::UserEvent::STORED,
    ]
    .into_iter()
    .flatten()
    .copied()
}

/// Whether this binary can read an event of this type and version: one it writes, or an older version that an
/// upcaster here turns into one. Any other event was written by a newer binary (a new event, or a new version of
/// one), during a rolling deploy: a reader of this binary waits for the new one instead of calling it broken.
pub fn is_known(event_type: &str, version: &str) -> bool {
    needs_upcast(event_type, version)
        || current_events()
            .any(|(known_type, known_version)| known_type == event_type && known_version == version)
}

/// Whether an event of this type and version needs upcasting (event types are unique across aggregates).
pub fn needs_upcast(event_type: &str, version: &str) -> bool {
    event_type == "InstanceLaunchRequested" && version == "1.0"
}

/// Reads a stored payload as the current shape of its event: the version it now has, and the payload.
///
/// # Errors
/// The old payload does not have the shape its version says.
pub fn upcast(
    event_type: &str,
    version: &str,
    mut payload: Value,
) -> Result<(String, Value), UpcastError> {
    if !needs_upcast(event_type, version) {
        return Ok((version.to_string(), payload));
    }
    let error = |reason: &str| UpcastError {
        event_type: event_type.to_string(),
        version: version.to_string(),
        reason: reason.to_string(),
    };
    let fields = payload
        .get_mut("LaunchRequested")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| error("no LaunchRequested object"))?;
    fields
        .entry("reason")
        .or_insert_with(|| Value::String("unrecorded".to_string()));
    Ok((LAUNCH_REQUESTED_VERSION.to_string(), payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_this_binary_writes_or_upcasts_are_known_and_newer_ones_are_not() {
        assert!(is_known("InstanceLaunchRequested", "2.0"));
        assert!(is_known("InstanceLaunchRequested", "1.0"), "upcast");
        assert!(
            !is_known("InstanceLaunchRequested", "3.0"),
            "a newer version"
        );
        assert!(!is_known("InstanceHibernated", "1.0"), "a newer event");
        assert!(is_known("AssignKeyAnswered", "1.0"));
        assert!(is_known("LeadershipDecided", "1.0"));
    }
    use crate::instance::{InstanceEvent, LaunchReason};
    use cqrs_es::DomainEvent;

    fn version_1() -> Value {
        serde_json::json!({"LaunchRequested": {
            "spec": {"region": "us-east-1", "image_id": "ami-1", "instance_type": "g4dn.2xlarge",
                     "client_commit_hash": "abc"},
            "bootstrap_token_hash": "boot",
            "at": "2026-01-01T00:00:00Z"
        }})
    }

    #[test]
    fn a_version_1_launch_reads_as_version_2_with_an_unrecorded_reason() {
        let (version, payload) =
            upcast("InstanceLaunchRequested", "1.0", version_1()).expect("upcasts");
        assert_eq!(version, "2.0");
        let event: InstanceEvent = serde_json::from_value(payload).expect("the current shape");
        let InstanceEvent::LaunchRequested { reason, .. } = event else {
            panic!("a launch");
        };
        assert_eq!(reason, LaunchReason::Unrecorded);
    }

    #[test]
    fn a_version_1_launch_does_not_read_as_the_current_shape_without_the_upcaster() {
        assert!(serde_json::from_value::<InstanceEvent>(version_1()).is_err());
    }

    #[test]
    fn current_events_pass_through_unchanged() {
        let event = InstanceEvent::Terminated {
            at: chrono::DateTime::from_timestamp(1_800_000_000, 0).expect("a time"),
        };
        let payload = serde_json::to_value(&event).expect("serialises");
        let (version, read) =
            upcast(&event.event_type(), &event.event_version(), payload.clone()).expect("passes");
        assert_eq!((version.as_str(), read), ("1.0", payload));
        let launch = InstanceEvent::LaunchRequested {
            spec: serde_json::from_value(version_1()["LaunchRequested"]["spec"].clone())
                .expect("spec"),
            bootstrap_token_hash: "boot".to_string(),
            reason: LaunchReason::Operator,
            at: chrono::DateTime::from_timestamp(1_800_000_000, 0).expect("a time"),
        };
        assert_eq!(launch.event_version(), LAUNCH_REQUESTED_VERSION);
        assert!(!needs_upcast(&launch.event_type(), &launch.event_version()));
    }

    #[test]
    fn a_malformed_old_payload_is_an_error_not_a_guess() {
        let error = upcast(
            "InstanceLaunchRequested",
            "1.0",
            serde_json::json!({"Other": {}}),
        )
        .expect_err("refused");
        assert_eq!(error.version, "1.0");
    }
}
