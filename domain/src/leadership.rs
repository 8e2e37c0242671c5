//! Who decides for the fleet: one process at a time leads the autoscaler (warm buffer, scale-down) and the repair
//! against the cloud. A process becomes leader by taking the lease (a row outside the log, renewed every pass; the
//! store gives each taking a new, larger epoch) and recording the taking here before it decides anything.
//!
//! The log is the fence. Every decision of the leader is recorded in one unit with a [`LeadershipEvent::Decided`]
//! of its epoch, under the version check every unit has. Once a newer leader has recorded its taking, a decision
//! of an older epoch is refused by [`Leadership::decide`] on fresh state, and by the version check on a copy that
//! missed the taking: a leader that was paused (or partitioned) past its lease can never record a launch after its
//! successor's first pass started. Whatever an old leader recorded before the taking is in the log before it, so
//! the new leader, which decides on a read model caught up past its own taking, counts it.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The one leadership aggregate's id: the fleet's.
pub const FLEET_LEADERSHIP_ID: &str = "fleet";

/// The leadership's state: the latest recorded taking.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leadership {
    /// The epoch of the latest recorded taking (0 before the first).
    pub epoch: i64,
    /// Who took it (a process's instance id: host name, process id and start).
    pub holder: Option<String>,
    pub taken_at: Option<DateTime<Utc>>,
}

/// Commands the leadership takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeadershipCommand {
    /// `holder` took the lease at `epoch`. Idempotent for the same taking.
    Take {
        holder: String,
        epoch: i64,
        at: DateTime<Utc>,
    },
    /// The leader of `epoch` records a decision (in the same unit as the decision's own events).
    Decide {
        epoch: i64,
        /// What was decided, for the log's reader (`launch`, `drain`).
        decision: String,
        at: DateTime<Utc>,
    },
}

/// Events of the leadership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeadershipEvent {
    Taken {
        holder: String,
        epoch: i64,
        at: DateTime<Utc>,
    },
    Decided {
        epoch: i64,
        decision: String,
        at: DateTime<Utc>,
    },
}

crate::stored_events!(LeadershipEvent, "Leadership", [Taken, Decided]);

/// Why the leadership refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeadershipError {
    /// A newer leader has recorded its taking: the decisions of `ours` are no longer anyone's.
    #[error("a newer leader (epoch {current}) has taken over from epoch {ours}")]
    Superseded { current: i64, ours: i64 },
    /// The lease's epochs only grow: a taking at or below the recorded one by someone else is stale.
    #[error("a taking at epoch {ours} is not newer than the recorded epoch {current}")]
    StaleTaking { current: i64, ours: i64 },
    /// A decision of an epoch that was never taken.
    #[error("epoch {ours} was never taken (the latest taking is epoch {current})")]
    NotTaken { current: i64, ours: i64 },
}

impl crate::decide::Decide for Leadership {
    type Command = LeadershipCommand;
    type Event = LeadershipEvent;
    type Error = LeadershipError;

    fn decide(&self, command: LeadershipCommand) -> Result<Vec<LeadershipEvent>, LeadershipError> {
        let current = self.epoch;
        match command {
            LeadershipCommand::Take { holder, epoch, .. }
                if epoch == current && self.holder.as_deref() == Some(holder.as_str()) =>
            {
                Ok(vec![])
            }
            LeadershipCommand::Take { epoch, .. } if epoch <= current => {
                Err(LeadershipError::StaleTaking {
                    current,
                    ours: epoch,
                })
            }
            LeadershipCommand::Take { holder, epoch, at } => {
                Ok(vec![LeadershipEvent::Taken { holder, epoch, at }])
            }
            LeadershipCommand::Decide { epoch, .. } if epoch < current => {
                Err(LeadershipError::Superseded {
                    current,
                    ours: epoch,
                })
            }
            LeadershipCommand::Decide { epoch, .. } if epoch > current => {
                Err(LeadershipError::NotTaken {
                    current,
                    ours: epoch,
                })
            }
            LeadershipCommand::Decide {
                epoch,
                decision,
                at,
            } => Ok(vec![LeadershipEvent::Decided {
                epoch,
                decision,
                at,
            }]),
        }
    }

    fn evolve(&mut self, event: LeadershipEvent) {
        match event {
            LeadershipEvent::Taken { holder, epoch, at } => {
                self.epoch = epoch;
                self.holder = Some(holder);
                self.taken_at = Some(at);
            }
            LeadershipEvent::Decided { .. } => {}
        }
    }
}

crate::cqrs_aggregate!(Leadership, "leadership");

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time")
    }

    fn taken(holder: &str, epoch: i64) -> LeadershipEvent {
        LeadershipEvent::Taken {
            holder: holder.to_string(),
            epoch,
            at: at(),
        }
    }

    fn decide(epoch: i64) -> LeadershipCommand {
        LeadershipCommand::Decide {
            epoch,
            decision: "launch".to_string(),
            at: at(),
        }
    }

    #[test]
    fn the_leader_of_the_latest_epoch_records_its_decisions() {
        TestFramework::<Leadership>::with(())
            .given(vec![taken("a", 1), taken("b", 2)])
            .when(decide(2))
            .then_expect_events(vec![LeadershipEvent::Decided {
                epoch: 2,
                decision: "launch".to_string(),
                at: at(),
            }]);
    }

    #[test]
    fn a_decision_of_a_superseded_epoch_is_refused() {
        TestFramework::<Leadership>::with(())
            .given(vec![taken("a", 1), taken("b", 2)])
            .when(decide(1))
            .then_expect_error(LeadershipError::Superseded {
                current: 2,
                ours: 1,
            });
    }

    #[test]
    fn a_decision_of_an_epoch_never_taken_is_refused() {
        TestFramework::<Leadership>::with(())
            .given(vec![taken("a", 1)])
            .when(decide(3))
            .then_expect_error(LeadershipError::NotTaken {
                current: 1,
                ours: 3,
            });
    }

    #[test]
    fn takings_only_move_forward_and_recording_the_same_one_again_changes_nothing() {
        TestFramework::<Leadership>::with(())
            .given(vec![taken("a", 1), taken("b", 2)])
            .when(LeadershipCommand::Take {
                holder: "a".to_string(),
                epoch: 2,
                at: at(),
            })
            .then_expect_error(LeadershipError::StaleTaking {
                current: 2,
                ours: 2,
            });
        TestFramework::<Leadership>::with(())
            .given(vec![taken("b", 2)])
            .when(LeadershipCommand::Take {
                holder: "b".to_string(),
                epoch: 2,
                at: at(),
            })
            .then_expect_events(vec![]);
        TestFramework::<Leadership>::with(())
            .given(vec![taken("b", 2)])
            .when(LeadershipCommand::Take {
                holder: "a".to_string(),
                epoch: 5,
                at: at(),
            })
            .then_expect_events(vec![taken("a", 5)]);
    }
}
