//! Developers' read endpoints (scope `admin`): the fleet's hosts and mandelboxes, and the image catalog, straight
//! from their read models.

use poem::web::Data;
use poem_openapi::param::Query;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use sqlx::any::AnyRow;
use sqlx::Row;

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
}
