//! The session aggregate: one desktop-app streaming session, from the assign request to its end, with durations.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum SessionStatus {
    Requested,
    Assigned,
    Connected,
    Ended,
}

/// The session as the aggregate knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub status: Option<SessionStatus>,
    pub user_id: Option<String>,
    pub mandelbox_id: Option<String>,
    pub requested_at: Option<DateTime<Utc>>,
    pub connected_at: Option<DateTime<Utc>>,
}

/// The aggregate id of a user's session (`session_id` is the desktop app's own number).
pub fn session_aggregate_id(user_id: &str, session_id: i64) -> String {
    format!("{user_id}/{session_id}")
}

/// Commands the session takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    Request {
        user_id: String,
        regions: Vec<String>,
        client_commit_hash: String,
        at: DateTime<Utc>,
    },
    Assign {
        mandelbox_id: String,
        at: DateTime<Utc>,
    },
    /// The assign request was refused (an error code of the contract); the session ends unassigned.
    Refuse { code: String, at: DateTime<Utc> },
    /// The mandelbox reported running for the first time.
    MarkConnected { at: DateTime<Utc> },
    /// The mandelbox ended. Idempotent.
    End { at: DateTime<Utc> },
}

/// Events of the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionEvent {
    Requested {
        user_id: String,
        regions: Vec<String>,
        client_commit_hash: String,
        at: DateTime<Utc>,
    },
    Assigned {
        mandelbox_id: String,
        at: DateTime<Utc>,
    },
    Refused {
        code: String,
        at: DateTime<Utc>,
    },
    Connected {
        waited_ms: i64,
        at: DateTime<Utc>,
    },
    Ended {
        /// From the request to the end.
        duration_ms: i64,
        /// From the first connection to the end (0 when it never connected).
        connected_ms: i64,
        at: DateTime<Utc>,
    },
}

crate::stored_events!(
    SessionEvent,
    "Session",
    [Requested, Assigned, Refused, Connected, Ended]
);

/// Why the session refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("the session already has a mandelbox or has ended")]
    AlreadySettled,
    #[error("no such session")]
    Unknown,
}

impl Session {
    fn since_request(&self, at: DateTime<Utc>) -> i64 {
        self.requested_at
            .map(|requested_at| (at - requested_at).num_milliseconds().max(0))
            .unwrap_or(0)
    }
}

impl crate::decide::Decide for Session {
    type Command = SessionCommand;
    type Event = SessionEvent;
    type Error = SessionError;

    fn decide(&self, command: SessionCommand) -> Result<Vec<SessionEvent>, SessionError> {
        use SessionCommand as C;
        use SessionEvent as E;
        use SessionStatus as S;
        match command {
            C::Request {
                user_id,
                regions,
                client_commit_hash,
                at,
            } => match self.status {
                None => Ok(vec![E::Requested {
                    user_id,
                    regions,
                    client_commit_hash,
                    at,
                }]),
                Some(S::Requested) => Ok(vec![]),
                Some(_) => Err(SessionError::AlreadySettled),
            },
            C::Assign { mandelbox_id, at } => match self.status.ok_or(SessionError::Unknown)? {
                S::Requested => Ok(vec![E::Assigned { mandelbox_id, at }]),
                _ if self.mandelbox_id.as_deref() == Some(mandelbox_id.as_str()) => Ok(vec![]),
                _ => Err(SessionError::AlreadySettled),
            },
            C::Refuse { code, at } => match self.status.ok_or(SessionError::Unknown)? {
                S::Requested => Ok(vec![E::Refused { code, at }]),
                _ => Err(SessionError::AlreadySettled),
            },
            C::MarkConnected { at } => match self.status.ok_or(SessionError::Unknown)? {
                S::Assigned => Ok(vec![E::Connected {
                    waited_ms: self.since_request(at),
                    at,
                }]),
                _ => Ok(vec![]),
            },
            C::End { at } => match self.status.ok_or(SessionError::Unknown)? {
                S::Ended => Ok(vec![]),
                _ => Ok(vec![E::Ended {
                    duration_ms: self.since_request(at),
                    connected_ms: self
                        .connected_at
                        .map(|connected_at| (at - connected_at).num_milliseconds().max(0))
                        .unwrap_or(0),
                    at,
                }]),
            },
        }
    }

    fn evolve(&mut self, event: SessionEvent) {
        match event {
            SessionEvent::Requested { user_id, at, .. } => {
                self.status = Some(SessionStatus::Requested);
                self.user_id = Some(user_id);
                self.requested_at = Some(at);
            }
            SessionEvent::Assigned { mandelbox_id, .. } => {
                self.status = Some(SessionStatus::Assigned);
                self.mandelbox_id = Some(mandelbox_id);
            }
            SessionEvent::Refused { .. } | SessionEvent::Ended { .. } => {
                self.status = Some(SessionStatus::Ended)
            }
            SessionEvent::Connected { at, .. } => {
                self.status = Some(SessionStatus::Connected);
                self.connected_at = Some(at);
            }
        }
    }

    /// An ended (or refused) session records nothing more: every command decides nothing or is refused on it, so
    /// it has no later state.
    fn is_settled(&self) -> bool {
        self.status == Some(SessionStatus::Ended)
    }

    /// Requested, assigned (or refused), connected and ended, each at most once.
    const MOST_EVENTS: Option<usize> = Some(4);
}

crate::cqrs_aggregate!(Session, "session");

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;
    use cqrs_es::test::TestFramework;

    type SessionTest = TestFramework<Session>;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time")
    }

    fn requested() -> Vec<SessionEvent> {
        vec![SessionEvent::Requested {
            user_id: "u".to_string(),
            regions: vec!["us-east-1".to_string()],
            client_commit_hash: "abc".to_string(),
            at: at(),
        }]
    }

    fn assigned() -> Vec<SessionEvent> {
        let mut events = requested();
        events.push(SessionEvent::Assigned {
            mandelbox_id: "m1".to_string(),
            at: at() + Duration::milliseconds(40),
        });
        events
    }

    /// Every kind of session command, assignments of the session's own mandelbox and of another included.
    fn every_command() -> [SessionCommand; 6] {
        [
            SessionCommand::Request {
                user_id: "u".to_string(),
                regions: vec!["us-east-1".to_string()],
                client_commit_hash: "abc".to_string(),
                at: at(),
            },
            SessionCommand::Assign {
                mandelbox_id: "m1".to_string(),
                at: at(),
            },
            SessionCommand::Assign {
                mandelbox_id: "m2".to_string(),
                at: at(),
            },
            SessionCommand::Refuse {
                code: "NO_INSTANCE_AVAILABLE".to_string(),
                at: at(),
            },
            SessionCommand::MarkConnected { at: at() },
            SessionCommand::End { at: at() },
        ]
    }

    #[test]
    fn no_history_of_a_session_is_longer_than_its_bound() {
        use crate::decide::Decide as _;
        let commands = every_command();
        // Every sequence of up to six of these commands (6^6 histories), each command as often as it likes.
        let most = Session::MOST_EVENTS.unwrap_or(usize::MAX);
        let mut longest = 0;
        for mut code in 0..6usize.pow(6) {
            let mut history = Vec::new();
            for _ in 0..6 {
                history.push(commands[code % 6].clone());
                code /= 6;
            }
            longest = longest.max(crate::decide::most_events_in::<Session>(history));
        }
        assert_eq!(longest, most, "the bound is reached and never passed");
    }

    #[test]
    fn an_ended_or_refused_session_is_settled_and_records_nothing_more() {
        use crate::decide::{state_from, Decide as _};
        let mut ended = assigned();
        ended.push(SessionEvent::Ended {
            duration_ms: 1,
            connected_ms: 0,
            at: at(),
        });
        let mut refused = requested();
        refused.push(SessionEvent::Refused {
            code: "NO_INSTANCE_AVAILABLE".to_string(),
            at: at(),
        });
        let every_command = every_command();
        for history in [ended, refused] {
            let session = state_from::<Session>(history);
            assert!(session.is_settled());
            for command in every_command.clone() {
                assert!(
                    session
                        .decide(command.clone())
                        .map_or(true, |events| events.is_empty()),
                    "{command:?} recorded something on an ended session"
                );
            }
        }
        for history in [requested(), assigned()] {
            assert!(!state_from::<Session>(history).is_settled());
        }
    }

    #[test]
    fn a_session_is_assigned_one_mandelbox() {
        SessionTest::with(())
            .given(requested())
            .when(SessionCommand::Assign {
                mandelbox_id: "m1".to_string(),
                at: at(),
            })
            .then_expect_events(vec![SessionEvent::Assigned {
                mandelbox_id: "m1".to_string(),
                at: at(),
            }]);
    }

    #[test]
    fn a_session_cannot_be_assigned_a_second_mandelbox() {
        SessionTest::with(())
            .given(assigned())
            .when(SessionCommand::Assign {
                mandelbox_id: "m2".to_string(),
                at: at(),
            })
            .then_expect_error(SessionError::AlreadySettled);
    }

    #[test]
    fn connecting_records_how_long_the_user_waited() {
        SessionTest::with(())
            .given(assigned())
            .when(SessionCommand::MarkConnected {
                at: at() + Duration::seconds(3),
            })
            .then_expect_events(vec![SessionEvent::Connected {
                waited_ms: 3_000,
                at: at() + Duration::seconds(3),
            }]);
    }

    #[test]
    fn ending_records_the_whole_and_the_connected_duration() {
        let mut events = assigned();
        events.push(SessionEvent::Connected {
            waited_ms: 3_000,
            at: at() + Duration::seconds(3),
        });
        SessionTest::with(())
            .given(events)
            .when(SessionCommand::End {
                at: at() + Duration::seconds(63),
            })
            .then_expect_events(vec![SessionEvent::Ended {
                duration_ms: 63_000,
                connected_ms: 60_000,
                at: at() + Duration::seconds(63),
            }]);
    }

    #[test]
    fn a_session_that_never_connected_ends_with_no_connected_time() {
        SessionTest::with(())
            .given(assigned())
            .when(SessionCommand::End {
                at: at() + Duration::seconds(90),
            })
            .then_expect_events(vec![SessionEvent::Ended {
                duration_ms: 90_000,
                connected_ms: 0,
                at: at() + Duration::seconds(90),
            }]);
    }

    #[test]
    fn a_refused_request_ends_the_session_unassigned() {
        SessionTest::with(())
            .given(requested())
            .when(SessionCommand::Refuse {
                code: "NO_INSTANCE_AVAILABLE".to_string(),
                at: at(),
            })
            .then_expect_events(vec![SessionEvent::Refused {
                code: "NO_INSTANCE_AVAILABLE".to_string(),
                at: at(),
            }]);
    }

    #[test]
    fn the_session_id_names_the_user_and_the_app_session() {
        assert_eq!(
            session_aggregate_id("auth0|u", 1_700_000_000),
            "auth0|u/1700000000"
        );
    }
}
