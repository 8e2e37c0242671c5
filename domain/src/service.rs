//! The service as a whole: the maintenance switch developers turn on to pause new sessions (assigns answer
//! `503 MAINTENANCE`, the autoscaler launches nothing) while everything else keeps working.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The one service aggregate's id.
pub const SERVICE_ID: &str = "service";

/// The service's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub maintenance: bool,
    /// When the switch last changed.
    pub changed_at: Option<DateTime<Utc>>,
}

/// Commands the service takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceCommand {
    /// Turn maintenance mode on or off. Idempotent.
    SetMaintenance { enabled: bool, at: DateTime<Utc> },
}

/// Events of the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServiceEvent {
    MaintenanceStarted { at: DateTime<Utc> },
    MaintenanceEnded { at: DateTime<Utc> },
}

crate::stored_events!(
    ServiceEvent,
    "Service",
    [MaintenanceStarted, MaintenanceEnded]
);

/// The service refuses nothing; the type exists for the aggregate's contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {}

impl crate::decide::Decide for Service {
    type Command = ServiceCommand;
    type Event = ServiceEvent;
    type Error = ServiceError;

    fn decide(&self, command: ServiceCommand) -> Result<Vec<ServiceEvent>, ServiceError> {
        Ok(match command {
            ServiceCommand::SetMaintenance { enabled, at } if enabled != self.maintenance => {
                vec![if enabled {
                    ServiceEvent::MaintenanceStarted { at }
                } else {
                    ServiceEvent::MaintenanceEnded { at }
                }]
            }
            ServiceCommand::SetMaintenance { .. } => vec![],
        })
    }

    fn evolve(&mut self, event: ServiceEvent) {
        match event {
            ServiceEvent::MaintenanceStarted { at } => {
                self.maintenance = true;
                self.changed_at = Some(at);
            }
            ServiceEvent::MaintenanceEnded { at } => {
                self.maintenance = false;
                self.changed_at = Some(at);
            }
        }
    }
}

crate::cqrs_aggregate!(Service, "service");

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time")
    }

    fn set(enabled: bool) -> ServiceCommand {
        ServiceCommand::SetMaintenance { enabled, at: at() }
    }

    #[test]
    fn turning_maintenance_on_records_its_start() {
        TestFramework::<Service>::with(())
            .given_no_previous_events()
            .when(set(true))
            .then_expect_events(vec![ServiceEvent::MaintenanceStarted { at: at() }]);
    }

    #[test]
    fn turning_maintenance_off_records_its_end() {
        TestFramework::<Service>::with(())
            .given(vec![ServiceEvent::MaintenanceStarted { at: at() }])
            .when(set(false))
            .then_expect_events(vec![ServiceEvent::MaintenanceEnded { at: at() }]);
    }

    #[test]
    fn setting_the_switch_to_where_it_is_changes_nothing() {
        TestFramework::<Service>::with(())
            .given_no_previous_events()
            .when(set(false))
            .then_expect_events(vec![]);
        TestFramework::<Service>::with(())
            .given(vec![ServiceEvent::MaintenanceStarted { at: at() }])
            .when(set(true))
            .then_expect_events(vec![]);
    }
}
