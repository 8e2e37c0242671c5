//! The mandelbox aggregate: one container streaming a browser to one user.
//!
//! Life: `ALLOCATED` (slot reserved, host told to start it) → `CONNECTING` → `RUNNING` → `DYING` → `DEAD`. Status
//! only moves forward; a report of an earlier status changes nothing, and a dead mandelbox stays dead.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

/// Where a mandelbox is in its life, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MandelboxStatus {
    Allocated,
    Connecting,
    Running,
    Dying,
    Dead,
}

impl MandelboxStatus {
    /// The contract's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allocated => "ALLOCATED",
            Self::Connecting => "CONNECTING",
            Self::Running => "RUNNING",
            Self::Dying => "DYING",
            Self::Dead => "DEAD",
        }
    }

    /// Whether the mandelbox still holds its slot.
    pub fn is_live(self) -> bool {
        self != Self::Dead
    }
}

/// A status the host service may report (`POST /host/mandelbox/{id}/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReportedStatus {
    Connecting,
    Running,
    Dying,
}

impl From<ReportedStatus> for MandelboxStatus {
    fn from(status: ReportedStatus) -> Self {
        match status {
            ReportedStatus::Connecting => Self::Connecting,
            ReportedStatus::Running => Self::Running,
            ReportedStatus::Dying => Self::Dying,
        }
    }
}

/// Why a mandelbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The protocol server reported the user disconnected.
    Disconnected,
    /// The host never reported it connecting in time.
    NeverConnected,
    /// Its host stopped answering or was terminated.
    HostLost,
    /// Its host could not start it.
    SpinUpFailed,
}

/// Where and for whom a mandelbox was allocated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub instance_id: String,
    pub user_id: String,
    pub session_id: i64,
    pub region: String,
    pub ip: String,
    pub app_name: String,
}

/// The mandelbox as the aggregate knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mandelbox {
    pub status: Option<MandelboxStatus>,
    pub placement: Option<Placement>,
    pub protocol_secret_hash: Option<String>,
    pub allocated_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub end_reason: Option<EndReason>,
    /// When its host accepted the spin-up.
    #[serde(default)]
    pub spun_up_at: Option<DateTime<Utc>>,
}

/// Commands the mandelbox takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MandelboxCommand {
    /// Record the mandelbox on the slot its host reserved.
    Allocate {
        placement: Placement,
        protocol_secret_hash: String,
        at: DateTime<Utc>,
    },
    /// The host service reported a status.
    ReportStatus {
        status: ReportedStatus,
        at: DateTime<Utc>,
    },
    /// The protocol server reported the user gone (authenticated by the caller with the protocol secret).
    Disconnect { at: DateTime<Utc> },
    /// End a mandelbox that has stayed `ALLOCATED` longer than `timeout`.
    ExpireIfNeverConnected {
        timeout: Duration,
        at: DateTime<Utc>,
    },
    /// End the mandelbox because of its host. Idempotent.
    End {
        reason: EndReason,
        at: DateTime<Utc>,
    },
    /// Its host accepted `PUT /spin_up_mandelbox`. Idempotent.
    RecordSpunUp { at: DateTime<Utc> },
}

/// Events of the mandelbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MandelboxEvent {
    Allocated {
        placement: Placement,
        protocol_secret_hash: String,
        at: DateTime<Utc>,
    },
    StatusChanged {
        from: MandelboxStatus,
        to: MandelboxStatus,
        at: DateTime<Utc>,
    },
    Ended {
        reason: EndReason,
        from: MandelboxStatus,
        at: DateTime<Utc>,
    },
    SpunUp {
        at: DateTime<Utc>,
    },
}

crate::stored_events!(
    MandelboxEvent,
    "Mandelbox",
    [Allocated, StatusChanged, Ended, SpunUp]
);

/// Why the mandelbox refused a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MandelboxError {
    #[error("the mandelbox already exists")]
    AlreadyExists,
    #[error("no such mandelbox")]
    Unknown,
    #[error("the mandelbox is not waiting for its first connection, or not for long enough")]
    NotStale,
}

impl Mandelbox {
    fn end(
        &self,
        reason: EndReason,
        at: DateTime<Utc>,
    ) -> Result<Vec<MandelboxEvent>, MandelboxError> {
        match self.status.ok_or(MandelboxError::Unknown)? {
            MandelboxStatus::Dead => Ok(vec![]),
            from => Ok(vec![MandelboxEvent::Ended { reason, from, at }]),
        }
    }
}

impl crate::decide::Decide for Mandelbox {
    type Command = MandelboxCommand;
    type Event = MandelboxEvent;
    type Error = MandelboxError;

    fn decide(&self, command: MandelboxCommand) -> Result<Vec<MandelboxEvent>, MandelboxError> {
        use MandelboxCommand as C;
        use MandelboxEvent as E;
        match command {
            C::Allocate {
                placement,
                protocol_secret_hash,
                at,
            } => match self.status {
                Some(_) if self.placement.as_ref() == Some(&placement) => Ok(vec![]),
                Some(_) => Err(MandelboxError::AlreadyExists),
                None => Ok(vec![E::Allocated {
                    placement,
                    protocol_secret_hash,
                    at,
                }]),
            },
            C::ReportStatus { status, at } => {
                let current = self.status.ok_or(MandelboxError::Unknown)?;
                let reported = MandelboxStatus::from(status);
                if reported <= current {
                    return Ok(vec![]);
                }
                Ok(vec![E::StatusChanged {
                    from: current,
                    to: reported,
                    at,
                }])
            }
            C::Disconnect { at } => self.end(EndReason::Disconnected, at),
            C::End { reason, at } => self.end(reason, at),
            C::RecordSpunUp { at } => {
                self.status.ok_or(MandelboxError::Unknown)?;
                Ok(if self.spun_up_at.is_some() {
                    vec![]
                } else {
                    vec![E::SpunUp { at }]
                })
            }
            C::ExpireIfNeverConnected { timeout, at } => {
                let current = self.status.ok_or(MandelboxError::Unknown)?;
                let waited = self
                    .allocated_at
                    .map(|allocated_at| at - allocated_at)
                    .unwrap_or_else(Duration::zero);
                if current != MandelboxStatus::Allocated || waited < timeout {
                    return Err(MandelboxError::NotStale);
                }
                self.end(EndReason::NeverConnected, at)
            }
        }
    }

    fn evolve(&mut self, event: MandelboxEvent) {
        match event {
            MandelboxEvent::Allocated {
                placement,
                protocol_secret_hash,
                at,
            } => {
                self.status = Some(MandelboxStatus::Allocated);
                self.placement = Some(placement);
                self.protocol_secret_hash = Some(protocol_secret_hash);
                self.allocated_at = Some(at);
            }
            MandelboxEvent::StatusChanged { to, .. } => self.status = Some(to),
            MandelboxEvent::Ended { reason, at, .. } => {
                self.status = Some(MandelboxStatus::Dead);
                self.end_reason = Some(reason);
                self.ended_at = Some(at);
            }
            MandelboxEvent::SpunUp { at } => self.spun_up_at = Some(at),
        }
    }

    /// A dead mandelbox stays dead with the same placement: every report, end or allocation decides nothing or is
    /// refused on it for good. (Only a spin-up not yet recorded can still be, which is a decision of an event.)
    fn is_settled(&self) -> bool {
        self.status == Some(MandelboxStatus::Dead)
    }

    /// Allocated once, three status changes at most (status only moves forward), ended once, spun up once.
    const MOST_EVENTS: Option<usize> = Some(6);
}

crate::cqrs_aggregate!(Mandelbox, "mandelbox");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Decide as _;
    use cqrs_es::test::TestFramework;
    use cqrs_es::Aggregate as _;
    use proptest::prelude::*;

    type MandelboxTest = TestFramework<Mandelbox>;

    #[test]
    fn a_spin_up_its_host_accepted_is_recorded_once() {
        let allocated = MandelboxEvent::Allocated {
            placement: Placement {
                instance_id: "i".to_string(),
                region: "us-east-1".to_string(),
                ip: "10.0.0.1".to_string(),
                user_id: "u".to_string(),
                session_id: 1,
                app_name: "chrome".to_string(),
            },
            protocol_secret_hash: "h".to_string(),
            at: at(),
        };
        MandelboxTest::with(())
            .given(vec![allocated.clone()])
            .when(MandelboxCommand::RecordSpunUp { at: at() })
            .then_expect_events(vec![MandelboxEvent::SpunUp { at: at() }]);
        MandelboxTest::with(())
            .given(vec![allocated, MandelboxEvent::SpunUp { at: at() }])
            .when(MandelboxCommand::RecordSpunUp { at: at() })
            .then_expect_events(vec![]);
    }

    fn at() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("a valid time")
    }

    fn placement() -> Placement {
        Placement {
            instance_id: "i".to_string(),
            user_id: "u".to_string(),
            session_id: 1,
            region: "us-east-1".to_string(),
            ip: "10.0.0.1".to_string(),
            app_name: "browsers/chrome".to_string(),
        }
    }

    fn allocated() -> Vec<MandelboxEvent> {
        vec![MandelboxEvent::Allocated {
            placement: placement(),
            protocol_secret_hash: "secret".to_string(),
            at: at(),
        }]
    }

    fn with_status(status: MandelboxStatus) -> Vec<MandelboxEvent> {
        let mut events = allocated();
        if status != MandelboxStatus::Allocated {
            events.push(MandelboxEvent::StatusChanged {
                from: MandelboxStatus::Allocated,
                to: status,
                at: at(),
            });
        }
        events
    }

    fn dead() -> Vec<MandelboxEvent> {
        let mut events = with_status(MandelboxStatus::Running);
        events.push(MandelboxEvent::Ended {
            reason: EndReason::Disconnected,
            from: MandelboxStatus::Running,
            at: at(),
        });
        events
    }

    fn report(status: ReportedStatus) -> MandelboxCommand {
        MandelboxCommand::ReportStatus { status, at: at() }
    }

    #[test]
    fn an_allocation_records_where_and_for_whom() {
        MandelboxTest::with(())
            .given_no_previous_events()
            .when(MandelboxCommand::Allocate {
                placement: placement(),
                protocol_secret_hash: "secret".to_string(),
                at: at(),
            })
            .then_expect_events(allocated());
    }

    #[test]
    fn a_mandelbox_id_cannot_be_reused_elsewhere() {
        MandelboxTest::with(())
            .given(allocated())
            .when(MandelboxCommand::Allocate {
                placement: Placement {
                    instance_id: "other".to_string(),
                    ..placement()
                },
                protocol_secret_hash: "secret".to_string(),
                at: at(),
            })
            .then_expect_error(MandelboxError::AlreadyExists);
    }

    #[test]
    fn a_reported_status_moves_the_mandelbox_forward() {
        MandelboxTest::with(())
            .given(allocated())
            .when(report(ReportedStatus::Connecting))
            .then_expect_events(vec![MandelboxEvent::StatusChanged {
                from: MandelboxStatus::Allocated,
                to: MandelboxStatus::Connecting,
                at: at(),
            }]);
    }

    #[test]
    fn a_report_of_an_earlier_status_changes_nothing() {
        MandelboxTest::with(())
            .given(with_status(MandelboxStatus::Running))
            .when(report(ReportedStatus::Connecting))
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_disconnect_ends_the_mandelbox() {
        MandelboxTest::with(())
            .given(with_status(MandelboxStatus::Running))
            .when(MandelboxCommand::Disconnect { at: at() })
            .then_expect_events(vec![MandelboxEvent::Ended {
                reason: EndReason::Disconnected,
                from: MandelboxStatus::Running,
                at: at(),
            }]);
    }

    #[test]
    fn a_second_disconnect_changes_nothing() {
        MandelboxTest::with(())
            .given(dead())
            .when(MandelboxCommand::Disconnect { at: at() })
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_dead_mandelbox_ignores_status_reports() {
        MandelboxTest::with(())
            .given(dead())
            .when(report(ReportedStatus::Running))
            .then_expect_events(vec![]);
    }

    #[test]
    fn a_mandelbox_never_connected_within_the_timeout_expires() {
        MandelboxTest::with(())
            .given(allocated())
            .when(MandelboxCommand::ExpireIfNeverConnected {
                timeout: Duration::seconds(90),
                at: at() + Duration::seconds(91),
            })
            .then_expect_events(vec![MandelboxEvent::Ended {
                reason: EndReason::NeverConnected,
                from: MandelboxStatus::Allocated,
                at: at() + Duration::seconds(91),
            }]);
    }

    #[test]
    fn a_mandelbox_inside_the_timeout_does_not_expire() {
        MandelboxTest::with(())
            .given(allocated())
            .when(MandelboxCommand::ExpireIfNeverConnected {
                timeout: Duration::seconds(90),
                at: at() + Duration::seconds(30),
            })
            .then_expect_error(MandelboxError::NotStale);
    }

    #[test]
    fn a_connecting_mandelbox_does_not_expire() {
        MandelboxTest::with(())
            .given(with_status(MandelboxStatus::Connecting))
            .when(MandelboxCommand::ExpireIfNeverConnected {
                timeout: Duration::seconds(90),
                at: at() + Duration::seconds(300),
            })
            .then_expect_error(MandelboxError::NotStale);
    }

    #[test]
    fn a_status_report_for_an_unknown_mandelbox_is_refused() {
        MandelboxTest::with(())
            .given_no_previous_events()
            .when(report(ReportedStatus::Running))
            .then_expect_error(MandelboxError::Unknown);
    }

    fn any_command() -> impl Strategy<Value = MandelboxCommand> {
        prop_oneof![
            Just(report(ReportedStatus::Connecting)),
            Just(report(ReportedStatus::Running)),
            Just(report(ReportedStatus::Dying)),
            Just(MandelboxCommand::Disconnect { at: at() }),
            Just(MandelboxCommand::End {
                reason: EndReason::HostLost,
                at: at()
            }),
            (0i64..200).prop_map(|seconds| MandelboxCommand::ExpireIfNeverConnected {
                timeout: Duration::seconds(90),
                at: at() + Duration::seconds(seconds),
            }),
        ]
    }

    /// Every kind of command, allocations to the same and to another place and spin-ups included.
    fn every_command() -> Vec<MandelboxCommand> {
        let elsewhere = Placement {
            instance_id: "j".to_string(),
            ..placement()
        };
        let mut commands: Vec<MandelboxCommand> = [
            ReportedStatus::Connecting,
            ReportedStatus::Running,
            ReportedStatus::Dying,
        ]
        .into_iter()
        .map(report)
        .collect();
        commands.extend([
            MandelboxCommand::Disconnect { at: at() },
            MandelboxCommand::End {
                reason: EndReason::HostLost,
                at: at(),
            },
            MandelboxCommand::RecordSpunUp { at: at() },
            MandelboxCommand::ExpireIfNeverConnected {
                timeout: Duration::seconds(90),
                at: at() + Duration::seconds(600),
            },
            MandelboxCommand::Allocate {
                placement: placement(),
                protocol_secret_hash: "secret".to_string(),
                at: at(),
            },
            MandelboxCommand::Allocate {
                placement: elsewhere,
                protocol_secret_hash: "secret".to_string(),
                at: at(),
            },
        ]);
        commands
    }

    #[test]
    fn only_a_dead_mandelbox_is_settled() {
        let state = |events: Vec<MandelboxEvent>| crate::decide::state_from::<Mandelbox>(events);
        assert!(!Mandelbox::default().is_settled());
        assert!(!state(with_status(MandelboxStatus::Dying)).is_settled());
        assert!(state(dead()).is_settled());
    }

    #[test]
    fn the_check_of_settled_states_catches_a_refusal_a_later_event_lifts() {
        // An unknown mandelbox refuses a report; once allocated it records one. Were the unknown state called
        // settled, the property test below would fail on such a history.
        let later = allocated();
        assert!(!crate::decide::settles_for(
            &Mandelbox::default(),
            &[report(ReportedStatus::Running)],
            &later
        ));
        assert!(crate::decide::settles_for(
            &crate::decide::state_from::<Mandelbox>(dead()),
            &every_command(),
            &[MandelboxEvent::SpunUp { at: at() }]
        ));
    }

    proptest! {
        #[test]
        fn no_history_of_a_mandelbox_is_longer_than_its_bound(
            commands in proptest::collection::vec(
                prop_oneof![
                    any_command(),
                    Just(MandelboxCommand::RecordSpunUp { at: at() }),
                    Just(MandelboxCommand::Allocate {
                        placement: placement(),
                        protocol_secret_hash: "secret".to_string(),
                        at: at(),
                    }),
                ],
                0..60,
            ),
        ) {
            let most = Mandelbox::MOST_EVENTS.unwrap_or(usize::MAX);
            prop_assert!(crate::decide::most_events_in::<Mandelbox>(commands) <= most);
        }

        #[test]
        fn a_settled_mandelbox_decides_every_refusal_and_every_nothing_as_any_later_state_does(
            commands in proptest::collection::vec(
                prop_oneof![any_command(), Just(MandelboxCommand::RecordSpunUp { at: at() })],
                0..30,
            ),
        ) {
            let mut mandelbox = crate::decide::state_from::<Mandelbox>(allocated());
            let mut states = vec![mandelbox.clone()];
            let mut events = Vec::new();
            for command in commands {
                if let Ok(decided) = mandelbox.decide(command) {
                    for event in decided {
                        mandelbox.evolve(event.clone());
                        events.push(event);
                        states.push(mandelbox.clone());
                    }
                }
            }
            for (index, state) in states.iter().enumerate() {
                if state.is_settled() {
                    prop_assert!(crate::decide::settles_for(state, &every_command(), &events[index..]));
                }
            }
        }

        #[test]
        fn any_history_reads_the_same_from_a_snapshot_and_the_events_after_it(
            commands in proptest::collection::vec(any_command(), 0..40),
            cut in any::<proptest::sample::Index>(),
        ) {
            let mut mandelbox = Mandelbox::default();
            let mut events = allocated();
            for event in &events {
                mandelbox.apply(event.clone());
            }
            for command in commands {
                if let Ok(decided) = mandelbox.decide(command) {
                    for event in decided {
                        mandelbox.apply(event.clone());
                        events.push(event);
                    }
                }
            }
            let cut = cut.index(events.len() + 1);
            prop_assert!(crate::decide::resumes_from_a_snapshot::<Mandelbox>(&events, cut));
        }

        #[test]
        fn status_only_moves_forward_and_a_dead_mandelbox_stays_dead(
            commands in proptest::collection::vec(any_command(), 0..40),
        ) {
            let mut mandelbox = Mandelbox::default();
            for event in allocated() {
                mandelbox.apply(event);
            }
            for command in commands {
                let before = mandelbox.status;
                if let Ok(events) = mandelbox.decide(command) {
                    for event in events {
                        mandelbox.apply(event);
                    }
                }
                prop_assert!(mandelbox.status >= before, "status went back");
                if before == Some(MandelboxStatus::Dead) {
                    prop_assert_eq!(mandelbox.status, Some(MandelboxStatus::Dead));
                }
            }
        }
    }
}
