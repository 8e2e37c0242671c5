//! Assigning a mandelbox: the product's main path.
//!
//! The rule is [`whist_domain::decisions::assign`]: the user reserves one of their `MANDELBOX_LIMIT_PER_USER` live
//! mandelboxes, a host with room takes the slot, and the mandelbox and its session are recorded, all in one unit
//! (one append under optimistic concurrency on every aggregate involved), or none of it. This use case loads the
//! states, asks the decision, stages its parts and retries ([`super::record_unit_or_learn`]). Candidates come from
//! the `instances` read model, fullest first; a stale read costs a refusal and the next candidate, or a conflict
//! and another attempt on fresh state, never a double allocation.
//!
//! Starting the mandelbox on its host is the reconciler's job, after these are recorded, never this request's.

use std::collections::HashMap;
use std::time::Instant;

use chrono::Utc;
use tokio::sync::{OnceCell, OwnedMutexGuard};
use uuid::Uuid;
use whist_adapters::config::Environment;
use whist_adapters::store::Unit;
use whist_adapters::tokens::{fingerprint, Purpose};
use whist_domain::assign_key::{AssignKeyCommand, KeyedAnswer};
use whist_domain::decide::Decide;
use whist_domain::decisions::assign::{AssignRefusal, Assignment, Location, PlacementRefusal};
use whist_domain::images::{ImageCatalog, CATALOG_ID};
use whist_domain::instance::InstanceError;
use whist_domain::session::session_aggregate_id;
use whist_domain::EventMetadata;

use super::{record_unit_or_learn, Attempt, UseCaseError};
use crate::state::Context;
use crate::{final_on, stage_parts};

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
    /// The client's `Idempotency-Key`: a retry with the same key within the window gets the first answer.
    pub idempotency_key: Option<String>,
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
    // Time-ordered (UUIDv7, still 74 random bits): a new mandelbox's events join the primary key of `events` at its
    // end instead of at a random place.
    let mandelbox_id = Uuid::now_v7().to_string();
    tracing::Span::current().record("mandelbox_id", mandelbox_id.as_str());
    let secret = state
        .services
        .tokens
        .derive(Purpose::Protocol, &mandelbox_id);
    let assignment = Assignment {
        mandelbox_id,
        user_id: request.user_id.clone(),
        session_id: request.session_id,
        regions: request.regions.clone(),
        client_commit_hash: request.client_commit_hash.clone(),
        app_name: request.app_name.clone(),
        limit: settings.mandelbox_limit_per_user,
        protocol_secret_hash: fingerprint(&secret),
        at: Utc::now(),
    };
    let catalog = OnceCell::new();
    // One aggregate per user and key; its id holds neither in the clear.
    let key = request
        .idempotency_key
        .as_ref()
        .map(|key| fingerprint(&format!("{}\n{key}", request.user_id)));
    let (assignment, regions, catalog, key) = (&assignment, &regions, &catalog, key.as_deref());
    let mut attempts = 0u32;
    // The user's lock in this process, around every attempt and its record (before any host's lock).
    let user_guard = state.services.user_locks.lock(&assignment.user_id).await;
    let answer = record_unit_or_learn(
        state,
        metadata,
        UNIT_ATTEMPTS,
        |unit| {
            attempts += 1;
            if attempts == 2 {
                metrics::counter!("whist_assigns_retried_total").increment(1);
            }
            attempt(state, unit, assignment, regions, catalog, key)
        },
        // Most often another process took a slot on the same host: this process tries other hosts first for a
        // while (the next attempt included).
        |(_, host)| {
            if let Some(host) = host {
                phase("commit", host.staged_at);
                state.services.host_locks.mark_contended(&host.instance_id);
            }
            metrics::counter!("whist_assign_conflicts_total").increment(1);
        },
    )
    .await;
    drop(user_guard);
    if let Ok((_, Some(host))) = &answer {
        phase("commit", host.staged_at);
    }
    match answer {
        Ok((Err(refusal @ (Refusal::NoInstanceAvailable | Refusal::CommitHashMismatch)), _)) => {
            record_refused_session(state, assignment, refusal, metadata).await;
            Ok(Err(refusal))
        }
        Ok((outcome, _)) => Ok(outcome),
        Err(error) => {
            crate::telemetry::log_failure("assign failed", &error);
            Err(error)
        }
    }
}

/// The host an attempt staged its slot on, held locked in this process until the unit is recorded.
struct Host {
    instance_id: String,
    _lock: OwnedMutexGuard<()>,
    /// When the unit was staged: the commit phase runs from here.
    staged_at: Instant,
}

/// One attempt: load the states, decide ([`Assignment`]), stage every part in one unit, to be recorded at once.
async fn attempt(
    state: &Context,
    mut unit: Unit,
    assignment: &Assignment,
    regions: &[&String],
    catalog: &OnceCell<ImageCatalog>,
    key: Option<&str>,
) -> Result<Attempt<(Result<Assigned, Refusal>, Option<Host>)>, AssignFailure> {
    let services = &state.services;
    let started = Instant::now();

    // 0. The idempotency key, before any other decision: an answer that stands is the answer. A key this process
    // does not remember is presumed new without a read; if another process answered it, this unit collides on
    // it and the next attempt reads that answer.
    let key = match key {
        Some(key_id) => {
            let key = services
                .assign_keys
                .load_to_decide_new(&unit, key_id)
                .await?;
            if let Some(answer) = key.state().standing(assignment.at) {
                let assigned = Assigned {
                    mandelbox_id: answer.mandelbox_id.clone(),
                    ip: answer.ip.clone(),
                    region: answer.region.clone(),
                };
                metrics::counter!("whist_assign_replays_total").increment(1);
                return Ok(Attempt::Settled((Ok(assigned), None)));
            }
            Some(key)
        }
        None => None,
    };

    // 1. The user's own limit.
    let user = services
        .users
        .load_to_decide(&unit, &assignment.user_id)
        .await?;
    let reserved = match assignment.reserve(user.state()) {
        Ok(reserved) => reserved,
        Err(AssignRefusal::UserAtLimit) if !final_on!((services.users, &user)) => {
            return Ok(Attempt::Again)
        }
        Err(AssignRefusal::UserAtLimit) => {
            return Ok(Attempt::Settled((Err(Refusal::UserAlreadyActive), None)))
        }
    };
    phase("user", started);

    // 2. A slot, region by region in the order asked. The mandelbox id was generated for this assign, and a
    // desktop app names a new session for each: both are decided on as new without a read (a wrong presumption
    // costs this unit a conflict and another attempt).
    let mandelbox = services
        .mandelboxes
        .load_to_decide_new(&unit, &assignment.mandelbox_id)
        .await?;
    let session_id = session_aggregate_id(&assignment.user_id, assignment.session_id);
    let session = services
        .sessions
        .load_to_decide_new(&unit, &session_id)
        .await?;
    // Per region tried: the commit hash wanted there and whether the read model showed hosts of it with room.
    let mut tried: Vec<(&str, String, bool)> = Vec::new();
    for region in regions {
        let Some(wanted_hash) = wanted_hash(state, assignment, region, catalog).await? else {
            continue;
        };
        // Candidates come from the read model, which may be a little behind: a host it shows with room may be
        // full (refused on the host's own state), or taken by a concurrent assign (the unit conflicts). First the
        // hosts it gave this process last (`CandidateHints`, at most `HINTS_FOR` ago), then, when none of them
        // takes the mandelbox, the read model read now. On both, a host that refuses on this process's copy is
        // passed over without a read: passing over a host is not the answer. Only when none took the mandelbox are
        // the hosts the read model's candidates passed over read fresh, all together, and tried again: a refusal
        // on fresh state is final.
        let mut showed_room = false;
        let mut passed_over: Vec<(String, String)> = Vec::new();
        for pass in [Pass::Hints, Pass::Fresh, Pass::Recheck] {
            let read = Instant::now();
            let (candidates, mut read_now) = if pass == Pass::Recheck {
                if passed_over.is_empty() {
                    continue;
                }
                let ids: Vec<String> = passed_over.iter().map(|(id, _)| id.clone()).collect();
                let hosts = services
                    .instances
                    .load_to_decide_caught_up_many(&ids)
                    .await?;
                phase("recheck", read);
                let hosts: HashMap<String, _> = hosts
                    .into_iter()
                    .map(|host| (host.id().to_string(), host))
                    .collect();
                (std::mem::take(&mut passed_over), hosts)
            } else {
                let Some(candidates) = candidates(state, region, &wanted_hash, pass).await? else {
                    continue;
                };
                phase("candidates", read);
                // What the read model shows now is what the answer goes by (the fresh pass runs after the hints).
                showed_room = !candidates.is_empty();
                (candidates.to_vec(), HashMap::new())
            };
            tracing::debug!(
                region = region.as_str(),
                candidates = candidates.len(),
                ?pass,
                "candidates read"
            );
            for (instance_id, ip, guard) in lock_order(services, candidates) {
                let lock = match guard {
                    Some(guard) => guard,
                    None => {
                        let waited = Instant::now();
                        let guard = services.host_locks.of(&instance_id).lock_owned().await;
                        phase("host_lock", waited);
                        guard
                    }
                };
                let location = Location { region, ip: &ip };
                let mut host = services
                    .instances
                    .load_to_decide(&unit, &instance_id)
                    .await?;
                // The host as read for the recheck, unless this process recorded on it since (under its lock).
                if let Some(read) = read_now.remove(&instance_id) {
                    if read.version() >= host.version() {
                        host = read;
                    }
                }
                let placed = loop {
                    match reserved.place(
                        host.state(),
                        &instance_id,
                        location,
                        mandelbox.state(),
                        session.state(),
                    ) {
                        // A host's refusal is only final on its fresh state, which only the recheck waits for.
                        Err(PlacementRefusal::Host(_))
                            if pass == Pass::Recheck && !final_on!((services.instances, &host)) =>
                        {
                            host = services
                                .instances
                                .load_to_decide(&unit, &instance_id)
                                .await?;
                        }
                        placed => break placed,
                    }
                };
                let placed = match placed {
                    Ok(placed) => placed,
                    Err(PlacementRefusal::Host(refusal)) => {
                        if pass == Pass::Fresh && !host.decides_finally() {
                            passed_over.push((instance_id, ip));
                        } else if matches!(
                            refusal,
                            InstanceError::AtCapacity | InstanceError::NotAcceptingMandelboxes
                        ) {
                            tracing::debug!(instance_id, %refusal, "a candidate from the read model refused the slot");
                        } else {
                            tracing::warn!(instance_id, error = %refusal, "candidate refused the allocation");
                        }
                        continue;
                    }
                    Err(PlacementRefusal::Mandelbox(_))
                        if !final_on!((services.mandelboxes, &mandelbox)) =>
                    {
                        return Ok(Attempt::Again);
                    }
                    Err(refusal @ PlacementRefusal::Mandelbox(_)) => {
                        return Err(UseCaseError::Refused(Box::new(refusal)));
                    }
                };
                // 3. The mandelbox and its session, recorded with the reservations above.
                let staged = stage_parts!(
                    &mut unit,
                    (services.users, user, placed.user),
                    (services.instances, host, placed.instance),
                    (services.mandelboxes, mandelbox, placed.mandelbox),
                    (services.sessions, session, placed.session),
                );
                if !staged {
                    return Ok(Attempt::Again);
                }
                let assigned = Assigned {
                    mandelbox_id: assignment.mandelbox_id.clone(),
                    ip,
                    region: region.to_string(),
                };
                // 4. The key's answer, in the same unit: a second assign with the key collides here.
                if let Some(key) = key {
                    let answer = AssignKeyCommand::Answer {
                        answer: KeyedAnswer {
                            mandelbox_id: assigned.mandelbox_id.clone(),
                            ip: assigned.ip.clone(),
                            region: assigned.region.clone(),
                            at: assignment.at,
                        },
                    };
                    let events = key
                        .state()
                        .decide(answer)
                        .map_err(|refusal| UseCaseError::Refused(Box::new(refusal)))?;
                    services.assign_keys.stage_events(&mut unit, key, events)?;
                }
                let host = Host {
                    instance_id,
                    _lock: lock,
                    staged_at: Instant::now(),
                };
                return Ok(Attempt::Record(unit, (Ok(assigned), Some(host))));
            }
        }
        tried.push((region.as_str(), wanted_hash, showed_room));
    }
    let refusal = if serves_release(state, catalog, &tried).await? {
        Refusal::NoInstanceAvailable
    } else {
        Refusal::CommitHashMismatch
    };
    Ok(Attempt::Settled((Err(refusal), None)))
}

/// The commit hash an assign wants in `region`: the client's, or in `local` and `dev` for [`LOCAL_DEV_HASH`]
/// the one the region runs (`None` when it runs none).
async fn wanted_hash(
    state: &Context,
    assignment: &Assignment,
    region: &str,
    catalog: &OnceCell<ImageCatalog>,
) -> Result<Option<String>, AssignFailure> {
    let local = matches!(
        state.settings.environment,
        Environment::Local | Environment::Dev
    );
    if assignment.client_commit_hash != LOCAL_DEV_HASH || !local {
        return Ok(Some(assignment.client_commit_hash.clone()));
    }
    Ok(current_catalog(state, catalog)
        .await?
        .active_in(region)
        .map(|image| image.client_commit_hash.clone()))
}

/// Whether maintenance mode is on. Read as of the log, and when that says on, read caught up, since a refusal is
/// only final on fresh state (`AggregateStore::load_as_of_log_unless`): a switch turned off by any process counts
/// for the very next assign, one turned on counts in every process within `FOLLOW_LAG_BOUND` (250 ms).
///
/// # Errors
/// The store failed.
pub async fn in_maintenance(state: &Context) -> Result<bool, AssignFailure> {
    state
        .services
        .service
        .load_as_of_log_unless(whist_domain::service::SERVICE_ID, |switch| {
            switch.maintenance
        })
        .await
        .map(|(switch, _)| switch.maintenance)
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

/// The candidates in the order to try them: this process's own hosts first (`Members`, so that processes fill
/// different hosts; the others' hosts only once its own are tried), and among them first the fullest host no
/// other request of this process is allocating on right now, with its lock already held (concurrent assigns
/// spread instead of queueing), then the others in order (from a random one when none is free), whose locks are
/// taken when their turn comes. Hosts on which this process recently lost to another writer come after the rest
/// of their part, in the same order.
fn lock_order(
    services: &crate::services::Services,
    mut candidates: Vec<(String, String)>,
) -> Vec<(String, String, Option<OwnedMutexGuard<()>>)> {
    let own = services.members.put_own_first(&mut candidates);
    // While this process has hosts of its own with room, it keeps to them: a busy one of its own is worth waiting
    // for, where another process's host would cost a catch-up read and likely a conflict with its owner.
    let first = if own > 0 { own } else { candidates.len() };
    let (preferred, rest) = candidates.split_at_mut(first);
    services.host_locks.put_contended_last(preferred);
    services.host_locks.put_contended_last(rest);
    let free = preferred
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
    } else if first > 0 {
        // Every preferred candidate is busy: queue behind a random one rather than all behind the fullest.
        let offset = usize::try_from(Uuid::new_v4().as_u128() % first as u128).unwrap_or(0);
        candidates[..first].rotate_left(offset);
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
    catalog: &'a OnceCell<ImageCatalog>,
) -> Result<&'a ImageCatalog, AssignFailure> {
    catalog
        .get_or_try_init(|| async {
            state
                .services
                .catalog
                .load_caught_up(CATALOG_ID)
                .await
                .map(|(catalog, _)| catalog)
                .map_err(AssignFailure::from)
        })
        .await
}

/// Where an attempt's candidates come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// The hosts the read model gave this process last, if at most `HINTS_FOR` ago.
    Hints,
    /// The read model, read now (and kept as the next hints).
    Fresh,
    /// The hosts `Fresh` passed over on copies that may be behind, read fresh together.
    Recheck,
}

/// The candidates of `pass` (`Hints` or `Fresh`), hosts in `region` running `client_commit_hash` with a free
/// slot, fullest first: `None` when there are no hints to try.
async fn candidates(
    state: &Context,
    region: &str,
    client_commit_hash: &str,
    pass: Pass,
) -> Result<Option<std::sync::Arc<Vec<(String, String)>>>, AssignFailure> {
    let hints = &state.services.candidate_hints;
    if pass == Pass::Hints {
        return Ok(hints.recent(region, client_commit_hash));
    }
    let hosts = whist_projections::fleet_queries::hosts_with_room(
        &state.database,
        region,
        client_commit_hash,
        CANDIDATES,
    )
    .await
    .map_err(|error| {
        crate::telemetry::log_failure("could not read candidate hosts", &error);
        AssignFailure::from(error)
    })?;
    let hosts = std::sync::Arc::new(
        hosts
            .into_iter()
            .map(|host| (host.instance_id, host.ip))
            .collect::<Vec<_>>(),
    );
    hints.keep(region, client_commit_hash, hosts.clone());
    Ok(Some(hosts))
}

/// Whether a refused assign asked for a release some tried region serves (then the answer is that no host has
/// room) or for one no region serves (the client is out of date). The catalog decides first: a hash active or
/// prepared in the region is served, a hash a release replaced is not, even while the read model still shows its
/// hosts (during a swap-over); otherwise the hosts themselves say.
async fn serves_release(
    state: &Context,
    catalog: &OnceCell<ImageCatalog>,
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
/// The desktop app names a new session for each assign, so the session is presumed new without a read, as in the
/// assign's own attempts; a wrong presumption (a session id sent again) costs a conflict and another attempt on the
/// session read whole.
async fn record_refused_session(
    state: &Context,
    assignment: &Assignment,
    refusal: Refusal,
    metadata: &EventMetadata,
) {
    let sessions = &state.services.sessions;
    let id = session_aggregate_id(&assignment.user_id, assignment.session_id);
    let outcome = super::record_unit(state, metadata, UNIT_ATTEMPTS, |mut unit| {
        let id = &id;
        async move {
            let session = sessions.load_to_decide_new(&unit, id).await?;
            let events = assignment.refused_session(session.state(), refusal.code());
            if !sessions.stage_events(&mut unit, session, events)? {
                return Ok(Attempt::Again);
            }
            Ok(Attempt::Record(unit, ()))
        }
    })
    .await;
    if let Err(error) = outcome {
        tracing::info!(
            session = id,
            error = %crate::telemetry::Chain(&error),
            "session not updated for this refusal"
        );
    }
}
