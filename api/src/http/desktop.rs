//! The desktop app's endpoints: assign, mandelbox status, regions.

use chrono::SecondsFormat;
use poem::web::Data;
use poem_openapi::param::Path;
use poem_openapi::payload::Json;
use poem_openapi::types::Example;
use poem_openapi::{ApiResponse, Object, OpenApi, Tags};
use whist_domain::images::CATALOG_ID;
use whist_domain::{Actor, EventMetadata};

use crate::control::assign::{assign, AssignRequest};
use crate::http::error::{error_body, unavailable, ErrorBody, STORE_UNAVAILABLE};
use crate::http::middleware::{ClientAddress, RequestId};
use crate::http::security::UserAuth;
use crate::services::Admission;
use crate::state::AppState;

#[derive(Tags)]
enum DesktopTag {
    /// Called by the desktop app with the user's Auth0 token.
    DesktopApp,
}

/// Body of `POST /mandelbox/assign`.
#[derive(Debug, Object)]
#[oai(example)]
pub struct AssignBody {
    /// Regions to try, in order of preference (at most 32, each at most 32 characters).
    #[oai(validator(max_items = 32, max_length = 32))]
    pub regions: Vec<String>,
    /// The commit hash of the desktop app; the host's image must match it (at most 64 characters).
    #[oai(validator(max_length = 64))]
    pub client_commit_hash: String,
    /// The desktop app's session number.
    pub session_id: i64,
    /// At most 320 characters.
    #[oai(validator(max_length = 320))]
    pub user_email: String,
    /// The desktop app's version (at most 64 characters).
    #[oai(validator(max_length = 64))]
    pub version: Option<String>,
}

impl Example for AssignBody {
    fn example() -> Self {
        Self {
            regions: vec!["us-east-1".to_string(), "us-west-1".to_string()],
            client_commit_hash: "9f3c2e1d0b8a7f6e5d4c3b2a1908f7e6d5c4b3a2".to_string(),
            session_id: 1_700_000_000,
            user_email: "ada@example.com".to_string(),
            version: Some("3.1.0".to_string()),
        }
    }
}

/// Answer of `POST /mandelbox/assign` (200 and 503 alike).
#[derive(Debug, Object)]
#[oai(example)]
pub struct AssignAnswer {
    pub ip: String,
    pub mandelbox_id: String,
    /// Empty on success, else one of REGION_NOT_ENABLED, NO_INSTANCE_AVAILABLE, COMMIT_HASH_MISMATCH,
    /// USER_ALREADY_ACTIVE, MAINTENANCE.
    pub error: String,
}

impl Example for AssignAnswer {
    fn example() -> Self {
        Self {
            ip: "10.0.3.17".to_string(),
            mandelbox_id: "0b8a3c9e-5d2f-4a61-9c7e-2f4b6d8a1c3e".to_string(),
            error: String::new(),
        }
    }
}

#[derive(ApiResponse)]
pub enum AssignResponse {
    /// A slot is reserved.
    #[oai(status = 200)]
    Assigned(Json<AssignAnswer>),
    /// Only subscribers are served.
    #[oai(status = 402)]
    PaymentRequired(Json<ErrorBody>),
    /// Too many assigns from this user or address, or more at once than the server takes; `Retry-After` says in how
    /// many seconds to try again.
    #[oai(status = 429)]
    TooManyRequests(Json<ErrorBody>, #[oai(header = "Retry-After")] u64),
    /// No slot could be reserved; `error` says why.
    #[oai(status = 503)]
    Unavailable(Json<AssignAnswer>),
}

/// A mandelbox as its owner sees it.
#[derive(Debug, Object)]
pub struct MandelboxView {
    pub mandelbox_id: String,
    /// ALLOCATED, CONNECTING, RUNNING, DYING or DEAD.
    pub status: String,
    pub ip: String,
    pub region: String,
    pub created_at: String,
}

#[derive(ApiResponse)]
pub enum MandelboxResponse {
    #[oai(status = 200)]
    Found(Json<MandelboxView>),
    /// No mandelbox of this user has that id.
    #[oai(status = 404)]
    NotFound(Json<ErrorBody>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

#[derive(ApiResponse)]
pub enum RegionsResponse {
    #[oai(status = 200)]
    Regions(Json<Vec<String>>),
    #[oai(status = 503)]
    Unavailable(Json<ErrorBody>),
}

/// An assign's answer naming why it was not placed.
fn not_placed(code: &str) -> Json<AssignAnswer> {
    Json(AssignAnswer {
        ip: String::new(),
        mandelbox_id: String::new(),
        error: code.to_string(),
    })
}

/// The desktop app's API.
pub struct DesktopApi;

#[OpenApi(tag = "DesktopTag::DesktopApp")]
impl DesktopApi {
    /// Reserve a mandelbox for the user on a host with room.
    #[oai(
        path = "/mandelbox/assign",
        method = "post",
        operation_id = "assignMandelbox"
    )]
    async fn assign(
        &self,
        state: Data<&AppState>,
        client: Data<&ClientAddress>,
        request_id: Data<&RequestId>,
        auth: UserAuth,
        body: Json<AssignBody>,
        /// A retry of this assign by the same user with the same key within 24 hours answers what the first one
        /// answered (the same `mandelbox_id`) and records nothing new.
        #[oai(name = "Idempotency-Key", validator(min_length = 1, max_length = 255))]
        idempotency_key: poem_openapi::param::Header<Option<String>>,
    ) -> AssignResponse {
        let principal = auth.0;
        // More assigns at once than the process takes, for longer than a stall lasts: answered before they cost
        // anything (not even the user's rate budget, since the app retries after `Retry-After`), so that the queue,
        // and with it every answer's time and how long each slot waits for its disconnect, stays bounded.
        let _place = match state.services.assign_admission.admit().await {
            Admission::AtOnce(place) => place,
            Admission::AfterWaiting(place) => {
                metrics::counter!("whist_assign_admission_waits_total", "outcome" => "admitted")
                    .increment(1);
                place
            }
            Admission::Refused { waited } => {
                if waited {
                    metrics::counter!("whist_assign_admission_waits_total", "outcome" => "refused")
                        .increment(1);
                }
                metrics::counter!("whist_assigns_total", "outcome" => "overloaded").increment(1);
                return AssignResponse::TooManyRequests(error_body("RATE_LIMITED"), 1);
            }
        };
        // The user's own limit first: a user over it spends nothing of the budget their address shares with others.
        let limited = state
            .services
            .user_rate
            .check(&principal.user_id)
            .and_then(|()| state.services.ip_rate.check_address(client.0 .0));
        if let Err(retry_after) = limited {
            metrics::counter!("whist_assigns_total", "outcome" => "rate_limited").increment(1);
            return AssignResponse::TooManyRequests(
                error_body("RATE_LIMITED"),
                retry_after.seconds(),
            );
        }
        match crate::control::entitlement::is_entitled(&state, &principal).await {
            Ok(true) => {}
            Ok(false) => {
                metrics::counter!("whist_assigns_total", "outcome" => "payment_required")
                    .increment(1);
                return AssignResponse::PaymentRequired(error_body(
                    "That resource is only available to Whist subscribers",
                ));
            }
            Err(error) => {
                crate::telemetry::log_failure("could not read the user's subscription", &error);
                return AssignResponse::Unavailable(not_placed(STORE_UNAVAILABLE));
            }
        }
        let request = AssignRequest {
            user_id: principal.user_id.clone(),
            regions: body.0.regions,
            client_commit_hash: body.0.client_commit_hash,
            session_id: body.0.session_id,
            app_name: "browsers/chrome".to_string(),
            idempotency_key: idempotency_key.0,
        };
        let metadata = EventMetadata::for_request(
            Actor::User(principal.user_id),
            &request_id.0 .0,
            chrono::Utc::now(),
        );
        let started = std::time::Instant::now();
        let outcome = assign(&state, &request, &metadata).await;
        metrics::histogram!("whist_assign_seconds").record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(Ok(assigned)) => {
                metrics::counter!("whist_assigns_total", "outcome" => "assigned").increment(1);
                AssignResponse::Assigned(Json(AssignAnswer {
                    ip: assigned.ip,
                    mandelbox_id: assigned.mandelbox_id,
                    error: String::new(),
                }))
            }
            Ok(Err(refusal)) => {
                metrics::counter!("whist_assigns_total", "outcome" => refusal.code()).increment(1);
                AssignResponse::Unavailable(not_placed(refusal.code()))
            }
            Err(_) => {
                metrics::counter!("whist_assigns_total", "outcome" => "failed").increment(1);
                AssignResponse::Unavailable(not_placed(STORE_UNAVAILABLE))
            }
        }
    }

    /// Read one of the user's mandelboxes.
    #[oai(
        path = "/mandelbox/:mandelbox_id",
        method = "get",
        operation_id = "getMandelbox"
    )]
    async fn mandelbox(
        &self,
        state: Data<&AppState>,
        auth: UserAuth,
        mandelbox_id: Path<String>,
    ) -> MandelboxResponse {
        let not_found = || MandelboxResponse::NotFound(error_body("NOT_FOUND"));
        if !crate::http::host::is_uuid(&mandelbox_id.0) {
            return not_found();
        }
        let (mandelbox, _) = match state
            .services
            .mandelboxes
            .load_from_history(&mandelbox_id.0)
            .await
        {
            Ok(loaded) => loaded,
            Err(error) => {
                return MandelboxResponse::Unavailable(unavailable(
                    "could not load a mandelbox",
                    &error,
                ))
            }
        };
        let (Some(status), Some(placement), Some(allocated_at)) = (
            mandelbox.status,
            mandelbox.placement,
            mandelbox.allocated_at,
        ) else {
            return not_found();
        };
        if placement.user_id != auth.0.user_id {
            return not_found();
        }
        MandelboxResponse::Found(Json(MandelboxView {
            mandelbox_id: mandelbox_id.0,
            status: status.as_str().to_string(),
            ip: placement.ip,
            region: placement.region,
            created_at: allocated_at.to_rfc3339_opts(SecondsFormat::Millis, true),
        }))
    }

    /// List the enabled regions that have an active image.
    #[oai(path = "/regions", method = "get", operation_id = "listRegions")]
    async fn regions(&self, state: Data<&AppState>) -> RegionsResponse {
        match state.services.catalog.load_from_history(CATALOG_ID).await {
            Ok((catalog, _)) => RegionsResponse::Regions(Json(
                state
                    .settings
                    .enabled_regions
                    .iter()
                    .filter(|region| catalog.active_in(region).is_some())
                    .cloned()
                    .collect(),
            )),
            Err(error) => RegionsResponse::Unavailable(unavailable(
                "could not load the image catalog",
                &error,
            )),
        }
    }
}
