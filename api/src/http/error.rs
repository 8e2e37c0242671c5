//! The one place where outcomes become HTTP responses: domain rejections get stable codes, failures are logged
//! with their cause chain and answered with a generic body.

use poem::http::StatusCode;
use poem::Response;

/// A JSON `{"error": CODE}` response as a `poem::Error`.
pub fn json_error(status: StatusCode, code: &str) -> poem::Error {
    poem::Error::from_response(
        Response::builder()
            .status(status)
            .content_type("application/json")
            .body(serde_json::json!({ "error": code }).to_string()),
    )
}
