//! What happens to a mandelbox after its assign: the statuses its host reports, and its end (a disconnect, a dead
//! host, an operator), each one unit recorded whole or not at all.

use chrono::Utc;
use cqrs_es::Aggregate;
use whist_adapters::store::{CommandError, Loaded};
use whist_domain::decisions::ending::Ending;
use whist_domain::decisions::status_report::StatusReport;
use whist_domain::mandelbox::{EndReason, Mandelbox, Placement, ReportedStatus};
use whist_domain::session::session_aggregate_id;
use whist_domain::EventMetadata;

use super::{continuing, record_unit, Attempt, UseCaseError};
use crate::state::Context;
use crate::{final_on, stage_parts};

/// Where a mandelbox was placed, `None` for an id that has none. A placement never changes once recorded: the
/// remembered copy answers when it has one, without a read. An id with no events at all is known to be unplaced
/// after the one read that found nothing (no copy is remembered for it, so that read was fresh), so a made-up id
/// costs one read, not two.
///
/// # Errors
/// The store failed.
pub async fn placement(
    context: &Context,
    mandelbox_id: &str,
) -> Result<Option<Placement>, CommandError<whist_domain::mandelbox::MandelboxError>> {
    if let Ok((mandelbox, version)) = context
        .services
        .mandelboxes
        .load_possibly_stale(mandelbox_id)
        .await
    {
        if let Some(placement) = mandelbox.placement {
            return Ok(Some(placement));
        }
        if version == 0 {
            return Ok(None);
        }
    }
    let (mandelbox, _) = context
        .services
        .mandelboxes
        .load_from_history(mandelbox_id)
        .await?;
    Ok(mandelbox.placement)
}

/// Records a status the host reported, and on `RUNNING` the session's connection, in one unit (one append): the
/// decision is [`StatusReport`]. A session that cannot be marked (never recorded, already ended) leaves the
/// mandelbox's status to be recorded alone.
///
/// # Errors
/// The store failed, or concurrent writers won every attempt.
///
/// A report continues the mandelbox's chain: it is recorded with the correlation id of the mandelbox's last event
/// (the assign's request, through its spin-up) and caused by that event (its position); `report` gives the actor.
/// That event is read only when the report records something: a report that changes nothing for good (of a
/// mandelbox that has ended, say) costs no read of the store.
#[tracing::instrument(skip_all, fields(mandelbox_id = %mandelbox_id, instance_id = %placement.instance_id, ?status))]
pub async fn record_status(
    context: &Context,
    mandelbox_id: &str,
    placement: &Placement,
    status: ReportedStatus,
    report_metadata: &EventMetadata,
) -> Result<(), UseCaseError> {
    const ATTEMPTS: usize = 10;
    let services = &context.services;
    let report = &StatusReport {
        status,
        at: Utc::now(),
    };
    let session_id = &session_aggregate_id(&placement.user_id, placement.session_id);
    record_unit(context, report_metadata, ATTEMPTS, |mut unit| async move {
        let mandelbox = services
            .mandelboxes
            .load_to_decide(&unit, mandelbox_id)
            .await?;
        let session = if report.connects_session() {
            Some(services.sessions.load_to_decide(&unit, session_id).await?)
        } else {
            None
        };
        let reported = match report.decide(mandelbox.state(), session.as_ref().map(Loaded::state)) {
            Ok(reported) => reported,
            Err(_) if !final_on!((services.mandelboxes, &mandelbox)) => return Ok(Attempt::Again),
            Err(refusal) => return Err(UseCaseError::Refused(Box::new(refusal))),
        };
        let changes_nothing = reported.mandelbox.is_empty() && reported.session.is_empty();
        if changes_nothing
            && mandelbox.decides_finally()
            && session.as_ref().is_none_or(Loaded::decides_finally)
        {
            return Ok(Attempt::Settled(()));
        }
        if !changes_nothing {
            let metadata =
                continuing(context, Mandelbox::TYPE, mandelbox_id, report_metadata).await?;
            unit.carry(&metadata)
                .map_err(|error| UseCaseError::Store(Box::new(error)))?;
        }
        let mut staged = stage_parts!(
            &mut unit,
            (services.mandelboxes, mandelbox, reported.mandelbox)
        );
        if let Some(session) = session {
            staged &= stage_parts!(&mut unit, (services.sessions, session, reported.session));
        }
        Ok(if staged {
            Attempt::Record(unit, ())
        } else {
            Attempt::Again
        })
    })
    .await
}

/// Ends a mandelbox everywhere it counts: itself, its host's slot, its user's limit, its session, all recorded
/// together or not at all. Every step is idempotent, so a retry finishes the job and a repeat records nothing.
pub async fn end_mandelbox(
    context: &Context,
    mandelbox_id: &str,
    placement: &Placement,
    metadata: &EventMetadata,
) -> Result<(), UseCaseError> {
    end_mandelbox_for(
        context,
        mandelbox_id,
        placement,
        metadata,
        EndReason::Disconnected,
    )
    .await
}

/// Ends the mandelboxes still on a host that is gone (or going): each with `reason`, each as its own unit.
///
/// # Errors
/// The store failed; the mandelboxes not yet ended are left for the next try.
#[tracing::instrument(skip_all, fields(instance_id = %instance_id, ?reason))]
pub async fn end_mandelboxes_on(
    context: &Context,
    instance_id: &str,
    reason: EndReason,
    metadata: &EventMetadata,
) -> Result<usize, UseCaseError> {
    let services = &context.services;
    let (instance, _) = services.instances.load_caught_up(instance_id).await?;
    let mut ended = 0;
    for mandelbox_id in &instance.mandelboxes {
        let (mandelbox, _) = services.mandelboxes.load_caught_up(mandelbox_id).await?;
        let Some(placement) = mandelbox.placement else {
            continue;
        };
        end_mandelbox_for(context, mandelbox_id, &placement, metadata, reason).await?;
        ended += 1;
    }
    Ok(ended)
}

/// `end_mandelbox`, saying why the mandelbox ends: the decision is [`Ending`], recorded in one unit.
///
/// # Errors
/// The store failed, or concurrent writers won every attempt.
#[tracing::instrument(skip_all, fields(mandelbox_id = %mandelbox_id, instance_id = %placement.instance_id, ?reason))]
pub async fn end_mandelbox_for(
    context: &Context,
    mandelbox_id: &str,
    placement: &Placement,
    metadata: &EventMetadata,
    reason: EndReason,
) -> Result<(), UseCaseError> {
    const ATTEMPTS: usize = 10;
    let services = &context.services;
    let ending = &Ending {
        mandelbox_id: mandelbox_id.to_string(),
        reason,
        at: Utc::now(),
    };
    let session_id = &session_aggregate_id(&placement.user_id, placement.session_id);
    // The user's lock in this process, as an assign takes it: before the host's.
    let user_guard = services.user_locks.lock(&placement.user_id).await;
    let guard = record_unit(context, metadata, ATTEMPTS, |mut unit| async move {
        let mandelbox = services
            .mandelboxes
            .load_to_decide(&unit, mandelbox_id)
            .await?;
        let user = services
            .users
            .load_to_decide(&unit, &placement.user_id)
            .await?;
        let session = services.sessions.load_to_decide(&unit, session_id).await?;
        // The host's lock in this process is held only from deciding on its slot to recording the unit, so that an
        // assign of this process on the same host waits instead of conflicting.
        let host_guard = services
            .host_locks
            .of(&placement.instance_id)
            .lock_owned()
            .await;
        let host = services
            .instances
            .load_to_decide(&unit, &placement.instance_id)
            .await?;
        let ended = match ending.decide(
            mandelbox.state(),
            user.state(),
            session.state(),
            host.state(),
        ) {
            Ok(ended) => ended,
            Err(_)
                if !final_on!(
                    (services.mandelboxes, &mandelbox),
                    (services.instances, &host)
                ) =>
            {
                return Ok(Attempt::Again)
            }
            Err(refusal) => return Err(UseCaseError::Refused(Box::new(refusal))),
        };
        let staged = stage_parts!(
            &mut unit,
            (services.mandelboxes, mandelbox, ended.mandelbox),
            (services.users, user, ended.user),
            (services.sessions, session, ended.session),
            (services.instances, host, ended.instance),
        );
        Ok(if staged {
            Attempt::Record(unit, host_guard)
        } else {
            Attempt::Again
        })
    })
    .await?;
    drop(guard);
    drop(user_guard);
    Ok(())
}
