//! `GET /dashboard`: the operator page, one HTML file compiled into the binary (no front-end build, nothing fetched
//! from elsewhere at run time). It asks for an admin token once, then polls the admin endpoints.

use poem::http::header;
use poem::{handler, IntoResponse, Response};

const PAGE: &str = include_str!("dashboard.html");

/// The page. Its script and styles are inline; the policy forbids loading anything from another origin.
#[handler]
pub fn page() -> impl IntoResponse {
    Response::builder()
        .content_type("text/html; charset=utf-8")
        .header(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; \
             img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'",
        )
        .header(header::CACHE_CONTROL, "no-store")
        .body(PAGE)
}
