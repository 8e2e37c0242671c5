//! Image releases, as the release workflow runs them (`whist images create-buffers | swap-over | rollback`).
//!
//! 1. `create_buffers` records the candidate images of a commit hash in the catalog (protected, inactive), decides
//!    a buffer of hosts on them in every region of the release (the reconciler launches them), and waits until each
//!    region's buffer is `ACTIVE`. A region whose host ends before registering, or a timeout, abandons the release:
//!    it is rolled back and every host it started is retired.
//! 2. `swap_over` switches every region at once (one catalog event), then retires the hosts of older images: those
//!    registered drain (no new mandelbox; they shut down when their last mandelbox ends), those still booting are
//!    terminated. The autoscaler retires them too on its next pass, so a crash between the two steps loses nothing;
//!    whichever records a retirement first names the catalog event that retired the image as its cause.
//! 3. `roll_back` undoes a release that was prepared and not swapped over.
//!
//! Every step is idempotent: the buffer's instance ids derive from the commit hash, the preparation's generation and
//! the region, so a rerun finds the hosts it decided before instead of launching more.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use chrono::Utc;
use cqrs_es::Aggregate;
use uuid::Uuid;
use whist_adapters::store::{CommandError, LoggedEvent};
use whist_adapters::tokens::{fingerprint, Purpose};
use whist_domain::images::{ImageCatalog, ImageCatalogCommand, ImageCatalogError, CATALOG_ID};
use whist_domain::instance::{
    DrainReason, InstanceCommand, InstanceError, InstanceStatus, LaunchSpec, TerminationReason,
};
use whist_domain::scaling::{retirements, Retirement, RetirementStep};
use whist_domain::EventMetadata;
use whist_projections::fleet_queries;

use crate::control::UseCaseError;
use crate::state::Context;

/// The namespace of buffer hosts' instance ids (UUID v5 over `release/{hash}/{generation}/{region}/{index}`).
const BUFFER_NAMESPACE: Uuid = Uuid::from_u128(0x5768_6973_7452_656c_6561_7365_4275_6666);
/// How long a step waits for the `instances` read model to show every decision recorded before it.
const CATCH_UP_WAIT: Duration = Duration::from_secs(30);
/// How often `create_buffers` looks at its hosts.
const POLL: Duration = Duration::from_millis(250);

/// Why a release step failed.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("the image catalog refused: {0}")]
    Refused(#[from] ImageCatalogError),
    #[error("regions not enabled on this deployment (ENABLED_REGIONS): {}", .0.join(", "))]
    RegionsNotEnabled(Vec<String>),
    #[error("the release names no image for enabled regions: {}", .0.join(", "))]
    RegionsMissing(Vec<String>),
    #[error(
        "the instances read model did not catch up with the log within {0:?}: is a `whist serve` or `whist worker` \
         running against this database?"
    )]
    ReadModelBehind(Duration),
    #[error("the buffer failed in {}; the release was rolled back", describe_failures(.0))]
    BuffersFailed(Vec<RegionFailure>),
    #[error("the store failed")]
    Store(#[from] UseCaseError),
}

/// Why one region's buffer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionFailure {
    pub region: String,
    pub reason: String,
}

fn describe_failures(failures: &[RegionFailure]) -> String {
    failures
        .iter()
        .map(|failure| format!("{} ({})", failure.region, failure.reason))
        .collect::<Vec<_>>()
        .join(", ")
}

fn store_error(error: impl Into<UseCaseError>) -> ReleaseError {
    ReleaseError::Store(error.into())
}

/// A release's buffer: per region, the instance ids of its hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buffers {
    pub client_commit_hash: String,
    pub generation: u64,
    /// Region → (image id, instance ids).
    pub regions: BTreeMap<String, (String, Vec<String>)>,
}

/// One region's buffer as `create_buffers` last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionProgress {
    pub region: String,
    pub wanted: usize,
    pub active: usize,
    /// Decided and not yet registered (or not yet in the read model).
    pub booting: usize,
    /// Hosts that ended (or started draining) before the buffer was ready, with their status.
    pub failed: Vec<(String, String)>,
}

impl RegionProgress {
    pub fn is_ready(&self) -> bool {
        self.active >= self.wanted
    }
}

/// What `create_buffers` ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// Every region's buffer is `ACTIVE`.
    Ready(Vec<RegionProgress>),
    /// The commit hash is already the active release: nothing to do.
    AlreadyActive,
}

/// Hosts a step retired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retired {
    pub drained: usize,
    pub terminated: usize,
}

impl std::ops::AddAssign for Retired {
    fn add_assign(&mut self, other: Self) {
        self.drained += other.drained;
        self.terminated += other.terminated;
    }
}

/// What `swap_over` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwappedOver {
    /// False when the release was already active (a rerun).
    pub switched: bool,
    /// Region → the image now active.
    pub images: BTreeMap<String, String>,
    pub retired: Retired,
}

/// Hosts in a region's buffer: enough for the region's warm buffer (`DESIRED_FREE_MANDELBOXES…`), at least one.
pub fn buffer_hosts(state: &Context, region: &str) -> usize {
    let settings = &state.settings;
    let capacity = settings.fleet.host_capacity.max(1);
    let hosts = settings
        .desired_free_mandelboxes_in(region)
        .div_ceil(capacity);
    usize::try_from(hosts.max(1)).unwrap_or(1)
}

/// The instance id of a buffer host.
pub fn buffer_instance_id(
    client_commit_hash: &str,
    generation: u64,
    region: &str,
    index: usize,
) -> String {
    Uuid::new_v5(
        &BUFFER_NAMESPACE,
        format!("release/{client_commit_hash}/{generation}/{region}/{index}").as_bytes(),
    )
    .to_string()
}

async fn catalog(state: &Context) -> Result<ImageCatalog, ReleaseError> {
    let (catalog, _) = state
        .services
        .catalog
        .load_caught_up(CATALOG_ID)
        .await
        .map_err(store_error)?;
    Ok(catalog)
}

async fn execute_catalog(
    state: &Context,
    command: ImageCatalogCommand,
    origin: &EventMetadata,
) -> Result<EventMetadata, ReleaseError> {
    let catalog = &state.services.catalog;
    let (_, before) = catalog
        .load_caught_up(CATALOG_ID)
        .await
        .map_err(store_error)?;
    match catalog
        .execute_retrying(CATALOG_ID, command, &origin.at(Utc::now()))
        .await
    {
        Ok(()) => {}
        Err(CommandError::Rejected(error)) => return Err(ReleaseError::Refused(error)),
        Err(error) => return Err(store_error(error)),
    }
    caused_by_catalog(state, before, origin).await
}

/// `origin`, caused by the catalog's last event when it has one after version `before` (what this command
/// recorded): the decisions a release step takes because of its catalog change name that event as their cause.
async fn caused_by_catalog(
    state: &Context,
    before: usize,
    origin: &EventMetadata,
) -> Result<EventMetadata, ReleaseError> {
    let (_, after) = state
        .services
        .catalog
        .load_caught_up(CATALOG_ID)
        .await
        .map_err(store_error)?;
    if after <= before {
        return Ok(origin.clone());
    }
    let event = state
        .database
        .log()
        .event_at(
            ImageCatalog::TYPE,
            CATALOG_ID,
            i64::try_from(after).unwrap_or(i64::MAX),
        )
        .await
        .map_err(store_error)?;
    Ok(match event {
        Some(event) => origin.caused_by(event.position.to_string(), Utc::now()),
        None => origin.clone(),
    })
}

/// Records the release's candidate images (protected, inactive) and decides its buffer hosts. Rerunning it for the
/// same commit hash and images decides nothing new.
///
/// # Errors
/// The images do not cover exactly the enabled regions, the catalog refused (see [`ImageCatalogError`]), or the
/// store failed.
pub async fn prepare(
    state: &Context,
    client_commit_hash: &str,
    images: &BTreeMap<String, String>,
    origin: &EventMetadata,
) -> Result<Option<Buffers>, ReleaseError> {
    let enabled: BTreeSet<&String> = state.settings.enabled_regions.iter().collect();
    let not_enabled: Vec<String> = images
        .keys()
        .filter(|region| !enabled.contains(region))
        .cloned()
        .collect();
    if !not_enabled.is_empty() {
        return Err(ReleaseError::RegionsNotEnabled(not_enabled));
    }
    let missing: Vec<String> = enabled
        .iter()
        .filter(|region| !images.contains_key(**region))
        .map(|region| (*region).clone())
        .collect();
    if !missing.is_empty() {
        return Err(ReleaseError::RegionsMissing(missing));
    }
    let before = catalog(state).await?;
    if images.iter().all(|(region, image_id)| {
        before.active_in(region).is_some_and(|active| {
            active.image_id == *image_id && active.client_commit_hash == client_commit_hash
        })
    }) {
        return Ok(None);
    }
    let caused = execute_catalog(
        state,
        ImageCatalogCommand::Prepare {
            client_commit_hash: client_commit_hash.to_string(),
            images: images.clone(),
            at: Utc::now(),
        },
        origin,
    )
    .await?;
    let after = catalog(state).await?;
    let Some(prepared) = after.prepared.get(client_commit_hash) else {
        return Err(store_error(UseCaseError::Store(
            "the catalog does not show the release it just prepared".into(),
        )));
    };
    let mut buffers = Buffers {
        client_commit_hash: client_commit_hash.to_string(),
        generation: prepared.generation,
        regions: BTreeMap::new(),
    };
    for (region, image_id) in &prepared.images {
        let ids = (0..buffer_hosts(state, region))
            .map(|index| buffer_instance_id(client_commit_hash, prepared.generation, region, index))
            .collect::<Vec<_>>();
        buffers
            .regions
            .insert(region.clone(), (image_id.clone(), ids));
    }
    launch_buffers(state, &buffers, &caused).await?;
    Ok(Some(buffers))
}

/// Decides the launch of every buffer host not decided yet.
async fn launch_buffers(
    state: &Context,
    buffers: &Buffers,
    metadata: &EventMetadata,
) -> Result<usize, ReleaseError> {
    let services = &state.services;
    let mut launched = 0;
    for (region, (image_id, ids)) in &buffers.regions {
        for instance_id in ids {
            let bootstrap = services.tokens.derive(Purpose::Bootstrap, instance_id);
            let command = InstanceCommand::RequestLaunch {
                spec: LaunchSpec {
                    region: region.clone(),
                    image_id: image_id.clone(),
                    client_commit_hash: buffers.client_commit_hash.clone(),
                    instance_type: state.settings.instance_type.clone(),
                },
                bootstrap_token_hash: fingerprint(&bootstrap),
                reason: whist_domain::instance::LaunchReason::ReleaseBuffer,
                at: Utc::now(),
            };
            match services
                .instances
                .execute_retrying(instance_id, command, &metadata.at(Utc::now()))
                .await
            {
                Ok(()) => {
                    tracing::info!(
                        region,
                        instance_id,
                        image_id,
                        client_commit_hash = buffers.client_commit_hash,
                        "launching a release's buffer host"
                    );
                    launched += 1;
                }
                Err(CommandError::Rejected(InstanceError::AlreadyExists)) => {}
                Err(error) => return Err(store_error(error)),
            }
        }
    }
    Ok(launched)
}

/// Each region's buffer as the `instances` read model shows it.
///
/// # Errors
/// The read model could not be read.
pub async fn progress(
    state: &Context,
    buffers: &Buffers,
) -> Result<Vec<RegionProgress>, ReleaseError> {
    let mut regions = Vec::with_capacity(buffers.regions.len());
    for (region, (image_id, ids)) in &buffers.regions {
        let statuses: BTreeMap<String, String> =
            fleet_queries::image_host_statuses(&state.database, region, image_id)
                .await
                .map_err(store_error)?
                .into_iter()
                .map(|host| (host.instance_id, host.status))
                .collect();
        let mut progress = RegionProgress {
            region: region.clone(),
            wanted: ids.len(),
            active: 0,
            booting: 0,
            failed: Vec::new(),
        };
        for instance_id in ids {
            match statuses.get(instance_id).map(String::as_str) {
                None | Some("PRE_CONNECTION") => progress.booting += 1,
                Some("ACTIVE") => progress.active += 1,
                // Registered and then silent: not ready, and it may come back.
                Some("UNRESPONSIVE") => progress.booting += 1,
                Some(other) => progress
                    .failed
                    .push((instance_id.clone(), other.to_string())),
            }
        }
        regions.push(progress);
    }
    Ok(regions)
}

/// Release phase 1: prepares the release, waits (up to `timeout`) for every region's buffer to be `ACTIVE`, calling
/// `report` whenever the picture changes. On a failed region or the timeout, rolls the release back (its hosts
/// retired) and names the regions.
///
/// # Errors
/// See [`ReleaseError`]; on `BuffersFailed` the rollback has been recorded.
pub async fn create_buffers(
    state: &Context,
    client_commit_hash: &str,
    images: &BTreeMap<String, String>,
    timeout: Duration,
    report: &mut (dyn FnMut(&[RegionProgress]) + Send),
    origin: &EventMetadata,
) -> Result<Prepared, ReleaseError> {
    let Some(buffers) = prepare(state, client_commit_hash, images, origin).await? else {
        return Ok(Prepared::AlreadyActive);
    };
    let deadline = Instant::now() + timeout;
    let mut last: Option<Vec<RegionProgress>> = None;
    loop {
        let regions = progress(state, &buffers).await?;
        if last.as_ref() != Some(&regions) {
            report(&regions);
            last = Some(regions.clone());
        }
        let mut failures: Vec<RegionFailure> = regions
            .iter()
            .filter(|region| !region.failed.is_empty())
            .map(|region| RegionFailure {
                region: region.region.clone(),
                reason: format!(
                    "{} host(s) ended before the buffer was ready: {}",
                    region.failed.len(),
                    region
                        .failed
                        .iter()
                        .map(|(id, status)| format!("{id} {status}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
            .collect();
        if failures.is_empty() && regions.iter().all(RegionProgress::is_ready) {
            return Ok(Prepared::Ready(regions));
        }
        if failures.is_empty() && Instant::now() >= deadline {
            failures = regions
                .iter()
                .filter(|region| !region.is_ready())
                .map(|region| RegionFailure {
                    region: region.region.clone(),
                    reason: format!(
                        "{}/{} hosts ACTIVE after {timeout:?}",
                        region.active, region.wanted
                    ),
                })
                .collect();
        }
        if !failures.is_empty() {
            tracing::warn!(
                client_commit_hash,
                failures = describe_failures(&failures),
                "a release's buffer failed; rolling it back"
            );
            abandon(state, &buffers, origin).await?;
            return Err(ReleaseError::BuffersFailed(failures));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Rolls a failed preparation back and retires every host it decided, by id (the read model may not show them
/// all yet).
async fn abandon(
    state: &Context,
    buffers: &Buffers,
    origin: &EventMetadata,
) -> Result<Retired, ReleaseError> {
    execute_catalog(
        state,
        ImageCatalogCommand::RollBack {
            client_commit_hash: buffers.client_commit_hash.clone(),
            at: Utc::now(),
        },
        origin,
    )
    .await?;
    let mut retired = Retired::default();
    for (region, (image_id, ids)) in &buffers.regions {
        let mut plan = Vec::with_capacity(ids.len());
        for instance_id in ids {
            let (instance, _) = state
                .services
                .instances
                .load_caught_up(instance_id)
                .await
                .map_err(store_error)?;
            let step = match instance.status {
                Some(InstanceStatus::PreConnection) => RetirementStep::Terminate,
                Some(InstanceStatus::Active | InstanceStatus::Unresponsive) => {
                    RetirementStep::Drain
                }
                _ => continue,
            };
            plan.push(Retirement::new(instance_id, image_id, step));
        }
        retired += record_retirements(state, origin, region, &plan)
            .await
            .map_err(ReleaseError::Store)?;
    }
    Ok(retired)
}

/// Release phase 2: makes the prepared release active in every region at once, then retires the hosts of older
/// images. A rerun after the switch only retires what is left.
///
/// # Errors
/// The release was not prepared, some region has no `ACTIVE` host of it, or the store failed.
pub async fn swap_over(
    state: &Context,
    client_commit_hash: &str,
    origin: &EventMetadata,
) -> Result<SwappedOver, ReleaseError> {
    let before = catalog(state).await?;
    let mut switched = false;
    if let Some(prepared) = before.prepared.get(client_commit_hash) {
        let mut ready_regions = BTreeSet::new();
        for (region, image_id) in &prepared.images {
            let active = fleet_queries::active_hosts_of_image(&state.database, region, image_id)
                .await
                .map_err(store_error)?;
            if active > 0 {
                ready_regions.insert(region.clone());
            }
        }
        execute_catalog(
            state,
            ImageCatalogCommand::SwapOver {
                client_commit_hash: client_commit_hash.to_string(),
                ready_regions,
                at: Utc::now(),
            },
            origin,
        )
        .await?;
        switched = true;
        tracing::info!(client_commit_hash, images = ?prepared.images, "release swapped over");
    } else if !before
        .active
        .values()
        .any(|image| image.client_commit_hash == client_commit_hash)
    {
        return Err(ReleaseError::Refused(ImageCatalogError::NotPrepared(
            client_commit_hash.to_string(),
        )));
    }
    let after = catalog(state).await?;
    let images: BTreeMap<String, String> = after
        .active
        .iter()
        .filter(|(_, image)| image.client_commit_hash == client_commit_hash)
        .map(|(region, image)| (region.clone(), image.image_id.clone()))
        .collect();
    let regions: Vec<String> = images.keys().cloned().collect();
    // Each retirement continues the chain of the catalog event that retired the host's image, a rerun's too.
    let retired = retire_old_hosts(state, &regions, origin).await?;
    Ok(SwappedOver {
        switched,
        images,
        retired,
    })
}

/// Undoes phase 1 of a release that was not swapped over: the release is rolled back and its hosts retired.
///
/// # Errors
/// The release is the active one (refused), or the store failed.
pub async fn roll_back(
    state: &Context,
    client_commit_hash: &str,
    origin: &EventMetadata,
) -> Result<Retired, ReleaseError> {
    let before = catalog(state).await?;
    execute_catalog(
        state,
        ImageCatalogCommand::RollBack {
            client_commit_hash: client_commit_hash.to_string(),
            at: Utc::now(),
        },
        origin,
    )
    .await?;
    let regions: Vec<String> = match before.prepared.get(client_commit_hash) {
        Some(prepared) => prepared.images.keys().cloned().collect(),
        // Already rolled back (a rerun): retire whatever is left anywhere.
        None => state.settings.enabled_regions.clone(),
    };
    retire_old_hosts(state, &regions, origin).await
}

/// Waits until the `instances` read model has applied every event sequenced before the call; whether it did within
/// `wait`.
///
/// # Errors
/// The store could not be read.
pub async fn instances_caught_up(state: &Context, wait: Duration) -> Result<bool, UseCaseError> {
    let head = state.database.log().head().await?;
    let deadline = Instant::now() + wait;
    loop {
        let position = whist_projections::checkpoint_position(&state.database, "instances").await?;
        if position.unwrap_or(0) >= head {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Retires, in `regions`, every host on an image that is neither active nor protected (from the read model, once
/// it has caught up).
///
/// # Errors
/// The read model stayed behind, or the store failed.
pub async fn retire_old_hosts(
    state: &Context,
    regions: &[String],
    metadata: &EventMetadata,
) -> Result<Retired, ReleaseError> {
    if !instances_caught_up(state, CATCH_UP_WAIT)
        .await
        .map_err(ReleaseError::Store)?
    {
        return Err(ReleaseError::ReadModelBehind(CATCH_UP_WAIT));
    }
    let catalog = catalog(state).await?;
    let protected = catalog.protected_images();
    let mut retired = Retired::default();
    for region in regions {
        let Some(active) = catalog.active_in(region) else {
            continue;
        };
        let hosts = crate::workers::autoscaler::read_region(&state.database, region)
            .await
            .map_err(store_error)?;
        let plan = retirements(&hosts, &active.image_id, &protected);
        retired += record_retirements(state, metadata, region, &plan)
            .await
            .map_err(ReleaseError::Store)?;
    }
    Ok(retired)
}

/// Records retirements of hosts in `region`: a registered host drains, a booting one is terminated. A host that
/// changed meanwhile (it registered, or is already ending) is retired the way its new state calls for, or left
/// alone. Each is `origin`'s decision (its actor) continuing the chain of the catalog event that retired the host's
/// image there, caused by it (see [`whist_domain::images::retirement_causes`]): whoever gets there first, the release
/// workflow or the autoscaler, records the same cause in the release's chain. A host whose image no catalog event
/// retired there is retired in `origin`'s own chain.
///
/// # Errors
/// The store failed.
pub async fn record_retirements(
    state: &Context,
    origin: &EventMetadata,
    region: &str,
    retirements: &[Retirement],
) -> Result<Retired, UseCaseError> {
    if retirements.is_empty() {
        return Ok(Retired::default());
    }
    let causes = retirement_causes(state).await?;
    let mut retired = Retired::default();
    for retirement in retirements {
        let Retirement {
            instance_id,
            image_id,
            step,
        } = retirement;
        let cause = causes.get(&(region.to_string(), image_id.clone()));
        let metadata = || match cause {
            Some(event) => crate::control::continuing_from(event, &origin.at(Utc::now())),
            None => Ok(origin.at(Utc::now())),
        };
        let first = match step {
            RetirementStep::Drain => drain_command(),
            RetirementStep::Terminate => terminate_command(),
        };
        let mut outcome = state
            .services
            .instances
            .execute_retrying(instance_id, first.clone(), &metadata()?)
            .await;
        // A booting host that registered since the read drains instead.
        if matches!(
            outcome,
            Err(CommandError::Rejected(InstanceError::InvalidTransition))
        ) && matches!(first, InstanceCommand::Terminate { .. })
        {
            outcome = state
                .services
                .instances
                .execute_retrying(instance_id, drain_command(), &metadata()?)
                .await;
            if outcome.is_ok() {
                retired.drained += 1;
                tracing::info!(instance_id, "draining a host of a retired image");
                continue;
            }
        }
        match outcome {
            Ok(()) => {
                match first {
                    InstanceCommand::Terminate { .. } => retired.terminated += 1,
                    _ => retired.drained += 1,
                }
                tracing::info!(
                    instance_id,
                    ?retirement,
                    "retiring a host of a retired image"
                );
            }
            Err(CommandError::Rejected(error)) => {
                tracing::info!(instance_id, error = %error, "host not retired: it changed meanwhile");
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(retired)
}

/// (region, image id) → the catalog event that retired the image there, from the catalog's history (up to its first
/// event not yet sequenced, should a commit be in flight).
///
/// # Errors
/// The store failed, or a catalog event is unreadable.
async fn retirement_causes(
    state: &Context,
) -> Result<BTreeMap<(String, String), LoggedEvent>, UseCaseError> {
    let logged: Vec<LoggedEvent> =
        crate::control::audit::aggregate_events(&state.database, ImageCatalog::TYPE, CATALOG_ID)
            .await
            .map_err(|error| UseCaseError::Store(Box::new(error)))?
            .into_iter()
            .map_while(|(event, position, _)| position.map(|_| event))
            .collect();
    let mut events = Vec::with_capacity(logged.len());
    for event in &logged {
        events.push(
            event
                .payload_as()
                .map_err(|error| UseCaseError::Store(Box::new(error)))?,
        );
    }
    Ok(whist_domain::images::retirement_causes(events)
        .into_iter()
        .filter_map(|(key, index)| Some((key, logged.get(index)?.clone())))
        .collect())
}

fn drain_command() -> InstanceCommand {
    InstanceCommand::Drain {
        reason: DrainReason::ImageRetired,
        at: Utc::now(),
    }
}

fn terminate_command() -> InstanceCommand {
    InstanceCommand::Terminate {
        reason: TerminationReason::ImageRetired,
        at: Utc::now(),
    }
}
