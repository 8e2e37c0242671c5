//! Developers' actions on the fleet, shared by the admin endpoints and `whist admin …`: launch hosts, drain a host,
//! terminate a host, switch maintenance mode. Each is recorded as commands with the developer as actor; the
//! reconciler carries out what they decide.

use chrono::Utc;
use uuid::Uuid;
use whist_adapters::store::CommandError;
use whist_adapters::tokens::{fingerprint, Purpose};
use whist_domain::images::CATALOG_ID;
use whist_domain::instance::{
    DrainReason, InstanceCommand, InstanceError, InstanceStatus, LaunchReason, LaunchSpec,
    TerminationReason,
};
use whist_domain::service::{ServiceCommand, SERVICE_ID};
use whist_domain::EventMetadata;

use crate::control::UseCaseError;
use crate::state::Context;

/// The most hosts one request launches.
pub const MAX_LAUNCH: u32 = 50;

/// The namespace of hosts launched under an idempotency key (UUID v5 over `{key}/{index}`).
const LAUNCH_NAMESPACE: Uuid = Uuid::from_u128(0x5768_6973_744f_7065_7261_746f_724c_6175);

/// Why an action was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("region {0} is not enabled")]
    RegionNotEnabled(String),
    #[error("region {0} has no active image to launch")]
    NoActiveImage(String),
    #[error("count must be between 1 and {MAX_LAUNCH}")]
    CountOutOfRange,
    #[error("no host {0}")]
    UnknownHost(String),
    #[error("host {0} has already ended")]
    HostEnded(String),
    #[error("the store failed")]
    Store(#[from] UseCaseError),
}

fn store_error(error: impl Into<UseCaseError>) -> OperatorError {
    OperatorError::Store(error.into())
}

/// Decides `count` hosts in `region` on its active image. With an idempotency key the instance ids derive from it,
/// so a retried request decides nothing new and answers the same ids.
///
/// # Errors
/// See [`OperatorError`].
#[tracing::instrument(skip_all, fields(region = %region, count = %count))]
pub async fn launch_hosts(
    state: &Context,
    origin: &EventMetadata,
    region: &str,
    count: u32,
    idempotency_key: Option<&str>,
) -> Result<Vec<String>, OperatorError> {
    if !state
        .settings
        .enabled_regions
        .iter()
        .any(|enabled| enabled == region)
    {
        return Err(OperatorError::RegionNotEnabled(region.to_string()));
    }
    if count == 0 || count > MAX_LAUNCH {
        return Err(OperatorError::CountOutOfRange);
    }
    let (catalog, _) = state
        .services
        .catalog
        .load_caught_up(CATALOG_ID)
        .await
        .map_err(store_error)?;
    let Some(image) = catalog.active_in(region) else {
        return Err(OperatorError::NoActiveImage(region.to_string()));
    };
    let mut ids = Vec::with_capacity(count as usize);
    for index in 0..count {
        let instance_id = match idempotency_key {
            Some(key) => Uuid::new_v5(
                &LAUNCH_NAMESPACE,
                format!("{key}/{region}/{index}").as_bytes(),
            ),
            None => Uuid::new_v4(),
        }
        .to_string();
        let bootstrap = state
            .services
            .tokens
            .derive(Purpose::Bootstrap, &instance_id);
        let command = InstanceCommand::RequestLaunch {
            spec: LaunchSpec {
                region: region.to_string(),
                image_id: image.image_id.clone(),
                client_commit_hash: image.client_commit_hash.clone(),
                instance_type: state.settings.instance_type.clone(),
            },
            bootstrap_token_hash: fingerprint(&bootstrap),
            reason: LaunchReason::Operator,
            at: Utc::now(),
        };
        let metadata = origin.at(Utc::now());
        match state
            .services
            .instances
            .execute(&instance_id, command, &metadata)
            .await
        {
            Ok(()) => {
                tracing::info!(region, instance_id, actor = %origin.actor, "a developer launched a host")
            }
            // The same key again: this host was decided by the first request.
            Err(CommandError::Rejected(InstanceError::AlreadyExists)) => {}
            Err(error) => return Err(store_error(error)),
        }
        ids.push(instance_id);
    }
    Ok(ids)
}

/// Records `command` on the host with the developer as actor, re-deciding after a concurrent write.
async fn decide(
    state: &Context,
    origin: &EventMetadata,
    instance_id: &str,
    command: InstanceCommand,
) -> Result<(), OperatorError> {
    let metadata = origin.at(Utc::now());
    state
        .services
        .instances
        .execute_retrying(instance_id, command, &metadata)
        .await
        .map_err(store_error)
}

/// The host's status now (after an action).
async fn status_of(state: &Context, instance_id: &str) -> Result<InstanceStatus, OperatorError> {
    let (instance, _) = state
        .services
        .instances
        .load_caught_up(instance_id)
        .await
        .map_err(store_error)?;
    instance
        .status
        .ok_or_else(|| OperatorError::UnknownHost(instance_id.to_string()))
}

/// What a developer can do to a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostAction {
    /// It takes no new mandelbox and shuts down when its last one ends. Draining a draining host changes nothing.
    Drain,
    /// The reconciler asks its host service to shut down when it has one, and ends the machine in the cloud; its
    /// mandelboxes end. Terminating a terminating host changes nothing.
    Terminate,
}

/// Drains or terminates a host; its status after the action.
///
/// # Errors
/// The host is unknown (or, to drain, has ended), or the store failed.
#[tracing::instrument(skip_all, fields(instance_id = %instance_id, ?action))]
pub async fn act_on_host(
    state: &Context,
    origin: &EventMetadata,
    instance_id: &str,
    action: HostAction,
) -> Result<InstanceStatus, OperatorError> {
    let status = status_of(state, instance_id).await?;
    let command = match action {
        HostAction::Drain if status.is_ending() => {
            return Err(OperatorError::HostEnded(instance_id.to_string()))
        }
        HostAction::Drain => InstanceCommand::Drain {
            reason: DrainReason::Operator,
            at: Utc::now(),
        },
        HostAction::Terminate => InstanceCommand::Terminate {
            reason: TerminationReason::Operator,
            at: Utc::now(),
        },
    };
    decide(state, origin, instance_id, command).await?;
    tracing::info!(instance_id, actor = %origin.actor, ?action, "a developer acted on a host");
    status_of(state, instance_id).await
}

/// Switches maintenance mode; the switch's position after the call.
///
/// # Errors
/// The store failed.
#[tracing::instrument(skip_all, fields(enabled = %enabled))]
pub async fn set_maintenance(
    state: &Context,
    origin: &EventMetadata,
    enabled: bool,
) -> Result<bool, OperatorError> {
    let metadata = origin.at(Utc::now());
    state
        .services
        .service
        .execute_retrying(
            SERVICE_ID,
            ServiceCommand::SetMaintenance {
                enabled,
                at: Utc::now(),
            },
            &metadata,
        )
        .await
        .map_err(store_error)?;
    tracing::info!(enabled, actor = %origin.actor, "a developer switched maintenance mode");
    maintenance(state).await
}

/// Whether maintenance mode is on.
///
/// # Errors
/// The store failed.
pub async fn maintenance(state: &Context) -> Result<bool, OperatorError> {
    crate::control::assign::in_maintenance(state)
        .await
        .map_err(OperatorError::Store)
}
