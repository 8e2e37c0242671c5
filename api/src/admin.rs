//! Developers' and auditors' endpoints (scope `admin`): the fleet's hosts and mandelboxes and the image catalog,
//! straight from their read models; the global log, one aggregate's history and its replayed state; projections.

use chrono::{DateTime, Utc};
use poem::web::Data;
use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::audit::{self, AuditError, EventRecord, ReplayUntil, ReplayedState};
use crate::desktop::ErrorBody;
use crate::security::AdminAuth;
use crate::state::AppState;

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
    pub cloud_instance_id: Option<String>,
    pub region: String,
    pub image_id: String,
    pub client_commit_hash: String,
    pub instance_type: String,
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

fn unavailable<T: poem_openapi::types::ToJSON + Send + Sync>(
    error: &sqlx::Error,
) -> ListResponse<T> {
    crate::error::log_failure("could not read a read model", error);
    ListResponse::Unavailable(Json(ErrorBody {
        error: "STORE_UNAVAILABLE".to_string(),
    }))
}

fn instance(row: &AnyRow) -> Result<AdminInstance, sqlx::Error> {
    Ok(AdminInstance {
        instance_id: row.try_get("instance_id")?,
        cloud_instance_id: row.try_get("cloud_instance_id")?,
        region: row.try_get("region")?,
        image_id: row.try_get("image_id")?,
        client_commit_hash: row.try_get("client_commit_hash")?,
        instance_type: row.try_get("instance_type")?,
        ip: row.try_get("ip")?,
        status: row.try_get("status")?,
        mandelbox_capacity: row.try_get("mandelbox_capacity")?,
        live_mandelboxes: row.try_get("live_mandelboxes")?,
        launched_at: row.try_get("launched_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn mandelbox(row: &AnyRow) -> Result<AdminMandelbox, sqlx::Error> {
    Ok(AdminMandelbox {
        mandelbox_id: row.try_get("mandelbox_id")?,
        instance_id: row.try_get("instance_id")?,
        user_id: row.try_get("user_id")?,
        session_id: row.try_get("session_id")?,
        region: row.try_get("region")?,
        ip: row.try_get("ip")?,
        status: row.try_get("status")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
    })
}

fn image(row: &AnyRow) -> Result<AdminImage, sqlx::Error> {
    Ok(AdminImage {
        region: row.try_get("region")?,
        client_commit_hash: row.try_get("client_commit_hash")?,
        image_id: row.try_get("image_id")?,
        status: row.try_get("status")?,
        generation: row.try_get("generation")?,
        position: row.try_get("position")?,
        updated_at: row.try_get("updated_at")?,
    })
}

/// Reads `sql` (with an optional status filter bound as `$1`) into items.
async fn list<T: poem_openapi::types::ToJSON + Send + Sync>(
    state: &AppState,
    sql: &str,
    status: Option<String>,
    item: fn(&AnyRow) -> Result<T, sqlx::Error>,
) -> ListResponse<T> {
    let query = sqlx::query(sql).bind(status);
    match query.fetch_all(state.database.any()).await {
        Ok(rows) => match rows.iter().map(item).collect::<Result<Vec<T>, _>>() {
            Ok(items) => ListResponse::Listed(Json(items)),
            Err(error) => unavailable(&error),
        },
        Err(error) => unavailable(&error),
    }
}

/// An event's metadata.
#[derive(Debug, Object)]
pub struct AdminEventMetadata {
    pub recorded_at: String,
    /// `user:ID`, `host:ID`, `stripe`, `system` or `release-workflow`.
    pub actor: String,
    pub correlation_id: String,
    pub causation_id: Option<String>,
}

/// One stored event.
#[derive(Debug, Object)]
pub struct AdminEvent {
    /// The position in the global log (null while the event is not yet sequenced).
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
    /// A malformed parameter.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
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
    /// `at_version` and `as_of` together, or a malformed `as_of`.
    #[oai(status = 400)]
    BadRequest(Json<ErrorBody>),
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
    pub last_error: Option<String>,
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

fn error_body(code: &str) -> Json<ErrorBody> {
    Json(ErrorBody {
        error: code.to_string(),
    })
}

fn events_failure(error: &AuditError) -> EventsResponse {
    match error {
        AuditError::UnknownAggregateType(_) => {
            EventsResponse::NotFound(error_body("UNKNOWN_AGGREGATE_TYPE"))
        }
        other => {
            crate::error::log_failure("could not read the log", other);
            EventsResponse::Unavailable(error_body("STORE_UNAVAILABLE"))
        }
    }
}

/// Admin read endpoints.
pub struct AdminApi;

#[OpenApi(tag = "AdminTag::Admin")]
impl AdminApi {
    /// Every host the webserver decided, with its fill; `?status=` keeps one status.
    #[oai(path = "/admin/instances", method = "get")]
    async fn instances(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        status: Query<Option<String>>,
    ) -> ListResponse<AdminInstance> {
        list(
            &state,
            "SELECT instance_id, cloud_instance_id, region, image_id, client_commit_hash, instance_type, ip, status, \
             mandelbox_capacity, live_mandelboxes, launched_at, updated_at FROM instances \
             WHERE $1 IS NULL OR status = $1 ORDER BY launched_at, instance_id",
            status.0,
            instance,
        )
        .await
    }

    /// Every mandelbox; `?status=` keeps one status.
    #[oai(path = "/admin/mandelboxes", method = "get")]
    async fn mandelboxes(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        status: Query<Option<String>>,
    ) -> ListResponse<AdminMandelbox> {
        list(
            &state,
            "SELECT mandelbox_id, instance_id, user_id, session_id, region, ip, status, created_at, updated_at \
             FROM mandelboxes WHERE $1 IS NULL OR status = $1 ORDER BY created_at, mandelbox_id",
            status.0,
            mandelbox,
        )
        .await
    }

    /// The image catalog per region: active images, release candidates, retired and rolled-back ones; `?status=`
    /// keeps one status.
    #[oai(path = "/admin/images", method = "get")]
    async fn images(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        status: Query<Option<String>>,
    ) -> ListResponse<AdminImage> {
        list(
            &state,
            "SELECT region, client_commit_hash, image_id, status, generation, position, updated_at \
             FROM region_images WHERE $1 IS NULL OR status = $1 ORDER BY region, position, client_commit_hash",
            status.0,
            image,
        )
        .await
    }

    /// The global log in commit order: up to `limit` (default 100, at most 10,000) events after `after` (default 0).
    #[oai(path = "/admin/events", method = "get")]
    async fn events(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        after: Query<Option<i64>>,
        limit: Query<Option<i64>>,
    ) -> EventsResponse {
        let limit = limit.0.unwrap_or(100);
        if !(1..=10_000).contains(&limit) {
            return EventsResponse::BadRequest(error_body("LIMIT_OUT_OF_RANGE"));
        }
        match audit::events_after(&state.database, after.0.unwrap_or(0).max(0), limit).await {
            Ok(events) => {
                EventsResponse::Listed(Json(events.into_iter().map(AdminEvent::from).collect()))
            }
            Err(error) => events_failure(&error),
        }
    }

    /// Every event of one aggregate, in sequence order.
    #[oai(
        path = "/admin/aggregates/:aggregate_type/:aggregate_id/events",
        method = "get"
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

    /// The aggregate's state replayed from its events: all of them, up to `at_version` (a sequence number), or
    /// those recorded at or before `as_of` (RFC 3339).
    #[oai(
        path = "/admin/aggregates/:aggregate_type/:aggregate_id",
        method = "get"
    )]
    async fn aggregate_state(
        &self,
        state: Data<&AppState>,
        _auth: AdminAuth,
        aggregate_type: Path<String>,
        aggregate_id: Path<String>,
        at_version: Query<Option<i64>>,
        as_of: Query<Option<String>>,
    ) -> StateResponse {
        let until = match (at_version.0, as_of.0) {
            (Some(_), Some(_)) => {
                return StateResponse::BadRequest(error_body("AT_VERSION_OR_AS_OF"))
            }
            (Some(version), None) => ReplayUntil::Version(version),
            (None, Some(moment)) => match DateTime::parse_from_rfc3339(&moment) {
                Ok(moment) => ReplayUntil::AsOf(moment.with_timezone(&Utc)),
                Err(_) => return StateResponse::BadRequest(error_body("MALFORMED_AS_OF")),
            },
            (None, None) => ReplayUntil::Latest,
        };
        match audit::replay(&state.database, &aggregate_type.0, &aggregate_id.0, until).await {
            Ok(Some(replayed)) => StateResponse::Found(Json(replayed.into())),
            Ok(None) => StateResponse::NotFound(error_body("NO_EVENTS")),
            Err(AuditError::UnknownAggregateType(_)) => {
                StateResponse::NotFound(error_body("UNKNOWN_AGGREGATE_TYPE"))
            }
            Err(error) => {
                crate::error::log_failure("could not replay an aggregate", &error);
                StateResponse::Unavailable(error_body("STORE_UNAVAILABLE"))
            }
        }
    }

    /// Every projection: its position, the log's head, the lag, its status and last error.
    #[oai(path = "/admin/projections", method = "get")]
    async fn projections(&self, state: Data<&AppState>, _auth: AdminAuth) -> ProjectionsResponse {
        match state.projections.status().await {
            Ok(statuses) => ProjectionsResponse::Listed(Json(
                statuses
                    .into_iter()
                    .map(|status| AdminProjection {
                        name: status.name,
                        position: status.position,
                        head: status.head,
                        lag: status.lag,
                        status: status.status,
                        last_error: status.last_error,
                    })
                    .collect(),
            )),
            Err(error) => {
                crate::error::log_failure("could not read projection status", &error);
                ProjectionsResponse::Unavailable(error_body("STORE_UNAVAILABLE"))
            }
        }
    }

    /// Rebuilds a projection from position 0 into shadow tables and swaps them in atomically; answers when done.
    #[oai(path = "/admin/projections/:name/rebuild", method = "post")]
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
                crate::error::log_failure("could not rebuild a projection", &error);
                RebuildResponse::Unavailable(error_body("STORE_UNAVAILABLE"))
            }
        }
    }
}
