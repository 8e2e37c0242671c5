//! Operations endpoints: liveness, readiness, metrics.

use poem::web::Data;
use poem_openapi::payload::{Json, PlainText};
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};

use crate::state::AppState;

#[derive(Tags)]
enum OpsTag {
    /// Probes and metrics for the platform that runs the webserver.
    Operations,
}

/// The body of the probes.
#[derive(Object)]
pub struct ProbeBody {
    /// `ok`, or what is wrong.
    pub status: String,
}

#[derive(ApiResponse)]
pub enum ReadyResponse {
    /// The event store answers.
    #[oai(status = 200)]
    Ready(Json<ProbeBody>),
    /// The event store does not answer.
    #[oai(status = 503)]
    NotReady(Json<ProbeBody>),
}

/// Probes and metrics.
pub struct OpsApi;

#[OpenApi(tag = "OpsTag::Operations")]
impl OpsApi {
    /// The process is up.
    #[oai(path = "/healthz", method = "get")]
    async fn healthz(&self) -> Json<ProbeBody> {
        Json(ProbeBody {
            status: "ok".to_string(),
        })
    }

    /// The process can reach its event store.
    #[oai(path = "/readyz", method = "get")]
    async fn readyz(&self, state: Data<&AppState>) -> ReadyResponse {
        match tokio::time::timeout(std::time::Duration::from_secs(2), state.database.ping()).await {
            Ok(Ok(())) => ReadyResponse::Ready(Json(ProbeBody {
                status: "ok".to_string(),
            })),
            Ok(Err(error)) => {
                tracing::warn!(error = %error, "readiness check failed");
                ReadyResponse::NotReady(Json(ProbeBody {
                    status: "event store unreachable".to_string(),
                }))
            }
            Err(_) => ReadyResponse::NotReady(Json(ProbeBody {
                status: "event store did not answer within 2 s".to_string(),
            })),
        }
    }

    /// Prometheus text exposition of the process's metrics.
    #[oai(path = "/metrics", method = "get")]
    async fn metrics(&self, state: Data<&AppState>) -> PlainText<String> {
        if let Ok(statuses) = state.projections.status().await {
            for status in statuses {
                metrics::gauge!("whist_projection_lag", "projection" => status.name.clone())
                    .set(status.lag as f64);
            }
        }
        PlainText(state.metrics.render())
    }
}
