//! The user aggregate: the live mandelboxes one user holds, so that the per-user limit holds across processes.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The user as the aggregate knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub live_mandelboxes: BTreeSet<String>,
}

/// Commands the user takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserCommand {
    /// Hold one more live mandelbox, unless the user already holds `limit`.
    ReserveMandelbox {
        mandelbox_id: String,
        limit: u32,
        at: DateTime<Utc>,
    },
    /// The mandelbox ended (or was never placed). Idempotent.
    ReleaseMandelbox {
        mandelbox_id: String,
        at: DateTime<Utc>,
    },
}

/// Events of the user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserEvent {
    MandelboxReserved {
        mandelbox_id: String,
        live_after: u32,
        at: DateTime<Utc>,
    },
    MandelboxReleased {
        mandelbox_id: String,
        live_after: u32,
        at: DateTime<Utc>,
    },
}

crate::stored_events!(UserEvent, "User", [MandelboxReserved, MandelboxReleased]);

/// Why the user refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("the user already holds the most live mandelboxes allowed")]
    LimitReached,
}

impl User {
    /// Live mandelboxes the user holds.
    pub fn live(&self) -> u32 {
        u32::try_from(self.live_mandelboxes.len()).unwrap_or(u32::MAX)
    }
}

impl crate::decide::Decide for User {
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;

    fn decide(&self, command: UserCommand) -> Result<Vec<UserEvent>, UserError> {
        match command {
            UserCommand::ReserveMandelbox {
                mandelbox_id,
                limit,
                at,
            } => {
                if self.live_mandelboxes.contains(&mandelbox_id) {
                    return Ok(vec![]);
                }
                if self.live() >= limit {
                    return Err(UserError::LimitReached);
                }
                Ok(vec![UserEvent::MandelboxReserved {
                    mandelbox_id,
                    live_after: self.live() + 1,
                    at,
                }])
            }
            UserCommand::ReleaseMandelbox { mandelbox_id, at } => {
                if !self.live_mandelboxes.contains(&mandelbox_id) {
                    return Ok(vec![]);
                }
                Ok(vec![UserEvent::MandelboxReleased {
                    mandelbox_id,
                    live_after: self.live().saturating_sub(1),
                    at,
                }])
            }
        }
    }

    fn evolve(&mut self, event: UserEvent) {
        match event {
            UserEvent::MandelboxReserved { mandelbox_id, .. } => {
                self.live_mandelboxes.insert(mandelbox_id);
            }
            UserEvent::MandelboxReleased { mandelbox_id, .. } => {
                self.live_mandelboxes.remove(&mandelbox_id);
            }
        }
    }
}

crate::cqrs_aggregate!(User, "user");

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type UserTest = TestFramework<User>;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time")
    }

    fn reserved(ids: &[&str]) -> Vec<UserEvent> {
        ids.iter()
            .enumerate()
            .map(|(index, id)| UserEvent::MandelboxReserved {
                mandelbox_id: id.to_string(),
                live_after: index as u32 + 1,
                at: at(),
            })
            .collect()
    }

    fn reserve(id: &str, limit: u32) -> UserCommand {
        UserCommand::ReserveMandelbox {
            mandelbox_id: id.to_string(),
            limit,
            at: at(),
        }
    }

    #[test]
    fn a_user_under_the_limit_reserves_a_mandelbox() {
        UserTest::with(())
            .given(reserved(&["m1"]))
            .when(reserve("m2", 3))
            .then_expect_events(vec![UserEvent::MandelboxReserved {
                mandelbox_id: "m2".to_string(),
                live_after: 2,
                at: at(),
            }]);
    }

    #[test]
    fn a_user_at_the_limit_is_refused() {
        UserTest::with(())
            .given(reserved(&["m1", "m2", "m3"]))
            .when(reserve("m4", 3))
            .then_expect_error(UserError::LimitReached);
    }

    #[test]
    fn a_released_mandelbox_makes_room_again() {
        let mut events = reserved(&["m1", "m2", "m3"]);
        events.push(UserEvent::MandelboxReleased {
            mandelbox_id: "m2".to_string(),
            live_after: 2,
            at: at(),
        });
        UserTest::with(())
            .given(events)
            .when(reserve("m4", 3))
            .then_expect_events(vec![UserEvent::MandelboxReserved {
                mandelbox_id: "m4".to_string(),
                live_after: 3,
                at: at(),
            }]);
    }

    #[test]
    fn releasing_twice_changes_nothing() {
        UserTest::with(())
            .given(reserved(&[]))
            .when(UserCommand::ReleaseMandelbox {
                mandelbox_id: "m1".to_string(),
                at: at(),
            })
            .then_expect_events(vec![]);
    }
}
