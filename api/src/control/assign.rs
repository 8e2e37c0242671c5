//! Assigning a mandelbox: the product's main path.
//!
//! Decisions, each a command on one aggregate, all staged in one unit and recorded together or not at all (one
//! append under optimistic concurrency on every aggregate involved):
//! 1. the user reserves one of their `MANDELBOX_LIMIT_PER_USER` live mandelboxes (user aggregate);
//! 2. a host with room takes the slot (instance aggregate); candidates come from the `instances` read model, fullest
//!    first; a stale read costs a refusal and the next candidate, or a conflict and another attempt on fresh
//!    state, never a double allocation;
//! 3. the mandelbox and the session.
//!
//! Starting the mandelbox on its host is the reconciler's job, after these are recorded, never this request's.

use std::time::Instant;

use chrono::Utc;
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;
use whist_adapters::config::Environment;
use whist_adapters::store::{CommandError, Unit, UnitError};
use whist_adapters::tokens::{fingerprint, Purpose};
use whist_domain::images::{ImageCatalog, CATALOG_ID};
use whist_domain::instance::{InstanceCommand, InstanceError};
use whist_domain::mandelbox::{MandelboxCommand, Placement};
use whist_domain::session::{session_aggregate_id, SessionCommand};
use whist_domain::user::{UserCommand, UserError};
use whist_domain::EventMetadata;

use crate::state::Context;

/// The hash the desktop app sends in `local` and `dev` to mean "whatever the region runs".
pub const LOCAL_DEV_HASH: &str = "local_dev";

/// Attempts of one assign that lose to concurrent writers before the request fails.
const UNIT_ATTEMPTS: usize = 8;

/// Candidates read per region per attempt.
const CANDIDATES: i64 = 64;

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
    /// Maintenance mode is on: no new sessions.
    Maintenance,
    RegionNotEnabled,
    NoInstanceAvailable,
    CommitHashMismatch,
    UserAlreadyActive,
}

impl Refusal {
    pub fn code(self) -> &'static str {
        match self {
            Self::Maintenance => "MAINTENANCE",
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
pub type AssignFailure = crate::control::UseCaseError;

fn failure<E: std::error::Error + Send + Sync + 'static>(error: CommandError<E>) -> AssignFailure {
    crate::telemetry::log_failure("assign failed", &error);
    AssignFailure::from(error)
}

/// Assigns a mandelbox, or says why not.
///
/// # Errors
/// The store failed; nothing was recorded.
#[tracing::instrument(skip_all, fields(user_id = %request.user_id, session_id = request.session_id, mandelbox_id = tracing::field::Empty))]
pub async fn assign(
    state: &Context,
    request: &AssignRequest,
    metadata: &EventMetadata,
) -> Result<Result<Assigned, Refusal>, AssignFailure> {
    if in_maintenance(state).await? {
        return Ok(Err(Refusal::Maintenance));
    }
    let settings = &state.settings;
    let regions: Vec<&String> = request
        .regions
        .iter()
        .filter(|region| settings.enabled_regions.contains(region))
        .collect();
    if regions.is_empty() {
        return Ok(Err(Refusal::RegionNotEnabled));
    }
    let mandelbox_id = Uuid::new_v4().to_string();
    tracing::Span::current().record("mandelbox_id", mandelbox_id.as_str());
    let mut catalog = None;
    for _ in 0..UNIT_ATTEMPTS {
        let mut host = None;
        if let Some(outcome) = attempt(
            state,
            request,
            metadata,
            &regions,
            &mandelbox_id,
            &mut catalog,
            &mut host,
        )
        .await?
        {
            return Ok(outcome);
        }
        // Most often another process took a slot on the same host: this process tries other hosts first for a
        // while (the next attempt included).
        if let Some(host) = host {
            state.services.host_locks.mark_contended(&host);
        }
        metrics::counter!("whist_assign_conflicts_total").increment(1);
    }
    Err(AssignFailure::Contended {
        attempts: UNIT_ATTEMPTS,
    })
}

/// One attempt: every decision staged in one unit and recorded at once. `None` when another writer got to one of
/// the aggregates first (nothing was recorded; the stores read what they missed before the next attempt); `host`
/// then names the host whose slot the attempt had staged.
async fn attempt(
    state: &Context,
    request: &AssignRequest,
    metadata: &EventMetadata,
    regions: &[&String],
    mandelbox_id: &str,
    catalog: &mut Option<ImageCatalog>,
    host: &mut Option<String>,
) -> Result<Option<Result<Assigned, Refusal>>, AssignFailure> {
    let services = &state.services;
    let mut unit = Unit::new(metadata);
    let user = Instant::now();

    // 1. The user's own limit.
    let reserve = UserCommand::ReserveMandelbox {
        mandelbox_id: mandelbox_id.to_string(),
        limit: state.settings.mandelbox_limit_per_user,
        at: Utc::now(),
    };
    match services
        .users
        .stage(&mut unit, &request.user_id, vec![reserve])
        .await
    {
        Ok(()) => phase("user", user),
        Err(CommandError::Rejected(UserError::LimitReached)) => {
            return Ok(Some(Err(Refusal::UserAlreadyActive)))
        }
        Err(error) => return Err(failure(error)),
    }

    // 2. A slot, region by region in the order asked.
    // Per region tried: the commit hash wanted there and whether the read model showed hosts of it with room.
    let mut tried: Vec<(&str, String, bool)> = Vec::new();
    let mut placed = None;
    'regions: for region in regions {
        let wanted_hash = if request.client_commit_hash == LOCAL_DEV_HASH
            && matches!(
                state.settings.environment,
                Environment::Local | Environment::Dev
            ) {
            match current_catalog(state, catalog).await?.active_in(region) {
                Some(image) => image.client_commit_hash.clone(),
                None => continue,
            }
        } else {
            request.client_commit_hash.clone()
        };
        // Candidates come from the read model, which may be a little behind: a host it shows with room may be
        // full (refused on the host's own state, read fresh), or taken by a concurrent assign (the unit conflicts).
        let read = Instant::now();
        let candidates = candidates(state, region, &wanted_hash).await?;
        phase("candidates", read);
        tracing::debug!(
            region = region.as_str(),
            candidates = candidates.len(),
            "candidates read"
        );
        tried.push((region.as_str(), wanted_hash, !candidates.is_empty()));
        for (instance_id, ip, guard) in lock_order(services, candidates) {
            let guard = match guard {
                Some(guard) => guard,
                None => {
                    let waited = Instant::now();
                    let guard = services.host_locks.of(&instance_id).lock_owned().await;
                    phase("host_lock", waited);
                    guard
                }
            };
            let allocate = InstanceCommand::AllocateMandelbox {
                mandelbox_id: mandelbox_id.to_string(),
                user_id: request.user_id.clone(),
                at: Utc::now(),
            };
            match services
                .instances
                .stage(&mut unit, &instance_id, vec![allocate])
                .await
            {
                Ok(()) => {
                    *host = Some(instance_id.clone());
                    placed = Some((instance_id, ip, region.to_string(), guard));
                    break 'regions;
                }
                Err(CommandError::Rejected(
                    refusal @ (InstanceError::AtCapacity | InstanceError::NotAcceptingMandelboxes),
                )) => {
                    tracing::debug!(instance_id, %refusal, "a candidate from the read model refused the slot");
                }
                Err(CommandError::Rejected(other)) => {
                    tracing::warn!(instance_id, error = %other, "candidate refused the allocation");
                }
                Err(error) => return Err(failure(error)),
            }
        }
    }
    let Some((instance_id, ip, region, _host_guard)) = placed else {
        let refusal = if serves_release(state, catalog, &tried).await? {
            Refusal::NoInstanceAvailable
        } else {
            Refusal::CommitHashMismatch
        };
        record_refused_session(state, request, refusal, metadata).await;
        return Ok(Some(Err(refusal)));
    };

    // 3. The mandelbox and its session, recorded with the reservations above.
    let secret = services.tokens.derive(Purpose::Protocol, mandelbox_id);
    let allocate = MandelboxCommand::Allocate {
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
    };
    // The mandelbox id was generated for this assign, and a desktop app names a new session for each: both are
    // staged as new without a read (a wrong presumption costs this unit a conflict and another attempt).
    services
        .mandelboxes
        .stage_new(&mut unit, mandelbox_id, vec![allocate])
        .await
        .map_err(failure)?;
    let session = session_aggregate_id(&request.user_id, request.session_id);
    let session_commands = vec![
        session_request(request),
        SessionCommand::Assign {
            mandelbox_id: mandelbox_id.to_string(),
            at: Utc::now(),
        },
    ];
    match services
        .sessions
        .stage_new(&mut unit, &session, session_commands)
        .await
    {
        Ok(()) => {}
        // The mandelbox is placed either way; a session reused by the app keeps its first mandelbox.
        Err(CommandError::Rejected(error)) => {
            tracing::info!(session, error = %error, "session not updated for this assign");
        }
        Err(error) => return Err(failure(error)),
    }
    let commit = Instant::now();
    let committed = unit.commit(&state.database).await;
    phase("commit", commit);
    match committed {
        Ok(()) => Ok(Some(Ok(Assigned {
            mandelbox_id: mandelbox_id.to_string(),
            ip,
            region,
        }))),
        Err(UnitError::Conflict) => Ok(None),
        Err(error) => {
            crate::telemetry::log_failure("assign failed", &error);
            Err(AssignFailure::from(error))
        }
    }
}

/// Whether maintenance mode is on (read fresh: another process may have switched it).
///
/// # Errors
/// The store failed.
pub async fn in_maintenance(state: &Context) -> Result<bool, AssignFailure> {
    state
        .services
        .service
        .load_caught_up(whist_domain::service::SERVICE_ID)
        .await
        .map(|(service, _)| service.maintenance)
        .map_err(|error| {
            crate::telemetry::log_failure("could not read the maintenance switch", &error);
            AssignFailure::from(error)
        })
}

/// Time spent in one phase of an assign (the load test prints these to show where latency goes).
fn phase(name: &'static str, since: Instant) {
    metrics::histogram!("whist_assign_phase_seconds", "phase" => name)
        .record(since.elapsed().as_secs_f64());
}

/// The candidates in the order to try them: first the fullest host no other request of this process is
/// allocating on right now, with its lock already held (concurrent assigns spread instead of queueing), then the
/// others in order (from a random one when none is free), whose locks are taken when their turn comes. Hosts on
/// which this process recently lost to another writer come after the rest, in the same order.
fn lock_order(
    services: &crate::services::Services,
    mut candidates: Vec<(String, String)>,
) -> Vec<(String, String, Option<OwnedMutexGuard<()>>)> {
    services.host_locks.put_contended_last(&mut candidates);
    let free = candidates
        .iter()
        .enumerate()
        .find_map(|(index, (instance_id, _))| {
            services
                .host_locks
                .of(instance_id)
                .try_lock_owned()
                .ok()
                .map(|guard| (index, guard))
        });
    let mut ordered = Vec::with_capacity(candidates.len());
    if let Some((index, guard)) = free {
        let (instance_id, ip) = candidates.remove(index);
        ordered.push((instance_id, ip, Some(guard)));
    } else if !candidates.is_empty() {
        // Every candidate is busy: queue behind a random one rather than all behind the fullest.
        let offset =
            usize::try_from(Uuid::new_v4().as_u128() % candidates.len() as u128).unwrap_or(0);
        candidates.rotate_left(offset);
    }
    ordered.extend(
        candidates
            .into_iter()
            .map(|(instance_id, ip)| (instance_id, ip, None)),
    );
    ordered
}

/// The image catalog, read once per assign and only when needed, brought up to date first.
async fn current_catalog<'a>(
    state: &Context,
    catalog: &'a mut Option<ImageCatalog>,
) -> Result<&'a ImageCatalog, AssignFailure> {
    if catalog.is_none() {
        let (loaded, _) = state
            .services
            .catalog
            .load_caught_up(CATALOG_ID)
            .await
            .map_err(failure)?;
        *catalog = Some(loaded);
    }
    catalog
        .as_ref()
        .ok_or_else(|| AssignFailure::Store("the image catalog was not loaded".into()))
}

/// Hosts in `region` running `client_commit_hash` with a free slot, fullest first.
async fn candidates(
    state: &Context,
    region: &str,
    client_commit_hash: &str,
) -> Result<Vec<(String, String)>, AssignFailure> {
    whist_projections::fleet_queries::hosts_with_room(
        &state.database,
        region,
        client_commit_hash,
        CANDIDATES,
    )
    .await
    .map(|hosts| {
        hosts
            .into_iter()
            .map(|host| (host.instance_id, host.ip))
            .collect()
    })
    .map_err(|error| {
        crate::telemetry::log_failure("could not read candidate hosts", &error);
        AssignFailure::from(error)
    })
}

/// Whether a refused assign asked for a release some tried region serves (then the answer is that no host has
/// room) or for one no region serves (the client is out of date). The catalog decides first: a hash active or
/// prepared in the region is served, a hash a release replaced is not, even while the read model still shows its
/// hosts (during a swap-over); otherwise the hosts themselves say.
async fn serves_release(
    state: &Context,
    catalog: &mut Option<ImageCatalog>,
    tried: &[(&str, String, bool)],
) -> Result<bool, AssignFailure> {
    for (region, wanted_hash, had_candidates) in tried {
        let current = current_catalog(state, catalog).await?;
        if current.serves(region, wanted_hash) {
            return Ok(true);
        }
        if current.retired_hashes.contains(wanted_hash) {
            continue;
        }
        if *had_candidates || runs_image(state, region, wanted_hash).await? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether any host in `region` that is up or coming up runs `client_commit_hash` (full or not).
async fn runs_image(
    state: &Context,
    region: &str,
    client_commit_hash: &str,
) -> Result<bool, AssignFailure> {
    whist_projections::fleet_queries::runs_image(&state.database, region, client_commit_hash)
        .await
        .map_err(|error| {
            crate::telemetry::log_failure("could not read hosts", &error);
            AssignFailure::from(error)
        })
}

/// The refused request is recorded on its session, for the record; a failure to do so changes nothing else.
async fn record_refused_session(
    state: &Context,
    request: &AssignRequest,
    refusal: Refusal,
    metadata: &EventMetadata,
) {
    let id = session_aggregate_id(&request.user_id, request.session_id);
    let mut unit = Unit::new(metadata);
    let commands = vec![
        session_request(request),
        SessionCommand::Refuse {
            code: refusal.code().to_string(),
            at: Utc::now(),
        },
    ];
    let outcome: Result<(), crate::control::UseCaseError> = match state
        .services
        .sessions
        .stage(&mut unit, &id, commands)
        .await
    {
        Ok(()) => unit.commit(&state.database).await.map_err(Into::into),
        Err(error) => Err(error.into()),
    };
    if let Err(error) = outcome {
        tracing::info!(
            session = id,
            error = %crate::telemetry::Chain(&error),
            "session not updated for this refusal"
        );
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
