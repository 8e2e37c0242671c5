//! The end of a mandelbox, everywhere it counts: the mandelbox itself, its user's limit, its session and its
//! host's slot. Every part is idempotent, so deciding it again after it was recorded decides nothing, and
//! deciding it after a partial failure finishes it.

use chrono::{DateTime, Utc};

use crate::decide::Decide;
use crate::instance::{Instance, InstanceCommand, InstanceError, InstanceEvent};
use crate::mandelbox::{EndReason, Mandelbox, MandelboxCommand, MandelboxError, MandelboxEvent};
use crate::session::{Session, SessionCommand, SessionEvent};
use crate::user::{User, UserCommand, UserEvent};

/// A mandelbox to end, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub mandelbox_id: String,
    pub reason: EndReason,
    pub at: DateTime<Utc>,
}

/// What the end records, aggregate by aggregate (each part empty when it is already done).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub mandelbox: Vec<MandelboxEvent>,
    pub user: Vec<UserEvent>,
    /// Empty for a session that never was or has ended.
    pub session: Vec<SessionEvent>,
    pub instance: Vec<InstanceEvent>,
}

/// Why a mandelbox could not be ended on these states.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndRefusal {
    #[error("the mandelbox refused to end: {0}")]
    Mandelbox(#[source] MandelboxError),
    #[error("the host refused to free the slot: {0}")]
    Host(#[source] InstanceError),
}

impl Ending {
    /// Ends the mandelbox, releases the user's reservation, ends the session and frees the host's slot.
    ///
    /// # Errors
    /// The mandelbox or its host is unknown.
    pub fn decide(
        &self,
        mandelbox: &Mandelbox,
        user: &User,
        session: &Session,
        host: &Instance,
    ) -> Result<Ended, EndRefusal> {
        let end = match self.reason {
            EndReason::Disconnected => MandelboxCommand::Disconnect { at: self.at },
            reason => MandelboxCommand::End {
                reason,
                at: self.at,
            },
        };
        let mandelbox = mandelbox.decide(end).map_err(EndRefusal::Mandelbox)?;
        let user = user
            .decide(UserCommand::ReleaseMandelbox {
                mandelbox_id: self.mandelbox_id.clone(),
                at: self.at,
            })
            .unwrap_or_default();
        let session = session
            .decide(SessionCommand::End { at: self.at })
            .unwrap_or_default();
        let instance = host
            .decide(InstanceCommand::FreeMandelbox {
                mandelbox_id: self.mandelbox_id.clone(),
                at: self.at,
            })
            .map_err(EndRefusal::Host)?;
        Ok(Ended {
            mandelbox,
            user,
            session,
            instance,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::state_from;
    use crate::decisions::given::{active_host, allocated, assigned_session, at};
    use crate::mandelbox::MandelboxStatus;

    fn ending(reason: EndReason) -> Ending {
        Ending {
            mandelbox_id: "m1".to_string(),
            reason,
            at: at(),
        }
    }

    fn user_holding_m1() -> User {
        state_from([UserEvent::MandelboxReserved {
            mandelbox_id: "m1".to_string(),
            live_after: 1,
            at: at(),
        }])
    }

    #[test]
    fn a_disconnect_ends_the_mandelbox_releases_the_user_ends_the_session_and_frees_the_slot() {
        let ended = ending(EndReason::Disconnected)
            .decide(
                &allocated(),
                &user_holding_m1(),
                &assigned_session(),
                &active_host(2, &["m1"]),
            )
            .expect("an allocated mandelbox can end");
        assert!(matches!(
            ended.mandelbox.as_slice(),
            [MandelboxEvent::Ended {
                reason: EndReason::Disconnected,
                ..
            }]
        ));
        assert_eq!(
            ended.user,
            vec![UserEvent::MandelboxReleased {
                mandelbox_id: "m1".to_string(),
                live_after: 0,
                at: at(),
            }]
        );
        assert!(matches!(
            ended.session.as_slice(),
            [SessionEvent::Ended { .. }]
        ));
        assert_eq!(
            ended.instance,
            vec![InstanceEvent::MandelboxFreed {
                mandelbox_id: "m1".to_string(),
                live_after: 0,
                at: at(),
            }]
        );
    }

    #[test]
    fn ending_a_mandelbox_again_once_it_is_recorded_decides_nothing() {
        let first = ending(EndReason::HostLost);
        let states = (
            allocated(),
            user_holding_m1(),
            assigned_session(),
            active_host(2, &["m1"]),
        );
        let ended = first
            .decide(&states.0, &states.1, &states.2, &states.3)
            .expect("it can end");
        let mut mandelbox = states.0.clone();
        ended
            .mandelbox
            .into_iter()
            .for_each(|e| mandelbox.evolve(e));
        let mut user = states.1.clone();
        ended.user.into_iter().for_each(|e| user.evolve(e));
        let mut session = states.2.clone();
        ended.session.into_iter().for_each(|e| session.evolve(e));
        let mut host = states.3.clone();
        ended.instance.into_iter().for_each(|e| host.evolve(e));
        assert_eq!(mandelbox.status, Some(MandelboxStatus::Dead));
        assert_eq!(
            first.decide(&mandelbox, &user, &session, &host),
            Ok(Ended {
                mandelbox: vec![],
                user: vec![],
                session: vec![],
                instance: vec![],
            })
        );
    }

    #[test]
    fn a_mandelbox_whose_session_was_never_recorded_still_ends_everywhere_else() {
        let ended = ending(EndReason::NeverConnected)
            .decide(
                &allocated(),
                &user_holding_m1(),
                &Session::default(),
                &active_host(2, &["m1"]),
            )
            .expect("it can end");
        assert!(ended.session.is_empty());
        assert_eq!(ended.mandelbox.len(), 1);
        assert_eq!(ended.user.len(), 1);
        assert_eq!(ended.instance.len(), 1);
    }

    #[test]
    fn an_unknown_mandelbox_cannot_be_ended() {
        assert_eq!(
            ending(EndReason::Disconnected).decide(
                &Mandelbox::default(),
                &User::default(),
                &Session::default(),
                &active_host(2, &[]),
            ),
            Err(EndRefusal::Mandelbox(MandelboxError::Unknown))
        );
    }
}
