//! A status a host reports for one of its mandelboxes, and on `RUNNING` the connection of the mandelbox's session.

use chrono::{DateTime, Utc};

use crate::decide::Decide;
use crate::mandelbox::{
    Mandelbox, MandelboxCommand, MandelboxError, MandelboxEvent, ReportedStatus,
};
use crate::session::{Session, SessionCommand, SessionEvent};

/// A status report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusReport {
    pub status: ReportedStatus,
    pub at: DateTime<Utc>,
}

/// What a report records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reported {
    pub mandelbox: Vec<MandelboxEvent>,
    /// The session's connection, on `RUNNING`; empty for a session that cannot be marked (never recorded, ended).
    pub session: Vec<SessionEvent>,
}

impl StatusReport {
    /// Whether the decision needs the session at all (only `RUNNING` connects it).
    pub fn connects_session(&self) -> bool {
        self.status == ReportedStatus::Running
    }

    /// The mandelbox's new status (none when the report is not ahead of it) and, on `RUNNING`, the session's
    /// connection. `session` is only read when [`StatusReport::connects_session`].
    ///
    /// # Errors
    /// The mandelbox is unknown.
    pub fn decide(
        &self,
        mandelbox: &Mandelbox,
        session: Option<&Session>,
    ) -> Result<Reported, MandelboxError> {
        let mandelbox = mandelbox.decide(MandelboxCommand::ReportStatus {
            status: self.status,
            at: self.at,
        })?;
        let session = match session {
            Some(session) if self.connects_session() => session
                .decide(SessionCommand::MarkConnected { at: self.at })
                .unwrap_or_default(),
            _ => vec![],
        };
        Ok(Reported { mandelbox, session })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decisions::given::{allocated, assigned_session, at};
    use crate::mandelbox::MandelboxStatus;

    fn report(status: ReportedStatus) -> StatusReport {
        StatusReport { status, at: at() }
    }

    #[test]
    fn running_moves_the_mandelbox_on_and_connects_its_session() {
        let reported = report(ReportedStatus::Running)
            .decide(&allocated(), Some(&assigned_session()))
            .expect("a known mandelbox");
        assert_eq!(
            reported.mandelbox,
            vec![MandelboxEvent::StatusChanged {
                from: MandelboxStatus::Allocated,
                to: MandelboxStatus::Running,
                at: at(),
            }]
        );
        assert!(matches!(
            reported.session.as_slice(),
            [SessionEvent::Connected { .. }]
        ));
    }

    #[test]
    fn connecting_moves_the_mandelbox_on_and_leaves_the_session_alone() {
        let reported = report(ReportedStatus::Connecting)
            .decide(&allocated(), Some(&assigned_session()))
            .expect("a known mandelbox");
        assert_eq!(reported.mandelbox.len(), 1);
        assert!(reported.session.is_empty());
    }

    #[test]
    fn a_report_behind_the_mandelbox_records_nothing() {
        let mut running = allocated();
        for event in report(ReportedStatus::Running)
            .decide(&allocated(), None)
            .expect("known")
            .mandelbox
        {
            running.evolve(event);
        }
        let reported = report(ReportedStatus::Connecting)
            .decide(&running, Some(&assigned_session()))
            .expect("known");
        assert!(reported.mandelbox.is_empty() && reported.session.is_empty());
    }

    #[test]
    fn running_on_a_session_never_recorded_still_records_the_status() {
        let reported = report(ReportedStatus::Running)
            .decide(&allocated(), Some(&Session::default()))
            .expect("a known mandelbox");
        assert_eq!(reported.mandelbox.len(), 1);
        assert!(reported.session.is_empty());
    }

    #[test]
    fn a_report_for_an_unknown_mandelbox_is_refused() {
        assert_eq!(
            report(ReportedStatus::Running).decide(&Mandelbox::default(), None),
            Err(MandelboxError::Unknown)
        );
    }
}
