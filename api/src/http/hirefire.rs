//! HireFire: the queue depth that sizes the workers.

use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use whist_adapters::tokens::fingerprint;

use crate::http::error::{error_body, unavailable, ErrorBody};
use crate::state::AppState;

#[derive(Tags)]
enum HireFireTag {
    /// Polled by HireFire to size the workers.
    HireFire,
}

/// One process type and how many of it HireFire should run.
#[derive(Debug, Object)]
pub struct WorkerQuantity {
    /// Always `worker`.
    pub name: String,
    /// Side-effect jobs waiting.
    pub quantity: i64,
}

#[derive(ApiResponse)]
pub enum InfoResponse {
    #[oai(status = 200)]
    Info(Json<Vec<WorkerQuantity>>),
    /// Wrong token, or no `HIREFIRE_TOKEN` configured.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    /// The store does not answer.
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
pub enum TestResponse {
    #[oai(status = 200)]
    Ok(Json<serde_json::Value>),
}

/// HireFire's endpoints.
pub struct HireFireApi;

#[OpenApi(tag = "HireFireTag::HireFire")]
impl HireFireApi {
    /// Answer HireFire's check that the endpoint exists.
    #[oai(path = "/hirefire/test", method = "get", operation_id = "testHireFire")]
    async fn test(&self) -> TestResponse {
        TestResponse::Ok(Json(serde_json::json!({})))
    }

    /// Count the side-effect jobs waiting, as HireFire reads it.
    ///
    /// The path's `token` is `HIREFIRE_TOKEN`, HireFire's only credential: any other value answers 404.
    #[oai(
        path = "/hirefire/:token/info",
        method = "get",
        operation_id = "getHireFireInfo"
    )]
    async fn info(&self, state: Data<&AppState>, token: Path<String>) -> InfoResponse {
        let not_found = || InfoResponse::NotFound(error_body("NOT_FOUND"));
        let Some(expected) = &state.settings.hirefire_token else {
            return not_found();
        };
        // Compared as digests, so the time taken says nothing about the token.
        if fingerprint(&token.0) != fingerprint(expected.expose()) {
            return not_found();
        }
        match whist_projections::jobs::waiting_jobs(&state.database).await {
            Ok(quantity) => InfoResponse::Info(Json(vec![WorkerQuantity {
                name: "worker".to_string(),
                quantity,
            }])),
            Err(error) => {
                InfoResponse::Unavailable(unavailable("could not count the waiting jobs", &error))
            }
        }
    }
}
