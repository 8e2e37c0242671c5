//! Assigning a mandelbox: the product's main path.
//!
//! Order of decisions, each one a command under optimistic concurrency:
//! 1. the user reserves one of their `MANDELBOX_LIMIT_PER_USER` live mandelboxes (user aggregate);
//! 2. a host with room takes the slot (instance aggregate); candidates come from the `instances` read model, fullest
//!    first, and a stale read costs a conflict or a refusal and the next candidate, never a double allocation;
//! 3. the mandelbox and the session are recorded.
//!
//! Starting the mandelbox on its host is the reconciler's job, after these are recorded, never this request's.

use chrono::Utc;
use sqlx::Row;
use uuid::Uuid;
use whist_adapters::config::Environment;
use whist_adapters::store::CommandError;
use whist_adapters::tokens::{fingerprint, Purpose};
use whist_domain::images::CATALOG_ID;
use whist_domain::instance::{InstanceCommand, InstanceError};
use whist_domain::mandelbox::{MandelboxCommand, Placement};
use whist_domain::session::{session_aggregate_id, SessionCommand};
use whist_domain::user::{UserCommand, UserError};
use whist_domain::EventMetadata;

use crate::state::AppState;

/// The hash the desktop app sends in `local` and `dev` to mean "whatever the region runs".
pub const LOCAL_DEV_HASH: &str = "local_dev";

/// How often one command is retried after a conflict before giving up on that aggregate.
const CONFLICT_RETRIES: usize = 5;

/// Candidates read per region per attempt.
const CANDIDATES: i64 = 16;

/// What an assign request asks for.
#[derive(Debug, Clone)]
pub struct AssignRequest {
    pub user_id: String,
    pub regions: Vec<String>,
    pub client_commit_hash: String,
    pub session_id: i64,
    pub app_name: String,
}

/// A refusal the contract names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    RegionNotEnabled,
    NoInstanceAvailable,
    CommitHashMismatch,
    UserAlreadyActive,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Self::RegionNotEnabled => "REGION_NOT_ENABLED",
            Self::NoInstanceAvailable => "NO_INSTANCE_AVAILABLE",
            Self::CommitHashMismatch => "COMMIT_HASH_MISMATCH",
            Self::UserAlreadyActive => "USER_ALREADY_ACTIVE",
        }
    }
}

/// A placed mandelbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assigned {
    pub mandelbox_id: String,
    pub ip: String,
    pub region: String,
}

/// The store failed; the request answers 503 and may be retried.
#[derive(Debug, thiserror::Error)]
#[error("the assign could not be recorded: {0}")]
pub struct AssignFailure(String);

fn failure<E: std::error::Error + 'static>(error: CommandError<E>) -> AssignFailure {
    crate::error::log_failure("assign failed", &error);
    AssignFailure(error.to_string())
}

/// Assigns a mandelbox, or says why not.
///
/// # Errors
/// The store failed part-way; whatever was recorded is ended by the sweeps.
pub async fn assign(
    state: &AppState,
    request: &AssignRequest,
    metadata: &EventMetadata,
) -> Result<Result<Assigned, Refusal>, AssignFailure> {
    let settings = &state.settings;
    let regions: Vec<&String> = request
        .regions
        .iter()
        .filter(|region| settings.enabled_regions.contains(region))
        .collect();
    if regions.is_empty() {
        return Ok(Err(Refusal::RegionNotEnabled));
    }
    let services = &state.services;
    let (catalog, _) = services.catalog.load(CATALOG_ID).await.map_err(failure)?;

    let mandelbox_id = Uuid::new_v4().to_string();
    // 1. The user's own limit.
    let reserve = UserCommand::ReserveMandelbox {
        mandelbox_id: mandelbox_id.clone(),
        limit: settings.mandelbox_limit_per_user,
        at: Utc::now(),
    };
    match retry_conflicts(|| {
        services
            .users
            .execute(&request.user_id, reserve.clone(), metadata)
    })
    .await
    {
        Ok(()) => {}
        Err(CommandError::Rejected(UserError::LimitReached)) => {
            return Ok(Err(Refusal::UserAlreadyActive))
        }
        Err(error) => return Err(failure(error)),
    }

    // 2. A slot, region by region in the order asked.
    let mut any_matching_image = false;
    let mut placed = None;
    'regions: for region in regions {
        let wanted_hash = if request.client_commit_hash == LOCAL_DEV_HASH
            && matches!(settings.environment, Environment::Local | Environment::Dev)
        {
            match catalog.active_in(region) {
                Some(image) => image.client_commit_hash.clone(),
                None => continue,
            }
        } else {
            request.client_commit_hash.clone()
        };
        if catalog
            .active_in(region)
            .is_some_and(|image| image.client_commit_hash == wanted_hash)
        {
            any_matching_image = true;
        }
        // Candidates come from the read model, which may be a little behind: a host it shows with room may be
        // full (refused), or taken by a concurrent assign (conflict). After a round lost to conflicts only, the
        // candidates are read again.
        for _round in 0..3 {
            let candidates = candidates(state, region, &wanted_hash).await?;
            if !candidates.is_empty()
                || (!any_matching_image && runs_image(state, region, &wanted_hash).await?)
            {
                any_matching_image = true;
            }
            if candidates.is_empty() {
                break;
            }
            let mut lost_to_conflicts = false;
            // A host another request of this process is allocating on right now is passed over for the next
            // fullest (concurrent assigns spread instead of queueing); if every candidate is busy, wait for the
            // fullest.
            let mut attempts = Vec::new();
            for (instance_id, ip) in &candidates {
                let lock = services.host_locks.of(instance_id);
                if let Ok(guard) = lock.try_lock_owned() {
                    attempts.push((instance_id.clone(), ip.clone(), guard));
                    break;
                }
            }
            if attempts.is_empty() {
                let (instance_id, ip) = &candidates[0];
                let guard = services.host_locks.of(instance_id).lock_owned().await;
                attempts.push((instance_id.clone(), ip.clone(), guard));
            }
            let mut remaining = candidates.clone();
            let (first_id, first_ip, first_guard) = attempts.remove(0);
            remaining.retain(|(instance_id, _)| *instance_id != first_id);
            let mut next = Some((first_id, first_ip, Some(first_guard)));
            let mut rest = remaining.into_iter();
            while let Some((instance_id, ip, guard)) = next.take() {
                let guard = match guard {
                    Some(guard) => guard,
                    None => services.host_locks.of(&instance_id).lock_owned().await,
                };
                let allocate = InstanceCommand::AllocateMandelbox {
                    mandelbox_id: mandelbox_id.clone(),
                    user_id: request.user_id.clone(),
                    at: Utc::now(),
                };
                let outcome = match services
                    .instances
                    .execute(&instance_id, allocate.clone(), metadata)
                    .await
                {
                    Err(CommandError::Conflict) => {
                        services
                            .instances
                            .execute(&instance_id, allocate.clone(), metadata)
                            .await
                    }
                    outcome => outcome,
                };
                drop(guard);
                match outcome {
                    Ok(()) => {
                        placed = Some((instance_id, ip, region.clone()));
                        break 'regions;
                    }
                    Err(CommandError::Conflict) => lost_to_conflicts = true,
                    Err(CommandError::Rejected(
                        InstanceError::AtCapacity | InstanceError::NotAcceptingMandelboxes,
                    )) => {}
                    Err(CommandError::Rejected(other)) => {
                        tracing::warn!(instance_id, error = %other, "candidate refused the allocation");
                    }
                    Err(error) => {
                        release_user(state, request, &mandelbox_id, metadata).await;
                        return Err(failure(error));
                    }
                }
                next = rest.next().map(|(instance_id, ip)| (instance_id, ip, None));
            }
            if !lost_to_conflicts {
                break;
            }
        }
    }
    let Some((instance_id, ip, region)) = placed else {
        release_user(state, request, &mandelbox_id, metadata).await;
        let refusal = if any_matching_image {
            Refusal::NoInstanceAvailable
        } else {
            Refusal::CommitHashMismatch
        };
        record_refused_session(state, request, refusal, metadata).await;
        return Ok(Err(refusal));
    };

    // 3. The mandelbox and its session.
    let secret = services.tokens.derive(Purpose::Protocol, &mandelbox_id);
    services
        .mandelboxes
        .execute(
            &mandelbox_id,
            MandelboxCommand::Allocate {
                placement: Placement {
                    instance_id,
                    user_id: request.user_id.clone(),
                    session_id: request.session_id,
                    region: region.clone(),
                    ip: ip.clone(),
                    app_name: request.app_name.clone(),
                },
                protocol_secret_hash: fingerprint(&secret),
                at: Utc::now(),
            },
            metadata,
        )
        .await
        .map_err(failure)?;
    record_assigned_session(state, request, &mandelbox_id, metadata).await;
    Ok(Ok(Assigned {
        mandelbox_id,
        ip,
        region,
    }))
}

/// Hosts in `region` running `client_commit_hash` with a free slot, fullest first.
async fn candidates(
    state: &AppState,
    region: &str,
    client_commit_hash: &str,
) -> Result<Vec<(String, String)>, AssignFailure> {
    let rows = sqlx::query(
        "SELECT instance_id, ip FROM instances \
         WHERE region = $1 AND client_commit_hash = $2 AND status = 'ACTIVE' \
           AND live_mandelboxes < mandelbox_capacity AND ip IS NOT NULL \
         ORDER BY live_mandelboxes DESC, instance_id LIMIT $3",
    )
    .bind(region)
    .bind(client_commit_hash)
    .bind(CANDIDATES)
    .fetch_all(state.database.any())
    .await
    .map_err(|error| {
        crate::error::log_failure("could not read candidate hosts", &error);
        AssignFailure(error.to_string())
    })?;
    rows.iter()
        .map(|row| Ok((row.try_get("instance_id")?, row.try_get("ip")?)))
        .collect::<Result<Vec<_>, sqlx::Error>>()
        .map_err(|error| AssignFailure(error.to_string()))
}

/// Whether any host in `region` that is up or coming up runs `client_commit_hash` (full or not).
async fn runs_image(
    state: &AppState,
    region: &str,
    client_commit_hash: &str,
) -> Result<bool, AssignFailure> {
    let count: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM instances WHERE region = $1 AND client_commit_hash = $2 \
         AND status IN ('ACTIVE', 'PRE_CONNECTION')",
    )
    .bind(region)
    .bind(client_commit_hash)
    .fetch_one(state.database.any())
    .await
    .map_err(|error| {
        crate::error::log_failure("could not read hosts", &error);
        AssignFailure(error.to_string())
    })?;
    Ok(count > 0)
}

async fn retry_conflicts<F, Fut, E>(mut attempt: F) -> Result<(), CommandError<E>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), CommandError<E>>>,
    E: std::error::Error + 'static,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Err(CommandError::Conflict) if tries < CONFLICT_RETRIES => tries += 1,
            outcome => return outcome,
        }
    }
}

async fn release_user(
    state: &AppState,
    request: &AssignRequest,
    mandelbox_id: &str,
    metadata: &EventMetadata,
) {
    let release = UserCommand::ReleaseMandelbox {
        mandelbox_id: mandelbox_id.to_string(),
        at: Utc::now(),
    };
    if let Err(error) = retry_conflicts(|| {
        state
            .services
            .users
            .execute(&request.user_id, release.clone(), metadata)
    })
    .await
    {
        crate::error::log_failure("could not release the user's reservation", &error);
    }
}

async fn record_assigned_session(
    state: &AppState,
    request: &AssignRequest,
    mandelbox_id: &str,
    metadata: &EventMetadata,
) {
    let id = session_aggregate_id(&request.user_id, request.session_id);
    let sessions = &state.services.sessions;
    let requested = sessions
        .execute(&id, session_request(request), metadata)
        .await;
    let assigned = match requested {
        Ok(()) => {
            sessions
                .execute(
                    &id,
                    SessionCommand::Assign {
                        mandelbox_id: mandelbox_id.to_string(),
                        at: Utc::now(),
                    },
                    metadata,
                )
                .await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = assigned {
        // The mandelbox is placed either way; a session reused by the app keeps its first mandelbox.
        tracing::info!(session = id, error = %error, "session not updated for this assign");
    }
}

async fn record_refused_session(
    state: &AppState,
    request: &AssignRequest,
    refusal: Refusal,
    metadata: &EventMetadata,
) {
    let id = session_aggregate_id(&request.user_id, request.session_id);
    let sessions = &state.services.sessions;
    let outcome = match sessions
        .execute(&id, session_request(request), metadata)
        .await
    {
        Ok(()) => {
            sessions
                .execute(
                    &id,
                    SessionCommand::Refuse {
                        code: refusal.code().to_string(),
                        at: Utc::now(),
                    },
                    metadata,
                )
                .await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = outcome {
        tracing::info!(session = id, error = %error, "session not updated for this refusal");
    }
}

fn session_request(request: &AssignRequest) -> SessionCommand {
    SessionCommand::Request {
        user_id: request.user_id.clone(),
        regions: request.regions.clone(),
        client_commit_hash: request.client_commit_hash.clone(),
        at: Utc::now(),
    }
}
