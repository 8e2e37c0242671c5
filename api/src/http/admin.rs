//! Developers' and auditors' endpoints (scope `admin`): the fleet's hosts and mandelboxes and the image catalog,
//! straight from their read models; the global log, one aggregate's history and its replayed state; projections.

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::types::Example;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use whist_projections::catalog::RegionImageRow;
use whist_projections::fleet_queries::{self, InstanceRow, MandelboxRow, StatusCount};

use crate::control::audit::{self, AuditError, EventRecord, ReplayUntil, ReplayedState};
use crate::control::operator::HostAction;
use crate::http::error::{error_body, unavailable, ErrorBody};
use crate::http::middleware::RequestId;
use crate::http::security::AdminAuth;
use crate::state::AppState;
use whist_domain::{Actor, EventMetadata};

#[derive(Tags)]
enum AdminTag {
    /// For developers: a bearer token with scope `admin`.
    Admin,
}

/// A host, as `GET /admin/instances` lists it.
#[derive(Debug, Object)]
pub struct AdminInstance {
    pub instance_id: String,
    /// The EC2 instance id; null before the launch is recorded.
    #[oai(nullable)]
    pub cloud_instance_id: Option<String>,
    pub region: String,
    pub image_id: String,
    pub client_commit_hash: String,
    pub instance_type: String,
    #[oai(nullable)]
    pub ip: Option<String>,
    /// PRE_CONNECTION, ACTIVE, DRAINING, UNRESPONSIVE, TERMINATING or TERMINATED.
    pub status: String,
    pub mandelbox_capacity: i64,
    pub live_mandelboxes: i64,
    pub launched_at: String,
    pub updated_at: String,
}

/// A mandelbox, as `GET /admin/mandelboxes` lists it.
#[derive(Debug, Object)]
pub struct AdminMandelbox {
    pub mandelbox_id: String,
    pub instance_id: String,
    pub user_id: String,
    pub session_id: i64,
    pub region: String,
    pub ip: String,
    /// ALLOCATED, CONNECTING, RUNNING, DYING or DEAD.
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
}

/// One region's image of one release, as `GET /admin/images` lists it.
#[derive(Debug, Object)]
pub struct AdminImage {
    pub region: String,
    pub client_commit_hash: String,
    pub image_id: String,
    /// PREPARED (a release's candidate, protected, not yet serving), ACTIVE, RETIRED or ROLLED_BACK.
    pub status: String,
    /// The preparation that recorded a candidate (null for an image activated without one).
    #[oai(nullable)]
    pub generation: Option<i64>,
    /// The log position of the event that last changed this row.
    pub position: i64,
    pub updated_at: String,
}

#[derive(ApiResponse)]
pub enum ListResponse<T: poem_openapi::types::ToJSON + Send + Sync> {
    #[oai(status = 200)]
    Listed(Json<Vec<T>>),
    /// The read model could not be read.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

fn list_unavailable<T: poem_openapi::types::ToJSON + Send + Sync>(
    error: &sqlx::Error,
) -> ListResponse<T> {
    ListResponse::Unavailable(unavailable("could not read a read model", error))
}

impl From<InstanceRow> for AdminInstance {
    fn from(row: InstanceRow) -> Self {
        Self {
            instance_id: row.instance_id,
            cloud_instance_id: row.cloud_instance_id,
            region: row.region,
            image_id: row.image_id,
            client_commit_hash: row.client_commit_hash,
            instance_type: row.instance_type,
            ip: row.ip,
            status: row.status,
            mandelbox_capacity: row.mandelbox_capacity,
            live_mandelboxes: row.live_mandelboxes,
            launched_at: row.launched_at,
            updated_at: row.updated_at,
        }
    }
}

impl From<MandelboxRow> for AdminMandelbox {
    fn from(row: MandelboxRow) -> Self {
        Self {
            mandelbox_id: row.mandelbox_id,
            instance_id: row.instance_id,
            user_id: row.user_id,
            session_id: row.session_id,
            region: row.region,
            ip: row.ip,
            status: row.status,
            created_at: row.created_at,
            updated_at: row.updated_at,
        }
    }
}

impl From<RegionImageRow> for AdminImage {
    fn from(row: RegionImageRow) -> Self {
        Self {
            region: row.region,
            client_commit_hash: row.client_commit_hash,
            image_id: row.image_id,
            status: row.status,
            generation: row.generation,
            position: row.position,
            updated_at: row.updated_at,
        }
    }
}

/// Answers a read model's rows as their listing.
fn listed<T, R>(rows: Result<Vec<R>, sqlx::Error>) -> ListResponse<T>
where
    T: poem_openapi::types::ToJSON + Send + Sync + From<R>,
{
    match rows {
        Ok(rows) => ListResponse::Listed(Json(rows.into_iter().map(T::from).collect())),
        Err(error) => list_unavailable(&error),
    }
}

/// An event's metadata.
#[derive(Debug, Object)]
pub struct AdminEventMetadata {
    pub recorded_at: String,
    /// `user:ID`, `host:ID`, `stripe`, `system` or `release-workflow`.
    pub actor: String,
    pub correlation_id: String,
    #[oai(nullable)]
    pub causation_id: Option<String>,
}

/// One stored event.
#[derive(Debug, Object)]
pub struct AdminEvent {
    /// The position in the global log (null while the event is not yet sequenced).
    #[oai(nullable)]
    pub position: Option<i64>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    /// The payload as stored.
    pub payload: serde_json::Value,
    pub metadata: AdminEventMetadata,
    /// The event's chain hash, once sealed (`whist events verify`).
    #[oai(nullable)]
    pub hash: Option<String>,
}

impl From<EventRecord> for AdminEvent {
    fn from(record: EventRecord) -> Self {
        Self {
            position: record.position,
            aggregate_type: record.aggregate_type,
            aggregate_id: record.aggregate_id,
            sequence: record.sequence,
            event_type: record.event_type,
            event_version: record.event_version,
            payload: record.payload,
            metadata: AdminEventMetadata {
                recorded_at: record.metadata.recorded_at,
                actor: record.metadata.actor,
                correlation_id: record.metadata.correlation_id,
                causation_id: record.metadata.causation_id,
            },
            hash: record.hash,
        }
    }
}

/// An aggregate's state, replayed from its events.
#[derive(Debug, Object)]
pub struct AdminAggregateState {
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// The sequence of the last event applied.
    pub version: i64,
    /// When the last event applied was recorded.
    #[oai(nullable)]
    pub recorded_at: Option<String>,
    pub state: serde_json::Value,
}

impl From<ReplayedState> for AdminAggregateState {
    fn from(replayed: ReplayedState) -> Self {
        Self {
            aggregate_type: replayed.aggregate_type,
            aggregate_id: replayed.aggregate_id,
            version: replayed.version,
            recorded_at: replayed.recorded_at,
            state: replayed.state,
        }
    }
}

#[derive(ApiResponse)]
pub enum EventsResponse {
    #[oai(status = 200)]
    Listed(Json<Vec<AdminEvent>>),
    /// Unknown aggregate type.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
pub enum StateResponse {
    #[oai(status = 200)]
    Found(Json<AdminAggregateState>),
    /// Unknown aggregate type, or no event of the aggregate that early.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

/// A projection's progress.
#[derive(Debug, Object)]
pub struct AdminProjection {
    pub name: String,
    pub position: i64,
    pub head: i64,
    pub lag: i64,
    pub status: String,
    #[oai(nullable)]
    pub last_error: Option<String>,
}

impl From<whist_projections::ProjectionStatus> for AdminProjection {
    fn from(status: whist_projections::ProjectionStatus) -> Self {
        Self {
            name: status.name,
            position: status.position,
            head: status.head,
            lag: status.lag,
            status: status.status,
            last_error: status.last_error,
        }
    }
}

#[derive(ApiResponse)]
pub enum ProjectionsResponse {
    #[oai(status = 200)]
    Listed(Json<Vec<AdminProjection>>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

/// What a rebuild did.
#[derive(Debug, Object)]
pub struct AdminRebuild {
    pub name: String,
    pub events: u64,
    pub position: i64,
    pub elapsed_ms: u64,
}

#[derive(ApiResponse)]
pub enum RebuildResponse {
    /// Rebuilt and swapped in.
    #[oai(status = 200)]
    Rebuilt(Json<AdminRebuild>),
    /// No projection of that name.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The projection plans side effects or seals the log, and is never rebuilt.
    #[oai(status = 409)]
    NotRebuildable(Json<ErrorBody>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

fn events_failure(error: &AuditError) -> EventsResponse {
    match error {
        AuditError::UnknownAggregateType(_) => {
            EventsResponse::NotFound(error_body("UNKNOWN_AGGREGATE_TYPE"))
        }
        other => EventsResponse::Unavailable(unavailable("could not read the log", other)),
    }
}

/// Admin read endpoints.
pub struct AdminApi;

#[OpenApi(tag = "AdminTag::Admin")]
impl AdminApi {
    /// List every host the webserver decided, with its fill.
    ///
    /// `?status=` keeps one status.
    #[oai(
        path = "/admin/instances",
        method = "get",
        operation_id = "listInstances"
    )]
    async fn instances(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        status: Query<Option<String>>,
    ) -> ListResponse<AdminInstance> {
        listed(fleet_queries::list_instances(&state.database, status.0.as_deref()).await)
    }

    /// List every mandelbox.
    ///
    /// `?status=` keeps one status.
    #[oai(
        path = "/admin/mandelboxes",
        method = "get",
        operation_id = "listMandelboxes"
    )]
    async fn mandelboxes(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        status: Query<Option<String>>,
    ) -> ListResponse<AdminMandelbox> {
        listed(fleet_queries::list_mandelboxes(&state.database, status.0.as_deref()).await)
    }

    /// List the image catalog per region.
    ///
    /// Active images, release candidates, retired and rolled-back ones; `?status=` keeps one status.
    #[oai(path = "/admin/images", method = "get", operation_id = "listImages")]
    async fn images(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        status: Query<Option<String>>,
    ) -> ListResponse<AdminImage> {
        listed(
            whist_projections::catalog::list_region_images(&state.database, status.0.as_deref())
                .await,
        )
    }

    /// Read the global log in commit order.
    ///
    /// Up to `limit` (default 100, at most 10,000) events after `after` (default 0); with `correlation_id`, only
    /// the events of that chain.
    #[oai(path = "/admin/events", method = "get", operation_id = "listEvents")]
    async fn events(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        #[oai(validator(minimum(value = "0")))] after: Query<Option<i64>>,
        #[oai(validator(minimum(value = "1"), maximum(value = "10000")))] limit: Query<Option<i64>>,
        #[oai(validator(min_length = 1, max_length = 128))] correlation_id: Query<Option<String>>,
    ) -> EventsResponse {
        // All are bounded by their validators (a value out of range is answered 400 before this).
        let limit = limit.0.unwrap_or(100);
        let after = after.0.unwrap_or(0);
        let listed = match &correlation_id.0 {
            Some(chain) => audit::chain_after(&state.database, chain, after, limit).await,
            None => audit::events_after(&state.database, after, limit).await,
        };
        match listed {
            Ok(events) => {
                EventsResponse::Listed(Json(events.into_iter().map(AdminEvent::from).collect()))
            }
            Err(error) => events_failure(&error),
        }
    }

    /// Read every event of one aggregate, in sequence order.
    #[oai(
        path = "/admin/aggregates/:aggregate_type/:aggregate_id/events",
        method = "get",
        operation_id = "listAggregateEvents"
    )]
    async fn aggregate_events(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        aggregate_type: Path<String>,
        aggregate_id: Path<String>,
    ) -> EventsResponse {
        if !audit::AGGREGATE_TYPES.contains(&aggregate_type.0.as_str()) {
            return EventsResponse::NotFound(error_body("UNKNOWN_AGGREGATE_TYPE"));
        }
        match audit::history(&state.database, &aggregate_type.0, &aggregate_id.0).await {
            Ok(events) => {
                EventsResponse::Listed(Json(events.into_iter().map(AdminEvent::from).collect()))
            }
            Err(error) => events_failure(&error),
        }
    }

    /// Replay an aggregate's state from its events.
    ///
    /// All of its events, or those up to `at_version` (a sequence number) and recorded at or before `as_of`
    /// (RFC 3339), whichever of the two bounds are given.
    #[oai(
        path = "/admin/aggregates/:aggregate_type/:aggregate_id",
        method = "get",
        operation_id = "getAggregateState"
    )]
    async fn aggregate_state(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        aggregate_type: Path<String>,
        aggregate_id: Path<String>,
        at_version: Query<Option<i64>>,
        as_of: Query<Option<DateTime<Utc>>>,
    ) -> StateResponse {
        let until = ReplayUntil {
            version: at_version.0,
            as_of: as_of.0,
        };
        match audit::replay(&state.database, &aggregate_type.0, &aggregate_id.0, until).await {
            Ok(Some(replayed)) => StateResponse::Found(Json(replayed.into())),
            Ok(None) => StateResponse::NotFound(error_body("NO_EVENTS")),
            Err(AuditError::UnknownAggregateType(_)) => {
                StateResponse::NotFound(error_body("UNKNOWN_AGGREGATE_TYPE"))
            }
            Err(error) => {
                StateResponse::Unavailable(unavailable("could not replay an aggregate", &error))
            }
        }
    }

    /// List every projection with its progress.
    ///
    /// Its position, the log's head, the lag, its status and last error.
    #[oai(
        path = "/admin/projections",
        method = "get",
        operation_id = "listProjections"
    )]
    async fn projections(&self, state: Data<&AppState>, _auth: AdminAuth) -> ProjectionsResponse {
        match state.projections.status().await {
            Ok(statuses) => ProjectionsResponse::Listed(Json(
                statuses.into_iter().map(AdminProjection::from).collect(),
            )),
            Err(error) => ProjectionsResponse::Unavailable(unavailable(
                "could not read projection status",
                &error,
            )),
        }
    }

    /// Rebuild a projection from position 0.
    ///
    /// Into shadow tables, swapped in atomically; answers when done.
    #[oai(
        path = "/admin/projections/:name/rebuild",
        method = "post",
        operation_id = "rebuildProjection"
    )]
    async fn rebuild(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        name: Path<String>,
    ) -> RebuildResponse {
        use whist_projections::RunnerError;
        match state.projections.rebuild(&name.0, &|_| {}).await {
            Ok(report) => RebuildResponse::Rebuilt(Json(AdminRebuild {
                name: name.0,
                events: report.events,
                position: report.position,
                elapsed_ms: u64::try_from(report.elapsed.as_millis()).unwrap_or(u64::MAX),
            })),
            Err(RunnerError::UnknownProjection(_)) => {
                RebuildResponse::NotFound(error_body("UNKNOWN_PROJECTION"))
            }
            Err(RunnerError::NotRebuildable(_)) => {
                RebuildResponse::NotRebuildable(error_body("NOT_REBUILDABLE"))
            }
            Err(error) => {
                RebuildResponse::Unavailable(unavailable("could not rebuild a projection", &error))
            }
        }
    }
}

/// Body of `POST /admin/instances`.
#[derive(Debug, Object)]
#[oai(example)]
pub struct LaunchBody {
    pub region: String,
    /// Hosts to launch (1 to 50).
    #[oai(validator(minimum(value = "1"), maximum(value = "50")))]
    pub count: u32,
}

impl Example for LaunchBody {
    fn example() -> Self {
        Self {
            region: "us-east-1".to_string(),
            count: 2,
        }
    }
}

/// Hosts decided by `POST /admin/instances`.
#[derive(Debug, Object)]
pub struct Launched {
    pub instance_ids: Vec<String>,
}

/// A host after an action.
#[derive(Debug, Object)]
pub struct HostAfterAction {
    pub instance_id: String,
    pub status: String,
}

/// Body and answer of `PUT /admin/maintenance`.
#[derive(Debug, Object)]
#[oai(example)]
pub struct Maintenance {
    pub enabled: bool,
}

impl Example for Maintenance {
    fn example() -> Self {
        Self { enabled: true }
    }
}

#[derive(ApiResponse)]
pub enum LaunchResponse {
    /// Decided; the reconciler launches them.
    #[oai(status = 202)]
    Accepted(Json<Launched>),
    /// The count is out of range.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
    /// The region is not enabled (`REGION_NOT_ENABLED`) or has no active image (`NO_ACTIVE_IMAGE`).
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
pub enum HostActionResponse {
    #[oai(status = 200)]
    Done(Json<HostAfterAction>),
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The host has already ended.
    #[oai(status = 409)]
    Conflict(Json<ErrorBody>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
pub enum MaintenanceResponse {
    #[oai(status = 200)]
    Switch(Json<Maintenance>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

/// One region at a glance.
#[derive(Debug, Object)]
pub struct RegionOverview {
    pub region: String,
    #[oai(nullable)]
    pub active_image: Option<String>,
    #[oai(nullable)]
    pub active_commit_hash: Option<String>,
    /// The warm buffer's target (free slots).
    pub desired_free: u32,
    /// Free slots on active hosts of the active image.
    pub free: i64,
    /// Hosts by status (every status, zero included).
    pub hosts: Vec<CountByStatus>,
}

/// A count per status.
#[derive(Debug, Object)]
pub struct CountByStatus {
    pub status: String,
    pub count: i64,
}

/// Assigns in one minute.
#[derive(Debug, Object)]
pub struct MinuteCount {
    /// The minute's start, RFC 3339.
    pub minute: String,
    pub count: i64,
}

/// An event in the feed.
#[derive(Debug, Object)]
pub struct RecentEvent {
    pub position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub actor: String,
    pub recorded_at: String,
    /// The chain the event belongs to (`GET /admin/events?correlation_id=`).
    pub correlation_id: String,
}

/// What the dashboard shows.
#[derive(Debug, Object)]
pub struct Overview {
    pub maintenance: bool,
    pub regions: Vec<RegionOverview>,
    pub mandelboxes: Vec<CountByStatus>,
    pub projections: Vec<AdminProjection>,
    /// The last 25 events, newest first.
    pub recent_events: Vec<RecentEvent>,
    /// Mandelboxes allocated per minute over the last 30 minutes, oldest first.
    pub assigns_per_minute: Vec<MinuteCount>,
}

#[derive(ApiResponse)]
pub enum OverviewResponse {
    #[oai(status = 200)]
    Overview(Json<Overview>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

fn operator_failure<T>(
    error: crate::control::operator::OperatorError,
    bad: impl FnOnce(Json<ErrorBody>) -> T,
    not_found: impl FnOnce(Json<ErrorBody>) -> T,
    conflict: impl FnOnce(Json<ErrorBody>) -> T,
    failed: impl FnOnce(Json<ErrorBody>) -> T,
) -> T {
    use crate::control::operator::OperatorError as E;
    match error {
        E::RegionNotEnabled(_) => conflict(error_body("REGION_NOT_ENABLED")),
        E::CountOutOfRange => bad(error_body("COUNT_OUT_OF_RANGE")),
        E::UnknownHost(_) => not_found(error_body("NOT_FOUND")),
        E::NoActiveImage(_) => conflict(error_body("NO_ACTIVE_IMAGE")),
        E::HostEnded(_) => conflict(error_body("HOST_ENDED")),
        E::Store(ref cause) => failed(unavailable("an admin action failed", cause)),
    }
}

/// A developer's action on a host, answered with the host's status after it.
async fn host_action(
    state: &AppState,
    auth: &AdminAuth,
    request_id: &RequestId,
    instance_id: String,
    action: HostAction,
) -> HostActionResponse {
    let origin = EventMetadata::for_request(
        Actor::User(auth.0.user_id.clone()),
        &request_id.0,
        chrono::Utc::now(),
    );
    match crate::control::operator::act_on_host(state, &origin, &instance_id, action).await {
        Ok(status) => HostActionResponse::Done(Json(HostAfterAction {
            instance_id,
            status: status.as_str().to_string(),
        })),
        Err(error) => operator_failure(
            error,
            HostActionResponse::Conflict,
            HostActionResponse::NotFound,
            HostActionResponse::Conflict,
            HostActionResponse::Unavailable,
        ),
    }
}

/// `counts` with every one of `statuses` (zero if absent) first, in that order, then any other status counted.
fn every_status(counts: Vec<StatusCount>, statuses: &[&str]) -> Vec<CountByStatus> {
    let mut every: Vec<CountByStatus> = statuses
        .iter()
        .map(|status| CountByStatus {
            status: (*status).to_string(),
            count: 0,
        })
        .collect();
    for StatusCount { status, count } in counts {
        match every.iter_mut().find(|entry| entry.status == status) {
            Some(entry) => entry.count = count,
            None => every.push(CountByStatus { status, count }),
        }
    }
    every
}

async fn overview(
    state: &AppState,
) -> Result<Overview, Box<dyn std::error::Error + Send + Sync + 'static>> {
    let settings = &state.settings;
    let (catalog, _) = state
        .services
        .catalog
        .load_caught_up(whist_domain::images::CATALOG_ID)
        .await?;
    let mut regions = Vec::new();
    for region in &settings.enabled_regions {
        let active = catalog.active_in(region);
        let free = fleet_queries::free_slots(
            &state.database,
            region,
            active.map_or("", |image| image.image_id.as_str()),
        )
        .await?;
        let hosts = every_status(
            fleet_queries::instances_by_status(&state.database, region).await?,
            &[
                "PRE_CONNECTION",
                "ACTIVE",
                "DRAINING",
                "UNRESPONSIVE",
                "TERMINATING",
                "TERMINATED",
            ],
        );
        regions.push(RegionOverview {
            region: region.clone(),
            active_image: active.map(|image| image.image_id.clone()),
            active_commit_hash: active.map(|image| image.client_commit_hash.clone()),
            desired_free: settings.desired_free_mandelboxes_in(region),
            free,
            hosts,
        });
    }
    let mandelboxes = every_status(
        fleet_queries::mandelboxes_by_status(&state.database).await?,
        &["ALLOCATED", "CONNECTING", "RUNNING", "DYING", "DEAD"],
    );
    let projections = state
        .projections
        .status()
        .await?
        .into_iter()
        .map(AdminProjection::from)
        .collect();
    let recent_events = audit::latest_events(&state.database, 25)
        .await?
        .into_iter()
        .map(|event| RecentEvent {
            position: event.position.unwrap_or(0),
            aggregate_type: event.aggregate_type,
            aggregate_id: event.aggregate_id,
            event_type: event.event_type,
            actor: event.metadata.actor,
            recorded_at: event.metadata.recorded_at,
            correlation_id: event.metadata.correlation_id,
        })
        .collect();
    let now = Utc::now();
    let start = now - chrono::Duration::minutes(29);
    let start = start - chrono::Duration::seconds(i64::from(chrono::Timelike::second(&start)));
    let created =
        fleet_queries::mandelboxes_created_since(&state.database, &start.to_rfc3339()).await?;
    let mut per_minute = vec![0i64; 30];
    for at in created {
        if let Ok(at) = DateTime::parse_from_rfc3339(&at) {
            let minutes = (at.with_timezone(&Utc) - start).num_minutes();
            if let Some(slot) = usize::try_from(minutes)
                .ok()
                .and_then(|index| per_minute.get_mut(index))
            {
                *slot += 1;
            }
        }
    }
    let assigns_per_minute = per_minute
        .into_iter()
        .enumerate()
        .map(|(index, count)| MinuteCount {
            minute: (start + chrono::Duration::minutes(index as i64))
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            count,
        })
        .collect();
    Ok(Overview {
        maintenance: crate::control::operator::maintenance(state).await?,
        regions,
        mandelboxes,
        projections,
        recent_events,
        assigns_per_minute,
    })
}

/// Developers' actions on the fleet, and the dashboard's data.
pub struct OperatorApi;

#[OpenApi(tag = "AdminTag::Admin")]
impl OperatorApi {
    /// Launch hosts in a region on its active image.
    ///
    /// With an `Idempotency-Key` header a retried request launches nothing new and answers the same ids.
    #[oai(
        path = "/admin/instances",
        method = "post",
        operation_id = "launchInstances"
    )]
    async fn launch(
        &self,
        state: Data<&AppState>,
        request_id: Data<&RequestId>,
        auth: AdminAuth,
        body: Json<LaunchBody>,
        #[oai(name = "Idempotency-Key")] idempotency_key: poem_openapi::param::Header<
            Option<String>,
        >,
    ) -> LaunchResponse {
        let origin = EventMetadata::for_request(
            Actor::User(auth.0.user_id.clone()),
            &request_id.0 .0,
            chrono::Utc::now(),
        );
        match crate::control::operator::launch_hosts(
            &state,
            &origin,
            &body.0.region,
            body.0.count,
            idempotency_key.0.as_deref(),
        )
        .await
        {
            Ok(instance_ids) => LaunchResponse::Accepted(Json(Launched { instance_ids })),
            Err(error) => operator_failure(
                error,
                LaunchResponse::BadRequest,
                LaunchResponse::BadRequest,
                LaunchResponse::Conflict,
                LaunchResponse::Unavailable,
            ),
        }
    }

    /// Drain a host.
    ///
    /// It takes no new mandelbox, and shuts down when its last one ends.
    #[oai(
        path = "/admin/instances/:instance_id/drain",
        method = "post",
        operation_id = "drainInstance"
    )]
    async fn drain(
        &self,
        state: Data<&AppState>,
        request_id: Data<&RequestId>,
        auth: AdminAuth,
        instance_id: Path<String>,
    ) -> HostActionResponse {
        host_action(&state, &auth, &request_id, instance_id.0, HostAction::Drain).await
    }

    /// Terminate a host.
    ///
    /// Through its host service when it answers, and in the cloud; its mandelboxes end.
    #[oai(
        path = "/admin/instances/:instance_id",
        method = "delete",
        operation_id = "terminateInstance"
    )]
    async fn terminate(
        &self,
        state: Data<&AppState>,
        request_id: Data<&RequestId>,
        auth: AdminAuth,
        instance_id: Path<String>,
    ) -> HostActionResponse {
        host_action(
            &state,
            &auth,
            &request_id,
            instance_id.0,
            HostAction::Terminate,
        )
        .await
    }

    /// Tell whether maintenance mode is on.
    #[oai(
        path = "/admin/maintenance",
        method = "get",
        operation_id = "getMaintenance"
    )]
    async fn maintenance(&self, state: Data<&AppState>, _auth: AdminAuth) -> MaintenanceResponse {
        match crate::control::operator::maintenance(&state).await {
            Ok(enabled) => MaintenanceResponse::Switch(Json(Maintenance { enabled })),
            Err(error) => MaintenanceResponse::Unavailable(unavailable(
                "could not read the maintenance switch",
                &error,
            )),
        }
    }

    /// Turn maintenance mode on or off.
    ///
    /// While on, assigns answer `503 MAINTENANCE` and the autoscaler launches nothing; everything else keeps
    /// working.
    #[oai(
        path = "/admin/maintenance",
        method = "put",
        operation_id = "setMaintenance"
    )]
    async fn set_maintenance(
        &self,
        state: Data<&AppState>,
        request_id: Data<&RequestId>,
        auth: AdminAuth,
        body: Json<Maintenance>,
    ) -> MaintenanceResponse {
        let origin = EventMetadata::for_request(
            Actor::User(auth.0.user_id.clone()),
            &request_id.0 .0,
            chrono::Utc::now(),
        );
        match crate::control::operator::set_maintenance(&state, &origin, body.0.enabled).await {
            Ok(enabled) => MaintenanceResponse::Switch(Json(Maintenance { enabled })),
            Err(error) => MaintenanceResponse::Unavailable(unavailable(
                "could not switch maintenance mode",
                &error,
            )),
        }
    }

    /// Read everything the dashboard shows, in one read.
    #[oai(path = "/admin/overview", method = "get", operation_id = "getOverview")]
    async fn overview(&self, state: Data<&AppState>, _auth: AdminAuth) -> OverviewResponse {
        match overview(&state).await {
            Ok(overview) => OverviewResponse::Overview(Json(overview)),
            Err(error) => {
                OverviewResponse::Unavailable(unavailable("could not read the overview", &*error))
            }
        }
    }
}
