//! The service as a whole: the maintenance switch developers turn on to pause new sessions (assigns answer
//! `503 MAINTENANCE`, the autoscaler launches nothing) while everything else keeps working.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
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

impl DomainEvent for ServiceEvent {
    fn event_type(&self) -> String {
        match self {
            Self::MaintenanceStarted { .. } => "ServiceMaintenanceStarted",
            Self::MaintenanceEnded { .. } => "ServiceMaintenanceEnded",
        }
        .to_string()
    }

    fn event_version(&self) -> String {
        "1.0".to_string()
    }
}

/// The service refuses nothing; the type exists for the aggregate's contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {}

impl Service {
    fn decide(&self, command: ServiceCommand) -> Vec<ServiceEvent> {
        match command {
            ServiceCommand::SetMaintenance { enabled, at } if enabled != self.maintenance => {
                vec![if enabled {
                    ServiceEvent::MaintenanceStarted { at }
                } else {
                    ServiceEvent::MaintenanceEnded { at }
                }]
            }
            ServiceCommand::SetMaintenance { .. } => vec![],
        }
    }
}

impl Aggregate for Service {
    const TYPE: &'static str = "service";
    type Command = ServiceCommand;
    type Event = ServiceEvent;
    type Error = ServiceError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command) {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
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
