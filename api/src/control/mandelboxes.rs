//! What happens to a mandelbox after its assign: the statuses its host reports, and its end (a disconnect, a dead
//! host, an operator), each one unit recorded whole or not at all.

use chrono::Utc;
use whist_adapters::store::CommandError;
use whist_domain::instance::InstanceCommand;
use whist_domain::mandelbox::{MandelboxCommand, Placement, ReportedStatus};
use whist_domain::session::{session_aggregate_id, SessionCommand};
use whist_domain::user::UserCommand;
use whist_domain::EventMetadata;

use super::{record_unit, Attempt, UseCaseError};
use crate::state::Context;

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

/// Records a status the host reported, and on `RUNNING` the session's connection, in one unit (one append).
/// A session that cannot be marked (never recorded, already ended) leaves the mandelbox's status to be recorded alone.
///
/// # Errors
/// The store failed, or concurrent writers won every attempt.
#[tracing::instrument(skip_all, fields(mandelbox_id = %mandelbox_id, instance_id = %placement.instance_id, ?status))]
pub async fn record_status(
    context: &Context,
    mandelbox_id: &str,
    placement: &Placement,
    status: ReportedStatus,
    metadata: &EventMetadata,
) -> Result<(), UseCaseError> {
    const ATTEMPTS: usize = 10;
    let services = &context.services;
    let now = Utc::now();
    let session = &session_aggregate_id(&placement.user_id, placement.session_id);
    record_unit(context, metadata, ATTEMPTS, |mut unit| async move {
        services
            .mandelboxes
            .stage(
                &mut unit,
                mandelbox_id,
                vec![MandelboxCommand::ReportStatus { status, at: now }],
            )
            .await?;
        if status == ReportedStatus::Running {
            match services
                .sessions
                .stage(
                    &mut unit,
                    session,
                    vec![SessionCommand::MarkConnected { at: now }],
                )
                .await
            {
                Ok(()) => {}
                Err(CommandError::Rejected(error)) => {
                    tracing::info!(session, error = %error, "session not marked connected");
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(Attempt::Record(unit, ()))
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
        whist_domain::mandelbox::EndReason::Disconnected,
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
    reason: whist_domain::mandelbox::EndReason,
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

/// `end_mandelbox`, saying why the mandelbox ends.
///
/// # Errors
/// The store failed, or concurrent writers won every attempt.
#[tracing::instrument(skip_all, fields(mandelbox_id = %mandelbox_id, instance_id = %placement.instance_id, ?reason))]
pub async fn end_mandelbox_for(
    context: &Context,
    mandelbox_id: &str,
    placement: &Placement,
    metadata: &EventMetadata,
    reason: whist_domain::mandelbox::EndReason,
) -> Result<(), UseCaseError> {
    const ATTEMPTS: usize = 10;
    let services = &context.services;
    let now = Utc::now();
    let session = &session_aggregate_id(&placement.user_id, placement.session_id);
    let guard = record_unit(context, metadata, ATTEMPTS, |mut unit| async move {
        services
            .mandelboxes
            .stage(
                &mut unit,
                mandelbox_id,
                vec![match reason {
                    whist_domain::mandelbox::EndReason::Disconnected => {
                        MandelboxCommand::Disconnect { at: now }
                    }
                    reason => MandelboxCommand::End { reason, at: now },
                }],
            )
            .await?;
        services
            .users
            .stage(
                &mut unit,
                &placement.user_id,
                vec![UserCommand::ReleaseMandelbox {
                    mandelbox_id: mandelbox_id.to_string(),
                    at: now,
                }],
            )
            .await?;
        match services
            .sessions
            .stage(&mut unit, session, vec![SessionCommand::End { at: now }])
            .await
        {
            Ok(()) => {}
            // A session that never was (or has ended) has nothing to record.
            Err(CommandError::Rejected(error)) => {
                tracing::debug!(session, error = %error, "session not ended");
            }
            Err(error) => return Err(error.into()),
        }
        // The host's lock in this process is held only from staging its slot to recording the unit, so that an
        // assign of this process on the same host waits instead of conflicting.
        let host_guard = services
            .host_locks
            .of(&placement.instance_id)
            .lock_owned()
            .await;
        services
            .instances
            .stage(
                &mut unit,
                &placement.instance_id,
                vec![InstanceCommand::FreeMandelbox {
                    mandelbox_id: mandelbox_id.to_string(),
                    at: now,
                }],
            )
            .await?;
        Ok(Attempt::Record(unit, host_guard))
    })
    .await?;
    drop(guard);
    Ok(())
}
