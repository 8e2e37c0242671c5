//! Leading the fleet: taking the lease, recording the taking, and recording each decision of the leader under the
//! fence of its epoch (`whist_domain::leadership`), so that a leader that was paused past its lease never records a
//! decision after its successor took over.

use chrono::Utc;
use whist_adapters::store::lease;
use whist_adapters::store::{CommandError, Unit};
use whist_domain::decide::Decide;
use whist_domain::instance::{InstanceCommand, InstanceError};
use whist_domain::leadership::{LeadershipCommand, LeadershipError, FLEET_LEADERSHIP_ID};
use whist_domain::{Actor, EventMetadata};

use crate::control::UseCaseError;
use crate::state::Context;

/// The fleet leader's lease.
pub const FLEET_LEASE: &str = "fleet";

/// Attempts a fenced decision makes before giving up to concurrent writers.
const ATTEMPTS: usize = 5;

/// What became of a decision recorded under the fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fenced {
    /// Recorded, with the fence.
    Recorded,
    /// The instance refused the command (it changed since the plan was read); nothing was recorded.
    Refused(InstanceError),
    /// A newer leader has taken over: nothing was recorded, and this process must stand down.
    Superseded(LeadershipError),
}

/// A name for this process as a lease holder: unique per start.
pub fn holder_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".to_string());
    let start = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}:{}:{}", std::process::id(), &start[..8])
}

/// Holds the fleet's lease for `holder` (renewing or taking it): the epoch this process leads at, or `None` when
/// another process does. A taking is recorded in the log before the epoch is returned, so that no decision of the
/// epoch can precede its taking.
///
/// # Errors
/// The database failed (then this process must not decide).
pub async fn lead(
    context: &Context,
    holder: &str,
    known_epoch: Option<i64>,
) -> Result<Option<i64>, UseCaseError> {
    let ttl = context.settings.fleet.leader_lease;
    let Some(epoch) = lease::hold(&context.database, FLEET_LEASE, holder, ttl).await? else {
        return Ok(None);
    };
    if known_epoch == Some(epoch) {
        return Ok(Some(epoch));
    }
    let metadata = EventMetadata::new(Actor::System, Utc::now());
    let command = LeadershipCommand::Take {
        holder: holder.to_string(),
        epoch,
        at: Utc::now(),
    };
    match context
        .services
        .leadership
        .execute_retrying(FLEET_LEADERSHIP_ID, command, &metadata)
        .await
    {
        Ok(()) => {
            tracing::info!(
                epoch,
                holder,
                "this process now leads the fleet (autoscaler and cloud repair)"
            );
            Ok(Some(epoch))
        }
        // A newer taking is already recorded: this lease was taken from under us meanwhile.
        Err(CommandError::Rejected(refusal)) => {
            tracing::warn!(epoch, error = %refusal, "the lease was taken, but a newer leader is recorded");
            Ok(None)
        }
        Err(error) => Err(error.into()),
    }
}

/// Gives the lease up (a clean shutdown), so that another process leads at once.
pub async fn step_down(context: &Context, holder: &str) {
    if let Err(error) = lease::release(&context.database, FLEET_LEASE, holder).await {
        tracing::warn!(error = %error, "could not give up the fleet's lease; it expires by itself");
    }
}

/// Records `command` on instance `instance_id` together with the leader's fence for `epoch` (`decision` names it
/// in the log): both or neither, in the chain of `pass` (the leader's pass that decided it). `new` says the
/// instance is one this decision creates.
///
/// # Errors
/// The store failed, or concurrent writers won every attempt.
pub async fn record_fenced(
    context: &Context,
    pass: &EventMetadata,
    epoch: i64,
    decision: &str,
    instance_id: &str,
    command: InstanceCommand,
    new: bool,
) -> Result<Fenced, UseCaseError> {
    let services = &context.services;
    let metadata = pass.at(Utc::now());
    for _ in 0..ATTEMPTS {
        let mut unit = Unit::new(&metadata);
        let leadership = services
            .leadership
            .load_to_decide(&unit, FLEET_LEADERSHIP_ID)
            .await?;
        let fence = match leadership.state().decide(LeadershipCommand::Decide {
            epoch,
            decision: decision.to_string(),
            at: Utc::now(),
        }) {
            Ok(fence) => fence,
            Err(refusal) if leadership.is_fresh() => return Ok(Fenced::Superseded(refusal)),
            Err(_) => {
                services.leadership.decide_again(&leadership);
                continue;
            }
        };
        let staged = if new {
            services
                .instances
                .stage_new(&mut unit, instance_id, vec![command.clone()])
                .await
        } else {
            services
                .instances
                .stage(&mut unit, instance_id, vec![command.clone()])
                .await
        };
        match staged {
            Ok(()) => {}
            Err(CommandError::Rejected(refusal)) => return Ok(Fenced::Refused(refusal)),
            Err(error) => return Err(error.into()),
        }
        services
            .leadership
            .stage_events(&mut unit, leadership, fence)?;
        if unit.record(&context.database).await? {
            return Ok(Fenced::Recorded);
        }
    }
    Err(UseCaseError::Contended { attempts: ATTEMPTS })
}
