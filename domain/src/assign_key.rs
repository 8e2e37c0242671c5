//! An assign's `Idempotency-Key`: the answer the first assign with the key gave, kept so that the same user
//! retrying with the same key within the window gets that answer again and nothing new is recorded. One aggregate
//! per (user, key); the assign records the answer in the same unit as the mandelbox, so two requests with the same
//! key can never both allocate: the second's unit collides on this aggregate and, decided again, finds the answer.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// How long a key's answer stands (the contract's 24 hours).
pub fn window() -> Duration {
    Duration::hours(24)
}

/// What the first assign with the key answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedAnswer {
    pub mandelbox_id: String,
    pub ip: String,
    pub region: String,
    pub at: DateTime<Utc>,
}

/// A key's state: its latest answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignKey {
    pub answer: Option<KeyedAnswer>,
}

impl AssignKey {
    /// The answer that stands at `now`, if any (one older than the window no longer does).
    pub fn standing(&self, now: DateTime<Utc>) -> Option<&KeyedAnswer> {
        self.answer
            .as_ref()
            .filter(|answer| now - answer.at < window())
    }
}

/// Commands the key takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AssignKeyCommand {
    /// An assign with this key was answered with `answer`.
    Answer { answer: KeyedAnswer },
}

/// Events of the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AssignKeyEvent {
    Answered { answer: KeyedAnswer },
}

crate::stored_events!(AssignKeyEvent, "AssignKey", [Answered]);

/// Why the key refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignKeyError {
    /// An answer within the window stands: the assign must give it, not decide another.
    #[error("an assign with this key was already answered with mandelbox {}", .0.mandelbox_id)]
    AlreadyAnswered(KeyedAnswer),
}

impl crate::decide::Decide for AssignKey {
    type Command = AssignKeyCommand;
    type Event = AssignKeyEvent;
    type Error = AssignKeyError;

    fn decide(&self, command: AssignKeyCommand) -> Result<Vec<AssignKeyEvent>, AssignKeyError> {
        match command {
            AssignKeyCommand::Answer { answer } => match self.standing(answer.at) {
                Some(standing) => Err(AssignKeyError::AlreadyAnswered(standing.clone())),
                None => Ok(vec![AssignKeyEvent::Answered { answer }]),
            },
        }
    }

    fn evolve(&mut self, event: AssignKeyEvent) {
        match event {
            AssignKeyEvent::Answered { answer } => self.answer = Some(answer),
        }
    }
}

crate::cqrs_aggregate!(AssignKey, "assign_key");

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + seconds, 0).expect("a valid time")
    }

    fn answer(mandelbox_id: &str, seconds: i64) -> KeyedAnswer {
        KeyedAnswer {
            mandelbox_id: mandelbox_id.to_string(),
            ip: "10.0.0.1".to_string(),
            region: "us-east-1".to_string(),
            at: at(seconds),
        }
    }

    #[test]
    fn the_first_answer_is_recorded() {
        TestFramework::<AssignKey>::with(())
            .given_no_previous_events()
            .when(AssignKeyCommand::Answer {
                answer: answer("m1", 0),
            })
            .then_expect_events(vec![AssignKeyEvent::Answered {
                answer: answer("m1", 0),
            }]);
    }

    #[test]
    fn a_second_answer_within_the_window_is_refused_with_the_first() {
        TestFramework::<AssignKey>::with(())
            .given(vec![AssignKeyEvent::Answered {
                answer: answer("m1", 0),
            }])
            .when(AssignKeyCommand::Answer {
                answer: answer("m2", 3_600),
            })
            .then_expect_error(AssignKeyError::AlreadyAnswered(answer("m1", 0)));
    }

    #[test]
    fn after_the_window_the_key_answers_anew() {
        let later = window().num_seconds() + 1;
        TestFramework::<AssignKey>::with(())
            .given(vec![AssignKeyEvent::Answered {
                answer: answer("m1", 0),
            }])
            .when(AssignKeyCommand::Answer {
                answer: answer("m2", later),
            })
            .then_expect_events(vec![AssignKeyEvent::Answered {
                answer: answer("m2", later),
            }]);
    }
}
