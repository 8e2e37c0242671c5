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
    /// The event store answers and every background loop of the process runs.
    #[oai(status = 200)]
    Ready(Json<ProbeBody>),
    /// The event store does not answer, or a background loop is down (stopped, waiting for its restart).
    #[oai(status = 503)]
    NotReady(Json<ProbeBody>),
}

/// Probes and metrics.
pub struct OpsApi;

#[OpenApi(tag = "OpsTag::Operations")]
impl OpsApi {
    /// Tell whether the process is up.
    #[oai(path = "/healthz", method = "get", operation_id = "getHealth")]
    async fn healthz(&self) -> Json<ProbeBody> {
        Json(ProbeBody {
            status: "ok".to_string(),
        })
    }

    /// Tell whether the process is ready to serve.
    ///
    /// Ready: it can reach its event store and none of its background loops is down.
    #[oai(path = "/readyz", method = "get", operation_id = "getReadiness")]
    async fn readyz(&self, state: Data<&AppState>) -> ReadyResponse {
        // A loop that is down is answered first, without a query: the process cannot keep its promises meanwhile
        // (a stopped reconciler starts no mandelbox), whether or not the store answers.
        if let Some(status) = loops_down_status(&state.background_loops.down()) {
            return ReadyResponse::NotReady(Json(ProbeBody { status }));
        }
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

    /// Read the process's metrics in Prometheus's text exposition format.
    #[oai(path = "/metrics", method = "get", operation_id = "getMetrics")]
    async fn metrics(&self, state: Data<&AppState>) -> PlainText<String> {
        if let Ok(statuses) = state.projections.status().await {
            for status in statuses {
                metrics::gauge!("whist_projection_lag_events", "projection" => status.name.clone())
                    .set(status.lag as f64);
            }
        }
        PlainText(state.metrics.render())
    }
}

/// What `/readyz` says while the named loops are down (`None` when none is).
fn loops_down_status(down: &[&str]) -> Option<String> {
    match down {
        [] => None,
        [one] => Some(format!("background loop {one} is down (restarting)")),
        several => Some(format!(
            "background loops {} are down (restarting)",
            several.join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::loops_down_status;

    #[test]
    fn readiness_names_every_loop_that_is_down() {
        assert_eq!(loops_down_status(&[]), None);
        assert_eq!(
            loops_down_status(&["reconciler"]).as_deref(),
            Some("background loop reconciler is down (restarting)")
        );
        assert_eq!(
            loops_down_status(&["projections", "sweeper"]).as_deref(),
            Some("background loops projections, sweeper are down (restarting)")
        );
    }
}
