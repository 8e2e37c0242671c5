//! Decisions that span aggregates: each a pure type that takes the states it needs and the facts from outside and
//! returns the events of each aggregate, or a typed refusal. The use cases in `api/src/control/` only load the
//! states, ask the decision, record its events in one unit (all or nothing) and retry when a concurrent writer
//! wins; the rules themselves live here, with given/when/then tests beside each.
//!
//! Architecture invariant: as the rest of `domain/`, no I/O; every decision depends only on the states and facts
//! it is given.

pub mod assign;
pub mod billing;
pub mod ending;
pub mod status_report;

#[cfg(test)]
pub(crate) mod given {
    //! Builders of the states a test's "given" describes, from events as the store would replay them.

    use chrono::{DateTime, Utc};

    use crate::decide::state_from;
    use crate::instance::{Instance, InstanceEvent, LaunchReason, LaunchSpec};
    use crate::mandelbox::{Mandelbox, MandelboxEvent, Placement};
    use crate::session::{Session, SessionEvent};

    pub fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time")
    }

    /// An active host with `capacity` slots holding `mandelboxes`.
    pub fn active_host(capacity: u32, mandelboxes: &[&str]) -> Instance {
        let mut events = vec![
            InstanceEvent::LaunchRequested {
                spec: LaunchSpec {
                    region: "us-east-1".to_string(),
                    image_id: "ami-1".to_string(),
                    client_commit_hash: "abc".to_string(),
                    instance_type: "g4dn.xlarge".to_string(),
                },
                bootstrap_token_hash: "boot".to_string(),
                reason: LaunchReason::WarmBuffer,
                at: at(),
            },
            InstanceEvent::Registered {
                ip: "10.0.0.7".to_string(),
                mandelbox_capacity: capacity,
                auth_token_hash: "auth".to_string(),
                tls_cert_sha256: None,
                at: at(),
            },
        ];
        for (live, mandelbox_id) in mandelboxes.iter().enumerate() {
            events.push(InstanceEvent::MandelboxAllocated {
                mandelbox_id: (*mandelbox_id).to_string(),
                user_id: "someone".to_string(),
                live_after: u32::try_from(live + 1).expect("few mandelboxes"),
                at: at(),
            });
        }
        state_from(events)
    }

    /// On host `i-1` (10.0.0.7 in us-east-1), for user `u`'s session 7.
    pub fn placement() -> Placement {
        Placement {
            instance_id: "i-1".to_string(),
            user_id: "u".to_string(),
            session_id: 7,
            region: "us-east-1".to_string(),
            ip: "10.0.0.7".to_string(),
            app_name: "Whist".to_string(),
        }
    }

    /// Mandelbox `m1`, allocated at [`placement`].
    pub fn allocated() -> Mandelbox {
        state_from([MandelboxEvent::Allocated {
            placement: placement(),
            protocol_secret_hash: "hash".to_string(),
            at: at(),
        }])
    }

    /// User `u`'s session 7, assigned `m1`.
    pub fn assigned_session() -> Session {
        session_assigned("m1")
    }

    /// User `u`'s session 7, assigned `mandelbox_id`.
    pub fn session_assigned(mandelbox_id: &str) -> Session {
        state_from([
            SessionEvent::Requested {
                user_id: "u".to_string(),
                regions: vec![],
                client_commit_hash: "abc".to_string(),
                at: at(),
            },
            SessionEvent::Assigned {
                mandelbox_id: mandelbox_id.to_string(),
                at: at(),
            },
        ])
    }
}
