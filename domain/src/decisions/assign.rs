//! Assigning a mandelbox: the user's limit, a slot on a host, the mandelbox and its session, decided together.
//!
//! The decision is taken in two steps, because its second one is asked of host after host: first the user
//! reserves one of their live mandelboxes ([`Assignment::reserve`]), then a host takes the slot
//! ([`Reserved::place`]), which also records the mandelbox and its session. A session the desktop app reused (one
//! that has already settled) keeps what it had: the mandelbox is placed all the same, and the session records
//! nothing.

use chrono::{DateTime, Utc};

use crate::decide::{decide_in_turn, Decide};
use crate::instance::{Instance, InstanceCommand, InstanceError, InstanceEvent};
use crate::mandelbox::{Mandelbox, MandelboxCommand, MandelboxError, MandelboxEvent, Placement};
use crate::session::{Session, SessionCommand, SessionEvent};
use crate::user::{User, UserCommand, UserError, UserEvent};

/// What an assign asks for, and the facts from outside it is decided with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The id generated for the new mandelbox.
    pub mandelbox_id: String,
    pub user_id: String,
    /// The desktop app's session, named anew for each assign.
    pub session_id: i64,
    /// The regions asked for, in order (recorded on the session).
    pub regions: Vec<String>,
    pub client_commit_hash: String,
    pub app_name: String,
    /// Live mandelboxes a user may hold (`MANDELBOX_LIMIT_PER_USER`).
    pub limit: u32,
    /// The fingerprint of the mandelbox's protocol secret.
    pub protocol_secret_hash: String,
    pub at: DateTime<Utc>,
}

/// Why an assign was refused on the states it was decided on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignRefusal {
    /// The user holds their limit of live mandelboxes.
    #[error("the user holds their limit of live mandelboxes")]
    UserAtLimit,
}

/// Why a host did not take the slot: the next candidate may.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementRefusal {
    #[error("the host refused the slot: {0}")]
    Host(#[source] InstanceError),
    /// The mandelbox id already names another mandelbox (a generated id is new: only a stale presumption).
    #[error("the mandelbox refused its placement: {0}")]
    Mandelbox(#[source] MandelboxError),
}

/// The user's reservation, waiting for a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved<'a> {
    assignment: &'a Assignment,
    user: Vec<UserEvent>,
}

/// Where the read model says a candidate host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location<'a> {
    pub region: &'a str,
    pub ip: &'a str,
}

/// What an assign records, aggregate by aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub user: Vec<UserEvent>,
    pub instance: Vec<InstanceEvent>,
    pub mandelbox: Vec<MandelboxEvent>,
    /// Empty when the session had already settled (a reused session keeps its first mandelbox).
    pub session: Vec<SessionEvent>,
}

impl Assignment {
    /// The user reserves one of their live mandelboxes.
    ///
    /// # Errors
    /// `UserAtLimit` when they already hold `limit`.
    pub fn reserve(&self, user: &User) -> Result<Reserved<'_>, AssignRefusal> {
        let reserve = UserCommand::ReserveMandelbox {
            mandelbox_id: self.mandelbox_id.clone(),
            limit: self.limit,
            at: self.at,
        };
        match user.decide(reserve) {
            Ok(user) => Ok(Reserved {
                assignment: self,
                user,
            }),
            Err(UserError::LimitReached) => Err(AssignRefusal::UserAtLimit),
        }
    }

    /// The session's record of the request alone, for an assign refused before any host took it.
    pub fn refused_session(&self, session: &Session, code: &str) -> Vec<SessionEvent> {
        decide_in_turn(
            session,
            [
                self.session_request(),
                SessionCommand::Refuse {
                    code: code.to_string(),
                    at: self.at,
                },
            ],
        )
        .unwrap_or_default()
    }

    fn session_request(&self) -> SessionCommand {
        SessionCommand::Request {
            user_id: self.user_id.clone(),
            regions: self.regions.clone(),
            client_commit_hash: self.client_commit_hash.clone(),
            at: self.at,
        }
    }
}

impl Reserved<'_> {
    /// `host`, where the read model placed it, takes the slot; the mandelbox is recorded on it and the session
    /// records its assign.
    ///
    /// # Errors
    /// The host refused (full, or not taking mandelboxes), or the new mandelbox's id is taken.
    pub fn place(
        &self,
        host: &Instance,
        instance_id: &str,
        at: Location<'_>,
        mandelbox: &Mandelbox,
        session: &Session,
    ) -> Result<Placed, PlacementRefusal> {
        let assignment = self.assignment;
        let instance = host
            .decide(InstanceCommand::AllocateMandelbox {
                mandelbox_id: assignment.mandelbox_id.clone(),
                user_id: assignment.user_id.clone(),
                at: assignment.at,
            })
            .map_err(PlacementRefusal::Host)?;
        let placement = Placement {
            instance_id: instance_id.to_string(),
            user_id: assignment.user_id.clone(),
            session_id: assignment.session_id,
            region: at.region.to_string(),
            ip: at.ip.to_string(),
            app_name: assignment.app_name.clone(),
        };
        let mandelbox = mandelbox
            .decide(MandelboxCommand::Allocate {
                placement,
                protocol_secret_hash: assignment.protocol_secret_hash.clone(),
                at: assignment.at,
            })
            .map_err(PlacementRefusal::Mandelbox)?;
        let session = decide_in_turn(
            session,
            [
                assignment.session_request(),
                SessionCommand::Assign {
                    mandelbox_id: assignment.mandelbox_id.clone(),
                    at: assignment.at,
                },
            ],
        )
        .unwrap_or_default();
        Ok(Placed {
            user: self.user.clone(),
            instance,
            mandelbox,
            session,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::state_from;
    use crate::decisions::given::{active_host, at, placement, session_assigned};
    use crate::instance::InstanceError;

    fn assignment() -> Assignment {
        Assignment {
            mandelbox_id: "m-new".to_string(),
            user_id: "u".to_string(),
            session_id: 7,
            regions: vec!["us-east-1".to_string()],
            client_commit_hash: "abc".to_string(),
            app_name: "Whist".to_string(),
            limit: 2,
            protocol_secret_hash: "secret-hash".to_string(),
            at: at(),
        }
    }

    fn user_holding(mandelboxes: &[&str]) -> User {
        state_from(
            mandelboxes
                .iter()
                .enumerate()
                .map(|(live, id)| UserEvent::MandelboxReserved {
                    mandelbox_id: (*id).to_string(),
                    live_after: u32::try_from(live + 1).expect("few"),
                    at: at(),
                }),
        )
    }

    const HOST: Location<'static> = Location {
        region: "us-east-1",
        ip: "10.0.0.7",
    };

    #[test]
    fn a_user_under_their_limit_on_a_host_with_room_gets_a_mandelbox_a_slot_and_a_session() {
        // Given a user holding one of two, and a host with one of two slots taken
        let user = user_holding(&["m1"]);
        let host = active_host(2, &["m0"]);
        // When the assign is decided
        let assignment = assignment();
        let assigned = assignment
            .reserve(&user)
            .expect("the user is under their limit")
            .place(
                &host,
                "i-1",
                HOST,
                &Mandelbox::default(),
                &Session::default(),
            )
            .expect("the host has room");
        // Then each aggregate records its part
        assert_eq!(
            assigned.user,
            vec![UserEvent::MandelboxReserved {
                mandelbox_id: "m-new".to_string(),
                live_after: 2,
                at: at(),
            }]
        );
        assert_eq!(
            assigned.instance,
            vec![InstanceEvent::MandelboxAllocated {
                mandelbox_id: "m-new".to_string(),
                user_id: "u".to_string(),
                live_after: 2,
                at: at(),
            }]
        );
        assert_eq!(
            assigned.mandelbox,
            vec![MandelboxEvent::Allocated {
                placement: placement(),
                protocol_secret_hash: "secret-hash".to_string(),
                at: at(),
            }]
        );
        assert_eq!(
            assigned.session,
            vec![
                SessionEvent::Requested {
                    user_id: "u".to_string(),
                    regions: vec!["us-east-1".to_string()],
                    client_commit_hash: "abc".to_string(),
                    at: at(),
                },
                SessionEvent::Assigned {
                    mandelbox_id: "m-new".to_string(),
                    at: at(),
                },
            ]
        );
    }

    #[test]
    fn a_user_at_their_limit_is_refused_before_any_host_is_asked() {
        let user = user_holding(&["m1", "m2"]);
        assert_eq!(
            assignment().reserve(&user).map(|_| ()),
            Err(AssignRefusal::UserAtLimit)
        );
    }

    #[test]
    fn a_full_host_refuses_the_slot_and_the_next_candidate_is_asked() {
        let user = user_holding(&[]);
        let assignment = assignment();
        let reserved = assignment.reserve(&user).expect("under the limit");
        let full = active_host(1, &["m0"]);
        assert_eq!(
            reserved
                .place(
                    &full,
                    "i-1",
                    HOST,
                    &Mandelbox::default(),
                    &Session::default()
                )
                .map(|_| ()),
            Err(PlacementRefusal::Host(InstanceError::AtCapacity))
        );
        let roomy = active_host(2, &["m0"]);
        assert!(reserved
            .place(
                &roomy,
                "i-2",
                HOST,
                &Mandelbox::default(),
                &Session::default()
            )
            .is_ok());
    }

    #[test]
    fn a_reused_session_that_has_settled_keeps_its_record_and_the_mandelbox_is_placed_all_the_same()
    {
        let assignment = assignment();
        let settled = session_assigned("m-first");
        let user = user_holding(&[]);
        let assigned = assignment
            .reserve(&user)
            .expect("under the limit")
            .place(
                &active_host(2, &[]),
                "i-1",
                HOST,
                &Mandelbox::default(),
                &settled,
            )
            .expect("the host has room");
        assert!(assigned.session.is_empty());
        assert_eq!(assigned.mandelbox.len(), 1);
        assert_eq!(assigned.instance.len(), 1);
    }

    #[test]
    fn a_refused_assign_is_recorded_on_its_session_with_the_contracts_code() {
        let events = assignment().refused_session(&Session::default(), "NO_INSTANCE_AVAILABLE");
        assert_eq!(
            events.last(),
            Some(&SessionEvent::Refused {
                code: "NO_INSTANCE_AVAILABLE".to_string(),
                at: at(),
            })
        );
    }
}
