//! The store probe: a deliberately tiny aggregate used by the store benchmark and the store tests.
//!
//! It is a real aggregate, stored like any other, so that the benchmark measures exactly the path every command
//! takes (load, decide, append) without the cost of any business rule. Production code never sends it commands.

use serde::{Deserialize, Serialize};

/// Counts the increments it was given. A double-applied event (the cqrs-es 0.5 snapshot bug) shows as a wrong total.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub total: u64,
    pub increments: u64,
}

/// Commands the probe takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeCommand {
    /// Add `by` to the total. Zero is refused, so that a rejected command can be tested.
    Increment { by: u64 },
    /// Take `by` from the total; refused when the total is smaller, so that a decision that depends on state can
    /// be tested.
    Decrement { by: u64 },
}

/// Events the probe records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeEvent {
    Incremented { by: u64, total: u64 },
    Decremented { by: u64, total: u64 },
}

crate::stored_events!(ProbeEvent, "Probe", [Incremented, Decremented]);

/// Rejections of probe commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("an increment must be positive")]
    ZeroIncrement,
    #[error("the total is smaller than the decrement")]
    InsufficientTotal,
}

impl crate::decide::Decide for Probe {
    type Command = ProbeCommand;
    type Event = ProbeEvent;
    type Error = ProbeError;

    fn decide(&self, command: ProbeCommand) -> Result<Vec<ProbeEvent>, ProbeError> {
        match command {
            ProbeCommand::Increment { by: 0 } => Err(ProbeError::ZeroIncrement),
            ProbeCommand::Increment { by } => Ok(vec![ProbeEvent::Incremented {
                by,
                total: self.total + by,
            }]),
            ProbeCommand::Decrement { by } if by > self.total => Err(ProbeError::InsufficientTotal),
            ProbeCommand::Decrement { by } => Ok(vec![ProbeEvent::Decremented {
                by,
                total: self.total - by,
            }]),
        }
    }

    fn evolve(&mut self, event: ProbeEvent) {
        match event {
            ProbeEvent::Incremented { total, .. } => {
                self.total = total;
                self.increments += 1;
            }
            ProbeEvent::Decremented { total, .. } => self.total = total,
        }
    }
}

crate::cqrs_aggregate!(Probe, "probe");

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type ProbeTest = TestFramework<Probe>;

    #[test]
    fn an_increment_records_the_new_total() {
        ProbeTest::with(())
            .given(vec![ProbeEvent::Incremented { by: 2, total: 2 }])
            .when(ProbeCommand::Increment { by: 3 })
            .then_expect_events(vec![ProbeEvent::Incremented { by: 3, total: 5 }]);
    }

    #[test]
    fn a_decrement_larger_than_the_total_is_refused() {
        ProbeTest::with(())
            .given(vec![ProbeEvent::Incremented { by: 2, total: 2 }])
            .when(ProbeCommand::Decrement { by: 3 })
            .then_expect_error(ProbeError::InsufficientTotal);
    }

    #[test]
    fn a_decrement_within_the_total_records_the_new_total() {
        ProbeTest::with(())
            .given(vec![ProbeEvent::Incremented { by: 2, total: 2 }])
            .when(ProbeCommand::Decrement { by: 2 })
            .then_expect_events(vec![ProbeEvent::Decremented { by: 2, total: 0 }]);
    }

    #[test]
    fn a_zero_increment_is_refused() {
        ProbeTest::with(())
            .given_no_previous_events()
            .when(ProbeCommand::Increment { by: 0 })
            .then_expect_error(ProbeError::ZeroIncrement);
    }
}
