//! Cross-cutting request handling: refusal while shutting down, the 1 MiB body limit, a request id and span on
//! every request, request metrics, and one shape for every refusal: the extractors' plain-text errors (a missing
//! token, a parameter that does not parse, a body that is not JSON, a method the route does not take) become
//! `{"error": CODE, "detail": …}` JSON, as the OpenAPI document declares, and a `405` names the route's methods in
//! `Allow`.

use std::sync::Arc;
use std::time::Instant;

use poem::http::{HeaderValue, StatusCode};
use poem::{Body, Endpoint, IntoResponse, Middleware, Request, Response, Result};
use tracing::Instrument;
use uuid::Uuid;

use crate::openapi::Methods;
use crate::state::AppState;

/// Requests whose body is larger are answered 413.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The middleware every route goes through.
pub struct RequestContext {
    state: AppState,
    methods: Arc<Methods>,
}

impl RequestContext {
    /// `methods`: each route's methods, for the `Allow` header of a `405`.
    pub fn new(state: AppState, methods: Methods) -> Self {
        Self {
            state,
            methods: Arc::new(methods),
        }
    }
}

impl<E: Endpoint> Middleware<E> for RequestContext {
    type Output = RequestContextEndpoint<E>;

    fn transform(&self, endpoint: E) -> Self::Output {
        RequestContextEndpoint {
            inner: endpoint,
            state: self.state.clone(),
            methods: self.methods.clone(),
        }
    }
}

pub struct RequestContextEndpoint<E> {
    inner: E,
    state: AppState,
    methods: Arc<Methods>,
}

fn json_error(status: StatusCode, error: &str) -> Response {
    Response::builder()
        .status(status)
        .content_type(crate::openapi::JSON)
        .body(serde_json::json!({ "error": error }).to_string())
}

/// The code of a refusal made outside a handler, by its status.
fn refusal_code(status: StatusCode) -> String {
    match status {
        StatusCode::BAD_REQUEST => "INVALID_REQUEST".to_string(),
        StatusCode::METHOD_NOT_ALLOWED => "METHOD_NOT_ALLOWED".to_string(),
        other => other
            .canonical_reason()
            .unwrap_or("ERROR")
            .to_uppercase()
            .replace([' ', '-'], "_"),
    }
}

/// Routes that answer without the store (process health, metrics, the documents, static pages).
fn needs_the_store(path: &str) -> bool {
    !(matches!(
        path,
        // A heartbeat is answered from memory (its token is checked by HMAC, the host's status comes from a copy,
        // the heartbeat is kept until the next write succeeds); only a change of liveness needs the store.
        "/healthz"
            | "/metrics"
            | "/openapi.json"
            | "/dashboard"
            | "/hirefire/test"
            | "/host/heartbeat"
    ) || path.starts_with("/docs"))
}

/// A handler that found the store unavailable (`500`, or `503 STORE_UNAVAILABLE`) makes the process suspect an
/// outage, so that the next requests are answered at once while it lasts. Other answers pass unchanged.
async fn report_store_failure(
    mut response: Response,
    reachability: &whist_adapters::store::Reachability,
) -> Response {
    let status = response.status();
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        reachability.suspect();
    } else if status == StatusCode::SERVICE_UNAVAILABLE {
        let body = response.take_body().into_bytes().await.unwrap_or_default();
        if body
            .windows(b"STORE_UNAVAILABLE".len())
            .any(|window| window == b"STORE_UNAVAILABLE")
        {
            reachability.suspect();
        }
        response.set_body(body);
    }
    response
}

/// Longest extractor message kept in `detail`.
const MAX_DETAIL: usize = 300;

/// An error answer that is not JSON (an extractor's plain text) becomes `{"error": CODE, "detail": text}`; a `405`
/// gets `Allow`. Other answers pass unchanged.
async fn normalise_refusal(mut response: Response, methods: &Methods, path: &str) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        if let Some(allow) = methods
            .allow(path)
            .and_then(|allow| HeaderValue::from_str(&allow).ok())
        {
            response
                .headers_mut()
                .insert(poem::http::header::ALLOW, allow);
        }
    }
    let is_json = response
        .content_type()
        .is_some_and(|content_type| content_type.starts_with("application/json"));
    if is_json {
        return response;
    }
    let text = response.take_body().into_string().await.unwrap_or_default();
    let mut detail: String = text.chars().take(MAX_DETAIL).collect();
    if detail.is_empty() {
        detail = status.canonical_reason().unwrap_or_default().to_string();
    }
    let body = serde_json::json!({ "error": refusal_code(status), "detail": detail }).to_string();
    response.set_body(body);
    response.headers_mut().insert(
        poem::http::header::CONTENT_TYPE,
        HeaderValue::from_static(crate::openapi::JSON),
    );
    response
        .headers_mut()
        .remove(poem::http::header::CONTENT_LENGTH);
    response
}

impl<E: Endpoint> Endpoint for RequestContextEndpoint<E> {
    type Output = Response;

    async fn call(&self, mut request: Request) -> Result<Self::Output> {
        let started = Instant::now();
        let method = request.method().to_string();
        let path = request.uri().path().to_string();
        let route = route_label(&path);
        let request_id = request
            .headers()
            .get("x-request-id")
            .and_then(|value| value.to_str().ok())
            .filter(|value| !value.is_empty() && value.len() <= 128)
            .map(str::to_string)
            .unwrap_or_else(|| Uuid::new_v4().to_string());
        let span = tracing::info_span!("request", request_id = %request_id, method = %method, route = %route);

        let response = async {
            if self.state.is_draining() {
                return json_error(StatusCode::SERVICE_UNAVAILABLE, "SHUTTING_DOWN");
            }
            let reachability = self.state.database.reachability();
            if reachability.is_down() && needs_the_store(&path) {
                // Known down (a probe's connection was refused just now): answer at once instead of waiting out
                // the pool's acquire timeout.
                return json_error(StatusCode::SERVICE_UNAVAILABLE, "STORE_UNAVAILABLE");
            }
            let declared_length = request
                .headers()
                .get(poem::http::header::CONTENT_LENGTH)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse::<usize>().ok());
            if declared_length.is_some_and(|length| length > MAX_BODY_BYTES) {
                return json_error(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE");
            }
            if declared_length.is_none() && request.method() != poem::http::Method::GET {
                // A body without a declared length (chunked) is read here, up to the limit.
                match request.take_body().into_bytes_limit(MAX_BODY_BYTES).await {
                    Ok(bytes) => request.set_body(Body::from_bytes(bytes)),
                    Err(poem::error::ReadBodyError::PayloadTooLarge) => {
                        return json_error(StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE")
                    }
                    Err(_) => return json_error(StatusCode::BAD_REQUEST, "UNREADABLE_BODY"),
                }
            }
            let response = match self.inner.call(request).await {
                Ok(output) => output.into_response(),
                Err(error) => error.into_response(),
            };
            let response = report_store_failure(response, reachability).await;
            normalise_refusal(response, &self.methods, &path).await
        }
        .instrument(span.clone())
        .await;

        let status = response.status();
        let elapsed = started.elapsed();
        metrics::counter!("whist_http_requests_total", "method" => method.clone(), "route" => route.clone(),
            "status" => status.as_u16().to_string())
        .increment(1);
        metrics::histogram!("whist_http_request_duration_seconds", "method" => method, "route" => route)
            .record(elapsed.as_secs_f64());
        span.in_scope(|| {
            if status.is_server_error() {
                tracing::warn!(
                    status = status.as_u16(),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "request failed"
                );
            } else {
                tracing::debug!(
                    status = status.as_u16(),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "request done"
                );
            }
        });
        let mut response = response;
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert("x-request-id", value);
        }
        Ok(response)
    }
}

/// The path with ids replaced by `{id}`, so that metrics have a bounded number of label values.
pub fn route_label(path: &str) -> String {
    let labelled: Vec<&str> = path
        .split('/')
        .map(|segment| {
            let looks_like_id = segment.len() >= 16
                || (!segment.is_empty()
                    && segment.chars().all(|character| character.is_ascii_digit()))
                || Uuid::parse_str(segment).is_ok();
            if looks_like_id {
                "{id}"
            } else {
                segment
            }
        })
        .collect();
    labelled.join("/")
}

#[cfg(test)]
mod tests {
    use super::route_label;

    #[test]
    fn ids_in_paths_become_placeholders() {
        assert_eq!(
            route_label("/mandelbox/0b8a3c9e-4c1f-4e8b-9b1a-2f7d2c1e5a90"),
            "/mandelbox/{id}"
        );
        assert_eq!(route_label("/healthz"), "/healthz");
        assert_eq!(route_label("/admin/events/42"), "/admin/events/{id}");
    }
}
