//! The one place where outcomes become HTTP error answers: every error body is `{"error": CODE}` with a code the
//! contract names, and a failure (the store, or anything else a request needed and could not reach) is logged here
//! with its whole cause chain and answered with a generic code, never with its cause.

use poem::http::StatusCode;
use poem::Response;
use poem_openapi::payload::Json;
use poem_openapi::Object;

/// The code of every answer to a failure the client may retry (503).
pub const STORE_UNAVAILABLE: &str = "STORE_UNAVAILABLE";

/// A plain error body.
#[derive(Debug, Object)]
pub struct ErrorBody {
    pub error: String,
}

/// `{"error": code}`.
pub fn error_body(code: &str) -> Json<ErrorBody> {
    Json(ErrorBody {
        error: code.to_string(),
    })
}

/// The answer to a failure: `what` failed, logged with `error`'s whole chain; the client reads only
/// `STORE_UNAVAILABLE`.
pub fn unavailable(what: &str, error: &(dyn std::error::Error + 'static)) -> Json<ErrorBody> {
    crate::telemetry::log_failure(what, error);
    error_body(STORE_UNAVAILABLE)
}

/// A JSON `{"error": CODE}` response as a `poem::Error` (for answers outside poem-openapi's typed responses).
pub fn json_error(status: StatusCode, code: &str) -> poem::Error {
    poem::Error::from_response(
        Response::builder()
            .status(status)
            .content_type("application/json")
            .body(serde_json::json!({ "error": code }).to_string()),
    )
}
